"""Lottery Ticket Adaptation (LoTA, Panda et al. 2024): a sparse task vector instead of a LoRA adapter.

For each targeted weight matrix W (every linear layer but the LM head, or `--lota_target_modules`), the trained
model is W + D, where the delta D is nonzero only on a mask M found from the task itself. One run does all three
phases (sft.py and dpo.py with `--adapter lota`):

1. calibrate: dense fine-tuning of every targeted matrix for `--lota_calibration_steps` optimizer steps, with the
   run's own data, loss and optimizer (SFT loss for sft.py, the DPO loss for dpo.py): D_cal = W_cal - W.
2. mask: keep the share k = 1 - s (s = `--lota_sparsity`) of entries with the largest |D_cal|:
   - `matrix` scope: in each matrix of n entries, the floor(k * n) largest, so no matrix changes more than k of
     its entries;
   - `global` scope: the floor(k * N) largest over all N targeted entries together (one threshold);
   entries of `--lota_exclude_mask` (an earlier task's mask) are never chosen, so two tasks' deltas are disjoint.
   `--lota_mask FILE` skips phases 1 and 2 and uses a saved mask.
3. sparse training: back to the starting weights W (D_cal is dropped) and train D = scatter(M, v), where v holds
   one trainable value per masked entry. Entries outside M are not parameters at all, so no gradient, momentum or
   AdamW weight decay can move them: they stay exactly 0. AdamW's decay acts on v, i.e. it pulls the delta (not
   the weight) towards 0, as it does for LoRA's factors.

How it is built (`SparseDelta`): a `torch.nn.utils.parametrize` parametrization of each targeted `weight`
computes W + D in the forward pass (one `index_add` over the flattened weight, in float32), from the frozen
original W and the float32 values v; in bf16/fp16 the sum is rounded to the weight's dtype, exactly as the loader
rounds W + D when it adds the delta on load, so the loaded model is the trained one. Memory: the optimizer sees only v, so AdamW holds 2 floats per *masked* entry
(8 (1 - s) bytes per weight entry, 0.8 bytes at s = 0.9) and no dense state at all; the frozen W needs no gradient.
The dense gradient of one matrix exists transiently in the backward pass (as in any full fine-tuning) and is
reduced to its masked entries at once. Calibration is dense fine-tuning, so it holds dense AdamW state for the
targeted matrices while it runs; it is freed before sparse training starts. The paper's code instead trains the
dense weights with the optimizer step fused into the backward pass; a values-only parameter is what PyTorch
allows without a custom optimizer, and gives the same update on the masked entries.

The DPO reference is the starting weights: `reference_mode` switches every delta off (D = 0) for the reference
pass, so no second model copy is loaded. Started from a LoRA chain (an SFT adapter), the chain stays loaded,
frozen and active over the delta (which sits on the base weights, as it loads again), and the reference keeps on
the chain's adapters that `--reference_adapters` names, exactly as the LoRA path does. `--precompute_ref_log_probs`
and its disk cache (alignkit.train.refcache) work as for LoRA (the cache key skips the delta's tensors, which the
reference does not use). FSDP and ZeRO-3 are refused before loading (`check_launch`).

A finished run folder holds `lota_delta.safetensors` (per matrix `<name>.indices`, flat int32/int64 positions,
and `<name>.values`, float32), `lota_mask.safetensors` (the indices alone, with every targeted matrix's shape in
its metadata), `lota_config.json` (base model, sparsity, counts) and the tokenizer.
`alignkit.modeling.models.load_model` applies such a folder like an adapter: W += D on load (in full precision),
on top of any chain of LoRA adapters or earlier deltas, so evaluate.py and merge.py take it. `add_deltas` merges
two sparse deltas of the same base by addition (a task merge), reporting how many entries both touch.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from alignkit import logger
from alignkit.core.args import ConfigError

DELTA_FILE = "lota_delta.safetensors"
MASK_FILE = "lota_mask.safetensors"
CONFIG_FILE = "lota_config.json"
# Names of the delta's tensors inside the model's state dict; refcache skips them (the reference never uses them).
STATE_NAMES = ("lota_values", "lota_indices")


# ---------------------------------------------------------------------------------------------------------
# The delta on each targeted matrix


class SparseDelta(torch.nn.Module):
    """Parametrization weight -> weight + D. `indices` None: dense D (calibration); else D = scatter(indices, values)."""

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(weight.shape)
        size = weight.numel() if indices is None else indices.numel()
        self.lota_values = torch.nn.Parameter(torch.zeros(size, dtype=torch.float32, device=weight.device))
        self.register_buffer("lota_indices", None if indices is None else indices.to(weight.device, torch.int64))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        flat = weight.reshape(-1).float()
        if self.lota_indices is None:
            out = flat + self.lota_values
        else:
            out = flat.index_add(0, self.lota_indices, self.lota_values)
        return out.view(self.shape).to(weight.dtype)

    def dense(self) -> torch.Tensor:
        """D as a dense float32 tensor of the weight's shape."""
        values = self.lota_values.detach()
        if self.lota_indices is None:
            return values.view(self.shape).clone()
        flat = torch.zeros(math.prod(self.shape), dtype=torch.float32, device=values.device)
        return flat.index_add_(0, self.lota_indices, values).view(self.shape)


def _layers(model):
    """(name, module) of every module as the plain model names it. Under a PeftModel (a LoRA chain kept frozen
    under a LoTA run) a LoRA-wrapped layer stands for its base layer under its own name, and the adapters' own
    layers are left out, so the delta's names are the plain model's and it loads onto the base."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = model.get_base_model() if isinstance(model, PeftModel) else model
    tuners: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(t + ".") for t in tuners):
            continue  # inside a LoRA layer: its adapters (or its base layer, yielded below)
        if isinstance(module, BaseTunerLayer):
            tuners.append(name)
            module = module.get_base_layer()
        yield name, module


def target_modules(model, patterns=("all-linear",)) -> dict[str, torch.nn.Module]:
    """{module name: module} of the targeted linear layers: all but the LM head, or those whose name ends in a pattern."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head.get_base_layer() if isinstance(head, BaseTunerLayer) else head
    found = {}
    for name, module in _layers(model):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if list(patterns) == ["all-linear"] or any(name == p or name.endswith(f".{p}") for p in patterns):
            found[name] = module
    if not found:
        raise ConfigError(f"--lota_target_modules {list(patterns)} matches no linear layer of this model")
    return found


def _deltas(model) -> dict[str, SparseDelta]:
    return {
        name: module.parametrizations["weight"][0]
        for name, module in _layers(model)
        if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations["weight"][0], SparseDelta)
    }


def has_delta(model) -> bool:
    return bool(_deltas(model))


def attach(model, modules: dict[str, torch.nn.Module], mask: dict[str, torch.Tensor] | None) -> None:
    """Freeze everything, then put a trainable delta on each module: dense (mask None) or on the masked entries."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in modules.items():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)  # back to the start
        delta = SparseDelta(module.weight, None if mask is None else mask[name])
        parametrize.register_parametrization(module, "weight", delta, unsafe=True)
        module.parametrizations["weight"].original.requires_grad_(False)


def remove(model, merge: bool) -> None:
    """Drop every delta: folded into the weights (merge) or discarded (back to the starting weights)."""
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=merge)


@contextlib.contextmanager
def reference_mode(model):
    """The DPO reference: every delta off, i.e. the starting weights, for the duration of the block."""
    deltas = list(_deltas(model).values())
    for d in deltas:
        d.enabled = False
    try:
        yield
    finally:
        for d in deltas:
            d.enabled = True


# ---------------------------------------------------------------------------------------------------------
# Masks


def compute_mask(deltas: dict[str, torch.Tensor], sparsity: float, scope: str = "matrix",
                 exclude: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{name: sorted flat indices} of the entries kept: the largest |delta|, share 1 - sparsity (see module doc)."""
    check_sparsity(sparsity)
    keep = 1.0 - sparsity
    scores = {}
    for name, delta in deltas.items():
        score = delta.detach().abs().reshape(-1).float().cpu()
        if exclude is not None and name in exclude:
            score[exclude[name].long()] = -1.0  # never chosen: below every |delta|
        scores[name] = score
    mask = {}
    if scope == "matrix":
        for name, score in scores.items():
            k = min(math.floor(keep * score.numel() + 1e-9), int((score >= 0).sum()))
            mask[name] = torch.topk(score, k, sorted=False).indices.sort().values
    elif scope == "global":
        # One threshold over every targeted entry: the scores are concatenated once (4 bytes per entry, on the CPU).
        names = list(scores)
        flat = torch.cat([scores[n] for n in names])
        k = min(math.floor(keep * flat.numel() + 1e-9), int((flat >= 0).sum()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.topk(flat, k, sorted=False).indices] = True
        start = 0
        for n in names:
            part = chosen[start : start + scores[n].numel()]
            mask[n] = part.nonzero().reshape(-1)
            start += scores[n].numel()
    else:
        raise ConfigError(f"--lota_mask_scope must be matrix or global, got {scope!r}")
    return mask


def check_sparsity(sparsity: float) -> None:
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"--lota_sparsity must lie strictly between 0 and 1 (the share of entries kept frozen), got {sparsity}")


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def save_mask(mask: dict[str, torch.Tensor], shapes: dict[str, tuple], path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {n: idx.to(_index_dtype(math.prod(shapes[n]))).contiguous().cpu() for n, idx in mask.items()}
    meta = {"shapes": json.dumps({n: list(s) for n, s in shapes.items()}), **{k: str(v) for k, v in (extra or {}).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    # A crash never leaves a torn mask for a later run to reuse. Not journal.write_atomic: that takes the file
    # as bytes in memory, and a 7B model's mask indices are gigabytes.
    tmp.replace(path)


def load_mask(path: str | Path, shapes: dict[str, tuple], what: str = "--lota_mask") -> dict[str, torch.Tensor]:
    """Read a mask file and check that it was made for a model with exactly these targeted matrices."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file (pass a {MASK_FILE} or a LoTA run folder)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        saved = {n: tuple(s) for n, s in json.loads(meta.get("shapes", "{}")).items()}
        tensors = {n: f.get_tensor(n).long() for n in f.keys()}
    missing, extra = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    if missing or extra:
        raise ConfigError(
            f"{what} {path} was made for another model or other --lota_target_modules: "
            f"{len(missing)} targeted matrices missing from it (e.g. {missing[:2]}), {len(extra)} unknown here "
            f"(e.g. {extra[:2]}). Use a mask from a run on this base model with the same targets."
        )
    for n, shape in shapes.items():
        if tuple(saved[n]) != tuple(shape):
            raise ConfigError(
                f"{what} {path} was made for another model: {n} has shape {list(saved[n])} there, {list(shape)} here"
            )
        idx = tensors.get(n, torch.zeros(0, dtype=torch.long))
        if idx.numel() and (idx.min() < 0 or idx.max() >= math.prod(shape)):
            raise ConfigError(f"{what} {path} is damaged: indices of {n} fall outside its {list(shape)} entries")
        tensors[n] = idx
    return tensors


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    """Entries two masks share."""
    return sum(int(torch.isin(a[n], b[n]).sum()) for n in a.keys() & b.keys())


# ---------------------------------------------------------------------------------------------------------
# Training: the three phases


def _shapes(modules) -> dict[str, tuple]:
    return {n: tuple(m.weight.shape) for n, m in modules.items()}


def add_trainable_delta(loaded, s, run_folder: Path | None = None, resume_from: str | None = None):
    """Phase setup on `loaded` (alignkit.modeling.models.Loaded): the model with a dense delta to calibrate, or with the
    sparse delta of `--lota_mask` (or of this run's own mask when resuming) ready to train."""
    model = loaded.model
    if loaded.quantization != "none":
        raise ConfigError("--adapter lota needs full-precision weights (the delta is added to them): pass --quantization none")
    if loaded.frozen:
        # A LoRA chain under the run (an SFT adapter) stays loaded, frozen and active, with the delta on the base
        # weights under it: the model as it loads again (deltas into W, adapters on top), and the reference can
        # keep any first part of the chain on (--reference_adapters), as for LoRA.
        logger.info(f"LoTA: the loaded adapters ({', '.join(loaded.adapters)}) stay frozen over the delta")
    modules = target_modules(model, s.lota_target_modules)
    shapes = _shapes(modules)
    own = Path(run_folder, MASK_FILE) if run_folder else None
    mask = None
    if s.lota_mask:
        mask = load_mask(s.lota_mask, shapes)
    elif resume_from and own and own.is_file():
        mask = load_mask(own, shapes, "this run's mask")
        logger.info(f"LoTA: resuming with this run's mask {own}")
    if mask is not None and s.lota_exclude_mask:
        shared = overlap(mask, load_mask(s.lota_exclude_mask, shapes, "--lota_exclude_mask"))
        if shared:
            raise ConfigError(f"--lota_mask {s.lota_mask} shares {shared} entries with --lota_exclude_mask {s.lota_exclude_mask}")
    attach(model, modules, mask)
    _log_trainable(model, "sparse" if mask is not None else "dense calibration")
    return model


def _log_trainable(model, phase: str) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"LoTA {phase}: {trainable:,} trainable values of {total:,} parameters ({100 * trainable / total:.3f}%)")


def calibrate(model, s, run_folder: Path, make_trainer, args) -> dict[str, torch.Tensor]:
    """Phases 1 and 2 when the model carries a dense delta: train it, take the mask, go back to the starting
    weights with a sparse delta. `make_trainer(args)` builds the run's own trainer (same data and loss)."""
    import dataclasses

    deltas = _deltas(model)
    if any(d.lota_indices is not None for d in deltas.values()):
        return {n: d.lota_indices for n, d in deltas.items()}  # the mask is given: nothing to calibrate
    cal_args = dataclasses.replace(
        args, output_dir=str(Path(run_folder, "lota-calibration")), max_steps=s.lota_calibration_steps,
        save_strategy="no", eval_strategy="no", report_to="none", load_best_model_at_end=False,
    )
    logger.info(f"LoTA calibration: {s.lota_calibration_steps} dense steps to find the mask")
    make_trainer(cal_args).train()
    with contextlib.suppress(OSError):
        Path(cal_args.output_dir).rmdir()  # it only held what save_strategy "no" never writes
    modules = {n: m for n, m in _layers(model) if n in deltas}
    shapes = _shapes(modules)
    exclude = load_mask(s.lota_exclude_mask, shapes, "--lota_exclude_mask") if s.lota_exclude_mask else None
    mask = compute_mask({n: d.dense() for n, d in deltas.items()}, s.lota_sparsity, s.lota_mask_scope, exclude)
    save_mask(mask, shapes, Path(run_folder, MASK_FILE), {"sparsity": s.lota_sparsity, "scope": s.lota_mask_scope})
    kept, total = sum(m.numel() for m in mask.values()), sum(math.prod(v) for v in shapes.values())
    logger.info(f"LoTA mask: {kept:,} of {total:,} entries ({100 * kept / total:.2f}%) saved to {run_folder / MASK_FILE}")
    attach(model, modules, mask)  # back to the starting weights: the calibration delta is dropped
    _log_trainable(model, "sparse")
    return mask


@contextlib.contextmanager
def _patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def trainer_class(base):
    """`base` (AlignSFTTrainer or AlignDPOTrainer) with LoTA checkpoints (the sparse delta only) and reference."""

    class LoTATrainer(base):
        def __init__(self, *a, model=None, args=None, **kw):
            # A frozen LoRA chain under the delta: TRL would take the PeftModel for one whose "default" adapter
            # trains, so it gets the model inside; the PeftModel is kept to switch the chain for the reference.
            from peft import PeftModel

            self._lota_chain = model if isinstance(model, PeftModel) else None
            model = model.get_base_model() if self._lota_chain is not None else model
            # TRL's DPOTrainer loads a second model as reference for a model without PEFT unless it precomputes;
            # the reference here is the starting weights (reference_mode), so tell it it precomputes, and then
            # compute on the fly unless precomputing was asked for.
            self._lota_on_the_fly = hasattr(args, "precompute_ref_log_probs") and not args.precompute_ref_log_probs
            with contextlib.ExitStack() as stack:
                if self._lota_on_the_fly:
                    args.precompute_ref_log_probs = True
                    stack.callback(setattr, args, "precompute_ref_log_probs", False)
                    # TRL would also hash every weight for its own precompute cache, which nothing reads here.
                    from trl.trainer import dpo_trainer

                    if hasattr(dpo_trainer, "hash_module"):
                        stack.enter_context(_patched(dpo_trainer, "hash_module", lambda module: None))
                super().__init__(*a, model=model, args=args, **kw)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset if self._lota_on_the_fly else super()._precompute_ref_logps(dataset, name, batch_size)

        def _reference_mode(self, model):
            """The delta off, and of a frozen LoRA chain the adapters the LoRA path's reference keeps on."""
            stack = contextlib.ExitStack()
            stack.enter_context(reference_mode(model))
            if self._lota_chain is not None:
                from alignkit.modeling.models import reference_mode as chain_reference

                stack.enter_context(chain_reference(self._lota_chain, self.frozen_adapters,
                                                    getattr(self, "reference_adapters", None)))
            return stack

        def _save(self, output_dir=None, state_dict=None):
            out = Path(output_dir or self.args.output_dir)
            save_delta(self.accelerator.unwrap_model(self.model), out)
            torch.save(self.args, out / "training_args.bin")

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_delta_values(self.accelerator.unwrap_model(model or self.model), Path(resume_from_checkpoint))

    LoTATrainer.__name__ = LoTATrainer.__qualname__ = f"LoTA{base.__name__}"
    return LoTATrainer


# ---------------------------------------------------------------------------------------------------------
# Saving, loading, applying, merging


def save_delta(model, out: Path, base_source: str | None = None, extra: dict | None = None) -> None:
    """Write the sparse delta, its mask and (with base_source) lota_config.json to `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors, mask, shapes = {}, {}, {}
    for name, d in _deltas(model).items():
        if d.lota_indices is None:
            raise RuntimeError("LoTA: the model still carries a dense calibration delta; nothing sparse to save")
        shapes[name] = d.shape
        mask[name] = d.lota_indices
        tensors[f"{name}.indices"] = d.lota_indices.to(_index_dtype(math.prod(d.shape))).cpu().contiguous()
        tensors[f"{name}.values"] = d.lota_values.detach().float().cpu().contiguous()
    meta = {"shapes": json.dumps({n: list(s) for n, s in shapes.items()})}
    save_file(tensors, str(out / DELTA_FILE), metadata=meta)
    save_mask(mask, shapes, out / MASK_FILE)
    if base_source is not None:
        kept, total = sum(m.numel() for m in mask.values()), sum(math.prod(s) for s in shapes.values())
        config = {
            "lota": True,
            "base_model_name_or_path": str(Path(base_source).resolve()) if Path(base_source).exists() else base_source,
            "entries": kept, "targeted_entries": total, "kept_share": kept / total, **(extra or {}),
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_delta(folder: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple]]:
    """({name: (flat indices, float32 values)}, {name: shape}) of a LoTA folder (or its delta file)."""
    from safetensors import safe_open

    path = Path(folder)
    path = path / DELTA_FILE if path.is_dir() else path
    with safe_open(str(path), "pt") as f:
        shapes = {n: tuple(s) for n, s in json.loads((f.metadata() or {})["shapes"]).items()}
        delta = {n: (f.get_tensor(f"{n}.indices").long(), f.get_tensor(f"{n}.values").float()) for n in shapes}
    return delta, shapes


def load_delta_values(model, checkpoint: Path) -> None:
    """Resume: put a checkpoint's values into the model's sparse deltas (same mask, checked)."""
    delta, _ = read_delta(checkpoint)
    for name, d in _deltas(model).items():
        indices, values = delta[name]
        if d.lota_indices is None or not torch.equal(indices.to(d.lota_indices.device), d.lota_indices):
            raise ConfigError(f"{checkpoint} was trained with another LoTA mask than this run's ({name})")
        with torch.no_grad():
            d.lota_values.copy_(values)


def save_run(model, tokenizer, out_dir, base_source: str, s=None) -> None:
    """The end of a LoTA run: the sparse delta, the mask, lota_config.json and the tokenizer."""
    extra = {}
    if s is not None:
        extra = {k: getattr(s, k) for k in ("lota_sparsity", "lota_mask_scope", "lota_target_modules", "lota_exclude_mask")}
    save_delta(model, Path(out_dir), base_source, extra)
    tokenizer.save_pretrained(out_dir)


def is_delta_folder(source: str) -> bool:
    return Path(source, CONFIG_FILE).is_file() and Path(source, DELTA_FILE).is_file()


def resolve_chain(base_id: str, chain: list[str], adapter_chain, revision=None) -> tuple[str, list[str], list[str]]:
    """Extend alignkit.modeling.models.adapter_chain through LoTA folders: (base model, LoRA adapters, LoTA deltas).

    Every part adds to the weights (LoRA as B A x beside W, a delta into W), so the deltas can go on the base in
    any order before the adapters and give the same model."""
    deltas: list[str] = []
    while is_delta_folder(base_id):
        deltas.insert(0, base_id)
        if len(deltas) > 8:
            raise ConfigError(f"LoTA chain from {base_id} is longer than 8: does a delta name itself as its base?")
        base = json.loads(Path(base_id, CONFIG_FILE).read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{base_id}/{CONFIG_FILE} has no base_model_name_or_path")
        base_id, under = adapter_chain(base, revision)
        chain = under + chain
    return base_id, chain, deltas


def check_launch(s, sharded: str | None) -> None:
    """Refuse `--adapter lota` under a sharded launch (`sharded`: alignkit.modeling.models._sharded_launch), before
    the model loads. FSDP flattens each layer's parameters into one tensor of one dtype, which the float32 delta
    values beside bf16 weights break ("Must flatten tensors with uniform dtype"); ZeRO-3 partitions every weight,
    so each SparseDelta would take its shape from an empty [0] partition and train nothing. DDP and ZeRO-2 keep
    whole weights on every process, and LoRA shards under both."""
    if sharded and getattr(s, "adapter", "lora") == "lota":
        from alignkit.core.launch import refusal

        raise ConfigError(refusal(s, ""))  # the launch's own line (alignkit.core.launch.refusal)


def full_precision(s, quantization: str, deltas: list[str]) -> str:
    """The quantization to load with: none for a LoTA run or a model with deltas (they add to full weights)."""
    if quantization == "none" or not (deltas or getattr(s, "adapter", "lora") == "lota"):
        return quantization
    if s.quantization in ("4bit", "8bit"):
        what = "--adapter lota" if getattr(s, "adapter", "lora") == "lota" else f"the LoTA delta {deltas[-1]}"
        raise ConfigError(f"{what} needs full-precision weights, not --quantization {s.quantization}: pass --quantization none")
    logger.info("quantization: none (a LoTA delta adds to the weights, which must be in full precision)")
    return "none"


def apply_deltas(model, deltas: list[str]) -> None:
    """W += D for each LoTA folder, in place, after checking the delta fits this model."""
    for folder in deltas:
        delta, shapes = read_delta(folder)
        modules = target_modules(model, [n.rsplit(".", 1)[-1] for n in shapes]) if shapes else {}
        for name, shape in shapes.items():
            module = modules.get(name)
            if module is None or tuple(module.weight.shape) != tuple(shape):
                here = None if module is None else list(module.weight.shape)
                raise ConfigError(f"LoTA delta {folder} does not fit this model: {name} is {list(shape)} there, {here} here")
            indices, values = delta[name]
            with torch.no_grad():
                flat = module.weight.data.view(-1)
                flat.copy_(flat.float().index_add(0, indices.to(flat.device), values.to(flat.device)).to(flat.dtype))
        logger.info(f"LoTA delta applied: {folder}")


def add_deltas(a: str | Path, b: str | Path, out: str | Path) -> dict:
    """Task merge: D = D_a + D_b, a LoTA folder on the same base. Returns counts, overlap included."""
    delta_a, shapes_a = read_delta(a)
    delta_b, shapes_b = read_delta(b)
    config_a = json.loads(Path(a, CONFIG_FILE).read_text())
    config_b = json.loads(Path(b, CONFIG_FILE).read_text())
    base_a, base_b = config_a["base_model_name_or_path"], config_b["base_model_name_or_path"]
    same = lambda x, y: Path(x).resolve() == Path(y).resolve() if Path(x).exists() else x == y  # noqa: E731
    # Two tasks trained from one base, or a delta trained on top of the other (sequential tasks): then the sum
    # sits on the lower one's base.
    base = base_a if same(base_a, base_b) else base_b if same(base_a, b) else base_a if same(base_b, a) else None
    if base is None or shapes_a != shapes_b:
        raise ConfigError(
            f"{a} and {b} are deltas of different models ({base_a} vs {base_b}, or other targets): only deltas of "
            "one base, or a delta and the one it was trained on, add up"
        )
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, mask, shared = {}, {}, 0
    for name, shape in shapes_a.items():
        (ia, va), (ib, vb) = delta_a[name], delta_b[name]
        dense = torch.zeros(math.prod(shape)).index_add_(0, ia, va).index_add_(0, ib, vb)
        indices = torch.unique(torch.cat([ia, ib]))  # sorted
        shared += int(torch.isin(ia, ib).sum())
        mask[name] = indices
        tensors[f"{name}.indices"] = indices.to(_index_dtype(math.prod(shape)))
        tensors[f"{name}.values"] = dense[indices].contiguous()
    save_file(tensors, str(out / DELTA_FILE), metadata={"shapes": json.dumps({n: list(s) for n, s in shapes_a.items()})})
    save_mask(mask, shapes_a, out / MASK_FILE)
    kept = sum(m.numel() for m in mask.values())
    total = sum(math.prod(s) for s in shapes_a.values())
    report = {"entries_a": sum(v[0].numel() for v in delta_a.values()), "entries_b": sum(v[0].numel() for v in delta_b.values()),
              "overlap": shared, "entries": kept}
    (out / CONFIG_FILE).write_text(json.dumps({
        "lota": True, "base_model_name_or_path": base, "merged_from": [str(a), str(b)],
        "targeted_entries": total, "kept_share": kept / total, **report,
    }, indent=2))
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        if Path(a, name).is_file():
            (out / name).write_bytes(Path(a, name).read_bytes())
    logger.info(f"LoTA merge: {report['entries_a']:,} + {report['entries_b']:,} entries, {shared:,} overlap -> {out}")
    return report
