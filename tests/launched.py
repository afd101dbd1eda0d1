"""Runs a script (sft.py, dpo.py, ...) as `accelerate launch` starts it, and reports what it really did.

    accelerate launch ... tests/launched.py [--fsdp-on-cpu] [--vllm-sync FILE] [--rows-with TEXT] SCRIPT [flags...]

Used by tests/test_launch_sharded.py and by bench/gpu_smoke.py (one process). Each process prints, after the
script ends,

    launched: rank R of W under TYPE; packed batches N; own loss calls M; 4-bit layers Q (F); reference saves S

TYPE is accelerate's `distributed_type` as the Trainer saw it (not what the launch asked for), N the forwards
that ran on packed pairs (`alignkit.train.prefix.pack_pairs`: prefix sharing really on), M the calls of
alignkit's own losses (`alignkit.train.trainers.preference_loss`, and `reference_free_loss` for simpo and orpo),
Q the bitsandbytes 4-bit layers in the model this process trained (QLoRA really on, in this process), F their
formats as loaded (`nf4+nested`, `fp4`: --bnb_4bit_quant_type and --use_bnb_nested_quant really applied), S the
reference log-prob cache entries this process wrote (`alignkit.train.refcache.save`). A process that trained over
bitsandbytes' 8-bit layers (--quantization 8bit) also prints `launched: rank R 8-bit layers E`. Where a packed
batch was laid out for a sliding window (a model with full and sliding-window layers: a mask per layer type; a
window on every layer: one mask), one more line,

    launched windows: rank R; a mask per layer type|one mask; packed batches with the window in effect K

K those where the window cut some token's past: the sliding-window layers' mask differs from the full layers', or
the one mask from the batch's packed without the window.

`--fsdp-on-cpu`: accelerate 1.16 turns FSDP on only for GPU-type launches (accelerate/state.py: its FSDP branch
lists MULTI_GPU, MULTI_NPU, ... but not MULTI_CPU), so `accelerate launch --use_fsdp` on a CPU trains under
plain DDP. This lifts that one check: where accelerate built an FSDP plugin from the launch's environment and
would fall back to MULTI_CPU, the state says FSDP and holds the plugin. Everything after is accelerate's,
transformers' and torch's own FSDP code (wrapping, sharding with `fully_shard` over gloo, gathering the state dict
for saving), run as on GPUs.

`--vllm-sync FILE` (rl.py): after the script, every rank walks TRL's own weight sync for a colocated vLLM engine
(`trl.generation.vllm_generation.VLLMGeneration._iter_named_params`, what `sync_weights` hands to vLLM's
`load_weights`) over the trained model as the launch left it (sharded, partitioned or whole), and the main process
saves what it yields to FILE. vLLM itself needs CUDA; what it would be given, and under which names, does not.

`--rows-with TEXT`: each process also prints what it trained on, as the trainer tokenized it (every `*_ids` column
of its training rows, decoded; rl.py's prompts as they go to the policy: a text as it is, a conversation through
the chat template), and, for rl.py, the 4-bit layers of each reward model it holds (`rm:FOLDER`):

    launched rows: rank R: N of M training rows hold TEXT; reward models: rm:NAME Q (F)
"""

from __future__ import annotations

import os
import runpy
import sys

counts = {"packed": 0, "own": 0, "ref_saves": 0, "per_layer_type": 0, "one_window": 0, "windowed": 0}
seen = {"type": None}


def _count(module, name: str, key: str) -> None:
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counts[key] += 1
        return real(*args, **kwargs)

    setattr(module, name, counted)


def _count_windows(prefix) -> None:
    """Count the packed batches of a model with a sliding window: laid out with a mask per layer type (full and
    sliding layers) or with one windowed mask (a window on every layer), and those where the window cut some
    token's past: the sliding layers' mask differs from the full layers', or the one mask from the same batch's
    packed without the window (dense masks; a FlexAttention BlockMask is not compared)."""
    real = prefix.pack_pairs

    def counted(*args, **kwargs):
        import torch

        packed = real(*args, **kwargs)
        masks = packed.attention_mask
        if isinstance(masks, dict):
            counts["per_layer_type"] += 1
            full, sliding = masks.get("full_attention"), masks.get("sliding_attention")
            if isinstance(full, torch.Tensor) and isinstance(sliding, torch.Tensor) and not torch.equal(full, sliding):
                counts["windowed"] += 1
        elif kwargs.get("config") is not None and isinstance(windows := prefix.layer_windows(kwargs["config"]), dict) \
                and set(windows.values()) != {None}:
            counts["one_window"] += 1
            unwindowed = real(*args, **{**kwargs, "config": None}).attention_mask  # every layer the whole past
            if isinstance(masks, torch.Tensor) and not torch.equal(masks, unwindowed):
                counts["windowed"] += 1
        return packed

    prefix.pack_pairs = counted


def _fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
            # Every later AcceleratorState() copies the process state's type over its own: set both.
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_with_fsdp_on_cpu
    from alignkit.core import launch

    launch.fsdp_shards_here = lambda: True  # so alignkit does not say this launch trains as DDP


def _no_deepspeed_cpu_shm_op() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory communication op (C++, about a minute on 2 cores, under
    a lock file a killed run leaves behind) on its first process group. It serves inference all-reduces on CPUs
    only; training's collectives go through torch.distributed (gloo here, nccl on GPUs) either way. Without it,
    DeepSpeed takes the path it takes where the op cannot be built."""
    import importlib

    # By its module (deepspeed.comm's attribute `torch` is torch itself).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _watch_distributed_type() -> None:
    """Record the distributed type of the Trainer's accelerator (the last one made, for scripts with two)."""
    import transformers

    create = transformers.Trainer.create_accelerator_and_postprocess

    def create_and_record(self, *args, **kwargs):
        out = create(self, *args, **kwargs)
        seen["type"] = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        return out

    transformers.Trainer.create_accelerator_and_postprocess = create_and_record


def _vllm_sync(trainer, out: str) -> None:
    """The weights TRL's colocated vLLM sync would load, in the names it would load them under (see the module's
    docstring). Every rank iterates: gathering a sharded parameter is a collective."""
    from safetensors.torch import save_file
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    sync = object.__new__(VLLMGeneration)  # its weight walk alone: no engine is built
    sync.model, sync.accelerator = trainer.model, trainer.accelerator  # the model TRL's GRPOTrainer gives it
    sync._dist = DistributedBackend(trainer.accelerator)
    weights = {name: tensor.detach().float().cpu().contiguous().clone() for name, tensor in sync._iter_named_params()}
    if trainer.accelerator.is_main_process:
        save_file(weights, out)


def _four_bit_layers(model) -> str:
    """bitsandbytes' 4-bit linear layers in `model` (the one a trainer trained, under FSDP and DeepSpeed too), and
    their formats: "12 (fp4)", "12 (nf4+nested)"; "0 (none)" without any."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return "0 (none)"
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)] if model is not None else []
    formats = set()
    for layer in layers:
        state = getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)
        kind = getattr(state, "quant_type", None) or getattr(layer.weight, "quant_type", None) or "unknown"
        nested = getattr(state, "nested", None) if state is not None else None
        nested = getattr(layer.weight, "compress_statistics", False) if nested is None else nested
        formats.add(f"{kind}{'+nested' if nested else ''}")
    return f"{len(layers)} ({','.join(sorted(formats)) or 'none'})"


def _eight_bit_layers(trainer) -> int:
    """bitsandbytes' LLM.int8 linear layers in the model `trainer` trained (--quantization 8bit really on)."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return 0
    return sum(isinstance(m, Linear8bitLt) for m in trainer.model.modules()) if trainer is not None else 0


def _rows_with(trainer, text: str) -> str:
    """What this process trained on (see the module's docstring): its training rows as tokenized, and the 4-bit
    layers of the reward models it holds."""
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    rows = trainer.train_dataset
    columns = [c for c in rows.column_names if c.endswith("_ids")]
    if columns:
        held = sum(text in "".join(tokenizer.decode(row[c]) for c in columns) for row in rows)
    else:  # rl.py's prompts, tokenized as they are sampled: a text as it is, a conversation through the template
        held = sum(text in (p if isinstance(p, str) else tokenizer.apply_chat_template(
            p, tokenize=False, add_generation_prompt=True)) for p in rows["prompt"])
    models = [f"{f.__name__} {_four_bit_layers(f.model.loaded.model)}" for f in getattr(trainer, "reward_funcs", [])
              if hasattr(getattr(f, "model", None), "loaded")]
    return f"{held} of {len(rows)} training rows hold {text}; reward models: {', '.join(models) or 'none'}"


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--fsdp-on-cpu":
        argv = argv[1:]
        _fsdp_on_cpu()
    vllm_sync = None
    if argv and argv[0] == "--vllm-sync":
        vllm_sync, argv = argv[1], argv[2:]
    rows_with = None
    if argv and argv[0] == "--rows-with":
        rows_with, argv = argv[1], argv[2:]
    from alignkit.core.launch import launch_mode

    if launch_mode().startswith("ZeRO"):
        _no_deepspeed_cpu_shm_op()
    from alignkit.train import prefix, refcache, trainers

    _count(refcache, "save", "ref_saves")
    _count_windows(prefix)
    _count(prefix, "pack_pairs", "packed")
    _count(trainers, "preference_loss", "own")
    _count(trainers, "reference_free_loss", "own")
    _watch_distributed_type()
    sys.argv = argv
    ran = runpy.run_path(argv[0], run_name="__main__")
    if vllm_sync:
        _vllm_sync(ran["trainer"], vllm_sync)
    # One write of the whole line, from a line's start: print() writes the text and its newline apart, and the
    # other rank's line can land between them on the shared pipe ("... own loss calls 0launched: rank 1 ...").
    rank, world = os.environ.get("RANK", 0), os.environ.get("WORLD_SIZE", 1)
    trainer = ran.get("trainer")
    line = (f"\nlaunched: rank {rank} of {world} under {seen['type']}; packed batches {counts['packed']}; "
            f"own loss calls {counts['own']}; 4-bit layers {_four_bit_layers(getattr(trainer, 'model', None))}; "
            f"reference saves {counts['ref_saves']}\n")
    if eight_bit := _eight_bit_layers(trainer):  # a line of its own, only then (the line above unchanged)
        line += f"launched: rank {rank} 8-bit layers {eight_bit}\n"
    if counts["per_layer_type"] or counts["one_window"]:
        masks = "a mask per layer type" if counts["per_layer_type"] else "one mask"
        line += (f"launched windows: rank {rank}; {masks}; packed batches with the window in effect "
                 f"{counts['windowed']}\n")
    if rows_with is not None:
        line += f"launched rows: rank {rank}: {_rows_with(trainer, rows_with)}\n"
    sys.stdout.flush()
    os.write(1, line.encode())  # the process's own stdout: alignkit.core.launch quiets sys.stdout on ranks above 0


if __name__ == "__main__":
    main(sys.argv[1:])
