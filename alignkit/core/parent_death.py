"""A child process stops when its parent dies: a launch's ranks and rlaif's steps are never left running alone.

A launcher or a round killed hard (SIGKILL: a scheduler's hard kill, an out-of-memory kill; no `except` runs)
left its children training on unattended: holding the GPUs and the run folder's lock, so that the same command
again was refused as a second run in the folder, or found the run finished behind its back. Linux's
PR_SET_PDEATHSIG sends the child SIGTERM when its parent dies; the run folder is then claimed and restored as after
any kill. Elsewhere nothing is armed.

The signal comes when the *thread* that started the child ends: armed only where that thread is the parent's main
one, as in rlaif.py (its steps) and torchrun's agent (accelerate launch's ranks; alignkit.core.launch arms it under
torchrun only, not under launchers it does not know).
"""

from __future__ import annotations

import os
import signal
import sys


def _prctl():
    """libc's prctl, looked up here (not in a forked child, between fork and exec), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without it
        return None


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def stop_with_parent(parent: int) -> None:
    """In the child (a rank at its start, or a step's preexec_fn): SIGTERM when `parent` dies; if it died before
    this was armed, exit now."""
    if parent <= 1:  # already re-parented to init: the parent died before this process could arm anything
        os._exit(143)
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before this was armed
        os._exit(143)
