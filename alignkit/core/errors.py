"""User-facing errors, and how a script reports them.

`UserError` is the one base type of every problem the user can fix: a bad flag or value (`ConfigError`), a bad
data row or a missing data file (`DataError`), a missing token, an unreachable Hub (`HubUnreachable`), a missing
model folder. Its message names what is wrong and the fix. Run as a script (`python dpo.py ...`), such an error
prints `error: <message>` and exits with status 2, without a traceback (in a notebook: the same line under the
cell); `--debug` or `ALIGNKIT_DEBUG=1` shows the traceback too. Anything else is a bug or a failure nobody
foresaw, and keeps its full traceback. In a notebook kernel the one-line report holds from this module's first
import on, not only from the first cell's report_user_errors().
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import sys
import time

EXIT_USER_ERROR = 2  # the status argparse and most Unix tools use for bad usage


class UserError(ValueError):
    """A problem the user can fix; the message names the bad input and the fix.

    A ValueError, so code that caught the ValueErrors alignkit raised before still catches these.
    """

    def _render_traceback_(self) -> list[str]:
        """IPython's own display of an exception where no handler of alignkit's runs (`%run script.py` and `ipython
        script.py` show a script's errors themselves): the one line a script says; ALIGNKIT_DEBUG=1 the traceback."""
        import traceback

        if debugging():
            return "".join(traceback.format_exception(type(self), self, self.__traceback__)).rstrip("\n").split("\n")
        return [error_line(self)]


class ConfigError(UserError):
    """A user-facing configuration problem; the message names the source of the bad value and the fix."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a scheduler's stop, `timeout`, `docker stop`, `kill`) in a script: Ctrl-C's path (what was finished
    is kept, the same command goes on from there), exit status 143. A training first ends its step and saves it as a
    checkpoint (`stop_on_sigterm`)."""


class EndpointRefused(UserError, RuntimeError):
    """An endpoint refused a request outright (a bad key, base URL or model name): every further request would be
    refused too, so the run stops, and the user fixes the setting. A RuntimeError too, as it was before."""


def error_line(error: BaseException) -> str:
    """`error: <message>`, secrets redacted, on one line: a message that embeds another's text of several lines (an
    endpoint's body, a rule's exception) has its lines joined, so rlaif's steps and a log's reader see all of it."""
    from alignkit.core.secrets import redact

    return "error: " + " ".join(line.strip() for line in redact(str(error)).splitlines() if line.strip())


def debugging() -> bool:
    """--debug on the command line, or ALIGNKIT_DEBUG=1: show tracebacks of user errors too."""
    return "--debug" in sys.argv[1:] or os.environ.get("ALIGNKIT_DEBUG", "").lower() in ("1", "true", "yes", "on")


OTHER_RANKS_WAIT = 10.0  # seconds a launch's other processes wait before saying a refusal local rank 0 says
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process stopped by it
INTERRUPTED = "interrupted: what was finished is kept; the same command goes on from there"
INTERRUPTED_IN_CELL = ("interrupted: what was finished is kept; run the cell again to go on (a training cell: the "
                       "cells from 'Run folder' on)")
INTERRUPTED_IMPORT = ("interrupted while Python imported a library, which stays half-imported in this kernel (a "
                      "second run fails inside it): restart the kernel, then run the cells from the first one")
# Set in a script run as a step of another (rlaif.py's rounds, alignkit.train.step_process): that script says what an
# interrupt left and how to go on, once, in its own words. Its value: "cell" where that script runs in a notebook.
STEP_OF = "ALIGNKIT_STEP"
# With it, how to go on after the step stops, in that run's words (the step's logged command may end in --resume false).
STEP_AGAIN = "ALIGNKIT_STEP_AGAIN"

_SAID_HOW_TO_GO_ON: list[bool] = []  # a stop whose own line said what is kept and how to go on (said_how_to_go_on)


def said_how_to_go_on() -> None:
    """The line just logged for an interrupt says what is kept and how to go on (a run folder's checkpoints,
    label.py's judgments): the script's generic "interrupted" line would say it a second time."""
    _SAID_HOW_TO_GO_ON.append(True)


def run_again() -> str:
    """How to go on after a stop, in the words of where the run was started: a notebook's cell, a command, or the
    run it is a step of (STEP_AGAIN)."""
    cell = is_notebook() or os.environ.get(STEP_OF) == "cell"
    return os.environ.get(STEP_AGAIN) or ("run the cell again" if cell else "run the same command again")


def _report(kind, error, tb) -> None:
    if issubclass(kind, KeyboardInterrupt) and not debugging():  # Ctrl-C: one line, not a traceback into a library
        # Rank 0 speaks for a launch (its run folder's line, or this one): each other rank said it again.
        if not os.environ.get(STEP_OF) and not _SAID_HOW_TO_GO_ON and os.environ.get("RANK", "0") == "0":
            print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_TERMINATED if issubclass(kind, Terminated) else EXIT_INTERRUPTED)
    if issubclass(kind, UserError) and not debugging():
        _sigterm_ends_it()  # the launcher stopping the other ranks of a refused launch: no second report
        # A launch's refusal: every process has it, this machine's first says it, and the launcher stops the others
        # while they wait; one still here after the wait says it too (its reason may be its own).
        if getattr(error, "said_by_local_rank_0", False):
            time.sleep(OTHER_RANKS_WAIT)
        print(error_line(error), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)  # honoured from an excepthook: the interpreter exits with this status
    sys.__excepthook__(kind, error, tb)
    if issubclass(kind, UserError):
        sys.exit(EXIT_USER_ERROR)


def _sigterm_ends_it() -> None:
    """A SIGTERM while a refusal is being said ends the process as Python would (a launch's launcher stops every
    rank once one has failed): under FSDP and ZeRO-3 it came into the excepthook as Terminated, and Python printed
    "Error in sys.excepthook" and the refusal again as "Original exception was" (the reward/rl audit of session 32)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def report_on_rank(before, rank: int) -> None:
    """After torch's init_process_group, which wraps sys.excepthook to put "[rankN]: " before each line the
    earlier hook (`before`) writes: it buffers that output and writes it out only when the hook returns. Ours
    exits (status 2) on a user error, so under every launch the error line was lost and the launch ended without a
    word. The same prefix, and the lines written out in any case."""
    if before is not _report or sys.excepthook is _report:
        return
    prefix = f"[rank{rank}]: "

    def hook(kind, error, tb):
        stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            _report(kind, error, tb)
        finally:
            text, sys.stderr = sys.stderr.getvalue(), stderr
            sys.stderr.write("".join(prefix + line if line.strip() else line for line in text.splitlines(True)))
            sys.stderr.flush()

    sys.excepthook = hook


def is_notebook() -> bool:
    """True inside a Jupyter/IPython kernel (incl. VS Code interactive), whose argv is not ours to parse."""
    argv0 = sys.argv[0] if sys.argv else ""
    # Not "ipykernel in sys.modules": a test runner or a tool that merely imports it is no kernel, and its argv
    # (a script's real flags) must still be read.
    return argv0.endswith("ipykernel_launcher.py") or hasattr(builtins, "get_ipython")


def report_user_errors() -> None:
    """Make a script report UserErrors as `error: <message>` and exit 2 (see the module docstring).

    In a notebook (Jupyter, VS Code's Interactive Window) a UserError is shown as the same one line under the
    cell, which still counts as failed (Run All stops there), and the kernel lives on; `ALIGNKIT_DEBUG=1` shows the
    traceback. In a kernel this holds from alignkit's first import on (`_one_line_errors_in_a_kernel`), unless the
    notebook installed its own handler first; a script that imports alignkit as a library keeps Python's hook.
    """
    if not is_notebook():
        sys.excepthook = _report
        stop_on_sigterm()
        return
    shell = getattr(builtins, "get_ipython", lambda: None)()
    if shell is not None and hasattr(shell, "set_custom_exc"):
        shell.set_custom_exc((UserError, KeyboardInterrupt, NameError), _show_in_cell)
    if shell is not None and hasattr(shell, "events"):
        if _settings_cell_failed not in shell.events.callbacks.get("post_run_cell", []):
            shell.events.register("post_run_cell", _settings_cell_failed)


# What a notebook's settings cell calls (and no other cell does): alignkit.core.args.parse_config, and evaluate.py's
# alignkit.evals.evaluation.parse_command over it.
SETTINGS_CELL_CALLS = frozenset({"parse_config", "parse_command"})


def _settings_cell_failed(result) -> None:
    """IPython's post_run_cell event. A settings cell that failed anywhere (its parse, presets.ensure, the launch's
    refusal, preflight, a check of its own) takes the kernel's settings it names, and every other of their
    classes, out: the cells below fail in one line ("the settings cell stopped with an error") instead of running
    on the earlier settings (a typo in `overrides` trained and saved the previous run again) or on new ones that
    were refused (a push over a local base, trained for hours, failed at the push)."""
    import ast

    from IPython import get_ipython  # not builtins': IPython takes it out of them once the cell has run

    shell = get_ipython()
    names = getattr(shell, "user_ns", None)
    if not isinstance(names, dict):
        return
    for name in [n for n in _GONE if n in names]:  # set again since: a NameError is its own
        del _GONE[name]
    if getattr(result, "error_in_exec", None) is None:
        return
    try:  # the cell's source as Python (IPython runs it a statement at a time: no frame holds it whole)
        source = getattr(shell, "transform_cell", str)(getattr(getattr(result, "info", None), "raw_cell", "") or "")
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    nodes = list(ast.walk(tree))
    named = {n.id for n in nodes if isinstance(n, ast.Name)} | {n.attr for n in nodes if isinstance(n, ast.Attribute)}
    if not SETTINGS_CELL_CALLS & named:
        return
    _forget(names, {type(names[n]) for n in named if _is_settings(names.get(n))})
    # What it would have set and did not (a fresh kernel's first run: `settings` never was): the cells below say the
    # settings cell stopped, not the traceback of a typo of the imported SFTSettings that Python's rule took it for.
    _GONE.update({n: _GONE.get(n, NEVER_SET) for n in _cell_sets(tree) if n not in names})  # not one it took out


def _cell_sets(tree) -> set[str]:
    """The names a cell's own code binds in the kernel (assignments, imports, for/with targets, :=), not those inside
    its functions and classes, nor a comprehension's loop variables (its own in Python 3), nor names only read in a
    target (`d[key] = v`)."""
    import ast

    bound, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        # A comprehension's target is its own; a := in its conditions (or its element) binds the cell's.
        todo.extend([node.iter, *node.ifs] if isinstance(node, ast.comprehension) else ast.iter_child_nodes(node))
    return bound


def forget_failed_settings(cls) -> None:
    """Settings of `cls` that failed their parse (alignkit.core.args.parse_config) take the kernel's of that class out,
    as a failed settings cell does (_settings_cell_failed)."""
    shell = getattr(builtins, "get_ipython", lambda: None)() if is_notebook() else None
    if isinstance(names := getattr(shell, "user_ns", None), dict):
        _forget(names, {cls})


def _forget(names: dict, kinds: set) -> None:
    for name in [n for n, value in names.items() if not n.startswith("_") and type(value) in kinds]:
        del names[name]
        _GONE[name] = FORGOTTEN


def _is_settings(value) -> bool:
    """An instance of one of alignkit's dataclasses: the settings, and what a settings cell builds from them (label.py's
    `run` and `grader`), which go with them."""
    import dataclasses

    return dataclasses.is_dataclass(value) and not isinstance(value, type) and \
        type(value).__module__.startswith("alignkit.")


FORGOTTEN, NEVER_SET = "forgotten", "never set"  # why a failed settings cell left a name undefined (_GONE)
_GONE: dict[str, str] = {}  # name -> why: its settings taken out (_forget), or never set (a fresh kernel's first run)


def _show_in_cell(shell, kind, error, tb, tb_offset=None):
    """IPython's handler for a UserError or an interrupt raised by a cell (InteractiveShell.set_custom_exc)."""
    if debugging():
        lines = shell.InteractiveTB.structured_traceback(kind, error, tb, tb_offset=tb_offset)
        shell._showtraceback(kind, error, lines)
        return None
    if issubclass(kind, NameError):
        last = tb
        while last is not None and last.tb_next is not None:
            last = last.tb_next
        # A typo of a name the kernel has, as Python itself judges one (a looser match took a cell's imports,
        # load_model for `loaded`, for typos).
        import builtins

        name = getattr(error, "name", None) or ""
        if _GONE.get(name) == FORGOTTEN:  # not a typo of SFTSettings, which Python's rule would take it for
            print(f"error: {name}: the settings cell stopped with an error (see its line), so its earlier settings "
                  "are gone from the kernel: fix it and run it, then the cells from there down", file=sys.stderr)
            return None
        if _GONE.get(name) == NEVER_SET:
            print(f"error: {name}: the settings cell stopped with an error (see its line) before it set {name}: fix "
                  "it and run it, then the cells from there down", file=sys.stderr)
            return None
        typo = _close_name(name, list(getattr(shell, "user_ns", {}))) or _close_name(name, list(vars(builtins)))
        # Only the cell's own code (not a module it imports, nor a function: a bug, shown whole), and not a typo.
        cell = last is not None and last.tb_frame.f_code.co_name == "<module>" and \
            last.tb_frame.f_globals is getattr(shell, "user_ns", None)
        if not cell or typo:
            lines = shell.InteractiveTB.structured_traceback(kind, error, tb, tb_offset=tb_offset)
            shell._showtraceback(kind, error, lines)
            return None
        # In the cell's own code: a name an earlier cell sets, which has not run or stopped with an error (the
        # usual way here is a cell run after a failed one), not a traceback pointing at this cell's line.
        print(f"error: {error}: the cell above that sets it has not run, or stopped with an error; fix that and "
              "run the cells from there down (Run All Above, then this one)", file=sys.stderr)
        return None
    if issubclass(kind, KeyboardInterrupt):  # the kernel's stop button: 30-50 lines deep inside TRL, before
        torch = sys.modules.get("torch")
        # A stop inside torch.no_grad()'s own entry or exit left gradients off in the kernel: every later training
        # failed ("element 0 of tensors does not require grad"). Only then: a notebook may turn them off itself.
        if torch is not None and _through(tb, ("torch/autograd/grad_mode.py", "torch/utils/_contextlib.py")):
            torch.set_grad_enabled(True)
        said = INTERRUPTED_IMPORT if _in_an_import(tb) else None if _SAID_HOW_TO_GO_ON else INTERRUPTED_IN_CELL
        _SAID_HOW_TO_GO_ON.clear()  # the kernel lives on: the next stop says its own
        if said:  # not after a run folder's own line (its checkpoints, the cells to run): two ways to go on
            sys.stderr.write(said + "\n")  # one write: one stream message under the cell
        return None
    print(error_line(error), file=sys.stderr)
    return None


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _through(tb, files: tuple[str, ...]) -> bool:
    """Whether the traceback `tb` passes through one of `files` (path endings)."""
    return any(frame.f_code.co_filename.replace("\\", "/").endswith(files) for frame in _frames(tb))


def _in_an_import(tb) -> bool:
    """Whether the traceback `tb` passes through a module's import: importlib's frames (import_module), or, for an
    import statement (whose traceback leaves them out), a module's top level that the failed import took back out of
    sys.modules. Such a module, and those importing it, are left half-initialised."""
    for frame in _frames(tb):
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        spec, name = frame.f_globals.get("__spec__"), frame.f_globals.get("__name__")
        if frame.f_code.co_name == "<module>" and spec is not None and name and \
                getattr(sys.modules.get(name), "__dict__", None) is not frame.f_globals:
            return True
    return False


def _close_name(name: str, candidates: list[str]) -> str | None:
    """The name Python's NameError would suggest ("Did you mean: ...?") among one list of names (Python tries the
    frame's names, then the builtins), by its own rule (CPython's Python/suggestions.c): the closest candidate within
    (len(a) + len(b) + 3) // 3 edits, an insertion, deletion or substitution costing 2 and a change of case 1; none
    among more than 750 candidates."""
    candidates = list(dict.fromkeys(candidates))
    if not name or len(candidates) > 750:
        return None
    best, best_cost = None, None
    for other in candidates:
        if other == name:
            continue
        limit = (len(name) + len(other) + 3) * 2 // 6
        if best_cost is not None:
            limit = min(limit, best_cost - 1)
        if abs(len(name) - len(other)) * 2 > limit:
            continue
        row = [2 * j for j in range(len(other) + 1)]
        for i, a in enumerate(name, 1):
            previous, row[0] = row[0], 2 * i
            for j, b in enumerate(other, 1):
                change = 0 if a == b else 1 if a.lower() == b.lower() else 2
                previous, row[j] = row[j], min(row[j] + 2, row[j - 1] + 2, previous + change)
        if row[-1] <= limit:
            best, best_cost = other, row[-1]
    return best


# ---------------------------------------------------------------- a Ctrl-C that nothing may swallow
_PENDING: list[int] = []  # SIGINTs received inside keep_interrupts() and not yet acted on


@contextlib.contextmanager
def keep_interrupts():
    """While open (a training: alignkit.train.run_folder.start_run), a Ctrl-C is remembered as well as raised.
    Python drops an exception raised inside `__del__`: a Ctrl-C landing in the garbage collection the Trainer runs as
    it starts (a dataset's finalizer) was lost, and the run trained to its end with exit status 0. The trainers
    raise a remembered one at their next step (`raise_pending_interrupt`). Only in the main thread, over Python's
    own handler (a kernel's, which raises the same KeyboardInterrupt, included). A SIGTERM meanwhile waits for the
    step under way (`sigterm_asked`); one still waiting as the training ends is raised once the finished run is saved
    (alignkit.train.training.finish)."""
    import signal
    import threading

    ours = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def remember(signum, frame):
        _PENDING.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, remember) if ours else None
    _PENDING.clear()
    _SIGTERM.update(training=False, asked=False)  # the trainer's loop sets training (deferring a SIGTERM)
    try:
        yield  # a SIGTERM after the last step's end stays asked: the finished run is saved, then it stops (finish)
    finally:
        _PENDING.clear()
        _SIGTERM["training"] = False
        if ours:
            signal.signal(signal.SIGINT, previous)


def raise_pending_interrupt() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C (or SIGTERM) that Python dropped inside a finalizer (once)."""
    if _PENDING:
        import signal

        term = _PENDING[-1] == signal.SIGTERM
        _PENDING.clear()
        raise Terminated("SIGTERM") if term else KeyboardInterrupt


# ---------------------------------------------------------------- a SIGTERM: Ctrl-C's path, after the step under way
_SIGTERM = {"pid": None, "training": False, "asked": False, "at": 0.0, "stopping": False}
SAME_STOP_S = 5.0  # SIGTERMs this close to the first are the same stop (a scheduler's, and torchrun's forward of it)
STOPPING_S = 30.0  # once the step is saved, SIGTERMs this soon after are let be while the process cleans up


def training_steps() -> None:
    """The trainer's loop has begun (alignkit.train.resuming): from here a SIGTERM waits for the step's end. Before
    it (TRL tokenizing the data, the dataloaders), a SIGTERM stops at once."""
    _SIGTERM["training"] = True


def stop_on_sigterm() -> None:
    """A script's SIGTERM (a scheduler's or `timeout`'s stop, `docker stop`) takes Ctrl-C's path: alignkit's
    "interrupted" line, alignkit_failed.txt beside a run's checkpoints, label.py's and evaluate.py's finished work
    kept; exit status 143. It killed the process where it stood, without a word. During a training the step under
    way ends first and is saved as a checkpoint, which the same command resumes from (alignkit.train.resuming; under
    a launch every process stops at the same step); a second SIGTERM, seconds later, stops at once. Not in a
    notebook's kernel. A process forked from this one (a DataLoader's or datasets' worker) keeps the default."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    if _SIGTERM["pid"] is None and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_default_in_a_child)
    _SIGTERM["pid"] = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)


def _default_in_a_child() -> None:
    """A process forked from the script (a DataLoader's or datasets' worker) stops at a SIGTERM as before: the
    default again, at once after the fork (the pid check in _on_sigterm covers a fork this could not reach)."""
    import signal

    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the child's main thread
        pass


def _on_sigterm(signum, frame) -> None:
    import signal

    if os.getpid() != _SIGTERM["pid"]:  # a forked worker: stopped by it, as before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    now = time.monotonic()
    if _SIGTERM["stopping"] and now - _SIGTERM["at"] < STOPPING_S:  # the step is saved: its cleanup runs to the end
        return
    if _SIGTERM["training"] and not _SIGTERM["asked"]:  # the trainer ends its step and saves it
        _SIGTERM.update(asked=True, at=now)
        return
    if _SIGTERM["asked"] and now - _SIGTERM["at"] < SAME_STOP_S:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a third stops as Python would
    if _SIGTERM["training"]:
        _PENDING.append(signum)  # raised at the next step if a finalizer drops it
    raise Terminated("SIGTERM")


def sigterm_asked() -> bool:
    """Whether a SIGTERM came during this training and waits for its step's end (the trainer saves and stops)."""
    return _SIGTERM["asked"]


def stop_for_sigterm(why: str) -> None:
    """Raise the Terminated of a SIGTERM that waited (the trainer saved its step, or the finished run is saved);
    SIGTERMs in the next STOPPING_S are let be, so that the run folder's cleanup runs whole."""
    _SIGTERM.update(stopping=True, at=time.monotonic())
    raise Terminated(why)


def _one_line_errors_in_a_kernel() -> None:
    """In a notebook kernel, the first cell's report_user_errors from the first import of this module on (every
    module that can refuse imports it): a later cell run first (after a kernel restart, or picked from the middle)
    showed Python's traceback for a name an earlier cell sets, and for a refusal. A handler the user installed
    (IPython's set_custom_exc) stays."""
    shell = getattr(builtins, "get_ipython", lambda: None)()
    if shell is not None and hasattr(shell, "set_custom_exc") and not getattr(shell, "custom_exceptions", ()):
        report_user_errors()


_one_line_errors_in_a_kernel()
