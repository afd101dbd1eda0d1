"""The end of every training run (sft.py, dpo.py, reward.py, rl.py): a picture and a summary.

- `plot_training`: `training.png` in the run folder, drawn from the trainer's log history (what
  `trainer_state.json` holds), one panel per curve the run logged: the loss; for DPO the reward margins and
  accuracies; for a reward model its pairwise accuracy; for online RL the reward and the KL to the reference;
  the learning rate. Held-out values (`eval_*`) are drawn on the same panel as the training ones. With the
  default tracker off, this is the only picture of how training went.
- `summary`: one block printed at the end: steps, wall time, where the adapter went, the picture, the
  held-out figures, the wandb run and the Hub repo when there are any.
- `show`: in a notebook, the picture in the cell's output (the scripts' last cell calls it); elsewhere nothing.

Drawn with matplotlib's object API on the Agg canvas: no pyplot, so no GUI backend and no global figure state
(a notebook's own inline plots are left alone).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from alignkit import logger

PICTURE = "training.png"
# (logged key, panel title): a panel is drawn when the run logged the key (or its held-out `eval_` form).
PANELS = [
    ("loss", "loss"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "reward accuracy"),
    ("accuracy", "pairwise accuracy"),
    ("reward", "reward"),
    ("kl", "KL to the reference"),
    ("learning_rate", "learning rate"),
]
# Held-out figures the summary names, when the run has them (first found wins per label).
HELD_OUT = [
    ("eval_loss", "held-out loss"),
    ("eval_rewards/accuracies", "held-out reward accuracy"),
    ("eval_rewards/margins", "held-out reward margin"),
    ("held_out_accuracy", "held-out accuracy"),  # reward.py's share of the pairs, before eval_accuracy
    ("eval_accuracy", "held-out accuracy"),
]


def reward_accuracy(metrics: dict) -> str:
    """The held-out reward accuracy as the closing lines say it, with the pairs tied (a tie counts as a miss: an
    adapter that never moved, every pair at reward 0, read 0.000 as "always wrong"). The share tied where logged
    (alignkit's own DPO losses log `rewards/ties`); where not (TRL's), an accuracy of 0 at a mean margin of 0 means
    every pair tied (no margin above 0, and they average 0)."""
    accuracy, tied = metrics["eval_rewards/accuracies"], metrics.get("eval_rewards/ties")
    if tied is None and accuracy == 0 and metrics.get("eval_rewards/margins") == 0:
        tied = 1.0
    if not tied:
        return f"{accuracy:.3f}"
    # 0.0% and 100.0% only where exact: a sliver tied, or all but one in a million, is said so.
    share = {"0.0%": "under 0.1%", "100.0%": "over 99.9%"}.get(f"{tied:.1%}", f"{tied:.1%}")
    return f"{accuracy:.3f} " + ("(every pair tied: chosen and rejected rewards equal)" if tied >= 1 else
                                 f"({share} of the pairs tied, counted as misses)")


def _left_out(metrics: dict) -> str:
    """After reward.py's held-out accuracy, the pairs it left out and why, where it left some out (as TRL's
    RewardTrainer dropped them, so its eval_accuracy is over the same pairs)."""
    left, kept = metrics.get("held_out_left_out"), metrics.get("held_out_pairs")
    if not left or not isinstance(kept, int):
        return ""
    return (f" ({kept} of {kept + left} pairs: {left} longer than --max_length {metrics.get('trained_max_length')}, "
            "dropped by TRL, left out)")


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


# A panel whose every value is 0 says why, where the reason is known (a flat line at 0 otherwise reads as a bug).
ZERO = {"kl": "KTO: TRL clamps its batch estimate at 0"}


def curves(log_history: list[dict]) -> list[tuple[str, dict[str, tuple[list[int], list[float]]]]]:
    """[(panel title, {"train" / "held-out": (steps, values)})] for every panel the run has data for."""
    panels = []
    for key, title in PANELS:
        lines = {name: _series(log_history, k) for name, k in (("train", key), ("held-out", f"eval_{key}"))}
        lines = {name: line for name, line in lines.items() if line[0]}
        if lines and all(v == 0 for _, values in lines.values() for v in values):
            title = f"{title}: 0 at every step" + (f"\n({ZERO[key]})" if key in ZERO else "")
        if lines:
            panels.append((title, lines))
    return panels


def plot_training(log_history: list[dict], path, title: str = "") -> Path | None:
    """Write the training picture to `path`; None (and nothing written) when the run logged nothing to draw."""
    figure = draw(log_history, title)
    if figure is None:
        logger.info(f"no logged steps to draw: {path} not written (lower --logging_steps to log more often)")
        return None
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def draw(log_history: list[dict], title: str = ""):
    """The training picture (a matplotlib Figure on the Agg canvas), or None when there is nothing to draw. Steps
    are whole: their axes tick at integers only (a 4-step run's ticked at 1.5, 2.5, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = curves(log_history)
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for i, (name, lines) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, i + 1)
        for label, (steps, values) in lines.items():
            style = dict(marker="o", markersize=3) if len(steps) < 20 else {}
            axes.plot(steps, values, label=label, linestyle="-" if label == "train" else "--", **style)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one step: 1
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if len(lines) > 1:
            axes.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def wandb_url() -> str | None:
    """The wandb run's page when this process logged to wandb (nothing is imported otherwise)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    try:
        return getattr(run, "url", None) or None
    except Exception:  # noqa: BLE001 - an offline or finished run has no page
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}h " if hours else "") + f"{rest // 60}m {rest % 60:02d}s"


def summary(stage: str, folder, metrics: dict, log_history: list[dict], picture: Path | None,
            merged: Path | None = None, hub_url: str | None = None, finished_before: bool = False,
            resumed_at: int | None = None) -> str:
    """The closing block: what the run did and where everything went, one fact a line (a run finished before: its
    own wall time, from its metrics; a resumed run: the steps and time of this session, the earlier ones' time is
    not known here)."""
    runtime = metrics.get("train_runtime") if finished_before else \
        next((e["train_runtime"] for e in reversed(log_history) if "train_runtime" in e), None)
    steps = metrics.get("global_step", "?")
    took = f" in {_duration(runtime)}" if runtime else ""
    if resumed_at and not finished_before and isinstance(steps, int) and steps > resumed_at:
        took = f" ({steps - resumed_at} of them in this session{took}, resumed from step {resumed_at})"
    rows = [("steps", f"{steps}{took}")]
    rows.append(("adapter", str(folder)))
    if merged:
        rows.append(("merged model", str(merged)))
    if picture:
        rows.append(("picture", str(picture)))
    seen = set()
    for key, label in HELD_OUT:
        if key in metrics and label not in seen and isinstance(metrics[key], (int, float)):
            # A share as the closing lines print it (1.000, not 1); a loss or margin to 4 significant digits.
            rows.append((label, (reward_accuracy(metrics) if key == "eval_rewards/accuracies" else
                                 f"{metrics[key]:.3f}" if "accurac" in key else f"{metrics[key]:.4g}")
                         + (_left_out(metrics) if key == "held_out_accuracy" else "")))
            seen.add(label)
    url = wandb_url()
    if url:
        rows.append(("wandb", url))
    if hub_url:
        rows.append(("hub", hub_url))
    width = max(len(k) for k, _ in rows)
    head = f"── {stage} run finished "
    return "\n".join([head + "─" * max(0, 60 - len(head))] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["─" * 60])


def report(trainer, stage: str, folder, metrics: dict, merged: Path | None = None, hub_url: str | None = None,
           finished_before: bool = False) -> None:
    """Refresh the run folder's model card with the final metrics, draw training.png from the trainer's log
    history and print the summary block (main process only). A run that finished before (the same command again,
    no step trained) keeps its picture: the history resumed from its last checkpoint lacks the final evaluation."""
    folder = Path(folder)
    pushed_here = hub_url is not None and merged is None  # push() just wrote this folder's card, for its repo
    if (folder / "README.md").is_file() and not pushed_here:  # the card saved with the adapter, now with metrics
        from alignkit.core.card import model_card

        (folder / "README.md").write_text(model_card(folder), encoding="utf-8")
    history = list(trainer.state.log_history)
    kept = folder / PICTURE if finished_before and (folder / PICTURE).is_file() else None
    picture = kept or plot_training(history, folder / PICTURE, title=f"{stage}: {folder.name}")
    print(summary(stage, folder, metrics, history, picture, merged=merged, hub_url=hub_url,
                  finished_before=finished_before, resumed_at=getattr(trainer, "steps_at_start", None)), flush=True)


def show(*pictures) -> None:
    """In a notebook, display each picture in the cell's output: a PNG file, or a run folder's training.png;
    elsewhere do nothing (the script already printed where each one is)."""
    from alignkit.core.args import is_notebook

    if not is_notebook():
        return
    from IPython.display import Image, display

    for picture in map(Path, pictures):
        picture = picture / PICTURE if picture.is_dir() else picture
        if picture.is_file():
            display(Image(filename=str(picture)))
