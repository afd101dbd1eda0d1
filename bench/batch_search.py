"""bench/gpu_dpo.py's per-device batch "as large as fits": a search per configuration.

Each try runs one configuration's DPO steps at one batch size (pairs per device) on its worst pairs: a short
prompt and two answers that max_length cuts, so every row is max_length tokens and a packed pair is nearly
2 x max_length: the most memory a batch of the real data can take. A try runs in a process of its own: after a
CUDA out-of-memory error the process's allocator is not to be trusted, and its peak memory is its own. The search
doubles the batch from a start while it fits (up to a cap), or halves it until one fits, and keeps the largest
that did: a power-of-two multiple of the start, within a factor of two of the true limit, in a few tries (each
one model load: `--batch N` in gpu_dpo.py skips the search).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from bench import common

# What an out-of-memory failure says: torch's error (in process, or in a worker's stderr), cuBLAS's, the host's.
OOM_MARKS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "MemoryError")
PROMPT_WORDS = 8  # the worst pairs' prompt: short, so sharing saves little and the rows are all answer


def largest_batch(fits: Callable[[int], bool], start: int = 4, cap: int = 64) -> tuple[int | None, list[list]]:
    """The largest batch that fit, doubling from `start` while `fits` says yes (never past `cap`), or halving from
    it until one fits; None when not even 1 does. Also every try, in order: [batch, fitted]."""
    tries: list[list] = []

    def attempt(batch: int) -> bool:
        tries.append([batch, bool(fits(batch))])
        return tries[-1][1]

    batch = max(1, min(start, cap))
    if attempt(batch):
        while batch * 2 <= cap and attempt(batch * 2):
            batch *= 2
        return batch, tries
    while batch > 1:
        batch //= 2
        if attempt(batch):
            return batch, tries
    return None, tries


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a try failed for memory (then the batch does not fit) rather than for a bug (then the search stops)."""
    return isinstance(error, MemoryError) or any(mark in f"{type(error).__name__}: {error}" for mark in OOM_MARKS)


def worst_rows(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """n pairs whose rows are all cut at max_length: a short prompt, answers longer than max_length (one word is one
    token with bench.common's tokenizer)."""
    rng = random.Random(seed)
    helpful, filler = common.helpful_and_filler()
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(filler) for _ in range(PROMPT_WORDS))
        chosen, rejected = (common._answer(rng, max_length, rate, helpful, filler)
                            for rate in (common.CHOSEN_RATE, common.REJECTED_RATE))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def cached(path: Path, key: str, search: Callable[[], dict]) -> dict:
    """`search()`'s result under `key` in the JSON file `path`, computed once: a later call with the same --work
    folder (a short GPU lease runs one scenario per call) reuses it."""
    found = json.loads(path.read_text()) if path.is_file() else {}
    if key not in found:
        found[key] = search()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found, indent=1))
    return found[key]
