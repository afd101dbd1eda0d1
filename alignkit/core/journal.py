"""The one journal: what every crash-safe loop (label.py's cache, MT-Bench's answers and judgments, AlpacaEval's
outputs and annotations, rl.py's judge, rlaif.py's rounds) writes through, so nothing done is lost on a crash.

- `AppendLog`: an append-only JSONL file of keyed records, locked against a second run, each record flushed
  and fsync'd before `append` returns; a torn last line (a SIGKILL mid-write) is dropped and cut off on open.
- `append_jsonl`: rows appended to an unkeyed JSONL file (one write, flushed and fsync'd), under a lock so
  threads never interleave their lines; `read_jsonl` reads such a file back, naming the file and line of a bad
  row, and with `repair_tail` cuts off a torn last line instead of failing on it.
- `write_atomic`, `write_json`, `write_jsonl`: a whole file replaced at once (temporary file, fsync, rename), so
  a reader sees the old file or the new one, never half of one.
- `threaded` (a concurrent map that yields results as they arrive, exceptions included), `batched` (the same
  for a function of a whole batch). Progress bars: alignkit.core.progress.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; keeping to one run per file is then the user's job
    fcntl = None


class InUse(UserError, RuntimeError):
    """Another run holds this journal: two would pay for the same requests twice. A RuntimeError as before."""


# ---------------------------------------------------------------------------------------------------------
# Append-only logs


class AppendLog:
    """An append-only JSONL file of {"key": ..., ...} records, loaded into `records` on open.

    A record is one line written by one write(), flushed and fsync'd before `append` returns, so a SIGKILL can
    at worst leave a torn last line: it is dropped, and cut off so the next record starts on a clean line. An
    exclusive lock keeps two runs off one log (they would pay for the same requests twice).
    """

    _open: dict[str, "AppendLog"] = {}

    def __init__(self, path: str | os.PathLike, owner: str = "alignkit", fix: str = "let it finish first"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stale = AppendLog._open.pop(str(self.path.resolve()), None)
        if stale is not None:  # an earlier run in this process (a notebook cell run again) never closed it
            stale.close()
        self._file = open(self.path, "a+b")
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                raise InUse(f"{self.path} is in use by another {owner} run; {fix}") from None
        AppendLog._open[str(self.path.resolve())] = self
        self._lock = threading.Lock()
        self.records: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        self._file.seek(0)
        lines = self._file.read().split(b"\n")
        end = 0
        for number, line in enumerate(lines[:-1], 1):  # every element but the last ended with a newline
            end += len(line) + 1
            try:
                record = json.loads(line)
                self.records[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    logger.warning(f"{self.path}: line {number} is not a journal record; ignored")
        if lines[-1]:  # no newline after it: the write was cut short
            logger.info(f"{self.path}: dropped a torn last line (a run was killed while writing it)")
            self._file.truncate(end)

    def __contains__(self, key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key):
        return self.records.get(key)

    def append(self, record: dict) -> None:
        with self._lock:  # worker threads may append too: one whole line at a time
            self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
            self.records[record["key"]] = record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # releases the lock
        AppendLog._open.pop(str(self.path.resolve()), None)


_append_lock = threading.Lock()



def read_json(path) -> dict:
    """A JSON object file as a dict; {} when it is missing or unreadable (a best-effort read of optional metadata)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def append_jsonl(path, rows) -> None:
    """Append `rows` (dicts) to JSONL file `path` in one write, flushed and fsync'd before this returns.

    One lock for all callers in the process, so threads appending to one file never interleave their lines.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
    with _append_lock, open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, what: str, repair_tail: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for each row; a bad row is an error naming the file and line, and `what` to do.

    repair_tail: a last line cut short (a run killed mid-write) is dropped from the file instead.
    """
    from alignkit.core.args import ConfigError

    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if repair_tail and i == len(lines) and not text.endswith("\n"):
                logger.info(f"{path}: dropping a last line cut short by an interrupted run")
                path.write_text(text[: len(text) - len(line)], encoding="utf-8")
                break
            raise ConfigError(f"{path}, line {i}: not valid JSON ({e.msg}); {what}") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}, line {i}: expected a JSON object, got {type(obj).__name__}; {what}")
        rows.append((i, obj))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Whole files, replaced atomically


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file, fsync'd and renamed over it: a crash leaves the old file
    or the new one, never half of one, and never a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path, data, indent: int = 2) -> Path:
    """`data` as indented JSON, written atomically (write_atomic)."""
    return write_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_jsonl(path, rows) -> Path:
    """`rows` as JSONL (one object a line, non-ASCII kept), written atomically (write_atomic)."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------------------
# Concurrency and progress


def threaded(fn, items, parallel: int, stop_on_error: bool = False):
    """Yield (item, fn(item) or the exception it raised) as results arrive, `parallel` calls at a time.

    Daemon threads: Ctrl-C ends the process at once rather than waiting for requests in flight. Their answers
    are lost, which costs nothing but resending them on the next run: nothing was journaled for them.
    stop_on_error: the first exception starts no further calls (for callers that raise it), as a caller that
    stops iterating does.
    """
    items = list(items)
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for item in items:
        todo.put(item)

    def work():
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(item)
            except Exception as e:  # noqa: BLE001 - reported to the caller, which counts it
                result = e
                if stop_on_error:
                    stop.set()
            done.put((item, result))

    for _ in range(min(parallel, len(items))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in items:
            item, result = done.get()
            yield item, result
            if stop_on_error and isinstance(result, Exception):
                return  # nothing further was started; the caller raises this one
    finally:
        stop.set()  # a caller that stops early (a fatal error, Ctrl-C) starts no further requests


def batched(fn, items, size: int):
    """Like `threaded` for a function of a whole batch (a local model): yield (item, result or exception)."""
    items = list(items)
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        try:
            results = fn(chunk)
        except Exception as e:  # noqa: BLE001
            results = [e] * len(chunk)
        yield from zip(chunk, results)

