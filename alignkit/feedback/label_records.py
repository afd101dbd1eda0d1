"""What a label.py run keeps: its state, the keys of its cache, the append-only logs a rerun resumes from, and the
output and summary rebuilt from them at the end. The loop that fills them is alignkit.feedback.labeling; the pairs
and their judgments, alignkit.feedback.label_pairs.

A run writes, next to `--output X.jsonl`:
- `X.cache/responses.jsonl` and `X.cache/judgments.jsonl`: append-only logs (`AppendLog`), one JSON line per
  generated response or judge answer, flushed and fsync'd as it arrives. A judgment's key hashes what the judge
  saw (the prompt, the response in slot A, the one in slot B) and the judge's whole identity (Judge.identity:
  kind, model, template, endpoint, max tokens, temperature, or a local judge's weights and loader settings); a
  response's key hashes the prompt and its generator's identity (labeling._generator_identities). A rerun after a
  crash, Ctrl-C or SIGKILL finds every answer it already has and asks only for the rest; a changed setting simply
  misses the cache. Failed requests are not cached, so a rerun retries them. An answer without a verdict was
  paid for: it stays cached, and only --retry_parse_failures asks again under the same settings.
- `X.jsonl`: rebuilt from the cache at the end of every run (`write_output`) and replaced atomically, so each
  pair is in it once.
- `X.summary.json` (also printed as a table, `format_summary`) and `X.config.json` (the settings, secrets redacted).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignkit import logger
from alignkit.core import journal
from alignkit.core.args import redact
from alignkit.core.digests import digest
from alignkit.core.errors import STEP_OF, UserError, is_notebook, run_again
from alignkit.core.journal import write_json, write_jsonl
from alignkit.feedback.judge import Judge, combine, parse_verdict, winner


class AppendLog(journal.AppendLog):
    """label.py's cache log (alignkit.core.journal.AppendLog): another run holding it is told how to proceed."""

    def __init__(self, path, owner: str = "label.py",
                 fix: str = "let it finish, or give this run its own --output or --cache_dir"):
        super().__init__(path, owner, fix)

    def read_beside(self, output: Path) -> None:
        """The records of the same log in every other cache beside `output` (preferences.cache, labels.cache, ...):
        their keys are a generator's or a judge's whole identity and what it was asked, whatever the mode or the
        output, so another --output beside generated or paid for them again. Read only: new ones go to this log."""
        for other in sorted(Path(output).parent.glob(f"*.cache/{self.path.name}")):
            if other.parent.resolve() != self.path.parent.resolve():
                self.read_also(other)


def to_ask_again(unparsed: set, s, held: str) -> set:
    """The cached answers without a verdict or rating (`unparsed`) to ask for again: a paid answer stays recorded and
    is reused; asking again under the very same settings is a choice the user makes (--retry_parse_failures), not
    something a rerun does behind their back. One line says which. `held`: "judgments hold no verdict", ..."""
    if unparsed:
        logger.info(f"{len(unparsed)} cached {held}; " + (
            "asking again (--retry_parse_failures)" if s.retry_parse_failures else
            "kept as parse failures (--retry_parse_failures true asks again under the same settings)"))
    return unparsed if s.retry_parse_failures else set()


# ---------------------------------------------------------------------------------------------------------
# The run and what it keys on


@dataclass(frozen=True)
class Source:
    """Where one column of responses comes from."""

    name: str  # recorded in output rows (chosen_source, rejected_source, generator)
    spec: str  # a model (Hub id, folder, openai:MODEL) or a responses file
    kind: str  # "local", "endpoint" or "file"
    index: int  # sample number, or slot (0 = A, 1 = B): part of the seeds and of the response cache keys


@dataclass
class Run:
    """One label.py run: its settings, sources, judge and clients, its cache logs, and what it counted."""

    settings: object  # alignkit.core.config.LabelSettings
    output: Path
    cache_dir: Path
    sources: list[Source]
    pairing: list[tuple[int, int]]  # which sources are paired with which
    judge: Judge | None
    endpoints: dict  # openai:MODEL -> alignkit.core.llm.ChatClient
    responses: AppendLog
    judgments: AppendLog | None
    stats: Counter = field(default_factory=Counter)
    errors: dict = field(default_factory=dict)  # judgment key -> the exception of a request that failed
    backend: str | None = None  # "vllm" or "transformers" for local generators; None when there are none
    grader: object = None  # --mode pointwise's (alignkit.feedback.pointwise.Grader); None in the other modes
    made: dict = field(default_factory=dict, repr=False)  # what this run's steps made (`made`, `check_made`)

    @property
    def summary_path(self) -> Path:
        return self.output.with_suffix(".summary.json")

    def close(self) -> None:
        self.responses.close()
        if self.judgments is not None:
            self.judgments.close()


# A notebook's cells run out of order: a step takes only what this run's earlier steps made. Its settings cell run
# again makes a new run, and the prompts, responses or pairs still in the notebook's variables were made under the
# earlier settings (the output was written from them under the new ones, with a summary contradicting it).
STEPS = (("prompts", "Prompts"), ("responses", "Responses"), ("pairs", "Judge"))  # what each step makes: its cell


def made(run, kind: str, result, *, of=None):
    """Record `result` as what this run's `kind` step (STEPS) made, `of` the step's input (the prompts answered, the
    responses paired); returns it."""
    if isinstance(run, Run):
        run.made[kind] = {p.key for p in result} if kind == "prompts" else (id(result), _of(kind, of))
    return result


def _of(kind: str, value):
    return tuple(p.key for p in value) if kind == "responses" else id(value)  # pairs: of the responses table


def check_made(run, **inputs) -> None:
    """Refuse, in one line naming the cells to run again, inputs this run's own steps did not make, or made of other
    inputs than these (a subset of the prompts it read is fine to answer)."""
    if not isinstance(run, Run):
        return
    given = {"responses": inputs.get("prompts"), "pairs": inputs.get("responses")}  # what each was made of
    for i, (kind, cell) in enumerate(STEPS):
        if kind not in inputs:
            continue
        value, then = inputs[kind], run.made.get(kind)
        if kind == "prompts":
            ok = then is not None and {p.key for p in value} <= then
        else:
            ok = then is not None and then[0] == id(value) and (given[kind] is None or then[1] == _of(kind, given[kind]))
        if not ok:
            later = [c for _, c in STEPS[i:]]
            raise UserError(f"the {kind} were not made by this run's '{cell}' cell from these inputs (the settings "
                            f"cell ran again since, or they come from elsewhere): run the cells from '{cell}' on again "
                            f"({', '.join([*later, 'Output'])})")


# What each step counts in run.stats (the summary's): a step zeroes its own at its start, so a notebook's cell run
# again counts that run's, not every run's added up (the Judge cell run twice said 240 pairs of 120: the audit).
COUNTS = {
    "prompts": ("duplicate prompts", "prompts ending with an answer"),
    "responses": ("generation errors",),
    "pairs": ("pairs", "missing response", "empty response", "identical", "repeated pair"),
    "judgments": ("judgments needed", "judgments sent"),
    "output": ("missing completion", "empty completion"),
}


def recount(run, step: str) -> None:
    """Zero what `step` counts (COUNTS) before it counts it again."""
    for name in COUNTS[step]:
        run.stats.pop(name, None)


@dataclass
class Prompt:
    """A prompt as role/content turns; `key` (their digest) names it in every cache key, and `place` ("FILE: row
    N", not part of the key) where it was read, for messages about it."""

    messages: list[dict]  # role/content turns ending with a user turn
    key: str = ""
    place: str = field(default="", compare=False)
    row: dict | None = field(default=None, compare=False)  # the whole row it came from, where asked (rl.py)
    # Its row's own arguments of the chat template (tools, chat_template_kwargs: template_rows.row_template), which
    # local generators render it with; part of its key, so the same turns with other tools are another prompt.
    template: dict = field(default_factory=dict)

    def __post_init__(self):
        self.key = digest({"messages": self.messages, "template": self.template} if self.template else self.messages)

    @property
    def turns_key(self) -> str:
        """The key of its turns alone: what a responses file without template columns pairs with (it says no tools)."""
        return digest(self.messages)

    def columns(self, generated_with: dict | None = None) -> dict:
        """Its template columns, as a row of label.py's output carries them (TRL's trainers read them so):
        `generated_with` (--chat_template_kwargs) under its own, so that dpo.py and sft.py render the prompt as the
        answers were generated (Qwen3's {"enable_thinking": false} writes an empty think block before the answer)."""
        template = {**(generated_with or {}), **self.template}
        out = {"tools": template["tools"]} if "tools" in template else {}
        kwargs = {k: v for k, v in template.items() if k != "tools"}
        return {**out, **({"chat_template_kwargs": kwargs} if kwargs else {})}

    def generated_as(self, generated_with: dict | None) -> "Prompt":
        """This prompt with --chat_template_kwargs under its own template: what label.py's output row of it says."""
        return Prompt(self.messages, place=self.place, template={**(generated_with or {}), **self.template})


@dataclass
class Pair:
    """Two responses to one prompt, and the judgment cache key of each order the judge sees them in."""

    prompt: Prompt
    a: str
    b: str
    source_a: str
    source_b: str
    keys: dict[str, str] = field(default_factory=dict)  # order ("ab" or "ba") -> judgment cache key


# ---------------------------------------------------------------------------------------------------------
# Failures: the first few logged in full, every one counted in the summary


def report_failure(error: Exception, what: str, count: int) -> None:
    """Log the first few failures in full (secrets redacted); the rest are only counted."""
    if count <= 3:
        logger.warning(f"{what} failed: {type(error).__name__}: {redact(str(error))[:300]}")
    elif count == 4:
        logger.warning(f"more {what}s failed; counting them in the summary")


def asked(spec: str, what: str) -> str:
    """"judge request" for an endpoint or a model; "judge call" for a `python:` function, which is called, not asked
    (its failures were "judge request failed", endpoint wording)."""
    return f"{what} call" if spec.startswith("python:") else f"{what} request"


def judge_fix(spec: str, base_url: str | None = None, model: str | None = None) -> str:
    """What to check when a judge (`--judge` as given) fails every request; an endpoint's URL and model are named
    where the caller knows them (rl.py's judge reward)."""
    if spec.startswith("python:"):
        return f"Fix {spec.removeprefix('python:')}"
    if spec.startswith("rm:") or spec.startswith("hf:") or spec == "hf":
        return "Check the judge model (--judge, --judge_model)"
    where = f"at {base_url} is up (--judge_base_url; " if base_url else "at --judge_base_url is up ("
    return f"Check that the server {where}the URL usually ends in /v1), and --judge_model{f' {model}' if model else ''}"


def generator_fix(spec: str) -> str:
    """What to check when a generator (--model_a/--model_b/--models as given) fails every request."""
    if spec.startswith("openai:") or ", openai:" in spec:
        return f"Check that the server at --generation_base_url is up (the URL usually ends in /v1), and {spec}"
    return f"Check the model {spec}"


def refuse_empty(rows: int, failed: dict[str, int], fix: str) -> None:
    """An output of no row because requests failed is a failed run (status 2, a user error), not a result to train
    on. `failed`: how many of each kind failed, by the kind's name (asked's: "generation request", "judge call")."""
    said = " and ".join(f"{n} {what}{'s' if n != 1 else ''}" for what, n in failed.items() if n)
    if rows == 0 and said:
        raise UserError(f"no row was labeled: {said} failed (see above), so the output is empty. {fix}, "
                        f"then {run_again()} (it retries only those)")


# ---------------------------------------------------------------------------------------------------------
# Output and summary


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def replace_output(path: Path, rows: list[dict]) -> None:
    """Write the output rows whole (readers see the old file or the new one, never half of one); where that replaces
    a file of another number of rows (the settings changed: another --max_prompts), one line says so."""
    try:
        with open(path, "rb") as f:  # counted, not decoded: an old file in another encoding is replaced all the same
            before = sum(1 for line in f if line.strip())
    except OSError:
        before = None
    write_jsonl(path, rows)
    if before is not None and before != len(rows):
        logger.info(f"replaced {path}: {before} rows before, {len(rows)} now (under these settings; the earlier "
                    "ones are rebuilt from the cache by the settings that made them)")


def write_output(run: Run, prompts: list[Prompt], table, pairs: list[Pair]) -> dict:
    """Write the output rows (rebuilt from the cache) and the summary; return the summary."""
    check_made(run, prompts=prompts, responses=table, pairs=pairs)
    recount(run, "output")
    kwargs = getattr(run.settings, "chat_template_kwargs", None)  # the answers' template arguments, in every row
    if run.judge is None:
        rows = []
        for si, source in enumerate(run.sources):
            for pi, prompt in enumerate(prompts):
                text = table[si][pi]
                if text is None:
                    run.stats["missing completion"] += 1
                elif not text.strip():
                    run.stats["empty completion"] += 1
                else:
                    rows.append({"prompt": prompt.messages, "completion": _assistant(text), **prompt.columns(kwargs),
                                 "generator": source.name})
        replace_output(run.output, rows)
        summary = _completion_summary(run, prompts, rows)
    else:
        rows, outcomes, verdicts = [], Counter(), []
        for pair in pairs:
            if any(key not in run.judgments for key in pair.keys.values()):
                outcomes["error"] += 1
                continue
            found = {order: parse_verdict(run.judgments.get(key)["text"]) for order, key in pair.keys.items()}
            verdicts.append(found)
            outcome = combine(found)
            outcomes[outcome] += 1
            if outcome in ("a", "b"):
                chosen, rejected = (pair.a, pair.b) if outcome == "a" else (pair.b, pair.a)
                sources = (pair.source_a, pair.source_b) if outcome == "a" else (pair.source_b, pair.source_a)
                # The verdicts as the judge gave them, named by where the chosen response sat.
                named = dict(sorted(
                    (("chosen_in_A" if (order == "ab") == (outcome == "a") else "chosen_in_B"), v)
                    for order, v in found.items()))
                rows.append({
                    "prompt": pair.prompt.messages, "chosen": _assistant(chosen), "rejected": _assistant(rejected),
                    **pair.prompt.columns(kwargs), "chosen_source": sources[0], "rejected_source": sources[1], "judge": run.judge.name,
                    "judge_template": run.judge.template.name if run.judge.template else None, "verdicts": named,
                    **_label_fields(run, pair, outcome),
                })
        replace_output(run.output, rows)
        summary = _pair_summary(run, prompts, pairs, outcomes, verdicts, rows)
    write_json(run.summary_path, summary)
    generation = run.stats["generation errors"]
    refuse_empty(len(rows), {"generation request": generation,
                             asked(run.judge.name, "judge") if run.judge else "judge request": len(run.errors)},
                 judge_fix(run.judge.name) if run.errors else
                 generator_fix(", ".join(s.spec for s in run.sources if s.kind != "file")))
    if run.judge is None and not rows and run.stats["empty completion"]:  # a teacher that said nothing: not a result
        teachers = ", ".join(dict.fromkeys(s.spec for s in run.sources))  # once, whatever --num_samples
        raise UserError(
            f"no completion was written: all {run.stats['empty completion']} of the teacher's answers were empty (they "
            f"are in {run.responses.path}): check the teacher ({teachers}): a model that ends at once (its chat "
            "template, --max_new_tokens) or a reasoning model whose whole answer is its think block "
            "(--chat_template_kwargs); answers under other settings are generated anew, and the same settings ask "
            f"again once {run.responses.path} is deleted (a served model fixed since)")
    if run.judge is not None and not rows:  # said with its reasons (every pair identical was said nowhere)
        if verdicts and not any(v is not None for found in verdicts for v in found.values()):
            if run.judge.name.startswith("python:"):  # its answers key on its code: fixed, it is asked again
                how = f"a python: judge returns A, B or tie; fix {run.judge.name}, then run again"
            elif os.environ.get(STEP_OF):  # a step of rlaif.py: label.py's own flags go in its one --label_args
                how = ("an LLM judge ends with [[A]], [[B]] or [[C]], as its template asks (an answer cut short by its "
                       "token limit has none); fix --judge_model, or give label.py's --judge_template or "
                       "--judge_max_tokens with --retry_parse_failures true in one --label_args, e.g. --label_args "
                       "'--judge_max_tokens 4096 --retry_parse_failures true' (these answers are kept and reused "
                       "otherwise)")
            else:
                how = ("an LLM judge ends with [[A]], [[B]] or [[C]], as its template asks (an answer cut short by "
                       "--judge_max_tokens has none); fix --judge_model, --judge_template or --judge_max_tokens, then "
                       "run again with --retry_parse_failures true (these answers are kept and reused otherwise)")
            raise UserError(  # not one verdict: a judge to fix, not a result to train on
                f"no pair was labeled: the judge gave no verdict in any of its {sum(map(len, verdicts))} answers (they "
                f"are in {run.judgments.path}): {how}")
        # Every pair a tie, a disagreement or skipped: the judge answered, and preferred nothing. Said in one line
        # with the fix for what happened; the run ends well (rlaif.py refuses the round itself, in its own flags).
        logger.warning(nothing_labeled(summary, run.summary_path))
    return summary


def nothing_labeled(summary: dict, where: Path) -> str:
    """Why no preference pair came out, though no request failed: one line with the fix for what happened (letting
    one order decide settles a disagreement, not a tie: a tie is one in either order)."""
    skipped = summary.get("skipped") or {}
    if not summary.get("pairs_judged"):
        why = ", ".join(f"{n} {k}" for k, n in skipped.items() if n) or "no prompt had two responses"
        return (f"no pair to label: every prompt's pair was skipped ({why}; see {where}): where the two responses "
                "are identical, sample them apart (--temperature above 0, --num_samples) or compare other models")
    why = ", ".join(f"{summary[k]} {name if summary[k] > 1 else one}" for k, name, one in (
        ("ties", "ties", "tie"), ("disagreements", "disagreements between the two orders", "disagreement between the "
         "two orders"), ("parse_failures", "answers without a verdict", "answer without a verdict")) if summary.get(k))
    fixes = []
    if summary.get("ties"):
        fixes.append("where the judge calls the answers equal, sample them further apart (a higher --temperature, "
                     "more --num_samples) or compare other models, or judge them by a rule that tells them apart")
    if summary.get("disagreements"):
        fixes.append("where the two orders disagree (the judge favours a slot), let one order decide (--both_orders "
                     "false) or use a stronger judge")
    if summary.get("parse_failures"):
        fixes.append("check what the judge answers (a python: judge returns A, B or tie; an LLM judge [[A]], [[B]] "
                     "or [[C]])")
    return f"no pair was labeled: {why} (see {where}); " + "; ".join(fixes)


def _label_fields(run: Run, pair: Pair, outcome: str) -> dict:
    """What a judge adds to a labeled row (a reward model: the two scores); nothing for text judges."""
    fields = getattr(run.judge, "label_fields", None)
    if fields is None:
        return {}
    texts = {order: run.judgments.get(key)["text"] for order, key in pair.keys.items()}
    chosen_slot = {order: "A" if (order == "ab") == (outcome == "a") else "B" for order in pair.keys}
    return fields(texts, chosen_slot)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _tokens(run: Run) -> dict:
    usage = {"judge": run.judge.usage() if run.judge else None}
    for spec, client in run.endpoints.items():
        usage[spec] = client.usage.as_dict()
    return {name: u for name, u in usage.items() if u}


def _pair_summary(run, prompts, pairs, outcomes, verdicts, rows) -> dict:
    parsed = [v for found in verdicts for v in found.values() if v is not None]
    both = [found for found in verdicts if len(found) == 2 and None not in found.values()]
    agree = sum(winner("ab", f["ab"]) == winner("ba", f["ba"]) for f in both)
    st = run.stats
    # A judge that scores each answer once (rm:) has no order to swap: it judged one order, whatever was asked.
    both_orders = run.settings.both_orders and not getattr(run.judge, "one_pass", False)
    return {
        "output": str(run.output), "judge": run.judge.name,
        "template": run.judge.template.name if run.judge.template else None, "both_orders": both_orders,
        "prompts": len(prompts), "pairs": st["pairs"],
        "skipped": {"identical": st["identical"], "empty": st["empty response"], "missing": st["missing response"],
                    "repeated": st["repeated pair"], "generation_errors": st["generation errors"]},
        "pairs_judged": len(pairs), "labeled": len(rows), "ties": outcomes["tie"],
        "disagreements": outcomes["disagree"], "parse_failures": outcomes["unparsed"], "errors": outcomes["error"],
        "agreement": _share(agree, len(both)) if both_orders else None,
        # A judge that scores each answer alone has no position to be biased by: n/a (the reward audit of session 30)
        **({"slot_a_wins": None, "slot_b_wins": None} if getattr(run.judge, "one_pass", False) else
           {"slot_a_wins": _share(parsed.count("A"), len(parsed)), "slot_b_wins": _share(parsed.count("B"), len(parsed))}),
        "tie_verdicts": _share(parsed.count("tie"), len(parsed)),
        "judgments": {"needed": st["judgments needed"], "sent_this_run": st["judgments sent"],
                      "from_cache": st["judgments needed"] - st["judgments sent"], "failed": len(run.errors)},
        "tokens_this_run": _tokens(run),
    }


def _completion_summary(run, prompts, rows) -> dict:
    st = run.stats
    return {"output": str(run.output), "mode": "completions", "prompts": len(prompts), "completions": len(rows),
            "empty": st["empty completion"], "missing": st["missing completion"],
            "generation_errors": st["generation errors"], "tokens_this_run": _tokens(run)}


_LABELS = {
    "agreement": "agreement of the two orders", "slot_a_wins": "slot A wins (position bias)",
    "slot_b_wins": "slot B wins", "tie_verdicts": "tie verdicts", "parse_failures": "parse failures (no verdict)",
    "pairs": "pairs (before skipping)", "tokens_this_run": "API tokens used this run",
}


def format_summary(summary: dict) -> str:
    """The summary as a two-column table, shares as percentages."""
    def show(value):
        if isinstance(value, float):
            return f"{value:.1%}"
        if isinstance(value, dict):
            return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
        return "n/a" if value is None else str(value)

    lines = []
    for key, value in summary.items():
        label = _LABELS.get(key, key.replace("_", " "))
        if isinstance(value, dict):
            lines.append(f"{label}:" + ("" if value else " none"))
            lines += [f"  {_LABELS.get(k, k.replace('_', ' ')):<30} {show(v)}" for k, v in value.items()]
        else:
            lines.append(f"{label:<32} {show(value)}")
    return "\n".join(lines)


def train_command(script: str, preset: str | None, output, flags: str = "") -> str:
    """The command that trains `script` (dpo.py, sft.py, kto.py) on a label.py output, as its closing line gives
    it: under a preset, a run folder of its own (the preset's run would move the user's earlier one aside), except
    where the preset's own run of `script` reads `output` already (smol's runs/label-smol/preferences.jsonl: the
    README's loop goes on with `dpo.py --preset smol` into runs/smol-dpo, which the hint's own folder left out).
    In a notebook, the same settings as that script's notebook's overrides: a command there works nowhere (the
    script is in the repository's root, the path relative to the kernel's folder, as the other notebook's is too)."""
    from alignkit.modeling import presets

    name = script[:-3]
    given = {"preset": preset} if preset else {}
    read = presets.named(name).get(preset, {}).get("dataset_id") if preset else None
    if not (read and Path(read).resolve() == Path(output).resolve()):
        given["dataset_id"] = str(output)
        if preset:
            given["run_name"] = f"{preset}-{name}-on-{Path(output).stem.replace('.', '-')}"
    words = flags.split()  # " --desirable_weight 5.6"
    extra = {flag[2:]: value for flag, value in zip(words[::2], words[1::2])}
    if is_notebook():
        values = {**given, **{k: float(v) if v.replace(".", "", 1).isdigit() else v for k, v in extra.items()}}
        return f"{name}.ipynb with overrides = {json.dumps(values)}"
    settings = dict(given)
    run = settings.pop("run_name", None)
    line = "".join(f" --{k} {v}" for k, v in {**settings, **extra}.items())
    return f"python {script}{line}" + (f" --run_name {run}" if run else "")
