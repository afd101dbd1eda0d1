"""rl.py's rewards: TRL reward functions from a rule, a judge, a reward model or code (`build_rewards`).

Rewards (`reward(prompts, completions, **kwargs) -> list[float | None]`, TRL's reward-function signature):
- `rule`: alignkit.modeling.presets.score, the tiny preset's checkable rule (share of on-topic words, 0..1);
- `judge`: an OpenAI-compatible judge, `--judge_mode pointwise` (FastChat's single-answer grading prompt,
  "[[rating]]" 1-10, reward rating / 10) or `pairwise` against `--reference_completions` (FastChat verdict
  tokens, judged in both orders; reward = mean over the orders of 1 for a win, 0.5 a tie, 0 a loss).
  Concurrent (`--parallel`), retried with backoff by the openai client, cached in label.py's append-only
  judgments.jsonl under label.py's key rules (the request and the judge's whole identity);
- `rm:FOLDER`: a reward.py model (alignkit.feedback.rewards.load);
- `python:module:function`: a function with TRL's reward signature, called as TRL calls it on the data as written
  (`import_reward`): text for a prompt written as text, messages for a conversation, the row's other columns
  as keyword arguments. What it returns wrong, or an exception it raises, stops the run in one line naming it
  (`checked_rewards`, `reward_raised`: the line of its file that raised; --debug shows the traceback).

A failed judgment never becomes a reward. A request that still fails after its retries, or an answer without a
rating/verdict, scores None (NaN), and a completion whose judgment failed is unscored as a whole (its other
terms are dropped too, rather than summed as if the judgment were 0). A python reward's None means what it means
in TRL, "this reward does not apply here": the other terms are summed without it, and only a completion that every
reward left None is unscored. A pairwise judge's None for a prompt without a reference completion means the same
(`judge/no_reference` counts them): nothing was judged, so nothing failed. TRL leaves an unscored completion
out of the group's baseline and gives it advantage 0, so it moves the policy only through the KL term. Both are
counted (`judge/failed`, `judge/unparsed`, `rewards/unscored_frac` in the logs; rl.py's summary prints the
largest unscored share). A judge that fails its first 5 requests, or 20 in a row later (a server that is down or
went down), stops the run in one line instead, as label.py's does (alignkit.core.llm.FirstFailures, over the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from alignkit import logger
from alignkit.core.args import ConfigError, redact
from alignkit.core.saved_settings import mark_built
from alignkit.core.errors import EndpointRefused, UserError, run_again
from alignkit.feedback.ratings import SINGLE_V1_NAME, SINGLE_V1_PROMPT, SINGLE_V1_SYSTEM
from alignkit.feedback.ratings import parse_rating as fastchat_rating

# FastChat llm_judge's single-answer grading prompt "single-v1" (alignkit.feedback.ratings), as FastChat's file has it.
SINGLE_V1 = {"name": SINGLE_V1_NAME, "system_prompt": SINGLE_V1_SYSTEM, "prompt_template": SINGLE_V1_PROMPT}


def parse_rating(text: str | None) -> float | None:
    """FastChat's rating (alignkit.feedback.ratings), kept only on its 1..10 scale: a reward from a judge that
    left the scale (0, 11) counts as no rating, as an unparsable one does."""
    value = fastchat_rating(text)
    return value if value is not None and 1 <= value <= 10 else None


# The column marking a row whose prompt was written as text (rl.load_prompt_dataset): TRL gives a reward function
# such a prompt and its completions as text, where alignkit sends the prompt through the chat template as one user
# turn. The row says so itself: a one-turn conversation with the same words stays a conversation.
TEXT_PROMPT = "alignkit_prompt_was_text"

def completion_text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}], plain ones as text."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


# ---------------------------------------------------------------------------------------------------------
# Rewards


def rule_reward(prompts, completions, **kwargs) -> list[float]:
    """The tiny preset's rule (alignkit.modeling.presets.score): share of the answer's three words in the prompt's
    category."""
    from alignkit.feedback.judge import question_text
    from alignkit.modeling.presets import score

    return [score(question_text(p) if isinstance(p, list) else p, completion_text(c))
            for p, c in zip(prompts, completions, strict=True)]


class RewardModelReward:
    """`rm:FOLDER` as a TRL reward function: the reward model's score of prompt + completion. Its conversations
    render with the run's chat_template_kwargs (GRPOConfig's, e.g. {"enable_thinking": false}), as TRL renders them
    for a reward model of its own; the trainer hands them over (`template_kwargs`)."""

    def __init__(self, spec: str, s):
        from alignkit.feedback.rewards import load
        from alignkit.modeling.reward_models import check_model_kind

        # Its logs' name, as TRL names a reward model: the last part of its path (rewards/rm:NAME/mean), not the
        # whole path, whose slashes split a dashboard's sections.
        self.__name__ = f"rm:{Path(spec[len('rm:'):].rstrip('/')).name or spec[len('rm:'):]}"
        if spec[len("rm:"):]:  # a causal LM: its advice in rl.py's flags (load's names label.py's --judge)
            check_model_kind(spec[len("rm:"):], None, reward=True, script="rl.py")
        self.model = load(spec, settings=s)
        self.template_kwargs: dict = {}

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        messages = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        return self.model(messages, [completion_text(c) for c in completions], self.template_kwargs)


def import_reward(spec: str):
    """`python:module:function` or `python:path/file.py:function`, called as TRL calls a reward function on the data
    as written: a prompt written as text comes with its completions as text, a conversation's as messages, and
    every other column of the row as a keyword argument."""
    from trl.trainer.utils import get_callable_name, is_async_callable

    from alignkit.feedback.judge import import_function

    function = import_function(spec, "--reward", "; it must take (prompts, completions, **kwargs) and return one "
                                                 "float (or None) per completion")

    def as_written(prompts, completions, kwargs) -> dict:
        """The prompts and completions by name, as TRL passes them, and the row's columns but alignkit's mark (set
        by the trainer on `text_marks`, or among the columns where the function is called as TRL would call it)."""
        was_text = kwargs.pop(TEXT_PROMPT, None)
        was_text = reward.text_marks if was_text is None else was_text
        if prompts and was_text and all(was_text) and all(isinstance(p, list) for p in prompts):
            prompts, completions = [p[-1]["content"] for p in prompts], [completion_text(c) for c in completions]
        return {"prompts": prompts, "completions": completions, **kwargs}

    @contextlib.contextmanager
    def in_one_line(kwargs):
        """The reward's failure as one line, for the sync and the async reward alike: a KeyError names the reward and
        the columns a row passes (a column the dataset lacks is the usual one); checked_rewards' own line stays; any
        other error is the reward's code failing, said with its line (reward_raised), not TRL's traceback."""
        try:
            yield
        except KeyError as error:
            columns = ", ".join(sorted(k for k in kwargs if k not in TRL_REWARD_ARGUMENTS)) or "none"
            raise ConfigError(f"--reward {spec} raised KeyError {error}: a row's columns reach it as keyword "
                              f"arguments, and this dataset's are: {columns} (--debug shows where)") from error
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - the reward's code failed: its line, not TRL's traceback
            raise reward_raised(spec, function, error) from error

    if is_async_callable(function):
        # An async reward (an API call) stays async, so TRL awaits it on its event loop beside the others.
        async def reward(prompts, completions, **kwargs):
            with in_one_line(kwargs):
                return checked_rewards(spec, await function(**as_written(prompts, completions, kwargs)), completions)
    else:
        def reward(prompts, completions, **kwargs):
            with in_one_line(kwargs):
                return checked_rewards(spec, function(**as_written(prompts, completions, kwargs)), completions)

    reward.function, reward.spec = function, spec  # check_rewards_take reads its parameters
    reward.__name__ = reward.__qualname__ = get_callable_name(function)  # TRL's name for it in the logs
    reward.text_marks = None  # this batch's prompts written as text (alignkit.train.rl, _calculate_rewards)
    reward.__doc__ = getattr(function, "__doc__", None)
    return reward


def reward_raised(spec: str, function, error: Exception) -> ConfigError:
    """A `python:` reward that raised, in one line: the error and the line of the reward's file it came from (its
    last frame there; a library it called may have raised below it), where TRL gave a traceback through its
    trainer. The traceback stays behind the line (--debug)."""
    import os

    file = getattr(getattr(function, "__code__", None), "co_filename", None)
    tb, line = error.__traceback__, None
    while tb is not None:
        if file and tb.tb_frame.f_code.co_filename == file:
            line = tb.tb_lineno
        tb = tb.tb_next
    where = ""
    if line is not None:
        shown = os.path.relpath(file) if Path(file).resolve().is_relative_to(Path.cwd().resolve()) else file
        where = f" ({shown} line {line})"
    said = " ".join(str(error).split())[:300]
    return ConfigError(f"--reward {spec} raised {type(error).__name__}{': ' + said if said else ''}{where}; fix it, "
                       f"then {run_again()} (--debug or ALIGNKIT_DEBUG=1 shows the traceback)")


# What TRL's GRPO/RLOO trainers pass a reward function beside the row's columns (and alignkit's mark).
TRL_REWARD_ARGUMENTS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments", TEXT_PROMPT}


def checked_rewards(spec: str, rewards, completions):
    """`rewards` as a `python:` reward returned them, when they are one number (or None) per completion, as TRL takes
    them (a list, a tuple, an array, a tensor; Python, NumPy or 0-d tensor numbers, bools); else one line naming the
    reward and what it returned (TRL failed later, inside its trainer: "too many dimensions 'str'")."""
    n = len(completions)
    fix = f"it must return one float (or None) per completion, a list of {n} here"
    shape = getattr(rewards, "shape", None)
    if shape is not None and len(shape) != 1:  # a tensor or an array of another shape than one value each
        raise ConfigError(f"--reward {spec} returned an array of shape {tuple(shape)}: {fix}")
    if isinstance(rewards, (str, bytes, dict)) or not hasattr(rewards, "__iter__"):
        raise ConfigError(f"--reward {spec} returned {type(rewards).__name__}: {fix}")
    rewards = rewards if shape is not None or isinstance(rewards, (list, tuple)) else list(rewards)  # a generator
    if len(rewards) != n:
        raise ConfigError(f"--reward {spec} returned {len(rewards)} values for {n} completions: {fix}")
    for i, value in enumerate(rewards if shape is None else ()):
        if not _a_number(value):
            raise ConfigError(f"--reward {spec} returned {type(value).__name__} ({value!r:.40}) for completion "
                              f"{i + 1}: {fix}")
    values = rewards.tolist() if shape is not None else rewards
    for i, value in enumerate(values):  # an infinity made the step's loss and gradients 0, without a word
        if value is not None and math.isinf(float(value)):
            raise ConfigError(f"--reward {spec} returned {float(value)} for completion {i + 1}: a reward must be "
                              "finite (None or NaN leave a completion unscored)")
    return rewards


def _a_number(value) -> bool:
    """None (no score), or anything TRL's torch.tensor takes as a number (not text)."""
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class JudgeReward:
    """`--reward judge`: an OpenAI-compatible judge scores each completion, through label.py's cache.

    Pointwise: reward = rating / 10 from FastChat's single-answer prompt. Pairwise: the completion against the
    prompt's reference completion in both orders (slot A then slot B); per order 1 / 0.5 / 0 for a win / tie /
    loss, averaged. Failures score None (see the module docstring); `stats` counts them.
    """

    failure_unscores = True  # a failed judgment (`failed`, per row of the last call) unscores the completion whole
    # What `stats` counts, logged as judge/NAME (every name, every log: the processes of a launch sum them alike)
    STATS = ("requests", "cached", "failed", "unparsed", "unscored", "no reference")

    def __init__(self, s, cache_dir: Path):
        from alignkit.core.llm import judge_client
        from alignkit.feedback.judge import endpoint_identity, make_judge

        self.__name__ = f"judge_{s.judge_mode}"
        self.s, self.stats = s, Counter()
        self.failed: list[bool] = []  # per row of the last call: its judgment failed
        if s.judge_mode == "pairwise":
            # label.py's own judge, so the keys, template handling and verdict parsing are label.py's.
            from alignkit.core.config import JudgeAnswerSettings

            endpoint = {f.name: getattr(s, f.name) for f in dataclasses.fields(JudgeAnswerSettings)}
            judge_settings = SimpleNamespace(judge="openai", judge_template=s.judge_template, principle=s.principle,
                                             **endpoint)
            self.judge = make_judge(judge_settings, "--reward judge")
            from alignkit.feedback.judge_templates import check_principle

            check_principle(self.judge.template, s)
            self.identity = self.judge.identity()
            self.references = self._references(s)
        else:
            self.template = self._single_template(s.judge_template)
            self.client = judge_client(s, "gpt-4o-mini", "--reward judge")
            from alignkit.core.digests import digest

            self.identity = {"judge": f"openai:{self.client.model}", "mode": "single",
                             "template": digest([self.template["system_prompt"], self.template["prompt_template"]], 16),
                             **endpoint_identity(self.client)}
        # Every request of the run, step after step: a judge that fails its first FIRST_FAILURES requests (a server
        # down, a wrong URL), or FAILURES_IN_A_ROW later, stops the run in one line; a few failures score None.
        from alignkit.core.llm import FirstFailures
        from alignkit.feedback.label_records import judge_fix

        self.watch = FirstFailures("judge request", judge_fix("openai", self.identity["base_url"],
                                                              self.identity["model"]), None)
        # Opened once training has claimed the run folder (the trainer's setup reads `cache`): opened now, a rerun's
        # judgments would follow the earlier run where the claim moves it aside (run_folder.previous-TIME).
        self.cache_dir, self._cache = cache_dir, None

    @property
    def cache(self):
        if self._cache is None:
            self._cache = self._open_cache(self.cache_dir)
        return self._cache

    @staticmethod
    def _open_cache(cache_dir: Path):
        """label.py's judgments.jsonl, locked against a second run. Under a launch each process judges its own
        completions and appends to its own file (rank r > 0: judgments.rankR.jsonl; one lock each, so two
        processes never refuse each other), and looks up every process's judgments of earlier runs too."""
        from alignkit.core.journal import AppendLog
        from alignkit.core.launch import process_rank

        rank = process_rank()
        cache = AppendLog(cache_dir / ("judgments.jsonl" if rank == 0 else f"judgments.rank{rank}.jsonl"), "rl.py",
                          "let it finish, or give this run its own --judge_cache or run folder")
        for other in sorted(cache_dir.glob("judgments*.jsonl")):
            if other.resolve() != cache.path.resolve():
                cache.read_also(other)
        return cache

    @staticmethod
    def _single_template(spec: str) -> dict:
        import json

        if spec == "default":
            return SINGLE_V1
        path, _, wanted = spec.partition("#")
        if not Path(path).is_file():
            raise ConfigError(f"--judge_template {spec!r}: no such file; use default (FastChat single-v1) or a "
                              "judge_prompts.jsonl FILE#NAME whose entry has type single")
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if entry.get("name") == wanted or (not wanted and entry.get("type") == "single"):
                if entry.get("type") != "single" or "{answer}" not in entry.get("prompt_template", ""):
                    raise ConfigError(f"{path}: line {number} ({entry.get('name')}): field 'type' must be single and "
                                      "'prompt_template' must contain {answer} for --judge_mode pointwise")
                return entry
        raise ConfigError(f"{path}: no single-answer judge prompt named {wanted!r}")

    @staticmethod
    def _references(s) -> dict[str, str]:
        from alignkit.feedback.label_inputs import read_responses

        # --skip_invalid skips a bad row of it too (its prompt then has no reference: counted as no reference)
        shim = SimpleNamespace(prompt_field=s.prompt_field, response_field=s.response_field,
                               skip_invalid=s.skip_invalid)
        found = read_responses(s.reference_completions, shim)
        return {key: text for key, text in found.items() if text}

    # One request: a key and the messages to send.
    def _requests(self, prompt: list[dict], answer: str) -> list[tuple[str, object]]:
        from alignkit.feedback.judge import Request, question_text
        from alignkit.core.digests import digest

        question = question_text(prompt)
        if self.s.judge_mode == "pointwise":
            fields = {"question": question, "answer": answer}
            messages = [{"role": "system", "content": self.template["system_prompt"]}] if \
                self.template.get("system_prompt") else []
            messages.append({"role": "user", "content": self.template["prompt_template"].format(**fields)})
            key = digest({"prompt": prompt, "answer": answer, **self.identity})
            return [(key, messages)]
        reference = self.references.get(digest(prompt))
        if reference is None:
            return []
        out = []
        for slot_a, slot_b in ((answer, reference), (reference, answer)):  # label.py's key: prompt, a, b, identity
            key = digest({"prompt": prompt, "a": slot_a, "b": slot_b, **self.identity})
            out.append((key, Request(key, question, slot_a, slot_b, prompt)))
        return out

    def _ask(self, item):
        key, payload = item
        if self.s.judge_mode == "pointwise":
            return self.client.complete(payload)
        return self.judge.judge(payload)

    def _score(self, keys: list[str]) -> float | None:
        from alignkit.feedback.judge import parse_verdict

        if not keys:
            return None
        values = []
        for order, key in enumerate(keys):
            record = self.cache.get(key)
            if record is None:
                return None
            if self.s.judge_mode == "pointwise":
                rating = parse_rating(record["text"])
                if rating is None:
                    return None
                values.append(rating / 10)
            else:
                verdict = parse_verdict(record["text"])
                if verdict is None:
                    return None
                mine = "A" if order == 0 else "B"  # order 0: the completion in slot A
                values.append(0.5 if verdict == "tie" else float(verdict == mine))
        return sum(values) / len(values)

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        from alignkit.core.journal import threaded
        from alignkit.feedback.judge import is_fatal

        per_row, needed = [], {}
        for prompt, completion in zip(prompts, completions, strict=True):
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            requests = self._requests(prompt, completion_text(completion))
            if not requests:
                self.stats["no reference"] += 1
            per_row.append([key for key, _ in requests])
            for key, payload in requests:
                if key not in self.cache and key not in needed:
                    needed[key] = (key, payload)
        self.stats["requests"] += sum(len(k) for k in per_row)
        self.stats["cached"] += sum(len(k) for k in per_row) - len(needed)
        for (key, _), result in threaded(self._ask, needed.values(), self.s.parallel):
            if isinstance(result, Exception):
                if is_fatal(result):
                    raise EndpointRefused(f"the judge refused the request: {redact(str(result))}. Check the API key, "
                                       "--judge_base_url (it usually ends in /v1) and --judge_model.") from None
                self.watch.failed(result)  # may stop the run, in its own line (a silent endpoint: at once)
                self.stats["failed"] += 1
                if self.stats["failed"] <= 3:
                    logger.warning(f"judge request failed ({type(result).__name__}: {redact(str(result))[:200]}); "
                                   "that completion is left unscored")
                continue
            self.watch.ok()
            parsed = parse_rating(result) if self.s.judge_mode == "pointwise" else None
            if self.s.judge_mode == "pairwise":
                from alignkit.feedback.judge import parse_verdict

                parsed = parse_verdict(result)
            if parsed is None:
                self.stats["unparsed"] += 1  # paid for: cached like label.py's, still no reward
            self.cache.append({"key": key, "judge": self.identity["judge"], "verdict": parsed, "text": result})
        scores = [self._score(keys) for keys in per_row]
        # Which rows' judgments failed (rl's trainer unscores them whole); a prompt without a reference completion
        # was not judged: "does not apply", as a python reward's None (counted as no reference, not unscored).
        self.failed = [value is None and bool(keys) for value, keys in zip(scores, per_row)]
        self.stats["unscored"] += sum(self.failed)
        return scores

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None  # the next use opens it again (a notebook's training cell run again)


def check_rewards_take(rewards: list, prompts) -> None:
    """Refuse, before the policy loads, prompts a reward cannot score: a reward model trained on texts scores a
    prompt written as text (one user turn), not a conversation (alignkit.feedback.rewards); a `python:` reward that
    names a column the rows lack, or takes no **kwargs (TRL's TypeError at the first step, after generating)."""
    import inspect

    columns = sorted(c for c in (getattr(prompts, "column_names", None) or list(prompts)) if c != "prompt")
    for reward in rewards:
        function = getattr(reward, "function", None)
        try:  # its own signature: a decorator's (*args, **kwargs) wrapper takes what it is given
            parameters = list(inspect.signature(function, follow_wrapped=False).parameters.values()) \
                if function is not None else []
        except (TypeError, ValueError):  # a builtin or C function: TRL finds out
            parameters = []
        names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        given = {"prompts", "completions", *TRL_REWARD_ARGUMENTS, *columns}
        lacking = [p.name for p in parameters if p.default is p.empty and p.name not in given
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if lacking:
            raise ConfigError(f"--reward {reward.spec} takes '{lacking[0]}', which no row gives: a row's columns reach "
                              f"it as keyword arguments, and this dataset's are: {', '.join(columns) or 'none'}")
        passed = [*columns, "completion_ids", "trainer_state"]  # what every TRL version here passes it, at least
        refused = [n for n in passed if n not in names]
        if parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters) and refused:
            raise ConfigError(f"--reward {reward.spec} takes no **kwargs, nor '{refused[0]}', which TRL passes it "
                              f"(every column of the row: {', '.join(columns) or 'none'}, and its own); add **kwargs")
    for reward in rewards:
        if isinstance(reward, RewardModelReward) and reward.model.text:
            for prompt in prompts["prompt"]:
                reward.model.text_of(prompt)


class Rewards(list):
    """build_rewards' list: marked with the settings it was built under (a notebook's training cell checks them)."""


def build_rewards(s, run_folder: Path) -> list:
    """One TRL reward function per `--reward` entry, each with a __name__ for the logs."""
    funcs = Rewards()
    for spec in s.reward:
        if spec == "rule":
            funcs.append(rule_reward)
        elif spec == "judge":
            from alignkit.train.kept_judgments import JUDGMENTS

            funcs.append(JudgeReward(s, Path(s.judge_cache) if s.judge_cache else run_folder / JUDGMENTS))
        elif spec.startswith("rm:"):
            funcs.append(RewardModelReward(spec, s))
        elif spec.startswith("python:"):
            funcs.append(import_reward(spec))
        else:
            raise ConfigError(f"--reward {spec!r}: expected rule, judge, rm:FOLDER or python:module:function")
    taken = set()
    for func in funcs:  # two reward models named alike (runs/a/merged, runs/b/merged): logged apart
        name, n = func.__name__, 1
        while func.__name__ in taken and func is not rule_reward:
            n += 1
            func.__name__ = f"{name}_{n}"
        taken.add(func.__name__)
    return mark_built(funcs, s)
