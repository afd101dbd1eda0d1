"""What a run leaves in its folder beside the weights, read back for a run folder, a merge, or a checkpoint-N.

- `run_config(folder)`: the settings the model in `folder` was trained with (alignkit_config.json): a run
  folder's or a merge's own, or for a checkpoint-N (which holds none) its run's, one folder up.
- `checkpoint_metrics(folder)`: a checkpoint-N's own figures, from the Trainer's trainer_state.json in it: the
  last logged value of each training and evaluation metric up to its step. A run's metrics.json holds the
  finished run's, which are not the checkpoint's; a merge or a model card of the checkpoint shows these instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# A run's settings file in its folder (alignkit.train.run_folder.CONFIG_FILE).
RUN_CONFIG = "alignkit_config.json"
_CHECKPOINT = re.compile(r"checkpoint-\d+")


def run_config(folder) -> dict:
    """The settings a model folder was trained with (its alignkit_config.json): a run folder's or a merge's own, or
    for a checkpoint-N, its run's, one folder up (a checkpoint holds none); {} when there are none."""
    here = Path(folder).resolve()
    for candidate in (here, *([here.parent] if _CHECKPOINT.fullmatch(here.name) else [])):
        try:
            found = json.loads((candidate / RUN_CONFIG).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict):
            return found
    return {}


def checkpoint_metrics(folder) -> dict:
    """A checkpoint's figures at its step, from its trainer_state.json: each metric's last logged value up to the
    step (the training loss, rewards/accuracies, eval_loss, ...), then `global_step` and `checkpoint` (its folder's
    name); {} for a folder without a Trainer state (a run folder, a merge)."""
    try:
        state = json.loads((Path(folder) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict):
        return {}
    step = state.get("global_step")
    metrics: dict = {}
    for entry in state.get("log_history") or []:
        if not isinstance(entry, dict) or (step is not None and entry.get("step", 0) > step):
            continue
        metrics.update({k: v for k, v in entry.items() if k != "step" and isinstance(v, (int, float, str))})
    if step is not None:
        metrics["global_step"] = step
    metrics["checkpoint"] = Path(folder).resolve().name
    return metrics
