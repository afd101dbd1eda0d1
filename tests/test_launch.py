"""The launch, established before the model loads (alignkit.core.launch), on a simulated multi-GPU machine: each
rank's device and process group, its 4-bit placement, the ranks' one checkpointing choice, and each combination
that cannot work refused in one line before anything loads (issue 24)."""

from __future__ import annotations

import pytest
import torch

from alignkit.core import launch
from alignkit.core.config import DPOSettings, MergeSettings, RewardSettings, RLSettings, SFTSettings
from alignkit.core.errors import UserError
from alignkit.modeling import presets
from alignkit.train import training

from test_gpu_paths import _meta_llama, fake_gpus, load_kwargs  # noqa: F401 - load_kwargs is a fixture

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING",
       "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE")


def launched(monkeypatch, mode: str, rank: int = 1, world: int = 2) -> None:
    """The environment `accelerate launch` gives process `rank` of `world` in `mode` (ddp, fsdp, zero2, zero3)."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    if mode == "fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
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
    monkeypatch.setattr(launch, "register_zero3_init", lambda: None)  # DeepSpeed is not installed here
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
    assert "free on cuda (the least of all ranks)" in alignkit_log.text
    # Alone, this rank's 4x would have turned it off: the decision really is the agreed one.
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, **kw: tensor)
    assert training.resolve_gradient_checkpointing(s, model, torch.bfloat16) is False
