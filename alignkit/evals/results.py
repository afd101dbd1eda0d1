"""Pairwise results from FastChat judgment records: win / loss / tie, win rates, bootstrap CIs, table, JSON, PNG.

A match is one question (and turn) judged in both answer orders. As in FastChat's show_result, a match is a
win when both orders pick the same model, and a tie when the judge says tie or the two orders disagree (the
judge preferred a position, not an answer). A match whose judge call failed or whose verdict could not be
parsed is an error: counted and shown, but never a tie, and outside every rate.

adjusted win rate = (win + 0.5 * tie) / n, with n = win + loss + tie. Its 95% confidence interval is a
percentile bootstrap that resamples questions, so the two turns of one question stay together.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignkit.core.journal import write_atomic

# MT-Bench's categories, in FastChat's order; other categories (your own prompts) follow alphabetically.
CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
OUTCOMES = ("win", "loss", "tie", "error")


def outcome(record: dict) -> str:
    """The match's outcome for model_1: win, loss, tie or error."""
    g1, g2 = record.get("g1_winner"), record.get("g2_winner")
    if "error" in (g1, g2) or g1 is None or g2 is None:
        return "error"
    if g1 == "tie" or g1 != g2:
        return "tie"
    return "win" if g1 == "model_1" else "loss"


def summarize(games: list[tuple[object, str]], rounds: int = 1000, seed: int = 0) -> dict:
    """Counts, rates and the bootstrap CI of the adjusted win rate for (question_id, outcome) games."""
    counts = {k: sum(o == k for _, o in games) for k in OUTCOMES}
    n = counts["win"] + counts["loss"] + counts["tie"]
    out = {**counts, "n": n, "win_rate": None, "loss_rate": None, "tie_rate": None, "adjusted_win_rate": None,
           "ci95": None}
    if n == 0:
        return out
    out.update(win_rate=counts["win"] / n, loss_rate=counts["loss"] / n, tie_rate=counts["tie"] / n,
               adjusted_win_rate=(counts["win"] + 0.5 * counts["tie"]) / n)
    # One row per question: its wins, ties and judged games; resampling rows keeps a question's turns together.
    per_question: dict = {}
    for qid, o in games:
        if o != "error":
            w, t, k = per_question.get(qid, (0, 0, 0))
            per_question[qid] = (w + (o == "win"), t + (o == "tie"), k + 1)
    table = np.array(list(per_question.values()), dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(table), size=(rounds, len(table)))
    wins, ties, judged = (table[:, i][picks].sum(axis=1) for i in range(3))
    low, high = np.percentile((wins + 0.5 * ties) / judged, [2.5, 97.5])
    out["ci95"] = [float(low), float(high)]
    return out


def _category_order(categories) -> list[str]:
    found = set(categories)
    return [c for c in CATEGORIES if c in found] + sorted(found - set(CATEGORIES))


def pair_results(records: list[dict], categories: dict, rounds: int = 1000, seed: int = 0) -> list[dict]:
    """Results per model pair (model_1 vs model_2, in match order): overall, per category and per turn.

    records: FastChat pairwise judgment records (one per match); categories: question_id -> category.
    """
    pairs: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        pairs.setdefault((r["model_1"], r["model_2"]), []).append(r)
    results = []
    for (model, opponent), rows in pairs.items():
        games = [(r["question_id"], outcome(r), categories.get(r["question_id"], "?"), r.get("turn", 1)) for r in rows]
        by_category = {
            c: summarize([(q, o) for q, o, cat, _ in games if cat == c], rounds, seed)
            for c in _category_order(g[2] for g in games)
        }
        by_turn = {str(t): summarize([(q, o) for q, o, _, turn in games if turn == t], rounds, seed)
                   for t in sorted({g[3] for g in games})}
        results.append({
            "model": model, "opponent": opponent, "judge": (rows[0].get("judge") or ["?"])[0],
            "overall": summarize([(q, o) for q, o, _, _ in games], rounds, seed),
            "by_category": by_category, "by_turn": by_turn,
        })
    return results


def model_totals(records: list[dict]) -> list[dict]:
    """FastChat's pairwise-all table (show_result.py, display_result_pairwise): each model over every match it
    played, from whichever side, errors left out; best adjusted win rate first."""
    totals: dict[str, dict] = {}
    for r in records:
        o = outcome(r)
        if o == "error":
            continue
        for model, mine in ((r["model_1"], o), (r["model_2"], {"win": "loss", "loss": "win"}.get(o, o))):
            counts = totals.setdefault(model, {"model": model, "win": 0, "loss": 0, "tie": 0})
            counts[mine] += 1
    for counts in totals.values():
        n = counts["win"] + counts["loss"] + counts["tie"]
        counts.update(n=n, win_rate=counts["win"] / n, loss_rate=counts["loss"] / n,
                      adjusted_win_rate=(counts["win"] + 0.5 * counts["tie"]) / n)
    return sorted(totals.values(), key=lambda c: -c["adjusted_win_rate"])


def format_totals(totals: list[dict]) -> str:
    lines = ["each model over all its matches (FastChat's pairwise-all table)",
             f"{'model':<20}{'n':>5}{'win':>6}{'loss':>6}{'tie':>6}{'win rate':>10}{'adj. win rate':>15}"]
    lines += [f"{t['model']:<20}{t['n']:>5}{t['win']:>6}{t['loss']:>6}{t['tie']:>6}{_rate(t['win_rate']):>10}"
              f"{_rate(t['adjusted_win_rate']):>15}" for t in totals]
    return "\n".join(lines)


def _rate(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(results: list[dict]) -> str:
    """A plain-text table per model pair: one row per category, then overall."""
    lines = []
    header = (f"{'category':<14}{'n':>5}{'win':>6}{'loss':>6}{'tie':>6}{'error':>7}{'win rate':>10}"
              f"{'adj. win rate':>15}{'95% CI':>18}")
    for res in results:
        overall = res["overall"]
        lines += ["", f"{res['model']} vs {res['opponent']}  (judge: {res['judge']}; "
                      f"{overall['n'] + overall['error']} matches, {overall['error']} judge errors)", header]
        rows = list(res["by_category"].items()) + [("overall", overall)]
        for i, (name, s) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(header))
            ci = "-" if s["ci95"] is None else f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
            lines.append(f"{name:<14}{s['n']:>5}{s['win']:>6}{s['loss']:>6}{s['tie']:>6}{s['error']:>7}"
                         f"{_rate(s['win_rate']):>10}{_rate(s['adjusted_win_rate']):>15}{ci:>18}")
    return "\n".join(lines).lstrip("\n")


def save_json(results: list[dict], path, **context) -> Path:
    """results.json: the settings context (judge, mode, models, ...) and every pair's numbers. Written atomically:
    rlaif.py reads it back as its evaluation's result, so a kill mid-write must leave no half of one."""
    return write_atomic(path, json.dumps({**context, "pairs": results}, indent=2) + "\n")


def plot(results: list[dict], path) -> Path:
    """A PNG with one panel per pair: adjusted win rate per category and overall, with 95% CIs."""
    # The object API with the Agg canvas: no pyplot, so no GUI backend and no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heights = [0.6 + 0.35 * (len(r["by_category"]) + 1) for r in results] or [1.0]
    fig = Figure(figsize=(8, sum(heights) + 0.6 * len(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results) or 1, 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, res in zip(axes, results):
        rows = list(res["by_category"].items()) + [("overall", res["overall"])]
        rows = [(name, s) for name, s in rows if s["adjusted_win_rate"] is not None]
        y = np.arange(len(rows))[::-1]
        rates = np.array([s["adjusted_win_rate"] for _, s in rows])
        lows = np.array([s["adjusted_win_rate"] - s["ci95"][0] for _, s in rows])
        highs = np.array([s["ci95"][1] - s["adjusted_win_rate"] for _, s in rows])
        colors = ["#4c72b0" if name != "overall" else "#dd8452" for name, _ in rows]
        ax.barh(y, rates, xerr=np.vstack([lows, highs]), color=colors, capsize=3, height=0.6)
        for yi, (name, s) in zip(y, rows):
            ax.text(1.01, yi, f"{s['win']}/{s['loss']}/{s['tie']}" + (f" ({s['error']} err)" if s["error"] else ""),
                    va="center", fontsize=8, transform=ax.get_yaxis_transform())
        ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(y, [name for name, _ in rows])
        ax.set_xlim(0, 1)
        ax.set_title(f"{res['model']} vs {res['opponent']}: adjusted win rate, 95% CI "
                     f"(win/loss/tie; judge: {res['judge']})",
                     fontsize=9)
    axes[-1].set_xlabel("adjusted win rate = (win + 0.5 tie) / n;  dashed: parity")
    if not results:
        axes[0].text(0.5, 0.5, "no judged matches", ha="center", va="center")
    fig.savefig(path, dpi=120)
    return path
