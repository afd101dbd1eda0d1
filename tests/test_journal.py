"""alignkit.core.journal: the one append-only log, atomic writes and concurrent map every crash-safe loop uses."""

from __future__ import annotations

import json
import threading
import time

import pytest

from alignkit.core.args import ConfigError
from alignkit.core.errors import UserError
from alignkit.core.journal import AppendLog, InUse, append_jsonl, read_jsonl, threaded, write_json, write_jsonl


def test_append_log_keeps_whole_records_from_many_threads_and_drops_a_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AppendLog(path, "test")
    list(threaded(lambda i: log.append({"key": str(i), "value": "x" * 500}), range(200), 8))
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 200 and {json.loads(line)["key"] for line in lines} == {str(i) for i in range(200)}
    with open(path, "a") as f:
        f.write('{"key": "torn", "val')  # a SIGKILL mid-write
    again = AppendLog(path, "test")
    assert len(again) == 200 and "torn" not in again
    again.append({"key": "next"})
    again.close()
    assert json.loads(path.read_text().splitlines()[-1]) == {"key": "next"}  # starts on a clean line


def test_a_second_holder_is_refused_as_a_user_error_naming_the_owner(tmp_path):
    first = AppendLog(tmp_path / "log.jsonl", "label.py", "let it finish")
    try:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        process = ctx.Process(target=_open_elsewhere, args=(str(tmp_path / "log.jsonl"), queue))
        process.start()
        process.join(60)
        assert queue.get(timeout=5) == ("InUse", True, "in use by another label.py run; let it finish")
    finally:
        first.close()
    assert issubclass(InUse, UserError) and issubclass(InUse, RuntimeError)


def _open_elsewhere(path, queue):
    try:
        AppendLog(path, "label.py", "let it finish")
        queue.put(("opened", False, ""))
    except Exception as e:  # noqa: BLE001
        queue.put((type(e).__name__, isinstance(e, UserError), str(e).split(" is ", 1)[1]))


def test_append_jsonl_lines_never_interleave_and_read_jsonl_repairs_only_the_tail(tmp_path):
    path = tmp_path / "rows.jsonl"
    threads = [threading.Thread(target=append_jsonl, args=(path, [{"t": t, "i": i, "pad": "y" * 300}
                                                                  for i in range(20)])) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_jsonl(path, "fix it")
    assert len(rows) == 120 and all(row["pad"] == "y" * 300 for _, row in rows)
    path.write_text(path.read_text() + '{"t": 9, "i"')
    with pytest.raises(ConfigError, match=r"rows.jsonl, line 121: not valid JSON .*; fix it"):
        read_jsonl(path, "fix it")
    assert len(read_jsonl(path, "fix it", repair_tail=True)) == 120 and path.read_text().endswith("}\n")
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ConfigError, match="line 2"):  # a bad row in the middle is the user's to fix, not cut
        read_jsonl(path, "fix it", repair_tail=True)


def test_atomic_writes_replace_the_whole_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"é": 1}, {"b": 2}])
    assert (tmp_path / "sub" / "rows.jsonl").read_text(encoding="utf-8") == '{"é": 1}\n{"b": 2}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json", "rows.jsonl"]


def test_threaded_yields_every_result_or_exception_and_stops_starting_work_when_the_caller_stops():
    def work(i):
        if i == 3:
            raise ValueError("three")
        return i * i

    results = dict(threaded(work, range(10), 4))
    assert {k: v for k, v in results.items() if k != 3} == {i: i * i for i in range(10) if i != 3}
    assert isinstance(results[3], ValueError)
    started = []
    gate = threading.Event()

    def slow(i):
        started.append(i)
        if i:  # the first answers at once; the rest wait, as requests in flight do
            gate.wait(5)
        return i

    stream = threaded(slow, range(100), 2)
    assert next(stream) == (0, 0)
    stream.close()  # a fatal error in the caller: no further requests start
    gate.set()
    time.sleep(0.2)  # the two workers finish what they hold, then see the stop
    assert len(started) <= 3, started


def test_stop_on_error_starts_nothing_after_the_first_failure():
    started = []

    def work(i):
        started.append(i)
        if i == 2:
            raise RuntimeError("refused")
        return i

    out = list(threaded(work, range(10), 1, stop_on_error=True))
    assert [i for i, _ in out] == [0, 1, 2] and isinstance(out[-1][1], RuntimeError)
    time.sleep(0.1)
    assert started == [0, 1, 2]  # the caller raises this failure; no request went out after it
