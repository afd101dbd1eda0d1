"""How a run that ends badly leaves its folder (alignkit.train.run_folder claims it): a run that stopped after its
first checkpoint keeps its checkpoints, marked by `alignkit_failed.txt`, for `--resume auto` to go on; one that
stopped before gives the folder back to the earlier run it moved aside, at once (`_release`) or, after a kill that
ran no `except`, at the next command (`_restore_stranded`, from `alignkit_claim.json`). What a judge reward paid for
is kept either way (alignkit.train.kept_judgments)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alignkit import logger
from alignkit.core.args import redact
from alignkit.core.errors import Terminated, is_notebook, run_again, said_how_to_go_on
from alignkit.core.run_records import CLAIM_FILE, checkpoints
from alignkit.train.cell_checks import cells_from, notebook_cells
from alignkit.train.kept_judgments import judgments_back, remove_keeping_judgments

FAILED_FILE = "alignkit_failed.txt"  # in a run folder whose training raised after its first checkpoint


def _holds_work(folder: Path) -> bool:
    """A checkpoint, an adapter, metrics or a merged model: something a run took time to make."""
    return folder.is_dir() and any(
        any(folder.glob(pattern)) for pattern in ("checkpoint-*", "adapter_model.*", "metrics.json", "merged")
    )


def _restore_stranded(folder: Path) -> None:
    """A run killed before its first checkpoint (SIGKILL, the host's OOM killer: no `except` ran) left its folder
    claimed and empty, and the earlier run aside: put the earlier run back before anything looks at the folder."""
    claim = folder / CLAIM_FILE
    if not claim.is_file() or _holds_work(folder):
        return
    try:
        earlier = Path(json.loads(claim.read_text())["earlier_run"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if earlier.is_dir():
        paid = remove_keeping_judgments(folder)
        shutil.move(str(earlier), folder)
        logger.info(f"the run in {folder} stopped before its first checkpoint: the earlier run is back in place "
                    f"(from {earlier}){judgments_back(paid, folder)}")


def _release(folder: Path, aside: Path | None, error: BaseException) -> None:
    """After a failed (or interrupted) run: keep what it saved, or give the folder back to the run that was there."""
    ended = "was stopped (SIGTERM)" if isinstance(error, Terminated) else \
        "was interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    again = f"run {cells_from(notebook_cells(folder=folder), again=True)}" if is_notebook() else run_again()
    if checkpoints(folder):
        (folder / FAILED_FILE).write_text(redact(f"{type(error).__name__}: {error}\n"))
        logger.info(f"the run {ended}; its checkpoints stay in {folder} (see {FAILED_FILE}): {again} to resume"
                    + (f"; the earlier run is in {aside}" if aside else ""))
        if isinstance(error, KeyboardInterrupt):
            said_how_to_go_on()
        return
    paid = remove_keeping_judgments(folder, ignore_errors=True)
    if aside:
        shutil.move(str(aside), folder)
    kept = judgments_back(paid, folder)
    # A stop says how to go on here, in this one line: the generic "what was finished is kept; run the cell again to
    # go on" after "nothing of it to keep" contradicted it (the notebook audit). A failure's own error line follows.
    anew = f"; {again} to start it anew" if isinstance(error, KeyboardInterrupt) else ""
    if aside:
        logger.info(f"the run {ended} before its first checkpoint, with nothing of it to keep: removed it{kept}; the "
                    f"earlier run is back in {folder}{anew}")
    else:
        logger.info(f"the run {ended} before its first checkpoint, with nothing of it to keep: removed {folder}{kept}"
                    f"{anew}")
    if anew:
        said_how_to_go_on()
