"""rl.py's machinery: online GRPO/RLOO on TRL's trainers, with rewards from a rule, a judge, a reward model or code.

Algorithms (TRL 1.16). For each prompt x the policy samples G completions y_1..y_G and each gets a reward r_i
(the weighted sum of the `--reward`s, weights `--reward_weights`; a reward's None left out of the sum).
- grpo: advantage A_i = (r_i - mean_j r_j) / (s + 1e-4), the mean over the group; s is the group's std under
  GRPOConfig's default scale_rewards "group", the whole batch's under "batch", and 1 (no division) under "none".
  With multi_objective_aggregation "normalize_then_sum" each reward is normalised within its group first, then
  the weighted sum normalised over the batch. The loss is TRL's clipped policy-gradient surrogate plus
  beta * KL(pi || pi_ref), KL estimated per token as exp(q - p) - (q - p) - 1 with p = log pi, q = log pi_ref.
- rloo: A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j, the leave-one-out baseline (Ahmadian et al. 2024), then
  normalised over the batch when RLOOConfig's normalize_advantages is set. beta enters through the reward, not the
  loss: r_i <- r_i - beta * sum_t (p_t - q_t) over the completion's tokens (the first-order log ratio, summed per
  sequence; it may be negative), before the baseline.
An unscored completion (NaN throughout) is left out of the means and stds and gets A_i = 0.

The reference pi_ref is the policy with the trained adapter off: the base, or base + the frozen SFT adapter the
run started from (as in dpo.py, alignkit.modeling.models.reference_mode); no second model is loaded. TRL's own PEFT path
would switch every adapter off (dropping the SFT adapter from the reference) or copy the trained one, so
`_ReferencePass` routes TRL's reference forward through `reference_mode` instead.

Rewards: alignkit.train.rl_rewards (rule, judge, rm:FOLDER, python:module:function; what a None means).

Prompts (`load_prompt_dataset`, `as_trl_prompts`): every row trains, repeated prompts included, as in TRL. A
conversation goes through the chat template; a prompt written as text goes through it too as one user turn when
the model has a template (as label.py and evaluate.py send it), and as it is when the model has none (TRL's
standard format: a base model on text prompts needs no template).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.launch import vllm_lacking, vllm_refused
from alignkit.core.mixture import read_under

# What rl.py's prompt rows depend on (load_prompt_dataset): the seed and the held-out share do not shape them. The
# generation batch they were checked to fill (check_enough_prompts) counts too: changed, the Prompts cell checks again
# (following a refusal that named only the Run folder cell trained 0 steps and saved: the review of session 33).
PROMPT_SETTINGS = ("dataset_id", "dataset_config", "dataset_split", "prompt_field", "max_prompts", "skip_invalid")
PROMPTS_CHECKED = ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "trainer_overrides")
from alignkit.train import rl_rewards


# ---------------------------------------------------------------------------------------------------------
# Prompts


def check_enough_prompts(s, n: int) -> None:
    """As many prompts as one step samples: TRL's sampler takes whole batches of distinct prompts (each repeated
    --num_generations times) and drops a short one, so fewer prompts trained 0 steps and saved an untrained adapter
    with exit status 0."""
    per_generation, how = s.generation_batch()
    needed = per_generation // s.num_generations
    if n < needed:
        raise ConfigError(f"{s.dataset_id}: {n} prompt{'s' if n != 1 else ''}, but each generation samples {needed} "
                          f"distinct ones (TRL's generation_batch_size {per_generation} = {how}, / --num_generations "
                          f"{s.num_generations}): give more prompts (--max_prompts), or a smaller batch "
                          "(--per_device_train_batch_size, --steps_per_generation, --generation_batch_size)")


def load_prompt_dataset(s):
    """A Dataset with a conversational "prompt" column and the rows' other columns (for the rewards), read by
    label.py's prompt loader from --dataset_id.

    A single file has no splits: --dataset_split is refused there (alignkit.core.mixture.check_file_splits, as in
    sft.py, dpo.py and reward.py) rather than ignored with the whole file read; its default names the default Hub
    dataset's split, so it passes, and label.py's loader is then told "train" (its own check would refuse it)."""
    from alignkit.core.data_files import DataError, single_file
    from alignkit.core.message_columns import as_dataset
    from alignkit.core.mixture import check_file_splits
    from alignkit.feedback.labeling import read_prompts

    check_file_splits(s)
    split = "train" if single_file(s.dataset_id) else s.dataset_split
    # Every row, repeats included (TRL trains on each; before, a repeated prompt and its columns were dropped).
    prompts = read_prompts(s.dataset_id, split, s.dataset_config, s.prompt_field, s.max_prompts, keep_rows=True,
                           skip_invalid=s.skip_invalid)  # a bad row skipped and counted, as sft.py/dpo.py skip one
    # TRL hands a row's other columns to every reward function as keyword arguments (a math set's `solution`);
    # alignkit's mark of a prompt written as text is taken out again before a python reward sees them.
    rows = [{**{k: v for k, v in p.row.items() if k != s.prompt_field}, "prompt": p.messages,
             rl_rewards.TEXT_PROMPT: isinstance(p.row.get(s.prompt_field), str) and len(p.messages) == 1}
            for p in prompts]
    check_enough_prompts(s, len(rows))
    try:
        # A prompt's tool calls as JSON (alignkit.core.message_columns); the rows are every prompt read, in order.
        return read_under(s, as_dataset(rows), keys=PROMPT_SETTINGS + PROMPTS_CHECKED)[0]
    except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError are these
        raise DataError(f"{s.dataset_id}: the columns beside the prompt, which go to the rewards as keyword "
                        f"arguments, do not make one table ({' '.join(str(e).split())[:200]}): keep one type per "
                        "column, or drop the columns the rewards do not read") from None


def as_trl_prompts(dataset, tokenizer, model_id: str):
    """The prompts as the trainer takes them: as they are when the model has a chat template (one that renders tool
    calls, where a prompt holds them); without one, prompts written as text become text again (TRL's standard
    format, no template needed), and conversations are refused (alignkit.modeling.models.require_chat_template: one
    line naming --chat_template). Tool calls under a template that drops them are refused before the model loads
    (rl.py's Prompts cell, alignkit.train.loss_mask.check_chat_template); the check here stays for a tokenizer
    that cannot be read apart from the model (a GGUF source)."""
    from datasets import Dataset

    from alignkit.modeling.models import require_chat_template

    if getattr(tokenizer, "chat_template", None):
        require_chat_template(tokenizer, model_id, dataset)  # one that renders the prompts' tool calls, if any
        return dataset
    if not all(dataset[rl_rewards.TEXT_PROMPT]):
        require_chat_template(tokenizer, model_id)
    logger.info(f"{model_id} has no chat template: the prompts, written as text, go to it as they are (TRL's "
                "standard format)")
    return Dataset.from_list([{**row, "prompt": row["prompt"][-1]["content"]} for row in dataset])


# ---------------------------------------------------------------------------------------------------------
# Trainers


class _Reference(torch.nn.Module):
    """Marks TRL's reference forward pass; `_get_per_token_logps_and_entropies` runs the policy in reference_mode."""


class _EpochRepeat:
    """TRL's RepeatSampler with `set_epoch`, which transformers calls before each epoch: epoch k's order is the
    (k+1)-th permutation of the sampler's seeded generator, however many epochs this process iterated before.

    TRL's draws each epoch's permutation from one generator seeded once and has no set_epoch, so a run resumed past
    its first epoch started again at the first epoch's order while transformers skipped batches as if in a later
    one: the resumed run trained on other prompts than the straight run (and paid a judge again for them). A straight
    run's order is TRL's. `_OnlineMixin._get_train_sampler` gives TRL's sampler, as built, this class's methods."""

    def start(self):
        self.epoch = 0
        self._seeded = self.generator.get_state() if self.shuffle else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        if self.shuffle:  # the permutations of the epochs before this one, drawn again from the seeded state
            self.generator.set_state(self._seeded)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)
        yield from super().__iter__()
        self.epoch = epoch + 1  # the next epoch's order when nothing calls set_epoch


@functools.cache
def _resumable(repeat_sampler: type) -> type:
    """TRL's RepeatSampler class with _EpochRepeat's methods (one class, made where trl is imported)."""
    return type("EpochRepeatSampler", (_EpochRepeat, repeat_sampler), {})


class _OnlineMixin:
    """What alignkit adds to TRL's GRPOTrainer and RLOOTrainer (see the module docstring). trainer_class puts
    alignkit.train.trainers' stacked adapters under it (frozen ones back on after a resume, QLoRA's trainable weights in
    fp32), as in sft.py and dpo.py."""

    frozen_adapters: list[str] = []
    counts_own_tokens = False  # TRL's GRPO/RLOO count in state.num_input_tokens_seen (alignkit.train.resuming)
    logs_last_step = True  # _log_last_step: metrics.json takes that log's figures (alignkit.train.training.finish)

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
        for func in self.reward_funcs:  # rm:FOLDER renders as TRL renders its reward models' conversations
            if hasattr(func, "template_kwargs"):
                func.template_kwargs = dict(self.chat_template_kwargs)
            if hasattr(func, "cache"):  # the judge's cache, in the run folder training has just claimed (a notebook's
                func.close()  # earlier run's file may have gone with a failed run): another run holding it stops
                func.cache  # noqa: B018 - this one now, not after the model sampled
        self._times = Counter()
        self._unscored = Counter()
        if self.args.logging_strategy == "steps":  # the last step logged too: its figures reach metrics.json
            self.add_callback(_log_last_step())
        for name in ("trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer"):  # once per process, not per trainer
            if not any(isinstance(f, _UnscoredRows) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(_UnscoredRows())
        # The judges' counts at the last log: each log counts what happened since (a judge outlives a notebook's
        # trainer, and a resumed run's process counts from 0), so the logs summed are the run's totals.
        self._counted = self._judge_counts()

    def _judge_counts(self) -> list[tuple[str, int]]:
        return [(f"judge/{name.replace(' ', '_')}", func.stats[name]) for func in self.reward_funcs
                for name in getattr(func, "STATS", ())]

    def _get_train_sampler(self, dataset=None):
        from trl.trainer.utils import RepeatSampler

        sampler = built = super()._get_train_sampler(dataset)
        if type(built) is RepeatSampler:  # TRL's own made resumable; a subclass of it or another sampler is kept
            resumable = _resumable(RepeatSampler)
            sampler = resumable.__new__(resumable)  # TRL's sampler as built, its seeded generator included
            sampler.__dict__.update(built.__dict__)
            sampler.start()
            self._epoch_sampler = sampler
        return sampler

    def _run_epoch(self, *args, **kwargs):
        # transformers' set_epoch reaches the sampler in one process only: under a launch accelerate wraps it in a
        # BatchSamplerShard (and a SkipBatchSampler on resume), past where DataLoaderShard.set_epoch looks.
        if (sampler := getattr(self, "_epoch_sampler", None)) is not None and "epoch" in kwargs:
            sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if not isinstance(model, _Reference):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        from alignkit.modeling.models import reference_mode

        with torch.no_grad(), reference_mode(self.accelerator.unwrap_model(self.model), self.frozen_adapters):
            return super()._get_per_token_logps_and_entropies(self.model, *args, **kwargs)

    def _generate(self, prompts):
        from alignkit.modeling.generation import no_router_logits

        start = time.perf_counter()
        try:  # a mixture of experts returning its router logits crashed on the rollouts' padded batches
            with no_router_logits(self.accelerator.unwrap_model(self.model)):
                return super()._generate(prompts)
        finally:
            self._times["generating"] += time.perf_counter() - start

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        start = time.perf_counter()
        # alignkit's mark of a prompt written as text goes to the python rewards directly, not among the row's
        # columns TRL hands every reward (and prints in its "All reward functions returned None" warning).
        rows = [row for row in inputs or () if isinstance(row, dict)]
        marks = [row.get(rl_rewards.TEXT_PROMPT) for row in rows]
        for row in {id(row): row for row in rows}.values():  # a row may come twice as one object
            row.pop(rl_rewards.TEXT_PROMPT, None)
        for func in self.reward_funcs:
            if hasattr(func, "text_marks"):
                func.text_marks = marks
        try:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            for row, mark in zip(rows, marks):
                if mark is not None:
                    row[rl_rewards.TEXT_PROMPT] = mark
            self._times["judging"] += time.perf_counter() - start
        # A failed judgment makes the whole completion unscored (NaN in every column), instead of the other terms
        # summed as if it were 0. A python reward's None is TRL's "does not apply": TRL sums the other terms
        # (nansum), as for a pairwise judge's prompt without a reference completion. Either way a row that is NaN
        # throughout is left out of the baseline with advantage 0. The judges say which of this process's rows
        # failed; TRL gathered the rewards of every process, so the marks are gathered alike.
        if judges := [f for f in self.reward_funcs if getattr(f, "failure_unscores", False)]:
            from accelerate.utils import gather

            failed = torch.tensor([any(judge.failed[row] for judge in judges) for row in range(len(prompts))],
                                  dtype=torch.float32, device=rewards.device)
            rewards[gather(failed) > 0] = torch.nan
        self._unscored["rows"] += rewards.shape[0]
        self._unscored["unscored"] += int(torch.isnan(rewards).all(dim=1).sum())
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
            if self._unscored["rows"]:  # this log's share, as the summary reads it ("up to X% of a log")
                logs["rewards/unscored_frac"] = self._unscored["unscored"] / self._unscored["rows"]
            self._unscored.clear()
        # Each log counts the judgments since the last; the run's closing log (train_runtime) those after the last
        # step logged, so that a run's logs sum to its totals. Every process logs both: the counts are summed over
        # the launch, each process judging its own completions.
        if "loss" in logs or "train_runtime" in logs:
            now, then = self._judge_counts(), dict(self._counted)
            self._counted = now
            if now:
                total = self.accelerator.reduce(torch.tensor([float(v - then.get(name, 0)) for name, v in now],
                                                             device=self.accelerator.device), reduction="sum")
                logs.update({name: int(value) for (name, _), value in zip(now, total.tolist())})
        return super().log(logs, start_time)


def _log_last_step():
    """A TrainerCallback that logs the run's last step whatever --logging_steps says: a run shorter than it (or
    ending between two logs) logged no step, so its reward, KL, time shares and unscored share were only averaged
    into TRL's closing summary, and rl.py's summary read that one entry as a first and a last log."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogLastStep()


def reward_summary(log_history: list[dict]) -> str | None:
    """rl.py's summary line of the logged reward, from the trainer's log_history: the step logs only (TRL's closing
    summary averages the steps after the last log: none, as the last step is always logged). Not every log has a
    reward: a step that reuses its generation's completions (--steps_per_generation > 1) generated and scored nothing,
    and a log whose every completion went unscored has NaN, which transformers logs as None. The line counts the
    logs that had one ("the one step logged" read 1 of 2 steps as the run's only one)."""
    logs = [entry for entry in log_history if "loss" in entry]
    logged = [entry for entry in logs if entry.get("reward") is not None]
    if len(logged) > 1 and len(logged) == len(logs):
        return f"reward: {logged[0]['reward']:.3f} at the first log, {logged[-1]['reward']:.3f} at the last"
    if len(logged) > 1:
        return (f"reward: {logged[0]['reward']:.3f} at step {logged[0]['step']}, {logged[-1]['reward']:.3f} at step "
                f"{logged[-1]['step']}, the first and last logs that had one ({len(logged)} of {len(logs)})")
    if logged:
        return (f"reward: {logged[0]['reward']:.3f} at step {logged[0]['step']}, the one step that logged a reward"
                f"{f' (of the {len(logs)} logs)' if len(logs) > 1 else ''}")
    return None


class _UnscoredRows(logging.Filter):
    """TRL's warning for each unscored completion ("All reward functions returned None for the following kwargs:"
    and the whole row, every column of it, a step at a time) as one line, once: the logs count them."""

    said = False

    def filter(self, record) -> bool:
        if "All reward functions returned None" not in str(record.msg):  # accelerate puts "[RANK 0] " first
            return True
        if not _UnscoredRows.said:
            _UnscoredRows.said = True
            logger.warning("a completion no reward scored (a failed judgment, or None from every reward) is left out "
                           "of its group's baseline with advantage 0; rewards/unscored_frac counts them in each log")
        return False


def trainer_class(algo: str):
    from trl import GRPOTrainer, RLOOTrainer

    from alignkit.train.resuming import EndsAtMaxSteps
    from alignkit.train.trainers import _StackedAdapters

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
    if s.backend == "transformers":
        return False
    if not (why := vllm_lacking()):
        return True
    if s.backend == "vllm":
        raise ConfigError(vllm_refused(s, why))
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
