"""rl.py's machinery: online GRPO/RLOO on TRL's trainers, with rewards from a rule, a judge, a reward model or code.

Algorithms (TRL 1.16). For each prompt x the policy samples G completions y_1..y_G and each gets a reward r_i
(the weighted sum of the `--reward`s, weights `--reward_weights`).
- grpo: advantage A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4) within the group; the loss is TRL's clipped
  policy-gradient surrogate plus beta * KL(pi || pi_ref), KL estimated per token as exp(q - p) - (q - p) - 1
  with p = log pi, q = log pi_ref.
- rloo: A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j, the leave-one-out baseline (Ahmadian et al. 2024).

The reference pi_ref is the policy with the trained adapter off: the base, or base + the frozen SFT adapter the
run started from (as in dpo.py, alignkit.modeling.models.reference_mode); no second model is loaded. TRL's own PEFT path
would switch every adapter off (dropping the SFT adapter from the reference) or copy the trained one, so
`_ReferencePass` routes TRL's reference forward through `reference_mode` instead.

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
  as keyword arguments.

A failed judgment never becomes a reward. A request that still fails after its retries, or an answer without a
rating/verdict, scores None (NaN). A completion with any NaN reward term is unscored as a whole (its other
terms are dropped too, rather than summed as if the missing one were 0): TRL then leaves it out of the group's
baseline and gives it advantage 0, so it moves the policy only through the KL term. Failures are counted
(`judge/failed`, `judge/unparsed`, `rewards/unscored_frac` in the logs and the run's metrics.json).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from alignkit import logger
from alignkit.core.args import ConfigError, redact
from alignkit.core.errors import EndpointRefused
from alignkit.feedback.ratings import SINGLE_V1_NAME, SINGLE_V1_PROMPT, SINGLE_V1_SYSTEM
from alignkit.feedback.ratings import parse_rating as fastchat_rating

# FastChat llm_judge's single-answer grading prompt "single-v1" (alignkit.feedback.ratings), as FastChat's file has it.
SINGLE_V1 = {"name": SINGLE_V1_NAME, "system_prompt": SINGLE_V1_SYSTEM, "prompt_template": SINGLE_V1_PROMPT}


def parse_rating(text: str | None) -> float | None:
    """FastChat's rating (alignkit.feedback.ratings), kept only on its 1..10 scale: a reward from a judge that
    left the scale (0, 11) counts as no rating, as an unparsable one does."""
    value = fastchat_rating(text)
    return value if value is not None and 1 <= value <= 10 else None


# ---------------------------------------------------------------------------------------------------------
# Prompts


def load_prompt_dataset(s):
    """A Dataset with a conversational "prompt" column and the rows' other columns (for the rewards), read by
    label.py's prompt loader from --dataset_id.

    A single file has no splits: --dataset_split is refused there (alignkit.core.mixture.check_file_splits, as in
    sft.py, dpo.py and reward.py) rather than ignored with the whole file read; its default names the default Hub
    dataset's split, so it passes, and label.py's loader is then told "train" (its own check would refuse it)."""
    from datasets import Dataset

    from alignkit.core.data_files import DataError, single_file
    from alignkit.core.mixture import check_file_splits
    from alignkit.feedback.labeling import read_prompts

    check_file_splits(s)
    split = "train" if single_file(s.dataset_id) else s.dataset_split
    prompts = read_prompts(s.dataset_id, split, s.dataset_config, s.prompt_field, s.max_prompts, keep_rows=True)
    TEXT_PROMPTS.update(p.key for p in prompts if isinstance(p.row.get(s.prompt_field), str) and len(p.messages) == 1)
    # TRL hands a row's other columns to every reward function as keyword arguments (a math set's `solution`).
    rows = [{**{k: v for k, v in p.row.items() if k != s.prompt_field}, "prompt": p.messages} for p in prompts]
    try:
        return Dataset.from_list(rows)
    except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError are these
        raise DataError(f"{s.dataset_id}: the columns beside the prompt, which go to the rewards as keyword "
                        f"arguments, do not make one table ({' '.join(str(e).split())[:200]}): keep one type per "
                        "column, or drop the columns the rewards do not read") from None


# Prompts written as text (one user turn): TRL gives a reward function such a prompt and its completions as text,
# where alignkit sends the prompt through the chat template (rl.py keys them by Prompt.key, the messages' digest).
TEXT_PROMPTS: set[str] = set()


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
    """`rm:FOLDER` as a TRL reward function: the reward model's score of prompt + completion."""

    def __init__(self, spec: str, s):
        from alignkit.feedback.rewards import load

        self.__name__ = spec
        self.model = load(spec, settings=s)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        messages = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        return self.model(messages, [completion_text(c) for c in completions])


def import_reward(spec: str):
    """`python:module:function` or `python:path/file.py:function`, called as TRL calls a reward function on the data
    as written: a prompt written as text comes with its completions as text, a conversation's as messages, and
    every other column of the row as a keyword argument."""
    from alignkit.core.digests import digest
    from alignkit.feedback.judge import import_function

    function = import_function(spec, "--reward", "; it must take (prompts, completions, **kwargs) and return one "
                                                 "float (or None) per completion")

    @functools.wraps(function)
    def reward(prompts, completions, **kwargs):
        if prompts and all(isinstance(p, list) and digest(p) in TEXT_PROMPTS for p in prompts):
            prompts, completions = [p[-1]["content"] for p in prompts], [completion_text(c) for c in completions]
        return function(prompts, completions, **kwargs)

    return reward


class JudgeReward:
    """`--reward judge`: an OpenAI-compatible judge scores each completion, through label.py's cache.

    Pointwise: reward = rating / 10 from FastChat's single-answer prompt. Pairwise: the completion against the
    prompt's reference completion in both orders (slot A then slot B); per order 1 / 0.5 / 0 for a win / tie /
    loss, averaged. Failures score None (see the module docstring); `stats` counts them.
    """

    def __init__(self, s, cache_dir: Path):
        from alignkit.core.journal import AppendLog
        from alignkit.core.llm import judge_client
        from alignkit.feedback.judge import endpoint_identity, make_judge

        self.__name__ = f"judge_{s.judge_mode}"
        self.s, self.stats = s, Counter()
        if s.judge_mode == "pairwise":
            # label.py's own judge, so the keys, template handling and verdict parsing are label.py's.
            from alignkit.core.config import JudgeAnswerSettings

            endpoint = {f.name: getattr(s, f.name) for f in dataclasses.fields(JudgeAnswerSettings)}
            judge_settings = SimpleNamespace(judge="openai", judge_template=s.judge_template, principle=s.principle,
                                             **endpoint)
            self.judge = make_judge(judge_settings)
            self.identity = self.judge.identity()
            self.references = self._references(s)
        else:
            self.template = self._single_template(s.judge_template)
            self.client = judge_client(s, "gpt-4o-mini", "--reward judge")
            from alignkit.core.digests import digest

            self.identity = {"judge": f"openai:{self.client.model}", "mode": "single",
                             "template": digest([self.template["system_prompt"], self.template["prompt_template"]], 16),
                             **endpoint_identity(self.client)}
        self.cache = AppendLog(cache_dir / "judgments.jsonl", "rl.py",
                               "let it finish, or give this run its own --judge_cache or run folder")

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
        from alignkit.feedback.labeling import read_responses

        shim = SimpleNamespace(prompt_field=s.prompt_field, response_field=s.response_field)
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
                self.stats["failed"] += 1
                if self.stats["failed"] <= 3:
                    logger.warning(f"judge request failed ({type(result).__name__}: {redact(str(result))[:200]}); "
                                   "that completion is left unscored")
                continue
            parsed = parse_rating(result) if self.s.judge_mode == "pointwise" else None
            if self.s.judge_mode == "pairwise":
                from alignkit.feedback.judge import parse_verdict

                parsed = parse_verdict(result)
            if parsed is None:
                self.stats["unparsed"] += 1  # paid for: cached like label.py's, still no reward
            self.cache.append({"key": key, "judge": self.identity["judge"], "verdict": parsed, "text": result})
        scores = [self._score(keys) for keys in per_row]
        self.stats["unscored"] += sum(v is None for v in scores)
        return scores

    def close(self) -> None:
        self.cache.close()


def build_rewards(s, run_folder: Path) -> list:
    """One TRL reward function per `--reward` entry, each with a __name__ for the logs."""
    funcs = []
    for spec in s.reward:
        if spec == "rule":
            funcs.append(rule_reward)
        elif spec == "judge":
            funcs.append(JudgeReward(s, Path(s.judge_cache) if s.judge_cache else run_folder / "judge.cache"))
        elif spec.startswith("rm:"):
            funcs.append(RewardModelReward(spec, s))
        elif spec.startswith("python:"):
            funcs.append(import_reward(spec))
        else:
            raise ConfigError(f"--reward {spec!r}: expected rule, judge, rm:FOLDER or python:module:function")
    return funcs


# ---------------------------------------------------------------------------------------------------------
# Trainers


class _Reference(torch.nn.Module):
    """Marks TRL's reference forward pass; `_get_per_token_logps_and_entropies` runs the policy in reference_mode."""


class _OnlineMixin:
    """What alignkit adds to TRL's GRPOTrainer and RLOOTrainer (see the module docstring). trainer_class puts
    alignkit.train.trainers' stacked adapters under it (frozen ones back on after a resume, QLoRA's trainable weights in
    fp32), as in sft.py and dpo.py."""

    frozen_adapters: list[str] = []

    def _setup(self, frozen_adapters):
        from alignkit.modeling.models import TRAINABLE

        peft_model = self.accelerator.unwrap_model(self.model)
        if "ref" in peft_model.peft_config:  # TRL's copy of the trained adapter: our reference pass needs none
            peft_model.delete_adapter("ref")
            peft_model.base_model.set_adapter([TRAINABLE, *self.frozen_adapters])
            if self.frozen_adapters:
                peft_model.set_requires_grad(self.frozen_adapters, requires_grad=False)
        if self.beta != 0.0:
            self.ref_model = _Reference()
        self._times = Counter()
        self._unscored = Counter()

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if not isinstance(model, _Reference):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        from alignkit.modeling.models import reference_mode

        with torch.no_grad(), reference_mode(self.accelerator.unwrap_model(self.model), self.frozen_adapters):
            return super()._get_per_token_logps_and_entropies(self.model, *args, **kwargs)

    def _generate(self, prompts):
        start = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            self._times["generating"] += time.perf_counter() - start

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        start = time.perf_counter()
        try:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self._times["judging"] += time.perf_counter() - start
        # A missing term makes the whole completion unscored (NaN in every column): TRL then excludes it from the
        # baseline and zeroes its advantage, instead of summing the other terms as if the missing one were 0.
        missing = torch.isnan(rewards).any(dim=1)
        rewards[missing] = torch.nan
        self._unscored["rows"] += rewards.shape[0]
        self._unscored["unscored"] += int(missing.sum())
        return rewards

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._times["step"] += time.perf_counter() - start

    def log(self, logs, start_time=None):
        if "loss" in logs and self._times["step"] > 0:
            step = self._times["step"]
            gen, judge = self._times["generating"], self._times["judging"]
            logs["time/generating_share"] = round(gen / step, 4)
            logs["time/judging_share"] = round(judge / step, 4)
            logs["time/training_share"] = round(max(step - gen - judge, 0.0) / step, 4)
            logs["time/seconds"] = round(step, 3)
            self._times.clear()
            if self._unscored["rows"]:
                logs["rewards/unscored_frac"] = self._unscored["unscored"] / self._unscored["rows"]
            for func in self.reward_funcs:
                for name, value in getattr(func, "stats", {}).items():
                    logs[f"judge/{name.replace(' ', '_')}"] = value
        return super().log(logs, start_time)


def trainer_class(algo: str):
    from trl import GRPOTrainer, RLOOTrainer

    from alignkit.train.trainers import EndsAtMaxSteps, _StackedAdapters

    base = GRPOTrainer if algo == "grpo" else RLOOTrainer

    class AlignOnlineTrainer(_OnlineMixin, _StackedAdapters, EndsAtMaxSteps, base):
        def __init__(self, *args, frozen_adapters=(), **kwargs):
            from alignkit.modeling.template_rows import check_prompts

            # TRL renders each batch's prompts as it trains: a prompt the template refuses is one line now instead.
            check_prompts(kwargs.get("processing_class"), {"the prompts": kwargs.get("train_dataset")})
            self.frozen_adapters = list(frozen_adapters)
            super().__init__(*args, **kwargs)
            self._setup(frozen_adapters)

    AlignOnlineTrainer.__name__ = f"Align{base.__name__}"
    return AlignOnlineTrainer


def resolve_backend(s) -> bool:
    """True to generate with vLLM. auto: vLLM when installed and a CUDA GPU is there; one line when falling back.
    (alignkit.core.launch.wants_vllm makes the same decision before loading, for what a launch refuses.)"""
    has_vllm = importlib.util.find_spec("vllm") is not None
    cuda = torch.cuda.is_available()
    if s.backend == "transformers":
        return False
    if has_vllm and cuda:
        return True
    why = "no CUDA GPU" if not cuda else "vllm is not installed"
    if s.backend == "vllm":
        raise ConfigError(f"--backend vllm: {why}; pass --backend transformers (or auto) to generate with transformers")
    logger.info(f"generation: transformers ({why}; vLLM needs both)")
    return False


def trl_args(s, folder: Path, dtype, model=None):
    """TRL's GRPOConfig or RLOOConfig from the settings (alignkit.train.training.trl_config underneath)."""
    from trl import GRPOConfig, RLOOConfig

    from alignkit.train.training import trl_config

    use_vllm = resolve_backend(s)
    extra = {}
    if use_vllm:
        # vLLM sizes its KV cache for max_model_len inside its memory share; left unset that is the model's whole
        # context. Capped as label.py and evaluate.py cap it (--max_model_len, at most the model's context).
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None) if model is not None else None
        extra = dict(vllm_mode=s.vllm_mode, vllm_gpu_memory_utilization=s.vllm_gpu_memory_utilization,
                     vllm_max_model_length=min(s.max_model_len, context) if context else s.max_model_len)
    return trl_config(
        GRPOConfig if s.algo == "grpo" else RLOOConfig, s, folder, dtype, model, beta=s.beta,
        num_generations=s.num_generations, max_completion_length=s.max_completion_length,
        temperature=s.temperature, reward_weights=s.reward_weights, use_vllm=use_vllm, **extra,
    )


def rule_rate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 16) -> float:
    """Share of greedy answers that follow the tiny preset's rule (alignkit.modeling.presets.follows_rule)."""
    from alignkit.feedback.judge import question_text
    from alignkit.modeling.generation import generate
    from alignkit.modeling.presets import follows_rule

    was_training = model.training
    model.eval()
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=64)
    if was_training:
        model.train()
    return sum(follows_rule(question_text(p), a) for p, a in zip(prompts, answers)) / len(prompts)
