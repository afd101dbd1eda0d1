"""One training at a time in a run folder: its lock in `$ALIGNKIT_CACHE/run-locks/`, naming who holds it.

A second command (or notebook kernel) training the same folder would resume from, or move aside, a live run: it is
refused in one line naming the holder's process, program and start. The lock file lives in the cache folder, not in
the run folder (which may be moved aside while the run holds it) nor beside it (where a run that failed before
training would leave it in --output_dir), and goes with its run (alignkit.core.journal.let_go(remove=True)).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path

from alignkit.core.journal import InUse, hold, let_go

_TAKEN: set[Path] = set()  # the run folders whose lock this process holds: let go at exit (a run that failed after
# prepare_run and before training, a model that did not load, left its lock file in the cache otherwise)


def lock_file(folder: Path) -> Path:
    from alignkit.core.digests import digest
    from alignkit.core.paths import cache_dir

    return cache_dir() / "run-locks" / f"{digest(str(folder.resolve()), 16)}.lock"


def take(folder: Path) -> str | None:
    """Hold `folder`'s lock for this process, writing who holds it into the lock; None, or the refusal (one line)
    when another process holds it."""
    try:
        held = hold(lock_file(folder), "training", "let it finish first, or pass another --run_name", what=folder)
    except InUse:
        return (f"{folder} is in use by another training run{_holder(folder)}; let it finish first, or pass "
                "another --run_name")
    from alignkit.core.errors import is_notebook

    program = "a notebook kernel" if is_notebook() else Path(sys.argv[0]).name if sys.argv else "python"
    held.seek(0)
    held.truncate()
    held.write(json.dumps({"pid": os.getpid(), "program": program, "since": time.strftime("%H:%M")}).encode())
    held.flush()
    if not _TAKEN:
        atexit.register(release_all)
    _TAKEN.add(folder.resolve())
    return None


def release(folder: Path) -> None:
    """Let go of `folder`'s lock taken in this process (none: nothing), its file removed."""
    let_go(lock_file(folder), remove=True)
    _TAKEN.discard(folder.resolve())


def release_all() -> None:
    """Let go of every run folder's lock this process holds (at exit)."""
    for folder in list(_TAKEN):
        release(folder)


def held() -> set[Path]:
    return set(_TAKEN)


def _holder(folder: Path) -> str:
    """' (process N, PROGRAM, since HH:MM)' from the lock's holder, or "" where it says nothing readable. A notebook
    kernel holds it from its 'Run folder' cell until its training ends: an idle one must train or restart."""
    try:
        said = json.loads(lock_file(folder).read_text())
        who = f" (process {said['pid']}, {said['program']}, since {said['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return ""
    if said["program"] == "a notebook kernel":
        who += ": its training cell is running or still to run; restart that kernel to free the folder"
    return who + ")"
