"""torch's CPU threads for a loaded model (`--num_threads`): one for a tiny model on a CPU, else the cores.

alignkit.modeling.models applies it after every load; a machine owner's OMP_NUM_THREADS wins.
"""

from __future__ import annotations

import os

import torch

from alignkit import logger


SMALL_MODEL = 50_000_000  # parameters; below this a CPU step is too short for a second thread to pay off


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def resolve_num_threads(requested: str, num_parameters: int) -> int:
    """torch's CPU threads: auto is OMP_NUM_THREADS when set, else 1 for a model under ~50M parameters on a CPU,
    else the physical cores.

    A small model's matrix products are too short to split: the threads mostly wait for each other, and on a
    busy machine for cores other processes hold (measured: tiny DPO 0.028 s/step with 1 thread, 1.9 s/step with 2
    at load average 4).
    """
    if requested != "auto":
        if not requested.isdigit() or int(requested) < 1:
            raise ValueError(f"--num_threads must be auto or a positive whole number, got {requested!r}")
        return int(requested)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])  # the machine's owner already chose
    if not torch.cuda.is_available() and num_parameters < SMALL_MODEL:
        return 1
    return physical_cores()


_threads_logged: int | None = None


def apply_num_threads(requested: str, model, preset: str | None = None) -> int:
    """Set torch's CPU threads for `model` (see resolve_num_threads); logs the choice once per value, naming the
    preset beside --num_threads where one is in use (the presets set it)."""
    global _threads_logged
    count = sum(p.numel() for p in model.parameters())
    threads = resolve_num_threads(requested, count)
    torch.set_num_threads(threads)
    if _threads_logged != threads:
        given = f"set by --num_threads or --preset {preset}" if preset else "set by --num_threads"
        why = given if requested != "auto" else "OMP_NUM_THREADS" if os.environ.get(
            "OMP_NUM_THREADS", "").isdigit() else (
            f"model of {count / 1e6:.1f}M parameters on a CPU: one thread is fastest, and robust on a busy machine"
            if threads == 1 and not torch.cuda.is_available() else "the physical cores")
        logger.info(f"threads: {threads} ({why})")
        _threads_logged = threads
    return threads
