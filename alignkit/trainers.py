"""TRL's trainers with what alignkit adds: stacked adapters, an explicit reference pass, the paper's losses.

- Stacked adapters: a run that starts from an adapter (an SFT adapter under DPO) keeps it loaded, frozen and
  active, and trains a fresh adapter on top. After a resume, transformers re-activates only the first adapter,
  so `_load_from_checkpoint` turns the frozen ones back on.
- The DPO reference pass (`compute_ref_log_probs`) is the policy with the trained adapter off and the frozen
  ones on: the base model, or base + SFT adapter. No second copy of the model is loaded. Its log-probs reach
  TRL's loss through the batch, exactly as TRL's own `precompute_ref_log_probs` does.
- `loss_type` sigmoid (with cDPO label smoothing) and ipo go to `alignkit.losses.preference_loss`, which
  follows the DPO paper's reference code; TRL ignores label smoothing for sigmoid and length-normalises ipo.
  Every other TRL loss type, alone or combined, is TRL's own.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer, SFTTrainer
from trl.models.utils import disable_gradient_checkpointing

from . import logger, refcache
from .losses import LOSS_TYPES, preference_loss
from .models import TRAINABLE, keep_trainable_fp32, reference_mode

_NOT_MODEL_INPUTS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class _StackedAdapters:
    frozen_adapters: list[str] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keep_trainable_fp32(self.model)  # TRL casts QLoRA's trainable weights to bf16; see alignkit.models

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.frozen_adapters:
            peft_model = self.accelerator.unwrap_model(model or self.model)
            peft_model.base_model.set_adapter([TRAINABLE, *self.frozen_adapters])
            peft_model.set_requires_grad(self.frozen_adapters, requires_grad=False)


class AlignSFTTrainer(_StackedAdapters, SFTTrainer):
    def __init__(self, *args, frozen_adapters=(), **kwargs):
        self.frozen_adapters = list(frozen_adapters)
        super().__init__(*args, **kwargs)


class AlignDPOTrainer(_StackedAdapters, DPOTrainer):
    def __init__(self, *args, frozen_adapters=(), **kwargs):
        self.frozen_adapters = list(frozen_adapters)  # set first: TRL's __init__ may precompute reference log-probs
        super().__init__(*args, **kwargs)
        peft_model = self.accelerator.unwrap_model(self.model)
        # TRL copies a pre-loaded adapter into a "ref" adapter; our reference pass does not need that copy.
        if "ref" in getattr(peft_model, "peft_config", {}):  # none without PEFT (a LoTA run)
            peft_model.delete_adapter("ref")
            peft_model.base_model.set_adapter([TRAINABLE, *self.frozen_adapters])
            if self.frozen_adapters:
                peft_model.set_requires_grad(self.frozen_adapters, requires_grad=False)
        self.own_loss = set(self.loss_types) <= set(LOSS_TYPES)
        if not self.own_loss:
            if "sigmoid" in self.loss_types and self.label_smoothing > 0:
                raise ValueError(
                    f"label_smoothing (cDPO) with loss_type {self.loss_types}: TRL ignores label smoothing for sigmoid. "
                    "Combine sigmoid with ipo only, or drop --label_smoothing."
                )
            if "ipo" in self.loss_types:
                logger.info("ipo combined with TRL-only losses uses TRL's length-normalised IPO")
        # Reference log-probs always come from compute_ref_log_probs below and ride in the batch.
        self.precompute_ref_logps = True

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # --precompute_ref_log_probs: computed once, or reused from an identical earlier run (alignkit.refcache).
        return refcache.with_ref_logps(self, dataset, batch_size)

    def _reference_mode(self, peft_model):
        return reference_mode(peft_model, self.frozen_adapters)  # alignkit.lota's trainer switches its delta off instead

    def compute_ref_log_probs(self, model, inputs):
        """Summed log-probs of chosen and rejected under the reference: the trained adapter switched off."""
        kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        peft_model = self.accelerator.unwrap_model(self.model)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_mode(peft_model),
            self.accelerator.autocast(),
        ):
            per_token = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
        # Positions outside the completion carry label -100 and so a log-prob of 0: the sum is over the answer.
        logps = per_token[:, -(inputs["completion_mask"].size(1) - 1) :].sum(dim=1)
        return logps.chunk(2, dim=0)  # the batch is [chosen..., rejected...]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "ref_chosen_logps" not in inputs:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
            inputs = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        if not self.own_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        outputs = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
        chosen, rejected = outputs.log_probs[:, -(mask.size(1) - 1) :].sum(dim=1).chunk(2, dim=0)
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            losses, chosen_rewards, rejected_rewards = preference_loss(
                chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], self.beta,
                loss_type, self.label_smoothing if loss_type == "sigmoid" else 0.0,
            )
            loss = loss + weight * losses.mean()
        self._log_rewards(mode, chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())
        return (loss, outputs) if return_outputs else loss

    def _log_rewards(self, mode, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
        # The same metric names as TRL's, so dashboards and the held-out accuracy read the same either way.
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps).mean().item())


def loss_mask_settings(train_on: str, dataset, tokenizer) -> dict:
    """SFTConfig flags that put the loss on completions or assistant turns where the data allows."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    columns = set(dataset.column_names)
    if train_on == "all" or "text" in columns:
        return dict(completion_only_loss=False, assistant_only_loss=False)
    if "completion" in columns:
        return dict(completion_only_loss=True)
    # Conversations: TRL masks non-assistant tokens through {% generation %} markers in the chat template,
    # and swaps in a marked copy of the templates it knows.
    template = getattr(tokenizer, "chat_template", None) or ""
    supported = has_generation_markers(template)
    if not supported:
        try:
            supported = get_training_chat_template(tokenizer) is not None
        except Exception:  # noqa: BLE001 - TRL raises for templates it has no training version of
            supported = False
    if not supported and train_on == "completions":
        raise ValueError(
            "--train_on completions needs a chat template with {% generation %} markers around assistant turns; "
            "pass one with --chat_template FILE, or use --train_on all"
        )
    if not supported:
        logger.info("loss on every token: this chat template has no {% generation %} markers TRL can use")
    return dict(assistant_only_loss=supported)
