"""The judgments a run paid for, kept when its folder goes.

rl.py's `--reward judge` caches every judgment in the run folder (`judge.cache`, alignkit.train.rl_rewards). A run
that stops before its first checkpoint gives its folder back (alignkit.train.run_folder: removed, the earlier run put
back), and the requests made until then, paid for at an API, went with it. They are kept here instead: in the
folder's judge.cache again, under names of their own, where the next run's judge reads them (it reads every
judgments*.jsonl there; a judgment is keyed by the judge and what it judged, so it is right for any run).

A run that moves an earlier one aside (other settings: alignkit.train.run_folder) starts with the earlier run's
judgments in its own judge.cache (`carry_judgments`, hard links where the disk allows): the next command after a
stopped run moved the run put back aside again, its judge.cache with it, and paid for every judgment once more.
Copies already there by content are not carried twice.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from alignkit.core.journal import free_name
from alignkit.modeling.identity import file_hash, file_hashes

JUDGMENTS = "judge.cache"  # rl.py --reward judge's default cache in the run folder (alignkit.train.rl_rewards)


def remove_keeping_judgments(folder: Path, ignore_errors: bool = False) -> Path | None:
    """Remove a run folder that holds no checkpoint, but for the judgments its judge reward paid for: moved beside
    it (returned) for judgments_back. A removed judge.cache lost every request made before the first checkpoint.
    Only judgments files that hold a judgment count (a judge whose every request failed wrote none: nothing was
    paid for, and the log said so). ignore_errors: as shutil.rmtree's (a run's own failure path, which must not
    fail in turn)."""
    judged = folder / JUDGMENTS
    paid = None
    if judged.is_dir() and any(f.stat().st_size for f in judged.glob("judgments*.jsonl")):
        paid = free_name(folder.parent, f".{folder.name}.{JUDGMENTS}-kept")
        shutil.move(str(judged), paid)
    shutil.rmtree(folder, ignore_errors=ignore_errors)
    return paid


def judgments_back(paid: Path | None, folder: Path) -> str:
    """The judgments `remove_keeping_judgments` kept, in `folder`'s judge.cache again (beside the files of the run
    put back there, under names of their own: the judge reads every judgments*.jsonl there); what the log says."""
    if paid is None:
        return ""
    judged = folder / JUDGMENTS
    judged.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    there = _contents(judged)
    for file in sorted(paid.glob("judgments*.jsonl")):
        if _content(file) in there:  # carried from the run put back (carry_judgments): it has them
            continue
        stem = file.name.removesuffix(".jsonl").replace("judgments", f"judgments.kept-{stamp}", 1)
        shutil.move(str(file), free_name(judged, stem, ".jsonl"))
    shutil.rmtree(paid, ignore_errors=True)
    return f" (its paid judgments kept in {judged}, for the next run)"


def carry_judgments(earlier: Path, folder: Path) -> int:
    """The judgments of the run in `earlier` (moved aside), in `folder`'s judge.cache too, under names of their
    own, but for those there already by content; how many files were carried."""
    files = sorted((earlier / JUDGMENTS).glob("judgments*.jsonl"))
    if not files:
        return 0
    judged = folder / JUDGMENTS
    judged.mkdir(parents=True, exist_ok=True)
    linked = {_inode(f) for f in judged.glob("judgments*.jsonl")}
    there, carried = None, 0
    for file in files:
        if _inode(file) in linked:  # carried before, as a link: no need to read it
            continue
        there = _contents(judged) if there is None else there
        if (content := _content(file)) in there:
            continue
        stem = file.name.removesuffix(".jsonl").replace("judgments", f"judgments.from-{earlier.name}", 1)
        target = free_name(judged, stem, ".jsonl")
        try:  # the same file, no copy. This run never writes to it; the earlier run, moved back and resumed, appends
            os.link(file, target)  # to its own, and this folder's grows with it: more judgments, each a valid one
        except OSError:
            shutil.copy2(file, target)
        there.add(content)
        carried += 1
    return carried


def _inode(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_dev, stat.st_ino


def _content(file: Path) -> str:
    return file_hash(file)  # remembered by path, inode, size and times: each file read once


def _contents(judged: Path) -> set[str]:
    return set(file_hashes(sorted(judged.glob("judgments*.jsonl"))).values())
