"""The GPU paths, proven on a CPU: the device is simulated (CUDA present, its count, compute capability, native
bf16, flash-attn installed, WORLD_SIZE/LOCAL_RANK, an accelerate launch's DeepSpeed or FSDP environment), and
each test checks the decision alignkit takes there. Where the CPU can run the real thing (FSDP's flattening over
gloo, bitsandbytes 4-bit training), it does. bench/gpu_smoke.py runs the same paths on a real GPU.
"""

from __future__ import annotations

import re
import functools
import importlib.util
import json
import sys
import types
import unittest.mock
from pathlib import Path

import pytest
import torch

from alignkit.core import kernels, launch, threads
from alignkit.core.config import DPOSettings, ModelSettings, SFTSettings
from alignkit.modeling import models, presets
from alignkit.train import flex_check, training

from conftest import run_script, static_flex_shapes

GPUS = {"T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "H100": (9, 0)}




def fake_gpus(monkeypatch, count: int = 1, gpu: str = "A100", flash_attn: bool = False, flex_kernel: bool = True):
    """torch as it looks on a machine with `count` GPUs of one kind (no CUDA call reaches the real torch).

    The FlexAttention check `auto` makes before it picks flex_attention (alignkit.train.flex_check) runs for real,
    on the CPU: its forward only where this GPU's kernel works (`flex_kernel`), else with its backward, which a
    CPU lacks, standing for a GPU whose kernel does not compile."""
    capability = GPUS[gpu]
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: count)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: capability)
    # torch/cuda/__init__.py: native bf16 from capability 8.0; with emulation (the default) any GPU "has" it.
    monkeypatch.setattr(cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (types.SimpleNamespace(name=name) if flash_attn else None)
                        if name == "flash_attn" else real(name, *a))
    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(flex_check, "check", functools.partial(_flex_check_on_the_cpu, backward=not flex_kernel))


_real_flex_check, _real_cuda = flex_check.check, torch.cuda.is_available


def _flex_check_on_the_cpu(config, dtype, device, backward):
    assert device == f"cuda:{launch.local_gpu()}"  # the check runs on this process's GPU
    # torch.compile saves the CUDA RNG state where CUDA looks available: the real torch answers while it compiles.
    with static_flex_shapes(), unittest.mock.patch.object(torch.cuda, "is_available", _real_cuda):
        return _real_flex_check(config, dtype, device="cpu", backward=backward)


class Loaded(Exception):
    """Raised by a stand-in from_pretrained: the test only wants the arguments the loader chose."""


@pytest.fixture
def load_kwargs(monkeypatch, tiny_cache):
    """Call load_model and get the from_pretrained kwargs it built, without loading anything onto a fake GPU."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def from_pretrained(source, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        seen.update(kwargs, source=source, zero3_at_load=is_deepspeed_zero3_enabled())
        raise Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)

    def call(settings, **kw):
        seen.clear()
        with pytest.raises(Loaded):
            models.load_model(settings, **kw)
        return dict(seen)

    return call


# ---------------------------------------------------------------------------------------------------------
# 1. Several GPUs visible to one process


def test_several_gpus_in_one_plain_process_train_on_one_and_say_how_to_use_all(monkeypatch, alignkit_log, tmp_path):
    from trl import DPOConfig

    fake_gpus(monkeypatch, count=8)
    monkeypatch.setattr(sys, "argv", ["dpo.py", "--dpo_beta", "0.1", "--run_name", "my run"])
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    # The problem, reproduced: transformers gives one process all 8 GPUs (n_gpu 8), which TRL refuses
    # ("does not support nn.DataParallel", trl/trainer/dpo_trainer.py) right after Trainer.__init__.
    assert DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=True).n_gpu == 8
    s = DPOSettings(report_to="none", per_device_train_batch_size=2)
    args = training.trl_config(DPOConfig, s, tmp_path, torch.bfloat16, beta=0.1)
    assert args.n_gpu == 1 and args.train_batch_size == 2  # one GPU: no DataParallel, no 8x batch
    assert ("To train on all 8: accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 8 "
            "dpo.py --dpo_beta 0.1 --run_name 'my run'") in alignkit_log.text
    # One visible GPU: nothing to say.
    fake_gpus(monkeypatch, count=1)
    alignkit_log.clear()
    assert training.trl_config(DPOConfig, s, tmp_path, torch.bfloat16).n_gpu == 1
    assert "accelerate launch" not in alignkit_log.text


def test_without_cuda_the_cpu_trains_where_torch_also_finds_apple_mps(monkeypatch, alignkit_log, tmp_path):
    """On a Mac, alignkit loads on the CPU and decides fp32, sdpa, threads and memory for it; the Trainer must not
    then move the model to MPS, where none of those decisions was made."""
    import transformers.training_args
    from trl import DPOConfig

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_mps_available", lambda *a, **k: True)
    # The problem, reproduced: left to itself, transformers trains on MPS where torch finds it.
    assert DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False).device.type == "mps"
    s = DPOSettings(report_to="none")
    launch.establish_launch(s, "dpo.py")
    assert "device: cpu (Apple MPS found: alignkit runs on CUDA GPUs or the CPU" in alignkit_log.text
    assert training.trl_config(DPOConfig, s, tmp_path, torch.float32).device.type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    assert launch.other_accelerator() == "Intel XPU"
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    assert launch.other_accelerator() is None


# ---------------------------------------------------------------------------------------------------------
# 2. and 3. dtype and attention from the GPU's compute capability


@pytest.mark.parametrize("gpu, dtype", [("T4", torch.float16), ("V100", torch.float16), ("A100", torch.bfloat16),
                                        ("H100", torch.bfloat16)])
def test_fp16_on_gpus_without_native_bf16(gpu, dtype, monkeypatch, alignkit_log):
    fake_gpus(monkeypatch, gpu=gpu)
    assert torch.cuda.is_bf16_supported()  # the trap: with emulation counted, every GPU says yes
    assert launch.resolve_dtype("auto") == dtype
    assert ("no native bf16" in alignkit_log.text) == (dtype == torch.float16)


@pytest.mark.parametrize("gpu, dtype, installed, expected, why", [
    ("A100", torch.bfloat16, True, "flash_attention_2", "half precision"),
    ("H100", torch.float16, True, "flash_attention_2", "half precision"),
    ("T4", torch.float16, True, "sdpa", "compute capability >= 8.0"),
    ("A100", torch.float32, True, "sdpa", "needs bf16/fp16"),
    ("A100", torch.bfloat16, False, "sdpa", "pip install flash-attn --no-build-isolation"),
])
def test_flash_attention_only_where_its_kernels_run(gpu, dtype, installed, expected, why, monkeypatch, alignkit_log):
    fake_gpus(monkeypatch, gpu=gpu, flash_attn=installed)
    assert kernels.resolve_attention("auto", dtype) == expected
    assert f"attention: {expected}" in alignkit_log.text and why in alignkit_log.text


def test_asking_for_flash_attention_where_it_would_crash_is_refused(monkeypatch):
    fake_gpus(monkeypatch, gpu="A100", flash_attn=True)
    with pytest.raises(ValueError, match="needs --dtype bf16 or fp16"):
        kernels.resolve_attention("flash_attention_2", torch.float32)
    fake_gpus(monkeypatch, gpu="T4", flash_attn=True)
    with pytest.raises(ValueError, match=r"compute capability >= 8.0 \(this one: \(7, 5\)\)"):
        kernels.resolve_attention("flash_attention_2", torch.float16)
    assert kernels.resolve_attention("sdpa", torch.float32) == "sdpa"


def test_the_loader_passes_the_attention_its_dtype_allows(monkeypatch, load_kwargs):
    fake_gpus(monkeypatch, gpu="T4", flash_attn=True)
    kwargs = load_kwargs(ModelSettings(model_id=presets.paths()["model"]))
    assert kwargs["dtype"] == torch.float16 and kwargs["attn_implementation"] == "sdpa"
    fake_gpus(monkeypatch, gpu="A100", flash_attn=True)
    kwargs = load_kwargs(ModelSettings(model_id=presets.paths()["model"], dtype="fp32"))
    assert kwargs["attn_implementation"] == "sdpa"
    kwargs = load_kwargs(ModelSettings(model_id=presets.paths()["model"]))
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["attn_implementation"] == "flash_attention_2"


def _moe_folder(folder: Path) -> str:
    """A tiny Mixtral's config.json (all the loader reads before from_pretrained; a stand-in weights file for the
    folder check): a model flex_attention runs, on which prefix sharing is off (its load-balancing loss)."""
    from transformers import MixtralConfig

    MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64, architectures=["MixtralForCausalLM"]).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    return str(folder)


def test_auto_loads_flex_attention_for_dpo_with_prefix_sharing_only(monkeypatch, load_kwargs, alignkit_log, tmp_path):
    """dpo.py with prefix sharing on an Ampere GPU with flash-attn installed: flex_attention (sharing on a kernel
    that skips masked blocks) instead of flash_attention_2 (sharing off), logged with its reason. Every other run
    keeps flash_attention_2, and an explicit choice is kept."""
    from alignkit.core.config import KTOSettings, RewardSettings, RLSettings, SFTSettings

    tiny = presets.paths()["model"]

    def attention(settings, training=True):
        return load_kwargs(settings, for_training=training)["attn_implementation"]

    assert attention(DPOSettings(model_id=tiny)) == "sdpa"  # no CUDA: as before (flex has no backward on a CPU)
    fake_gpus(monkeypatch, gpu="A100", flash_attn=True)
    alignkit_log.clear()
    assert attention(DPOSettings(model_id=tiny)) == "flex_attention"
    lines = [r.getMessage() for r in alignkit_log.records if r.getMessage().startswith("attention:")]
    assert len(lines) == 1 and "DPO with prefix sharing" in lines[0] and "bench/gpu_dpo.py" in lines[0]
    assert "its kernel passed a forward check on this device (head size 16, 4 query / 4 key-value heads, bfloat16" \
        in lines[0]
    assert attention(DPOSettings(model_id=tiny, prefix_sharing=False)) == "flash_attention_2"
    assert attention(DPOSettings(model_id=tiny), training=False) == "flash_attention_2"  # generation, evaluation
    for other in (SFTSettings, KTOSettings, RewardSettings, RLSettings):
        rewarded = {"reward": ["rule"]} if other is RLSettings else {}
        assert not kernels.packs_pairs(other(model_id=tiny, **rewarded), True)  # sft/kto/reward/rl: the plain choice
    assert attention(SFTSettings(model_id=tiny)) == "flash_attention_2"
    for explicit in ("flash_attention_2", "sdpa"):  # the override: what bench/gpu_dpo.py compares it with
        assert attention(DPOSettings(model_id=tiny, attn_implementation=explicit)) == explicit
    alignkit_log.clear()
    assert attention(DPOSettings(model_id=_moe_folder(tmp_path / "moe"), lora_dropout=0.0)) == "flash_attention_2"
    assert "not flex_attention for prefix sharing: prefix sharing is off on it anyway (a mixture-of-experts" in \
        alignkit_log.text
    fake_gpus(monkeypatch, gpu="A100", flash_attn=False)
    assert attention(DPOSettings(model_id=tiny)) == "flex_attention"
    assert attention(DPOSettings(model_id=tiny, prefix_sharing=False)) == "sdpa"
    fake_gpus(monkeypatch, gpu="T4", flash_attn=True)  # flex is tried on compute capability >= 8.0 only
    assert attention(DPOSettings(model_id=tiny)) == "sdpa"


def test_auto_keeps_the_plain_choice_where_the_flex_kernel_fails_on_this_gpu(monkeypatch, load_kwargs, alignkit_log):
    """A GPU whose FlexAttention kernel does not build for this model (its backward past the GPU's shared memory at
    a large head size, say): auto loads what it would without FlexAttention, and its one line says why. The
    prefix sharing of the run goes on, on sdpa's mask where flash-attn is not installed."""
    tiny = presets.paths()["model"]
    for flash_attn, plain in ((True, "flash_attention_2"), (False, "sdpa")):
        fake_gpus(monkeypatch, gpu="H100", flash_attn=flash_attn, flex_kernel=False)
        alignkit_log.clear()
        assert load_kwargs(DPOSettings(model_id=tiny), for_training=True)["attn_implementation"] == plain
        lines = [r.getMessage() for r in alignkit_log.records if r.getMessage().startswith("attention:")]
        assert len(lines) == 1 and lines[0].startswith(f"attention: {plain} (")
        assert "; not flex_attention for prefix sharing: FlexAttention failed its check (head size 16, 4 query / " \
               "4 key-value heads, bfloat16): NotImplementedError: FlexAttention does not support backward" in lines[0]
    # Under a launch every process loads the same attention: where another process's GPU failed the check, this
    # one keeps its plain choice too. Every process takes part in that agreement, whatever its own answer (else
    # the ones that ask would wait for the others forever).
    agreements = []
    monkeypatch.setattr(launch, "agreed_minimum", lambda value: agreements.append(value) or 0)
    for gpu, flex_kernel in (("H100", True), ("H100", False), ("T4", True)):
        fake_gpus(monkeypatch, gpu=gpu, flash_attn=True, flex_kernel=flex_kernel)
        alignkit_log.clear()
        assert load_kwargs(DPOSettings(model_id=tiny), for_training=True)["attn_implementation"] != "flex_attention"
    assert agreements == [1, 0, 0]
    assert "its kernel passed a forward check on this device" not in alignkit_log.text  # the T4's line
    fake_gpus(monkeypatch, gpu="H100", flash_attn=True)
    alignkit_log.clear()
    assert load_kwargs(DPOSettings(model_id=tiny), for_training=True)["attn_implementation"] == "flash_attention_2"
    assert "but not on every process of this launch (they all load the same attention)" in alignkit_log.text
    fake_gpus(monkeypatch, gpu="H100", flex_kernel=False)  # asked for by name: no check, the user's choice
    assert load_kwargs(DPOSettings(model_id=tiny, attn_implementation="flex_attention"),
                       for_training=True)["attn_implementation"] == "flex_attention"


def test_the_model_config_is_read_only_where_auto_weighs_flex(monkeypatch):
    config = lambda: pytest.fail("the config was read")  # noqa: E731
    assert kernels.resolve_attention("auto", torch.bfloat16, config) == "sdpa"  # no CUDA
    fake_gpus(monkeypatch, gpu="A100", flash_attn=True)
    assert kernels.resolve_attention("sdpa", torch.bfloat16, config) == "sdpa"
    assert kernels.resolve_attention("flash_attention_2", torch.bfloat16, config) == "flash_attention_2"


# ---------------------------------------------------------------------------------------------------------
# 4. Where the model goes, and whether inference is quantized


def test_inference_loads_go_whole_and_unquantized_onto_this_process_gpu(monkeypatch, load_kwargs, alignkit_log):
    fake_gpus(monkeypatch, count=2)
    model = presets.paths()["model"]
    # Generation, judging, evaluation (load_model's default): no NF4 copy of a merged bf16 model, on the GPU.
    kwargs = load_kwargs(ModelSettings(model_id=model))
    assert "quantization_config" not in kwargs and kwargs["device_map"] == {"": 0}
    assert "inference loads the model as saved" in alignkit_log.text
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert load_kwargs(ModelSettings(model_id=model))["device_map"] == {"": 1}
    # Training keeps QLoRA as its GPU default, on the process's own GPU (DDP: one model per GPU).
    kwargs = load_kwargs(ModelSettings(model_id=model), for_training=True)
    assert kwargs["quantization_config"].load_in_4bit and kwargs["device_map"] == {"": 1}
    # Asked for, inference is quantized too.
    assert load_kwargs(ModelSettings(model_id=model, quantization="4bit"))["quantization_config"].load_in_4bit
    # FSDP and ZeRO-3 place a full-precision model's shards themselves; merging stays in CPU RAM (fp32).
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "device_map" not in load_kwargs(ModelSettings(model_id=model, quantization="none"), for_training=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert "device_map" not in load_kwargs(ModelSettings(model_id=model), full_precision=True, on_cpu=True)


def test_no_gpu_no_device_map(load_kwargs):
    assert not torch.cuda.is_available()
    assert "device_map" not in load_kwargs(ModelSettings(model_id=presets.paths()["model"]))


# ---------------------------------------------------------------------------------------------------------
# 5. Frozen adapters in the compute dtype: FSDP flattens them with the base


@pytest.fixture
def sft_adapter(tiny_cache, tmp_path):
    """An adapter folder on the tiny model, as an SFT run leaves it (random B, so it is not a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = presets.paths()["model"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "sft")
    return str(tmp_path / "sft")


@pytest.fixture
def process_group():
    """A one-process gloo group: FSDP's real wrapping (and flattening) runs on a CPU."""
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dpo_on_an_sft_adapter_wraps_in_fsdp(sft_adapter, process_group, monkeypatch):
    """README's FSDP command: a bf16 base, the frozen SFT adapter, a new adapter; FSDP flattens each layer."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    s = DPOSettings(model_id=sft_adapter, dtype="bf16", quantization="none", lora_r=4, lora_alpha=8)
    loaded = models.load_model(s, for_training=True)
    model = models.add_trainable_adapter(loaded, s)
    frozen = {p.dtype for n, p in model.named_parameters() if ".frozen_0." in n}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}  # frozen like the base; trained in fp32
    # What transformers does under FSDP with a PeftModel (transformers/distributed/fsdp.py update_fsdp_plugin_peft):
    # decoder layers are units, trainable LoRA layers units of their own; fsdp.yaml has use_orig_params false.
    # With PEFT's fp32 upcast of the frozen adapter this raised "Must flatten tensors with uniform dtype".
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                   device_id=torch.device("cpu"))
    assert sum(isinstance(m, FSDP) for m in wrapped.modules()) > 2


def test_inference_keeps_peft_s_own_adapter_dtype(sft_adapter):
    loaded = models.load_model(ModelSettings(model_id=sft_adapter, dtype="bf16"))
    assert {p.dtype for n, p in loaded.model.named_parameters() if ".frozen_0." in n} == {torch.float32}


def test_under_zero3_the_new_adapter_takes_the_base_dtype(sft_adapter, monkeypatch):
    """ZeRO-3 gathers into buffers of one dtype (trl/trainer/dpo_trainer.py); DeepSpeed keeps fp32 masters itself."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setattr(launch, "register_zero3_init", lambda *quantized: None)  # no DeepSpeed on this machine
    s = DPOSettings(model_id=sft_adapter, dtype="bf16", quantization="none", lora_r=4, lora_alpha=8)
    model = models.add_trainable_adapter(models.load_model(s, for_training=True), s)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert models.keep_trainable_fp32(model) == 0  # and the QLoRA upcast leaves ZeRO-3 alone
    assert models.keep_trainable_fp32(model, types.SimpleNamespace(bf16=True, fp16=False)) == 0  # DeepSpeed's bf16 engine


def test_under_zero3_in_fp32_trl_s_bf16_cast_of_qlora_adapters_is_undone(sft_adapter, monkeypatch):
    """A ZeRO-3 QLoRA run in fp32 (mixed_precision no) kept TRL's bf16 cast of its trainable weights: it saved bf16
    adapters, and reward.py's bf16 score head met fp32 hidden states ("expected m1 and m2 to have the same
    dtype", the launch audit of session 33). Its engine's dtype is fp32: the adapters go back to fp32."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setattr(launch, "register_zero3_init", lambda *quantized: None)
    s = DPOSettings(model_id=sft_adapter, dtype="fp32", quantization="none", lora_r=4, lora_alpha=8)
    model = models.add_trainable_adapter(models.load_model(s, for_training=True), s)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:  # as TRL leaves a 4-bit model's
        param.data = param.data.bfloat16()
    assert models.keep_trainable_fp32(model, types.SimpleNamespace(bf16=False, fp16=False)) == len(trainable)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}  # one dtype
    # Under ZeRO-2 with bf16 DeepSpeed's engine casts every parameter to bf16 itself: moving them said "fp32" in vain.
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    for param in trainable:
        param.data = param.data.bfloat16()
    assert models.keep_trainable_fp32(model, types.SimpleNamespace(bf16=True, fp16=False)) == 0
    assert models.keep_trainable_fp32(model, types.SimpleNamespace(bf16=False, fp16=False)) == len(trainable)


# ---------------------------------------------------------------------------------------------------------
# 6. The final save of a sharded adapter


class FakeAccelerator:
    def __init__(self, full: dict, main: bool):
        self.full, self.is_main_process, self.num_processes, self.gathered_from = full, main, 2, None
        self.deepspeed_config = {"zero_optimization": {"stage": 3}}

    def get_state_dict(self, model):
        self.gathered_from = model  # a collective: every rank must call it
        return self.full

    def unwrap_model(self, model):
        return model


class FakeEngine:
    """DeepSpeed's engine at ZeRO-3: gathers the 16-bit weights (a collective), trainable ones only if asked."""

    def __init__(self, accelerator: FakeAccelerator, trainable: set[str]):
        self.accelerator, self.trainable = accelerator, trainable

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
        self.accelerator.gathered_from = self
        full = self.accelerator.full
        return {k: v for k, v in full.items() if k in self.trainable} if exclude_frozen_parameters else full


def _sharded_trainer(tiny_cache, kind: str, main: bool):
    """A trainer as it stands after ZeRO-3 or FSDP training: each rank's parameters are a partition (empty here)."""
    s = DPOSettings(model_id=presets.paths()["model"], lora_r=4, lora_alpha=8)
    loaded = models.load_model(s, for_training=True)
    model = models.add_trainable_adapter(loaded, s)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)  # what ZeRO-3 leaves on a rank: torch.Size([0])
    accelerator = FakeAccelerator(full, main)
    engine = FakeEngine(accelerator, trainable)
    trainer = types.SimpleNamespace(
        model=model, deepspeed=engine, is_deepspeed_enabled=kind == "zero3", is_fsdp_enabled=kind == "fsdp",
        accelerator=accelerator, eval_dataset=None,
        state=types.SimpleNamespace(log_history=[{"loss": 0.5}], global_step=3),
    )
    return trainer, loaded, s, full, engine


@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_a_sharded_adapter_is_gathered_on_every_rank_and_written_whole(kind, tiny_cache, tmp_path):
    from safetensors.torch import load_file

    trainer, loaded, s, full, engine = _sharded_trainer(tiny_cache, kind, main=True)
    training.finish(trainer, loaded, s, tmp_path, "dpo")
    assert trainer.accelerator.gathered_from is (engine if kind == "zero3" else trainer.model)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    lora = {k: v for k, v in full.items() if ".default." in k}
    assert len(saved) == len(lora) > 0
    for key, value in saved.items():  # whole, and the trained values (keys lose PEFT's adapter name)
        assert value.shape == lora[key.replace(".weight", ".default.weight")].shape != torch.Size([0])
        assert torch.equal(value, lora[key.replace(".weight", ".default.weight")])
    # Another rank joins the gather and writes nothing.
    trainer, loaded, s, full, engine = _sharded_trainer(tiny_cache, kind, main=False)
    training.finish(trainer, loaded, s, tmp_path / "rank1", "dpo")
    assert trainer.accelerator.gathered_from is not None and not (tmp_path / "rank1").exists()


# ---------------------------------------------------------------------------------------------------------
# 7. QLoRA keeps its trainable weights in fp32


def test_sft_with_qlora_in_one_process(tiny_cache, tmp_path):
    """sft.py with --quantization 4bit in one process: the base's linear layers really 4-bit (bitsandbytes on the
    CPU), the LoRA weights trained in fp32, the adapter saved."""
    import bitsandbytes as bnb

    run = run_script("sft.py", "--preset", "tiny", "--quantization", "4bit", "--max_steps", "2", "--eval_split", "0",
                     "--output_dir", str(tmp_path), "--run_name", "qlora", "--save_steps", "100")
    assert run["loaded"].quantization == "4bit"
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in run["model"].modules()) == 14  # 7 per layer, 2 layers
    assert {p.dtype for p in run["model"].parameters() if p.requires_grad} == {torch.float32}
    assert run["trainer"].state.global_step == 2 and (tmp_path / "qlora" / "adapter_model.safetensors").is_file()


def test_sft_with_8bit_in_one_process(tiny_cache, tmp_path):
    """sft.py with --quantization 8bit in one process (the support matrix said "as any model", and no test trained
    in 8-bit): the base's linear layers really 8-bit (bitsandbytes' LLM.int8 on the CPU), LoRA in fp32, the adapter
    saved and moved."""
    import bitsandbytes as bnb

    run = run_script("sft.py", "--preset", "tiny", "--quantization", "8bit", "--max_steps", "2", "--eval_split", "0",
                     "--warmup_ratio", "0", "--output_dir", str(tmp_path), "--run_name", "int8", "--save_steps", "100")
    assert run["loaded"].quantization == "8bit"
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in run["model"].modules()) == 14  # 7 per layer, 2 layers
    assert {p.dtype for p in run["model"].parameters() if p.requires_grad} == {torch.float32}
    assert run["trainer"].state.global_step == 2 and (tmp_path / "int8" / "adapter_model.safetensors").is_file()
    assert any(bool(p.abs().sum()) for n, p in run["model"].named_parameters() if "lora_B" in n)  # B starts at 0


def test_qlora_trains_fp32_adapters_that_move(tiny_cache, tmp_path):
    """TRL casts a 4-bit model's trainable LoRA weights to bf16 (trl/trainer/dpo_trainer.py, "When using QLoRA");
    at a DPO learning rate AdamW's steps then round away. A real 4-bit model (bitsandbytes on the CPU), 3 steps."""
    args = ["--preset", "tiny", "--quantization", "4bit", "--max_steps", "3", "--learning_rate", "5e-6",
            "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--max_samples", "64", "--eval_split", "0",
            "--output_dir", str(tmp_path), "--run_name", "qlora", "--save_steps", "100"]
    run = run_script("dpo.py", *args)
    trained = dict(run["model"].named_parameters())
    s = run["settings"]
    start = models.add_trainable_adapter(models.load_model(s, for_training=True), s)  # same seed: same start
    moved = total = 0
    for name, p in start.named_parameters():
        if "lora_A" in name:  # compared in the trained dtype: a cast alone is no move
            moved += (trained[name].detach() != p.detach().to(trained[name].dtype)).sum().item()
            total += p.numel()
    # Step 1 moves only B (B starts at 0, so A's gradient is 0); steps 2 and 3 move A. In bf16: about 1%.
    assert moved / total > 0.9, f"{moved} of {total} lora_A entries changed"
    assert {p.dtype for p in trained.values() if p.requires_grad} == {torch.float32}


# ---------------------------------------------------------------------------------------------------------
# 8. DDP does not search for unused parameters


class Recorded(dict):
    """A stand-in TRL config class: records the kwargs (building a real one would join the process group)."""

    def __init__(self, **kwargs):
        super().__init__(kwargs)
        self.n_gpu = 1


def test_ddp_is_told_every_parameter_is_used(monkeypatch, tmp_path):
    s = DPOSettings(report_to="none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert training.trl_config(Recorded, s, tmp_path, torch.bfloat16)["ddp_find_unused_parameters"] is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "ddp_find_unused_parameters" not in training.trl_config(Recorded, s, tmp_path, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# 9. ZeRO-3 partitions the model while it loads


def test_zero3_init_is_registered_before_the_model_loads(monkeypatch, load_kwargs, alignkit_log):
    """Without it every rank loads the whole model into CPU RAM: from_pretrained builds it under zero.Init only
    when a DeepSpeed config is registered (transformers/modeling_utils.py `needs_zero3_init`)."""
    import accelerate.utils
    from transformers.integrations import deepspeed as hf_deepspeed

    class Config:  # what HfDeepSpeedConfig answers (DeepSpeed itself is not installed here)
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    class Plugin:  # accelerate's DeepSpeedPlugin reads the launch's environment
        def __init__(self):
            import os

            self.zero3_init_flag = os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
            self.hf_ds_config = Config()
            hf_deepspeed.set_hf_deepspeed_config(self.hf_ds_config)  # as HfDeepSpeedConfig.__init__ does

        def set_deepspeed_weakref(self):
            self.dschf = Config()
            hf_deepspeed.set_hf_deepspeed_config(self.dschf)

    monkeypatch.setattr(accelerate.utils, "DeepSpeedPlugin", Plugin)
    import importlib.util

    real = importlib.util.find_spec  # deepspeed "installed", as on the GPU machine this launch runs on
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    from alignkit.core import zero3

    monkeypatch.setattr(zero3, "_zero3_config", None)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true")
    s = ModelSettings(model_id=presets.paths()["model"], quantization="none")
    try:
        launch.establish_launch(s, "dpo.py")  # as every script starts
        assert load_kwargs(s, for_training=True)["zero3_at_load"] is True
        assert "ZeRO-3 init: on (each rank loads only its shard" in alignkit_log.text
        hf_deepspeed.unset_hf_deepspeed_config()
        # A 4-bit model is never built partitioned: the line said "on" for QLoRA too (the launch audit of s33).
        alignkit_log.clear()
        launch.establish_launch(ModelSettings(model_id=s.model_id, quantization="4bit"), "dpo.py")
        assert "ZeRO-3 init: off for a quantized model" in alignkit_log.text and "init: on" not in alignkit_log.text
        hf_deepspeed.unset_hf_deepspeed_config()
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false")  # turned off in the accelerate config
        launch.establish_launch(s, "dpo.py")
        assert load_kwargs(s, for_training=True)["zero3_at_load"] is False
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


# ---------------------------------------------------------------------------------------------------------
# Suspected: a vocabulary padded past the tokenizer, partitioned under zero.Init


def test_a_partitioned_embedding_is_not_resized(tiny_cache, alignkit_log):
    from transformers import AutoModelForCausalLM

    base = presets.paths()["model"]
    tok = models.load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tok) + 30)  # padded, as many vocabularies are (to a multiple of 64)
    model.get_input_embeddings().weight.data = torch.empty(0)  # zero.Init's local view: torch.Size([0])
    models.fit_embeddings(model, tok)
    assert model.get_input_embeddings().num_embeddings == len(tok) + 30
    tok.add_special_tokens({"additional_special_tokens": [f"<extra_{i}>" for i in range(40)]})
    model = AutoModelForCausalLM.from_pretrained(base)
    models.fit_embeddings(model, tok)  # a tokenizer that outgrew the model still grows it
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # ... and says so (the merge.py audit of session 30: a merged config's vocab_size grew without a word)
    assert re.search(rf"embeddings: {len(tok) - 40} -> {len(tok)} rows, .*\(<extra_0>, <extra_1>, <extra_2> past",
                     alignkit_log.text)


# ---------------------------------------------------------------------------------------------------------
# Suspected: vLLM's context length and memory share


def test_vllm_is_capped_to_a_context_and_shares_the_gpu(tiny_cache, monkeypatch, alignkit_log):
    from fake_vllm import install

    from alignkit.core.config import GenerationSettings
    from alignkit.modeling import generation

    fake = install(monkeypatch, cuda=True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    base = presets.paths()["model"]
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(base).max_position_embeddings
    with generation.load_generator(GenerationSettings(model_id=base), "vllm"):
        pass
    kwargs = fake.llms[0].kwargs
    assert kwargs["max_model_len"] == min(8192, context) and kwargs["gpu_memory_utilization"] == 0.45
    with generation.load_generator(GenerationSettings(model_id=base, max_model_len=64, gpu_memory_utilization=0.3),
                                   "vllm"):
        pass
    assert fake.llms[1].kwargs["max_model_len"] == 64 and fake.llms[1].kwargs["gpu_memory_utilization"] == 0.3


# ---------------------------------------------------------------------------------------------------------
# Suspected: the merge check in bf16


def test_a_bf16_merge_is_checked_in_fp32_and_saved_in_bf16(sft_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignkit.modeling.merge import merge_adapters

    out = merge_adapters(sft_adapter, tmp_path / "merged", dtype="bf16")
    report = json.loads((out / "merge.json").read_text())
    assert report["check_dtype"] == "float32" and report["dtype"] == "bfloat16"
    assert report["max_logit_difference"] < 1e-3  # in bf16 this model's two computations differ by ~0.15
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Threads (issue 11, point 12)


def test_threads_auto_is_one_for_a_small_model_on_a_cpu(monkeypatch):
    monkeypatch.setattr(threads, "physical_cores", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a choice already made (cpuslot makes one) is kept
    assert threads.resolve_num_threads("auto", 7_000_000_000) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.resolve_num_threads("auto", 5_000_000) == 1
    assert threads.resolve_num_threads("auto", 7_000_000_000) == 16
    assert threads.resolve_num_threads("3", 5_000_000) == 3
    with pytest.raises(ValueError, match="--num_threads must be auto or a positive whole number"):
        threads.resolve_num_threads("many", 1)
    fake_gpus(monkeypatch)
    assert threads.resolve_num_threads("auto", 5_000_000) == 16  # on a GPU the CPU only feeds it


def test_loading_sets_the_threads_and_says_so_once(tiny_cache, monkeypatch, alignkit_log):
    monkeypatch.setattr(threads, "_threads_logged", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        models.load_model(ModelSettings(model_id=presets.paths()["model"]))
        assert torch.get_num_threads() == 1
        models.load_model(ModelSettings(model_id=presets.paths()["model"]))
        assert alignkit_log.text.count("threads: 1") == 1
        assert "parameters on a CPU" in alignkit_log.text
        threads._threads_logged = None  # a preset's num_threads is named as the preset's (it said "set by --num_threads")
        models.load_model(SFTSettings(model_id=presets.paths()["model"], num_threads="1", preset="tiny"))
        assert "threads: 1 (set by --num_threads or --preset tiny)" in alignkit_log.text
    finally:
        torch.set_num_threads(before)
    for stage in ("sft", "dpo", "label", "evaluate"):
        assert presets.defaults(stage)["num_threads"] == "1"


def _meta_llama(hidden, inner, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # the shapes without the weights
        return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                                            vocab_size=vocab, num_attention_heads=8, num_key_value_heads=8))


def test_gradient_checkpointing_auto_is_on_for_7b_qlora_on_24gb_and_off_for_the_tiny_preset(monkeypatch, alignkit_log):
    """The mission's main run (7B QLoRA DPO, batch 4 x 1024 tokens, 24 GB GPU with the 4-bit model in it) keeps
    checkpointing on; a small model with memory to spare turns it off; both say why; true/false always win."""
    s = DPOSettings(report_to="none")  # per-device batch 4, max_length 1024
    seven_b = _meta_llama(4096, 11008, 32, 32000)
    assert training.activation_bytes(seven_b, s, torch.bfloat16) > 30 * 2**30  # about 40 GB at worst
    monkeypatch.setattr(training, "free_memory", lambda device: 19 * 2**30)  # 24 GB less a 4-bit 7B and its optimizer
    assert training.resolve_gradient_checkpointing(s, seven_b, torch.bfloat16) is True
    # It read "...; 19.0 GiB free on cpu, more than half", as if the free memory were: the activations are.
    assert re.search(r"gradient checkpointing: on \(auto: a micro-batch's activations take up to \d+\.\d GiB, more "
                     r"than half of the 19\.0 GiB free on \w+;", alignkit_log.text), alignkit_log.text
    small = _meta_llama(128, 256, 2, 512)
    assert training.resolve_gradient_checkpointing(s, small, torch.float32) is False
    assert "GiB, no more than half of the 19.0 GiB free on " in alignkit_log.text
    for requested, expected in (("true", True), ("false", False), (False, False)):
        s.gradient_checkpointing = requested
        assert training.resolve_gradient_checkpointing(s, small if expected else seven_b, torch.float32) is expected
    s.gradient_checkpointing = "auto"
    assert training.resolve_gradient_checkpointing(s, None, torch.float32) is True  # nothing to size: the safe side


def test_gradient_checkpointing_takes_yaml_booleans_and_auto(tmp_path):
    from alignkit.core.args import parse_config

    (tmp_path / "c.yaml").write_text("gradient_checkpointing: true\n")
    assert parse_config(DPOSettings, ["--config", str(tmp_path / "c.yaml")], env_file=None).gradient_checkpointing == "true"
    assert parse_config(DPOSettings, ["--gradient_checkpointing", "no"], env_file=None).gradient_checkpointing == "false"
    assert parse_config(DPOSettings, [], env_file=None).gradient_checkpointing == "auto"


# ---------------------------------------------------------------------------------------------------------
# Back-to-back vLLM engines (label.py's generator then its judge, rlaif.py's rounds)


def test_a_closed_vllm_engine_is_shut_down_and_its_memory_back_before_the_next_starts(monkeypatch):
    """vLLM's engine core is a process of its own that releases the GPU some time after the engine is dropped;
    the next engine sizes itself from the free memory and profiles against it. close() shuts the core down and
    returns once the free memory has stopped rising, so the next engine reads all of it."""
    from alignkit.modeling import generation

    released = iter([10, 30, 60, 80, 80])  # GiB free: the old engine's process still letting go
    readings = []

    def mem_get_info(device):
        readings.append(next(released, 80) << 30)
        return readings[-1], 80 << 30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr("time.sleep", lambda s: None)
    shut = []
    core = types.SimpleNamespace(shutdown=lambda: shut.append(True))
    generator = generation.VLLMGenerator.__new__(generation.VLLMGenerator)
    generator.llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core))
    generator.close()
    assert shut == [True] and generator.llm is None
    assert readings[-1] == 80 << 30  # it waited for the whole release
    assert generation.settled_free_memory(0, sleep=lambda s: None) == 80 << 30
