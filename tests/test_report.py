"""The end of a training run (alignkit.train.report): training.png with the run's own curves, and the summary."""

from __future__ import annotations

import builtins
import sys
import types

from alignkit.train import report

PNG = b"\x89PNG\r\n\x1a\n"

DPO_HISTORY = [
    {"step": 1, "loss": 0.69, "learning_rate": 1e-4, "rewards/margins": 0.0, "rewards/accuracies": 0.5},
    {"step": 2, "loss": 0.60, "learning_rate": 9e-5, "rewards/margins": 0.2, "rewards/accuracies": 0.75},
    {"step": 2, "eval_loss": 0.62, "eval_rewards/margins": 0.15, "eval_rewards/accuracies": 0.7},
    {"step": 2, "train_runtime": 75.2, "train_loss": 0.65},
]


def titles(history):
    return {title: sorted(lines) for title, lines in report.curves(history)}


def test_each_run_type_gets_its_own_panels():
    assert titles(DPO_HISTORY) == {
        "loss": ["held-out", "train"], "reward margin (chosen - rejected)": ["held-out", "train"],
        "reward accuracy": ["held-out", "train"], "learning rate": ["train"]}
    reward = [{"step": 1, "loss": 0.7, "accuracy": 0.5, "learning_rate": 1e-4}, {"step": 1, "eval_accuracy": 0.9}]
    assert titles(reward) == {"loss": ["train"], "pairwise accuracy": ["held-out", "train"], "learning rate": ["train"]}
    rl = [{"step": s, "loss": 0.0, "reward": 0.1 * s, "kl": 0.01 * s, "learning_rate": 1e-5} for s in (1, 2)]
    assert titles(rl) == {"loss: 0 at every step": ["train"], "reward": ["train"], "KL to the reference": ["train"],
                          "learning rate": ["train"]}
    # KTO's KL panel was a flat line at 0 with no word why (TRL clamps its estimate at 0).
    kto = [{"step": s, "loss": 0.5, "kl": 0.0, "eval_kl": 0.0} for s in (1, 2)]
    assert titles(kto) == {"loss": ["train"], "KL to the reference: 0 at every step\n(KTO: TRL clamps its batch "
                                              "estimate at 0)": ["held-out", "train"]}
    # A NaN reward (every completion unscored) is left out, not drawn as a gap that hides the line.
    steps, values = report.curves([{"step": 1, "reward": float("nan")}, {"step": 2, "reward": 0.5}])[0][1]["train"]
    assert (steps, values) == ([2], [0.5])


def test_picture_is_a_png_and_nothing_is_drawn_without_logs(tmp_path, alignkit_log):
    path = report.plot_training(DPO_HISTORY, tmp_path / "training.png", title="dpo")
    assert path.read_bytes()[:8] == PNG
    assert report.plot_training([{"train_runtime": 1.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists() and "--logging_steps" in alignkit_log.text


def test_step_axes_tick_at_whole_steps_only():
    """A short run's training.png (rl.py's 4 steps) ticked its step axes at 1.5, 2.5, ...: steps are whole."""
    rl = [{"step": s, "loss": 0.1 * s, "reward": 0.1 * s, "kl": 0.01 * s, "learning_rate": 1e-5} for s in (1, 2, 3, 4)]
    for history in (rl, DPO_HISTORY, rl[:1]):
        figure = report.draw(history, title="rl")
        for axes in figure.axes:
            low, high = axes.get_xlim()
            ticks = [t for t in axes.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), (axes.get_title(), ticks)


def test_summary_names_steps_time_folder_picture_figures_wandb_and_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=types.SimpleNamespace(url="https://wandb.ai/x/y/runs/z")))
    metrics = {"global_step": 2, "eval_rewards/accuracies": 0.7, "eval_loss": 0.62}
    text = report.summary("dpo", tmp_path / "run", metrics, DPO_HISTORY, tmp_path / "run" / "training.png",
                          merged=tmp_path / "run" / "merged", hub_url="https://huggingface.co/you/m")
    lines = text.splitlines()
    assert lines[0].startswith("── dpo run finished") and lines[-1] == "─" * 60
    body = {line.split("  ")[1].strip(): line.split("  ", 2)[-1].strip() for line in lines[1:-1]}
    assert body["steps"] == "2 in 1m 15s"
    assert body["adapter"] == str(tmp_path / "run") and body["merged model"] == str(tmp_path / "run" / "merged")
    assert body["held-out reward accuracy"] == "0.700" and body["held-out loss"] == "0.62"
    # Tied pairs said beside the accuracy, which counts them as misses (a 0.000 of an adapter that never changed).
    for ties, said in ((1.0, "0.000 (every pair tied: chosen and rejected rewards equal)"),
                       (0.25, "0.000 (25.0% of the pairs tied, counted as misses)"),
                       # 0.0% and 100.0% read as none and every pair: said only where exact
                       (0.0001, "0.000 (under 0.1% of the pairs tied, counted as misses)"),
                       (0.999999, "0.000 (over 99.9% of the pairs tied, counted as misses)")):
        tied = report.summary("dpo", tmp_path, {"global_step": 1, "eval_rewards/accuracies": 0.0,
                                                "eval_rewards/ties": ties}, [], None)
        assert f"  held-out reward accuracy  {said}" in tied.splitlines()
    # TRL's own losses log no ties: an accuracy of 0 at a mean margin of 0 is every pair tied (dpo.py --max_steps 1).
    trl = {"eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0}
    assert report.reward_accuracy(trl) == "0.000 (every pair tied: chosen and rejected rewards equal)"
    assert report.reward_accuracy({**trl, "eval_rewards/margins": -0.1}) == "0.000"
    # An accuracy as reward.py's closing line prints it: "held-out accuracy: 1.000" came after a summary saying 1.
    whole = report.summary("reward", tmp_path, {"global_step": 1, "held_out_accuracy": 1.0}, [], None)
    assert "  held-out accuracy  1.000" in whole.splitlines()
    assert body["wandb"] == "https://wandb.ai/x/y/runs/z" and body["hub"] == "https://huggingface.co/you/m"
    monkeypatch.delitem(sys.modules, "wandb")
    assert "wandb" not in report.summary("sft", tmp_path, {"global_step": 1}, [], None)
    # Resumed: the time is this session's, said so (600 steps "in 0m 01s" after 550 trained before an interrupt).
    resumed = report.summary("sft", tmp_path, {"global_step": 600}, [{"train_runtime": 1.2}], None, resumed_at=550)
    assert "600 (50 of them in this session in 0m 01s, resumed from step 550)" in resumed.splitlines()[1]


def test_show_displays_the_picture_in_a_notebook_only(tmp_path, monkeypatch):
    report.plot_training(DPO_HISTORY, tmp_path / report.PICTURE)
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    monkeypatch.setattr("sys.argv", ["dpo.py"])
    monkeypatch.delattr(builtins, "get_ipython", raising=False)
    report.show(tmp_path)
    assert shown == []  # a terminal: the summary already named the file
    monkeypatch.setattr(builtins, "get_ipython", lambda: None, raising=False)
    report.show(tmp_path)
    (image,) = shown
    assert image.data[:8] == PNG and image.format == "png"


def test_a_dpo_run_leaves_its_picture(dpo_run):
    folder = dpo_run["run_folder"]
    assert (folder / "training.png").read_bytes()[:8] == PNG
    drawn = titles(dpo_run["trainer"].state.log_history)
    assert {"loss", "reward margin (chosen - rejected)", "reward accuracy", "learning rate"} <= set(drawn)
    assert drawn["reward accuracy"] == ["held-out", "train"]
    # The run folder's card was written again with the final metrics: the held-out accuracy as a model-index entry.
    from huggingface_hub import ModelCard

    results = ModelCard((folder / "README.md").read_text()).data.eval_results  # evaluate.py's too, where it ran
    (result,) = [r for r in results if r.metric_name == "held-out reward accuracy"]
    assert result.metric_value == round(dpo_run["metrics"]["eval_rewards/accuracies"], 4)
