"""alignkit.core.journal: the one append-only log, atomic writes and concurrent map every crash-safe loop uses."""

from __future__ import annotations

import json
import re
import os
import threading
import time
from pathlib import Path

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


def test_a_kill_while_repairing_a_torn_tail_keeps_every_earlier_line(tmp_path, monkeypatch):
    """The repair cuts the file at the end of its last whole line; it never rewrites the lines before it, so a
    kill while it runs (here: any whole-file rewrite dies half-way) cannot take them with it."""
    from pathlib import Path

    path = tmp_path / "answers.jsonl"
    good = [{"i": i, "answer": "z" * 200} for i in range(50)]
    append_jsonl(path, good)
    with open(path, "a") as f:
        f.write('{"i": 50, "answ')  # a SIGKILL mid-append

    def killed_half_way(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Path, "write_text", killed_half_way)
    with pytest.raises(KeyboardInterrupt):  # where a rewrite would die (the old code), the test is over for it too
        read_jsonl(path, "fix it", repair_tail=True)
        raise KeyboardInterrupt("no rewrite, no kill")
    monkeypatch.undo()
    assert [row for _, row in read_jsonl(path, "fix it")] == good and path.read_text().endswith("}\n")


def test_an_append_after_a_whole_last_row_without_its_newline_starts_a_new_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}')  # whole, but no newline: a write cut just before it, or an editor
    append_jsonl(path, [{"c": 3}])
    assert [row for _, row in read_jsonl(path, "fix it")] == [{"a": 1}, {"b": 2}, {"c": 3}]
    path.write_text('{"a": 1}\n{"b": 2}')
    assert len(read_jsonl(path, "fix it", repair_tail=True)) == 2 and path.read_text().endswith("}\n")
    append_jsonl(path, [{"c": 3}])
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n{"c": 3}\n'


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


def test_a_slow_caller_keeps_the_workers_at_most_parallel_results_ahead():
    """CI on a busy machine: label.py --parallel 1 stopped on its 30th result with 33 requests sent, the worker running
    ahead of a caller slow to take them. Now the workers wait for the caller, `parallel` results at most ahead."""
    for parallel in (1, 3):
        started = []
        stream = threaded(lambda i: started.append(i) or i, range(50), parallel)
        for n, (item, _) in enumerate(stream, 1):
            time.sleep(0.02)  # the caller's own work on each result (a busy machine: slower still)
            assert len(started) <= n + parallel, (parallel, n, len(started))
            if n == 10:
                break
        stream.close()
        time.sleep(0.3)  # the workers see the stop
        assert len(started) <= 10 + parallel, (parallel, len(started))


def test_a_worker_waiting_for_the_caller_starts_nothing_after_the_first_failure():
    """Review of 1183e4e: a worker waiting for room (the caller slow to take its results) took the next item when the
    caller took a result finished before stop_on_error's failure: a request started after it, which is to start
    none. The stop is checked again once there is room."""
    started, gate, raising = [], threading.Event(), threading.Event()

    def work(i):
        started.append(i)
        if i == 1:  # under way while 0 and 2 finish
            gate.wait(5)
            raising.set()
            raise RuntimeError("refused")
        return i

    got = []
    for item, result in threaded(work, range(20), 2, stop_on_error=True):
        got.append(item)
        if item == 0:
            time.sleep(0.03)  # the other worker finishes 2, then waits for room
            gate.set()
            raising.wait(5)
            time.sleep(0.005)  # the failure is in: the stop is set
    time.sleep(0.2)
    assert got == [0, 2, 1] and sorted(started) == [0, 1, 2], (got, started)


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


@pytest.mark.parametrize("case", ["kept", "in the caller", "grace over", "second ctrl-c", "sigterm"])
def test_ctrl_c_keeps_the_answers_of_the_requests_in_flight(case, alignkit_log):
    """Ctrl-C ended the process with up to --parallel paid requests in flight: their answers were lost and the next
    run sent them again. Now no further request starts, the ones in flight are yielded as they finish (the caller
    journals them) for up to `grace` seconds, then KeyboardInterrupt; a second Ctrl-C leaves at once. Found by the
    review of session 30: a Ctrl-C landing in the caller's own code (journaling a result) skipped the wait, and a
    SIGTERM (Terminated, a KeyboardInterrupt) waited 30 s where a scheduler kills sooner: it leaves at once."""
    import os
    import signal

    from alignkit.core import journal
    from alignkit.core.errors import Terminated

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a script (a test worker ignores it)
    release, started, got, seen_stopping = threading.Event(), [], [], []

    def work(i):
        started.append(i)
        if i >= 2:  # 2 and 3: in flight when Ctrl-C comes
            release.wait(10)
        return i

    def press(delay: float, then=None):
        def go():
            time.sleep(delay)
            if case == "sigterm":
                signal.setitimer(signal.ITIMER_REAL, 0.001)  # the SIGALRM handler below raises Terminated
            else:
                os.kill(os.getpid(), signal.SIGINT)
            if then:
                time.sleep(0.2)  # the handler has run (the main thread takes signals between bytecodes)
                then()
        threading.Thread(target=go, daemon=True).start()

    def on_alarm(*_):
        raise Terminated

    alarm = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            for item, result in threaded(work, range(6), 2, grace=0.5 if case == "grace over" else 30):
                got.append(item)
                if len(got) == 2:  # the worker given room by this result takes 3 (a Ctrl-C before starts none)
                    deadline = time.monotonic() + 5
                    while len(started) < 4 and time.monotonic() < deadline:
                        time.sleep(0.001)
                if len(got) == 2 and case == "in the caller":
                    press(0.0, release.set)
                    time.sleep(0.5)  # the caller journaling: Ctrl-C lands here, not in the wait
                    seen_stopping.append(journal.stopping())
                elif len(got) == 2:
                    release_after = {"kept": release.set, "second ctrl-c": lambda: press(0.2)}.get(case)
                    press(0.2, release_after)
                    if case == "second ctrl-c":
                        threading.Timer(1.5, release.set).start()  # answered only after the second Ctrl-C
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGALRM, alarm)
        release.set()
    time.sleep(0.1)
    assert sorted(started) == [0, 1, 2, 3]  # nothing started after Ctrl-C
    assert sorted(got) == ([0, 1, 2, 3] if case in ("kept", "in the caller") else [0, 1])
    waited = "Ctrl-C: waiting up to" in alignkit_log.text and "for the 2 calls under way" in alignkit_log.text
    # "In the caller": both calls finished while it journaled, so nothing was under way to wait for.
    assert waited == (case not in ("sigterm", "in the caller"))
    assert isinstance(raised.value, Terminated) == (case == "sigterm")
    assert seen_stopping == ([True] if case == "in the caller" else []) and not journal.stopping()
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_keeps_every_finished_result_however_many_and_counts_only_the_calls_under_way(alignkit_log):
    """A fast judge (a python: rule) had thousands of results finished but not yet journaled at Ctrl-C: they were
    said to be "6012 calls in flight (requests under way)" at --parallel 8, and dropped when the 30 s grace ran out
    (the rlaif audit of session 31). Every finished result is given, whatever the time; the grace and its line are
    for the calls still under way. (Workers now run at most --parallel results ahead of the caller, so the backlog
    is that small; each of its results is still given.)"""
    import os
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    started, got = [], []

    def work(i):
        started.append(i)
        return i

    try:
        with pytest.raises(KeyboardInterrupt):
            for item, _ in threaded(work, range(400), 2, grace=0.2):
                got.append(item)
                if len(got) == 1:
                    time.sleep(0.3)  # the workers finish what they may run ahead of a slow caller
                    os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.3)  # the caller journaling each result: the backlog outlasts the grace
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(started) >= 2 and sorted(got) == sorted(started)
    assert "calls in flight" not in alignkit_log.text


# ---------------------------------------------------------------------------------------------------------
# alignkit.core.paths.build_once: a cache folder built by one process while the others wait


def _slow_build(log):
    def build(work):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the other process asks while this one builds
        (work / "model.bin").write_text("weights")
        return "done"
    return build


def _build_in_child(target, log, ready):
    from alignkit.core.paths import build_once

    ready.wait()
    folder = build_once(target, "DONE", _slow_build(log))
    assert (folder / "model.bin").read_text() == "weights"  # never half a folder


def test_build_once_builds_in_one_process_while_the_others_wait_then_use_its_folder(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the children share the build function without pickling it
    target, log, ready = tmp_path / "cache" / "model", tmp_path / "builds.log", ctx.Event()
    children = [ctx.Process(target=_build_in_child, args=(target, log, ready)) for _ in range(3)]
    for child in children:
        child.start()
    ready.set()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1  # built once, by whichever asked first
    assert (target / "DONE").read_text() == "done" and (target / "model.bin").read_text() == "weights"
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]  # no work folder left
    # Readable by whoever can read the cache folder (a cache shared on a lab server), not mkdtemp's owner-only.
    assert target.stat().st_mode & 0o777 == target.parent.stat().st_mode & 0o777 != 0o700


def test_build_once_lock_file_can_be_taken_by_everyone_who_can_build_in_the_cache_folder(tmp_path):
    """A cache shared on a lab server (a group-writable folder): the next user to build there must be able to open
    the lock file the first left behind, whatever the first user's umask was."""
    from alignkit.core.paths import build_once

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    old = os.umask(0o077)  # the strictest umask a first user could have
    try:
        build_once(shared / "model", "DONE", lambda work: "done")
    finally:
        os.umask(old)
    assert (shared / ".model.lock").stat().st_mode & 0o777 == 0o664


def test_build_once_leaves_nothing_of_a_failed_build_and_rebuilds_a_half_built_folder(tmp_path):
    from alignkit.core.paths import build_once

    target = tmp_path / "model"

    def crash(work):
        (work / "part").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_once(target, "DONE", crash)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == [".model.lock"]
    target.mkdir()
    (target / "part").write_text("half")  # what a build before build_once could leave: no DONE file
    build_once(target, "DONE", lambda work: (work / "whole").write_text("x") and "done")
    assert sorted(p.name for p in target.iterdir()) == ["DONE", "whole"]
    assert build_once(target, "DONE", crash) == target  # done: not built again


@pytest.mark.parametrize("what", ["tiny preset", "gguf"])
def test_the_tiny_preset_and_gguf_conversions_wait_for_the_process_that_builds_them(what, tmp_path, monkeypatch):
    """Every rank of a launch asks for the tiny preset (or a GGUF file's conversion) at once: the one that holds the
    lock builds it, and a rank that asked meanwhile uses that build rather than building (and replacing) its own."""
    from filelock import FileLock

    from alignkit.modeling import gguf, presets

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    built = []
    if what == "gguf":
        monkeypatch.setattr(gguf, "architecture", lambda path: "llama")
        monkeypatch.setattr("transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint", lambda *a, **k: {})
        monkeypatch.setattr(gguf, "_convert_into", lambda path, arch, work: built.append(work) or "{}")
        file = tmp_path / "m.gguf"
        file.write_bytes(b"GGUF")
        target, done, ask = gguf.converted_folder(file), gguf.DONE, lambda: gguf.convert(file)
    else:
        monkeypatch.setattr(presets, "_build_into", lambda work: built.append(work) or "{}")
        target, done, ask = presets.tiny_dir(), "done", presets.build
    target.parent.mkdir(parents=True, exist_ok=True)
    other = FileLock(str(target.parent / f".{target.name}.lock"))
    other.acquire()  # another rank is building
    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(0.5)
    assert asking.is_alive() and not built  # it waits rather than building beside the other rank
    target.mkdir()
    (target / done).write_text(json.dumps({"recipe": presets._recipe()}))  # the other rank's build lands
    if what == "gguf":  # a conversion whole: its config and weights beside the done file
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights")
    other.release()
    asking.join(30)
    assert not asking.is_alive() and not built


def test_the_tiny_preset_is_rebuilt_when_its_recipe_changed_and_smol_s_prompts_follow_the_shipped_ones(
        tmp_path, monkeypatch):
    """No version to remember to bump: the preset records the hash of the module that builds it, and an edit to
    that module (its data, tokenizer, model or pretraining) rebuilds it; SmolLM2's prompt files are rewritten
    whenever the shipped prompts say something else."""
    from types import SimpleNamespace

    from alignkit.modeling import presets, smol

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    built = []
    monkeypatch.setattr(presets, "_build_into",
                        lambda work: built.append(work) or json.dumps({"recipe": presets._recipe()}))
    presets.build()
    presets.build()
    assert len(built) == 1
    monkeypatch.setattr(presets, "_recipe", lambda: "an edited recipe")
    presets.build()
    assert len(built) == 2 and json.loads((presets.tiny_dir() / "done").read_text())["recipe"] == "an edited recipe"

    monkeypatch.setattr(smol, "gguf_path", lambda: "model.gguf")
    shipped = [{"prompt": "p1", "category": "c", "split": "train"}, {"prompt": "p2", "category": "c", "split": "heldout"}]
    monkeypatch.setattr(smol, "prompts", lambda: shipped)
    smol.ensure(SimpleNamespace(preset="smol", dataset_id=None))
    train = Path(smol.paths()["train_prompts"])
    assert [row["prompt"] for _, row in read_jsonl(train, "prompts")] == ["p1"]
    shipped[0]["prompt"] = "p1, reworded"
    smol.ensure(SimpleNamespace(preset="smol", dataset_id=None))
    assert [row["prompt"] for _, row in read_jsonl(train, "prompts")] == ["p1, reworded"]


def test_every_key_is_the_same_digest_as_before_it_was_shared():
    """alignkit.core.digests.digest replaced six copies: each cache's keys stay what they were (canonical JSON with
    sorted keys; non-ASCII text as itself, or escaped where a cache first made its keys that way; cut or whole)."""
    import hashlib
    import json

    from alignkit.core.digests import digest

    value = {"prompt": "naïve café ☕", "b": [1, 2.5, None], "a": {"z": True}}
    raw = json.dumps(value, sort_keys=True, ensure_ascii=False)
    escaped = json.dumps(value, sort_keys=True)
    assert digest(value) == hashlib.sha256(raw.encode()).hexdigest()
    assert digest(value, 16) == hashlib.sha256(raw.encode()).hexdigest()[:16]
    assert digest(value, 16, ensure_ascii=True) == hashlib.sha256(escaped.encode()).hexdigest()[:16]
    assert digest(value) != digest(value, ensure_ascii=True)  # the text is part of the key, not its escaping
    from pathlib import Path

    assert digest({"path": Path("a/b")}) == digest({"path": "a/b"})  # what JSON cannot write, by its str()


def test_a_run_moved_aside_twice_in_one_second_lands_beside_the_first_not_inside_it(tmp_path, monkeypatch):
    """training moves an earlier run to NAME.previous-TIME: a second move within the same second went into that
    folder (shutil.move into an existing directory), nesting one run in another. Now it takes the next free name."""
    from alignkit.core.config import SFTSettings
    from alignkit.core.journal import free_name
    from alignkit.train import run_folder

    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20261203-120000")
    folder = tmp_path / "run"
    earlier = tmp_path / "run.previous-20261203-120000"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"first": 1}')
    folder.mkdir()
    (folder / "metrics.json").write_text('{"second": 2}')
    aside = run_folder._claim(SFTSettings(output_dir=str(tmp_path), run_name="run"), folder, None)
    assert aside == tmp_path / "run.previous-20261203-120000-2"
    assert (aside / "metrics.json").read_text() == '{"second": 2}'
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.json"]  # the first stays whole, nothing inside
    assert free_name(tmp_path, "leaderboard-k", ".csv") == tmp_path / "leaderboard-k.csv"
    (tmp_path / "leaderboard-k.csv").write_text("")
    assert free_name(tmp_path, "leaderboard-k", ".csv") == tmp_path / "leaderboard-k-2.csv"


def test_settings_set_back_resume_their_run_moved_aside_instead_of_training_it_again(tmp_path, alignkit_log):
    """Run A, then B in the same folder (A moved to NAME.previous-TIME), then A's command again: A was trained again
    from scratch beside its finished copy. It is moved back in place (B aside in turn) and resumes from its last
    checkpoint; other rows, --resume false or a run aside without a checkpoint train anew."""
    from datasets import Dataset

    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    other_rows = Dataset.from_list([{"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "b"}]}])
    common = dict(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="run")
    a, b = SFTSettings(**common, learning_rate=1e-3), SFTSettings(**common, learning_rate=2e-3)

    def train(s, data, made: str):
        folder, resume_from = run_folder.prepare_run(s, "sft", data, None)
        with run_folder.start_run(s, folder, resume_from, None, (data, None)):
            if resume_from is None:  # what TRL and the script would write
                (folder / "checkpoint-2").mkdir()
                (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
                (folder / "adapter_model.safetensors").write_text(made)
        return folder, resume_from

    folder, _ = train(a, rows, "A")
    assert train(b, rows, "B")[1] is None  # other settings: A goes aside
    assert (folder / "adapter_model.safetensors").read_text() == "B"
    _, resumed = train(a, rows, "A again")  # A's settings back: A itself, not a second A
    assert resumed == str(folder / "checkpoint-2")
    assert (folder / "adapter_model.safetensors").read_text() == "A"
    aside = sorted(tmp_path.glob("run.previous-*"))
    assert [(p / "adapter_model.safetensors").read_text() for p in aside] == ["B"]  # nothing lost, nothing doubled
    assert re.search(r"run\.previous-\S+ holds a run with these settings and inputs \(moved aside by a run with "
                     r"others\): moved it back to .*run, resuming from checkpoint-2; the run that was there is in ",
                     alignkit_log.text)
    assert run_folder.prepare_run(b, "sft", rows, None)[1] == str(folder / "checkpoint-2")  # and B back the same way
    run_folder.run_locks.release(folder)
    run_folder.cell_checks.forget(folder)
    assert train(a, other_rows, "A on other rows")[1] is None  # the rows differ: another run, trained anew
    assert train(SFTSettings(**common, learning_rate=1e-3, resume="false"), rows, "A anew")[1] is None
    # A run with these settings in place stays, even without a checkpoint (deleted after it finished): no older copy
    # of it comes back over it (found by a review).
    import shutil

    shutil.rmtree(folder / "checkpoint-2")
    assert run_folder.prepare_run(a, "sft", rows, None)[1] is None and not run_folder._RESTORE
    run_folder.run_locks.release(folder)
    run_folder.cell_checks.forget(folder)
    # --resume true over a folder without checkpoints names the run aside that these settings would resume.
    shutil.rmtree(folder)
    with pytest.raises(ConfigError, match=r"holds no checkpoint-N folder to resume from; .*run\.previous-\S+ holds this "
                                          r"run \(moved aside by a run with other settings\): --resume auto moves it"):
        run_folder.prepare_run(SFTSettings(**common, learning_rate=1e-3, resume="true"), "sft", rows, None)


def test_a_run_killed_before_its_first_checkpoint_gives_the_earlier_run_back_at_the_next_command(tmp_path,
                                                                                                  alignkit_log):
    """A SIGKILL (the host's OOM killer) between the claim and the first checkpoint runs no `except`: the new
    folder stayed claimed and empty and the finished run sat in NAME.previous-TIME, so the same command as before
    retrained it from scratch. The next command now puts it back before it looks at the folder."""
    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder, training

    s = SFTSettings(output_dir=str(tmp_path), run_name="run", learning_rate=1e-3)
    folder = tmp_path / "run"
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_text("the finished run")
    aside = run_folder._claim(s, folder, None)  # ... and killed here
    assert not (folder / "adapter_model.safetensors").exists() and (aside / "adapter_model.safetensors").exists()
    # Another command meanwhile (evaluate.py, merge.py, a run over it) says where the model is, not "not a model
    # folder" (found by an audit): the training may still be running, so it moves nothing.
    from alignkit.modeling.models import check_model_source

    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))} holds no model now: a training run in it has "
                                        rf"saved no checkpoint yet \(it is running, or it was killed\), and the "
                                        rf"earlier run in it is in {re.escape(str(aside))} meanwhile\. Point at "):
        check_model_source(str(folder))
    import shutil

    (folder / "checkpoint-50").mkdir()  # ... and it got as far as a checkpoint before it stopped
    (folder / "checkpoint-50" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))} holds no finished model: its training has not "
                                        rf"finished \(it is running, or it stopped or was killed after checkpoint-50\)\. "
                                        rf"Point at {re.escape(str(folder / 'checkpoint-50'))} "):
        check_model_source(str(folder))
    shutil.rmtree(folder / "checkpoint-50")
    folder_seen, resume = training.prepare_run(s, "sft")  # the next command, whatever its settings
    assert (folder / "adapter_model.safetensors").read_text() == "the finished run" and not aside.exists()
    assert resume is None  # other settings than the earlier run's: it will be moved aside again, properly
    assert "stopped before its first checkpoint: the earlier run is back in place" in alignkit_log.text
    # A folder that got as far as a checkpoint keeps it: nothing is put back over work.
    aside = run_folder._claim(s, folder, None)
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    training.prepare_run(s, "sft")
    assert (folder / "checkpoint-2").is_dir() and aside.is_dir()


def test_ctrl_c_while_the_folder_is_claimed_puts_the_earlier_run_back(tmp_path, monkeypatch):
    """An interrupt inside the claim (after the move, while the settings are saved) skipped start_run's `except`:
    the folder was gone and the earlier run only in NAME.previous-TIME."""
    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"earlier": 1}')

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "save_run_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_folder._claim(SFTSettings(output_dir=str(tmp_path), run_name="run"), folder, None)
    assert (folder / "metrics.json").read_text() == '{"earlier": 1}'
    assert not list(tmp_path.glob("run.previous-*"))


def test_a_stop_before_the_first_checkpoint_says_how_to_go_on_in_its_one_line(tmp_path, monkeypatch, alignkit_log,
                                                                              capsys):
    """A run interrupted before its first checkpoint said "with nothing of it to keep: removed runs/tiny-sft", then
    the generic "interrupted: what was finished is kept; run the cell again to go on": two lines contradicting each
    other (the notebook audit). Its own line says how to start it anew, and the generic one is not said; a failure
    (its error line follows) says no way on."""
    from alignkit.core import errors
    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder

    s = SFTSettings(output_dir=str(tmp_path), run_name="run", resume="false")
    folder = tmp_path / "run"
    errors._SAID_HOW_TO_GO_ON.clear()
    run_folder.prepare_run(s, "sft")
    with pytest.raises(KeyboardInterrupt):
        with run_folder.start_run(s, folder, None):
            raise KeyboardInterrupt
    assert not folder.exists()
    assert f"with nothing of it to keep: removed {folder}; run the same command again to start it anew" \
        in alignkit_log.text
    with pytest.raises(SystemExit):
        errors._report(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert errors.INTERRUPTED not in capsys.readouterr().err  # said once, by the run's own line
    from alignkit.train import run_release

    monkeypatch.setattr(run_release, "is_notebook", lambda: True)
    folder.mkdir()
    run_release._release(folder, None, KeyboardInterrupt())
    assert f"removed {folder}; run the cells from 'Run folder' on again (Run folder, Model, Train) to start it anew" \
        in alignkit_log.text
    errors._SAID_HOW_TO_GO_ON.clear()
    folder.mkdir()
    run_release._release(folder, None, RuntimeError("out of memory"))
    assert alignkit_log.records[-1].getMessage().endswith(f"with nothing of it to keep: removed {folder}")
    assert not errors._SAID_HOW_TO_GO_ON


def test_the_save_cell_after_an_interrupted_training_cell_saves_nothing(tmp_path):
    """In a notebook, the cell after an interrupted training cell (finish) saved the half-trained model into the
    folder that had just been given back to the earlier run: its adapter and metrics replaced, its settings not."""
    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder
    from alignkit.train.training import finish

    s = SFTSettings(output_dir=str(tmp_path), run_name="run", resume="false")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"earlier": 1}')
    assert run_folder.prepare_run(s, "sft") == (folder, None)
    with pytest.raises(KeyboardInterrupt):
        with run_folder.start_run(s, folder, None):
            raise KeyboardInterrupt  # the training cell, stopped before its first checkpoint
    assert (folder / "metrics.json").read_text() == '{"earlier": 1}'  # the earlier run is back
    with pytest.raises(UserError, match=rf"^the training of {re.escape(str(folder))} stopped \(KeyboardInterrupt\) "
                                        r"and did not finish: nothing saved\. Run the cells from 'Run folder' on "):
        finish(None, None, s, folder, "sft")  # refused before it touches the trainer
    from alignkit.train.reward import held_out_report

    with pytest.raises(UserError, match="stopped"):  # reward.py's last cell: its report went into the earlier run
        held_out_report(None, None, None, folder)
    assert (folder / "metrics.json").read_text() == '{"earlier": 1}' and sorted(os.listdir(folder)) == ["metrics.json"]
    # The training cell run again on its own says what happened to it: stopped, not "already trained".
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))} was trained in this session, and stopped "
                                        r"\(KeyboardInterrupt\): run the cells from 'Run folder' on again \(Run "
                                        r"folder, Model, Train\)"):
        with run_folder.start_run(s, folder, None):
            pass
    run_folder.prepare_run(s, "sft")
    with run_folder.start_run(s, folder, None):
        pass  # the cells run again, training to its end
    run_folder.check_trained(folder, s)
    import dataclasses  # what saving itself may change: merge it, push it (found by an audit: it was refused)

    run_folder.check_trained(folder, dataclasses.replace(s, merge_adaptors=True, push_to_hub=True, hub_repo_id="me/x"))
    # Saved only under the settings it trained with, and only what trained here (the saving cell alone, after the
    # settings cell ran with others: the adapter recorded the new model_id as its base).
    with pytest.raises(UserError, match=r"^the settings changed since run trained \(model_id\): saving would record "
                                        r"them for a model trained with others\. Set them back"):
        finish(None, None, SFTSettings(output_dir=str(tmp_path), run_name="run", resume="false", model_id="other"),
               folder, "sft")
    with pytest.raises(UserError, match=r"^the settings changed since run trained \(model_id\)"):  # reward.py's report
        held_out_report(None, None, None, folder, settings=SFTSettings(output_dir=str(tmp_path), run_name="run",
                                                                       resume="false", model_id="other"))
    assert not (folder / "rewards_histogram.png").exists()
    other = SFTSettings(output_dir=str(tmp_path), run_name="other", resume="false")
    run_folder.prepare_run(other, "sft")  # the Run folder cell, then the saving cell before the training cell
    with pytest.raises(UserError, match=r"^nothing was trained into .*other in this session: run the cells from "
                                        r"'Run folder' on"):
        finish(None, None, other, tmp_path / "other", "sft")


def test_a_refused_training_cell_for_a_new_run_folder_leaves_nothing_to_save_into_it(tmp_path):
    """A notebook audit: after a run finished, the settings named a new run folder, the Run folder cell ran, the
    training cell was refused (the Model cell skipped), then the saving cell saved the earlier run's trainer into the
    new folder (its weights, a card naming the new run) and failed in transformers' evaluate with a traceback. The
    saving cell now refuses it in one line and writes nothing; the refused training cell names the folder the
    settings name, not only the one its Run folder cell last gave."""
    import types

    from datasets import Dataset

    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder
    from alignkit.train.training import finish

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    first = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="first")
    folder, resume_from = run_folder.prepare_run(first, "sft", rows, None)
    with run_folder.start_run(first, folder, resume_from, None, (rows, None)):
        pass
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(output_dir=str(folder)))  # the earlier run's
    second = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="second")
    new_folder, _ = run_folder.prepare_run(second, "sft", rows, None)
    run_folder.cell_checks.forget(new_folder)  # what a refused training cell does (it gives the decision back)
    with pytest.raises(UserError, match=rf"^the trainer in memory trained {re.escape(str(folder))}, not "
                                        rf"{re.escape(str(new_folder))}: nothing saved\. Run the cells from 'Run folder' "
                                        r"on \(Run folder, Model, Train\), then this one$"):
        finish(trainer, None, second, new_folder, "sft")
    from alignkit.train.reward import held_out_report

    with pytest.raises(UserError, match=r"^the trainer in memory trained"):  # reward.py's report, before finish
        held_out_report(None, None, None, new_folder, settings=second, trainer=trainer)
    assert not new_folder.exists() or not os.listdir(new_folder)
    # The settings name a third folder whose Run folder cell was refused: the training cell names both.
    third = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="third")
    with pytest.raises(UserError, match=rf"^the settings name the run folder {re.escape(str(tmp_path / 'third'))}, "
                                        rf"but the 'Run folder' cell last gave {re.escape(str(new_folder))}: run the "
                                        r"cells from 'Run folder' on again \(Run folder, Model, Train\)"):
        with run_folder.start_run(third, new_folder, None, None, (rows, None)):
            pass


def test_a_notebook_s_training_cell_trains_what_its_run_folder_cell_decided_once(tmp_path, monkeypatch):
    """Run again on its own, a notebook's training cell trained the model in memory again as a fresh run (the
    checkpoint variable from the earlier 'Run folder' cell, the finished run moved aside, the folder unlocked); after
    the settings cell alone changed, the folder recorded settings its model was not trained with (lora_r 4 over an
    r=16 adapter, which every later --resume failed on). Each is refused in one line naming the cells to run; an idle
    kernel holding the folder is named as such."""
    import subprocess
    import sys

    from datasets import Dataset

    from alignkit.core import errors
    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    s = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="run")
    folder, resume_from = run_folder.prepare_run(s, "sft", rows, None)
    model = torch_module()
    with run_folder.start_run(s, folder, resume_from, model, (rows, None)):
        (folder / "checkpoint-2").mkdir()
        (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    again = r"run the cells from 'Run folder' on again \(Run folder, Model, Train\)"
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))} was already trained in this session: {again}"):
        with run_folder.start_run(s, folder, resume_from, model, (rows, None)):
            pass
    assert not list(tmp_path.glob("run.previous-*"))  # nothing moved aside
    # Run folder again: it resumes, and the trained model in memory may go on from the checkpoint.
    folder, resume_from = run_folder.prepare_run(s, "sft", rows, None)
    assert resume_from == str(folder / "checkpoint-2")
    with run_folder.start_run(s, folder, resume_from, model, (rows, None)):
        pass
    # Trained, then the data settings changed (a Run folder cell refused for it since): the cells to run start at
    # Data; the trained model needs its Model cell (a fresh adapter).
    other_data = SFTSettings(model_id="tiny", dataset_id="org/other", output_dir=str(tmp_path), run_name="run")
    with pytest.raises(UserError, match=r"^the settings changed since the 'Run folder' cell ran \(dataset_id\): run "
                                        r"the 'Data', 'Run folder' and 'Model' cells again, then train$"):
        with run_folder.start_run(other_data, folder, resume_from, model, (rows, None)):
            pass
    # The settings cell alone run again with another setting; then the data cell alone.
    run_folder.prepare_run(s, "sft", rows, None)
    changed = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="run", lora_r=4)
    with pytest.raises(UserError, match=r"^the settings changed since the 'Run folder' cell ran \(lora_r\): run the "
                                        r"'Run folder' and 'Model' cells again, then train$"):  # not the Data cell
        with run_folder.start_run(changed, folder, resume_from, model, (rows, None)):
            pass
    # A cell that edits the settings in place (settings.lora_r = 4) is a change too.
    edited = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="run")
    run_folder.prepare_run(edited, "sft", rows, None)
    edited.lora_r = 4
    with pytest.raises(UserError, match=r"^the settings changed since the 'Run folder' cell ran \(lora_r\)"):
        with run_folder.start_run(edited, folder, resume_from, model, (rows, None)):
            pass
    run_folder.prepare_run(s, "sft", rows, None)
    other_rows = Dataset.from_list(rows.to_list())
    with pytest.raises(UserError, match=rf"^the data or the checkpoint to resume from is not what the 'Run folder' "
                                        rf"cell decided for run: {again}$"):
        with run_folder.start_run(s, folder, resume_from, model, (other_rows, None)):
            pass
    # Where the run starts over, a model an earlier training cell trained is not a fresh adapter.
    fresh = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="run",
                        resume="false")
    folder, resume_from = run_folder.prepare_run(fresh, "sft", rows, None)
    with pytest.raises(UserError, match=r"^this model was trained by an earlier training cell \(run\) and there is "
                                        r"no checkpoint to resume: run the 'Run folder' and 'Model' cells again"):
        with run_folder.start_run(fresh, folder, None, model, (rows, None)):
            pass
    # A refusal lets the folder go; a kernel that ran its 'Run folder' cell holds it, and is named as a notebook.
    monkeypatch.setattr(errors, "is_notebook", lambda: True)
    run_folder.prepare_run(s, "sft", rows, None)
    second = ("import sys; from alignkit.core.config import SFTSettings; from alignkit.train import training\n"
              f"s = SFTSettings(model_id='tiny', dataset_id='org/chats', output_dir={str(tmp_path)!r}, run_name='run')\n"
              "try:\n    training.prepare_run(s, 'sft')\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 3, done.stderr[-2000:]
    assert re.fullmatch(rf"{re.escape(str(folder))} is in use by another training run \(process {os.getpid()}, a "
                        r"notebook kernel, since \d\d:\d\d: its training cell is running or still to run; restart "
                        r"that kernel to free the folder\); let it finish first, or pass another --run_name",
                        done.stdout.strip()), done.stdout


def torch_module():
    import torch

    return torch.nn.Linear(2, 2)


def test_a_model_or_rewards_built_under_other_settings_are_refused_in_one_line(tiny_cache, tmp_path):
    """A notebook's settings cell run again (another lora_r, model_id, reward or dataset), then the Run folder cell,
    with the Model cell (or rl.py's Rewards cell) skipped: the training cell trained the model in memory, built under
    the old settings, while the folder recorded the new ones (an r=16 adapter saved as r=4; a policy over the SFT
    adapter saved as over the bare base; the rule reward logged where rm: was recorded). Refused in one line naming
    the cell to run; built under these settings, both train."""
    from datasets import Dataset

    from alignkit.core.config import RLSettings, SFTSettings
    from alignkit.core.errors import UserError
    from alignkit.modeling import presets
    from alignkit.modeling.models import add_trainable_adapter, load_model
    from alignkit.train import run_folder
    from alignkit.train.rl_rewards import build_rewards

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    tiny = presets.paths()["model"]
    s = SFTSettings(model_id=tiny, quantization="none", dataset_id="org/chats", output_dir=str(tmp_path),
                    run_name="run")
    model = add_trainable_adapter(load_model(s, for_training=True), s)
    r4 = SFTSettings(model_id=tiny, quantization="none", dataset_id="org/chats", output_dir=str(tmp_path),
                     run_name="run", lora_r=4)
    folder, resume_from = run_folder.prepare_run(r4, "sft", rows, None)
    with pytest.raises(UserError, match=r"^the model in memory was built under other settings than these \(lora_r "
                                        r"changed since\): run the 'Run folder' and 'Model' cells again, then train$"):
        with run_folder.start_run(r4, folder, resume_from, model, (rows, None)):
            pass
    assert not (folder / "alignkit_config.json").exists()  # nothing claimed or recorded
    folder, resume_from = run_folder.prepare_run(s, "sft", rows, None)
    with run_folder.start_run(s, folder, resume_from, model, (rows, None)):  # built under these: it trains
        pass
    # What no model is built from (a lower learning rate to resume with, another run folder) needs no reload.
    slower = SFTSettings(model_id=tiny, quantization="none", dataset_id="org/chats", output_dir=str(tmp_path),
                         run_name="run2", learning_rate=1e-5, save_steps=7)
    folder, resume_from = run_folder.prepare_run(slower, "sft", rows, None)
    with run_folder.start_run(slower, folder, resume_from, add_trainable_adapter(load_model(s), s), (rows, None)):
        pass
    # rl.py: the Rewards cell skipped after --reward changed (the Model cell run again).
    rule = RLSettings(model_id=tiny, quantization="none", reward=["rule"], output_dir=str(tmp_path), run_name="rl")
    rewards = build_rewards(rule, tmp_path)
    other = RLSettings(model_id=tiny, quantization="none", reward=["rule"], reward_weights=[0.5],
                       output_dir=str(tmp_path), run_name="rl")
    model = add_trainable_adapter(load_model(other, for_training=True), other)
    folder, resume_from = run_folder.prepare_run(other, "rl", rows)
    with pytest.raises(UserError, match=r"^the rewards in memory were built under other settings than these "
                                        r"\(reward_weights changed since\): run the 'Run folder' and 'Rewards' cells "
                                        r"again, then train$"):
        with run_folder.start_run(other, folder, resume_from, model, (rows,), built=[(rewards, "rewards")]):
            pass
    folder, resume_from = run_folder.prepare_run(other, "rl", rows)
    with run_folder.start_run(other, folder, resume_from, model, (rows,), built=[(build_rewards(other, tmp_path),
                                                                                  "rewards")]):
        pass


def test_rl_s_refusals_name_its_own_cells_and_only_those_a_change_needs(tiny_cache, tmp_path):
    """A notebook audit of rl.ipynb: another beta (which no reward reads) was refused as "run the cells from 'Data'
    on again" (rl.ipynb has a Prompts cell, no Data cell); following it, the Rewards cell, named nowhere, was asked
    for next. Each refusal names rl.ipynb's own cells, and only those that read what changed: beta, the Run folder
    cell (then the model and rewards in memory train); the reward's weights, the Rewards cell too; the prompts, the
    Prompts cell first."""
    from datasets import Dataset

    from alignkit.core.config import RLSettings
    from alignkit.core.errors import UserError
    from alignkit.modeling import presets
    from alignkit.modeling.models import add_trainable_adapter, load_model
    from alignkit.train import cell_checks, run_folder
    from alignkit.train.rl_rewards import build_rewards

    rows = Dataset.from_list([{"prompt": "q"}])
    tiny = presets.paths()["model"]

    def rl(**changed):
        return RLSettings(**{"model_id": tiny, "quantization": "none", "reward": ["rule"], "output_dir": str(tmp_path),
                             "run_name": "rl", **changed})

    s = rl()
    rewards, model = build_rewards(s, tmp_path), add_trainable_adapter(load_model(s, for_training=True), s)
    folder, resume_from = run_folder.prepare_run(s, "rl", rows)
    beta = rl(beta=0.02)
    with pytest.raises(UserError, match=r"^the settings changed since the 'Run folder' cell ran \(beta\): run the "
                                        r"'Run folder' cell again, then train$"):
        with run_folder.start_run(beta, folder, resume_from, model, (rows,), built=[(rewards, "rewards")]):
            pass
    folder, resume_from = run_folder.prepare_run(beta, "rl", rows)  # the Run folder cell only: the rest stands
    with run_folder.start_run(beta, folder, resume_from, model, (rows,), built=[(rewards, "rewards")]):
        pass
    # Trained, then the weights changed: the Rewards cell, and a fresh adapter from the Model cell.
    weighted = rl(beta=0.02, reward_weights=[0.5])
    with pytest.raises(UserError, match=r"^the settings changed since the 'Run folder' cell ran \(reward_weights\): "
                                        r"run the 'Run folder', 'Rewards' and 'Model' cells again, then train$"):
        with run_folder.start_run(weighted, folder, resume_from, model, (rows,), built=[(rewards, "rewards")]):
            pass
    # The Run folder cell run for them, the Rewards cell skipped: the rewards, and the model trained since, named
    # at once (each refusal gives the Run folder cell's decision back, so it is named too).
    elsewhere = rl(beta=0.02, reward_weights=[0.5], run_name="rl2")
    folder2, resume2 = run_folder.prepare_run(elsewhere, "rl", rows)
    with pytest.raises(UserError, match=r"^the rewards in memory were built under other settings than these "
                                        r"\(reward_weights, run_name changed since\): run the 'Run folder', 'Rewards' "
                                        r"and 'Model' cells again, then train$"):
        with run_folder.start_run(elsewhere, folder2, resume2, model, (rows,), built=[(rewards, "rewards")]):
            pass
    assert cell_checks.to_run_again(rl(max_prompts=1), ["max_prompts"], trained=False) == \
        ["Prompts", "Run folder", "Rewards", "Train"]  # the rewards were checked against the prompts
    # The Prompts cell checks the prompts fill a generation batch: another num_generations or batch names it (named
    # as not read by it, following the refusal trained 0 steps and saved: the review of session 33) ...
    for changed in ({"num_generations": 4}, {"per_device_train_batch_size": 8}, {"gradient_accumulation_steps": 2}):
        assert cell_checks.to_run_again(rl(**changed), list(changed), trained=False)[0] == "Prompts", changed
    # ... and the prompts read under the earlier batch are refused by the Run folder cell, the Prompts cell named.
    from alignkit.train.rl import load_prompt_dataset

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(8)))
    read = load_prompt_dataset(rl(dataset_id=str(prompts), num_generations=2, per_device_train_batch_size=2))
    with pytest.raises(UserError, match=r"^the data was read under other settings than these \(num_generations "
                                        r"changed since\): run the 'Prompts' cell again"):
        run_folder.prepare_run(rl(dataset_id=str(prompts), num_generations=4, per_device_train_batch_size=2), "rl",
                               read)
    # The saving cell after the settings changed names them too.
    with pytest.raises(UserError, match=r"^the settings changed since rl trained \(beta\): saving would record them "
                                        r"for a model trained with others\. Set them back and run this cell again, or "
                                        r"run the 'Run folder', 'Model' and 'Train' cells again, then this one$"):
        run_folder.check_trained(folder, rl())
    # The training cell run again (after a refusal, which let the folder go): from rl.ipynb's Run folder cell on.
    with pytest.raises(UserError, match=r"was not prepared for training \(the 'Run folder' cell did not run for it\): "
                                        r"run the cells from 'Run folder' on again \(Run folder, Rewards, Model, "
                                        r"Train\);"):
        with run_folder.start_run(beta, folder, resume_from, model, (rows,), built=[(rewards, "rewards")]):
            pass


def test_a_notebook_s_cd_between_run_folder_and_training_is_refused_saying_why(tmp_path, monkeypatch):
    """A %cd between the cells made the relative run folder another folder: refused as 'not prepared for
    training', which the user had just done. The refusal names the working folder change and the way back."""
    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder

    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    s = SFTSettings(output_dir="runs", run_name="run")
    folder, resume_from = run_folder.prepare_run(s, "sft")
    assert folder == Path("runs/run")
    monkeypatch.chdir(tmp_path / "elsewhere")
    project = str(tmp_path / "project")
    with pytest.raises(UserError, match=rf"^the working folder changed since the 'Run folder' cell ran "
                                        rf"\({re.escape(project)}, now {re.escape(str(tmp_path / 'elsewhere'))}\), "
                                        rf"so runs/run names another folder: change back \(%cd {re.escape(project)}\)"):
        with run_folder.start_run(s, folder, resume_from):
            pass
    assert not (tmp_path / "elsewhere" / "runs").exists()
    monkeypatch.chdir(tmp_path / "project")
    with run_folder.start_run(s, folder, resume_from):  # back where it was prepared, it trains
        pass


def test_a_run_folder_s_lock_file_goes_with_its_run_and_a_lock_never_lands_on_a_removed_file(tmp_path, monkeypatch):
    """$ALIGNKIT_CACHE/run-locks/ kept one file per run folder ever trained. A run now removes its lock file as it
    lets go, still holding it; a process that opened the file before it went and locks it after takes the file now
    at the path instead (else two processes would hold 'the' lock: one on the removed file, one on a new one)."""
    from alignkit.core import journal
    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    s = SFTSettings(output_dir=str(tmp_path), run_name="run")
    folder, _ = run_folder.prepare_run(s, "sft")
    from alignkit.train import run_locks

    assert run_locks.lock_file(folder).is_file()
    with run_folder.start_run(s, folder, None):
        pass
    assert list((tmp_path / "cache" / "run-locks").iterdir()) == []
    lock = tmp_path / "lock"
    real_flock, removed = journal.fcntl.flock, []

    def flock_after_the_holder_removed_it(fd, operation):  # the holder let go (remove=True) between open and lock
        if not removed:
            removed.append(os.fstat(fd).st_ino)
            lock.unlink()
        return real_flock(fd, operation)

    monkeypatch.setattr(journal.fcntl, "flock", flock_after_the_holder_removed_it)
    held = journal.hold(lock, "test", "wait")
    assert os.fstat(held.fileno()).st_ino == os.stat(lock).st_ino  # the file at the path, not the removed one
    journal.let_go(lock, remove=True)
    assert not lock.exists()


def test_a_run_that_fails_before_training_and_a_notebook_s_abandoned_folder_leave_no_lock(tmp_path, monkeypatch):
    """A run that failed between prepare_run and training (a model that did not load) left its lock file in the
    cache; a notebook that prepared a folder and then another (a new run_name, a %cd) held the first until the kernel
    restarted: another command training it was refused, naming the idle kernel."""
    import subprocess
    import sys

    from alignkit.core.config import SFTSettings
    from alignkit.train import cell_checks, run_folder, run_locks

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    code = ("from alignkit.core.config import SFTSettings\nfrom alignkit.train import run_folder\n"
            f"run_folder.prepare_run(SFTSettings(output_dir={str(tmp_path)!r}, run_name='run'), 'sft')\n"
            "raise SystemExit('the model did not load')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "did not load" in done.stderr
    assert list((tmp_path / "cache" / "run-locks").iterdir()) == []

    monkeypatch.setattr(run_folder, "is_notebook", lambda: True)
    first, _ = run_folder.prepare_run(SFTSettings(output_dir=str(tmp_path), run_name="first"), "sft")
    assert run_locks.lock_file(first).is_file() and first.resolve() in run_locks.held()
    second, _ = run_folder.prepare_run(SFTSettings(output_dir=str(tmp_path), run_name="second"), "sft")
    assert not run_locks.lock_file(first).exists() and run_locks.held() == {second.resolve()}
    assert first.resolve() not in cell_checks.PREPARED  # its Train cell now says to run the cells again
    assert run_folder.prepare_run(SFTSettings(output_dir=str(tmp_path), run_name="second"), "sft")[0] == second
    run_locks.release(second)
    cell_checks.forget(second)


def test_data_read_under_other_settings_is_refused_at_the_run_folder_cell(tmp_path, tiny_cache):
    """A notebook's settings changed (a new --dataset_id) and its Data cell failed on them (a typo in the path):
    the earlier data was still in place, and the Run folder cell trained on it while the run recorded, and its card
    named, the new dataset. Data is marked with the settings it was read under; every script's loader marks it."""
    import dataclasses

    from alignkit.core.config import KTOSettings, RLSettings, SFTSettings
    from alignkit.core.data import load_preferences
    from alignkit.core.mixture import load_train_eval, split
    from alignkit.modeling import presets
    from alignkit.train import run_folder
    from alignkit.train.rl import load_prompt_dataset

    paths = presets.paths()
    s = SFTSettings(model_id="tiny", dataset_id=paths["sft"], output_dir=str(tmp_path), run_name="run", max_samples=8)
    train, held_out = load_train_eval("sft", s)
    typo = dataclasses.replace(s, dataset_id=str(tmp_path / "mydata.jsonl"))
    with pytest.raises(UserError, match=r"^the data was read under other settings than these \(dataset_id changed "
                                        r"since\): run the 'Data' cell again, then the cells after it$"):
        run_folder.prepare_run(typo, "sft", train, held_out)
    assert run_folder.prepare_run(s, "sft", train, held_out)[1] is None  # the same settings: as before
    run_folder.prepare_run(dataclasses.replace(s, learning_rate=1e-3), "sft", train, held_out)  # rows unchanged
    kto = KTOSettings(model_id="tiny", dataset_id=paths["preferences"], output_dir=str(tmp_path), run_name="k")
    data = load_train_eval("unpaired", kto)
    with pytest.raises(UserError, match=r"\(seed changed since\)"):
        run_folder.prepare_run(dataclasses.replace(kto, seed=7), "kto", *data)
    pairs = split(load_preferences(paths["preferences"]), kto, "preference")  # reward.py's split
    with pytest.raises(UserError, match=r"\(eval_split changed since\)"):
        run_folder.prepare_run(dataclasses.replace(kto, eval_split=0.2), "kto", *pairs)
    rl = RLSettings(model_id="tiny", dataset_id=paths["prompts"], output_dir=str(tmp_path), run_name="r",
                    reward=["rule"], max_prompts=4)
    prompts = load_prompt_dataset(rl)
    with pytest.raises(UserError, match=r"\(max_prompts changed since\)"):
        run_folder.prepare_run(dataclasses.replace(rl, max_prompts=5), "rl", prompts)
    # rl.py's prompts are every row read, in order: another seed reads the same rows (it was refused).
    run_folder.prepare_run(dataclasses.replace(rl, seed=7), "rl", prompts)


def test_a_call_that_exits_is_raised_not_waited_for():
    """A python: judge calling sys.exit() killed its worker thread and the caller waited for its result forever
    (evaluate.py's default --parallel 1 judges through threaded(): the review of session 30). It is raised."""
    def work(i):
        if i == 1:
            raise SystemExit(3)
        return i

    got = []
    with pytest.raises(SystemExit):
        for item, _ in threaded(work, range(4), 1):
            got.append(item)
    assert got == [0]


def test_trainer_train_typed_after_the_run_finished_is_refused(tmp_path):
    """`trainer.train()` typed into a notebook after the run finished (the README points at `trainer` in the
    Variables view) trained it again from step 0, over its last checkpoints and card (the notebook audit of
    session 32). Inside the training cell's block it trains; a trainer apart from alignkit's run folders too."""
    from types import SimpleNamespace

    from datasets import Dataset

    from alignkit.core.config import SFTSettings
    from alignkit.train import run_folder
    from alignkit.train.resuming import EndsAtMaxSteps

    class Base:
        def __init__(self, output_dir):
            self.args, self.trained = SimpleNamespace(output_dir=output_dir), 0

        def train(self, *args, **kwargs):
            self.trained += 1

    class Trainer(EndsAtMaxSteps, Base):
        pass

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    s = SFTSettings(model_id="tiny", dataset_id="org/chats", output_dir=str(tmp_path), run_name="typed")
    folder, resume_from = run_folder.prepare_run(s, "sft", rows, None)
    trainer = Trainer(str(folder))
    with run_folder.start_run(s, folder, resume_from, torch_module(), (rows, None)):
        trainer.train()
    with pytest.raises(UserError, match=r"^trainer.train\(\) outside the training cell: typed trains inside its 'with "
                                        r"start_run\(...\)' block, .* Run the cells from 'Run folder' on again"):
        trainer.train()
    assert trainer.trained == 1
    apart = Trainer(str(tmp_path / "elsewhere"))
    apart.train()
    assert apart.trained == 1
