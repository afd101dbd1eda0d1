"""KTO (Ethayarajh et al. 2024) on TRL's KTOTrainer, with alignkit's adapters: kto.py's trainer and its rule check.

KTO learns from unpaired answers, each labelled desirable or not (`alignkit.core.data.load_unpaired`: label.py's
pointwise grades, or preference pairs split into a desirable and an undesirable row). With the log-ratio
r = log pi(y|x) - log ref(y|x) and z0 a batch estimate of KL(pi || ref) (mismatched prompt/answer pairs, no gradient):

    desirable:    loss = desirable_weight   * (1 - sigmoid(beta * (r - z0)))
    undesirable:  loss = undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

TRL computes that; `AlignKTOTrainer` adds what alignkit's DPO trainer (alignkit.train.trainers) does for a PEFT
model: stacked adapters (a run started from an SFT adapter keeps it frozen and active, and trains a fresh adapter
on top) and a reference that is the policy with the trained adapter off and the frozen ones on (the model the
run starts from, or the first `reference_adapters` of the chain), never a second copy of the model. TRL's own
PEFT reference switches every adapter off (the bare base) and copies a pre-loaded adapter into a "ref" adapter;
here the reference log-probs of the answer and of the KL answer come from `compute_ref_log_probs` in that mode
and reach TRL's loss through the batch, as TRL's own `precompute_ref_log_probs` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import KTOTrainer
from trl.models.utils import disable_gradient_checkpointing

from alignkit.core.args import ConfigError
from alignkit.modeling.models import TRAINABLE, reference_mode
from alignkit.train.resuming import EndsAtMaxSteps
from alignkit.train.trainers import _StackedAdapters, check_kept, keep_lora_dropout, row_count, trl_arguments

# KTOConfig fields that cannot act here (alignkit loads the model and computes the reference itself).
_REFUSED = {
    "model_init_kwargs": "alignkit loads the model itself; use --dtype, --quantization, --attn_implementation",
    "trust_remote_code": "alignkit loads the model itself; use --trust_remote_code",
    "sync_ref_model": "TR-DPO moves the reference, which TRL does not support with a PEFT adapter",
}
# TRL's per-batch means of one label's answers: True for the desirable ones, False for the undesirable ones.
_PER_ANSWER = {"rewards/chosen": True, "logps/chosen": True, "rewards/rejected": False, "logps/rejected": False}


class AlignKTOTrainer(_StackedAdapters, EndsAtMaxSteps, KTOTrainer):
    def __init__(self, model, ref_model=None, args=None, *rest, frozen_adapters=(), reference_adapters=None, **kwargs):
        if ref_model is not None:
            raise ValueError("AlignKTOTrainer computes the reference from the model itself; pass no ref_model")
        for name, why in _REFUSED.items():
            if args is not None and getattr(args, name):
                raise ConfigError(f"trainer override {name}={getattr(args, name)!r} has no effect in alignkit: {why}; drop it")
        self._choose_reference(frozen_adapters, reference_adapters)
        kwargs = trl_arguments(KTOTrainer, (model, None, args, *rest), kwargs)
        given = (row_count(kwargs.get("train_dataset")), row_count(kwargs.get("eval_dataset")))
        super().__init__(**kwargs)
        # TRL drops the rows whose prompt fills --max_length (KTOTrainer._prepare_dataset), without a word: all of
        # them trained no step and saved an untrained adapter, with exit status 0
        check_kept(self, given, "the prompt alone is at least that many tokens", "rows")
        peft_model = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(peft_model, "peft_config", {}):  # TRL's copy of the trained adapter: not our reference
            peft_model.delete_adapter("ref")
            peft_model.base_model.set_adapter([TRAINABLE, *self.frozen_adapters])
            if self.frozen_adapters:
                peft_model.set_requires_grad(self.frozen_adapters, requires_grad=False)
        keep_lora_dropout(peft_model)  # --lora_dropout acts as in dpo.py, after TRL's disable_dropout
        self.precompute_ref_logps = True  # reference log-probs always ride in the batch (see compute_loss)

    def compute_ref_log_probs(self, model, inputs):
        """Summed log-probs of each answer and of its KL answer under the reference: the trained adapter off."""
        peft_model = self.accelerator.unwrap_model(self.model)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            reference_mode(peft_model, self.frozen_adapters, self.reference_adapters),
            self.accelerator.autocast(),
        ):
            logps = self._answer_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            kl_logps = None
            if self.calculate_KL:
                kl_logps = self._answer_logps(model, inputs["KL_input_ids"], inputs["KL_attention_mask"],
                                              inputs["KL_completion_mask"])
        return logps, kl_logps

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's pass (--precompute_ref_log_probs), with one cache file for every process. TRL has the main process
        write the log-probs beside the dataset and every process read them back; for a dataset held in memory (every
        dataset alignkit builds) `datasets` names that file at random in a temporary folder of each process's own,
        so the other processes looked for a file that was never written. Here the file lies in the run folder,
        named by TRL's fingerprint (which it agrees across processes): the same path on every process and node."""
        if self.accelerator.num_processes > 1 and not dataset.cache_files:
            folder = Path(self.args.output_dir, "kto_reference")
            folder.mkdir(parents=True, exist_ok=True)
            dataset._get_cache_file_path = lambda fingerprint: str(folder / f"cache-{fingerprint}.arrow")
        return super()._precompute_ref_logps(dataset, name, batch_size)

    @staticmethod
    def _answer_logps(model, input_ids, attention_mask, completion_mask):
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        per_token = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).log_probs
        return per_token[:, -(input_ids.size(1) - 1) :].sum(-1)  # prompt-learning PEFT prepends virtual tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "ref_logps" not in inputs:
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(model, inputs)
            inputs = {**inputs, "ref_logps": ref_logps}
            if ref_kl_logps is not None:
                inputs["ref_KL_logps"] = ref_kl_logps
        metrics = self._metrics["train" if self.model.training else "eval"]
        logged = {name: len(metrics.get(name, ())) for name in _PER_ANSWER}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._per_answer(metrics, logged, inputs["label"])
        return result

    def _per_answer(self, metrics, logged, labels):
        """One entry per answer, not per batch, for the rewards and log-probs of each label. TRL appends each batch's
        mean over that label's answers and its log averages the entries, so a batch with 1 desirable answer weighed as
        much as one with 7 and the held-out eval_rewards/* were no answer's mean (as alignkit's DPO trainer,
        alignkit.train.trainers `_log_rewards`): the batch's mean now stands once for each of its answers, counted as
        TRL gathers them (gather_for_metrics: a launch's padded last batch is not counted twice in the weights; the
        batch's mean itself is TRL's, over its processes' sums, padding included)."""
        labels = torch.as_tensor(labels, device=self.accelerator.device).long().reshape(-1)
        labels = self.accelerator.gather_for_metrics(labels)
        desirable = int(labels.sum())
        counts = {True: desirable, False: labels.numel() - desirable}
        for name, label in _PER_ANSWER.items():
            entries = metrics.get(name, [])
            if len(entries) > logged[name]:
                entries[logged[name] :] = entries[logged[name] :] * counts[label]
                if not entries:  # TRL's log divides by the number of entries
                    del metrics[name]

    def log(self, logs, start_time=None):
        """rewards/margins as the mean reward of the desirable answers less that of the undesirable ones, over every
        answer since the last log: TRL's is the mean of its batches' differences (`_per_answer`)."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics.pop("rewards/margins", None)
        chosen, rejected = metrics.get("rewards/chosen"), metrics.get("rewards/rejected")
        if chosen and rejected:
            metrics["rewards/margins"] = [sum(chosen) / len(chosen) - sum(rejected) / len(rejected)]
        super().log(logs, start_time)


def rule_following(model, tokenizer, prompts: list[str], samples: int = 4, seed: int = 0) -> float:
    """Share of answers sampled at temperature 1 (the tiny preset's evaluation convention: greedy answers collapse
    to one repeated word, which passes) that follow the tiny preset's rule (alignkit.modeling.presets.follows_rule)."""
    from alignkit.modeling.generation import generate
    from alignkit.modeling.presets import follows_rule

    conversations = [[{"role": "user", "content": p}] for p in prompts] * samples
    was_training = model.training
    model.eval()
    answers = generate(model, tokenizer, conversations, max_new_tokens=16, temperature=1.0, batch_size=256, seed=seed)
    model.train(was_training)
    return sum(follows_rule(c[0]["content"], a) for c, a in zip(conversations, answers)) / len(answers)
