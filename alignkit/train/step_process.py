"""One of alignkit's scripts as a step of a longer run (rlaif.py's label, dpo and evaluate), in its own process.

Its output is appended to the step's log, line by line, as it comes; where the person running the whole thing
watches (a terminal or a notebook: alignkit.core.progress.live), it is shown as well, progress bars included (the
step draws them, as it would run alone: ALIGNKIT_PROGRESS), so a round of hours is not a silent cell. The log keeps
each bar's last state only; the step's `error:` line is not shown, as the one line run_step raises says it. A
step whose parent dies is stopped with it (Linux); Ctrl-C or a notebook's interrupt
stops the step before it is raised.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import EXIT_USER_ERROR, UserError, run_again
from alignkit.core.errors import STEP_AGAIN, STEP_OF, is_notebook
from alignkit.core.journal import write_atomic
from alignkit.core.parent_death import stop_with_parent
from alignkit.core.progress import FORCE_LIVE, live

ROOT = Path(__file__).resolve().parents[2]  # the scripts live at the repository's top level, above alignkit/train/
RELAY_GRACE_S = 5.0  # after the step exits, how long its last output may take to arrive
STOP_GRACE_S = 60.0  # a step told to stop (SIGTERM) ends its training step and saves it first: how long it may take


HEADER = re.compile(r"^=== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ([^:\s]+): ")  # a step run's first line in its log


def run_step(script: str, args: list[str], log: Path, again: str | None = None,
             go_on: str | None = None, name: str | None = None) -> None:
    """`script` with `args`, its output appended to `log` (and shown where a person watches); a failure raises,
    naming the log: a bad input's one `error:` line as a UserError, anything else with the log's last lines.
    `again`: how the user resumes after fixing the cause (default: run_again()'s words); `go_on`: how the step's own
    lines say to go on after a stop (STEP_AGAIN: "run the same rlaif.py command again", not the step's own command
    line). Each run's part of the log starts with a HEADER line: its time, the step's `name` (default: the script's)
    and the command, so that a rerun's lines are told from the run before's (move_sections takes a step's parts
    out)."""
    again = again or run_again()
    command = [sys.executable, str(ROOT / script), *args]
    said = f"{script} {' '.join(shlex.quote(a) for a in args)}"
    logger.info(said)
    shown = live()
    # Unbuffered: into a pipe, the step's print()s would otherwise come at its exit, after all its log lines.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **({FORCE_LIVE: "1"} if shown else {}), STEP_OF: "cell" if is_notebook() else "command",  # its Ctrl-C: ours to say
           **({STEP_AGAIN: go_on} if go_on else {})}
    with open(log, "a", encoding="utf-8") as out:
        start = out.tell()  # this run's part of the log: an earlier try's error: line is not this one's
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {name or Path(script).stem}: {said}\n")
        out.flush()
        step = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                preexec_fn=_stop_with_parent(os.getpid()) if sys.platform == "linux" else None)
        # Relayed on a thread, and waited for by the step's exit: a process the step left behind holding its output
        # (wandb's service, a server a reward started) would otherwise hold the round until it ends.
        # Past the grace, it keeps reading (a writer to a pipe nobody reads would block or break) but writes nowhere.
        done = _Done()
        relay = threading.Thread(target=_relay, args=(step.stdout, out, _Screen(sys.stderr) if shown else None,
                                                      done), daemon=True)
        relay.start()
        try:
            code = step.wait()
        except BaseException:  # Ctrl-C, a SIGTERM, a notebook's interrupt: the step stops before this is raised
            step.terminate()  # a training step saves the step under way, then stops (alignkit.core.errors)
            try:
                step.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                step.kill()
                step.wait()
            raise
        finally:
            relay.join(timeout=RELAY_GRACE_S)  # the step's last lines
            with done.lock:  # no write of the relay's is under way as the log closes
                done.set = True
        if relay.is_alive():
            logger.info(f"{script} exited, and a process it started still writes to its output; that output is not "
                        f"in {log}")
    if code == 0:
        return
    with open(log, "rb") as f:  # this run's part only
        f.seek(start)
        lines = f.read().decode("utf-8", errors="replace").splitlines(True)
    said = next((line[len("error: "):].rstrip("\n") for line in reversed(lines) if line.startswith("error: ")), None)
    if code == EXIT_USER_ERROR:  # the step named a bad input in one `error:` line: pass that line on
        raise UserError(f"{script} stopped: {said or 'see the log'} (its log: {log}). Fix that and {again}")
    first = f": {said}" if said else ""  # its error: line (hidden from the screen), where a crash pushed it off the tail
    raise RuntimeError(f"{script} failed (exit {code}){first}; its log: {log}\n{''.join(lines[-15:])}\n"
                       f"Fix the cause and {again}")


def move_sections(log: Path, names: set[str], to: Path) -> bool:
    """The parts of `log` (each from a HEADER line to the next) of the steps `names`, and any lines before its
    first header (a log written before headers: what made them is unknown), appended to `to` in the order they
    ran, `to`'s own parts included (the steps of one redo move one after another); True if any moved."""
    if not log.is_file():
        return False
    kept, moved = [], []
    for when, name, text in _sections(log.read_text(encoding="utf-8")):
        (moved if name is None or name in names else kept).append((when, name, text))
    if not moved:
        return False
    there = _sections(to.read_text(encoding="utf-8")) if to.is_file() else []
    to.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(to, "".join(text for *_, text in sorted(there + moved, key=lambda part: part[0] or "")))
    write_atomic(log, "".join(text for *_, text in kept))
    return True


def _sections(text: str) -> list[tuple[str | None, str | None, str]]:
    """(time, step name, text) of each step run's part of a log; (None, None, text) for lines before any header."""
    parts: list[list] = []
    for line in text.splitlines(True):
        found = HEADER.match(line)
        if found or not parts:
            parts.append([found and found[1], found and found[2], line])
        else:
            parts[-1][2] += line
    return [tuple(part) for part in parts]


class _Done:
    """run_step's word to its relay that the log is closed (`set`), under `lock`."""

    def __init__(self):
        self.lock, self.set = threading.Lock(), False


class _Screen:
    """Where a step's output is shown, less its `error: ` line (the log keeps it): the one line run_step raises
    once the step has stopped says it, with the log and how to go on; shown too, it was said twice (the rlaif
    notebook audit of session 58). A line is held back only while it could still turn out to be one."""

    MARK = "error: "

    def __init__(self, stream):
        self.stream, self.head, self.hiding = stream, "", False
        self.at_start = True  # after a line end or a bar's \r

    def write(self, text: str) -> None:
        out = []
        for piece in re.split(r"([\r\n])", text):
            if piece in ("\r", "\n"):
                if not self.hiding:
                    out.append(self.head + piece)
                self.head, self.hiding, self.at_start = "", False, True
            elif self.hiding or not piece:
                continue
            elif self.at_start:
                self.head += piece
                if self.head.startswith(self.MARK):
                    self.head, self.hiding, self.at_start = "", True, False
                elif not self.MARK.startswith(self.head):
                    out.append(self.head)
                    self.head, self.at_start = "", False
            else:
                out.append(piece)
        if out:
            self.stream.write("".join(out))

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """The end of the output: a line held back that never became an `error: ` line is shown."""
        if self.head and not self.hiding:
            self.stream.write(self.head)
            self.stream.flush()
        self.head = ""


def _relay(stream, log, screen, done: _Done) -> None:
    """Each chunk of the step's output to `screen` as it comes (bars redraw with \\r), each whole line to `log` as
    its last redraw (the text after the line's last \\r; a \\r\\n ending is a plain line end); once `done`, the
    rest is read and dropped (a process the step left behind: the next step's output is on the screen then)."""
    import codecs

    decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    while chunk := os.read(stream.fileno(), 65536):
        text = decoder.decode(chunk)  # a character split between two reads is whole
        *lines, pending = (pending + text).split("\n")
        body = pending.rstrip("\r")
        if "\r" in body:  # a bar redrawn with no line end yet: only its last state is kept (the buffer stays small)
            pending = body.rsplit("\r", 1)[-1] + pending[len(body):]
        with done.lock:
            if done.set:
                continue
            if screen is not None:
                screen.write(text)
                screen.flush()
            for line in lines:
                log.write(line.rstrip("\r").rsplit("\r", 1)[-1] + "\n")
            log.flush()
    pending += decoder.decode(b"", final=True)
    with done.lock:
        if screen is not None and not done.set:
            screen.close()
        if pending.strip("\r") and not done.set:
            log.write(pending.rstrip("\r").rsplit("\r", 1)[-1] + "\n")
            log.flush()


def _stop_with_parent(parent: int):
    """In the step's process, before it starts: a SIGTERM when the parent dies (alignkit.core.parent_death), so a
    step is never left training on while a rerun starts a second one in the same folder."""
    def arm() -> None:
        stop_with_parent(parent)

    return arm
