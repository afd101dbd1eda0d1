"""Where alignkit keeps what it builds or downloads once: $ALIGNKIT_CACHE, default ~/.cache/alignkit, and how a
folder there is built once by one process while the others (ranks of one launch, parallel runs) wait for it.

A neutral module, so the MT-Bench data, the reference log-prob cache and converted GGUF models find their
folder without importing a preset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from alignkit import logger


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def build_once(target: Path, done: str, build: Callable[[Path], str], force: bool = False,
               current: Callable[[str], bool] | None = None) -> Path:
    """`target`, built by `build(work)` when its `done` file is missing (or `force`, or `current(its text)` says
    it was built from another recipe): `build` fills the fresh folder `work` and returns the `done` file's text,
    written last; `work` then becomes `target` at once.

    One process builds at a time (a lock file beside `target`): under accelerate launch every rank asks, the
    first builds and the others wait, then find it done. Nobody sees half a folder: a crashed build leaves only
    its own work folder behind, which is removed, and a half-built `target` without `done` is rebuilt.
    """
    from filelock import FileLock, Timeout

    target = Path(target)

    def built() -> bool:
        try:
            text = (target / done).read_text(encoding="utf-8")
        except OSError:
            return False
        return current is None or current(text)

    if built() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Whoever may build in the cache folder may take its lock: the folder's read and write bits, not the umask's.
    lock = FileLock(str(target.parent / f".{target.name}.lock"), mode=target.parent.stat().st_mode & 0o666)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        logger.info(f"waiting for another process to build {target}")
        lock.acquire()
    try:
        if built() and not force:  # built by the process that held the lock
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        work.chmod(target.parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would lock others out of a shared cache
        try:
            text = build(work)
            (work / done).write_text(text, encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)  # a build that crashed half-way, or the one `force` replaces
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        lock.release()
    return target
