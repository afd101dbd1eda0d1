"""reward.py and reward models as judges: the losses' formulas, the tiny reward model's held-out accuracy,
label.py with an rm: judge, the merge round trip, margins, and the errors for a model of the wrong kind."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignkit.modeling import presets
from alignkit.train.reward import margins, reward_loss

from conftest import run_script

CHOSEN = torch.tensor([1.5, -0.2, 0.3, 2.0])
REJECTED = torch.tensor([0.5, 0.4, -1.0, 2.5])
MARGIN = torch.tensor([0.5, 1.0, 0.0, 2.0])


def _mean(values):
    return sum(values) / len(values)


def _by_hand(loss, margin=None, lm=0.0, coef=0.0):
    """The formulas of alignkit.train.reward's docstring, in plain floats."""
    m = margin.tolist() if margin is not None else [0.0] * len(CHOSEN)
    pairs = list(zip(CHOSEN.tolist(), REJECTED.tolist(), m))
    if loss == "bradley_terry":
        return _mean([-math.log(1 / (1 + math.exp(-(c - r - mm)))) for c, r, mm in pairs])
    value = _mean([math.log(1 + math.exp(mm + r - c)) for c, r, mm in pairs])
    return value + coef * lm if loss == "logexpwithlm" else value


@pytest.mark.parametrize("loss", ["bradley_terry", "logexp", "logexpwithlm"])
@pytest.mark.parametrize("margin", [None, MARGIN], ids=["no-margin", "margin"])
def test_losses_match_their_formulas(loss, margin):
    lm = torch.tensor(2.7)
    got = reward_loss(CHOSEN, REJECTED, loss, margin, lm_loss=lm, lm_loss_coef=0.1)
    expected = _by_hand(loss, margin, lm=2.7, coef=0.1)
    assert abs(got.item() - expected) < 1e-6


def test_logexpwithlm_with_coefficient_zero_is_logexp_and_the_lm_term_counts():
    lm = torch.tensor(3.0)
    for margin in (None, MARGIN):
        plain = reward_loss(CHOSEN, REJECTED, "logexp", margin)
        assert abs(reward_loss(CHOSEN, REJECTED, "logexpwithlm", margin, lm, 0.0).item() - plain.item()) < 1e-6
        with_lm = reward_loss(CHOSEN, REJECTED, "logexpwithlm", margin, lm, 1e-6).item()
        assert abs(with_lm - (plain.item() + 3e-6)) < 1e-7


def test_center_rewards_coefficient_adds_the_squared_sum():
    base = reward_loss(CHOSEN, REJECTED, "bradley_terry").item()
    centred = reward_loss(CHOSEN, REJECTED, "bradley_terry", center_rewards_coefficient=0.01).item()
    assert abs(centred - base - 0.01 * _mean([(c + r) ** 2 for c, r in zip(CHOSEN.tolist(), REJECTED.tolist())])) < 1e-6


def test_bradley_terry_is_trls_own_loss():
    """TRL's RewardTrainer.compute_loss on the same rewards (and margins) gives the same value."""
    from trl import RewardTrainer

    for margin in (None, MARGIN):
        stub = SimpleNamespace(
            model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=0.01),
            accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
            _metrics={"train": {}, "eval": __import__("collections").defaultdict(list)}, _total_train_tokens=0,
            _tp_size=1,
        )
        logits = torch.cat([CHOSEN, REJECTED]).unsqueeze(-1)
        inputs = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3)}
        if margin is not None:
            inputs["margin"] = margin
        trl_loss = RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), inputs)
        ours = reward_loss(CHOSEN, REJECTED, "bradley_terry", margin, center_rewards_coefficient=0.01)
        assert abs(trl_loss.item() - ours.item()) < 1e-6


def test_margins_from_a_margin_column_or_score_difference(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 5.5},
            {"prompt": "q", "chosen": "c", "rejected": "d", "score_chosen": 3, "score_rejected": 1}]
    assert margins(rows) == [2.5, 2.0]
    assert margins([{**row, "margin": 0.25} for row in rows]) == [0.25, 0.25]
    with pytest.raises(ValueError, match="needs a 'margin' column"):
        margins([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({**row, "margin": m}) for row, m in zip(rows, [1.0, None])) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2: field 'margin'"):
        margins(str(bad))


def _split_folder(tmp_path, margins=True):
    """A dataset folder with train.jsonl (30 pairs) and test.jsonl (10 pairs), each row's margin its own number."""
    rows = [json.loads(line) for line in open(presets.paths()["preferences"])][:40]
    folder = tmp_path / "ds"
    folder.mkdir()
    for name, part, base in (("train", rows[:30], 0), ("test", rows[30:], 100)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for i, row in enumerate(part):
                f.write(json.dumps({**row, **({"margin": float(base + i)} if margins else {})}) + "\n")
    return folder, rows


def test_reward_takes_dataset_test_split_and_a_trl_line_evaluates_on_the_test_split(tiny_cache, tmp_path,
                                                                                     alignkit_log):
    """reward.py refused --dataset_test_split (even TRL's default `test`), and a TRL line that evaluates held 5% of
    train out and never read test, while dpo.py/sft.py take the test split (the audit of session 101). Each split's
    pairs carry their own rows' margins."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import RewardSettings
    from alignkit.core.mixture import HELD_OUT, load_train_eval
    from alignkit.train.reward import pairs_loader

    folder, rows = _split_folder(tmp_path)
    line = ["--model_name_or_path", "org/model", "--use_peft", "--eval_strategy", "steps", "--eval_steps", "1",
            "--dataset_name", str(folder)]
    for args, expected in ((line, "auto"), (["--dataset_id", str(folder), "--dataset_test_split", "test"], "test")):
        s = parse_config(RewardSettings, env_file=None, args=args)
        assert s.dataset_test_split == expected
        train, held_out = load_train_eval("preference", s, load=pairs_loader(s))
        assert (len(train), len(held_out)) == (30, 10)  # every train pair trains; test's are held out
        assert getattr(held_out, HELD_OUT) == {"split": "test"}
        # each pair with its own row's margin, in both splits, whatever the shuffle
        assert sorted(train["margin"]) == [float(i) for i in range(30)]
        def key(prompt, chosen, rejected):
            return tuple(m["content"] for m in prompt + chosen + rejected)

        by_pair = {key(r["prompt"], r["chosen"], r["rejected"]): 100.0 + i for i, r in enumerate(rows[30:])}
        assert len(by_pair) == 10
        assert [by_pair[key(*pair)] for pair in zip(held_out["prompt"], held_out["chosen"], held_out["rejected"])] \
            == held_out["margin"]
    assert any("the dataset's test split, as TRL's scripts evaluate" in r.getMessage() for r in alignkit_log.records)


def test_skip_invalid_skips_a_pair_whose_margin_is_no_number(tiny_cache, tmp_path, alignkit_log):
    """--skip_invalid skipped every bad row but one whose margin was null, which stopped the run (the reward.py
    audit of session 101): the pair goes with its margin, the others keep theirs."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import RewardSettings
    from alignkit.core.mixture import load_train_eval
    from alignkit.train.reward import pairs_loader

    rows = [json.loads(line) for line in open(presets.paths()["preferences"])][:20]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**row, "margin": None if i == 5 else float(i)}) + "\n"
                            for i, row in enumerate(rows)))
    s = parse_config(RewardSettings, env_file=None, args=["--dataset_id", str(path), "--skip_invalid",
                                                          "--eval_split", "0"])
    train, _ = load_train_eval("preference", s, load=pairs_loader(s))
    assert sorted(train["margin"]) == [float(i) for i in range(20) if i != 5]

    def key(pair):
        return tuple(m["content"] for m in pair["prompt"] + pair["chosen"] + pair["rejected"])

    margin_of = {key(row): float(i) for i, row in enumerate(rows)}
    assert len(margin_of) == 20 and all(pair["margin"] == margin_of[key(pair)] for pair in train)  # its own row's
    assert "skipped 1 of 20 rows as invalid (--skip_invalid). First problem: " in alignkit_log.text
    assert "row 6: field 'margin'" in alignkit_log.text


def test_use_margin_true_says_where_the_margins_come_from(tiny_cache, tmp_path, alignkit_log):
    """--use_margin true said nothing of where its margins came from, while auto named the column (the reward.py
    audit of session 101)."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import RewardSettings
    from alignkit.core.mixture import load_train_eval
    from alignkit.train.reward import pairs_loader

    rows = [json.loads(line) for line in open(presets.paths()["preferences"])][:20]
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({**row, "score_chosen": 3, "score_rejected": 1}) + "\n" for row in rows))
    s = parse_config(RewardSettings, env_file=None, args=["--dataset_id", str(scored), "--use_margin", "true",
                                                          "--eval_split", "0"])
    train, _ = load_train_eval("preference", s, load=pairs_loader(s))
    assert train["margin"] == [2.0] * 20
    assert f"{scored}: each pair's margin, score_chosen − score_rejected, its scores' difference, is subtracted " \
           "from its reward difference, as TRL's RewardTrainer does (--use_margin true" in alignkit_log.text


# ---------------------------------------------------------------------------------------------------------
# The tiny reward model, trained once per session: the README's `python reward.py --preset tiny` (conftest.reward_run,
# its runs/tiny-reward in the project root tests/test_readme.py runs the README's commands in)


def test_a_reward_run_records_its_settings_so_a_rerun_resumes_and_its_card_reports_its_accuracy(reward_run,
                                                                                               monkeypatch):
    """reward.py claimed its folder without start_run: no alignkit_config.json, so no resume, an earlier run
    overwritten in place, and a card with neither the stage nor the held-out accuracy."""
    from alignkit.core.data import load_preferences
    from alignkit.train.reward import with_margins
    from alignkit.train.training import prepare_run, split

    folder = Path(reward_run["run_folder"])
    assert json.loads((folder / "alignkit_config.json").read_text())["run_type"] == "reward"
    last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # The data read again, as reward.py reads it, gives the same rows (a checkpoint resumes only over those).
    s = reward_run["settings"]
    rows = with_margins(load_preferences(s.dataset_id, s.dataset_format, s.dataset_split, s.skip_invalid,
                                         s.dataset_config), s)
    monkeypatch.chdir(reward_run["project"])  # where the command ran: its --output_dir (runs) is relative
    resumed = prepare_run(s, "reward", *split(rows, s, "preference"))
    assert (resumed[0].resolve(), Path(resumed[1]).resolve()) == (folder.resolve(), last.resolve())
    card = (folder / "README.md").read_text()
    accuracy = json.loads((folder / "metrics.json").read_text())["held_out_accuracy"]
    # The exact share of the held-out pairs, as the summary prints it (the card showed TRL's per-batch mean instead).
    assert "model-index" in card and f"value: {round(accuracy, 4)}" in card, card[:1500]
    assert accuracy == json.loads((folder / "held_out_rewards.json").read_text())["held_out_accuracy"]


def test_a_reward_card_lists_lm_loss_coef_only_for_the_loss_that_reads_it(tmp_path, monkeypatch):
    """The card's training settings listed --lm_loss_coef (its default 1e-6) for a bradley_terry or logexp run, where
    it does nothing: only logexpwithlm's LM term reads it."""
    from alignkit.core.card import model_card

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for loss in ("bradley_terry", "logexp", "logexpwithlm"):
        (tmp_path / loss).mkdir()
        (tmp_path / loss / "alignkit_config.json").write_text(json.dumps(
            {"model_id": "org/base", "run_type": "reward", "loss": loss, "lm_loss_coef": 1e-6}))
        settings = model_card(tmp_path / loss).split("## Training settings")[1]
        assert ("| lm_loss_coef | `1e-06` |" in settings) == (loss == "logexpwithlm"), (loss, settings)
        assert f"| loss | `\"{loss}\"` |" in settings


def test_eval_accuracy_is_the_share_of_held_out_pairs_whatever_the_batches():
    """TRL's log averages each metric's entries, and one entry per batch made eval_accuracy a mean of batch means: 73
    held-out pairs in batches of 8 said 0.5375 beside the summary's exact 36 of 73, 0.493 (the reward audit of
    session 32). One entry per pair: the logged accuracy, margin and rewards are the pairs' own means."""
    from collections import defaultdict

    from alignkit.train.reward import AlignRewardTrainer

    scores = {8: [1.0] * 3 + [0.0] * 5 + [0.5] * 3 + [2.0] * 5, 1: [1.0, 0.0]}  # 3 of 8 right, then 1 of 1
    model = SimpleNamespace(training=False)
    trainer = SimpleNamespace(model=model, loss="bradley_terry", lm_loss_coef=0.0, uses_lm_term=False, _balance=None,
                              args=SimpleNamespace(center_rewards_coefficient=None), _total_train_tokens=0,
                              accelerator=SimpleNamespace(gather_for_metrics=lambda t: t),
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    for n, logits in scores.items():
        call = lambda **_: SimpleNamespace(logits=torch.tensor(logits).unsqueeze(-1))
        inputs = {"input_ids": torch.ones(2 * n, 3, dtype=torch.long), "attention_mask": torch.ones(2 * n, 3)}
        AlignRewardTrainer.compute_loss(trainer, call, inputs)
    logged = {k: sum(v) / len(v) for k, v in trainer._metrics["eval"].items()}  # as TRL's log averages them
    assert logged["accuracy"] == pytest.approx(4 / 9)  # not (3/8 + 1) / 2
    assert logged["margin"] == pytest.approx((3 * 0.5 - 5 * 2.0 + 1) / 9)
    assert logged["rewards/chosen"] == pytest.approx((3 + 1) / 9)
    assert logged["mean_reward"] == pytest.approx((3 + 3 * 0.5 + 5 * 2.0 + 1) / 18)


def test_tiny_reward_model_ranks_held_out_pairs(reward_run):
    metrics = json.loads((reward_run["run_folder"] / "metrics.json").read_text())
    # 10% of the 1200 pairs, rounded up to whole prompts (the tiny preset has several pairs for a prompt)
    assert 120 <= metrics["held_out_pairs"] < 200
    # Prompts it never trained on (README: 0.83-0.91 by seed and machine; the CPU's arithmetic moves it)
    assert metrics["held_out_accuracy"] >= 0.8, metrics
    assert metrics["chosen_mean"] > metrics["rejected_mean"]
    assert metrics["margin_std"] > 0 and metrics["chosen_std"] > 0 and metrics["rejected_std"] > 0
    assert (reward_run["project"] / metrics["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The score head is saved with the adapter, so the run folder alone scores answers.
    adapter = json.loads((reward_run["run_folder"] / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]


def test_the_held_out_report_scores_the_pairs_trl_kept_and_says_how_many_it_left_out(reward_run, tmp_path):
    """Under --max_length TRL's RewardTrainer drops a pair whose prompt + an answer is longer (its eval_accuracy is
    over the rest), but the held-out report scored every pair, those cut to max_length: `--max_length 15` said
    held-out accuracy 0.428 on 159 pairs beside eval_accuracy's 0.405 on 116. It scores the pairs TRL keeps, and
    its line (and the summary's) says how many it left out and why."""
    from trl import RewardTrainer

    from alignkit.core.args import ConfigError
    from alignkit.train.report import summary
    from alignkit.train import reward
    from alignkit.train.reward import held_out_report

    trainer, tokenizer, pairs = reward_run["trainer"], reward_run["loaded"].tokenizer, reward_run["eval_data"]
    tokenized = trainer.eval_dataset  # every held-out pair as TRL tokenized it: none dropped at the run's length
    assert len(tokenized) == len(pairs)
    longest = [max(len(c), len(r)) for c, r in zip(tokenized["chosen_ids"], tokenized["rejected_ids"])]
    limit = sorted(longest)[len(longest) // 2]
    kept = [n for n, length in enumerate(longest) if length <= limit]
    assert 0 < len(kept) < len(pairs)
    # What TRL's own filter keeps at that length.
    args = SimpleNamespace(max_length=limit, dataset_num_proc=None)
    assert len(RewardTrainer._prepare_dataset(trainer, pairs, tokenizer, args, "eval")) == len(kept)

    report = held_out_report(trainer.model, tokenizer, pairs, tmp_path, max_length=limit)
    left = len(pairs) - len(kept)
    assert (report["held_out_pairs"], report.get("held_out_left_out")) == (len(kept), left)
    written = json.loads((tmp_path / "held_out_rewards.json").read_text())
    assert written["left_out"] == [n for n in range(len(pairs)) if n not in kept]
    whole = json.loads((reward_run["run_folder"] / "held_out_rewards.json").read_text())  # every pair, uncut
    assert written["chosen"] == pytest.approx([whole["chosen"][n] for n in kept], abs=1e-4)
    assert written["rejected"] == pytest.approx([whole["rejected"][n] for n in kept], abs=1e-4)
    said = f"{len(kept)} pairs; {left} of {len(pairs)} left out: prompt + an answer is longer than --max_length {limit}"
    assert reward.held_out_pairs(report, limit) == f"{said}, and TRL's RewardTrainer dropped them"
    block = summary("reward", tmp_path, {**report, "trained_max_length": limit}, [], None)
    assert f"held-out accuracy  {report['held_out_accuracy']:.3f} ({len(kept)} of {len(pairs)} pairs: {left} longer " \
           f"than --max_length {limit}, dropped by TRL, left out)" in block, block
    assert reward.held_out_pairs(held_out_report(trainer.model, tokenizer, pairs, tmp_path, write=False), None) == \
        f"{len(pairs)} pairs"  # without a length: every pair, and nothing said
    with pytest.raises(ConfigError, match=r"^--max_length 1: prompt \+ an answer is longer than that in every one of"):
        held_out_report(trainer.model, tokenizer, pairs, tmp_path, max_length=1)


def test_the_held_out_report_takes_trls_own_kept_pairs_and_tokens(reward_run, monkeypatch):
    """The report derived TRL's max_length filter again by tokenizing every held-out pair, then tokenized the kept ones
    a second time to score them: it takes the pairs (and tokens) TRL's RewardTrainer kept, the trainer's held-out
    data, and tokenizes nothing itself. Only for the pairs that trainer held out: other pairs (here the same ones
    reversed) are TRL's preparation of them, each row's tokens its own pair's, and that preparation, whose barriers a
    DDP launch's other ranks never reach, is refused under several processes."""
    import accelerate
    from trl import RewardTrainer

    from alignkit.core.args import ConfigError
    from alignkit.feedback import rewards
    from alignkit.train.reward import ROW, held_out_report, kept_by_trl

    def tokenized_again(*a, **k):
        raise AssertionError("the held-out pairs were tokenized again")

    trainer, folder, pairs = reward_run["trainer"], reward_run["run_folder"], reward_run["eval_data"]
    tokenizer, length = reward_run["loaded"].tokenizer, reward_run["settings"].max_length
    monkeypatch.chdir(reward_run["project"])  # where the command ran: the trainer's output_dir (runs/...) is relative
    monkeypatch.setattr(rewards, "token_ids", tokenized_again)
    with monkeypatch.context() as m:
        m.setattr(RewardTrainer, "_prepare_dataset", tokenized_again)
        assert kept_by_trl(pairs, tokenizer, length, trainer) is trainer.eval_dataset
        report = held_out_report(trainer.model, tokenizer, pairs, folder, max_length=length, write=False,
                                 trainer=trainer)
    written = json.loads((folder / "held_out_rewards.json").read_text())
    assert (report["held_out_pairs"], report["held_out_left_out"]) == (len(pairs), 0)
    assert report["held_out_accuracy"] == pytest.approx(written["held_out_accuracy"])

    reversed_pairs = pairs.select(list(reversed(range(len(pairs)))))
    kept = kept_by_trl(reversed_pairs, tokenizer, length, trainer)  # not the trainer's: its row n is pair -1 - n
    assert kept is not trainer.eval_dataset and list(kept[ROW]) == list(range(len(pairs)))
    last = len(pairs) - 1
    assert [kept["chosen_ids"][n] for n in range(len(pairs))] == \
        [trainer.eval_dataset["chosen_ids"][last - n] for n in range(len(pairs))]
    monkeypatch.setattr(accelerate, "PartialState", lambda: type("State", (), {"num_processes": 2})())
    with pytest.raises(ConfigError, match="pass trainer= the RewardTrainer given these pairs"):
        kept_by_trl(reversed_pairs, tokenizer, length, trainer)


def test_held_out_rewards_name_each_scored_pair_by_its_row_and_the_pair(reward_run, tmp_path):
    """held_out_rewards.json had each pair's chosen and rejected rewards but nothing to say which pair they were (the
    held-out split is written nowhere else): each score names its pair's row in the held-out pairs (`rows`), and
    held_out_pairs.jsonl holds each scored pair with its two rewards."""
    from alignkit.train.reward import held_out_report

    trainer, tokenizer = reward_run["trainer"], reward_run["loaded"].tokenizer
    pairs = reward_run["eval_data"]
    tokenized = trainer.eval_dataset  # every held-out pair as TRL tokenized it
    longest = [max(len(c), len(r)) for c, r in zip(tokenized["chosen_ids"], tokenized["rejected_ids"])]
    limit = sorted(longest)[len(longest) // 2]  # some pairs left out: the rows name those scored
    held_out_report(trainer.model, tokenizer, pairs, tmp_path, max_length=limit)
    written = json.loads((tmp_path / "held_out_rewards.json").read_text())
    kept = [n for n, length in enumerate(longest) if length <= limit]
    assert written["rows"] == kept
    lines = [json.loads(line) for line in (tmp_path / "held_out_pairs.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == kept
    assert [line["chosen_reward"] for line in lines] == written["chosen"]
    assert [line["rejected_reward"] for line in lines] == written["rejected"]
    assert [line["chosen"] for line in lines] == [pairs[n]["chosen"] for n in kept]
    assert [line["rejected"] for line in lines] == [pairs[n]["rejected"] for n in kept]
    assert all("margin" not in line for line in lines)  # trained without margins
    # With margins, each pair's margin goes with it (the reward.py audit of session 101: it was left out)
    margined = pairs.add_column("margin", [float(n) for n in range(len(pairs))])
    (tmp_path / "margined").mkdir()
    held_out_report(trainer.model, tokenizer, margined, tmp_path / "margined", max_length=limit)
    lines = [json.loads(line) for line in (tmp_path / "margined" / "held_out_pairs.jsonl").read_text().splitlines()]
    assert [line["margin"] for line in lines] == [float(n) for n in kept]
    whole = json.loads((reward_run["run_folder"] / "held_out_rewards.json").read_text())  # the run's: every pair
    assert whole["rows"] == list(range(len(pairs)))
    assert len((reward_run["run_folder"] / "held_out_pairs.jsonl").read_text().splitlines()) == len(pairs)
    assert written["chosen"] == pytest.approx([whole["chosen"][n] for n in written["rows"]], abs=1e-4)


def test_reward_callable_loads_the_run_folder_and_scores_as_trained(reward_run):
    """alignkit.feedback.rewards.load("rm:FOLDER") rebuilds the model from the folder alone: the held-out rewards that
    reward.py computed with the model in memory come back, and the rule-following answers win."""
    from alignkit.feedback.rewards import load

    reward = load(f"rm:{reward_run['run_folder']}")
    held_out = json.loads((reward_run["run_folder"] / "held_out_rewards.json").read_text())
    pairs = reward_run["eval_data"].select(range(8))
    chosen = reward([p for p in pairs["prompt"]], [c[0]["content"] for c in pairs["chosen"]])
    rejected = reward([p for p in pairs["prompt"]], [r[0]["content"] for r in pairs["rejected"]])
    assert max(abs(a - b) for a, b in zip(chosen, held_out["chosen"][:8])) < 1e-4
    assert max(abs(a - b) for a, b in zip(rejected, held_out["rejected"][:8])) < 1e-4
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 6
    # A prompt written as text is one user turn (it was read letter by letter as messages: a transformers traceback).
    single = [p for p in pairs["prompt"] if len(p) == 1 and p[0]["role"] == "user"]
    texts = [p[0]["content"] for p in single]
    answers = [c[0]["content"] for p, c in zip(pairs["prompt"], pairs["chosen"]) if p in single]
    assert texts and reward(texts, answers) == pytest.approx(reward(single, answers), abs=1e-6)
    with pytest.raises(ValueError, match="pass lists"):
        reward(texts[0], answers[0])


def test_a_reward_model_scores_an_answer_given_as_its_message_as_its_text(reward_run):
    """An answer as a preference row holds it ([{"role": "assistant", "content": ...}]) was scored as that dict
    inside the assistant turn: numbers, no error, accuracy 0.35 on held-out pairs. It is its text; anything else
    is refused."""
    from alignkit.feedback.rewards import load

    reward = load(f"rm:{reward_run['run_folder']}")
    prompts, answers = ["name three fruits."] * 2, ["apple, pear, plum.", "rock, sand, dust."]
    as_text = reward(prompts, answers)
    assert reward(prompts, [[{"role": "assistant", "content": a}] for a in answers]) == as_text
    with pytest.raises(ValueError, match=r"^an answer must be its text, or one assistant message; got dict"):
        reward(prompts[:1], [{"role": "assistant", "content": answers[0]}])


def test_a_reward_model_says_once_where_it_scores_answers_longer_than_it_trained_on(reward_run, alignkit_log):
    """TRL's RewardTrainer drops pairs longer than --max_length, so a reward model never saw longer sequences; a
    judge or a reward function scored them whole without a word. Its length is recorded in metrics.json (a merge and
    a push carry it) and one line says so the first time it happens; a RewardModel(max_length=N) that keeps the last
    N tokens within it says nothing."""
    from alignkit.feedback.rewards import LENGTH_KEY, RewardModel, load

    folder = reward_run["run_folder"]
    trained = json.loads((folder / "metrics.json").read_text())[LENGTH_KEY]
    assert trained == reward_run["settings"].max_length
    reward = load(f"rm:{folder}")
    assert reward.trained_length == trained
    reward(["name three fruits."], ["apple, pear, plum."])
    assert "trained on sequences of up to" not in alignkit_log.text  # within its length: nothing said
    long = " ".join(["apple"] * (trained + 8))
    reward(["name three fruits."] * 2, [long, "pear."])
    assert alignkit_log.text.count(f"rm:{folder} trained on sequences of up to {trained} tokens (--max_length); 1 of "
                                   "2 scored here are longer (up to ") == 1
    reward(["name three fruits."], [long])
    assert alignkit_log.text.count("trained on sequences of up to") == 1  # said once
    alignkit_log.clear()
    RewardModel(str(folder), max_length=trained)(["name three fruits."], [long])  # truncated to what it knows
    assert "trained on sequences of up to" not in alignkit_log.text


def test_a_full_precision_reward_model_loaded_in_4_bit_for_a_qlora_policy_says_so(reward_run, alignkit_log):
    """rl.py --quantization 4bit loads its rm: reward too in 4-bit (to fit beside the policy): a reward model trained
    in full precision then scored up to 0.6 off its training's scores without a word (found by an rl.py audit)."""
    from alignkit.core.config import RLSettings
    from alignkit.feedback.rewards import load

    folder = reward_run["run_folder"]
    load(f"rm:{folder}", settings=RLSettings(reward=["rule"], quantization="4bit"))
    assert (f"rm:{folder}: loaded in 4-bit, as --quantization 4bit asks (to fit beside the policy), though it trained "
            "in full precision") in alignkit_log.text
    alignkit_log.clear()
    load(f"rm:{folder}", settings=RLSettings(reward=["rule"]))  # auto: as it trained
    assert "loaded in 4-bit" not in alignkit_log.text


def test_the_rm_judge_labels_fresh_tiny_pairs_as_the_rule_does(reward_run):
    """label.py's `--judge rm:` judge (alignkit.feedback.judge.RMJudge, the object label.py calls) on 300 tiny
    pairs it never trained on (the preset's recipe with another seed), each in a random slot order: at least 90%
    of the labels are the rule's."""
    import random

    from alignkit.core.config import LabelSettings
    from alignkit.feedback.judge import Request, RMJudge, parse_verdict

    rng = random.Random(0)
    fresh = presets.make_data(seed=123)["preferences"][:300]
    judge = RMJudge(f"rm:{reward_run['run_folder']}", LabelSettings(quantization="none"), tie_margin=0.0)
    requests, truth = [], []
    for i, row in enumerate(fresh):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        a, b = (chosen, rejected) if rng.random() < 0.5 else (rejected, chosen)
        requests.append(Request(str(i), row["prompt"][0]["content"], a, b))
        truth.append(presets.rule_judge(row["prompt"][0]["content"], a, b))
    verdicts = [parse_verdict(text) for text in judge.judge_batch(requests)]  # as label.py reads them
    agree = sum(v == t for v, t in zip(verdicts, truth))
    assert agree / len(truth) >= 0.9, f"{agree} of {len(truth)} labels agree with the rule"


def test_a_reward_judge_that_cannot_load_stops_label_py_in_one_line(reward_run, tmp_path, monkeypatch):
    """The reward model loads at the first batch, after generation: a load failure was logged once per judgment,
    and label.py exited 0 with no labels."""
    from alignkit.core.errors import UserError
    from alignkit.feedback import rewards

    def broken(*a, **k):
        raise ValueError("Gemma2ForSequenceClassification does not support sdpa")

    monkeypatch.setattr(rewards, "RewardModel", broken)
    with pytest.raises(UserError, match=r"--judge rm:\S+: the reward model did not load: Gemma2ForSequenceClass"):
        run_script("label.py", "--preset", "tiny", "--judge", f"rm:{reward_run['run_folder']}", "--output",
                   str(tmp_path / "prefs.jsonl"), "--num_samples", "2", "--max_prompts", "3")


def test_label_with_rm_judge_scores_each_answer_once_and_keeps_the_scores(reward_run, tmp_path):
    """label.py --judge rm: on the base model's own samples (off the training distribution: most answers mix
    categories, so many pairs differ by one word): one judgment per pair, both scores in each labeled row, and
    the labels side with the rule far more often than chance on the pairs the rule decides."""
    out = tmp_path / "prefs.jsonl"
    run_script("label.py", "--preset", "tiny", "--judge", f"rm:{reward_run['run_folder']}", "--output", str(out),
               "--rm_tie_margin", "5.0")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert len(rows) >= 100
    # One pass per answer: one judgment per pair, no second order.
    assert summary["judgments"]["needed"] == summary["pairs_judged"]
    assert summary["both_orders"] is False and summary["agreement"] is None  # it said True, an order never judged
    assert summary["slot_a_wins"] is None  # no position to be biased by (it showed one)
    decided = agree = 0
    for row in rows:
        prompt = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen_score"] - row["rejected_score"] > 5.0  # the scores ride along, beyond the tie margin
        verdict = presets.rule_judge(prompt, chosen, rejected)
        decided += verdict != "tie"
        agree += verdict == "A"
    assert decided >= 50 and agree / decided >= 0.7, f"{agree} of {decided} rule-decided labels agree with the rule"


def test_merge_round_trip_keeps_the_score_head(reward_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.feedback.rewards import load, score
    from alignkit.modeling.merge import merge_adapters

    conversations = [[{"role": "user", "content": "name three fruits."}, {"role": "assistant", "content": a}]
                     for a in ("apple,pear,plum.", "apple,tiger,piano.", "red,blue,green.")]
    before = load(f"rm:{reward_run['run_folder']}")([c[:1] for c in conversations], [c[1]["content"] for c in conversations])
    merged_dir = merge_adapters(str(reward_run["run_folder"]), tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    after = score(model, AutoTokenizer.from_pretrained(merged_dir), conversations)
    assert model.config.num_labels == 1
    assert max(abs(a - b) for a, b in zip(before, after)) < 1e-4, (before, after)
    assert len(set(round(x, 3) for x in after)) == 3  # really scores: not one constant


def test_wrong_kind_of_model_is_an_error_that_says_what_to_pass(reward_run, sft_run, tiny_cache):
    from alignkit.core.config import ModelSettings
    from alignkit.feedback.rewards import load
    from alignkit.modeling.models import load_model

    causal = presets.paths()["model"]
    with pytest.raises(ValueError, match=r"is a causal language model \(no reward score head\).*reward.py run folder"):
        load(f"rm:{causal}")
    with pytest.raises(ValueError, match=r"is a reward model .*cannot generate.*Pass it as rm:\S+ \(label.py "
                                         r"--judge, rl.py --reward"):  # rl.py has no --judge (the audit of session 30)
        load_model(ModelSettings(model_id=str(reward_run["run_folder"]), quantization="none"))
    # An adapter's folder: reward.py trains on a whole model, so the way there is a merge first (it said to train
    # one on the adapter, which reward.py refuses).
    with pytest.raises(ValueError, match=r"train one: python merge.py --adapter_dir (\S+), then python reward.py "
                                         r"--model_id \1/merged"):
        load(f"rm:{sft_run['run_folder']}")
    from alignkit.modeling.generation import load_generator

    with pytest.raises(ValueError, match=r"is a reward model .*pass a causal language model"):
        load_generator(ModelSettings(model_id=str(reward_run["run_folder"]), quantization="none"), "transformers")



def test_rm_tie_margin_without_a_reward_model_judge_is_refused():
    """--rm_tie_margin with another judge was ignored without a word (the reward audit of session 30)."""
    from alignkit.core.args import ConfigError, parse_config
    from alignkit.core.config import LabelSettings

    with pytest.raises(ConfigError, match=r"--rm_tie_margin 0.5 applies to a reward-model judge \(--judge "
                                          r"rm:RUN_FOLDER\), not --judge openai: drop it"):
        parse_config(LabelSettings, env_file=None, args=["--rm_tie_margin", "0.5"])
    assert parse_config(LabelSettings, env_file=None, args=["--judge", "rm:runs/rm", "--rm_tie_margin", "0.5"]
                        ).rm_tie_margin == 0.5
    with pytest.raises(ConfigError, match=r"--rm_tie_margin 0.5 applies to --mode pairs; --mode pointwise grades"):
        parse_config(LabelSettings, env_file=None, args=["--judge", "rm:runs/rm", "--rm_tie_margin", "0.5", "--mode",
                                                          "pointwise"])  # the grader dropped it (the review)


def test_a_judge_rm_folder_that_is_no_reward_model_is_one_line_before_any_generation(tiny_cache, tmp_path):
    """label.py --judge rm:FOLDER: a folder holding no model was found after every response was generated (at the
    first judging batch); a causal LM's folder stopped with a ValueError traceback (found by an audit)."""
    from alignkit.core.config import LabelSettings
    from alignkit.core.errors import ConfigError
    from alignkit.feedback.judge import RMJudge

    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match=r"^--judge rm:\S+notes: \S+notes is not a model folder"):
        RMJudge(f"rm:{tmp_path / 'notes'}", LabelSettings(quantization="none"))
    with pytest.raises(ConfigError, match=r"is a causal language model \(no reward score head\).*; to judge with "
                                          r"this model's text verdicts use --judge hf --judge_model \S+model; "):
        RMJudge(f"rm:{presets.paths()['model']}", LabelSettings(quantization="none"))


def test_logexpwithlm_adds_the_chosen_sequences_lm_loss(tiny_cache, tmp_path):
    """The trainer's logexpwithlm loss = mean softplus(r_r - r_c) + coef x the base LM's own loss on chosen."""
    from transformers import AutoModelForCausalLM
    from trl import RewardConfig

    from alignkit.core.config import RewardSettings
    from alignkit.core.data import load_preferences
    from alignkit.modeling.models import add_trainable_adapter, load_model
    from alignkit.modeling.reward_models import load_lm_head
    from alignkit.train.reward import AlignRewardTrainer

    s = RewardSettings(**{**presets.defaults("reward"), "loss": "logexpwithlm", "lm_loss_coef": 0.5})
    loaded = load_model(s, for_training=True, reward=True)
    model = add_trainable_adapter(loaded, s, task_type="SEQ_CLS")  # LoRA B = 0: the backbone is the base's
    head = load_lm_head(loaded.base_id, model)
    data = load_preferences(presets.paths()["preferences"]).select(range(4))
    trainer = AlignRewardTrainer(
        model=model, args=RewardConfig(output_dir=str(tmp_path), report_to="none", max_length=64, bf16=False),
        train_dataset=data, processing_class=loaded.tokenizer, loss="logexpwithlm", lm_loss_coef=0.5, lm_head=head,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, dict(batch)).item()
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        causal = AutoModelForCausalLM.from_pretrained(loaded.base_id)
        ids, mask = batch["input_ids"][:4], batch["attention_mask"][:4]
        lm = causal(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.item()
    assert lm > 0.1
    assert abs(got - (torch.nn.functional.softplus(rejected - chosen).mean().item() + 0.5 * lm)) < 1e-5


def test_reward_training_keeps_the_lora_dropout_it_records(tiny_cache, tmp_path):
    """TRL's RewardConfig.disable_dropout (on by default) zeroed LoRA's dropout too, while the run's config and card
    recorded --lora_dropout; it stays on the trained adapter, as in dpo.py and kto.py."""
    from trl import RewardConfig

    from alignkit.core.config import RewardSettings
    from alignkit.core.data import load_preferences
    from alignkit.modeling.models import TRAINABLE, add_trainable_adapter, load_model
    from alignkit.train.reward import AlignRewardTrainer

    from alignkit.train.reward import ROW

    s = RewardSettings(**{**presets.defaults("reward"), "lora_dropout": 0.1})
    loaded = load_model(s, for_training=True, reward=True)
    model = add_trainable_adapter(loaded, s, task_type="SEQ_CLS")
    pairs = load_preferences(presets.paths()["preferences"])
    held_out = pairs.select(range(4, 6))
    # TRL's arguments positionally, as RewardTrainer takes them: the 5th, eval_dataset, clashed with the one this
    # class numbers ("got multiple values for argument 'eval_dataset'")
    trainer = AlignRewardTrainer(
        model, RewardConfig(output_dir=str(tmp_path), report_to="none", max_length=64, bf16=False), None,
        pairs.select(range(4)), held_out, loaded.tokenizer,
    )
    assert trainer.held_out_fingerprint == held_out._fingerprint and ROW in trainer.eval_dataset.column_names
    assert trainer.args.disable_dropout  # TRL's default: the model's own dropout off
    ps = {m.lora_dropout[TRAINABLE].p for m in trainer.model.modules()
          if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) and TRAINABLE in m.lora_dropout}
    assert ps == {0.1}
