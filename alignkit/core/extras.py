"""Optional parts of alignkit (pyproject.toml's extras) and the one line that says how to add a missing one.

The core (sft.py, dpo.py, merge.py, label.py, reward.py, rl.py) needs none of them. The extras:

- `eval`: FastChat (MT-Bench judging, `evaluate.py mt_bench` / `pairwise` with an LLM judge) and alpaca_eval
  (`evaluate.py alpaca_eval`): together about 60 packages (fastapi, uvicorn, scipy, scikit-learn, ...) that a
  training user never imports;
- `tracking`: wandb and tensorboard, for `--report_to wandb|tensorboard`.

`requirements-dev.txt` installs both (the README's first command and CI use it). Each is imported only where it
is used, through `require`, so a missing one is a `MissingExtra` (a UserError: one `error:` line, exit 2) naming
the pip command, raised before any model loads.
"""

from __future__ import annotations

import importlib
import os

from alignkit.core.errors import UserError

EXTRAS = {"eval": "FastChat and alpaca_eval", "tracking": "wandb and tensorboard"}


class MissingExtra(UserError, ImportError):
    """An optional package is not installed; the message names the pip command that adds it."""


def install_line(extra: str) -> str:
    return f'pip install -e ".[{extra}]" (in the alignkit folder; it adds {EXTRAS[extra]})'


def require(module: str, extra: str, what: str, instead: str = ""):
    """`import module`, or a MissingExtra saying that `what` needs it and how to install it (or `instead`)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the {module} package, from alignkit's `{extra}` extra: "
                           f"{install_line(extra)}" + (f"; or {instead}" if instead else "")) from None


def require_tracker(report_to: str) -> None:
    """--report_to wandb|tensorboard: its package is there, checked before any model loads (transformers would
    only fail when the trainer is built)."""
    if report_to == "wandb":
        require("wandb", "tracking", "--report_to wandb", instead="--report_to none")
    elif report_to == "tensorboard":
        try:
            importlib.import_module("tensorboardX")  # transformers' TensorBoardCallback takes either package
        except ImportError:
            require("tensorboard", "tracking", "--report_to tensorboard", instead="--report_to none")


def has_tracker(report_to: str) -> bool:
    """Whether require_tracker would pass: `--report_to all` takes the trackers that are installed."""
    try:
        require_tracker(report_to)
    except MissingExtra:
        return False
    return True


def wandb_ready() -> bool:
    """wandb can log without asking for a login nobody can answer: offline, a key, or a login in ~/.netrc."""
    from pathlib import Path

    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    netrc = Path.home() / ".netrc"
    return offline or bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
