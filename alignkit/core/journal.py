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

import atexit
import json
import os
import queue
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import ConfigError, Terminated, UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; keeping to one run per file is then the user's job
    fcntl = None


class InUse(UserError, RuntimeError):
    """Another run holds this journal: two would pay for the same requests twice. A RuntimeError as before."""


_held: dict[str, object] = {}


def _let_go_all() -> None:
    """At exit: close every hold (the OS lets go of the locks anyway; an open file left to the interpreter's
    teardown printed "ResourceWarning: unclosed file .../.evaluate.lock" where a library turns those warnings on)."""
    while _held:
        _held.popitem()[1].close()


atexit.register(_let_go_all)


def hold(path: str | os.PathLike, owner: str, fix: str, what=None):
    """`path` (made if missing) open with an exclusive lock for the rest of this process, so two runs on one
    journal or output folder (`what`, named in the refusal; default: the folder) never both pay a judge for the
    same requests: a second one is refused with InUse. Taken again in the same process (a notebook cell run
    twice), the earlier hold is let go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = _held.pop(str(path.resolve()), None)
    if stale is not None:
        stale.close()
    for _ in range(100):  # a holder removing the file as it lets go: take the next one (never 100 in a row)
        file = open(path, "a+b")
        if fcntl is None:
            break
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise InUse(f"{what or path.parent} is in use by another {owner} run; {fix}") from None
        try:  # locked the file still at `path`, not one its holder removed as it let go (let_go(remove=True))
            at, held = os.stat(path), os.fstat(file.fileno())
            if (at.st_dev, at.st_ino) == (held.st_dev, held.st_ino):
                break
        except FileNotFoundError:
            pass
        file.close()
    else:
        raise InUse(f"{what or path.parent}: its lock file {path} keeps being replaced by other runs; {fix}")
    _held[str(path.resolve())] = file
    return file


def let_go(path: str | os.PathLike, remove: bool = False) -> None:
    """Release a `hold` on `path` taken in this process (none taken: nothing); `remove`: delete the file first, still
    holding it (a lock file whose content is not kept: a run folder's; `hold` takes only the file at the path)."""
    held = _held.pop(str(Path(path).resolve()), None)
    if held is not None:
        if remove and fcntl is not None:
            Path(path).unlink(missing_ok=True)
        held.close()


# ---------------------------------------------------------------------------------------------------------
# Append-only logs


class AppendLog:
    """An append-only JSONL file of {"key": ..., ...} records, loaded into `records` on open.

    A record is one line written by one write(), flushed and fsync'd before `append` returns, so a SIGKILL can
    at worst leave a torn last line: it is dropped, and cut off so the next record starts on a clean line. An
    exclusive lock keeps two runs off one log (they would pay for the same requests twice).
    """

    def __init__(self, path: str | os.PathLike, owner: str = "alignkit", fix: str = "let it finish first"):
        self.path = Path(path)
        # Locked; an earlier run in this process that never closed it (a notebook cell run again) lets go first.
        self._file = hold(self.path, owner, fix, what=self.path)
        self._lock = threading.Lock()
        self.records: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        end = _whole_lines_end(data)
        for number, record in _records(data[:end]):
            if record is None:
                logger.warning(f"{self.path}: line {number} is not a journal record; ignored")
            else:
                self.records[record["key"]] = record
        if end < len(data):  # no newline after it: the write was cut short
            logger.info(f"{self.path}: dropped a torn last line (a run was killed while writing it)")
            self._file.truncate(end)

    def read_also(self, path: str | os.PathLike) -> None:
        """The records of another process's log beside this one (a launch's other ranks each write their own), for
        lookups only: its whole lines, this log's own record kept where both hold a key. Nothing is written there."""
        try:
            data = Path(path).read_bytes()
        except OSError:
            return
        for _, record in _records(data[:_whole_lines_end(data)]):
            if record is not None:  # the owner's own open reports a bad line
                self.records.setdefault(record["key"], record)

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


_append_lock = threading.Lock()


def _records(whole_lines: bytes):
    """(line number, record) for each non-blank line of `whole_lines`; record None where the line is no keyed
    JSON object."""
    for number, line in enumerate(whole_lines.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["key"]
        except (ValueError, KeyError, TypeError):
            record = None
        yield number, record


def _whole_lines_end(data: bytes) -> int:
    """The byte offset just past the last newline: what a writer killed mid-line left whole before it."""
    return data.rfind(b"\n") + 1


def free_name(folder, name: str, suffix: str = "") -> Path:
    """folder/NAME+SUFFIX, or NAME-2+SUFFIX, NAME-3+SUFFIX, ... when that is taken: where to move something aside
    (an earlier run, an earlier round's results, an earlier leaderboard) without landing on what an earlier move,
    even within the same second, put there."""
    n = 1
    while (path := Path(folder, f"{name}{f'-{n}' if n > 1 else ''}{suffix}")).exists():
        n += 1
    return path


def read_json(path) -> dict:
    """A JSON object file as a dict; {} when it is missing or unreadable (a best-effort read of optional metadata)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def append_jsonl(path, rows) -> None:
    """Append `rows` (dicts) to JSONL file `path` in one write, flushed and fsync'd before this returns.

    One lock for all callers in the process, so threads appending to one file never interleave their lines. A file
    whose last line lacks its newline (a write cut just before it, an editor) gets one first: the rows start on a
    line of their own instead of gluing onto that one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
    with _append_lock, open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, what: str, repair_tail: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for each row; a bad row is an error naming the file and line, and `what` to do.

    The text is UTF-8, a byte order mark at its start dropped (as the training data loader does); bytes that are
    not UTF-8 are an error naming the line, the byte and the fix (alignkit.core.data_files' one wording for it).
    repair_tail: a last line cut short (a run killed mid-write) is cut off the file instead, by truncating it to
    the end of the last whole line: a kill during the repair leaves every earlier line as it was (a rewrite of the
    whole file would not). A whole last row that only lacks its newline is kept, and the newline added. A cut may
    split the last line's last character: that line is torn anyway, so it is cut off too, not reported as not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = _whole_lines_end(data)
    lines = _text(data, path, repair_tail).split("\n")
    tail = lines.pop()  # after the last newline: "" or a last line without its newline (whole, or torn)
    rows = []
    for i, line in enumerate(lines + ([tail] if tail.strip() else []), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if repair_tail and i == len(lines) + 1:
                logger.info(f"{path}: dropping a last line cut short by an interrupted run")
                os.truncate(path, end)
                break
            raise ConfigError(f"{path}, line {i}: not valid JSON ({e.msg}); {what}") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}, line {i}: expected a JSON object, got {type(obj).__name__}; {what}")
        rows.append((i, obj))
    else:
        if repair_tail and tail.strip():  # whole, but the next append would glue onto it
            with _append_lock, open(path, "ab") as f:
                f.write(b"\n")
    return rows


def _text(data: bytes, path, repair_tail: bool) -> str:
    """`data` decoded as UTF-8 (a leading byte order mark dropped); not UTF-8 is a DataError naming the line.

    repair_tail: a last line without its newline that ends in part of a character (a write cut mid-character)
    has that part read as U+FFFD, as before, so that read_jsonl finds the line torn and cuts it off the file.
    """
    from alignkit.core.data_files import decode_text  # here, not at the top: it imports `datasets`, and every script
    # imports this module (through alignkit.core.args) long before it reads a JSONL file, if it ever does

    if repair_tail:
        end = _whole_lines_end(data)
        try:
            data[end:].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":  # only the last character is incomplete
                data = data[:end + e.start] + "\ufffd".encode()
    return decode_text(data, path)


# ---------------------------------------------------------------------------------------------------------
# Whole files, replaced atomically


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file, fsync'd and renamed over it: a crash leaves the old file
    or the new one, never half of one, and never a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a Ctrl-C: no stray temporary file beside the old one
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path, data, indent: int = 2) -> Path:
    """`data` as indented JSON, written atomically (write_atomic)."""
    return write_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_jsonl(path, rows) -> Path:
    """`rows` as JSONL (one object a line, non-ASCII kept), written atomically (write_atomic)."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------------------
# Concurrency and progress


_CTRL_C = object()  # threaded's marker in its results queue: Ctrl-C was pressed
_STOPPING = threading.Event()  # set from a Ctrl-C until the threaded() that saw it has finished
_SAME_PRESS = 0.25  # seconds: a SIGINT this soon after threaded's first is that one delivered twice (_first_ctrl_c_stops)


def stopping() -> bool:
    """Whether a Ctrl-C asked the calls under way to finish: one that would send another request (an MT-Bench
    match's second order) sends none."""
    return _STOPPING.is_set()


def threaded(fn, items, parallel: int, stop_on_error: bool = False, grace: float = 30.0):
    """Yield (item, fn(item) or the exception it raised) as results arrive, `parallel` calls at a time.

    Ctrl-C (in the main thread, wherever it lands: waiting, or in the caller's own code between two results)
    starts no further call, and the calls in flight (up to `parallel` requests a paid API bills) are still yielded
    as they finish, for up to `grace` seconds, so that the caller keeps what was paid for; then KeyboardInterrupt.
    A second Ctrl-C leaves at once. A SIGTERM (alignkit.core.errors.Terminated) leaves at once too: a scheduler
    kills soon after it. Daemon threads: a call still running then dies with the process (its answer is lost, and
    the next run sends it again).
    A worker runs no further ahead of the caller than `parallel` results not yet taken: a caller that stops (a
    server down, the sixth failure) has sent at most `parallel` requests past the one it stops on, however slowly it
    took them (a busy machine let one worker send 3 more).
    stop_on_error: the first exception starts no further calls (for callers that raise it), as a caller that
    stops iterating does.
    """
    items = list(items)
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    taken, finished, lock = [0], [0], threading.Lock()  # calls started; calls whose result went into `done`
    for item in items:
        todo.put(item)

    room = threading.Semaphore(parallel)  # results not yet taken by the caller: no worker runs further ahead

    def work():
        while not stop.is_set():
            if not room.acquire(timeout=0.1):
                continue
            if stop.is_set():  # stopped while waiting for room (stop_on_error's failure): the room is no call's
                return
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                taken[0] += 1
            try:
                result = fn(item)
            except Exception as e:  # noqa: BLE001 - reported to the caller, which counts it
                result = e
                if stop_on_error:
                    stop.set()
            except BaseException as e:  # a sys.exit() in a python: judge: the caller raises it (a lost result hung)
                stop.set()
                done.put((item, e))
                return
            done.put((item, result))
            with lock:
                finished[0] += 1

    for _ in range(min(parallel, len(items))):
        threading.Thread(target=work, daemon=True).start()
    given = 0
    with _first_ctrl_c_stops(stop, done) as pressed:
        try:
            for _ in items:
                try:
                    item, result = done.get()
                    if item is not _CTRL_C:
                        room.release()
                except KeyboardInterrupt as interrupt:  # a SIGTERM, or a Ctrl-C outside the main thread
                    stop.set()
                    if not isinstance(interrupt, Terminated):
                        yield from _finish_in_flight(done, taken[0] - given, taken[0] - finished[0], grace)
                    raise
                if isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result  # SystemExit and the like, from a call: as if raised here, never a result
                if item is not _CTRL_C:
                    given += 1
                    yield item, result
                if pressed:
                    yield from _finish_in_flight(done, taken[0] - given, taken[0] - finished[0], grace)
                    raise KeyboardInterrupt
                if stop_on_error and isinstance(result, Exception):
                    return  # nothing further was started; the caller raises this one
        finally:
            stop.set()  # a caller that stops early (a fatal error, Ctrl-C) starts no further requests


@contextmanager
def _first_ctrl_c_stops(stop: threading.Event, done: queue.SimpleQueue):
    """threaded's Ctrl-C in the main thread, where Python's own handler is on: the first one starts no further call
    and wakes the loop (a marker in `done`) instead of raising wherever it lands; a second raises at once. Yields the
    list that holds True once pressed. Elsewhere (another thread, a handler of the caller's own) nothing changes.
    A SIGINT within `_SAME_PRESS` seconds of the first is the same Ctrl-C delivered twice, not a second one: `timeout
    -s INT` sends it to the process and to its process group, as a launcher that forwards the terminal's to its child
    does; taken for "again", it ended the wait at once and lost the answers of the calls under way (the evaluate.py
    audit of session 98: 2 of 3 interrupted MT-Bench runs paid for them again)."""
    import time

    pressed: list[bool] = []
    first: list[float] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield pressed
        return

    def first_stops(signum, frame):
        if pressed and time.monotonic() - first[0] > _SAME_PRESS:
            raise KeyboardInterrupt
        if pressed:
            return
        first.append(time.monotonic())
        pressed.append(True)
        stop.set()
        _STOPPING.set()
        done.put((_CTRL_C, None))

    signal.signal(signal.SIGINT, first_stops)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _STOPPING.clear()


def _finish_in_flight(done, pending: int, running: int, grace: float):
    """threaded's Ctrl-C: the `pending` results not yet given, those finished first (all of them, whatever the time:
    a fast rule judge had thousands waiting, and they were counted "in flight" and dropped after 30 s), then those of
    the `running` calls still under way as they arrive, for up to `grace` seconds."""
    import time

    if pending <= 0:
        return
    if running > 0 and grace > 0:
        logger.warning(f"Ctrl-C: waiting up to {grace:.0f} s for the {running} calls under way, to keep their answers "
                       "(Ctrl-C again leaves now)")
    deadline = time.monotonic() + max(grace, 0)
    while pending > 0:
        try:
            item, result = done.get_nowait()
        except queue.Empty:
            if (left := deadline - time.monotonic()) <= 0:
                return
            try:
                item, result = done.get(timeout=left)
            except queue.Empty:
                return
        if item is _CTRL_C:
            continue
        pending -= 1
        yield item, result


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

