"""Scale-out: two real processes over gloo under `accelerate launch`, and every recipe parses against the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.core.args import parse_config
from alignkit.core.config import DPOSettings, SFTSettings

from conftest import ROOT

SETTINGS = {"sft.py": SFTSettings, "dpo.py": DPOSettings}
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 3 and len(ACCELERATE_CONFIGS) == 4  # ddp, fsdp, deepspeed_zero2, deepspeed_zero3


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_with_the_command_it_is_headed_by(recipe, monkeypatch):
    """The header's exact command, parsed by the script's own settings class: no key drifts from the code."""
    header = re.search(r"^# (python \S+\.py .*)$", recipe.read_text(), re.M)
    assert header, f"{recipe.name} must start with the exact command that runs it"
    words = shlex.split(header.group(1))
    script = words[1]
    assert (ROOT / script).is_file()
    monkeypatch.chdir(ROOT)
    settings = parse_config(SETTINGS[script], args=words[2:], env_file=None)
    assert settings.run_name  # each recipe names its run, so its outputs have a stable folder


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_its_command_names_real_files(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    command = re.search(r"^# (accelerate launch .*)$", config.read_text(), re.M).group(1)
    for path in re.findall(r"(\S+\.(?:py|yaml))", command):
        assert (ROOT / path).is_file(), path
    if loaded.distributed_type == "DEEPSPEED":
        stage = loaded.deepspeed_config["zero_stage"]
        assert f"zero{stage}" in config.name  # the file says which stage it is
        assert stage == 2 or loaded.deepspeed_config["zero3_save_16bit_model"]
    if loaded.distributed_type == "FSDP":
        assert loaded.fsdp_config["fsdp_version"] == 2  # FSDP2 is what tests/test_launch_sharded.py runs
        assert loaded.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert loaded.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_8bit_is_refused_under_fsdp(monkeypatch):
    """Refused by every training script before anything loads (the launch check), and by the loader itself."""
    from alignkit.core import launch
    from alignkit.core.config import ModelSettings
    from alignkit.modeling.models import load_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for script, settings in (("sft.py", SFTSettings), ("dpo.py", DPOSettings)):
        assert launch.refusal(settings(quantization="8bit"), script) == (
            "--quantization 8bit cannot be sharded by FSDP: bitsandbytes supports that for 4-bit only. Use "
            "--quantization 4bit, or a DDP launch (recipes/accelerate/ddp.yaml).")
        assert launch.refusal(settings(quantization="4bit"), script) is None
    with pytest.raises(ValueError, match="8bit cannot be sharded by FSDP"):
        load_model(ModelSettings(model_id="unused/model", quantization="8bit"))


# dpo.py with simpo (reference-free: the policy pass alone): dpo.py's default loss under DDP runs in
# tests/test_launch_real.py and in the README's own launch command (tests/test_readme.py).
@pytest.mark.parametrize("script, flags", [("dpo.py", ["--loss_type", "simpo"]), ("sft.py", [])],
                         ids=["dpo.py-simpo", "sft.py"])
def test_two_processes_train_together_over_gloo(script, flags, tiny_cache, tmp_path):
    env = {**os.environ, "ALIGNKIT_CACHE": str(tiny_cache)}
    # Random batches: the first and last logged losses below compare only when batches are drawn alike (length
    # grouping orders them longest first; its order across processes: test_length_grouping).
    done, run = two_processes(script, ["--preset", "tiny", "--max_steps", "20", "--logging_steps", "5",
                                       "--group_by_length", "false", *flags], tmp_path, "ddp", env, steps=20)
    # Both processes took part: 20 steps of 2 x 16 rows cover twice the data one process would.
    state = json.loads((run / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(20 * 2 * 16 / metrics_rows(run), rel=0.02)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    # One run folder, one adapter, one settings file, written by the main process only.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert (run / "adapter_model.safetensors").is_file() and (run / "alignkit_config.json").is_file()
    assert done.stdout.count("adapter saved to") + done.stderr.count("adapter saved to") == 1
    # The script's own lines once per launch, not once per process (alignkit.core.launch._quiet_other_ranks).
    assert done.stdout.count(f"adapter: {run}") == 1, done.stdout[-3000:]
    assert done.stdout.count("held out\n") == 1, done.stdout[-3000:]


def test_a_mixture_of_experts_trains_dpo_with_lora_on_its_experts_at_two_processes(tiny_cache, tmp_path):
    """The support matrix's MoE row said "not proven at 2 processes": DDP wants every trainable parameter used in
    every step, and a router sends a micro-batch's tokens to some experts only. A tiny Mixtral (LoRA on the
    attention and on the fused experts, with the router's load-balancing loss) trains dpo.py at two processes over
    gloo, the adapter of the routed experts saved once and changed by training."""
    from safetensors.torch import load_file

    model = tiny_mixtral(tmp_path / "mixtral")
    env = {**os.environ, "ALIGNKIT_CACHE": str(tiny_cache)}
    done, run = two_processes("dpo.py", ["--preset", "tiny", "--model_id", str(model), "--lora_dropout", "0",
                                         "--max_steps", "6", "--logging_steps", "2", "--eval_split", "0"],
                              tmp_path, "moe-ddp", env, steps=6)
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert any("aux_loss" in e for e in state["log_history"]), state["log_history"][:2]  # the router's balance term
    weights = load_file(run / "adapter_model.safetensors")
    experts = {k: v for k, v in weights.items() if "experts" in k}
    assert experts and any(v.abs().sum() > 0 for k, v in experts.items() if "lora_B" in k)  # trained, from zero
    assert done.stdout.count(f"adapter: {run}") == 1, done.stdout[-3000:]


def tiny_mixtral(model: Path) -> Path:
    """A tiny random Mixtral (4 experts, 2 a token, the router's logits on) saved at `model`, with the tiny
    preset's tokenizer and chat template: the mixture of experts the launch tests train (the tiny preset must be
    built)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.modeling import presets

    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", vocab_size=561, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                  pad_token_id=4, eos_token_id=3, bos_token_id=None, num_local_experts=4,
                                  num_experts_per_tok=2, output_router_logits=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if Path(presets.paths()["model"], name).is_file():
            shutil.copy(Path(presets.paths()["model"], name), model)
    return model


def two_processes(script: str, flags: list[str], output_dir: Path, run_name: str, env: dict, steps: int):
    """`accelerate launch` of `script` on two processes over gloo, to its end: (the finished process, its run
    folder), checked to have run `steps` steps on both."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", script, *flags, "--output_dir", str(output_dir), "--run_name", run_name]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = output_dir / run_name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_step"] == steps
    return done, run


def metrics_rows(run: Path) -> int:
    """Training rows of the tiny run, read as the run read them: its data less the held-out share (preference pairs
    held out by whole prompts)."""
    import dataclasses

    from alignkit.core.config import DPOSettings, SFTSettings
    from alignkit.core.mixture import DATA_SETTINGS, load_train_eval

    saved = json.loads((run / "alignkit_config.json").read_text())
    cls, kind = (SFTSettings, "sft") if saved["run_type"] == "sft" else (DPOSettings, "preference")
    names = {f.name for f in dataclasses.fields(cls)}
    return len(load_train_eval(kind, cls(**{k: v for k, v in saved.items() if k in names and k in DATA_SETTINGS}))[0])


def test_each_process_of_a_launch_ends_its_process_group_at_exit(tmp_path):
    """Left to the interpreter's teardown, the process group's threads were destroyed still running: a rank that had
    saved everything died of SIGABRT ("terminate called without an active exception") and failed an FSDP launch
    (seen in the fresh-clone CI). The launch's group now ends at exit, in each process."""
    import socket

    script = tmp_path / "ranks.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from alignkit.core import launch\n"
        "launch._start_process_group()\n"
        "real = dist.destroy_process_group\n"
        "def spy(*a, **k):\n"
        "    print(f'rank {dist.get_rank()}: process group ended', flush=True)\n"
        "    real(*a, **k)\n"
        "dist.destroy_process_group = spy\n")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    # Each rank's line once (the two ranks' prints share the pipe, and may interleave text and newline).
    assert sorted(re.findall(r"rank (\d): process group ended", done.stdout)) == ["0", "1"], done.stdout
