"""evaluate.py lm_eval's report (alignkit.evals.harness): what results.md says the numbers were made under and by
which models as loaded, the table (a row per task and metric, a column per model, with lm_eval's standard errors)
and the chart."""

from __future__ import annotations

from pathlib import Path


def describe_models(models: dict[str, str], loaded: dict[str, dict]) -> str:
    """results.md's second line: each model, its source and how it was loaded (dtype, quantization)."""
    said = []
    for name, source in models.items():
        how = loaded.get(name, {})
        as_loaded = how.get("as_loaded") or {}
        dtype = as_loaded.get("dtype") or how.get("dtype")
        quantization = as_loaded.get("quantization") or how.get("quantization")
        template = "; --chat_template given" if how.get("chat_template") else ""
        said.append(f"{name}: {source} ({dtype}, quantization {quantization}{template})")
    return "models: " + "; ".join(said)


def describe(settings: dict) -> str:
    """results.md's first line: what the table was made under (a --limit run is no full result)."""
    limit = settings["limit"]
    shots = "each task's default" if settings["num_fewshot"] is None else settings["num_fewshot"]
    template = "not applied"
    if settings["apply_chat_template"]:  # lm_eval 0.4 puts few-shot examples in turns by default: said either way
        turns = settings.get("fewshot_as_multiturn") is not False
        template = f"applied, few-shot examples {'as turns' if turns else 'in one user turn'}"
    said = [f"lm_eval {settings['lm_eval']}", f"few-shot: {shots}", f"chat template: {template}"]
    if settings.get("system_instruction") is not None:
        said.append(f"system instruction: {settings['system_instruction']!r}")
    if settings.get("gen_kwargs"):
        said.append("gen_kwargs: " + ", ".join(f"{k}={v!r}" for k, v in settings["gen_kwargs"].items()))
    if settings.get("bootstrap_iters", 100000) != 100000:
        said.append(f"bootstrap_iters {settings['bootstrap_iters']}" + (" (no standard errors)"
                                                                         if not settings["bootstrap_iters"] else ""))
    said.append(f"seed {settings['seed']}")
    if limit is not None:
        said.insert(1, f"--limit {limit:g}: {'a share' if limit < 1 else 'the first examples'} of each task only, a "
                       "quick look, not comparable to full results")
    return "; ".join(said)


# ---------------------------------------------------------------------------------------------------------
# The table and the chart


def metric_rows(results: dict[str, dict]) -> list[tuple[str, str, dict[str, tuple[float, float | None]]]]:
    """(task, metric, {model: (value, stderr)}) in the order lm_eval reports them; lm_eval's keys are
    "metric,filter" with a "metric_stderr,filter" beside each."""
    rows: dict[tuple[str, str], dict] = {}
    for model, by_task in results.items():
        for task, metrics in by_task.items():
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                metric, _, flt = key.partition(",")
                stderr = metrics.get(f"{metric}_stderr,{flt}")
                label = metric if flt == "none" else f"{metric} ({flt})"
                rows.setdefault((task, label), {})[model] = (float(value), stderr if isinstance(stderr, (int, float)) else None)
    return [(task, metric, values) for (task, metric), values in rows.items()]


def format_table(results: dict[str, dict]) -> str:
    models = list(results)
    lines = ["| task | metric | " + " | ".join(models) + " |", "| --- | --- |" + " ---: |" * len(models)]
    for task, metric, values in metric_rows(results):
        cells = []
        for model in models:
            value, stderr = values.get(model, (None, None))
            cells.append("" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path) -> Path:
    """A PNG: one group of bars per task and metric, one bar per model, with lm_eval's standard errors."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, models = metric_rows(results), list(results)
    fig = Figure(figsize=(max(5.0, 1.2 + 0.9 * len(rows) * max(1, len(models)) * 0.6), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x, width = np.arange(len(rows)), 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [r[2].get(model, (np.nan, None)) for r in rows]
        heights = [v for v, _ in values]
        errors = [e or 0.0 for _, e in values]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, yerr=errors, capsize=3, label=model)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, [f"{task}\n{metric}" for task, metric, _ in rows], fontsize=8)
    ax.set_title("lm-evaluation-harness, side by side (error bars: stderr)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
