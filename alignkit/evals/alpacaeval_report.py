"""The numbers and the chart of `evaluate.py alpaca_eval` (alignkit.evals.alpacaeval): alpaca_eval's own metrics
with the instruction difficulties from a file or the Hub, win_rates.png, and the results a model card keeps.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import UserError
from alignkit.evals.alpacaeval_outputs import hub_file

GLM_FILE = "df_gamed.csv"


# ---------------------------------------------------------------------------------------------------------
# Metrics: alpaca_eval's, with the instruction difficulties from a file or the Hub


@contextmanager
def _glm_data(path):
    """alpaca_eval's GLM reads df_gamed.csv through `hf_hub_download`: hand it `path` instead."""
    from alpaca_eval.metrics import glm_winrate

    original = glm_winrate.hf_hub_download
    glm_winrate.hf_hub_download = lambda *args, **kwargs: str(path)
    try:
        yield
    finally:
        glm_winrate.hf_hub_download = original


def glm_setup(s, rows: list[dict], work_dir) -> tuple[str, Path]:
    """(GLM name, df_gamed-style table) for the length-controlled win rate."""
    glm = s.lc_glm if s.lc_glm != "auto" else "length_controlled_v1" if s.eval_set is None else \
        "length_controlled_minimal"
    if glm == "length_controlled_v1":
        if s.eval_set is not None:
            logger.info("length_controlled_v1 on your own --eval_set: rows are matched to AlpacaEval's instruction "
                        "difficulties by position")
        return glm, Path(s.lc_data) if s.lc_data else hub_file(
            GLM_FILE, "pass it as --lc_data FILE, or use --lc_glm length_controlled_minimal (no instruction difficulty)")
    # length_controlled_minimal has no difficulty term; alpaca_eval still looks every row's difficulty up.
    table = Path(work_dir) / "no_instruction_difficulty.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("model,index,instruction_difficulty\n" + "".join(f"none,{i},0.0\n" for i in range(len(rows))),
                     encoding="utf-8")
    return glm, table


_LIBLINEAR = re.compile(rb"WARNING: class label -?\d+ specified in weight is not found\r?\n?")


@contextmanager
def _quiet_fit():
    """alpaca_eval's length-controlled fit without the noise of the scikit-learn it calls, which the user cannot
    act on: its FutureWarnings against the arguments alpaca_eval passes (three a run), and liblinear's
    "WARNING: class label 0 specified in weight is not found", written from C to file descriptor 2 for each
    cross-validation fold that lacks one of the labels alpaca_eval weighs (ten lines a run of the tiny preset).
    Anything else the fit writes there is written back once it ends."""
    import os
    import sys
    import tempfile
    import warnings

    def flush():
        if sys.stderr is not None:
            sys.stderr.flush()

    flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"sklearn\.")
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                flush()
                os.dup2(saved, 2)
                held.seek(0)
                if rest := b"".join(line for line in held.read().splitlines(keepends=True)
                                    if not _LIBLINEAR.fullmatch(line)):
                    os.write(2, rest)
    finally:
        os.close(saved)


LC_FOLDS = 5  # alpaca_eval's length-controlled fit: a 5-fold GroupKFold, each training row its own group


def metric(positions: dict, glm: str, table, weights_dir):
    """alpaca_eval's get_length_controlled_winrate over the annotations, each row's `index` its position in the
    eval set (what the instruction difficulties are indexed by)."""

    def fn(annotations) -> dict:
        import pandas as pd
        from alpaca_eval.metrics import glm_winrate

        df = pd.DataFrame(list(annotations))
        preference = pd.to_numeric(df["preference"], errors="coerce") if "preference" in df else pd.Series(dtype=float)
        if not preference.notna().any():
            raise UserError(f"none of the judge's {len(df)} answers held a preference alpaca_eval could read: the "
                            "weighted_* annotators read the answer's logprobs (an endpoint that returns none gives "
                            "none), the others its text; use --annotators_config alpaca_eval_gpt4 for a text judge, or "
                            "check the judge's answers; a rerun asks again for the failed ones")
        df["index"] = df["instruction"].map(positions)
        lengths = df["output_2"].str.len() - df["output_1"].str.len()
        if lengths.nunique() <= 1:  # alpaca_eval scales by their spread: NaNs, then sklearn's traceback
            return plain(df, "every output's length differs from its reference's by the same amount (the same model as "
                             "the reference? a single instruction?)")
        # The fit cross-validates over its rows in 5 folds: the readable ones, and under a GLM regularized to
        # AlpacaEval's baselines (length_controlled_v1) their annotations too, which are plenty.
        readable = int(preference.notna().sum())
        if not glm_winrate.GLM_INFO[glm].get("regularize_to_baseline_lambda") and readable < LC_FOLDS:
            return plain(df, f"{glm} is fitted with {LC_FOLDS}-fold cross-validation over the judged rows, and "
                             f"{readable} had a preference (--max_instances {LC_FOLDS} or more)")
        with _glm_data(table), _quiet_fit():
            out = glm_winrate.get_length_controlled_winrate(df, glm_name=glm, save_weights_dir=weights_dir)
        return {k: float(v) if hasattr(v, "__float__") else v for k, v in out.items()}

    def plain(df, why: str) -> dict:
        from alpaca_eval.metrics import glm_winrate

        logger.warning(f"the length-controlled win rate is undefined here: {why}; only the plain win rate is reported")
        return {**{k: float(v) if hasattr(v, "__float__") else v for k, v in glm_winrate.get_winrate(df).items()},
                "length_controlled_winrate": float("nan"), "lc_standard_error": float("nan")}

    return fn


def plot(leaderboard, path, title: str) -> Path:
    """win_rates.png: win rate and length-controlled win rate per model, +-1 standard error."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(leaderboard.index)
    fig = Figure(figsize=(7, 1.2 + 0.55 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]
    for offset, (col, err, label, color) in enumerate([
            ("win_rate", "standard_error", "win rate", "#4c72b0"),
            ("length_controlled_winrate", "lc_standard_error", "length-controlled win rate", "#dd8452")]):
        values = leaderboard[col].astype(float).to_numpy()
        errors = leaderboard[err].astype(float).fillna(0).to_numpy() if err in leaderboard else None
        ax.barh(y + 0.2 - 0.4 * offset, values, xerr=errors, height=0.38, capsize=3, color=color, label=label)
    ax.axvline(50, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(y, names)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% (error bars: 1 standard error; dashed: parity)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def record_card_results(model_id: str, summary: dict) -> None:
    """A local model folder keeps its AlpacaEval win rates (percent, as alpaca_eval reports them) for its card."""
    from alignkit.core.card import record_evaluation

    for column, label in (("length_controlled_winrate", "length-controlled win rate"), ("win_rate", "win rate")):
        if isinstance(summary.get(column), (int, float)):
            record_evaluation(model_id, f"alpaca_eval {column} vs {summary['reference']}", {
                "benchmark": "AlpacaEval", "dataset": "tatsu-lab/alpaca_eval", "metric": column,
                "value": summary[column], "metric_name": f"{label} vs {summary['reference']} "
                                                         f"(annotator {summary['annotators_config']})"})
