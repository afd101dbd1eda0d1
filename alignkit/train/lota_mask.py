"""Phases 1 and 2 of a LoTA run (alignkit.train.lota): calibrate a dense delta, then keep the entries that moved most.

`calibrate` trains a dense delta on every targeted matrix for `--lota_calibration_steps` steps with the run's own
trainer (same data, loss and optimizer), takes the mask with `compute_mask` (per matrix or one global threshold,
never an entry of `--lota_exclude_mask`), saves it to the run folder and goes back to the starting weights with a
sparse delta on the mask. The delta itself and its files: alignkit.modeling.lota_delta.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.modeling.lota_delta import (
    MASK_FILE, attach, layers, load_mask, log_trainable, model_deltas, save_mask, weight_shapes,
)


def _let_the_next_trainer_start(trainer) -> None:
    """The calibration trainer is done; the run's own trainer comes next, in this process. Under DeepSpeed its
    Accelerator would refuse the plugin a second time ("You cannot pass in a `deepspeed_plugin` when creating a
    second `Accelerator`", accelerate/accelerator.py): the first one's engine and accelerate's shared state go with
    the calibration (the process group stays)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        from accelerate.state import AcceleratorState

        trainer.accelerator.free_memory()  # the DeepSpeed engine and its optimizer state
        AcceleratorState._reset_state()


def calibrate(model, s, run_folder: Path, make_trainer, args) -> dict[str, torch.Tensor]:
    """Phases 1 and 2 when the model carries a dense delta: train it, take the mask, go back to the starting
    weights with a sparse delta. `make_trainer(args)` builds the run's own trainer (same data and loss)."""
    import dataclasses

    deltas = model_deltas(model)
    if any(d.lota_indices is not None for d in deltas.values()):
        return {n: d.lota_indices for n, d in deltas.items()}  # the mask is given: nothing to calibrate
    cal_args = dataclasses.replace(
        args, output_dir=str(Path(run_folder, "lota-calibration")), max_steps=s.lota_calibration_steps,
        save_strategy="no", eval_strategy="no", report_to="none", load_best_model_at_end=False,
    )
    logger.info(f"LoTA calibration: {s.lota_calibration_steps} dense steps to find the mask")
    calibration = make_trainer(cal_args)
    calibration.saves_on_sigterm = False  # a stop calibrates again from its start (README)
    calibration.train()
    main = calibration.accelerator.is_main_process  # read before the state is reset
    _let_the_next_trainer_start(calibration)
    with contextlib.suppress(OSError):
        Path(cal_args.output_dir).rmdir()  # it only held what save_strategy "no" never writes
    modules = {n: m for n, m in layers(model) if n in deltas}
    shapes = weight_shapes(modules)
    exclude = load_mask(s.lota_exclude_mask, shapes, "--lota_exclude_mask") if s.lota_exclude_mask else None
    dense = {n: d.dense() for n, d in deltas.items()}
    moved = sum(int(torch.count_nonzero(d)) for d in dense.values())
    logger.info(f"LoTA calibration moved {moved:,} entries")
    if moved == 0:  # a mask over zeros is any mask: the warmup held the learning rate at 0 for every step
        from alignkit.core.errors import UserError

        raise UserError(f"LoTA's {s.lota_calibration_steps} calibration steps moved no weight (the learning rate stayed "
                        "0: --warmup_ratio/--warmup_steps covers them), so the mask would be arbitrary. Raise "
                        "--lota_calibration_steps, or lower the warmup")
    mask = compute_mask(dense, s.lota_sparsity, s.lota_mask_scope, exclude)
    _check_every_process_has(mask)
    # Every process holds the same mask (the launch keeps the dense delta in step); one writes it: two renaming
    # one temporary file into place raced, and the second crashed its rank.
    if main:
        save_mask(mask, shapes, Path(run_folder, MASK_FILE), {"sparsity": s.lota_sparsity, "scope": s.lota_mask_scope})
        kept, total = sum(m.numel() for m in mask.values()), sum(math.prod(v) for v in shapes.values())
        logger.info(f"LoTA mask: {kept:,} of {total:,} entries ({100 * kept / total:.2f}%) saved to "
                    f"{run_folder / MASK_FILE}")
    attach(model, modules, mask)  # back to the starting weights: the calibration delta is dropped
    log_trainable(model, "sparse")
    return mask


def _check_every_process_has(mask: dict[str, torch.Tensor]) -> None:
    """The processes of a launch compare their masks (a digest each): sparse steps on different entries per process
    would average gradients of entries another process does not train. A difference stops every process."""
    import hashlib

    from alignkit.core.errors import UserError
    from alignkit.core.launch import every_process

    hasher = hashlib.sha256()
    for name in sorted(mask):
        hasher.update(name.encode())
        hasher.update(mask[name].to(torch.int64).numpy().tobytes())
    seen = every_process(hasher.hexdigest())
    if differing := [rank for rank, other in enumerate(seen) if other != seen[0]]:
        raise UserError(f"LoTA's calibration gave rank {differing[0]} another mask than rank 0: the dense deltas went "
                        "apart between processes. Pass the mask with --lota_mask (from a one-process calibration)")


def compute_mask(deltas: dict[str, torch.Tensor], sparsity: float, scope: str = "matrix",
                 exclude: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{name: sorted flat indices} of the entries kept: the largest |delta|, share 1 - sparsity (the scopes: alignkit.train.lota)."""
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
