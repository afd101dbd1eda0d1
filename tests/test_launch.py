"""The launch, established before the model loads (alignkit.core.launch), on a simulated multi-GPU machine: each
rank's device and process group, its 4-bit placement, the ranks' one checkpointing choice, and each combination
that cannot work refused in one line before anything loads (issue 24)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignkit.core import kernels, launch
from alignkit.core.config import DPOSettings, MergeSettings, RewardSettings, RLSettings, SFTSettings
from alignkit.core.errors import UserError
from alignkit.modeling import presets
from alignkit.train import run_folder, training

from conftest import ROOT, in_two_ranks, run_script
from test_gpu_paths import _meta_llama, fake_gpus, load_kwargs  # noqa: F401 - load_kwargs is a fixture

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_CPU_RAM_EFFICIENT_LOADING",
       "ACCELERATE_DEEPSPEED_CONFIG_FILE",
       "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_MIXED_PRECISION")


def launched(monkeypatch, mode: str, rank: int = 1, world: int = 2) -> None:
    """The environment `accelerate launch` gives process `rank` of `world` in `mode` (ddp, fsdp, fsdp1, zero2,
    zero3); fsdp is FSDP2, as recipes/accelerate/fsdp.yaml launches it."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    if mode.startswith("fsdp"):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "1" if mode == "fsdp1" else "2")
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    elif mode.startswith("zero"):
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", mode[-1])


def gpus(monkeypatch, count: int) -> list:
    """`count` fake GPUs whose current device is what set_device left (fake_gpus' set_device does nothing); returns
    the devices current when a process group was started."""
    fake_gpus(monkeypatch, count=count)
    current = [0]
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.__setitem__(0, int(device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    started = []
    monkeypatch.setattr(launch, "_start_process_group", lambda: started.append(torch.cuda.current_device()))
    monkeypatch.setattr(launch, "register_zero3_init", lambda *quantized: None)  # DeepSpeed is not installed here
    return started


# ---------------------------------------------------------------------------------------------------------
# 1. QLoRA under FSDP / ZeRO-3: each rank's 4-bit model on its own GPU, the process group there before loading


@pytest.mark.parametrize("mode", ["fsdp", "zero3"])
def test_rank_1_of_a_sharded_qlora_launch_loads_onto_gpu_1(mode, monkeypatch, load_kwargs):
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    gpu_devices = gpus(monkeypatch, 2)
    launched(monkeypatch, mode, rank=1)
    s = DPOSettings(model_id=presets.paths()["model"])  # quantization auto: QLoRA on CUDA
    established = launch.establish_launch(s, "dpo.py")
    assert established.mode == {"fsdp": "FSDP", "zero3": "ZeRO-3"}[mode] and established.local_rank == 1
    # The device is set, then the process group is created (FSDP's RAM-efficient loading needs it at load time).
    assert torch.cuda.current_device() == 1 and gpu_devices == [1]
    # bitsandbytes without a device map places on the current device (update_device_map): GPU 1 now, not 0.
    assert Bnb4BitHfQuantizer(BitsAndBytesConfig(load_in_4bit=True)).update_device_map(None) == {"": 1}
    kwargs = load_kwargs(s, for_training=True)
    assert kwargs["device_map"] == {"": 1}  # and the loader says so itself
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == torch.bfloat16
    # A full-precision model is placed by FSDP / ZeRO-3 themselves.
    assert "device_map" not in load_kwargs(DPOSettings(model_id=s.model_id, quantization="none"), for_training=True)


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_ddp_and_zero2_ranks_load_the_whole_model_onto_their_own_gpu(mode, monkeypatch, load_kwargs):
    """Neither partitions the weights: every rank holds the whole model (QLoRA or not) on its GPU, the 4-bit
    weights stored as bitsandbytes packs them, and ZeRO-3's load-time partitioning stays off."""
    gpu_devices = gpus(monkeypatch, 2)
    registered = []
    monkeypatch.setattr(launch, "register_zero3_init", lambda *quantized: registered.append(True))
    launched(monkeypatch, mode, rank=1)
    s = DPOSettings(model_id=presets.paths()["model"])
    assert launch.establish_launch(s, "dpo.py").mode == {"ddp": "DDP", "zero2": "ZeRO-2"}[mode]
    assert gpu_devices == [1] and registered == []
    kwargs = load_kwargs(s, for_training=True)
    assert kwargs["device_map"] == {"": 1} and kwargs["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    assert load_kwargs(DPOSettings(model_id=s.model_id, quantization="none"), for_training=True)["device_map"] == {"": 1}


def test_one_process_starts_no_process_group(monkeypatch):
    gpu_devices = gpus(monkeypatch, 1)
    assert launch.establish_launch(DPOSettings(), "dpo.py").mode == "one process"
    assert gpu_devices == []


# ---------------------------------------------------------------------------------------------------------
# 2. --gradient_checkpointing auto: the GPU this rank trains on, and the ranks agree


def test_checkpointing_auto_reads_this_rank_s_gpu_and_the_least_free_rank_decides(monkeypatch, alignkit_log):
    import psutil
    import torch.distributed as dist

    fake_gpus(monkeypatch, count=2)
    launched(monkeypatch, "fsdp", rank=1)
    s = DPOSettings(report_to="none")
    model = _meta_llama(1024, 2816, 8, 32000)  # under FSDP the model is on the CPU or the meta device at this point
    needed = training.activation_bytes(model, s, torch.bfloat16)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (4 * needed, 8 * needed))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("V", (), {"available": 100 * needed})())
    # The other rank's GPU has less free: the all_reduce MIN gives every rank that value.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, **kw: tensor.clamp_(max=needed))
    assert training.resolve_gradient_checkpointing(s, model, torch.bfloat16) is True
    assert asked == [torch.device("cuda", 1)]  # this rank's GPU, not host RAM
    assert "free on" not in alignkit_log.text  # rank 1 takes the agreed decision without a word: rank 0 logs it
    monkeypatch.setenv("RANK", "0")
    assert training.resolve_gradient_checkpointing(s, model, torch.bfloat16) is True
    assert "free on cuda (the least of all ranks)" in alignkit_log.text
    # Alone, this rank's 4x would have turned it off: the decision really is the agreed one.
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, **kw: tensor)
    assert training.resolve_gradient_checkpointing(s, model, torch.bfloat16) is False


# ---------------------------------------------------------------------------------------------------------
# Refused before anything loads: one line naming the combination and what to use instead


REFUSED = [
    ("fsdp1", "sft.py", SFTSettings(), r"^FSDP1 \(fsdp_version 1, accelerate's default .* set `fsdp_version: 2` in the "
     r"accelerate config, as recipes/accelerate/fsdp.yaml does, or pass --fsdp_version 2 to accelerate launch$"),
    ("fsdp1", "dpo.py", DPOSettings(), "^FSDP1 .* not supported: set `fsdp_version: 2`"),
    ("fsdp", "dpo.py", DPOSettings(precompute_ref_log_probs=True),
     "dpo.py --precompute_ref_log_probs under FSDP: .* use a DDP or DeepSpeed launch, or drop"),  # item 7
    ("fsdp", "rl.py", RLSettings(reward=["rm:runs/rm"]), r"rl.py --reward rm:FOLDER under FSDP: .* use a DDP launch"),
    ("zero3", "rl.py", RLSettings(reward=["rule", "rm:runs/rm"]), "rl.py --reward rm:FOLDER under DeepSpeed ZeRO-3"),
    ("fsdp", "reward.py", RewardSettings(loss="logexpwithlm", lm_loss_coef=0.1),
     "reward.py --loss logexpwithlm under FSDP: .* use a DDP launch, or --lm_loss_coef 0"),
    ("zero3", "sft.py", SFTSettings(quantization="8bit"), "8bit cannot be sharded by DeepSpeed ZeRO-3.*4bit"),
    ("ddp", "merge.py", MergeSettings(adapter_dir="runs/x"),
     r"merge.py under accelerate launch \(DDP, 2 processes\): .* `python merge.py"),
    ("fsdp", "rlaif.py", SimpleNamespace(), r"rlaif.py under accelerate launch \(FSDP, 2 processes\)"),
    ("ddp", "label.py", SimpleNamespace(), r"^label.py under accelerate launch \(DDP, 2 processes\): it runs as one "
     r"process; run `python label.py ...` \(it uses this machine's GPU itself\)$"),
    ("zero2", "evaluate.py", SimpleNamespace(), r"^evaluate.py under accelerate launch \(ZeRO-2, 2 processes\): "
     r"it runs as one process"),
    # vLLM settings where generation falls back to transformers (no CUDA here): they would do nothing.
    ("ddp", "rl.py", RLSettings(reward=["rule"], vllm_mode="server", trainer_overrides={"vllm_server_port": 8001}),
     r"^rl.py --vllm_server_port, --vllm_mode server: generation runs on transformers here \(--backend auto; .*\), "
     r"so they would do nothing; drop them, or pass --backend vllm"),
    # One setting is "it" (the rl.py audit of session 56 read "they would do nothing; drop them" for one).
    ("ddp", "rl.py", RLSettings(reward=["rule"], vllm_mode="server"),
     r"^rl.py --vllm_mode server: generation runs on transformers here \(--backend auto; .*\), so it would do "
     r"nothing; drop it, or pass --backend vllm on a machine with both$"),
    # rl.py's own vLLM memory share, set: dropped on transformers without a word (an audit).
    ("ddp", "rl.py", RLSettings(reward=["rule"], vllm_gpu_memory_utilization=0.5),
     r"^rl.py --vllm_gpu_memory_utilization: generation runs on transformers here \(--backend auto; .*\), so it "
     r"would do nothing; drop it, or pass --backend vllm on a machine with both$"),
    ("zero3", "reward.py", RewardSettings(loss="logexpwithlm", lm_loss_coef=0.1),
     r"reward.py --loss logexpwithlm under DeepSpeed ZeRO-3: .* use a DDP launch, or --lm_loss_coef 0"),
    # TRL's activation_offloading without a GPU: its traceback once the model had loaded (an sft.py audit).
    ("ddp", "sft.py", SFTSettings(trainer_overrides={"activation_offloading": True}),
     r"^activation_offloading on a CPU: TRL moves a GPU's activations to the CPU's memory, and with no GPU its hooks "
     r"fail once the model has loaded; drop it \(it is for a CUDA GPU\)$"),
    # --backend vllm without a GPU: refused after the model loaded (minutes for a 7B; the rl.py audit of session 28).
    ("ddp", "rl.py", RLSettings(reward=["rule"], backend="vllm"),
     r"^--backend vllm: no CUDA GPU; pass --backend transformers \(or auto\) to generate with transformers$"),
]


@pytest.mark.parametrize("mode, script, s, line", REFUSED, ids=[f"{m}-{s}" for m, s, *_ in REFUSED])
def test_what_cannot_work_is_refused_in_one_line_before_loading(mode, script, s, line, monkeypatch):
    launched(monkeypatch, mode)
    monkeypatch.setattr(launch, "_start_process_group", lambda: pytest.fail("refused only after the process group"))
    with pytest.raises(UserError, match=line) as refused:
        launch.establish_launch(s, script)
    assert "\n" not in str(refused.value)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # every rank refuses; one line per machine says it (each did)
        assert refused.value.said_by_local_rank_0
        launched(monkeypatch, mode, rank=0)
        with pytest.raises(UserError, match=line) as said:
            launch.establish_launch(s, script)
        assert not said.value.said_by_local_rank_0


def test_activation_offloading_is_refused_on_a_cpu_only(monkeypatch):
    """On a GPU (simulated) TRL's activation_offloading passes through as it is."""
    s = SFTSettings(trainer_overrides={"activation_offloading": True})
    assert launch.refusal(s, "sft.py").startswith("activation_offloading on a CPU")
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    assert launch.refusal(s, "sft.py") is None


def test_a_refusal_local_rank_0_says_is_said_by_the_others_only_if_the_launcher_lets_them_wait(capsys, monkeypatch):
    """The others wait (the launcher stops them once local rank 0 has said it and exited); one still running
    after the wait says it too, so a refusal is never said by no process."""
    from alignkit.core import errors

    waited = []
    monkeypatch.setattr("time.sleep", lambda seconds: waited.append(seconds))
    quiet = UserError("refused")
    quiet.said_by_local_rank_0 = True
    for error, wait in ((quiet, [errors.OTHER_RANKS_WAIT]), (UserError("refused"), [])):
        waited.clear()
        with pytest.raises(SystemExit) as exited:
            errors._report(type(error), error, None)
        assert exited.value.code == errors.EXIT_USER_ERROR and capsys.readouterr().err == "error: refused\n"
        assert waited == wait


@pytest.mark.parametrize("mode, script, s", [
    ("zero3", "dpo.py", DPOSettings(precompute_ref_log_probs=True)),  # TRL's own DeepSpeed inference engine
    ("ddp", "rl.py", RLSettings(reward=["rm:runs/rm"])),
    ("zero2", "reward.py", RewardSettings(loss="logexpwithlm", lm_loss_coef=0.1)),
    ("fsdp", "reward.py", RewardSettings(loss="logexpwithlm", lm_loss_coef=0.0)),  # no LM term: plain logexp
])
def test_what_works_is_not_refused(mode, script, s, monkeypatch):
    launched(monkeypatch, mode)
    monkeypatch.setattr(launch, "_start_process_group", lambda: None)
    monkeypatch.setattr(launch, "register_zero3_init", lambda *quantized: None)
    assert launch.establish_launch(s, script).world_size == 2


def test_a_launch_whose_mixed_precision_is_not_the_run_s_dtype_is_refused(monkeypatch):
    """recipes/accelerate/*.yaml say mixed_precision: bf16. Where the run computes in something else (fp32 on a
    CPU, fp16 on a GPU without native bf16, or an explicit --dtype), transformers would autocast in the launch's
    precision behind alignkit's dtype line, and DeepSpeed stops at its first step: refused first, in one line."""
    def establish(s, script="sft.py", world=2):
        launched(monkeypatch, "zero3", world=world)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        return launch.establish_launch(s, script)

    monkeypatch.setattr(launch, "_start_process_group", lambda: None)
    monkeypatch.setattr(launch, "register_zero3_init", lambda *quantized: None)
    refused = [
        (SFTSettings(), r"^accelerate launch asks for mixed_precision bf16, but this run computes in fp32 \(no CUDA "
                        r"device: .*\): launch with --mixed_precision no \(or set it in the accelerate config\)$"),
        (DPOSettings(dtype="fp32"), r"computes in fp32 \(--dtype fp32\): launch with --mixed_precision no \(or set "
                                    r"it in the accelerate config\), or pass --dtype bf16$"),
    ]
    for s, line in refused:
        with pytest.raises(UserError, match=line):
            establish(s)
    assert establish(MergeSettings(adapter_dir="runs/x"), "merge.py", world=1).world_size == 1  # trains nothing
    fake_gpus(monkeypatch, gpu="T4")
    with pytest.raises(UserError, match=r"computes in fp16 \(this GPU has no native bf16 .*\): launch with "
                                        r"--mixed_precision fp16 "):
        establish(SFTSettings())
    fake_gpus(monkeypatch, gpu="A100")
    assert establish(DPOSettings()).world_size == 2  # bf16 both
    fake_gpus(monkeypatch, gpu="T4")
    launched(monkeypatch, "zero3")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launch.establish_launch(SFTSettings(), "sft.py").world_size == 2  # the run's own dtype: nothing asked


def test_a_deepspeed_json_that_enables_another_precision_is_refused_before_loading(monkeypatch, tmp_path):
    """A DeepSpeed JSON's "bf16": {"enabled": true} (the launch's --mixed_precision then "no") passed the check
    above, and every rank stopped at DeepSpeed's config check after the data and model had loaded (a traceback per
    rank). "auto" takes the run's precision and passes."""
    import json

    monkeypatch.setattr(launch, "_start_process_group", lambda: None)
    monkeypatch.setattr(launch, "register_zero3_init", lambda *quantized: None)
    config = tmp_path / "ds_z2_bf16.json"
    launched(monkeypatch, "zero2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(UserError, match=rf"^the DeepSpeed config {re.escape(str(config))} enables bf16, but this run "
                                        r"computes in fp32 \(--dtype fp32\): set \"bf16\": \{\"enabled\": "
                                        r"\"auto\"\} in .*, or pass --dtype bf16$"):
        launch.establish_launch(SFTSettings(dtype="fp32"), "sft.py")
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    assert launch.establish_launch(SFTSettings(), "sft.py").world_size == 2
    fake_gpus(monkeypatch, gpu="A100")
    launched(monkeypatch, "zero2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    assert launch.establish_launch(SFTSettings(), "sft.py").world_size == 2  # bf16 both


@pytest.mark.parametrize("script,reader", [("dpo.py", "load_preferences"), ("kto.py", "load_unpaired")])
def test_precompute_under_fsdp_is_refused_before_reading_data_or_model(script, reader, monkeypatch, tiny_cache):
    """kto.py establishes the launch like dpo.py: TRL's KTO reference pass has the same FSDP problem."""
    from transformers import AutoModelForCausalLM


    launched(monkeypatch, "fsdp")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(f"alignkit.core.data.{reader}", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(UserError, match=f"{script} --precompute_ref_log_probs under FSDP"):
        run_script(script, "--preset", "tiny", "--precompute_ref_log_probs", "true")


# ---------------------------------------------------------------------------------------------------------
# 3. rl.py with vLLM: QLoRA refused, the context capped


def vllm_installed(monkeypatch):
    import importlib.util
    import types

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace(name=name) if name == "vllm" else real(name, *a))


def test_rl_with_vllm_refuses_qlora_and_caps_vllm_s_context(monkeypatch, tmp_path, tiny_cache):
    import trl
    from transformers import AutoConfig

    from test_gpu_paths import Recorded

    from alignkit.train import rl

    trl.GRPOConfig, trl.RLOOConfig  # imported before CUDA is faked (bitsandbytes would probe the fake one)
    fake_gpus(monkeypatch, count=1)
    vllm_installed(monkeypatch)
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    # Its GPU defaults: vLLM (installed) and QLoRA. Refused before loading, saying what to use instead.
    with pytest.raises(UserError, match=r"rl.py with vLLM and QLoRA .* use --backend transformers, or "
                                        "--quantization none with vLLM"):
        launch.establish_launch(RLSettings(reward=["rule"]), "rl.py")
    launch.establish_launch(RLSettings(reward=["rule"], quantization="none"), "rl.py")
    launch.establish_launch(RLSettings(reward=["rule"], backend="transformers"), "rl.py")
    # vLLM's context: --max_model_len, at most the model's own.
    monkeypatch.setattr(trl, "GRPOConfig", Recorded)
    model = type("M", (), {"config": AutoConfig.from_pretrained(presets.paths()["model"])})()
    context = model.config.max_position_embeddings
    s = RLSettings(reward=["rule"], quantization="none", report_to="none", gradient_checkpointing="false", max_model_len=10**6)
    assert rl.trl_args(s, tmp_path, torch.bfloat16, model)["vllm_max_model_length"] == context
    s.max_model_len = context // 2
    assert rl.trl_args(s, tmp_path, torch.bfloat16, model)["vllm_max_model_length"] == context // 2
    # rl.py's own --vllm_gpu_memory_utilization reaches TRL's config in colocate mode; the server's is its own.
    s.vllm_gpu_memory_utilization = 0.5
    launch.establish_launch(s, "rl.py")
    assert rl.trl_args(s, tmp_path, torch.bfloat16, model)["vllm_gpu_memory_utilization"] == 0.5
    with pytest.raises(UserError, match=r"^rl.py --vllm_gpu_memory_utilization with --vllm_mode server: the server "
                                        r"holds its own share .* drop it, or pass it to trl vllm-serve$"):
        launch.establish_launch(RLSettings(reward=["rule"], quantization="none", vllm_mode="server",
                                           vllm_gpu_memory_utilization=0.5), "rl.py")
    launch.establish_launch(RLSettings(reward=["rule"], quantization="none", vllm_mode="server"), "rl.py")


# ---------------------------------------------------------------------------------------------------------
# 5. reward.py: QLoRA trains fp32 weights (and runs on a CPU); a fresh head is zeroed in every ZeRO-3 partition


def test_reward_py_qlora_on_a_cpu_trains_fp32_lora_and_score_head(tiny_cache, tmp_path, alignkit_log, monkeypatch):
    """It stopped with "expected m1 and m2 to have the same dtype": TRL cast the trainable weights to bf16."""
    from conftest import run_script

    run = run_script("reward.py", "--preset", "tiny", "--quantization", "4bit", "--max_steps", "2",
                     "--max_samples", "48", "--output_dir", str(tmp_path), "--run_name", "rm4")
    trainable = {n: p.dtype for n, p in run["trainer"].model.named_parameters() if p.requires_grad}
    assert any(".score." in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert run["loaded"].quantization == "4bit" and (tmp_path / "rm4" / "held_out_rewards.json").is_file()
    # The run records how it loaded its base (its settings keep --quantization as given: `auto` is 4-bit on CUDA),
    # and it is scored as it trained: over its base rounded to NF4 and dequantized where the caller loads in full
    # precision (it scored over the full-precision base, weights its adapter and head never saw), or in 4-bit.
    from alignkit.core.config import ModelSettings
    from alignkit.feedback.rewards import RewardModel

    folder = tmp_path / "rm4"
    assert json.loads((folder / "alignkit_config.json").read_text())["loaded_as"]["quantization"] == "4bit"
    assert "QLoRA" in (folder / "README.md").read_text().split("Methods used:")[1]
    held_out = json.loads((folder / "held_out_rewards.json").read_text())
    pairs = run["eval_data"]
    answers, trained = [c[0]["content"] for c in pairs["chosen"]], held_out["chosen"]

    def scores(quantization):
        model = RewardModel(str(folder), settings=ModelSettings(model_id=str(folder), quantization=quantization))
        return model(list(pairs["prompt"]), answers)

    for quantization in ("auto", "none", "4bit"):
        assert torch.allclose(torch.tensor(scores(quantization)), torch.tensor(trained), rtol=1e-4, atol=1e-7)
    # The full-precision base is another model: what it scored before.
    from alignkit.modeling.models import load_model
    from alignkit.feedback.rewards import reward_loader_settings, score

    full = load_model(reward_loader_settings(str(folder), ModelSettings(quantization="none")), reward=True)
    inputs = [[*p, {"role": "assistant", "content": a}] for p, a in zip(pairs["prompt"], answers)]
    over_full_base = score(full.model, full.tokenizer, inputs, 8, None)
    assert not torch.allclose(torch.tensor(over_full_base), torch.tensor(trained), rtol=1e-2, atol=1e-7)
    # A copy without the run's settings (what a push uploads: metrics.json, not alignkit_config.json) too.
    import shutil

    from alignkit.feedback.rewards import over_4bit_base, reward_loader_settings

    copy = tmp_path / "pushed"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("checkpoint-*", "alignkit_config.json"))
    recorded = json.loads((copy / "metrics.json").read_text())
    assert recorded["trained_quantization"] == "4bit" and recorded["bnb_4bit_quant_type"] == "nf4"
    assert over_4bit_base(str(copy), reward_loader_settings(str(copy), ModelSettings())) == {
        "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True}
    # One trained over FP4 without double quantization (--bnb_4bit_quant_type fp4 --use_bnb_nested_quant false)
    # scores over its base rounded to FP4, as it trained (it was scored over an NF4-rounded base, another model), and
    # its verdicts key on the format.
    fp4 = tmp_path / "fp4"
    shutil.copytree(folder, fp4, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((fp4 / "alignkit_config.json").read_text())
    (fp4 / "alignkit_config.json").write_text(json.dumps({**config, "bnb_4bit_quant_type": "fp4",
                                                           "use_bnb_nested_quant": False}))
    as_trained = RewardModel(str(fp4), settings=ModelSettings(model_id=str(fp4), quantization="4bit",
                                                              bnb_4bit_quant_type="fp4", use_bnb_nested_quant=False))
    over_fp4 = RewardModel(str(fp4), settings=ModelSettings(model_id=str(fp4)))(list(pairs["prompt"]), answers)
    assert torch.allclose(torch.tensor(over_fp4), torch.tensor(as_trained(list(pairs["prompt"]), answers)),
                          rtol=1e-4, atol=1e-6)
    assert not torch.allclose(torch.tensor(over_fp4), torch.tensor(trained), rtol=1e-3, atol=1e-6)
    from alignkit.core.config import LabelSettings
    from alignkit.feedback.judge import RMJudge

    assert RMJudge(f"rm:{fp4}", LabelSettings()).identity()["over_4bit_base"] == {
        "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": False}
    # label.py's reward-model verdicts key on it: one cached over the full-precision base is never reused.
    assert RMJudge(f"rm:{folder}", LabelSettings()).identity()["over_nf4_base"] is True
    # The generators' chat template arguments are not the reward model's: its verdicts keep their key.
    thinking = LabelSettings(chat_template_kwargs={"enable_thinking": False})
    assert RMJudge(f"rm:{folder}", thinking).identity() == RMJudge(f"rm:{folder}", LabelSettings()).identity()
    assert "over_nf4_base" not in RMJudge(f"rm:{folder}", LabelSettings(quantization="4bit")).identity()
    # Loaded in 4-bit in another format than it trained over (a run over the FP4 adapter without the flags): a line
    # saying so and how to load its own (it loaded NF4 under it without a word); in its own format, none.
    alignkit_log.clear()
    load_model(ModelSettings(model_id=str(fp4), quantization="4bit"), reward=True)
    said = [r.getMessage() for r in alignkit_log.records if "trained over its base in" in r.getMessage()]
    assert said == [f"{fp4} trained over its base in 4-bit FP4; this load rounds the base to 4-bit NF4 with double "
                    "quantization, another model under the adapter: pass --bnb_4bit_quant_type fp4 "
                    "--use_bnb_nested_quant false to load the base it trained over"], said
    alignkit_log.clear()
    load_model(ModelSettings(model_id=str(fp4), quantization="4bit", bnb_4bit_quant_type="fp4",
                             use_bnb_nested_quant=False), reward=True)
    assert not [r for r in alignkit_log.records if "trained over its base in" in r.getMessage()]
    # merge.py (and --merge_adaptors) merges a QLoRA reward model into its base rounded as it trained, by default:
    # into the full-precision base its scores moved (the tiny one's held-out accuracy fell from 0.72 to 0.68).
    from alignkit.modeling.merge import merge_adapters

    merged = merge_adapters(str(folder), tmp_path / "merged")
    assert json.loads((merged / "merge.json").read_text())["dequantize"] is True
    assert torch.allclose(torch.tensor(RewardModel(str(merged))(list(pairs["prompt"]), answers)),
                          torch.tensor(trained), rtol=1e-4, atol=1e-5)
    full_merge = merge_adapters(str(folder), tmp_path / "full", dequantize=False)
    assert torch.allclose(torch.tensor(RewardModel(str(full_merge))(list(pairs["prompt"]), answers)),
                          torch.tensor(over_full_base), rtol=1e-4, atol=1e-5)
    # Without bitsandbytes (no rounding to 4-bit), the default merges into the full-precision base and says so.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    plain = merge_adapters(str(folder), tmp_path / "no-bnb")
    assert json.loads((plain / "merge.json").read_text())["dequantize"] is False
    assert "merges into the full-precision base, since bitsandbytes is not installed" in alignkit_log.text


class _Partitioned:
    """deepspeed.zero.GatheredParameters as DeepSpeed runs it for 2 ranks, seen from rank 0: the whole tensor while
    inside, and modifier_rank's changes written back into this rank's partition (ds_tensor) on the way out."""

    def __init__(self, params, modifier_rank=None):
        self.params, self.modifier_rank = list(params), modifier_rank

    def __enter__(self):
        for p in self.params:
            p.data = torch.cat([p.ds_tensor, p.other_shard])[: p.ds_numel].view(p.ds_shape)

    def __exit__(self, *exc):
        for p in self.params:
            if self.modifier_rank is not None:
                p.ds_tensor.copy_(p.data.reshape(-1)[: p.ds_tensor.numel()])
            p.data = torch.empty(0, dtype=p.dtype)


def test_a_fresh_score_head_is_zeroed_in_its_zero3_partition(tiny_cache, monkeypatch):
    import sys
    import types

    from transformers import AutoModelForSequenceClassification

    from alignkit.train.reward import zero_fresh_score_head

    base = presets.paths()["model"]
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    weight = model.score.weight
    flat = weight.data.reshape(-1).clone()
    half = flat.numel() // 2
    weight.ds_id, weight.ds_shape, weight.ds_numel = 7, weight.shape, flat.numel()
    weight.ds_tensor, weight.other_shard = flat[:half].clone(), flat[half:].clone()
    weight.data = torch.empty(0)  # what zero.Init leaves on a rank: zeroing this changes nothing
    assert weight.ds_tensor.abs().sum() > 0
    deepspeed = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=_Partitioned))
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    zero_fresh_score_head(model, base)
    assert torch.count_nonzero(weight.ds_tensor) == 0


# ---------------------------------------------------------------------------------------------------------
# 6. --merge_adaptors at the end of a ZeRO-3 run: the main process builds the whole model outside zero.Init


def test_merge_adaptors_after_zero3_builds_outside_zero_init(monkeypatch, tmp_path):
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.integrations import is_deepspeed_zero3_enabled

    import alignkit.modeling.merge

    class Config:  # what DeepSpeed's registered HfDeepSpeedConfig answers during a ZeRO-3 run
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    config = Config()
    hf_deepspeed.set_hf_deepspeed_config(config)
    seen = []
    monkeypatch.setattr(alignkit.modeling.merge, "merge_adapters",
                        lambda *a, **k: seen.append(is_deepspeed_zero3_enabled()) or tmp_path / "merged")
    try:
        assert is_deepspeed_zero3_enabled()
        training.publish_run(tmp_path, DPOSettings(merge_adaptors=True, report_to="none"))
        assert seen == [False]  # under zero.Init, from_pretrained would wait for ranks that have left
        assert is_deepspeed_zero3_enabled()  # and the run's own config is back afterwards
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


# ---------------------------------------------------------------------------------------------------------
# 9. merge.py --dequantize on a GPU machine: the 4-bit base in CPU RAM, not on cuda:0


def test_dequantize_merges_in_cpu_ram_on_a_gpu_machine(monkeypatch, tiny_cache, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.modeling.merge import merge_adapters

    base = presets.paths()["model"]
    get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path / "a")
    fake_gpus(monkeypatch, count=1)
    seen = {}

    def from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="stop"):
        merge_adapters(tmp_path / "a", tmp_path / "merged", dequantize=True)
    # bitsandbytes without a device map takes cuda:current_device(): a 7B dequantized to fp32 there is 28 GB.
    assert seen["quantization_config"].load_in_4bit and seen["device_map"] == {"": "cpu"}


def test_checkpointing_auto_counts_prefix_sharing_s_4d_mask():
    """The packed pair's (B, 1, 2L, 2L) mask, as a bool and one float copy (suspected in issue 24: settled as
    counted, and small: batch 4 at 8k tokens on a 7B is about 1% of the activations)."""
    model = _meta_llama(4096, 11008, 32, 32000)
    s = DPOSettings(report_to="none", max_length=8192, per_device_train_batch_size=4, prefix_sharing=False)
    unshared = training.activation_bytes(model, s, torch.bfloat16)
    s.prefix_sharing = True
    mask = training.activation_bytes(model, s, torch.bfloat16) - unshared
    assert mask == 4 * (2 * 8192) ** 2 * (1 + 2)
    assert 0.005 < mask / unshared < 0.02


def test_zero2_saves_the_adapter_without_cloning_the_model_into_host_ram(tiny_cache):
    """ZeRO-2 never partitions the weights: accelerate's get_state_dict would clone the whole model, frozen base
    included, into every rank's host RAM (suspected in issue 24: settled, and fixed)."""
    from test_gpu_paths import _sharded_trainer

    trainer, *_ = _sharded_trainer(tiny_cache, "zero3", main=True)
    trainer.accelerator.deepspeed_config = {"zero_optimization": {"stage": 2}}
    assert training.gathered_state_dict(trainer) is None  # saved from the whole model itself
    assert trainer.accelerator.gathered_from is None  # nothing gathered or cloned


def test_flash_attention_asked_for_without_cuda_or_flash_attn_falls_back_to_sdpa_in_one_line(monkeypatch, alignkit_log):
    """A handbook recipe says attn_implementation: flash_attention_2; where it cannot run, sdpa, said once."""
    import importlib.util

    import torch

    from alignkit.core import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.resolve_attention("flash_attention_2", torch.float32) == "sdpa"
    assert "no CUDA device" in alignkit_log.text
    alignkit_log.clear()  # flex_attention by name: a CPU has no FlexAttention backward to train with
    assert kernels.resolve_attention("flex_attention", torch.float32) == "sdpa"
    assert alignkit_log.messages == ["attention: sdpa (flex_attention was asked for, but there is no CUDA device "
                                     "(torch's FlexAttention has no backward on a CPU))"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch, "_ampere_or_newer", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert kernels.resolve_attention("flash_attention_2", torch.bfloat16) == "sdpa"
    assert "flash-attn is not installed" in alignkit_log.text


def test_a_zero3_launch_without_deepspeed_is_one_line_naming_the_install(monkeypatch):
    import importlib.util

    from alignkit.core import launch
    from alignkit.core.config import DPOSettings

    launched(monkeypatch, "zero3")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr(launch, "_start_process_group", lambda: None)
    with pytest.raises(UserError, match="deepspeed is not installed: pip install deepspeed"):
        launch.establish_launch(DPOSettings(model_id="m", quantization="none"), "dpo.py")


def _rank_prepares_its_run(rank, root, shared):
    """One process of two deciding where its run starts; rank 0's folder holds checkpoint-2."""
    import json

    out = root / ("out0" if shared else f"out{rank}")  # not shared: each machine its own folder
    s = SFTSettings(model_id="tiny", output_dir=str(out), run_name="run")
    try:
        folder, resume_from = training.prepare_run(s, "sft")
        said = {"resume_from": resume_from and str(Path(resume_from).relative_to(out))}
    except UserError as error:
        said = {"error": str(error)}
    (root / f"rank{rank}.json").write_text(json.dumps(said))


@pytest.mark.parametrize("shared", [True, False])
def test_every_rank_resumes_from_the_same_checkpoint_or_all_stop_in_one_line(shared, tmp_path):
    """Multi-node with --output_dir on each machine's own disk: rank 0 would resume from its checkpoint and rank 1
    start over, and their first collective would wait forever. The ranks compare their decisions: all stop, with
    one line naming the fix. On a shared folder both resume from the same checkpoint."""
    import json

    checkpoint = tmp_path / "out0" / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    training.save_run_config(SFTSettings(model_id="tiny", output_dir=str(tmp_path / "out0"), run_name="run"),
                             checkpoint.parent / training.CONFIG_FILE)
    assert in_two_ranks(_rank_prepares_its_run, tmp_path, tmp_path, shared) == [0, 0]
    said = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    if shared:
        assert said == [{"resume_from": str(Path("run") / "checkpoint-2")}] * 2
    else:
        assert said == [{"error": (
            f"{tmp_path / f'out{rank}' / 'run'} is not the same folder for every process of this launch: rank 0 "
            "sees checkpoint-2 to resume from, rank 1 sees no checkpoint to resume from. Give --output_dir a folder "
            "every machine shares.")} for rank in (0, 1)]


def fake_base(tmp_path):
    """A model folder as the run folder's content checks read it (a config and weights), never loaded."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")
    return base


def test_resume_auto_starts_over_when_another_file_the_settings_name_changed_in_place(tmp_path, monkeypatch):
    """A chat template file, a reward's code or a reward model edited or trained again in place was compared by its
    path: the rerun said "nothing left to train" and handed back the adapter trained under the old one. A LoTA mask
    changed under --resume true is refused (the checkpoints' delta is the old mask's)."""
    base = fake_base(tmp_path)
    template, code, rm = tmp_path / "t.jinja", tmp_path / "my_reward.py", tmp_path / "rm"
    template.write_text("{{ messages }}")
    code.write_text("def reward(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n")
    rm.mkdir()
    (rm / "config.json").write_text("{}")
    (rm / "model.safetensors").write_bytes(b"scores")
    folder = tmp_path / "runs" / "run"
    s = RLSettings(model_id=str(base), output_dir=str(tmp_path / "runs"), run_name="run", chat_template=str(template),
                   reward=["rule", f"python:{code}:reward", f"rm:{rm}"])
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    training.save_run_config(s, folder / training.CONFIG_FILE)
    assert run_folder._changed(folder, s) == []
    template.write_text("{{ messages }} ")
    assert run_folder._changed(folder, s) == ["chat_template content"]
    template.write_text("{{ messages }}")
    code.write_text("def reward(prompts, completions, **kw):\n    return [-1.0 for _ in completions]\n")
    assert run_folder._changed(folder, s) == ["reward content"]
    code.write_text("def reward(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n")
    (rm / "model.safetensors").write_bytes(b"scorez")
    assert run_folder._changed(folder, s) == ["reward content"] and training.prepare_run(s, "rl")[1] is None
    # A module on the path (python:MODULE:FUNCTION) counts by its file too.
    (rm / "model.safetensors").write_bytes(b"scores")
    import sys

    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # (syspath_prepend calls pkg_resources)
    monkeypatch.delitem(sys.modules, "my_reward", raising=False)
    by_module = dataclasses.replace(s, reward=["python:my_reward:reward"])
    training.save_run_config(by_module, folder / training.CONFIG_FILE)
    code.write_text("def reward(prompts, completions, **kw):\n    return [2.0 for _ in completions]\n")
    assert run_folder._changed(folder, by_module) == ["reward content"]
    # A run saved before the record compares these settings by value alone (it does not start over once).
    saved = json.loads((folder / training.CONFIG_FILE).read_text())
    del saved["inputs"][run_folder.NAMED]
    (folder / training.CONFIG_FILE).write_text(json.dumps(saved))
    assert run_folder._changed(folder, by_module) == []
    # A LoTA mask edited in place: --resume true refuses, as it does a changed --lota_mask.
    mask = tmp_path / "lota_mask.safetensors"
    mask.write_bytes(b"mask")
    lota = SFTSettings(model_id=str(base), output_dir=str(tmp_path / "runs"), run_name="run", adapter="lota",
                       lota_mask=str(mask), quantization="none")
    training.save_run_config(lota, folder / training.CONFIG_FILE)
    mask.write_bytes(b"mas2")
    with pytest.raises(UserError, match=r"--resume true: .*checkpoints hold other weights .*lota_mask content"):
        training.prepare_run(dataclasses.replace(lota, resume="true"), "sft")


def test_a_path_spelled_another_way_is_compared_without_checking_the_settings_again(tmp_path, alignkit_log,
                                                                                    monkeypatch):
    """The resume check reads the inputs under the run's own spelling of a path (base for base/) on a copy of the
    settings. dataclasses.replace made that copy by running the settings' checks again, outside the parse: their
    warning came a second time (LoRA's settings under --adapter lota), and the copy lost what the parse keeps beside
    the fields (rl.py's --use_vllm as typed, which its vLLM refusal names)."""
    from alignkit.core.args import parse_config

    base = fake_base(tmp_path)
    folder = tmp_path / "runs" / "run"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    given = dict(output_dir=str(tmp_path / "runs"), run_name="run", adapter="lota", quantization="none", lora_r=32)
    training.save_run_config(SFTSettings(model_id=str(base), **given), folder / training.CONFIG_FILE)
    s = SFTSettings(model_id=f"{base}/", **given)
    alignkit_log.clear()
    assert run_folder._changed(folder, s) == [] and "not applied" not in alignkit_log.text
    # rl.py's settings as its parse makes them, the model typed base/ where the run saved base.
    rl = parse_config(RLSettings, env_file=None, args=["--model_id", f"{base}/", "--reward", "rule", "--use_vllm",
                                                       "--output_dir", str(tmp_path / "runs"), "--run_name", "rl"])
    saved = RLSettings(model_id=str(base), reward=["rule"], backend="vllm", output_dir=rl.output_dir, run_name="rl")
    training.save_run_config(saved, tmp_path / "runs" / "rl" / training.CONFIG_FILE)
    read, real = [], run_folder.run_inputs
    monkeypatch.setattr(run_folder, "run_inputs", lambda s, folder=None: read.append(s) or real(s, folder))
    assert run_folder._changed(tmp_path / "runs" / "rl", rl) == [] and read[-1].model_id == str(base)
    assert launch.vllm_refused(read[-1], "no CUDA GPU").startswith("--use_vllm true: no CUDA GPU")


def test_resume_auto_starts_over_when_the_model_or_data_it_names_changed_in_place(tmp_path, alignkit_log):
    """`--resume auto` compares what the settings name by path by content: a base retrained in place or a data file
    edited since the checkpoint is another run (it would otherwise continue an adapter trained on the old ones). A
    run folder saved before alignkit recorded its inputs compares by settings alone."""
    import json

    base = fake_base(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    s = SFTSettings(model_id=str(base), dataset_id=str(data), output_dir=str(tmp_path / "runs"), run_name="run")
    folder = tmp_path / "runs" / "run"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    training.save_run_config(s, folder / training.CONFIG_FILE)
    assert training.prepare_run(s, "sft")[1] == str(folder / "checkpoint-2")
    data.write_text('{"prompt": "a", "chosen": "B", "rejected": "c"}\n')
    assert run_folder._changed(folder, s) == ["data files"] and training.prepare_run(s, "sft")[1] is None
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (base / "model.safetensors").write_bytes(b"weighs2")
    assert run_folder._changed(folder, s) == ["model files"]
    (base / "model.safetensors").write_bytes(b"weights")
    # The same folder and file spelled another way (./x/, x/./y) are the same inputs: the same command, typed
    # differently, resumes (it moved the run aside and started over). Another file with the same rows is not.
    respelled = dataclasses.replace(s, model_id=f"{base}/", dataset_id=str(tmp_path / "." / "pairs.jsonl"))
    assert run_folder._changed(folder, respelled) == [] and training.prepare_run(respelled, "sft")[1] is not None
    copy = tmp_path / "copy.jsonl"
    copy.write_text(data.read_text())
    assert run_folder._changed(folder, dataclasses.replace(s, dataset_id=str(copy))) == ["data files", "dataset_id"]
    # Trained where `auto` loaded the base in 4-bit (a GPU), resumed where it loads it in full precision (this CPU):
    # the checkpoints' adapter would go on over another base.
    saved = json.loads((folder / training.CONFIG_FILE).read_text())
    (folder / training.CONFIG_FILE).write_text(json.dumps({**saved, "loaded_as": {"quantization": "4bit"}}))
    assert run_folder._changed(folder, s) == ["quantization as loaded"] and training.prepare_run(s, "sft")[1] is None
    (folder / training.CONFIG_FILE).write_text(json.dumps({**saved, "loaded_as": {"quantization": "none"}}))
    assert run_folder._changed(folder, s) == []
    # A setting added since the run was saved (absent from its file), left at its default: the same command.
    older = {k: v for k, v in saved.items() if k != "learning_rate"}
    (folder / training.CONFIG_FILE).write_text(json.dumps(older))
    assert run_folder._changed(folder, s) == []
    assert run_folder._changed(folder, dataclasses.replace(s, learning_rate=0.5)) == ["learning_rate"]
    (folder / training.CONFIG_FILE).write_text(json.dumps(saved))
    assert run_folder._changed(folder, dataclasses.replace(s, num_threads="2")) == []  # speed, not results
    # A settings file cut short (a full disk, a copy stopped halfway): another run, not a traceback.
    (folder / training.CONFIG_FILE).write_text(json.dumps(saved)[:100])
    assert run_folder._changed(folder, s) == ["alignkit_config.json unreadable"]
    assert training.prepare_run(s, "sft")[1] is None
    (folder / training.CONFIG_FILE).write_text(json.dumps(saved))
    # A later checkpoint whose weights were cut short: skipped (it failed every rerun with a traceback).
    import torch
    from safetensors.torch import save_file

    later = folder / "checkpoint-3"
    later.mkdir()
    (later / "trainer_state.json").write_text("{}")
    save_file({"w": torch.zeros(64, 64)}, later / "adapter_model.safetensors")
    assert training.prepare_run(s, "sft")[1] == str(later)
    data = (later / "adapter_model.safetensors").read_bytes()
    (later / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert training.prepare_run(s, "sft")[1] == str(folder / "checkpoint-2")
    assert f"{later / 'adapter_model.safetensors'} is damaged" in alignkit_log.text
    # Its trainer_state.json cut short, or not written yet (killed while it saved): skipped in one line too.
    (later / "adapter_model.safetensors").write_bytes(data)
    (later / "trainer_state.json").write_text('{"global_st')
    alignkit_log.clear()
    assert training.prepare_run(s, "sft")[1] == str(folder / "checkpoint-2")
    assert f"{later} has a damaged trainer_state.json" in alignkit_log.text
    (later / "trainer_state.json").unlink()
    alignkit_log.clear()
    assert training.prepare_run(s, "sft")[1] == str(folder / "checkpoint-2")
    assert f"{later} has no trainer_state.json" in alignkit_log.text
    (base / "model.safetensors").write_bytes(b"weighs2")
    saved = json.loads((folder / training.CONFIG_FILE).read_text())
    del saved["inputs"]
    (folder / training.CONFIG_FILE).write_text(json.dumps(saved))
    assert run_folder._changed(folder, s) == []


def test_a_run_is_refused_inside_another_trained_run_s_folder_and_one_nested_before_still_resumes(tmp_path):
    """`dpo.py --config recipe.yaml --run_name ov`, the recipe's output_dir holding a trained run, put the new run
    inside it (output_dir/ov, beside its adapter and checkpoints): a push or merge of that run carried it (the dpo.py
    audit of session 33). Refused in one line, before the model loads, with the alternatives; a run nested there
    before still reruns and resumes, and the trained run itself reruns as before."""
    base = fake_base(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    trained = tmp_path / "runs" / "hb"
    (trained / "checkpoint-2").mkdir(parents=True)
    (trained / "checkpoint-2" / "trainer_state.json").write_text("{}")
    s = SFTSettings(model_id=str(base), dataset_id=str(data), output_dir=str(trained), run_name="ov")
    with pytest.raises(UserError, match=rf"^--output_dir {re.escape(str(trained))} holds a trained run \(checkpoint-2\), "
                                        r"and this run would go inside it .*: pass another --output_dir \(e\.g\. "
                                        rf"{re.escape(str(tmp_path / 'runs'))}, beside it\), or leave --run_name out"):
        training.prepare_run(s, "sft")
    (trained / "adapter_model.safetensors").write_bytes(b"adapter")
    with pytest.raises(UserError, match=r"holds a trained run \(adapter_model\.safetensors\)"):
        training.prepare_run(dataclasses.replace(s, run_name=None), "sft")  # the default name nests alike
    assert not (trained / "ov").exists()
    # A run nested there before this refusal: its same command resumes it.
    nested = trained / "ov"
    (nested / "checkpoint-1").mkdir(parents=True)
    (nested / "checkpoint-1" / "trainer_state.json").write_text("{}")
    training.save_run_config(s, nested / training.CONFIG_FILE)
    assert training.prepare_run(s, "sft")[1] == str(nested / "checkpoint-1")
    outer = dataclasses.replace(s, output_dir=str(tmp_path / "runs"), run_name="hb")
    training.save_run_config(outer, trained / training.CONFIG_FILE)
    assert training.prepare_run(outer, "sft")[1] == str(trained / "checkpoint-2")


def test_resume_auto_starts_over_when_the_same_files_and_settings_became_other_rows(tmp_path):
    """The files and settings a run names say nothing of the rows they became: a Hub dataset's new commit, or a
    file an upgraded alignkit reads into other rows (s12's standard rows as text, s14's tool calls kept), resumed a
    checkpoint trained on the old rows. prepare_run records the rows' digest; other rows start over, the same rows
    stored another way (a selection, a concatenation) resume."""
    import json

    from datasets import Dataset, concatenate_datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(1500)]
    train, held_out = Dataset.from_list(rows[:1400]), Dataset.from_list(rows[1400:])
    s = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path / "runs"), run_name="run")
    folder = tmp_path / "runs" / "run"
    assert training.prepare_run(s, "sft", train, held_out) == (folder, None)
    with run_folder.start_run(s, folder, None):  # records the settings, the inputs and the rows, as a run does
        (folder / "checkpoint-2").mkdir()
        (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    same = concatenate_datasets([Dataset.from_list(rows[:700]), Dataset.from_list(rows[700:1500])])
    assert training.prepare_run(s, "sft", same.select(range(1400)), held_out)[1] == str(folder / "checkpoint-2")
    # The same rows in Arrow's large types (a file polars or pandas wrote): they resume too (they started over).
    import pyarrow as pa

    fields = train.data.table.schema.field("messages").type.value_type  # role, content: as read
    large = pa.large_list(pa.struct([(f.name, pa.large_string()) for f in fields]))
    as_large = Dataset(train.data.table.cast(pa.schema([("messages", large)])))
    assert as_large.features != train.features
    assert training.prepare_run(s, "sft", as_large, held_out)[1] == str(folder / "checkpoint-2")
    # The same rows, a message read differently (as a newer reader might): another run.
    other = rows[:1400]
    other[5] = {"messages": [{"role": "user", "content": "q5"}, {"role": "assistant", "content": "a5 "}]}
    assert training.prepare_run(s, "sft", Dataset.from_list(other), held_out)[1] is None
    assert run_folder._changed(folder, s) == ["data rows"]
    assert training.prepare_run(s, "sft", train, None)[1] is None  # the held-out rows are rows of the run too
    assert training.prepare_run(s, "sft", train, held_out)[1] == str(folder / "checkpoint-2")
    # The rows' format is recorded beside them (a reward model's checkpoint is scored as it trained).
    assert json.loads((folder / training.CONFIG_FILE).read_text())["data_rows"] == "conversations"
    # A later call without rows (a notebook's) does not reuse the earlier call's.
    assert training.prepare_run(s, "sft", Dataset.from_list(other), held_out)[1] is None
    training.prepare_run(s, "sft")
    assert "data rows" not in run_folder.run_inputs(s, folder)


def _rank_reads_its_rows(rank, root, same):
    import json

    from datasets import Dataset

    s = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(root / "runs"), run_name="run")
    rows = Dataset.from_list([{"text": "the same row" if same or rank == 0 else "a newer row"}])
    try:
        said = {"resume_from": training.prepare_run(s, "sft", rows, None)[1]}
    except UserError as error:
        said = {"error": str(error)}
    (root / f"rank{rank}.json").write_text(json.dumps(said))


@pytest.mark.parametrize("same", [True, False])
def test_every_rank_reads_the_same_rows_or_all_stop_in_one_line(same, tmp_path):
    """Two machines reading a Hub dataset cached at other commits: each rank would train on its own rows under one
    run. The ranks compare their rows' digests before anything else: all stop with one line, or go on together."""
    import json

    assert in_two_ranks(_rank_reads_its_rows, tmp_path, tmp_path, same) == [0, 0]
    said = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    if same:
        assert said == [{"resume_from": None}] * 2
    else:
        assert all(s["error"].startswith("the processes of this launch read other rows from the same data settings: "
                                         "rank 0 and rank 1 differ") for s in said)


def test_zero3_named_in_a_deepspeed_json_is_zero3(monkeypatch, tmp_path):
    """An accelerate config that names a DeepSpeed JSON (deepspeed_config_file) leaves
    ACCELERATE_DEEPSPEED_ZERO_STAGE unset: the launch was taken for ZeRO-2, so no ZeRO-3 refusal (LoTA, 8-bit) ran
    and the model was not built partitioned."""
    launched(monkeypatch, "zero2")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config = tmp_path / "ds3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert (launch.launch_mode(), launch.sharded_launch()) == ("ZeRO-3", launch.ZERO3)
    assert "ZeRO-3" in launch.refusal(SFTSettings(adapter="lota"), "sft.py")
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert (launch.launch_mode(), launch.sharded_launch()) == ("ZeRO-2", None)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "missing.json"))  # DeepSpeed names it
    assert launch.launch_mode() == "ZeRO-2"


def test_under_a_launch_info_lines_come_from_the_main_process_only(monkeypatch, alignkit_log):
    """Every decision line was printed once per process (8 copies on 8 GPUs); warnings and what each process did
    itself still come from each."""
    from alignkit import logger

    monkeypatch.setenv("RANK", "1")
    logger.info("a decision")
    logger.warning("a warning")
    logger.info("this process's own", extra={"every_rank": True})
    monkeypatch.setenv("RANK", "0")
    logger.info("from the main process")
    assert alignkit_log.messages == ["a warning", "this process's own", "from the main process"]


def test_a_second_training_of_one_run_folder_is_refused_in_one_line(tmp_path):
    """Two dpo.py runs of one folder both trained: the second resumed from the first's checkpoints, or moved the live
    run aside while it went on writing into the new folder. The run holds a lock beside its folder from
    prepare_run until its training ends; a second process is refused in one line, and after the end it may start."""
    import subprocess
    import sys

    s = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path / "runs"), run_name="run")
    second = ("import sys; from alignkit.core.config import SFTSettings; from alignkit.train import training\n"
              f"s = SFTSettings(model_id='tiny', dataset_id='org/chats', output_dir={str(tmp_path / 'runs')!r}, "
              "run_name='run')\n"
              "try:\n    training.prepare_run(s, 'sft')\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    folder, _ = training.prepare_run(s, "sft")
    with run_folder.start_run(s, folder, None):
        done = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 3, done.stderr[-2000:]
        holder = rf"\(process {os.getpid()}, {re.escape(Path(sys.argv[0]).name)}, since \d\d:\d\d\)"
        assert re.fullmatch(rf"{re.escape(str(folder))} is in use by another training run {holder}; let it finish "
                            r"first, or pass another --run_name", done.stdout.strip()), done.stdout
    done = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]  # the training ended: the folder is free


def _rank_converts(rank, path, folder):
    """Rank 1 alone converts (it took the build lock); rank 0 waits at a barrier, as under a launch."""
    import torch.distributed as dist
    import transformers

    from alignkit.modeling import gguf

    if rank == 1:  # the tiny preset's model and tokenizer stand in for a GGUF file's (transformers' reader)
        torch.set_num_threads(1)
        model_folder = presets.paths()["model"]
        load_model, load_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained
        transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: load_model(model_folder)
        transformers.AutoTokenizer.from_pretrained = lambda *a, **k: load_tokenizer(model_folder)
        work = folder / "work"
        work.mkdir()
        try:
            gguf._convert_into(path, "llama", work)
        except Exception as error:  # the old code wrote no model here; the new one says so if it ever does not
            (folder / "error.txt").write_text(str(error))
    dist.barrier()


def test_a_gguf_file_converted_by_a_rank_other_than_0_is_written_whole(tiny_cache, tmp_path):
    """Under a launch the GGUF conversion is built by whichever process takes the lock (one per machine), but
    transformers writes a model only on global rank 0 once the process group is up: rank 1's build wrote the
    tokenizer and the done file alone, and every later run failed on the folder ('Unrecognized model'). A converted
    folder without its config or weights is built again."""
    from alignkit.modeling import gguf

    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    assert in_two_ranks(_rank_converts, tmp_path, file, tmp_path, start="spawn") == [0, 0]
    assert not (tmp_path / "error.txt").exists()
    assert (tmp_path / "work" / "config.json").is_file() and (tmp_path / "work" / "model.safetensors").is_file()
    assert not gguf._whole(tmp_path) and gguf._whole(tmp_path / "work")  # a tokenizer and done file alone: rebuilt


def test_resume_true_over_changed_settings_refuses_other_weights_and_records_the_rest(tmp_path, alignkit_log):
    """--resume true resumed over any change without a word: a changed --lora_r loaded the checkpoint into an
    adapter of another shape (a traceback, after the finished run's record had been rewritten and it was marked
    failed), and a changed --num_generations trained the later steps with other settings than the first ones while
    alignkit_config.json recorded the new ones for the whole run."""
    import json

    s = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="run")
    folder = tmp_path / "run"
    training.prepare_run(s, "sft")
    with run_folder.start_run(s, folder, None):
        (folder / "checkpoint-2").mkdir()
        (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    record = (folder / training.CONFIG_FILE).read_text()
    other_shape = dataclasses.replace(s, lora_r=4, resume="true")
    with pytest.raises(UserError, match=rf"^--resume true: {re.escape(str(folder))}'s checkpoints hold other "
                                          r"weights than these settings make \(lora_r 16 -> 4\)\. Resume with the "
                                          r"run's own values, or --resume false to start over$"):
        training.prepare_run(other_shape, "sft")
    assert (folder / training.CONFIG_FILE).read_text() == record and not (folder / run_folder.FAILED_FILE).exists()
    slower = dataclasses.replace(s, learning_rate=1e-5, resume="true")
    assert training.prepare_run(slower, "sft") == (folder, str(folder / "checkpoint-2"))
    assert "--resume true over changed settings (learning_rate): the steps to checkpoint-2 trained with the " \
           "run's earlier values, the later ones with these" in alignkit_log.text
    with run_folder.start_run(slower, folder, str(folder / "checkpoint-2")):
        pass
    saved = json.loads((folder / training.CONFIG_FILE).read_text())
    assert saved["learning_rate"] == 1e-5
    assert saved["resumed_over"] == [{"step": 2, "changed": {"learning_rate": [s.learning_rate, 1e-5]},
                                      "inputs": []}]
    # Resumed again with the same settings: the record of the change stays.
    again = dataclasses.replace(slower, resume="auto")
    assert training.prepare_run(again, "sft")[1] == str(folder / "checkpoint-2")
    with run_folder.start_run(again, folder, str(folder / "checkpoint-2")):
        pass
    assert json.loads((folder / training.CONFIG_FILE).read_text())["resumed_over"] == saved["resumed_over"]
    # A record cut short (or gone): what changed cannot be told, and --resume true resumes as asked (it crashed).
    record = (folder / training.CONFIG_FILE).read_text()
    for damaged in (record[:20], None, "[]"):
        if damaged is None:
            (folder / training.CONFIG_FILE).unlink()
        else:
            (folder / training.CONFIG_FILE).write_text(damaged)
        assert training.prepare_run(slower, "sft")[1] == str(folder / "checkpoint-2")
        assert "is missing or unreadable, so what changed since its checkpoints cannot be told" in alignkit_log.text
    (folder / training.CONFIG_FILE).write_text(record)
    # Under auto a change starts over; where --resume true could have gone on, the line says so.
    longer = dataclasses.replace(again, max_steps=50)
    assert training.prepare_run(longer, "sft")[1] is None
    with run_folder.start_run(longer, folder, None):
        pass
    assert "(--resume true would have gone on from its last checkpoint with these settings)" in alignkit_log.text


def test_an_fsdp_launch_without_cuda_says_it_trains_as_ddp(monkeypatch, alignkit_log):
    """accelerate turns FSDP on for GPU launches only: `accelerate launch --use_fsdp` on a CPU logged "launch: FSDP"
    and trained as DDP (checkpoints of whole adapters) without a word."""
    monkeypatch.setattr(launch, "_start_process_group", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU (a GPU machine runs it too)
    launched(monkeypatch, "fsdp", rank=0)
    assert launch.establish_launch(SFTSettings(), "sft.py").mode == "FSDP"
    assert "FSDP on a machine without CUDA: accelerate shards on GPUs only, so this launch trains as DDP" in \
        alignkit_log.text
    alignkit_log.clear()
    fake_gpus(monkeypatch, gpu="A100")
    launched(monkeypatch, "fsdp", rank=0)
    launch.establish_launch(SFTSettings(), "sft.py")
    assert "trains as DDP" not in alignkit_log.text


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "kto.py", "reward.py", "rl.py"])
def test_each_training_script_refuses_before_its_data_or_model_loads(script, tiny_cache, monkeypatch, tmp_path):
    """The refusals above are launch.refusal's; that they come before anything loads rests on each script calling
    establish_launch first. Each script, run under an FSDP launch with --quantization 8bit, refuses in its one line
    with the process group, the data and the model untouched."""
    from alignkit.modeling import models

    def loaded(*args, **kwargs):
        pytest.fail(f"{script} loaded before it refused")

    launched(monkeypatch, "fsdp")
    monkeypatch.setattr(launch, "_start_process_group", loaded)
    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr("alignkit.core.mixture.load_train_eval", loaded)
    with pytest.raises(UserError, match=r"^--quantization 8bit cannot be sharded by FSDP: bitsandbytes supports "
                                        r"that for 4-bit only"):
        run_script(script, "--preset", "tiny", "--quantization", "8bit", "--output_dir", str(tmp_path))


def test_a_rank_stops_when_its_launcher_is_killed_hard(tmp_path, monkeypatch):
    """A launcher killed with SIGKILL (a scheduler's hard kill) left both ranks training on unattended, holding the
    run folder's lock (found by a launch audit): each rank arms alignkit.core.parent_death as its launch starts."""
    import subprocess
    import sys

    from alignkit.core import launch

    armed = []
    monkeypatch.setattr("alignkit.core.parent_death.stop_with_parent", armed.append)
    monkeypatch.setattr(launch, "_start_process_group", lambda: None)
    monkeypatch.setattr(launch, "report_on_rank", lambda hook, rank: None)
    monkeypatch.setattr(launch, "_quiet_other_ranks", lambda rank: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch.establish_launch()
    assert armed == []  # a launcher alignkit does not know may start ranks from a thread that ends early
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's (accelerate launch's) agent started this rank
    launch.establish_launch()
    assert armed == [os.getppid()]
    # The helper itself, in a real child of a parent killed with SIGKILL: the child gets SIGTERM.
    pid_file = tmp_path / "child.pid"
    child = (f"import os, pathlib, time\nfrom alignkit.core.parent_death import stop_with_parent\n"
             f"stop_with_parent(os.getppid())\npathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
             "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)\n"])
    from conftest import outlives_its_parent

    assert not outlives_its_parent(parent, pid_file), "the child trained on after its parent was killed"


def test_the_final_evaluation_is_the_one_the_schedule_made_at_the_last_step():
    """An eval_strategy landing on the last step (epoch over one epoch, eval_steps dividing max_steps) logged its
    figures, then finish_training evaluated the whole held-out set again (the README audit of session 32). Under
    load_best_model_at_end the model is another step's: evaluated anew; a schedule that did not end on an
    evaluation too."""
    asked = []
    log = [{"step": 2, "loss": 0.7}, {"step": 4, "loss": 0.6}, {"step": 4, "eval_loss": 0.5, "eval_runtime": 1.0},
           {"step": 4, "train_loss": 0.65, "train_runtime": 3.0}]
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=4, log_history=log),
                              args=SimpleNamespace(load_best_model_at_end=False),
                              evaluate=lambda: asked.append(1) or {"eval_loss": 0.4})
    assert training.final_evaluation(trainer) == {"eval_loss": 0.5, "eval_runtime": 1.0} and not asked
    trainer.args.load_best_model_at_end = True
    assert training.final_evaluation(trainer) == {"eval_loss": 0.4} and asked == [1]
    trainer.args.load_best_model_at_end = False
    trainer.state.log_history = [{"step": 2, "eval_loss": 0.5}, {"step": 4, "train_loss": 0.65}]
    assert training.final_evaluation(trainer) == {"eval_loss": 0.4} and asked == [1, 1]


def test_a_mixture_run_saved_with_a_recipe_s_split_still_resumes(tmp_path):
    """A recipe's dataset_config (or dataset_test_split) under a --dataset_mixture on the command line was saved by
    runs made before it went with the recipe's dataset_id; compared as a setting, it made such a run start over
    (the review of session 33). Under a mixture on both sides nothing reads them: the rows decide."""
    import dataclasses
    import json

    from alignkit.core.config import DPOSettings

    base = fake_base(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    folder = tmp_path / "runs" / "run"
    s = DPOSettings(model_id=str(base), output_dir=str(tmp_path / "runs"), run_name="run",
                    dataset_mixture={"datasets": [{"id": str(pairs)}]})
    (folder / "checkpoint-2").mkdir(parents=True)
    training.save_run_config(s, folder / training.CONFIG_FILE)
    saved = json.loads((folder / training.CONFIG_FILE).read_text())
    (folder / training.CONFIG_FILE).write_text(json.dumps({**saved, "dataset_config": "en",
                                                           "dataset_test_split": "test"}))
    assert run_folder._changed(folder, s) == []
    # Without a mixture they are what the run read.
    single = dataclasses.replace(s, dataset_mixture=None, dataset_id=str(pairs))
    (folder / training.CONFIG_FILE).write_text(json.dumps({**saved, "dataset_mixture": None, "dataset_id": str(pairs),
                                                           "dataset_config": "en"}))
    assert run_folder._changed(folder, single) == ["dataset_config"]
