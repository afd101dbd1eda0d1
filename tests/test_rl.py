"""rl.py: GRPO on the tiny preset's rule teaches the rule; the judge reward survives a faulty endpoint honestly.

The rule-following rate is measured on the preset's prompts, sampled at temperature 1 (the preset's evaluation
convention, see alignkit.modeling.presets "evaluate"): greedy answers of the tiny SFT model already collapse to one
repeated word ("plum,plum,plum."), which the rule passes, so the greedy rate starts at 1.0 and can only be
checked not to drop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import pytest
from alignkit.core.errors import ConfigError
from conftest import run_script
from openai_server import Fault, FakeOpenAI, SilentServer


def _rates(model_id: str) -> tuple[float, float]:
    """(sampled rate over 4 samples per prompt at T=1, seed 0; greedy rate) of follows_rule on the preset's prompts."""
    from alignkit.core.config import ModelSettings
    from alignkit.modeling import presets
    from alignkit.modeling.generation import generate
    from alignkit.modeling.models import load_model
    from alignkit.modeling.presets import follows_rule

    rows = [json.loads(line)["prompt"] for line in open(presets.paths()["prompts"])]
    loaded = load_model(ModelSettings(model_id=model_id, quantization="none"))
    conversations = [[{"role": "user", "content": p}] for p in rows]
    sampled = generate(loaded.model, loaded.tokenizer, conversations * 4, max_new_tokens=16, temperature=1.0,
                       batch_size=256, seed=0)
    greedy = generate(loaded.model, loaded.tokenizer, conversations, max_new_tokens=16, temperature=0.0,
                      batch_size=64)
    rate = lambda answers, convs: sum(follows_rule(c[0]["content"], a) for c, a in zip(convs, answers)) / len(answers)
    return rate(sampled, conversations * 4), rate(greedy, conversations)


@pytest.fixture(scope="module")
def rl_run(sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl")
    return run_script("rl.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--output_dir", str(out))


def test_an_rl_run_records_its_settings_so_a_rerun_resumes_and_its_card_says_grpo(rl_run):
    """rl.py claimed its folder without start_run: no alignkit_config.json, so a rerun of the same command never
    resumed, one with other settings overwrote the run in place (its old evaluations left in the card), and the
    card called the run "merged adapters"."""
    from alignkit.train.rl import load_prompt_dataset
    from alignkit.train.training import prepare_run

    folder = Path(rl_run["run_folder"])
    assert json.loads((folder / "alignkit_config.json").read_text())["run_type"] == "rl"
    last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # The prompts read again give the same rows (prepare_run resumes only over the rows the run trained on).
    prompts = load_prompt_dataset(rl_run["settings"])
    assert prepare_run(rl_run["settings"], "rl", prompts) == (folder, str(last))
    card = (folder / "README.md").read_text()
    assert "GRPO of" in card and "merged" not in card.split("---")[1]  # the stage, and not a merge's tags


def test_a_run_resumed_past_its_first_epoch_trains_on_the_straight_run_s_prompts(sft_run, rl_run, tmp_path):
    """The tiny run takes 16 steps an epoch; resumed from its checkpoint-30 (epoch 1.9) it logs the rewards the
    straight run logged. TRL's sampler drew every epoch's order from one generator seeded once, so the resumed run
    started again at the first epoch's order while transformers skipped batches as if in the second: other prompts
    from the first step after the resume on (and a judge paid again for them)."""
    import shutil

    straight = json.loads((rl_run["run_folder"] / "checkpoint-60" / "trainer_state.json").read_text())["log_history"]
    copy = tmp_path / rl_run["run_folder"].name
    shutil.copytree(rl_run["run_folder"], copy)
    shutil.rmtree(copy / "checkpoint-60")
    resumed = run_script("rl.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]),
                         "--output_dir", str(tmp_path))
    assert resumed["trainer"].state.global_step == 60
    # TRL's GRPO counts its tokens in the state (kept by the checkpoint), not where sft/dpo/kto/reward count theirs.
    assert not list(copy.glob("checkpoint-*/num_tokens.json"))
    after = [e for e in resumed["trainer"].state.log_history if "reward" in e and e["step"] > 30]
    expected = {e["step"]: e["reward"] for e in straight if "reward" in e and e["step"] > 30}
    assert [e["step"] for e in after] == sorted(expected), "the run did not resume from checkpoint-30"
    assert {e["step"]: e["reward"] for e in after} == pytest.approx(expected, rel=1e-5)


def test_the_resumable_sampler_keeps_trl_s_order_for_a_straight_run_and_starts_at_any_epoch():
    from trl.trainer.utils import RepeatSampler

    from alignkit.train.rl import _OnlineMixin

    def trl_sampler():
        return RepeatSampler(list(range(10)), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=7)

    trl = type("TRLTrainer", (), {"_get_train_sampler": lambda self, dataset=None: trl_sampler()})
    trainer = type("Trainer", (_OnlineMixin, trl), {})()
    straight = trl_sampler()
    epochs = [list(straight) for _ in range(3)]  # TRL's straight run: three epochs from one generator
    ours = trainer._get_train_sampler()
    assert [list(ours) for _ in range(3)] == epochs  # nothing calls set_epoch: TRL's orders
    for epoch in (2, 0, 1):  # a run resumed in epoch k starts at epoch k's order
        resumed = trainer._get_train_sampler()
        resumed.set_epoch(epoch)
        assert list(resumed) == epochs[epoch]

    # Under a launch (2 processes: accelerate's BatchSamplerShard, and a SkipBatchSampler on resume) transformers'
    # set_epoch never reached the sampler, so a resumed rank drew the first epoch's order again: the trainer sets it.
    import torch
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    def rank_0(sampler):
        loader = torch.utils.data.DataLoader(list(range(10)), batch_size=4, sampler=sampler)
        return prepare_data_loader(loader, num_processes=2, process_index=0, put_on_device=False)

    straight = rank_0(trl_sampler())
    by_epoch = [[b.tolist() for b in straight] for _ in range(3)]
    drawn = []

    def run_epoch(self, *args, epoch, train_dataloader, **kwargs):
        drawn.extend(b.tolist() for b in train_dataloader)

    launched = type("Trainer", (_OnlineMixin, type("TRLTrainer", (), {
        "_get_train_sampler": lambda self, dataset=None: trl_sampler(), "_run_epoch": run_epoch})), {})()
    loader = skip_first_batches(rank_0(launched._get_train_sampler()), 1)
    loader.set_epoch(2)  # what transformers calls: it stops short of the sampler
    launched._run_epoch(epoch=2, train_dataloader=loader)
    assert drawn == by_epoch[2][1:]


def test_grpo_with_the_rule_raises_rule_following(sft_run, rl_run):
    before, before_greedy = _rates(str(sft_run["run_folder"]))
    after, after_greedy = _rates(str(rl_run["run_folder"]))
    assert after - before >= 0.1 or after >= 0.95, (before, after)
    assert after_greedy >= min(before_greedy, 0.95)
    # The run logged what the issue asks for, and saved an adapter over the SFT adapter, as dpo.py does.
    logs = [e for e in rl_run["trainer"].state.log_history if "loss" in e]
    assert logs and all({"reward", "reward_std", "kl", "completions/mean_length"} <= e.keys() for e in logs)
    for entry in logs:
        shares = [entry[f"time/{part}_share"] for part in ("generating", "judging", "training")]
        assert all(0 <= s <= 1 for s in shares) and abs(sum(shares) - 1) < 0.01
    config = json.loads((rl_run["run_folder"] / "adapter_config.json").read_text())
    # A local adapter underneath is recorded relative to this one (alignkit.modeling.models.save_adapter).
    assert (rl_run["run_folder"] / config["base_model_name_or_path"]).resolve() == sft_run["run_folder"].resolve()


def test_reference_pass_keeps_the_sft_adapter(rl_run):
    """KL's reference is base + SFT adapter (trained adapter off), not the bare base TRL's PEFT path would use."""
    import torch

    from alignkit.modeling.models import reference_mode

    trainer = rl_run["trainer"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    tok = rl_run["loaded"].tokenizer
    batch = tok(["<|user|>name three fruits.<|end|><|assistant|>apple,pear,plum.<|end|>"], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    from alignkit.train.rl import _Reference

    ref, _, _ = trainer._get_per_token_logps_and_entropies(_Reference(), ids, mask, 6)
    trl_class = next(k for k in type(trainer).__mro__ if k.__module__.startswith("trl."))  # TRL's own pass
    with torch.no_grad(), reference_mode(model, trainer.frozen_adapters):
        expected, _, _ = trl_class._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, 6)
    with torch.no_grad(), model.disable_adapter():
        bare, _, _ = trl_class._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, 6)
    assert torch.allclose(ref, expected)
    assert not torch.allclose(ref, bare)  # the SFT adapter is part of the reference


def _judge_settings(server, tmp_path, **extra):
    from alignkit.core.config import RLSettings

    return RLSettings(**{"reward": ["judge"], "judge_base_url": server.base_url, "judge_model": "judge", "max_retries": 1,
                         "request_timeout": 5, "parallel": 4, "judge_cache": str(tmp_path / "cache"), **extra})


def _faulty(body):
    """500 for answers naming apple, garbage (no rating) for pear, 429 once then fine for plum, else a rating."""
    text = body["messages"][-1]["content"]
    answer = text.split("[The Start of Assistant's Answer]\n")[-1]
    if "apple" in answer:
        return Fault(500)
    if "pear" in answer:
        return "I cannot rate this."
    if "plum" in answer and not any("plum" in r["messages"][-1]["content"].split("Answer]\n")[-1]
                                    for r in _faulty.seen):
        _faulty.seen.append(body)
        return Fault(429, headers={"Retry-After": "0"})
    return "Good answer. Rating: [[8]]"


def test_judge_reward_counts_failures_and_never_scores_them(tmp_path):
    from alignkit.train.rl_rewards import JudgeReward

    _faulty.seen = []
    prompts = [[{"role": "user", "content": "name three fruits."}]] * 4
    completions = [[{"role": "assistant", "content": a}] for a in ("apple.", "pear.", "plum.", "mango.")]
    with FakeOpenAI(_faulty) as server:
        reward = JudgeReward(_judge_settings(server, tmp_path), tmp_path / "cache")
        scores = reward(prompts, completions)
        assert scores[0] is None and scores[1] is None  # 500 after retries, and an answer without a rating
        assert scores[2] == pytest.approx(0.8) and scores[3] == pytest.approx(0.8)  # the 429 was retried
        assert reward.stats["failed"] == 1 and reward.stats["unparsed"] == 1 and reward.stats["unscored"] == 2
        assert reward.failed == [True, True, False, False]  # the rows the trainer unscores whole
        sent = server.count
        again = reward(prompts, completions)  # the cache answers all but the failed request, which is asked again
        assert again == scores
        assert server.count - sent == 2  # the 500 with its one retry; nothing else re-sent
        reward.close()
    records = [json.loads(line) for line in (tmp_path / "cache" / "judgments.jsonl").read_text().splitlines()]
    assert len(records) == 3 and sum(r["verdict"] is None for r in records) == 1


def test_a_judge_that_never_answers_stops_training_in_one_line(tmp_path):
    """A silent judge left every completion unscored after --max_retries timeouts per request, every step: its first
    timeout now stops the run, naming --request_timeout."""
    from alignkit.core.errors import UserError
    from alignkit.train.rl_rewards import JudgeReward

    prompts = [[{"role": "user", "content": "name three fruits."}]] * 4
    completions = [[{"role": "assistant", "content": a}] for a in ("apple.", "pear.", "plum.", "mango.")]
    with SilentServer() as server:
        reward = JudgeReward(_judge_settings(server, tmp_path, request_timeout=1, max_retries=3, parallel=2),
                             tmp_path / "cache")
        with pytest.raises(UserError, match=r"accepted the connection but sent no answer in 1 s \(--request_timeout\)"):
            reward(prompts, completions)
        assert server.connections <= 2
        reward.close()


def test_a_judge_that_fails_its_first_requests_stops_the_run_in_one_line_and_one_that_recovers_does_not(tmp_path):
    """An unreachable judge (connection refused) failed every request of every step, each left unscored, and the run
    ended "judge: 32 requests ... 32 failed", exit 0 (the rl.py audit of session 93): label.py's FIRST_FAILURES and
    FAILURES_IN_A_ROW now watch rl.py's judge too, over the whole run, step after step. A judge that fails a few
    requests and recovers still scores them None and goes on."""
    from types import SimpleNamespace

    from alignkit.core.errors import UserError
    from alignkit.train.rl_rewards import JudgeReward

    def ask(n, start=0):
        return [[{"role": "user", "content": "name three fruits."}]] * n, \
            [[{"role": "assistant", "content": f"fig {i}."}] for i in range(start, start + n)]

    dead = SimpleNamespace(base_url="http://127.0.0.1:9/v1")  # nothing listens on port 9 (discard)
    reward = JudgeReward(_judge_settings(dead, tmp_path, max_retries=0), tmp_path / "cache")
    with pytest.raises(UserError, match=r"^the first 5 judge requests all failed \(APIConnectionError: .*\): stopped "
                                        r"the run\. Check that the server at http://127\.0\.0\.1:9/v1 is up "
                                        r"\(--judge_base_url.* --judge_model judge, then run the same command again"):
        reward(*ask(8))
    reward.close()
    def recovering(failures):  # a judge whose first `failures` requests fail (500), the later ones answered
        left = [failures]

        def answer(body):
            left[0] -= 1
            return Fault(500) if left[0] >= 0 else "Rating: [[8]]"
        return answer, left

    answer, _ = recovering(7)
    with FakeOpenAI(answer) as server:
        reward = JudgeReward(_judge_settings(server, tmp_path, max_retries=0, parallel=1), tmp_path / "cache2")
        assert reward(*ask(3)) == [None] * 3  # a step's few failures: unscored, the run goes on
        with pytest.raises(UserError, match=r"^the first 5 judge requests all failed \(InternalServerError"):
            reward(*ask(3, 3))  # the watch spans steps: the 5th failure of the run, in the next step
        reward.close()
    answer, failing = recovering(3)
    with FakeOpenAI(answer) as server:  # another server: the stopped step's last request may still come
        reward = JudgeReward(_judge_settings(server, tmp_path, max_retries=0, parallel=1), tmp_path / "cache3")
        assert reward(*ask(4)) == [None] * 3 + [pytest.approx(0.8)]
        failing[0] = 6  # after an answer, failures stop the run only FAILURES_IN_A_ROW in a row
        assert reward(*ask(8, 4)) == [None] * 6 + [pytest.approx(0.8)] * 2
        assert reward.stats["failed"] == 9
        reward.close()


def test_each_process_of_a_launch_keeps_its_own_judgments_and_reads_all_of_them(tmp_path, monkeypatch):
    """Under a 2-process launch both processes locked the one judgments.jsonl: the second stopped with "in use by
    another rl.py run", so `--reward judge` never ran under DDP/FSDP/ZeRO. Each process now appends to its own file
    and looks up every process's earlier judgments (a resumed run, another world size)."""
    from alignkit.train.rl_rewards import JudgeReward

    prompt = [{"role": "user", "content": "name three fruits."}]
    said = [[{"role": "assistant", "content": a}] for a in ("fig.", "kiwi.")]
    cache = tmp_path / "cache"
    with FakeOpenAI(lambda body: "Rating: [[8]]") as server:
        first = JudgeReward(_judge_settings(server, tmp_path), cache)  # rank 0 (no RANK: a plain run)
        # Opened at the first judgment, after training claimed the run folder: rl.py builds its rewards before, and
        # a rerun's judgments went where the claim moved the earlier run (run.previous-TIME/judge.cache).
        assert not cache.exists()
        assert first([prompt], said[:1]) == [pytest.approx(0.8)]
        monkeypatch.setenv("RANK", "1")
        second = JudgeReward(_judge_settings(server, tmp_path), cache)  # beside the first, not refused
        sent = server.count
        assert second([prompt] * 2, said) == [pytest.approx(0.8)] * 2 and server.count - sent == 1  # fig: cached
        first.close(), second.close()
        lines = {p.name: p.read_text().count("\n") for p in cache.iterdir()}
        assert lines == {"judgments.jsonl": 1, "judgments.rank1.jsonl": 1}
        # Closed (a run's end), or its folder gone (a notebook's failed training, then the cell again): the next
        # use opens the file where it is now, instead of writing to the closed or deleted one.
        import shutil

        shutil.rmtree(cache)
        assert second([prompt], [[{"role": "assistant", "content": "plum."}]]) == [pytest.approx(0.8)]
        second.close()
    assert (cache / "judgments.rank1.jsonl").read_text().count("\n") == 1


def test_pairwise_judge_reward_uses_label_keys(tmp_path):
    from alignkit.feedback.judge import make_judge  # noqa: F401 - the key below is label.py's make_pairs key
    from alignkit.core.digests import digest
    from alignkit.train.rl_rewards import JudgeReward

    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"prompt": "name three fruits.", "response": "apple,pear,plum."}) + "\n")
    prompt = [{"role": "user", "content": "name three fruits."}]
    # The completion wins in slot A and loses in slot B: a position-biased judge; the reward averages to 0.5.
    with FakeOpenAI(lambda body: "[[A]]") as server:
        reward = JudgeReward(_judge_settings(server, tmp_path, judge_mode="pairwise",
                                             reference_completions=str(refs)), tmp_path / "cache")
        scores = reward([prompt, [{"role": "user", "content": "name three tools."}]],
                        [[{"role": "assistant", "content": "mango,lemon,plum."}]] * 2)
        assert scores == [0.5, None] and reward.stats["no reference"] == 1
        assert reward.failed == [False, False]  # no reference: not judged, so "does not apply", not a failure
        assert reward.stats["unscored"] == 0
        key = digest({"prompt": prompt, "a": "mango,lemon,plum.", "b": "apple,pear,plum.", **reward.judge.identity()})
        assert key in reward.cache
        reward.close()


def test_skip_invalid_skips_a_bad_reference_completion_row(tmp_path, alignkit_log):
    """--reference_completions is read as label.py reads a responses file, whose bad rows --skip_invalid did not
    skip: a bad row stopped rl.py all the same. Skipped and said in one line, its prompt has no reference."""
    from alignkit.core.data import DataError
    from alignkit.train.rl_rewards import JudgeReward

    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"prompt": "name three fruits.", "response": "apple,pear,plum."}) + "\n"
                    + json.dumps({"prompt": "name three tools.", "response": 7}) + "\n")
    with FakeOpenAI(lambda body: "[[A]]") as server:
        with pytest.raises(DataError, match=r"refs.jsonl: row 2: field 'response': expected the response as text"):
            JudgeReward(_judge_settings(server, tmp_path, judge_mode="pairwise", reference_completions=str(refs)),
                        tmp_path / "cache")
        reward = JudgeReward(_judge_settings(server, tmp_path, judge_mode="pairwise", reference_completions=str(refs),
                                             skip_invalid=True), tmp_path / "cache")
        assert len(reward.references) == 1
        assert "refs.jsonl: skipped 1 of 2 rows as invalid (--skip_invalid)" in alignkit_log.text
        reward.close()


def test_rl_with_a_failing_judge_trains_without_turning_failures_into_rewards(sft_run, tmp_path, capsys, caplog,
                                                                              alignkit_log, monkeypatch):
    """Rule + judge, the judge always failing: no crash; every completion unscored (not rule + 0), all counted. Each
    log counts its own step's judgments (the rl.py audit of session 28: they ran on from the start of the process,
    and from 0 again at a resume; rewards/unscored_frac too, so a late judge outage read as a small share), and the
    summary line sums them. The judge refuses each request for itself (HTTP 400, a content filter's): a server that
    fails them all (500, no connection) stops the run at its 5th failure instead (the test above)."""
    from alignkit.train import rl

    monkeypatch.setattr(rl._UnscoredRows, "said", False)  # said once a process: an earlier test may have said it
    with FakeOpenAI(lambda body: Fault(400)) as server:
        g = run_script("rl.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--output_dir",
                       str(tmp_path), "--reward", "rule,judge", "--judge_base_url", server.base_url,
                       "--judge_model", "judge", "--max_retries", "0", "--max_steps", "3", "--logging_steps", "2")
    logs = [e for e in g["trainer"].state.log_history if "loss" in e]
    assert logs and all(e["rewards/unscored_frac"] == 1.0 for e in logs)
    # No reward was made up from the rule term alone: the logged reward is NaN (transformers logs it as None).
    assert all(e["reward"] is None or math.isnan(e["reward"]) for e in logs)
    assert all(e["grad_norm"] == 0 for e in logs)  # advantage 0 everywhere and KL 0 at the start: no update
    history = g["trainer"].state.log_history
    # The last step is logged too, off --logging_steps 2 (its figures were only averaged into the closing summary).
    assert (g["run_folder"] / "adapter_config.json").is_file() and [e["step"] for e in logs] == [2, 3]
    per_step = logs[0]["judge/requests"] // 2  # the completions of one step, each judged once and failed
    closing, = [e for e in history if "train_runtime" in e]  # after the last log: nothing left to count
    assert per_step >= 16 and logs[0]["judge/failed"] == 2 * per_step and logs[1]["judge/requests"] == per_step
    assert closing["judge/requests"] == 0
    # metrics.json holds the run's totals (it read the closing log's 0 beside the last step's reward: the review of
    # session 32).
    metrics = json.loads((g["run_folder"] / "metrics.json").read_text())
    assert (metrics["judge/requests"], metrics["judge/failed"]) == (3 * per_step, 3 * per_step)
    assert f"judge: {3 * per_step} requests, 0 of them from the cache, {3 * per_step} failed, 0 without a rating" \
        in capsys.readouterr().out
    # TRL's warning for a completion every reward left None (a judge alone, failing) printed its whole row, every step
    # (the rl.py audit of session 28): one line instead, once. Said here through TRL's own logger, as its trainer does.
    from trl.trainer import grpo_trainer

    for _ in range(2):
        grpo_trainer.logger.warning("All reward functions returned None for the following kwargs:\n{'prompt': ...}\n"
                                    "Please ensure that at least one reward function returns a valid reward.")
    assert "All reward functions returned None" not in caplog.text
    assert alignkit_log.text.count("a completion no reward scored") == 1


def test_python_and_reward_model_rewards_combine_with_weights(sft_run, tiny_cache, tmp_path):
    """--reward rule,python:FILE:FN,rm:FOLDER --reward_weights: the logged reward is the weighted sum of the terms."""
    reward_run = run_script("reward.py", "--preset", "tiny", "--output_dir", str(tmp_path), "--run_name", "rm",
                            "--max_steps", "3", "--eval_split", "0")
    code = tmp_path / "my_reward.py"
    # TRL's contract on the preset's prompts, written as text with a category column: text in, and every other
    # column as a keyword argument (before, completions came as messages and the columns were dropped).
    code.write_text("def short(prompts, completions, category, **kwargs):\n"
                    "    assert all(isinstance(x, str) for x in prompts + completions + category), (prompts, completions)\n"
                    "    return [1.0 / (1 + len(c)) for c in completions]\n")
    g = run_script("rl.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--output_dir",
                   str(tmp_path), "--run_name", "mix", "--reward", f"rule,python:{code}:short,rm:{reward_run['run_folder']}",
                   "--reward_weights", "1,2,0.5", "--max_steps", "2", "--logging_steps", "1",
                   "--chat_template_kwargs", '{"flag": true}')
    assert g["rewards"][2].template_kwargs == {"flag": True}  # the reward model renders as TRL would render it
    for entry in [e for e in g["trainer"].state.log_history if "loss" in e]:
        names = ["rule_reward", "short", f"rm:{Path(reward_run['run_folder']).name}"]
        means = [entry[f"rewards/{n}/mean"] for n in names]
        assert all(m is not None for m in means)
        assert entry["reward"] == pytest.approx(means[0] + 2 * means[1] + 0.5 * means[2], rel=1e-4, abs=1e-5)


def test_rloo_with_the_rule_raises_rule_following(sft_run, tmp_path):
    g = run_script("rl.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--output_dir",
                   str(tmp_path), "--algo", "rloo")
    assert type(g["trainer"]).__name__ == "AlignRLOOTrainer"
    before, _ = _rates(str(sft_run["run_folder"]))
    after, _ = _rates(str(g["run_folder"]))
    assert after - before >= 0.1 or after >= 0.95, (before, after)


def recording_reward(folder: Path, name: str, signature: str, records: str):
    """A python: reward `name(signature)` that writes each of `records` (an expression over its arguments) as one JSON
    line and scores 0.0 per completion: (the reward as rl.py builds it, the file of what reached it)."""
    from alignkit.train import rl_rewards

    seen = folder / f"{name}.seen.jsonl"
    (folder / f"{name}.py").write_text(f"import json\ndef {name}({signature}):\n    with open({str(seen)!r}, 'a') as f:\n"
                                       f"        for record in {records}:\n"
                                       "            f.write(json.dumps(list(record)) + '\\n')\n"
                                       "    return [0.0 for _ in completions]\n")
    return rl_rewards.import_reward(f"python:{folder / name}.py:{name}"), seen


def test_a_python_reward_gets_the_rows_as_trl_hands_them(tmp_path):
    """TRL calls a reward function with every other column of the row as a keyword argument, and with text for
    a prompt written as text (messages for a conversation). rl.py dropped the columns (a `solution` argument was a
    TypeError) and sent text prompts' completions as messages (a length reward saw 1 for every completion)."""
    import json

    from alignkit.core.config import RLSettings
    from alignkit.train import rl, rl_rewards

    data = tmp_path / "math.jsonl"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    # A repeated prompt is a row of its own, as TRL trains it (it was dropped, its solution with it).
    data.write_text(json.dumps({"prompt": "1+1?", "solution": "2"}) + "\n"
                    + json.dumps({"prompt": chat, "solution": "4"}) + "\n"
                    + json.dumps({"prompt": "1+1?", "solution": "two"}) + "\n")
    rows = rl.load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=str(data)))
    assert rows.column_names == ["solution", "prompt", rl_rewards.TEXT_PROMPT]
    assert rows["solution"] == ["2", "4", "two"]
    assert rows["prompt"][2] == rows["prompt"][0]
    assert len(rl.load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=str(data), max_prompts=2))) == 2
    reward, seen = recording_reward(tmp_path, "accuracy", "prompts, completions, solution, **kwargs",
                                    "zip(prompts, completions, solution)")
    assert reward.__name__ == "accuracy"
    said = [{"role": "assistant", "content": "2"}]
    # As TRL hands them: the row's columns, alignkit's mark among them, which the function does not get.
    for row in (rows[0], rows[1]):
        columns = {k: [v] for k, v in row.items() if k != "prompt"}
        assert reward(prompts=[row["prompt"]], completions=[said], **columns) == [0.0]
    assert [json.loads(line) for line in seen.read_text().splitlines()] == [["1+1?", "2", "2"], [chat, said, "4"]]


def test_an_async_reward_is_awaited_and_its_none_leaves_the_other_rewards_summed(sft_run, tmp_path, capsys):
    """TRL awaits an async reward function (an API call), and where a function returns None ("does not apply
    here") it sums the other rewards. rl.py's wrapper hid the coroutine from TRL, and a None unscored the whole
    completion (advantage 0), so a reward that applies to some rows silenced the others on the rest.
    A run shorter than --logging_steps (the preset's 5) logged no step: its summary said "reward: X at the first
    log, X at the last" off TRL's closing summary, and metrics.json had no time shares nor unscored share (the rl
    audit of session 51). Its last step is logged, and the summary says it is the one."""
    code = tmp_path / "maybe.py"
    code.write_text("async def maybe(prompts, completions, category, **kwargs):\n"
                    "    assert all(isinstance(x, str) for x in prompts + completions), (prompts, completions)\n"
                    "    return [None if i % 2 else 1.0 for i in range(len(completions))]\n")
    g = run_script("rl.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--output_dir",
                   str(tmp_path), "--reward", f"rule,python:{code}:maybe", "--max_steps", "1")
    logs = [e for e in g["trainer"].state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1]
    assert re.search(r"^reward: [0-9.]+ at step 1, the one step that logged a reward$", capsys.readouterr().out,
                     re.M)
    metrics = json.loads((g["run_folder"] / "metrics.json").read_text())
    assert metrics["rewards/unscored_frac"] == 0.0 and metrics["reward"] == logs[0]["reward"]
    assert {"time/generating_share", "time/judging_share", "time/training_share"} <= set(metrics)
    for entry in logs:
        assert entry["rewards/unscored_frac"] == 0.0 and entry["rewards/maybe/mean"] == 1.0
        # Half the completions get the rule plus 1, the other half the rule alone.
        assert entry["reward"] == pytest.approx(entry["rewards/rule_reward/mean"] + 0.5, abs=1e-5)


def test_a_failed_judgment_unscores_its_completion_and_a_python_none_does_not():
    """The rows' rewards after TRL's: NaN throughout where a judgment failed; a python reward's None left as
    TRL leaves it (its nansum adds the others); a row every reward left None counted unscored. A pairwise judge's
    None for a prompt without a reference completion is not a failure (it unscored the row, the other rewards
    dropped): it is left as a python None is."""
    from collections import Counter

    import torch

    from alignkit.train.rl import _OnlineMixin
    from alignkit.train.rl_rewards import JudgeReward, rule_reward

    class TRLs:
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            return self.raw.clone()

    class Trainer(_OnlineMixin, TRLs):
        pass

    def mine(prompts, completions, **kwargs):
        return []

    nan = float("nan")
    trainer = Trainer()
    trainer._times, trainer._unscored = Counter(), Counter()
    judge = JudgeReward.__new__(JudgeReward)
    judge.failed = [False, True, False, True, False]  # row 4: no reference completion, so not judged
    trainer.reward_funcs = [judge, mine]
    trainer.raw = torch.tensor([[0.8, nan], [nan, 1.0], [0.5, 0.2], [nan, nan], [nan, 0.3]])
    out = trainer._calculate_rewards(None, [None] * 5, None, None)
    assert out[0, 0] == pytest.approx(0.8) and torch.isnan(out[0, 1])  # the python reward's None only
    assert torch.isnan(out[1]).all() and torch.isnan(out[3]).all()  # the failed judgment: the whole row
    assert torch.equal(out[2], trainer.raw[2]) and trainer._unscored == Counter(rows=5, unscored=2)
    assert out[4, 1] == pytest.approx(0.3)  # the judge did not apply: the other reward stands
    trainer.reward_funcs = [rule_reward, mine]
    trainer.raw = torch.tensor([[0.8, nan], [nan, nan]])
    out = trainer._calculate_rewards(None, [None] * 2, None, None)
    assert out[0, 0] == pytest.approx(0.8) and trainer._unscored == Counter(rows=7, unscored=3)


def test_the_summary_counts_the_logs_that_had_a_reward():
    """--steps_per_generation 2 made 2 steps, the second reusing the first's completions, so only the first logged a
    reward: the summary said "reward: 0.844 at step 1, the one step logged" (the rl.py audit of session 93)."""
    from alignkit.train.rl import reward_summary

    loss = {"loss": 0.0}
    two = [{**loss, "step": 1, "reward": 0.844}, {**loss, "step": 2}, {"step": 2, "train_runtime": 1.0}]
    assert reward_summary(two) == "reward: 0.844 at step 1, the one step that logged a reward (of the 2 logs)"
    assert reward_summary(two[:1]) == "reward: 0.844 at step 1, the one step that logged a reward"
    four = [{**loss, "step": s, **({"reward": s / 10} if s % 2 else {})} for s in (1, 2, 3, 4)]
    assert reward_summary(four) == ("reward: 0.100 at step 1, 0.300 at step 3, the first and last logs that had one "
                                    "(2 of 4)")
    assert reward_summary(four[::2]) == "reward: 0.100 at the first log, 0.300 at the last"
    assert reward_summary([{**loss, "step": 1, "reward": None}]) is None  # every completion unscored


def test_rl_needs_a_reward_outside_the_preset(tmp_path):
    """The rule is the tiny preset's word check: on the user's data it scored 0 for every completion, so the run
    trained on zero advantages. Outside the preset --reward is required (TRL refuses to train without one)."""
    from alignkit.core.args import ConfigError

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?"}) + "\n")
    with pytest.raises(ConfigError, match="rl.py needs --reward: judge .*rm:FOLDER .*python:module:function"):
        run_script("rl.py", "--model_id", str(tmp_path / "no-model"), "--dataset_id", str(data),
                   "--output_dir", str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_reward_model_s_conversations_render_with_the_chat_template_kwargs(tiny_cache):
    """rm:FOLDER ignored GRPOConfig's chat_template_kwargs ({"enable_thinking": false}), which TRL passes when it
    renders a reward model's conversations."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from alignkit.feedback.rewards import score
    from alignkit.modeling import presets

    tok = AutoTokenizer.from_pretrained(presets.paths()["model"])
    tok.chat_template = "{% if flag %}<|system|>{% endif %}{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"

    class Summing(torch.nn.Module):  # the reward: the sum of the token ids, so any other rendering shows
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=(input_ids * attention_mask).sum(1, keepdim=True).float())

    conversation = [[{"role": "user", "content": "name three fruits."}, {"role": "assistant", "content": "fig."}]]
    plain, flagged = score(Summing(), tok, conversation), score(Summing(), tok, conversation, template_kwargs={"flag": 1})
    assert flagged[0] - plain[0] == tok.convert_tokens_to_ids("<|system|>")


def test_a_prompt_written_as_text_is_told_by_its_row_and_rewards_are_named_and_awaited_as_trl_does(tmp_path):
    """Prompts written as text were a set of message digests kept in the module: a one-turn conversation with the
    same words, in the same data, handed its rewards text too (and a notebook's second load had to clear it). The
    row says it now. An async callable object or a partial lost its name (TRL logs each reward under it) and, as a
    partial, its async."""
    from trl.trainer.utils import is_async_callable

    from alignkit.core.config import RLSettings
    from alignkit.train import rl, rl_rewards

    both = tmp_path / "both.jsonl"
    hello = [{"role": "user", "content": "hello"}]
    both.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": hello}) + "\n")
    rows = rl.load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=str(both)))
    assert rows["prompt"] == [hello, hello] and rows[rl_rewards.TEXT_PROMPT] == [True, False]
    echo, seen = recording_reward(tmp_path, "echo", "prompts, completions, **kwargs",
                                  "((p, c, sorted(kwargs)) for p, c in zip(prompts, completions))")
    said = [{"role": "assistant", "content": "hi"}]
    for row in rows:
        assert echo(prompts=[row["prompt"]], completions=[said], **{k: [v] for k, v in row.items() if k != "prompt"}) \
            == [0.0]
    assert [json.loads(line) for line in seen.read_text().splitlines()] == [["hello", "hi", []], [hello, said, []]]
    (tmp_path / "scorers.py").write_text(
        "import functools\n"
        "class Length:\n"
        "    async def __call__(self, prompts, completions, scale=1.0, **kwargs):\n"
        "        return [scale * len(c) for c in completions]\n"
        "length = Length()\n"
        "halved = functools.partial(Length(), scale=0.5)\n")
    for name, expected in (("length", [2.0]), ("halved", [1.0])):
        reward = rl_rewards.import_reward(f"python:{tmp_path / 'scorers.py'}:{name}")
        assert reward.__name__ == "Length" and is_async_callable(reward)
        assert asyncio.run(reward(prompts=["q"], completions=["ab"])) == expected


def test_a_python_reward_that_returns_no_float_per_completion_or_misses_a_column_says_so_in_one_line(tmp_path):
    """Found by an rl.py audit: a reward returning strings failed inside TRL's trainer ("too many dimensions 'str'"),
    one returning too few values with TRL's traceback, one reading a column the dataset lacks with a bare KeyError;
    none named the reward. Each is now one line (a ConfigError: `error: ...`, status 2) naming it."""
    from alignkit.train import rl_rewards

    (tmp_path / "bad.py").write_text(
        "def words(prompts, completions, **kw):\n    return ['high' for c in completions]\n"
        "def one(prompts, completions, **kw):\n    return [1.0]\n"
        "def column(prompts, completions, **kw):\n    return [float(s == c) for s, c in zip(kw['solution'], completions)]\n"
        "async def later(prompts, completions, **kw):\n    return 0.5\n"
        "def fine(prompts, completions, **kw):\n    return [1, None, True]\n"
        "import numpy, torch\n"  # what TRL takes too: NumPy and tensor numbers, an array, a generator
        "def numbers(prompts, completions, **kw):\n    return [numpy.bool_(True), torch.tensor(0.5), numpy.float32(2)]\n"
        "def array(prompts, completions, **kw):\n    return numpy.zeros(len(completions))\n"
        "def lazily(prompts, completions, **kw):\n    return (0.0 for _ in completions)\n"
        "def infinite(prompts, completions, **kw):\n    return [0.5, float('inf'), 0.5]\n"
        "def infinite_array(prompts, completions, **kw):\n    return -numpy.inf * numpy.ones(3)\n"
        "def needs(prompts, completions, solution, **kw):\n    return [0.0] * len(completions)\n"
        "def closed(prompts, completions):\n    return [0.0] * len(completions)\n"
        "import functools\n"  # a decorator adapting a reward that names what it reads: its wrapper takes it all
        "def adapted(f):\n    @functools.wraps(f)\n    def wrapper(*args, **kwargs):\n"
        "        return f(completions=kwargs['completions'], answer=kwargs['answer'])\n    return wrapper\n"
        "@adapted\ndef wrapped(completions, answer):\n    return [0.0] * len(completions)\n"
        "def named(prompts, completions, answer, completion_ids, trainer_state):\n    return [0.0] * len(completions)\n"
        "def raises(prompts, completions, **kw):\n    raise ValueError('boom')\n"
        "async def raises_later(prompts, completions, **kw):\n    return [1 / 0 for c in completions]\n")
    call = dict(prompts=["q", "q", "q"], completions=["a", "b", "c"], answer=["x", "y", "z"], trainer_state=None,
                completion_ids=[[1], [2], [3]])  # TRL's own arguments: not the dataset's columns
    spec = f"python:{tmp_path / 'bad.py'}"
    for name, said in (("words", "returned str ('high') for completion 1: it must return one float (or None) per "
                                 "completion, a list of 3 here"),
                       ("one", "returned 1 values for 3 completions"),
                       ("column", "raised KeyError 'solution': a row's columns reach it as keyword arguments, and this "
                                  "dataset's are: answer")):
        with pytest.raises(ConfigError, match=re.escape(f"--reward {spec}:{name} {said}")):
            rl_rewards.import_reward(f"{spec}:{name}")(**call)
    with pytest.raises(ConfigError, match=re.escape(f"--reward {spec}:later returned float")):
        asyncio.run(rl_rewards.import_reward(f"{spec}:later")(**call))
    # A reward that raises: TRL's traceback of ~50 lines, exit 1 (the rl.py audit of session 93). One line naming
    # the reward, its error and the line of its file that raised; the traceback behind --debug.
    bad = tmp_path / "bad.py"
    with pytest.raises(ConfigError, match=re.escape(f"--reward {spec}:raises raised ValueError: boom ({bad} line 38); "
                                                    "fix it, then run the same command again (--debug")):
        rl_rewards.import_reward(f"{spec}:raises")(**call)
    with pytest.raises(ConfigError, match=re.escape(f"--reward {spec}:raises_later raised ZeroDivisionError: division "
                                                    f"by zero ({bad} line 40); ")):
        asyncio.run(rl_rewards.import_reward(f"{spec}:raises_later")(**call))
    assert rl_rewards.import_reward(f"{spec}:fine")(**call) == [1, None, True]
    for name in ("numbers", "array", "lazily"):
        assert len(rl_rewards.import_reward(f"{spec}:{name}")(**call)) == 3
    # An infinity made the step's loss and gradients 0, with exit status 0 (found by an audit).
    for name, said in (("infinite", "returned inf for completion 2"), ("infinite_array", "returned -inf for "
                                                                                         "completion 1")):
        with pytest.raises(ConfigError, match=re.escape(f"--reward {spec}:{name} {said}: a reward must be finite")):
            rl_rewards.import_reward(f"{spec}:{name}")(**call)
    # A column named as a parameter (TRL's style) that the rows lack, or no **kwargs: TRL's TypeError at the first
    # step, after the policy had loaded and generated. Refused with the prompts, before the policy loads.
    import datasets

    prompts = datasets.Dataset.from_dict({"prompt": ["q"], "answer": ["x"]})
    for name in ("column", "wrapped", "named"):
        rl_rewards.check_rewards_take([rl_rewards.import_reward(f"{spec}:{name}")], prompts)
    for name, said in (("needs", "takes 'solution', which no row gives: a row's columns reach it as keyword "
                                 "arguments, and this dataset's are: answer"),
                       ("closed", "takes no **kwargs, nor 'answer', which TRL passes it (every column of the row: answer")):
        with pytest.raises(ConfigError, match=re.escape(f"--reward {spec}:{name} {said}")):
            rl_rewards.check_rewards_take([rl_rewards.import_reward(f"{spec}:{name}")], prompts)


def test_a_reward_model_trained_on_texts_refuses_conversations_before_the_policy_loads(monkeypatch, tmp_path):
    """A conversation for a reward model trained on texts was refused at the first reward step, after the policy
    loaded and sampled (rl.py), and in label.py became a failed judgment for every row of its batch. Now rl.py
    and label.py refuse it while reading the prompts. A Hub reward model's record is read from
    its metrics.json too (it counted as conversational)."""
    from alignkit.core.errors import UserError
    from alignkit.feedback import rewards
    from alignkit.feedback.judge import RMJudge
    from alignkit.train.rl_rewards import RewardModelReward, check_rewards_take

    model = rewards.RewardModel.__new__(rewards.RewardModel)
    model.folder, model.text = "runs/text-rm", True
    reward = RewardModelReward.__new__(RewardModelReward)
    reward.model = model
    one = [{"role": "user", "content": "q"}]
    check_rewards_take([reward], {"prompt": [one, one]})
    chat = [{"role": "system", "content": "be brief"}, *one]
    with pytest.raises(UserError, match=r"rm:runs/text-rm was trained on text rows .* has 2 turns"):
        check_rewards_take([reward], {"prompt": [one, chat]})
    model.text = False
    check_rewards_take([reward], {"prompt": [chat]})
    assert RMJudge.fatal(None, UserError("a prompt it cannot score"))
    record = tmp_path / "metrics.json"
    record.write_text(json.dumps({"reward_rows": "text"}))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(record) if (
        repo, name) == ("owner/text-rm", "metrics.json") else pytest.fail(f"{repo} {name}"))
    assert rewards.trained_on_text("owner/text-rm")
    # label.py stopped only at the first judged batch, after every answer was generated: now when the prompts are
    # read, naming the row.
    from alignkit.feedback.label_records import Prompt

    judge = RMJudge.__new__(RMJudge)
    judge.folder = str(tmp_path)  # its metrics.json: trained on texts
    judge.check_prompts([Prompt(one, place="p.jsonl: row 1")])
    with pytest.raises(UserError, match=r"^p.jsonl: row 2: rm:.* was trained on text rows .* has 2 turns"):
        judge.check_prompts([Prompt(one, place="p.jsonl: row 1"), Prompt(chat, place="p.jsonl: row 2")])


def test_prompts_with_tool_calls_keep_them_and_need_a_template_that_renders_them(tiny_cache, tmp_path):
    """rl.py's prompts kept role and content only: a context with a tool call was refused (content null) or lost
    the call, and Arrow gave every other message a `tool_calls: None`. Kept as JSON now; a chat template that
    does not render calls is refused (the policy would sample without seeing the call)."""
    from transformers import AutoTokenizer

    from alignkit.core.config import RLSettings
    from alignkit.core.errors import UserError
    from alignkit.modeling import presets
    from alignkit.train import rl

    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    context = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "name": "weather", "content": "sunny"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": context}) + "\n" + json.dumps({"prompt": "name three fruits."}) + "\n")
    rows = rl.load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=str(path)))
    assert rows["prompt"] == [context, [{"role": "user", "content": "name three fruits."}]]
    tok = AutoTokenizer.from_pretrained(presets.paths()["model"])  # the tiny template renders content only
    with pytest.raises(UserError, match="chat template does not render tool calls, and this data has them"):
        rl.as_trl_prompts(rows, tok, "tiny")


def test_reward_models_are_logged_under_their_folder_s_name(monkeypatch, tmp_path):
    """rm:FOLDER logged as rewards/rm:/the/whole/path/mean: its slashes split a dashboard's sections. TRL names a
    reward model by the last part of its path; two alike (runs/a/merged, runs/b/merged) are told apart."""
    from alignkit.core.config import RLSettings
    from alignkit.feedback import rewards
    from alignkit.train.rl_rewards import build_rewards

    monkeypatch.setattr(rewards, "load", lambda spec, settings=None: spec)
    specs = ["rule", "rm:runs/a/merged/", "rm:/abs/runs/b/merged", "rm:owner/rm-7b", "rm:c/merged_2"]
    funcs = build_rewards(RLSettings(reward=specs), tmp_path)
    assert [f.__name__ for f in funcs] == ["rule_reward", "rm:merged", "rm:merged_2", "rm:rm-7b", "rm:merged_2_2"]
    assert [f.model for f in funcs[1:]] == specs[1:]  # each loads the folder it names


def test_a_reward_listed_twice_is_refused_before_the_model_loads():
    """--reward rule,rule gave two functions of one name: TRL logs one rewards/<name> column for both, and the
    weights said nothing a single weight could not. Refused with the way to weigh one reward."""
    from alignkit.core.config import RLSettings

    with pytest.raises(ValueError, match=r"^--reward lists rule twice: give each reward once and weigh it with "
                                         r"--reward_weights$"):
        RLSettings(reward=["rule", "rm:runs/rm", "rule"])
    RLSettings(reward=["rule", "rm:runs/a/merged", "rm:runs/b/merged"])  # two folders alike in name: logged apart


def test_the_text_prompt_mark_goes_to_python_rewards_not_among_the_columns_trl_prints(tmp_path):
    """TRL hands every reward the row's columns and prints them in its "All reward functions returned None"
    warning: alignkit's mark of a prompt written as text was among them. The trainer takes it out of the rows for
    the reward call (a row twice in the batch as one object too), hands it to the python rewards, and puts it back."""
    import torch

    from alignkit.train import rl, rl_rewards

    (tmp_path / "short.py").write_text(
        "def short(prompts, completions, **kwargs):\n"
        "    assert 'alignkit_prompt_was_text' not in kwargs and all(isinstance(p, str) for p in prompts + completions)\n"
        "    return [1.0] * len(prompts)\n")
    class Base:
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            self.columns = [sorted(row) for row in inputs]  # what TRL would hand the rewards as keyword arguments
            kwargs = {k: [row[k] for row in inputs] for k in inputs[0] if k not in ("prompt", "completion")}
            return torch.tensor([self.reward_funcs[0](prompts=prompts, completions=completions, **kwargs)]).T

    trainer = type("T", (rl._OnlineMixin, Base), {})()
    reward = rl_rewards.import_reward(f"python:{tmp_path / 'short.py'}:short")
    trainer.reward_funcs, trainer._times, trainer._unscored = [reward], rl.Counter(), rl.Counter()
    row = {"prompt": [{"role": "user", "content": "hi"}], "category": "x", rl_rewards.TEXT_PROMPT: True}
    said = [[{"role": "assistant", "content": "yo"}]] * 2
    rewards = trainer._calculate_rewards([row, row], [row["prompt"]] * 2, said, None)
    assert rewards.tolist() == [[1.0], [1.0]]
    assert trainer.columns == [["category", "prompt"]] * 2 and row[rl_rewards.TEXT_PROMPT] is True  # put back


def test_skip_invalid_skips_a_bad_prompt_row_and_says_how_many(tmp_path, alignkit_log):
    """--skip_invalid was in rl.py's --help ("skip rows that fail validation (and report how many)") but its prompt
    reading ignored it: a bad row stopped the run. Skipped and counted now, as sft.py's and dpo.py's loaders do."""
    from alignkit.core.config import RLSettings
    from alignkit.core.data_files import DataError
    from alignkit.train import rl

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("1+1?", "", "2+2?", "3+3?")))
    batch = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=2)
    with pytest.raises(DataError, match=r"prompts.jsonl: row 2: field 'prompt': expected non-empty text"):
        rl.load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=str(data), **batch))
    rows = rl.load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=str(data), skip_invalid=True, **batch))
    assert [p[-1]["content"] for p in rows["prompt"]] == ["1+1?", "2+2?", "3+3?"]
    assert "prompts.jsonl: skipped 1 of 4 rows as invalid (--skip_invalid). First problem: " \
           f"{data}: row 2: field 'prompt': expected non-empty text" in alignkit_log.text
    data.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(DataError, match=r"no usable rows: all 1 rows are invalid. First problem: .*row 1"):
        rl.load_prompt_dataset(RLSettings(reward=["rule"], dataset_id=str(data), skip_invalid=True, **batch))


def test_what_would_train_nothing_or_fail_after_the_load_is_refused_first(tiny_cache, tmp_path):
    """Fewer prompts than one step samples trained 0 steps and saved an untrained adapter (exit status 0); a batch
    that is no multiple of --num_generations, and temperature 0, failed after the model loaded, naming TRL's
    generation_batch_size or transformers' check."""
    from alignkit.core.args import ConfigError, parse_config
    from alignkit.core.config import RLSettings
    from alignkit.modeling import presets
    from alignkit.train.rl import load_prompt_dataset

    def settings(*args):
        return parse_config(RLSettings, env_file=None, presets={"tiny": presets.defaults("rl")},
                            args=["--preset", "tiny", "--output_dir", str(tmp_path), *args])

    with pytest.raises(ConfigError, match=r"prompts.jsonl: 2 prompts, but each generation samples 4 distinct ones "
                                          r"\(TRL's generation_batch_size 32 = per_device_train_batch_size 32 x 1 "
                                          r"process x gradient_accumulation_steps 1, / --num_generations 8\): give more "
                                          r"prompts"):
        load_prompt_dataset(settings("--max_prompts", "2"))
    assert len(load_prompt_dataset(settings("--max_prompts", "4"))) == 4
    with pytest.raises(ConfigError, match=r"TRL's generation_batch_size \(3 = per_device_train_batch_size 3 x 1 "
                                          r"process x gradient_accumulation_steps 1\) must be a multiple of "
                                          r"num_generations \(4\)"):
        settings("--per_device_train_batch_size", "3", "--num_generations", "4")
    # TRL's own ways to a larger generation (found by an audit): --steps_per_generation 20 made one generation of 80
    # prompts from 64, and trained 0 steps with exit status 0 and an untrained adapter; a batch of 4 with 2 steps per
    # generation is a group of 8, which TRL takes (it was refused); --generation_batch_size 12 over a batch of 8 was
    # refused by TRL after the model loaded.
    with pytest.raises(ConfigError, match=r"prompts.jsonl: 64 prompts, but each generation samples 80 distinct ones "
                                          r"\(TRL's generation_batch_size 640 = per_device_train_batch_size 32 x 1 "
                                          r"process x steps_per_generation 20, / --num_generations 8\)"):
        load_prompt_dataset(settings("--steps_per_generation", "20"))
    grouped = settings("--per_device_train_batch_size", "4", "--num_generations", "8", "--steps_per_generation", "2")
    assert grouped.generation_batch()[0] == 8
    assert settings("--generation_batch_size", "64").generation_batch() == (64, "--generation_batch_size")
    with pytest.raises(ConfigError, match=r"^generation_batch_size \(12\) must be a multiple of "
                                          r"per_device_train_batch_size x processes \(8\)"):
        settings("--per_device_train_batch_size", "8", "--generation_batch_size", "12")
    with pytest.raises(ConfigError, match=r"^generation_batch_size and steps_per_generation cannot both be set"):
        settings("--generation_batch_size", "64", "--steps_per_generation", "2")
    # TRL takes any text as scale_rewards and raises "Invalid value" at its first step, after the load and a generation.
    with pytest.raises(ConfigError, match=r"^scale_rewards must be group, batch or none \(true is group, false is "
                                          r"none\), got 'maybe'"):
        settings("--scale_rewards", "maybe")
    assert settings("--scale_rewards", "false").trainer_overrides["scale_rewards"] == "none"
    with pytest.raises(ConfigError, match=r"temperature must be > 0"):
        settings("--temperature", "0")
    with pytest.raises(ConfigError, match=r"^generation_kwargs temperature 0 decodes greedily"):
        settings("--generation_kwargs", '{"temperature": 0, "top_k": 5}')
    assert settings("--generation_kwargs", '{"top_k": 5}').trainer_overrides["generation_kwargs"] == {"top_k": 5}
    # An upper clip below the lower one is a narrower trust region, which TRL's clipped loss computes as asked.
    assert settings("--epsilon", "0.2", "--epsilon_high", "0.1").trainer_overrides["epsilon_high"] == 0.1
    with pytest.raises(ConfigError, match=r"^epsilon must be >= 0, got -0.2"):
        settings("--epsilon", "-0.2")


def test_a_run_given_back_before_its_first_checkpoint_keeps_the_judgments_it_paid_for(tmp_path, alignkit_log):
    """rl.py --reward judge caches its judgments in the run folder; a run stopped before its first checkpoint (Ctrl-C,
    a crash) had its folder removed, and every request made until then, paid for at an API, with it (found by an
    rl.py audit: 320 judgments lost). They stay in the folder's judge.cache, beside the files of a run put back there,
    and the next run's judge reads them all; so after a kill, where the next command puts the earlier run back."""
    from alignkit.train import run_folder
    from alignkit.train.rl_rewards import JudgeReward

    def judged(folder, *names):
        (folder / "judge.cache").mkdir(parents=True)
        for name in names:
            (folder / "judge.cache" / name).write_text(json.dumps({"key": f"{folder.name}/{name}"}) + "\n")

    def lines(folder):
        cache = JudgeReward._open_cache(folder / "judge.cache")
        try:
            return sorted(json.loads(line)["key"] for path in sorted((folder / "judge.cache").glob("judgments*.jsonl"))
                          for line in path.read_text().splitlines())
        finally:
            cache.close()

    run, earlier = tmp_path / "rl", tmp_path / "rl.previous-1"
    judged(run, "judgments.jsonl", "judgments.rank1.jsonl")
    judged(earlier, "judgments.jsonl")
    (earlier / "adapter_model.safetensors").write_text("the earlier run")
    run_folder._release(run, earlier, KeyboardInterrupt())
    assert (run / "adapter_model.safetensors").read_text() == "the earlier run" and not earlier.exists()
    assert lines(run) == ["rl.previous-1/judgments.jsonl", "rl/judgments.jsonl", "rl/judgments.rank1.jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside the folder
    assert (f"the run was interrupted before its first checkpoint, with nothing of it to keep: removed it (its paid "
            f"judgments kept in {run / 'judge.cache'}, for the next run); the earlier run is back in {run}") \
        in alignkit_log.text

    alone = tmp_path / "alone"
    judged(alone, "judgments.jsonl")
    (alone / "alignkit_config.json").write_text("{}")
    run_folder._release(alone, None, RuntimeError("out of memory"))
    assert sorted(p.name for p in alone.iterdir()) == ["judge.cache"] and lines(alone) == ["alone/judgments.jsonl"]

    # A judge whose every request failed wrote empty judgments files: nothing paid for, nothing said kept.
    unpaid = tmp_path / "unpaid"
    (unpaid / "judge.cache").mkdir(parents=True)
    (unpaid / "judge.cache" / "judgments.jsonl").write_text("")
    alignkit_log.clear()
    run_folder._release(unpaid, None, RuntimeError("the judge is down"))
    assert not unpaid.exists() and "paid judgments kept" not in alignkit_log.text

    killed, kept = tmp_path / "killed", tmp_path / "killed.previous-1"  # SIGKILL: no except ran; the next command
    judged(killed, "judgments.jsonl")
    (kept / "metrics.json").parent.mkdir()
    (kept / "metrics.json").write_text("{}")
    (killed / "alignkit_claim.json").write_text(json.dumps({"earlier_run": str(kept)}))
    run_folder._restore_stranded(killed)
    assert (killed / "metrics.json").is_file() and lines(killed) == ["killed/judgments.jsonl"]


def test_a_run_that_moves_an_earlier_one_aside_starts_with_the_judgments_it_paid_for(tmp_path, alignkit_log):
    """Found by the rl.py audit of session 28: the judgments a stopped run kept went into the folder of the run put
    back, and the next command (its settings differ from that run's, or it would have resumed it) moved that run
    aside again, judge.cache and all: the same command paid for the same 595 judgments twice, and any rerun with
    changed settings judged from nothing. A run that moves an earlier one aside starts with its judgments; given
    back, it keeps only its own new ones, carried once."""
    from alignkit.core.config import RLSettings
    from alignkit.train import run_folder
    from alignkit.train.rl_rewards import JudgeReward

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    run = tmp_path / "runs" / "rl"
    (run / "judge.cache").mkdir(parents=True)
    (run / "judge.cache" / "judgments.jsonl").write_text('{"key": "earlier"}\n')
    (run / "metrics.json").write_text("{}")  # a finished run, with other settings
    s = RLSettings(model_id=str(base), output_dir=str(run.parent), run_name="rl", reward=["judge"], max_steps=7)

    def keys(folder):
        cache = JudgeReward._open_cache(folder / "judge.cache")  # the judge reads every judgments*.jsonl there
        try:
            return sorted(json.loads(line)["key"] for path in (folder / "judge.cache").glob("judgments*.jsonl")
                          for line in path.read_text().splitlines())
        finally:
            cache.close()

    aside = run_folder._claim(s, run, None)
    assert aside is not None and keys(run) == ["earlier"] and keys(Path(aside)) == ["earlier"]
    with (run / "judge.cache" / "judgments.jsonl").open("a") as new:  # what this run's judge pays for
        new.write('{"key": "new"}\n')
    run_folder._release(run, Path(aside), KeyboardInterrupt())  # Ctrl-C before the first checkpoint
    assert (run / "metrics.json").is_file() and keys(run) == ["earlier", "new"]  # each once
    again = run_folder._claim(s, run, None)  # the same command again: the run put back goes aside again
    assert keys(run) == ["earlier", "new"] and keys(Path(again)) == ["earlier", "new"]


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_a_judge_reward_without_its_api_key_names_rl_s_own_flag(mode, tmp_path, monkeypatch):
    """The pairwise judge's missing key said `--judge openai: OPENAI_API_KEY is not set` (label.py's flag: rl.py
    has no --judge; the rl.py audit of session 28); the pointwise one said `--reward judge:`. Both do now."""
    from alignkit.core.config import RLSettings
    from alignkit.train.rl_rewards import JudgeReward

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    s = RLSettings(reward=["judge"], judge_mode=mode, reference_completions=str(refs) if mode == "pairwise" else None)
    with pytest.raises(ConfigError, match=r"^--reward judge: OPENAI_API_KEY is not set"):
        JudgeReward(s, tmp_path / "cache")


def test_a_causal_lm_as_rm_names_rl_s_own_judge_flags(sft_run, tiny_cache, tmp_path):
    """--reward rm:CAUSAL_LM advised "use --judge hf --judge_model M" (label.py's flags: rl.py has no --judge; the
    reward/rl audit of session 51). rl.py's advice is its own judge, served; label.py's stays its own."""
    from alignkit.core.config import RLSettings
    from alignkit.modeling import presets
    from alignkit.train.rl_rewards import build_rewards

    for causal in (presets.paths()["model"], str(sft_run["run_folder"])):  # a model, an adapter
        with pytest.raises(ConfigError, match=r"is a causal language model .*; to reward with this model's text "
                                              r"verdicts serve it at an OpenAI-compatible endpoint and use --reward "
                                              r"judge --judge_base_url URL --judge_model NAME; to get a reward model") \
                as e:
            build_rewards(RLSettings(reward=[f"rm:{causal}"]), tmp_path)
        assert "--judge hf" not in str(e.value)
