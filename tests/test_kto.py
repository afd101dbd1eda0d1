"""kto.py: KTO on unpaired labelled answers raises the tiny preset's rule-following rate; the reference is the
model the run starts from (SFT adapter included); the data loader labels and splits rows, or refuses them."""

from __future__ import annotations

import re

import pytest
import torch

from alignkit.core.config import KTOSettings
from alignkit.core.data import DataError, load_unpaired
from alignkit.core.errors import UserError
from alignkit.modeling.models import TRAINABLE

from conftest import run_script


def test_kto_raises_rule_following(tiny_cache, tmp_path):
    """The preset's pairs split into desirable/undesirable answers; measured 0.20 -> 0.45 (sampled at T=1)."""
    run = run_script("kto.py", "--preset", "tiny", "--output_dir", str(tmp_path))
    assert run["after"] - run["before"] >= 0.1, (run["before"], run["after"])
    assert (run["run_folder"] / "adapter_model.safetensors").is_file()


def _first_log(tmp_path, sft_run, name, *flags) -> tuple[dict, list[str], set[float]]:
    """The first step's logs, the training rows' columns, and the trained adapter's LoRA dropout rates."""
    run = run_script("kto.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--max_steps", "1",
                     "--logging_steps", "1", "--eval_split", "0", "--output_dir", str(tmp_path), "--run_name", name,
                     *flags)
    dropouts = {m.lora_dropout[TRAINABLE].p for m in run["trainer"].model.modules()
                if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                and isinstance(m.lora_dropout[TRAINABLE], torch.nn.Dropout)}
    return run["trainer"].state.log_history[0], run["trainer"].train_dataset.column_names, dropouts


def test_reference_is_the_model_the_run_starts_from(tiny_cache, tmp_path, sft_run):
    """At step 0 the new adapter is zero: against base + SFT adapter (the default) every reward is exactly 0; TRL's
    own PEFT reference would be the bare base, which --reference_adapters 0 asks for: rewards then differ from 0.
    Precomputed (--precompute_ref_log_probs), the reference is base + SFT adapter too: rewards 0 at step 0."""
    stacked, columns, dropouts = _first_log(tmp_path, sft_run, "stacked", "--lora_dropout", "0.1")
    assert stacked["rewards/chosen"] == 0.0 and stacked["rewards/rejected"] == 0.0
    assert "ref_logps" not in columns  # computed in each step
    bare, _, _ = _first_log(tmp_path, sft_run, "bare", "--reference_adapters", "0")
    assert abs(bare["rewards/chosen"]) + abs(bare["rewards/rejected"]) > 1e-3
    # --precompute_ref_log_probs: the same reference, computed before training and carried in the rows.
    precomputed, columns, _ = _first_log(tmp_path, sft_run, "precomputed", "--precompute_ref_log_probs", "true")
    assert "ref_logps" in columns
    assert precomputed["rewards/chosen"] == pytest.approx(0, abs=1e-4), precomputed
    assert precomputed["rewards/rejected"] == pytest.approx(0, abs=1e-4), precomputed
    # TRL's disable_dropout zeroed the model's dropout; --lora_dropout stays on the trained adapter, as in DPO.
    assert dropouts == {0.1}


def test_unpaired_rows_and_pairs_load_as_labelled_answers():
    rows = load_unpaired([{"prompt": "name three fruits.", "completion": "apple,pear,plum.", "label": "False"},
                          {"prompt": "hi", "completion": [{"role": "assistant", "content": "yo"}], "label": True}])
    assert rows["label"] == [False, True]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "apple,pear,plum."}]
    pairs = load_unpaired([{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert [(r["completion"], r["label"]) for r in pairs] == [("good", True), ("bad", False)]  # texts stay texts
    # A pair among labelled rows was "field 'label': expected true or false, got nothing": it says the two mix not.
    with pytest.raises(DataError, match=re.escape("row 2: field 'label': a preference pair (chosen, rejected) among "
                                                  "labelled rows (prompt, completion, label): a file is one or the other")):
        load_unpaired([{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "chosen": "x", "rejected": "y"}])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "completion": "a", "label": 2}, "row 1: field 'label': expected true or false (a boolean; 1 or 0"),
    # It listed "true or false (or 1 or 0)", though "TRUE" and 1.0 are taken too: every form taken is named.
    ({"prompt": "q", "completion": "a", "label": "yes"}, "field 'label': expected true or false (a boolean; 1 or 0, "
     "1.0 or 0.0; or the text \"true\", \"false\", \"1\", \"0\", \"1.0\" or \"0.0\" in any case), got str ('yes')"),
    ({"prompt": "q", "completion": "a", "label": 0.7}, "in any case), got float (0.7)"),
    ({"prompt": "q", "completion": "", "label": True}, "field 'completion'"),
])
def test_bad_unpaired_rows_name_row_and_field(row, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load_unpaired([row])


def test_kto_settings_refuse_what_cannot_work():
    with pytest.raises(UserError, match="per_device_train_batch_size 2 or more"):
        KTOSettings(per_device_train_batch_size=1)
    with pytest.raises(UserError, match="must be > 0"):
        KTOSettings(desirable_weight=0)
    assert KTOSettings(per_device_train_batch_size=1, loss_type="apo_zero_unpaired").loss_type == "apo_zero_unpaired"


def test_kto_s_truncation_notes_name_what_kto_config_has(alignkit_log):
    """--max_completion_length's note sent a kto.py user to --truncation_mode, which KTOConfig does not have:
    kto.py refused it as unknown and suggested --truncation_side, itself named as not applied. Each note says how
    TRL's KTOTrainer cuts, and a suggestion never names a setting the script names as not applied."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import DPOSettings

    for flags in (["--max_completion_length", "64"], ["--truncation_mode", "keep_start"], ["--truncation_side", "left"]):
        alignkit_log.clear()
        assert parse_config(KTOSettings, env_file=None, args=flags) == parse_config(KTOSettings, env_file=None, args=[])
        assert f"not applied, and why: {flags[0][2:]}: " in alignkit_log.text, flags
        assert "KTOConfig has no truncation_mode: KTO always cuts the end" in alignkit_log.text, flags
        assert "--truncation_mode says" not in alignkit_log.text and "(sft.py, dpo.py)" not in alignkit_log.text
    alignkit_log.clear()
    parse_config(DPOSettings, env_file=None, args=["--max_completion_length", "64"])  # DPOConfig has truncation_mode
    assert "--truncation_mode says which end is cut" in alignkit_log.text
    with pytest.raises(UserError) as error:  # not "did you mean --truncation_side?"
        parse_config(KTOSettings, env_file=None, args=["--truncation_sid", "left"])
    assert "truncation_side" not in str(error.value)


def test_kto_s_beta_is_suggested_for_dpo_py_s_dpo_beta(tmp_path):
    """kto.py --dpo_beta said "did you mean --do_eval?": KTO's own name for it is --beta (TRL's, an alias of
    --dpo_beta in dpo.py and rlaif.py), in a flag or a recipe alike."""
    from alignkit.core.args import parse_config

    with pytest.raises(UserError, match=r"--dpo_beta \(on the command line; did you mean --beta\?\)"):
        parse_config(KTOSettings, env_file=None, args=["--dpo_beta", "0.3"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dpo_beta: 0.3\n")
    with pytest.raises(UserError, match=r"dpo_beta \(in .*recipe.yaml; did you mean beta\?\)"):
        parse_config(KTOSettings, env_file=None, args=["--config", str(recipe)])
    assert parse_config(KTOSettings, env_file=None, args=["--beta", "0.3"]).beta == 0.3


def test_kto_takes_a_test_split_and_a_handbook_mixture_as_dpo_does(tmp_path):
    """kto.py read --dataset_id alone: a --dataset_test_split or a dataset_mixture was silently ignored."""
    import json

    from alignkit.core.mixture import load_train_eval

    folder = tmp_path / "pairs"
    folder.mkdir()
    pair = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    for split, count in (("train", 6), ("test", 2)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({**pair, "prompt": f"{split} {i}"}) + "\n"
                                                       for i in range(count)))
    s = KTOSettings(dataset_id=str(folder), dataset_test_split="test")
    train, held_out = load_train_eval("unpaired", s)
    assert (len(train), len(held_out)) == (12, 4) and sum(held_out["label"]) == 2  # each pair: two labelled answers
    mixture = {"datasets": [{"id": str(folder / "train.jsonl"), "weight": 0.5}], "seed": 0}
    train, held_out = load_train_eval("unpaired", KTOSettings(dataset_mixture=mixture))
    assert len(train) + (len(held_out) if held_out else 0) == 6  # half of the file's 12 labelled answers


def test_kto_refuses_training_answers_of_one_label_before_the_model_loads(tmp_path):
    """Found by a kto.py audit: labels all desirable (a --grade_threshold every answer reached) or all undesirable
    trained without a word, TRL's desirable_weight advice computed with the missing class counted as 1."""
    import json

    from alignkit.core.mixture import load_train_eval

    for label, counts, fix in ((True, "8 desirable answers and no undesirable one", "Add answers labelled false "
                                "(label.py --mode pointwise: a higher --grade_threshold)"),
                               (False, "8 undesirable answers and no desirable one", "Add answers labelled true")):
        labels = tmp_path / f"labels-{label}.jsonl"
        labels.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "label": label}) + "\n"
                                  for i in range(10)))
        with pytest.raises(DataError, match=re.escape(f"{labels}: the training data holds {counts}: KTO learns from "
                                                      f"the two against each other. {fix}")):
            load_train_eval("unpaired", KTOSettings(dataset_id=str(labels), eval_split=0.2))
    # The one desirable answer of the file held out: the fix is to hold out fewer, not to add what is there (the
    # review of session 31).
    one = tmp_path / "one-desirable.jsonl"
    one.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "label": i == 0}) + "\n"
                           for i in range(10)))
    with pytest.raises(DataError, match=re.escape(f"{one}: the held-out share (--eval_split) took every desirable "
                                                  "answer, leaving 8 undesirable answers and no desirable one to "
                                                  "train on: KTO learns from the two against each other. Hold out "
                                                  "fewer (a smaller --eval_split, or 0), or add answers labelled true")):
        load_train_eval("unpaired", KTOSettings(dataset_id=str(one), eval_split=0.2, seed=9))  # seed 9: q0 held out


def test_kto_holds_out_whole_prompts_so_no_held_out_answer_has_its_pair_partner_in_training(tmp_path, alignkit_log):
    """A pair becomes two answers; the held-out share was drawn over answers, so a held-out rejected answer's chosen
    partner (same prompt) trained: the held-out figures measured answers to prompts the model had learned."""
    import json

    from alignkit.core.mixture import load_train_eval

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                             for i in range(20)))
    for settings in (KTOSettings(dataset_id=str(pairs), eval_split=0.25),
                     KTOSettings(dataset_mixture={"datasets": [{"id": str(pairs), "weight": 1.0}], "seed": 3,
                                                  "test_split_size": 5})):
        train, held_out = load_train_eval("unpaired", settings)
        train_prompts, held_prompts = set(train["prompt"]), set(held_out["prompt"])
        assert not train_prompts & held_prompts
        assert len(held_out) >= (10 if settings.eval_split == 0.25 else 5) and len(train) + len(held_out) == 40
        assert all(sorted(held_out.filter(lambda r, p=p: r["prompt"] == p)["label"]) == [False, True]
                   for p in held_prompts)
    with pytest.raises(UserError, match="leaves no training rows"):
        load_train_eval("unpaired", KTOSettings(dataset_id=str(pairs), eval_split=39))
    # Every answer to one prompt (a shared template): held out as rows, as there is no other way.
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"prompt": "q", "completion": f"answer {i}", "label": i % 2 == 0}) + "\n"
                           for i in range(20)))
    train, held_out = load_train_eval("unpaired", KTOSettings(dataset_id=str(one), eval_split=0.1))
    assert (len(train), len(held_out)) == (18, 2)
    assert ("eval_split: all 20 answers share one prompt, so no prompt can be held out whole: 2 answers of it are "
            "held out, and that prompt is in training too") in alignkit_log.text
    load_train_eval("unpaired", KTOSettings(dataset_id=str(one), eval_split=1))
    assert "whole: 1 answer of it is held out" in alignkit_log.text  # "1 pairs", it said


def test_kto_s_held_out_rewards_are_the_answers_means_whatever_the_batches(monkeypatch):
    """TRL's KTO appends each batch's mean over its desirable (undesirable) answers and its log averages the entries:
    a batch with 1 desirable answer weighed as much as one with 7, so eval_rewards/* were means of batch means. One
    entry per answer (as DPO's `_log_rewards`): the answers' own means, and the margin their difference."""
    from collections import defaultdict
    from types import SimpleNamespace

    import transformers
    from trl import KTOTrainer

    from alignkit.train.kto import AlignKTOTrainer

    def trl_metrics(self, model, inputs, return_outputs):  # KTOTrainer._compute_loss's metrics, on given rewards
        metrics, labels, rewards = self._metrics["eval"], inputs["label"], inputs["rewards"]
        chosen, rejected = rewards[labels], rewards[~labels]
        for name, values in (("chosen", chosen), ("rejected", rejected)):
            if len(values):
                metrics[f"rewards/{name}"].append(values.sum().item() / len(values))
                metrics[f"logps/{name}"].append((values - 5).sum().item() / len(values))
        if len(chosen) and len(rejected):
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
        return torch.tensor(0.0)

    logged = {}
    monkeypatch.setattr(KTOTrainer, "_compute_loss", trl_metrics)
    monkeypatch.setattr(transformers.Trainer, "log", lambda self, logs, start_time=None: logged.update(logs))
    trainer = object.__new__(AlignKTOTrainer)
    trainer.model = SimpleNamespace(training=False)
    trainer.accelerator = SimpleNamespace(gather_for_metrics=lambda t: t, device="cpu")
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    # 1 desirable answer (reward 1) and 7 undesirable (-1); then 7 desirable (3) and 1 undesirable (-2).
    for labels, chosen, rejected in (([True] + [False] * 7, 1.0, -1.0), ([True] * 7 + [False], 3.0, -2.0)):
        labels = torch.tensor(labels)
        rewards = torch.where(labels, torch.tensor(chosen), torch.tensor(rejected))
        trainer.compute_loss(None, {"label": labels, "rewards": rewards, "ref_logps": rewards})
    trainer.log({})
    assert logged["eval_rewards/chosen"] == pytest.approx((1 + 7 * 3) / 8)  # the mean of batch means said 2
    assert logged["eval_rewards/rejected"] == pytest.approx((-7 - 2) / 8)
    assert logged["eval_logps/chosen"] == pytest.approx((1 + 7 * 3) / 8 - 5)
    assert logged["eval_rewards/margins"] == pytest.approx((1 + 7 * 3) / 8 + 9 / 8)  # not (2 + 5) / 2
