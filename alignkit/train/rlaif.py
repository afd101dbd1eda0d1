"""rlaif.py's machinery: iterative (online) DPO, one folder per round, each step one of the existing scripts.

Round r (policy pi_{r-1}: the starting model for r = 1, else round-(r-1)/dpo):
1. label.py samples `--num_samples` answers per prompt from pi_{r-1} and judges every pair (its cache:
   round-r/preferences.cache); the policy is loaded as dpo.py loads it (the loader settings, and round 1's
   --revision / --gguf_file, reach all three scripts);
2. dpo.py trains a fresh adapter on those pairs on top of pi_{r-1}, whose adapters stay frozen; the reference
   is pi_{r-1} (`--reference previous`): each round is a KL-regularised step away from the last policy; or the
   starting model pi_0 (`--reference start`): the adapters of rounds 1..r-1 are off in the reference pass;
3. evaluate.py pairwise judges pi_r against pi_{r-1} on the evaluation prompts (eval_prompts: a dataset's
   held-out split by default): adjusted win rate (win + 0.5 tie) / n with a bootstrap 95% CI. pi_{r-1}'s answers
   are round r-1's (evaluate.py --answers_from: reused where made by the same model as loaded, sampled alike).

The prompts are --dataset_id's --dataset_split (train_prefs of ultrafeedback_binarized by default), read by
label.py; dpo.py reads each round's preferences file, so --dataset_split never reaches it.

Each step runs as its own process (a crash in one leaves the others' files whole) and resumes by its own rules
(label.py's append-only cache, dpo.py's checkpoints, evaluate.py's answers and judgments). A round is finished
once round-r/round.json is written (atomically, last). At the end, rlaif.md (a table) and win_rate.png hold the
win rate per round.

A result is reused because it was made from the same inputs, not because its file exists. Each step records
what it read in its marker, round-r/STEP.step.json (label, dpo, eval): the settings it is given, the model it
starts from by content (alignkit.modeling.identity.chain_identity: a policy retrained in place is another
policy), the prompts file by content, and for DPO the preferences file by content. round.json holds the digests
of all three. A rerun redoes a step whose inputs differ (one log line names what changed), and the change
travels by content: new preferences retrain the adapter, a new adapter is evaluated again and is the next
round's new policy, so every later round is redone too; a step whose inputs still match, as the evaluation
after a change of --dpo_beta does not, is reused. A redo reuses whatever of label.py's and evaluate.py's own
caches still applies (they key on their inputs too). Nothing earlier is deleted: before a step is redone, its
earlier outputs, marker, round.json and its runs' parts of round-r/log.txt (each step run's part starts with a line
naming its time, step and command) move to round-r/previous-TIME/, and the earlier adapter to
round-r/dpo.previous-TIME (beside dpo/, as alignkit.train.training moves a run folder, so a relative base path
still resolves). A redo that fails resumes on the next run, as any step does.
A round made by a version that kept no markers is redone (nothing says what it was made from).

Before any round, check() (rlaif.py's settings cell) refuses what round 1's steps would refuse after their work:
each step's command line as the rounds build it (alignkit.train.rlaif_inputs), parsed by the step's own settings.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import ConfigError, UserError
from alignkit.core.journal import free_name, read_json, write_atomic, write_json
from alignkit.train.rlaif_inputs import (  # noqa: F401 - start_model, revision_of, ...: importable from here too
    EVAL_PROMPTS, _digest, _dpo_config, _dpo_inputs, _eval_inputs, _label_inputs, _prompt_source, dpo_command,
    endpoint_flags, eval_command, eval_prompts, label_command, label_judge_flags, loader_flags, revision_of,
    same_inputs, start_model,
)
from alignkit.train.step_process import move_sections, run_step

ROUND_FILE = "round.json"
STEPS = ("label", "dpo", "eval")
STEP_OF_SCRIPT = {"label.py": "label", "dpo.py": "dpo", "evaluate.py": "eval"}  # each run's header in log.txt


def _again() -> str:
    """How to go on after a stop, where rlaif runs: a notebook has no rlaif.py command to run again."""
    from alignkit.core.errors import is_notebook

    return "run the cells from the settings cell on again" if is_notebook() else "run the same rlaif.py command again"


def _run(script: str, args: list[str], log: Path) -> None:
    """One step in its own process (alignkit.train.step_process): its output in `log`, and shown live."""
    run_step(script, args, log, again=f"{_again()}: it resumes at this round", go_on=_again(),
             name=STEP_OF_SCRIPT.get(script))


def _reference(s) -> list[str]:
    """dpo.py's --reference_adapters of every round: with --reference start, the starting model's own adapters."""
    if s.reference != "start":
        return []
    from alignkit.modeling.chain import adapter_chain

    return ["--reference_adapters", str(len(adapter_chain(s.model_id, s.revision)[1]))]


def round_dir(folder: Path, r: int) -> Path:
    return folder / f"round-{r}"


def finished(folder: Path, r: int) -> dict | None:
    """Round r's record, or None while it is unfinished (round.json missing or torn)."""
    return read_json(round_dir(folder, r) / ROUND_FILE) or None


# ---------------------------------------------------------------------------------------------------------
# Steps, reused only when made from the same inputs


def _marker(here: Path, step: str) -> Path:
    return here / f"{step}.step.json"


def _plan(here: Path, step: str, inputs: dict, whole: bool) -> tuple[str | None, str]:
    """(None, ""): the step's result stands (made from these inputs, and whole); ("resume", ""): a run from these
    inputs was cut short (the step resumes by its own rules); ("redo", why): never run, or made from other inputs."""
    saved = read_json(_marker(here, step))
    if saved.get("digest") == _digest(inputs) or (saved and same_inputs(saved.get("inputs", {}), inputs)):
        return (None if saved.get("done") and whole else "resume"), ""
    if not (saved or whole):
        return "redo", ""
    before = saved.get("inputs", {})
    changed = sorted(k for k in inputs.keys() | before.keys() if inputs.get(k) != before.get(k))
    return "redo", f"{', '.join(changed)} changed" if saved else "no record of the inputs it was made from"


def _say_reused(r: int, step: str, plan: tuple[str | None, str], whole: bool = False, cut: str = "") -> None:
    """A step of an unfinished round made earlier from the same inputs is skipped: said, not left to be told by the
    commands that did not run (found by an audit). So is a step that goes on: cut short (`cut`: how far it came; only
    dpo.py's log said "resuming from checkpoint-75"), or run to its end (`whole`) but not recorded as done."""
    if plan[0] is None:
        logger.info(f"round {r}: {step} made earlier from the same inputs; reused")
    elif plan[0] == "resume":
        logger.info(f"round {r}: {step} run again to check what it made (its run ended before it was recorded as "
                    "done)" if whole else f"round {r}: {step} resumed ({cut})")


def _dpo_cut(dpo: Path) -> str:
    from alignkit.core.run_records import checkpoints

    found = checkpoints(dpo) if dpo.is_dir() else []
    return f"from its checkpoint at step {found[-1].name.split('-')[-1]}" if found else \
        "no checkpoint was saved: it starts over"


def _start(here: Path, step: str, inputs: dict, plan: tuple[str | None, str], outputs: list[Path], aside: Path,
           r: int, beside: Path | None = None) -> None:
    """Before a redo, move the step's earlier outputs, its marker, round.json and its runs' parts of log.txt to
    `aside` (a model folder `beside` to NAME.previous-TIME next to it, where a relative base path in its adapter
    config still resolves); then mark the step begun, so that a rerun after a failure resumes it rather than
    starting it over."""
    moved = False
    if plan[0] == "redo":
        if beside is not None and beside.exists():
            shutil.move(str(beside), free_name(beside.parent, f"{beside.name}.{aside.name}"))
        for path in [*outputs, _marker(here, step), here / ROUND_FILE]:
            if path.exists():
                target = aside / path.relative_to(here)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), target)
                moved = True
        # The step's part of log.txt with them (each run's part starts with a header: step_process.HEADER): the log
        # held the earlier runs' lines and the redo's straight after, and none went aside (found by an audit).
        moved |= move_sections(here / "log.txt", {step}, aside / "log.txt")
    if plan[1]:
        logger.info(f"round {r}: {step} redone: {plan[1]}" + (f" (the earlier results: {aside})" if moved else ""))
    write_json(_marker(here, step), {"digest": _digest(inputs), "inputs": inputs, "done": False})


def _done(here: Path, step: str, inputs: dict) -> None:
    write_json(_marker(here, step), {"digest": _digest(inputs), "inputs": inputs, "done": True})


def _whole(path: Path) -> bool:
    """A step's JSON output is there and parses: one cut short by a kill counts as missing (the step is redone)."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def _json_inputs(inputs: dict) -> dict:
    return json.loads(json.dumps(inputs, default=str))  # as the marker will read back: tuples as lists


def run_round(s, folder: Path, r: int, policy: str, prompts: str) -> dict:
    """Label, train and evaluate round r starting from `policy`, each step reused only when its inputs match, the
    new policy judged on the evaluation prompts file `prompts` (eval_prompts); returns (and writes) the round's
    record."""
    here = round_dir(folder, r)
    here.mkdir(parents=True, exist_ok=True)
    log, aside = here / "log.txt", free_name(here, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
    preferences = here / "preferences.jsonl"
    summary_file = preferences.with_suffix(".summary.json")
    revision = revision_of(s, policy)  # the policy's: round 1's --revision, none for a run folder
    inputs = {"label": _json_inputs(_label_inputs(s, r, policy, revision))}
    whole = _whole(summary_file) and preferences.is_file()
    plan = _plan(here, "label", inputs["label"], whole)
    _say_reused(r, "label", plan, whole, "interrupted: label.py's cache keeps what was judged")
    ran = bool(plan[0])
    if plan[0]:
        outputs = [preferences, summary_file, preferences.with_suffix(".config.json")]
        _start(here, "label", inputs["label"], plan, outputs, aside, r)
        _run("label.py", label_command(s, r, policy, revision, preferences), log)
    summary = read_json(summary_file)
    if not summary.get("labeled"):  # label.py ends well with none: DPO would blame its own file
        from alignkit.feedback.label_records import nothing_labeled

        raise UserError(f"round {r}: {nothing_labeled(summary, summary_file)} (label.py's flags go "
                        f"in --label_args; its --temperature is --sample_temperature here); then {_again()} (what is "
                        "done is kept)")
    skipped, judgments = summary.get("skipped") or {}, summary.get("judgments") or {}
    failed = judgments.get("failed", 0) + skipped.get("generation_errors", 0)
    if failed:  # DPO on the pairs that made it, marked done, and no rerun asked for the rest again
        raise UserError(f"round {r}: {failed} requests failed after their retries (see {log}), so {preferences.name} "
                        f"lacks their pairs: {_again()}, which asks only for those (what is done is kept)")
    if plan[0]:
        _done(here, "label", inputs["label"])
    dpo = here / "dpo"
    reference = _reference(s)
    inputs["dpo"] = _json_inputs(_dpo_inputs(s, policy, revision, preferences, reference))
    plan = _plan(here, "dpo", inputs["dpo"], whole := _whole(dpo / "metrics.json"))
    _say_reused(r, "dpo", plan, whole, _dpo_cut(dpo) if plan[0] == "resume" else "")
    ran |= bool(plan[0])
    if plan[0]:
        # A redo starts over, the earlier adapter moved to dpo.previous-TIME first: what dpo.py then finds in dpo/
        # (checkpoints to resume from after a failure) was made from these inputs.
        _start(here, "dpo", inputs["dpo"], plan, [here / "dpo_config.yaml"], aside, r, beside=dpo)
        _dpo_config(s, here / "dpo_config.yaml")
        restart = ["--resume", "false"] if plan[0] == "redo" else []
        _run("dpo.py", dpo_command(s, here, policy, revision, preferences, reference, restart), log)
        _done(here, "dpo", inputs["dpo"])
    evaluation = here / "eval"
    judge = s.eval_judge_model or s.judge_model
    inputs["eval"] = _json_inputs(_eval_inputs(s, policy, revision, dpo, judge, prompts))
    plan = _plan(here, "eval", inputs["eval"], whole := _whole(evaluation / "results.json"))
    _say_reused(r, "eval", plan, whole, "interrupted: evaluate.py keeps the answers and judgments made")
    ran |= bool(plan[0])
    if plan[0]:
        # The whole folder: the earlier policy's answers too, which evaluate.py would refuse as another model's.
        _start(here, "eval", inputs["eval"], plan, [evaluation], aside, r)
        before = round_dir(folder, r - 1) / "eval"
        answers_from = before if r > 1 and before.is_dir() else None  # the previous policy's answers, by key
        _run("evaluate.py", eval_command(s, r, policy, revision, dpo, evaluation, prompts, judge, answers_from), log)
        _done(here, "eval", inputs["eval"])
    steps = {step: _digest(inputs[step]) for step in STEPS}
    record = finished(folder, r)
    if not ran and record is not None and record.get("steps") == steps:
        logger.info(f"round {r}: finished earlier from the same inputs (win rate {record['win_rate']:.3f}); reused")
        return record
    results = read_json(evaluation / "results.json")
    pair = next(p for p in results["pairs"] if {p["model"], p["opponent"]} == {f"round-{r}", "previous"})
    overall = pair["overall"]
    rate, ci = overall["adjusted_win_rate"], overall["ci95"]
    if pair["model"] != f"round-{r}":  # the table reads from the new policy's side
        rate, ci = 1 - rate, [1 - ci[1], 1 - ci[0]]
    with preferences.open() as f:
        pairs = sum(1 for _ in f)
    record = {"round": r, "policy": str(dpo), "started_from": policy, "win_rate": rate, "ci95": ci,
              "win": overall["win"], "loss": overall["loss"], "tie": overall["tie"], "pairs": pairs,
              "label_summary": summary, "steps": steps}
    write_atomic(here / ROUND_FILE, json.dumps(record, indent=2))  # the round is done only once this file is whole
    return record


def run(s, folder: Path) -> list[dict]:
    """Every round, each reused where it was made from the same inputs; then the table and the chart."""
    from alignkit.train.report import show

    _check_sources(s)
    _check_folder(s, folder)
    prompts = eval_prompts(s, folder)
    records, policy = [], start_model(s)
    for r in range(1, s.rounds + 1):
        logger.info(f"round {r}: from {policy}")
        record = run_round(s, folder, r, policy, prompts)
        show(round_dir(folder, r) / "dpo" / "training.png")  # in a notebook: each round's training below the cell
        records.append(record)
        policy = record["policy"]
    write_table(records, folder / "rlaif.md", s, _stale_rounds(folder, s.rounds))
    plot(records, folder / "win_rate.png")
    return records


def _check_sources(s) -> None:
    """A prompts file that is not there (here, not in round 1's label.py after a load), a --dataset_split on a single
    prompts file (not by dpo.py in round 1), an --eval_prompts that is not there, what dpo.py refuses on the model."""
    from alignkit.core.data_files import check_exists
    from alignkit.core.mixture import check_file_splits

    for source in (s.dataset_id, s.eval_prompts):
        if source:
            check_exists(source)
    check_file_splits(s)
    _check_dpo_loads(s)


STEP_FLAGS = {"label.py": "--label_args", "evaluate.py": "--evaluate_args"}  # each step's own flags, passed on


def check(s) -> None:
    """What round 1's steps would refuse after their work (hours of it on a real model), refused by the settings
    cell, before the 'Run folder' cell writes anything (the notebook audit of session 58: a typo in --evaluate_args
    was found by round 1's evaluate.py after its labelling and training; a mistyped --model_id, a --prompt_field
    the prompts lack, a bad --judge or --label_args by its label.py). Each step's whole command line as round 1
    runs it (label_command, dpo_command, eval_command: one source) parsed by that step's own settings, environment
    and .env included; the starting model found as label.py would look for it; the prompts read as label.py reads
    them (their column); label.py's judge built (a python: judge imported, an endpoint's API key); the evaluation
    prompts read and checked; and what run() checks before round 1 (_check_sources)."""
    import tempfile

    from alignkit.core.args import parse_config
    from alignkit.core.config import DPOSettings, LabelSettings
    from alignkit.core.environment import environment_unsaid
    from alignkit.evals import evaluation
    from alignkit.feedback.judge import make_judge
    from alignkit.feedback.labeling import read_prompts
    from alignkit.modeling import presets
    from alignkit.modeling.model_folders import check_model_sources

    policy = start_model(s)
    revision = revision_of(s, policy)
    with tempfile.TemporaryDirectory() as tmp:  # the round's files named, none written where the run goes
        here = Path(tmp) / "round-1"
        here.mkdir()
        _dpo_config(s, here / "dpo_config.yaml")
        judge = s.eval_judge_model or s.judge_model
        prompts = s.eval_prompts or s.dataset_id  # the file eval_prompts() makes of it is made in the run folder
        parsed = evaluation._PARSED  # parse_command keeps what it parsed: a notebook's evaluate cells read it
        try:
            # rlaif.py's own parse named the environment: a step's lines on it (its values passed on as flags, "set
            # again by the command line") are for its own log, where its process says them
            with environment_unsaid():
                label = _parse_step("label.py", lambda: parse_config(
                    LabelSettings, label_command(s, 1, policy, revision, here / "preferences.jsonl"),
                    presets=presets.named("label"), prog="label.py"))
                _parse_step("dpo.py", lambda: parse_config(
                    DPOSettings, dpo_command(s, here, policy, revision, here / "preferences.jsonl", [], []),
                    presets=presets.named("dpo"), prog="dpo.py"))
                _parse_step("evaluate.py", lambda: evaluation.parse_command(
                    eval_command(s, 1, policy, revision, here / "dpo", here / "eval", prompts, judge, None)))
        finally:
            evaluation._PARSED = parsed
    check_model_sources(label, [label.model_id])  # a mistyped path: here, not after label.py's start
    _check_sources(s)
    _reference(s)  # --reference start reads the starting model's adapters
    # The prompts before the judge, which asks for its key: a bad file was reported only once the key was set
    prompts = read_prompts(label.prompts, label.prompts_split, label.prompts_config, label.prompt_field,
                           label.max_prompts, skip_invalid=label.skip_invalid)
    judge = make_judge(label) if label.mode == "pairs" else None
    if hasattr(judge, "check_prompts"):  # a prompt a reward model judge cannot score, as label.py refuses it
        judge.check_prompts(prompts)
    eval_prompts(s, None)  # the evaluation prompts, read and checked; written by run() into the run folder


def _parse_step(script: str, parse):
    """`parse()`, a refusal named as round 1's `script`'s, its flags as the setting rlaif.py passes them on by."""
    try:
        return parse()
    except UserError as e:
        said, flags = str(e), STEP_FLAGS.get(script)
        if flags:  # rlaif.py's --help does not list them
            command = "evaluate.py pairwise" if script == "evaluate.py" else script
            said = said.replace("(on the command line", f"(in {flags}").replace(
                "--help lists every setting", f"python {command} --help lists every setting")
        raise ConfigError(f"round 1's {script} would refuse its settings: {said}") from None


def _check_dpo_loads(s) -> None:
    """What every round's dpo.py refuses before its weights load, on the starting model's family: LoRA dropout or
    DoRA on a mixture of experts whose fused experts PEFT adapts, LoTA on one. Refused here, not at round 1's DPO
    step after its sampling and labeling (the rlaif audit of session 31). A config that cannot be read here (a GGUF
    file, a Hub model offline) is left to the scripts, which load it and say why in their own line."""
    from alignkit.modeling import experts, lota_delta
    from alignkit.modeling.chain import resolve
    from alignkit.modeling.models import config_reader

    base, revision, *_ = resolve(start_model(s), s.revision)
    model_config = config_reader(base, revision, s.trust_remote_code)
    lota_delta.check_experts(s, model_config)
    experts.check_dropout(s, model_config)
    from alignkit.train.loss_mask import check_end_tokens

    check_end_tokens(s, model_id=start_model(s))  # --pad_token, passed on to dpo.py's DPOConfig


def _check_folder(s, folder: Path) -> None:
    """The folder these settings name (a notebook's settings cell run again with another run_name, then the Rounds
    cell alone, redid the old folder's rounds and kept its old record); then its record says what the rounds ran
    under (another --dpo_beta with the Run folder cell skipped was recorded as the old one)."""
    from alignkit.core.saved_settings import save_config

    from types import SimpleNamespace

    from alignkit.train.run_folder import run_dir

    recorded = read_json(Path(folder) / "rlaif_config.json")
    keys = ("output_dir", "run_name", "model_id", "dataset_id")  # what names the folder (run_dir)
    if all(k in recorded for k in keys):
        then = run_dir(SimpleNamespace(**{k: recorded[k] for k in keys}), "rlaif")
        if then.resolve() != run_dir(s, "rlaif").resolve():
            changed = [k for k in keys if recorded[k] != getattr(s, k)]
            raise UserError(f"these settings name another run folder than {folder} ({', '.join(changed)} changed "
                            "since the 'Run folder' cell ran): run the cells from 'Run folder' on again")
    save_config(s, Path(folder) / "rlaif_config.json")  # secrets redacted


def format_table(records: list[dict]) -> str:
    lines = ["| round | adjusted win rate vs previous (ties count half) | 95% CI | win / loss / tie | labeled pairs |",
             "|---|---|---|---|---|"]
    for rec in records:
        lines.append(f"| {rec['round']} | {rec['win_rate']:.3f} | {rec['ci95'][0]:.3f}-{rec['ci95'][1]:.3f} | "
                     f"{rec['win']} / {rec['loss']} / {rec['tie']} | {rec['pairs']} |")
    return "\n".join(lines)


def _stale_rounds(folder: Path, rounds: int) -> str:
    """A note on round folders past --rounds, from an earlier run with more rounds (--rounds 1 after --rounds 2 left
    round-2/ there with no word; an audit), said in the log too; "" where there are none."""
    numbers = (int(p.name[6:]) for p in folder.glob("round-*") if p.name[6:].isdigit())
    past = sorted(r for r in numbers if r > rounds)
    if not past:
        return ""
    note = (f"{', '.join(f'round-{r}/' for r in past)} {'is' if len(past) == 1 else 'are'} from an earlier run with "
            f"more rounds, not this one (--rounds {rounds}): not in this table")
    logger.info(note)
    return note


def write_table(records: list[dict], path: Path, s=None, stale: str = "") -> Path:
    """The table, under what made it (`s`: the model, judges, beta, rounds; every setting in rlaif_config.json)."""
    head = "# RLAIF: each round's policy against the previous one\n\n"
    if s is not None:  # the rows said nothing of the settings that made them (an audit)
        head += (f"Model {s.model_id}, judge {s.judge}" + (f" ({s.judge_model})" if s.judge_model else "") +
                 f", evaluation judge {s.eval_judge_model or s.judge_model}, dpo_beta {s.dpo_beta}, reference "
                 f"{s.reference}, {s.rounds} round{'s' if s.rounds != 1 else ''}; every setting: "
                 "rlaif_config.json.\n\n")
    path.write_text(head + format_table(records) + "\n" + (f"\n{stale}.\n" if stale else ""))
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
