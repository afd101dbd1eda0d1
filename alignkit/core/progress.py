"""The one progress rule: a live bar with an ETA wherever a person watches, quiet in CI logs.

`live()` decides for every bar alignkit shows or lets a library show: training (the Trainer's `disable_tqdm`),
the reference log-prob pass, generation, judging, merging, and the datasets/transformers bars (downloads,
loading weights, map). A bar is drawn

- in a terminal (stderr is a TTY),
- in a notebook (Jupyter, VS Code): ipykernel's stderr is no TTY, so a TTY test alone showed nothing there,
  and tqdm.auto draws a widget (or, without ipywidgets, text bars) in the cell's output,
- when a person started the command and pipes its output (`python dpo.py 2>&1 | tee log`): stdin is still
  their terminal,

- in a step of a longer run that a person watches (rlaif.py's label, dpo and evaluate: alignkit.train.step_process
  sets FORCE_LIVE and shows the step's output as it comes),

and never when `CI` is set (every CI service sets it; a bar redrawn by the line is thousands of lines of log
noise), nor when no stream is interactive and no notebook runs (a batch job): there `Progress` logs a line every
30 seconds instead.

`quiet_library_noise()`, which the loader and every training run call first, applies the rule to those libraries'
bars and drops a transformers warning TRL triggers on every step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from alignkit import logger

_FALSE = ("", "0", "false", "no", "off")
FORCE_LIVE = "ALIGNKIT_PROGRESS"  # "1": bars drawn, as where a person watches (see the module docstring)


def _isatty(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # a closed or replaced stream
        return False


def live() -> bool:
    """True where progress bars are drawn (see the module docstring): a terminal or a notebook, not CI."""
    from alignkit.core.errors import is_notebook

    if os.environ.get("CI", "").strip().lower() not in _FALSE:
        return False
    return os.environ.get(FORCE_LIVE) == "1" or is_notebook() or _isatty(sys.stderr) or _isatty(sys.stdin)


def bar(iterable=None, main_process: bool = True, **kwargs):
    """tqdm.auto's bar (a widget in a notebook, text in a terminal), switched off where `live()` is False and
    on every process but the main one of a multi-process launch (one bar, not one per GPU)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    off = kwargs.pop("disable", False)  # a library's own switch (lm_eval's disable_tqdm) still counts
    return tqdm(iterable, disable=bool(off) or not (main_process and live()), **kwargs)


@contextlib.contextmanager
def bars_by_rule(*modules):
    """Inside, each module's own `tqdm` name is `bar`: the bars of libraries that draw tqdm directly, which no
    library switch turns off (transformers' GGUF conversion, lm_eval's requests), follow alignkit's rule too."""
    drawn = [(module, module.tqdm) for module in modules if hasattr(module, "tqdm")]
    for module, _ in drawn:
        module.tqdm = bar
    try:
        yield
    finally:
        for module, tqdm in drawn:
            module.tqdm = tqdm


def apply_to_libraries() -> None:
    """datasets' and transformers' own bars (downloads, loading weights, map) follow the same rule."""
    import datasets
    import transformers

    if live():
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def quiet_library_noise() -> None:
    """Keep the log to what the user can act on.

    transformers v5 warns on every step that TRL calls its renamed gradient-checkpointing helpers, and progress
    bars redraw by the line when there is no terminal: thousands of lines in a CI log (`live` decides where bars
    are drawn). The loader and every training run call it first.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*", category=FutureWarning)
    # PEFT's, on every load of a mixture of experts whose fused experts it adapts (Mixtral's): its own rank and alpha
    # patterns for the fused gate_up_proj, applied all the same (4 experts x r), said "ignored" twice a load.
    warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match any targeted "
                            r"module and were ignored: \['\.\*\\+\.gate_up_proj'\]", category=RuntimeWarning)
    # bitsandbytes logs this on every forward of every 8-bit layer (18 lines for two tiny steps): once is the news.
    # And TRL's implicit-prompt warning, "shown once" by its text, which ends with the prompt's left-out end: it came
    # again for every distinct ending (a line per prompt of a dataset whose template renders the prompt apart).
    implicit = "The tokenized prompt is not a prefix of the tokenized"
    for name, prefix in (("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
                         *((f"trl.trainer.{trainer}", implicit) for trainer in ("dpo_trainer", "sft_trainer",
                                                                                  "kto_trainer"))):
        said_once = logging.getLogger(name)
        if not any(isinstance(f, _Once) and f.prefix == prefix for f in said_once.filters):
            said_once.addFilter(_Once(prefix))
    apply_to_libraries()  # datasets'/transformers' bars: on in a terminal or a notebook, off in CI logs


class _Once(logging.Filter):
    """Lets a log record starting with `prefix` through once per process."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.said = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        said, self.said = self.said, True
        return not said


class Progress:
    """A tqdm bar where `live()`; elsewhere (CI logs) a log line every 30 seconds and one at the end."""

    def __init__(self, what: str, total: int, done: int = 0, unit: str = "pair", errors: bool = True):
        self.what, self.total, self.done, self.unit, self.errors = what, total, done, unit, 0
        self._show_errors = errors
        self._start, self._start_done = time.monotonic(), done
        self._last = self._start
        self.bar, self._closed = None, False
        if total and live():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=what, unit=unit, dynamic_ncols=True)
            if errors:
                self.bar.set_postfix(errors=0)

    def update(self, n: int = 1, errors: int | None = None) -> None:
        self.done += n
        self.errors = self.errors if errors is None else errors
        if self.bar is not None:
            if self._show_errors:
                self.bar.set_postfix(errors=self.errors, refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self._last >= 30:
            self._last = time.monotonic()
            self._log()

    def _log(self) -> None:
        rate = (self.done - self._start_done) / max(time.monotonic() - self._start, 1e-9)
        errors = f", {self.errors} errors" if self._show_errors else ""
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")  # matches, not matchs
        # What was done before (a cache's) is said as such: "87/87 pairs, 0.0/s" read as a stalled run.
        before = f" ({self._start_done} done before)" if self._start_done else ""
        speed = f", {rate:.1f}/s" if self.done > self._start_done else ""
        logger.info(f"{self.what}: {self.done}/{self.total} {units}{before}{speed}{errors}")

    def close(self) -> None:
        """The bar closed (or its last line logged), once: a caller may close it early, before its own last line."""
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            self._log()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
