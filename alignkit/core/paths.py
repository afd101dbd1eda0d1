"""Where alignkit keeps what it builds or downloads once: $ALIGNKIT_CACHE, default ~/.cache/alignkit, and how a
folder there is built once by one process while the others (ranks of one launch, parallel runs) wait for it; and
whether a folder a run writes its results into can be written (check_writable).

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
from alignkit.core.errors import UserError


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


def check_writable(folder, flag: str) -> None:
    """A folder the run can write its results into (created where missing), refused in one line before any work: a
    file there, or a folder without write permission or on a read-only file system, failed as the run folder was
    claimed, with a traceback, after the data and the model had loaded."""
    path = Path(folder).absolute()
    try:
        existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
        if existing.is_symlink() and not existing.exists():  # an unmounted disk's link, say
            raise UserError(f"{flag} {folder}: {existing} is a link to {os.readlink(existing)}, which is not there; "
                              "mount it, or pass another folder")
        if not existing.is_dir():
            raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; pass a folder (runs go under it)")
    except PermissionError:  # a folder above that this user may not even look into
        raise UserError(f"{flag} {folder}: cannot be looked into (no permission on a folder above it); pass a "
                          "folder you can write to") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        statvfs = getattr(os, "statvfs", None)  # not on Windows
        try:
            read_only = bool(statvfs and statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "a read-only file system" if read_only else "no write permission"
        raise UserError(f"{flag} {folder}: {existing} cannot be written ({why}); pass a folder you can write to")
    try:  # what permissions do not tell: a pseudo or full file system, a mount that refuses folders (/proc for root)
        os.rmdir(tempfile.mkdtemp(prefix=".alignkit-probe-", dir=existing))
    except OSError as error:
        raise UserError(f"{flag} {folder}: cannot make a folder in {existing} ({error.strerror}); pass a folder you "
                        "can write to") from None
