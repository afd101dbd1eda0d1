"""Reference log-probs cached on disk: a DPO rerun with the same inputs skips the reference pass.

With `--precompute_ref_log_probs`, the reference runs over the whole dataset once before training (TRL's
DPOTrainer calls `_precompute_ref_logps`, which AlignDPOTrainer routes here). TRL's own cache lives in the
dataset's cache folder, keyed by the dataset fingerprint and a hash of the whole model, and so never survives
the process here: alignkit's loader returns in-memory datasets (no cache folder), and the model hash covers the
freshly initialised trainable adapter too (trl#3985 asks for a reusable cache).

Here the key is exactly what the reference log-probs depend on:
- the base model: its config, attention implementation and every tensor of its state dict except the trained
  (and TRL's "ref" copy of it) adapters, so frozen adapters the run sits on (an SFT adapter) count, with their
  configs (alpha / r scales their weights). Whole tensors: under ZeRO-3 (or FSDP2) each shard is gathered, one
  tensor at a time, and the main process alone hashes and broadcasts the key;
- the data as the collator sees it: the tokenized prompt, chosen and rejected ids, in order;
- max_length and truncation_mode (they cut sequences), ld_alpha (it weights tokens), bf16/fp16 autocast;
- how the pass ran: packed (prefix sharing, and on which path) or unshared (`computed_as`). Both give the same
  log-probs to float rounding, but a packed entry from before the packed mask kept sliding windows was wrong for
  windowed models, so a change of mode, or of the packing code (KEY_VERSION), never reuses an entry;
- the trainer class, this module's KEY_VERSION and the library versions (a new kernel can change the numbers).
Anything else (beta, loss type, LoRA rank of the new adapter, learning rate, batch size) does not change the
reference log-probs, so runs that differ only there share one cache entry. Batch size only changes padding,
and so the last float bits of the values, not their meaning.

Entries are `$ALIGNKIT_CACHE/ref_logps/<key>.safetensors` (float32 `ref_chosen_logps` and
`ref_rejected_logps`, one value per row), written by the main process to a temporary file and renamed, so a
crash never leaves a torn entry. They are a few bytes per pair; delete the folder to clear them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core.digests import digest
from alignkit.modeling.identity import hardware

# 2: the reference sums apply ld_alpha. 3: the packed pass keeps sliding windows, and the key says packed or
# unshared. Bump when the reference computation in alignkit.train.trainers or alignkit.train.prefix changes.
KEY_VERSION = 4
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def cache_root() -> Path:
    from alignkit.core.paths import cache_dir

    return cache_dir() / "ref_logps"


def _canonical(value):
    """JSON-safe and order-stable: sets are sorted (their iteration order changes between processes)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # dtypes, enums


@contextlib.contextmanager
def full_tensor(tensor):
    """The whole of `tensor`, also when this process holds only a shard of it.

    A DeepSpeed ZeRO-3 parameter (it has `ds_status`; its `.data` is an empty placeholder) is gathered with
    `deepspeed.zero.GatheredParameters`, an FSDP2 / tensor-parallel DTensor with `full_tensor()`. Both are
    collective: every process must ask for the same tensors in the same order.
    """
    if hasattr(tensor, "ds_status"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            yield tensor.data
        return
    yield tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it private
        from torch.distributed._tensor import DTensor
    return isinstance(tensor, DTensor)


def _sharded(tensor) -> bool:
    return hasattr(tensor, "ds_status") or _is_dtensor(tensor)


def model_fingerprint(model, skip_adapters=(), hash_here: bool = True) -> str | None:
    """sha256 of the base config and every full tensor of `model` outside the adapters in `skip_adapters`.

    Sharded parameters (ZeRO-3, FSDP2) are gathered one at a time, so a process never holds more than one whole
    tensor beyond its shard. Only where `hash_here` (the main process) is anything hashed; the others return None
    and only take part in the gathers. Under FSDP's RAM-efficient loading the other processes hold empty
    placeholders until the model is wrapped, so their own hash would be meaningless anyway.
    """
    state = model.state_dict(keep_vars=True)  # keep_vars: the Parameter objects, which carry ZeRO-3's ds_* fields
    names = sorted(n for n in state if not any(part in skip_adapters for part in n.split(".")))
    if not hash_here:
        for name in names:  # the same collectives, in the same order, as the hashing process
            if _sharded(state[name]):
                with full_tensor(state[name]):
                    pass
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version"):  # a moved folder or a new version is the same model
        config.pop(volatile, None)
    peft_configs = getattr(model, "peft_config", {})
    described = {
        "config": config, "attn": getattr(base.config, "_attn_implementation", None),
        "adapters": {n: c.to_dict() for n, c in peft_configs.items() if n not in skip_adapters},
    }
    h = hashlib.sha256(json.dumps(_canonical(described), sort_keys=True).encode())
    for name in names:
        with full_tensor(state[name]) as tensor:
            tensor = tensor.detach()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            # Raw bytes, whatever the dtype (bf16 and 4-bit packed weights included): an exact fingerprint.
            h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(dataset) -> str:
    """sha256 of the tokenized prompt/chosen/rejected ids, row by row in order (what the collator reads)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.select_columns(list(ID_COLUMNS)).with_format("arrow")[:]  # applies any shuffle/select
    h = hashlib.sha256(f"rows:{len(dataset)}".encode())
    for column in ID_COLUMNS:
        ids = table[column].combine_chunks()
        h.update(column.encode())
        h.update(pc.cast(ids.value_lengths(), pa.int64()).to_numpy(zero_copy_only=False).tobytes())
        h.update(pc.cast(ids.flatten(), pa.int64()).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def cache_key(trainer, dataset) -> str:
    """The cache key of `dataset`'s reference log-probs under `trainer` (an AlignDPOTrainer), the same on every
    process: the main process computes it from the full parameters and broadcasts it (under ZeRO-3 each
    process holds a shard; under FSDP's RAM-efficient loading the others hold placeholders)."""
    from alignkit.modeling.models import TRAINABLE

    args = trainer.args
    main = trainer.accelerator.is_main_process
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = {TRAINABLE, "ref"}  # TRL's "ref" is a copy of the trained adapter, never part of our reference
    trained |= {"lota_values", "lota_indices"}  # a LoTA delta (alignkit.modeling.lota_delta.STATE_NAMES): off in the reference
    fingerprint = model_fingerprint(model, skip_adapters=trained, hash_here=main)  # every process: collectives
    key = None
    if main:
        parts = {
            "key_version": KEY_VERSION,
            "trainer": type(trainer).__qualname__,
            "versions": {p: version(p) for p in ("torch", "transformers", "trl", "peft")},
            "model": fingerprint,
            "frozen_adapters": list(getattr(trainer, "frozen_adapters", [])),
            "reference_adapters": list(getattr(trainer, "reference_adapters", getattr(trainer, "frozen_adapters", []))),
            "data": data_fingerprint(dataset),
            "max_length": args.max_length, "truncation_mode": args.truncation_mode, "ld_alpha": args.ld_alpha,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else str(getattr(model, "dtype", "")),
            # The kernels that computed them (alignkit.modeling.identity's hardware class, the attention): the same
            # weights give other log-probs in the last bits on another device or attention implementation.
            "hardware": hardware(),
            "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "computed_as": computed_as(trainer),
        }
        key = digest(_canonical(parts), 32, ensure_ascii=True)
    return _from_main_process(trainer, key)


def computed_as(trainer) -> str:
    """How `trainer`'s reference pass runs: "packed:<path>" (alignkit.train.prefix.sharing_path) or "unshared"."""
    from alignkit.train import prefix

    if not getattr(trainer, "prefix_sharing", False):
        return "unshared"
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return f"packed:{prefix.sharing_path(base.config, model_class=type(base)).kind}"


def _from_main_process(trainer, key: str | None) -> str:
    if trainer.accelerator.num_processes == 1:
        return key
    from accelerate.utils import broadcast_object_list

    box = [key]
    broadcast_object_list(box, from_process=0)
    return box[0]


def load(path: Path, rows: int) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
        logger.warning(f"ignoring unreadable reference log-prob cache {path}: {e}")
        return None
    if set(tensors) != set(COLUMNS) or any(t.shape != (rows,) for t in tensors.values()):
        logger.warning(f"ignoring reference log-prob cache {path}: it does not hold {rows} rows")
        return None
    return tensors


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Written through the journal's atomic write (temporary file, fsync, rename): readers see a whole file or
    none. Two floats a row, so the file is built in memory first."""
    from safetensors.torch import save as to_bytes

    from alignkit.core.journal import write_atomic

    write_atomic(path, to_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def compute(trainer, dataset, batch_size: int) -> dict[str, torch.Tensor]:
    """Every row's reference log-probs, in dataset order, on every process.

    TRL's own pass (`DPOTrainer._precompute_ref_logps`) hands the values between processes through a file in
    the dataset's cache folder; alignkit's in-memory datasets have a temporary folder per process, so under
    `accelerate launch` the other processes could not find it. Here each process computes its share and
    `gather_for_metrics` gives every process all rows, in order (and without the duplicates that even out the
    last batch).
    """
    from torch.utils.data import DataLoader
    from trl.models import prepare_deepspeed

    args = trainer.args
    loader = trainer.accelerator.prepare(DataLoader(
        dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False,
        num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
    ))
    model = trainer.model
    if trainer.is_deepspeed_enabled:  # before training, ZeRO-3 parameters are still sharded: TRL's inference engine
        if trainer._precompute_engine is None:
            trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
        model = trainer._precompute_engine
    chosen, rejected = [], []
    from alignkit.core.progress import bar

    for batch in bar(loader, trainer.accelerator.is_main_process, desc="reference log-probs", unit="batch"):
        c, r = trainer.accelerator.gather_for_metrics(trainer.compute_ref_log_probs(model, batch))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return {"ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}


def with_ref_logps(trainer, dataset, batch_size: int):
    """`dataset` plus its reference log-prob columns: from the disk cache when the key matches, else computed
    and then stored (by the main process) for the next run."""
    from datasets import Dataset, concatenate_datasets

    from alignkit.core.launch import agreed_minimum

    key = cache_key(trainer, dataset)
    path = cache_root() / f"{key}.safetensors"
    tensors = load(path, len(dataset)) if path.is_file() else None
    # Every process must take the same branch, since computing is collective: a process that reuses the entry
    # while another computes would leave that one waiting forever. Each one reads its own cache folder, which
    # other machines of a multi-node launch may not share.
    if agreed_minimum(int(tensors is not None)) == 0 and tensors is not None:
        logger.info(f"reference log-probs: {path} is not readable on every process (a cache folder not shared "
                    "between machines?), so every process computes them")
        tensors = None
    if tensors is not None:
        logger.info(f"reference log-probs of {len(dataset)} pairs reused from {path}", extra={"every_rank": True})
    else:
        tensors = compute(trainer, dataset, batch_size)
        if trainer.accelerator.is_main_process:
            save(path, tensors, {"rows": str(len(dataset)), "max_length": str(trainer.args.max_length),
                                 "computed_as": computed_as(trainer)})
            logger.info(f"reference log-probs of {len(dataset)} pairs cached in {path}")
    columns = Dataset.from_dict({c: tensors[c].numpy() for c in COLUMNS})
    return concatenate_datasets([dataset, columns], axis=1)
