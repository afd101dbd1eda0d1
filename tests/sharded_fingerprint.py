"""The reference-cache key of a model whose parameters are sharded across processes, as ZeRO-3 and FSDP shard them.

Imported by tests/test_refcache.py for the one-process helpers, and run by it under
`accelerate launch --num_processes 2` (gloo on CPU):

    python -m accelerate.commands.launch ... tests/sharded_fingerprint.py OUT_DIR ADAPTER_DIR [ADAPTER_DIR ...]

For each SFT adapter folder, every process loads the tiny base with that adapter (alignkit's loader) plus a fresh
trained adapter on top, and computes `alignkit.train.refcache.cache_key`:
- "whole": every process holds every parameter (plain DDP);
- "zero3": every parameter partitioned the way DeepSpeed ZeRO-3 does it (each process keeps 1/N of the
  flattened tensor, `.data` is an empty placeholder with `ds_status`), with `deepspeed.zero.GatheredParameters`
  stood in by a real all_gather over the process group (DeepSpeed itself needs CUDA or oneCCL);
- "placeholders": the processes other than the main one hold empty tensors, as under FSDP's RAM-efficient
  loading before the model is wrapped;
- "fsdp2": torch's own FSDP2 `fully_shard` over a CPU device mesh (DTensor parameters, gathered by full_tensor).
Each process writes {adapter: {mode: key}} to OUT_DIR/rank<N>.json.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import torch


def partition_like_zero3(model, rank: int = 0, world: int = 1) -> None:
    """Keep this process's 1/world slice of every parameter in `ds_tensor`; `.data` becomes empty (ZeRO-3)."""
    for p in model.parameters():
        flat = p.data.reshape(-1)
        size = -(-flat.numel() // world)  # ceil: the last shard is padded, as ZeRO-3 pads
        padded = torch.cat([flat, flat.new_zeros(size * world - flat.numel())])
        p.ds_tensor = padded[rank * size : (rank + 1) * size].clone()
        p.ds_shape, p.ds_numel, p.ds_status = p.data.shape, flat.numel(), "NOT_AVAILABLE"
        p.data = torch.empty(0, dtype=p.dtype)


@contextlib.contextmanager
def _gathered(params, modifier_rank=None):
    """Stand-in for deepspeed.zero.GatheredParameters: all_gather the shards, restore the placeholder after."""
    import torch.distributed as dist

    for p in params:
        shards = [p.ds_tensor]
        if dist.is_initialized() and dist.get_world_size() > 1:
            shards = [torch.empty_like(p.ds_tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(shards, p.ds_tensor)
        p.data = torch.cat(shards)[: p.ds_numel].view(p.ds_shape)
        p.ds_status = "AVAILABLE"
    try:
        yield
    finally:
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype)
            p.ds_status = "NOT_AVAILABLE"


@contextlib.contextmanager
def fake_deepspeed():
    """`import deepspeed` gives a module holding only `zero.GatheredParameters` (all alignkit.train.refcache uses).
    Only inside this block: transformers probes for deepspeed when it loads a model."""
    module = types.ModuleType("deepspeed")
    module.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)  # found, but no installed metadata
    module.zero = types.SimpleNamespace(GatheredParameters=_gathered)
    # accelerate's unwrap_model asks `isinstance(model, deepspeed.DeepSpeedEngine)` once it finds deepspeed
    # installed (the dev extra brings it): a class nothing here is an instance of.
    module.DeepSpeedEngine = type("DeepSpeedEngine", (), {})
    before = sys.modules.get("deepspeed")
    sys.modules["deepspeed"] = module
    try:
        yield
    finally:
        if before is None:
            del sys.modules["deepspeed"]
        else:
            sys.modules["deepspeed"] = before


def tiny_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt_ids": [[5, 6, 7]], "chosen_ids": [[8, 9]], "rejected_ids": [[10, 11, 12]]})


def stand_in_trainer(model, accelerator, frozen):
    """What refcache.cache_key reads of an AlignDPOTrainer (the class name is part of the key)."""
    args = types.SimpleNamespace(max_length=64, truncation_mode="keep_start", ld_alpha=None, bf16=False, fp16=False)
    return types.SimpleNamespace(model=model, accelerator=accelerator, args=args, frozen_adapters=frozen)


def load(adapter: str):
    """The tiny base with the SFT adapter at `adapter` frozen under a fresh trained adapter, as dpo.py loads it."""
    from alignkit.core.config import DPOSettings
    from alignkit.modeling.models import add_trainable_adapter, load_model

    settings = DPOSettings(model_id=adapter, quantization="none", dtype="fp32", attn_implementation="sdpa",
                           use_liger="false", lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    loaded = load_model(settings, for_training=True)
    return add_trainable_adapter(loaded, settings), loaded.frozen


def main(out: Path, adapters: list[str]) -> None:
    from accelerate import Accelerator

    from alignkit.train import refcache

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    keys: dict = {}
    for adapter in adapters:
        found = keys[adapter] = {}

        def key(model, frozen):
            return refcache.cache_key(stand_in_trainer(model, accelerator, frozen), tiny_dataset())

        model, frozen = load(adapter)
        found["whole"] = key(model, frozen)
        partition_like_zero3(model, rank, world)
        assert all(p.numel() == 0 for p in model.parameters())  # nothing whole is left on any process
        with fake_deepspeed():
            found["zero3"] = key(model, frozen)

        model, frozen = load(adapter)
        if rank != 0:
            for p in model.parameters():
                p.data = torch.empty(0, dtype=p.dtype)
        found["placeholders"] = key(model, frozen)

        model, frozen = load(adapter)
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.get_base_model().model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            local = sum(p.to_local().numel() for p in model.parameters())
            assert local < sum(p.numel() for p in model.parameters())  # each process holds a share only
            found["fsdp2"] = key(model, frozen)
        except Exception as e:  # noqa: BLE001 - reported, and the test says which sharding ran
            found["fsdp2_error"] = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}.json").write_text(json.dumps(keys))
    # Leave together and tear the process group down: a gloo group still alive at interpreter exit can abort a
    # process ("terminate called without an active exception") after its work is done.
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
