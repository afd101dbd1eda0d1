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

Where each part lives: this module is the training glue (`add_trainable_delta` sets a phase up on the loaded
model, `trainer_class` gives the run's trainer LoTA checkpoints and reference, `save_run` ends the run);
phases 1 and 2 are alignkit.train.lota_mask (`calibrate`, `compute_mask`); the delta itself (`SparseDelta`,
`reference_mode`, `check_launch`), its files and what every loader does with a LoTA run folder (W += D on load, on
top of any chain of LoRA adapters or earlier deltas, so evaluate.py and merge.py take it; `add_deltas`, a task
merge) are alignkit.modeling.lota_delta.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.modeling.lota_delta import (
    MASK_FILE, attach, load_mask, log_trainable, model_deltas, overlap, read_delta, reference_mode, save_delta,
    target_modules, weight_shapes,
)


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
    shapes = weight_shapes(modules)
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
    log_trainable(model, "sparse" if mask is not None else "dense calibration")
    return model


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
            if not self.args.should_save:  # transformers calls it on every rank (DeepSpeed, DDP): the writer alone writes
                return  # (rank 1 renamed the same temporary file rank 0 had just renamed: a crash, by timing)
            out = Path(output_dir or self.args.output_dir)
            save_delta(self.accelerator.unwrap_model(self.model), out)
            torch.save(self.args, out / "training_args.bin")

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_delta_values(self.accelerator.unwrap_model(model or self.model), Path(resume_from_checkpoint))

    LoTATrainer.__name__ = LoTATrainer.__qualname__ = f"LoTA{base.__name__}"
    return LoTATrainer


def load_delta_values(model, checkpoint: Path) -> None:
    """Resume: put a checkpoint's values into the model's sparse deltas (same mask, checked)."""
    delta, _ = read_delta(checkpoint)
    for name, d in model_deltas(model).items():
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
    save_delta(model, Path(out_dir), base_source, extra, revision=getattr(s, "revision", None))
    tokenizer.save_pretrained(out_dir)
