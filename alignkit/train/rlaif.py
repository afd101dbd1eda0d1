"""rlaif.py's machinery: iterative (online) DPO, one folder per round, each step one of the existing scripts.

Round r (policy pi_{r-1}: the starting model for r = 1, else round-(r-1)/dpo):
1. label.py samples `--num_samples` answers per prompt from pi_{r-1} and judges every pair (its cache:
   round-r/preferences.cache);
2. dpo.py trains a fresh adapter on those pairs on top of pi_{r-1}, whose adapters stay frozen; the reference
   is pi_{r-1} (`--reference previous`): each round is a KL-regularised step away from the last policy; or the
   starting model pi_0 (`--reference start`): the adapters of rounds 1..r-1 are off in the reference pass;
3. evaluate.py pairwise judges pi_r against pi_{r-1} on the evaluation prompts: adjusted win rate
   (win + 0.5 tie) / n with a bootstrap 95% CI.

Each step runs as its own process (a crash in one leaves the others' files whole) and resumes by its own rules
(label.py's append-only cache, dpo.py's checkpoints, evaluate.py's answers and judgments). A round is finished
once round-r/round.json is written (atomically, last): a rerun skips finished rounds and continues with the
first unfinished one. At the end, rlaif.md (a table) and win_rate.png hold the win rate per round.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from alignkit import logger
from alignkit.core.args import config_to_dict
from alignkit.core.errors import EXIT_USER_ERROR, UserError
from alignkit.core.journal import write_atomic

ROOT = Path(__file__).resolve().parents[2]  # the scripts live at the repository's top level, above alignkit/train/
ROUND_FILE = "round.json"
# RLAIFSettings' own fields and the run folder: everything else is a DPO setting handed to every dpo.py run.
_NOT_DPO = {"model_id", "reference_adapters", "dataset_id", "output_dir", "run_name", "preset", "eval_split",
            "push_to_hub", "hub_repo_id", "hub_public", "merge_adaptors"}


def round_dir(folder: Path, r: int) -> Path:
    return folder / f"round-{r}"


def finished(folder: Path, r: int) -> dict | None:
    file = round_dir(folder, r) / ROUND_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _run(script: str, args: list[str], log: Path) -> None:
    """One script in its own process, its output appended to `log`; a failure stops the loop, naming the log."""
    command = [sys.executable, str(ROOT / script), *args]
    logger.info(f"{script} {' '.join(shlex.quote(a) for a in args)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "a", encoding="utf-8") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    if done.returncode == EXIT_USER_ERROR:  # the step named a bad input in one `error:` line: pass that line on
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        said = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), "see the log")
        raise UserError(f"{script} stopped: {said} (its log: {log}). Fix that and run the same rlaif.py command "
                        "again: it resumes at this round")
    if done.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise RuntimeError(f"{script} failed (exit {done.returncode}); its log: {log}\n{tail}\nFix the cause and run "
                           "the same rlaif.py command again: it resumes at this round")


def _dpo_config(s, path: Path) -> None:
    """The DPO settings of this run as a dpo.py --config YAML (None values left to dpo.py's defaults)."""
    import yaml

    from alignkit.core.config import DPOSettings

    names = {f.name for f in fields(DPOSettings)} - _NOT_DPO
    values = {k: v for k, v in config_to_dict(s).items() if k in names and v is not None}
    path.write_text(yaml.safe_dump(values, sort_keys=True))


def endpoint_flags(s, skip: set[str] = frozenset()) -> list[str]:
    """The judge endpoint group (alignkit.core.config.JudgeEndpointSettings) as label.py / evaluate.py flags:
    both scripts compose the same group, so every field passes through as it is."""
    from alignkit.core.config import JudgeEndpointSettings

    flags = []
    for f in fields(JudgeEndpointSettings):
        value = getattr(s, f.name)
        if f.name not in skip and value is not None:
            flags += [f"--{f.name}", str(value)]
    return flags


def run_round(s, folder: Path, r: int, policy: str) -> dict:
    """Label, train and evaluate round r starting from `policy`; returns (and writes) the round's record."""
    here = round_dir(folder, r)
    here.mkdir(parents=True, exist_ok=True)
    log = here / "log.txt"
    preferences = here / "preferences.jsonl"
    if not (here / "preferences.summary.json").is_file() or not preferences.is_file():
        args = ["--model_id", policy, "--prompts", s.dataset_id, "--num_samples", str(s.num_samples),
                "--temperature", str(s.sample_temperature), "--max_new_tokens", str(s.max_new_tokens),
                "--judge", s.judge, "--output", str(preferences), "--seed", str(s.seed + r),
                "--quantization", s.quantization]
        if s.max_prompts is not None:
            args += ["--max_prompts", str(s.max_prompts)]
        _run("label.py", args + endpoint_flags(s) + shlex.split(s.label_args), log)
    dpo = here / "dpo"
    if not (dpo / "metrics.json").is_file():
        _dpo_config(s, here / "dpo_config.yaml")
        reference = []
        if s.reference == "start":  # the reference keeps only the starting model's own adapters on
            from alignkit.modeling.chain import adapter_chain

            reference = ["--reference_adapters", str(len(adapter_chain(s.model_id, s.revision)[1]))]
        _run("dpo.py", ["--config", str(here / "dpo_config.yaml"), "--model_id", policy, "--dataset_id",
                        str(preferences), "--output_dir", str(here), "--run_name", "dpo",
                        "--eval_split", str(s.eval_split), *reference], log)
    evaluation = here / "eval"
    if not (evaluation / "results.json").is_file():
        judge = s.eval_judge_model or s.judge_model
        args = ["pairwise", "--models", f"previous={policy}", f"round-{r}={dpo}", "--baseline", "previous",
                "--prompts_file", s.eval_prompts or s.dataset_id, "--output_dir", str(evaluation),
                "--max_new_tokens", str(s.max_new_tokens), "--temperature", str(s.sample_temperature),
                "--quantization", s.quantization, "--seed", str(s.seed)]
        endpoint = [] if judge == "rule" else endpoint_flags(s, skip={"judge_model"})
        if judge:
            args += ["--judge_model", judge]
        _run("evaluate.py", args + endpoint + shlex.split(s.evaluate_args), log)
    results = json.loads((evaluation / "results.json").read_text())
    pair = next(p for p in results["pairs"] if {p["model"], p["opponent"]} == {f"round-{r}", "previous"})
    overall = pair["overall"]
    rate, ci = overall["adjusted_win_rate"], overall["ci95"]
    if pair["model"] != f"round-{r}":  # the table reads from the new policy's side
        rate, ci = 1 - rate, [1 - ci[1], 1 - ci[0]]
    summary = json.loads((here / "preferences.summary.json").read_text())
    record = {"round": r, "policy": str(dpo), "started_from": policy, "win_rate": rate, "ci95": ci,
              "win": overall["win"], "loss": overall["loss"], "tie": overall["tie"],
              "pairs": sum(1 for _ in preferences.open()), "label_summary": summary}
    write_atomic(here / ROUND_FILE, json.dumps(record, indent=2))  # the round is done only once this file is whole
    return record


def run(s, folder: Path) -> list[dict]:
    """Every round, skipping finished ones; then the table and the chart."""
    records, policy = [], s.model_id
    for r in range(1, s.rounds + 1):
        record = finished(folder, r)
        if record is not None:
            logger.info(f"round {r}: finished earlier (win rate {record['win_rate']:.3f}); skipped")
        else:
            logger.info(f"round {r}: sampling from {policy}")
            record = run_round(s, folder, r, policy)
        records.append(record)
        policy = record["policy"]
    write_table(records, folder / "rlaif.md")
    plot(records, folder / "win_rate.png")
    return records


def format_table(records: list[dict]) -> str:
    lines = ["| round | win rate vs previous | 95% CI | win / loss / tie | DPO pairs |", "|---|---|---|---|---|"]
    for rec in records:
        lines.append(f"| {rec['round']} | {rec['win_rate']:.3f} | {rec['ci95'][0]:.3f}-{rec['ci95'][1]:.3f} | "
                     f"{rec['win']} / {rec['loss']} / {rec['tie']} | {rec['pairs']} |")
    return "\n".join(lines)


def write_table(records: list[dict], path: Path) -> Path:
    path.write_text("# RLAIF: each round's policy against the previous one\n\n" + format_table(records) + "\n")
    return path


def plot(records: list[dict], path: Path) -> Path:
    """Adjusted win rate of each round against the previous round, with its 95% CI; dashed: parity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = [rec["round"] for rec in records]
    y = [rec["win_rate"] for rec in records]
    err = [[v - rec["ci95"][0] for v, rec in zip(y, records)], [rec["ci95"][1] - v for v, rec in zip(y, records)]]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=4)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.set_ylabel("adjusted win rate vs previous")
    ax.set_title("RLAIF: each round against the one before (95% CI)", fontsize=9)
    fig.savefig(path, dpi=100)
    return path
