"""label.py --mode pointwise: an absolute grade per answer against a threshold, written as KTO data for kto.py.

Every response label.py collects (from --num_samples N samples of --model_id, or from sources A and B) is graded
on its own, no pair needed, and becomes a row (prompt, completion, label, grade): label true (desirable) when the
grade reaches --grade_threshold. The grader is `--judge`:

- `openai` / `hf`: an LLM under the pointwise template below (FastChat's single-answer grading, "single-v1"):
  a 1-10 rating written as [[rating]], read as FastChat reads it (the first [[x]], else the first [x]); default
  threshold 7;
- `rm:RUN_FOLDER`: a reward.py model's score (alignkit.feedback.rewards); default threshold 0;
- `python:module:function`: `function(prompt, answer)` returns a number or a bool (True is 1); default
  threshold 1, e.g. the tiny preset's `alignkit.modeling.presets:score` (1 when the answer follows its rule).

A grade is cached as it arrives under the grader's identity, the prompt and the answer (label.py's cache folder,
`grades.jsonl`, an LLM's answer with it), so a rerun grades only what is new; an answer without a rating is kept
(paid for) as a parse failure, never labelled, and asked again only under --retry_parse_failures true; a failed
request is counted and retried by the next run.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.errors import UserError
from alignkit.core.code_digest import code_fingerprint
from alignkit.core.digests import digest
from alignkit.core.journal import batched, threaded, write_json
from alignkit.core.llm import FirstFailures
from alignkit.core.progress import Progress
from alignkit.feedback.judge import Request, import_function, question_text
from alignkit.feedback.judge_templates import Template
from alignkit.feedback.label_records import (
    AppendLog, asked, check_made, judge_fix, refuse_empty, replace_output, to_ask_again,
)
from alignkit.feedback.ratings import SINGLE_V1_PROMPT, SINGLE_V1_SYSTEM, parse_rating

# FastChat's "single-v1" judge prompt (alignkit.feedback.ratings), in this module's Template form.
POINTWISE = Template("pointwise", SINGLE_V1_SYSTEM, SINGLE_V1_PROMPT.replace("{answer}", "{answer_a}"))
DEFAULT_THRESHOLDS = {"llm": 7.0, "rm": 0.0, "python": 1.0}


@dataclass(frozen=True)
class Item:
    """One answer to grade: `key` names it in the cache."""

    key: str
    messages: list  # the prompt's turns
    answer: str


def _grading_function(spec: str):
    import inspect

    function = import_function(spec, contract=" taking (prompt, answer) and returning a number or a bool")
    try:
        inspect.signature(function).bind("prompt", "answer")
    except TypeError:
        raise ConfigError(f"--judge {spec!r} under --mode pointwise: {spec.rpartition(':')[2]} must accept "
                          "(prompt, answer) and return a number or a bool") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return function


def settle_output(s) -> None:
    """A pointwise run never overwrites a preference file: an --output named preferences.jsonl (the pairs mode's
    default name, and a preset's) becomes labels.jsonl beside it."""
    if s.output and Path(s.output).name == "preferences.jsonl":
        s.output = str(Path(s.output).with_name("labels.jsonl"))
        logger.info(f"--mode pointwise writes {s.output} (KTO data), not a preference file")


class Grader:
    """`grade_batch(items)` -> one (grade: a number, or None: no rating; an LLM's answer, else None) per item;
    `identity` keys the cache."""

    def __init__(self, s):
        self.spec, self.batched, self.llm = s.judge, False, None
        if s.judge.startswith("python:"):
            self.kind, self.function = "python", _grading_function(s.judge)
        elif s.judge.startswith("rm:"):
            from alignkit.feedback.judge import RMJudge

            self.kind, self.batched = "rm", True
            self.rm = RMJudge(s.judge, s, 0.0, s.generation_batch_size)  # checks the folder before any work
        elif s.judge in ("openai", "hf"):
            if s.judge_template != "default":
                raise ConfigError(f"--mode pointwise grades with FastChat's single-answer template; drop "
                                  f"--judge_template {s.judge_template}")
            from alignkit.feedback.judge import make_judge

            self.kind = "llm"
            self.llm = make_judge(s)  # its endpoint or local model, with FastChat's single-answer template
            self.llm.template = POINTWISE
            self.batched = self.llm.batched
        else:
            raise ConfigError(f"--judge {s.judge!r}: expected openai, hf, rm:RUN_FOLDER, or python:module:function")
        # What its rows and log lines name it by: an LLM with its model (openai:MODEL, hf:MODEL), as pairs mode's
        # rows name their judge; a rule or reward model by its spec.
        self.name = self.llm.name if self.llm is not None else s.judge
        self.threshold = DEFAULT_THRESHOLDS[self.kind] if s.grade_threshold is None else s.grade_threshold

    def check_prompts(self, prompts) -> None:
        """Before any answer is generated: a prompt a reward-model grader cannot score is refused (RMJudge's)."""
        if self.kind == "rm":
            self.rm.check_prompts(prompts)

    def identity(self) -> dict:
        # A local grader by what it is, not the path that names it (alignkit.feedback.judge.Judge.key_name).
        if self.kind == "python":  # its module's file and what it imports: edit a constant, old grades go
            from alignkit.feedback.judge import function_key_name

            return {"grader": function_key_name(self.function), "code": code_fingerprint(self.function)}
        if self.kind == "rm":
            return {"grader": "rm", **self.rm.identity()}
        return {"grader": self.spec, **self.llm.identity()}

    def grade_batch(self, items: list[Item]) -> list[tuple[float | None, str | None]]:
        if self.kind == "python":
            return [(self._number(self.function(question_text(i.messages), i.answer)), None) for i in items]
        if self.kind == "rm":
            from alignkit.feedback.rewards import RewardModel

            if self.rm.reward is None:
                self.rm.reward = RewardModel(self.rm.folder, self.rm.batch_size, settings=self.rm.settings)
            return [(grade, None) for grade in self.rm.reward([i.messages for i in items], [i.answer for i in items])]
        requests = [Request(i.key, question_text(i.messages), i.answer, "") for i in items]
        return [(parse_rating(text), text) for text in self.llm.judge_batch(requests)]

    def grade(self, item: Item) -> tuple[float | None, str | None]:
        return self.grade_batch([item])[0]

    said_no_grade = False

    def _number(self, value) -> float | None:
        """A python: grader's return as a grade: a finite number; None (it abstains) or NaN/inf is no grade, a parse
        failure as an LLM's answer without a rating (said once), not an error retried by every run, nor a NaN
        counted as a low grade and written as invalid JSON."""
        try:  # a bool counts as 1 or 0
            grade = None if value is None else float(value)
        except (TypeError, ValueError):
            grade = None
        if grade is not None and math.isfinite(grade):
            return grade
        if not self.said_no_grade:
            self.said_no_grade = True
            logger.warning(f"--judge {self.spec}: returned {value!r}, which is no grade (counted as a parse failure); "
                           "it must return a finite number")
        return None


def grade(run, grader: Grader, prompts, table) -> dict:
    """Grade every collected response not yet in the cache; then write the KTO rows and the summary."""
    check_made(run, prompts=prompts, responses=table)
    s = run.settings
    identity = grader.identity()
    grades = AppendLog(run.cache_dir / "grades.jsonl")
    grades.read_beside(run.output)
    try:
        cells, needed = [], {}
        for si, source in enumerate(run.sources):
            for pi, prompt in enumerate(prompts):
                text = table[si][pi]
                if text is None or not text.strip():
                    continue
                cells.append((source, prompt, text, digest([identity, prompt.messages, text])))
        unparsed = {key for *_, key in cells if key in grades and grades.get(key)["grade"] is None}
        retry = to_ask_again(unparsed, s, "grades hold no rating")
        for _, prompt, text, key in cells:
            if (key not in grades or key in retry) and key not in needed:
                needed[key] = Item(key, prompt.messages, text)
        watch = FirstFailures(asked(grader.spec, "grading"), judge_fix(grader.spec), len(needed))
        progress = Progress("grading", len(needed), unit="answer")
        stream = batched(grader.grade_batch, needed.values(), s.generation_batch_size) if grader.batched else \
            threaded(grader.grade, needed.values(), s.parallel)
        try:
            for item, result in stream:
                if isinstance(result, Exception):
                    watch.failed(result)  # may stop the run, in its own line
                    logger.warning(f"grading failed ({len(watch.failures)} so far; the next run retries): {result}")
                else:
                    watch.ok()
                    value, answer = result
                    grades.append({"key": item.key, "grade": None if value is None else float(value),
                                   **({"text": answer} if answer is not None else {})})
                progress.update(1, len(watch.failures))
        finally:
            progress.close()
        rows, outcomes, unrated = [], Counter(), None
        for source, prompt, text, key in cells:
            if key not in grades:
                outcomes["error"] += 1
                continue
            value = grades.get(key)["grade"]
            if value is None:
                outcomes["parse failure"] += 1
                unrated = unrated or grades.get(key).get("text")
                continue
            label = value >= grader.threshold
            outcomes["desirable" if label else "undesirable"] += 1
            rows.append({"prompt": prompt.messages, "completion": [{"role": "assistant", "content": text}],
                         **prompt.columns(getattr(run.settings, "chat_template_kwargs", None)),
                         "label": label, "grade": value, "grader": grader.name, "generator": source.name})
        if outcomes["parse failure"] and unrated is not None:  # an LLM's answers: one shown, all kept
            logger.warning(f"{outcomes['parse failure']} graded answers hold no [[rating]], e.g. "
                           f"{' '.join(unrated.split())[:160]!r} (every answer is in {grades.path}): not labelled; "
                           "check --judge_model or --judge_max_tokens, then --retry_parse_failures true asks again")
    finally:
        grades.close()
    replace_output(run.output, rows)
    summary = {"output": str(run.output), "mode": "pointwise", "prompts": len(prompts), "answers": len(cells),
               "threshold": f">= {grader.threshold:g}", "desirable": outcomes["desirable"],
               "undesirable": outcomes["undesirable"], "parse_failures": outcomes["parse failure"],
               "errors": outcomes["error"]}
    if s.grade_pairs:
        pairs = best_over_worst(rows)
        replace_output(pairs_path(run.output), pairs)
        summary |= {"grade_pairs": len(pairs), "grade_pairs_output": str(pairs_path(run.output))}
    elif pairs_path(run.output).is_file():  # an earlier run's pairs, from other grades, stayed beside these rows
        pairs_path(run.output).unlink()
        logger.info(f"removed {pairs_path(run.output)}: an earlier run's --grade_pairs, from its grades, not these "
                    "(pass --grade_pairs true to write them from these; the grades stay in the cache)")
    write_json(run.summary_path, summary)
    refuse_empty(len(rows), {"generation request": run.stats["generation errors"],
                             asked(grader.spec, "grading"): outcomes["error"]},
                 judge_fix(grader.spec) if outcomes["error"] else "Check the generators (see above)")
    if not rows:  # as pairs mode: an empty output is a failed run in one line, not "nothing to train on"
        raise UserError(nothing_graded(grader, len(cells), grades.path, run.summary_path))
    return summary


def nothing_graded(grader: Grader, answers: int, where: Path, summary: Path) -> str:
    """Why no answer was labelled though no request failed: no answer to grade, or every grade unparsed."""
    if not answers:
        return (f"no answer was labelled: every response was empty or missing (see {summary}): check the generators "
                "or the responses files")
    if grader.kind == "python":
        how = f"a python: grader returns a finite number or a bool; fix {grader.spec}, then run again"
    else:
        how = ("an LLM grader writes its 1-10 rating as [[rating]], as its template asks (an answer cut short by "
               "--judge_max_tokens has none); fix --judge_model or --judge_max_tokens, then run again with "
               "--retry_parse_failures true (these answers are kept and reused otherwise)")
    return (f"no answer was labelled: the grader gave no grade to any of its {answers} answers (they are in "
            f"{where}): {how}")


def pairs_path(output) -> Path:
    """Where --grade_pairs writes: OUTPUT.pairs.jsonl beside the KTO rows."""
    return Path(output).with_suffix(".pairs.jsonl")


def best_over_worst(rows: list[dict]) -> list[dict]:
    """Preference pairs from graded rows (--grade_pairs): per prompt, in the prompt's first order, the best-graded
    answer as chosen and the worst as rejected, UltraFeedback's binarization with the worst as the rejected one (as
    iterative DPO recipes take it); a prompt whose answers all got one grade, or that has one answer, gives none. Of
    answers graded alike, the first one graded counts (sources in order, then samples)."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(json.dumps(row["prompt"], sort_keys=True), []).append(row)
    pairs = []
    for graded in by_prompt.values():
        best = max(graded, key=lambda r: r["grade"])  # the first of the highest
        worst = min(graded, key=lambda r: r["grade"])
        if best["grade"] == worst["grade"]:
            continue
        columns = {k: v for k, v in best.items() if k not in ("completion", "label", "grade", "grader", "generator")}
        pairs.append({**columns, "chosen": best["completion"], "rejected": worst["completion"],
                      "chosen_grade": best["grade"], "rejected_grade": worst["grade"], "grader": best["grader"],
                      "chosen_source": best["generator"], "rejected_source": worst["generator"]})
    return pairs


def kto_next_step(desirable: int, undesirable: int) -> tuple[str, str | None]:
    """(the flags kto.py needs on these labels, or why kto.py would refuse them). --desirable_weight W where the
    classes are unbalanced: TRL advises a ratio W x desirable / undesirable (undesirable_weight 1) in [1, 4/3] (the
    README's kto section); W puts it mid-range (7/6), to two significant digits, so that the training share (kto.py
    holds some answers out: 26 of the tiny preset's 30 desirable train) stays in range too; an edge did not (4.8
    gave 0.96 there). None where 1 is in range already. kto.py refuses answers of one label alone
    (alignkit.core.mixture.check_both_labels)."""
    if not desirable + undesirable:  # nothing written: nothing to train on
        return "", None
    if not desirable or not undesirable:
        have, threshold = ("desirable", "higher") if desirable else ("undesirable", "lower")
        return "", (f"kto.py needs both labels, and all {desirable + undesirable} answers are {have}: a {threshold} "
                    "--grade_threshold splits them where their grades differ (a grader of true/false alone cannot "
                    "be split: grade them otherwise)")
    if undesirable / desirable <= 1 <= 4 * undesirable / (3 * desirable):
        return "", None
    target = 7 * undesirable / (6 * desirable)
    scale = 10 ** (1 - math.floor(math.log10(target)))
    weight = round(target * scale) / scale
    return f" --desirable_weight {weight:g}", None
