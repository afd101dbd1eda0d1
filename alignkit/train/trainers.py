"""TRL's trainers with what alignkit adds: stacked adapters, an explicit reference pass, the paper's losses.

- Stacked adapters: a run that starts from an adapter (an SFT adapter under DPO) keeps it loaded, frozen and
  active, and trains a fresh adapter on top. After a resume, transformers re-activates only the first adapter,
  so `_load_from_checkpoint` turns the frozen ones back on. A run over a LoTA delta names its `--model_id` in
  each checkpoint (`CheckpointBase`), so a checkpoint loads with the delta.
- A row the chat template refuses (`raise_exception`) fails TRL's dataset map: it is named in one line
  (alignkit.modeling.template_rows).
- The DPO reference pass (`compute_ref_log_probs`) is the policy with the trained adapter off and the frozen
  ones on: the base model, or base + SFT adapter. No second copy of the model is loaded. Its log-probs reach
  TRL's loss through the batch, exactly as TRL's own `precompute_ref_log_probs` does.
- `loss_type` sigmoid (with cDPO label smoothing) and ipo go to `alignkit.train.losses.preference_loss`, which
  follows the DPO paper's reference code; TRL ignores label smoothing for sigmoid and length-normalises ipo.
  Every other TRL loss type, alone or combined, is TRL's own.
- `loss_type` simpo and orpo (`alignkit.train.losses.reference_free_loss`) read length-normalised policy
  log-probs only: no reference pass runs at all (none per step, none precomputed, no reference cache), so a
  step is one forward and one backward. Prefix sharing applies to the policy pass as for DPO.
- One helper (`answer_forward`, over `alignkit.train.losses.answer_logps`) sums the answer log-probs for the reference
  and for alignkit's policy pass, with TRL's ld_alpha weighting in both; TRL's own policy pass uses the same
  formula in the same op order. The other DPOConfig settings (use_weighting, f_divergence_type, the MoE
  router aux loss) act on alignkit's losses as on TRL's; those that cannot act here are refused by name
  (`check_dpo_config`), so nothing passed through --trainer_overrides is dropped or half-applied.
- Prefix sharing (`alignkit.train.prefix`, on by default, `--prefix_sharing false` turns it off): `answer_forward`
  packs each pair into one row, prompt once, chosen and rejected behind a block attention mask, and unpacks
  the per-token log-probs to the unshared layout, so every sum, weight and loss downstream is unchanged. The
  mask keeps the model's sliding windows and comes in the form its attention takes (`prefix.sharing_path`: a
  dense mask for sdpa/eager, a FlexAttention block mask for flex_attention); where none can be passed
  (flash_attention_2) or the model is a mixture of experts, it stays off. The log says which, once. Loss types TRL computes (e.g. `sigmoid,sft`) share too: TRL's loss gets a
  stand-in for the model (`_SharedCall`) whose fused forward runs on the packed pairs and returns the unpacked
  per-token outputs, so TRL's sums, weights and metrics read what they would read without sharing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DPOConfig, DPOTrainer, SFTTrainer
from trl.models.utils import disable_gradient_checkpointing

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.journal import write_atomic
from alignkit.modeling import template_rows
from alignkit.modeling.chain import checkpoint_frozen
from alignkit.modeling.models import TRAINABLE, keep_trainable_fp32, reference_mode
from alignkit.train import prefix, refcache
from alignkit.train.resuming import EndsAtMaxSteps
from alignkit.train.losses import (
    answer_logps, check_label_smoothing, check_loss_types, check_weighting, is_own_loss, is_reference_free,
    mean_answer_logps,
    preference_loss, reference_free_loss,
)

_NOT_MODEL_INPUTS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class CheckpointBase(TrainerCallback):
    """A run over a LoTA delta: each checkpoint-N names the run's `--model_id` as its base, as the finished run does.

    PEFT records the bare base in a checkpoint's adapter_config.json, and a stacked run's frozen adapters beside it
    (alignkit.modeling.chain.checkpoint_frozen), but a delta added into the weights is in neither: the checkpoint
    loaded, merged or evaluated as base + LoRA, another model than the one training. Under DDP and ZeRO-2 the
    main process rewrites each checkpoint's config (test_launch_real); FSDP's checkpoints hold its sharded state,
    no adapter files, so there is nothing to rewrite; ZeRO-3 refuses a delta before loading (lota_delta).
    """

    def __init__(self, source: str, revision: str | None):
        self.source, self.revision = source, revision

    @classmethod
    def attach(cls, trainer) -> None:
        wanted = getattr(trainer.accelerator.unwrap_model(trainer.model), "alignkit_checkpoint_base", None)
        if wanted:
            trainer.add_callback(cls(*wanted))

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        file = folder / "adapter_config.json"
        if state.is_world_process_zero and file.is_file():
            config = json.loads(file.read_text())
            local = Path(self.source).exists()
            config["base_model_name_or_path"] = str(Path(self.source).resolve()) if local else self.source
            config["revision"] = None if local else self.revision
            write_atomic(file, json.dumps(config, indent=2))  # a kill here leaves the old config, never half
            for frozen in checkpoint_frozen(str(folder)):  # the chain of --model_id holds them already
                shutil.rmtree(frozen)
            from alignkit.core.card import write_card

            write_card(folder)  # the card written with the checkpoint named the bare base


class _StackedAdapters:
    frozen_adapters: list[str] = []

    def __init__(self, *args, **kwargs):
        data = {"the training data": kwargs.get("train_dataset"), "the held-out data": kwargs.get("eval_dataset")}
        with template_rows.refused(kwargs.get("processing_class"), data):
            super().__init__(*args, **kwargs)
        keep_trainable_fp32(self.model, self.args)  # TRL casts QLoRA adapters to bf16: alignkit.modeling.models
        CheckpointBase.attach(self)

    def _choose_reference(self, frozen_adapters, reference_adapters: int | None) -> None:
        """The adapters the model was loaded with (frozen), and the first `reference_adapters` of them that the
        reference keeps on (default: all: the model the run starts from; 0: the bare base). Called before TRL's
        __init__, which may precompute reference log-probs."""
        self.frozen_adapters = list(frozen_adapters)
        keep = len(self.frozen_adapters) if reference_adapters is None else reference_adapters
        if not 0 <= keep <= len(self.frozen_adapters):
            raise ConfigError(f"--reference_adapters {keep}: the model was loaded with {len(self.frozen_adapters)} "
                              "adapters; pass a number from 0 (the bare base) to that")
        self.reference_adapters = self.frozen_adapters[:keep]

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.frozen_adapters:
            peft_model = self.accelerator.unwrap_model(model or self.model)
            peft_model.base_model.set_adapter([TRAINABLE, *self.frozen_adapters])
            peft_model.set_requires_grad(self.frozen_adapters, requires_grad=False)


class _LengthGrouped:
    """`--group_by_length`: alignkit.train.training's seeded sampler over each row's length (`example_lengths`), for
    training and evaluation alike (transformers groups both under that strategy, by an `input_ids` column that a
    DPO dataset does not have)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return self._grouped(dataset, self.args.per_device_train_batch_size) or super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        return self._grouped(eval_dataset, self.args.per_device_eval_batch_size) or super()._get_eval_sampler(eval_dataset)

    def _grouped(self, dataset, batch_size):
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None or not hasattr(dataset, "__len__"):
            return None
        from alignkit.train.sampling import length_grouped_sampler

        return length_grouped_sampler(self.example_lengths(dataset), batch_size, self.args)

    def example_lengths(self, dataset) -> list[int]:
        return [len(ids) for ids in dataset["input_ids"]]


class AlignSFTTrainer(_LengthGrouped, _StackedAdapters, EndsAtMaxSteps, SFTTrainer):
    def __init__(self, *args, frozen_adapters=(), **kwargs):
        self.frozen_adapters = list(frozen_adapters)
        kwargs = trl_arguments(SFTTrainer, args, kwargs)
        config = kwargs.get("args")
        packing = bool(getattr(config, "packing", False))
        eval_packing = getattr(config, "eval_packing", None)
        # Packed rows are joined into fewer sequences: their count says nothing of rows dropped (it warned that
        # half the rows were dropped where they were only packed).
        given = (None if packing else row_count(kwargs.get("train_dataset")),
                 None if (packing if eval_packing is None else eval_packing) else row_count(kwargs.get("eval_dataset")))
        super().__init__(**kwargs)
        # TRL drops the rows whose loss mask is empty after truncation (a prompt that fills --max_length)
        check_kept(self, given, "the prompt leaves no token of the answer to learn", "rows")


# DPOConfig fields that cannot act here, with the fix: alignkit passes a loaded PEFT model and computes the
# reference itself (no separate reference model to sync). Any non-default value is refused by name.
_REFUSED = {
    "model_init_kwargs": "alignkit loads the model itself; use --dtype, --quantization, --attn_implementation, --revision",
    "trust_remote_code": "alignkit loads the model itself; use --trust_remote_code",
    "sync_ref_model": "TR-DPO moves the reference, which TRL does not support with a PEFT adapter",
    "ref_model_mixup_alpha": "it tunes sync_ref_model (TR-DPO), which TRL does not support with a PEFT adapter",
    "ref_model_sync_steps": "it tunes sync_ref_model (TR-DPO), which TRL does not support with a PEFT adapter",
}
# Fields that only one loss setting reads: set without it, TRL ignores them silently.
_ONLY_WITH = {
    "discopop_tau": (lambda a: "discopop" in a.loss_type, "it applies to --loss_type discopop only"),
    "f_alpha_divergence_coef": (
        lambda a: a.f_divergence_type == "alpha_divergence", "it applies to f_divergence_type alpha_divergence only"
    ),
}


def check_dpo_config(args) -> None:
    """Refuse DPOConfig settings (e.g. from --trainer_overrides) that would be dropped or half-applied.

    Every other field takes effect on both loss paths, and where it touches the summed log-probs (ld_alpha) in the
    policy and the reference pass alike: ld_alpha, use_weighting (WPO), f_divergence_type, router_aux_loss_coef
    (MoE), label_smoothing (where the loss reads it), precompute_ref_batch_size, max_length, padding.
    """
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(DPOConfig) if f.name in {*_REFUSED, *_ONLY_WITH}}
    for name, why in _REFUSED.items():
        if getattr(args, name) != defaults[name]:
            raise ConfigError(f"trainer override {name}={getattr(args, name)!r} has no effect in alignkit: {why}; drop it")
    for name, (applies, why) in _ONLY_WITH.items():
        if getattr(args, name) != defaults[name] and not applies(args):
            raise ConfigError(f"trainer override {name}={getattr(args, name)!r} has no effect: {why}; drop it")
    check_label_smoothing(args.label_smoothing, args.loss_type)  # again: --trainer_overrides may set either
    check_loss_types(args.loss_type)
    check_weighting(args.use_weighting, args.loss_type)
    if is_reference_free(args.loss_type):
        name = ",".join(args.loss_type)
        for field, value, default in (("precompute_ref_log_probs", args.precompute_ref_log_probs, False),
                                      ("precompute_ref_batch_size", args.precompute_ref_batch_size, None),
                                      ("f_divergence_type", args.f_divergence_type, "reverse_kl"),
                                      ("ld_alpha", args.ld_alpha, None)):
            if value != default:
                raise ConfigError(f"{field}={value!r} has no effect with --loss_type {name}: it reads no reference "
                                  "model and length-normalises the log-probs; drop it")
    if "ipo" in args.loss_type and not is_own_loss(args.loss_type):
        logger.warning(
            f"loss_type {','.join(args.loss_type)}: combined with TRL-only losses, ipo is TRL's length-normalised IPO "
            "(log-ratios divided by the answer length), not the paper's summed form; use --loss_type ipo alone for that"
        )


def keep_lora_dropout(model) -> None:
    """The trained adapter's LoRA dropout back on after TRL's disable_dropout zeroed every nn.Dropout: DPO turns
    the model's own dropout off (the policy and its reference must see the same network), but --lora_dropout
    regularises only the update and the reference pass runs with the trained adapter off."""
    config = getattr(model, "peft_config", {}).get(TRAINABLE)
    p = getattr(config, "lora_dropout", 0.0) or 0.0
    for module in model.modules() if p else ():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict) and TRAINABLE in dropout and isinstance(
                dropout[TRAINABLE], torch.nn.Dropout):
            dropout[TRAINABLE].p = p


def trl_arguments(trl_class, args: tuple, kwargs: dict) -> dict:
    """A TRL trainer's arguments all by name, those given by position too (train_dataset and eval_dataset are
    several TRL trainers' 4th-6th): read from kwargs alone, positional data went unchecked (no count of the rows
    --max_length drops, no bad row named) or clashed with the one passed on."""
    import inspect

    signature = inspect.signature(trl_class.__init__)
    named = {}
    for name, value in signature.bind(None, *args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif name != next(iter(signature.parameters)):  # self
            named[name] = value
    return named


def row_count(dataset) -> int | None:
    """A dataset's rows, or None for one without a length (iterable) or a dict of several."""
    return len(dataset) if dataset is not None and hasattr(dataset, "__len__") and not isinstance(dataset, dict) \
        else None


def check_kept(trainer, given: tuple[int | None, int | None], because: str, unit: str = "pairs") -> None:
    """TRL drops the rows that do not fit --max_length while it tokenizes them, without a word (DPO: a prompt
    that leaves no room for an answer; reward: an answer longer than max_length; SFT: a prompt that leaves no
    answer token): say how many, and stop where none is left (it was an IndexError or a sampler's ValueError when
    training started)."""
    m = trainer.args.max_length
    for split, before, dataset in (("training", given[0], trainer.train_dataset),
                                   ("held-out", given[1], trainer.eval_dataset)):
        kept = row_count(dataset)
        if before is None or kept is None or kept == before:
            continue
        if kept == 0:
            raise ConfigError(f"--max_length {m}: {because} in every one of the {before} {split} {unit}, so TRL "
                              "drops them all; raise --max_length")
        logger.warning(f"{before - kept} of {before} {split} {unit} dropped: {because} (--max_length {m}); raise "
                       "--max_length to keep them")


class AlignDPOTrainer(_LengthGrouped, _StackedAdapters, EndsAtMaxSteps, DPOTrainer):
    def __init__(self, model, ref_model=None, args=None, *rest, frozen_adapters=(), reference_adapters=None,
                 prefix_sharing=True, simpo_gamma=0.5, cpo_alpha=0.0, **kwargs):
        if ref_model is not None:
            raise ValueError("AlignDPOTrainer computes the reference from the model itself; pass no ref_model")
        kwargs = trl_arguments(DPOTrainer, (model, None, args, *rest), kwargs)
        args = kwargs["args"] = kwargs.get("args") or DPOConfig(output_dir="trainer_output")  # TRL's default, checked
        check_dpo_config(args)  # before TRL tokenizes the data
        self._choose_reference(frozen_adapters, reference_adapters)
        self.prefix_sharing = prefix_sharing and self._prefix_sharing_available(model)
        given = (row_count(kwargs.get("train_dataset")), row_count(kwargs.get("eval_dataset")))
        super().__init__(**kwargs)
        if args.truncation_mode == "keep_start":  # TRL's filter (keep_end truncates the prompt instead)
            check_kept(self, given, "the prompt alone is at least that many tokens")
        peft_model = self.accelerator.unwrap_model(self.model)
        # TRL copies a pre-loaded adapter into a "ref" adapter; our reference pass does not need that copy.
        if "ref" in getattr(peft_model, "peft_config", {}):  # none without PEFT (a LoTA run)
            peft_model.delete_adapter("ref")
            peft_model.base_model.set_adapter([TRAINABLE, *self.frozen_adapters])
            if self.frozen_adapters:
                peft_model.set_requires_grad(self.frozen_adapters, requires_grad=False)
        keep_lora_dropout(peft_model)
        self.own_loss = is_own_loss(self.loss_types)
        self.reference_free = is_reference_free(self.loss_types)
        self.simpo_gamma, self.cpo_alpha = simpo_gamma, cpo_alpha
        # Reference log-probs always come from compute_ref_log_probs below and ride in the batch (simpo and orpo: none).
        self.precompute_ref_logps = not self.reference_free

    def example_lengths(self, dataset) -> list[int]:
        """Tokens a pair costs: prompt + chosen + rejected packed (prefix sharing), else two rows of prompt + the
        longer answer (the batch is padded to it)."""
        columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        if self.prefix_sharing:
            return [len(p) + len(c) + len(r) for p, c, r in columns]
        return [len(p) + max(len(c), len(r)) for p, c, r in columns]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # --precompute_ref_log_probs: computed once, or reused from an identical earlier run (alignkit.train.refcache).
        return refcache.with_ref_logps(self, dataset, batch_size)

    def _reference_mode(self, peft_model):
        return reference_mode(peft_model, self.frozen_adapters, self.reference_adapters)  # alignkit.train.lota's trainer switches its delta off instead

    @staticmethod
    def _prefix_sharing_available(model) -> bool:
        return prefix.choose(model).kind != prefix.OFF  # logs the path (sdpa-mask, flex or off) and why

    def answer_forward(self, model, inputs, **model_kwargs):
        """One forward pass and the summed answer log-probs of every row (`alignkit.train.losses.answer_logps`, with
        ld_alpha). The reference and alignkit's policy pass both go through here, so they are computed alike.

        With prefix sharing, the pass runs on the packed pairs (`alignkit.train.prefix.pack_pairs`) and the per-token
        outputs come back in the unshared [chosen..., rejected...] layout, so everything after is the same code."""
        if getattr(self, "prefix_sharing", False) and prefix.can_pack(inputs):
            return self._shared_forward(model, inputs, **model_kwargs)
        kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        # Positions outside the completion carry label -100 and so a log-prob of 0: the sum is over the answer.
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True, **model_kwargs)
        return outputs, answer_logps(outputs.log_probs, inputs["completion_mask"], self.ld_alpha)

    def _shared_forward(self, model, inputs, **model_kwargs):
        config = self.accelerator.unwrap_model(self.model).config
        packed = prefix.pack_pairs(
            inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
            attn_implementation=config._attn_implementation, dtype=self._mask_dtype(), config=config,
        )
        outputs = model(**packed.model_inputs(), use_cache=False, labels=None, shift_labels=packed.shift_labels,
                        fused_lm_head=True, **model_kwargs)
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
            value = getattr(outputs, name, None)
            if value is not None:
                setattr(outputs, name, packed.unpack(value))
        return outputs, answer_logps(outputs.log_probs, inputs["completion_mask"], self.ld_alpha)

    def _mask_dtype(self) -> torch.dtype:
        # The additive (eager) mask must not overflow in the dtype the attention scores are computed in.
        if self.args.bf16:
            return torch.bfloat16
        if self.args.fp16:
            return torch.float16
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def compute_ref_log_probs(self, model, inputs):
        """Summed log-probs of chosen and rejected under the reference: the trained adapter switched off."""
        peft_model = self.accelerator.unwrap_model(self.model)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_mode(peft_model),
            self.accelerator.autocast(),
        ):
            _, logps = self.answer_forward(model, inputs)
        return logps.chunk(2, dim=0)  # the batch is [chosen..., rejected...]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.reference_free:
            return self._reference_free_loss(model, inputs, return_outputs)
        if "ref_chosen_logps" not in inputs:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
            inputs = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        if not self.own_loss:
            shared = self.prefix_sharing and prefix.can_pack(inputs)
            caller = _SharedCall(self, model, inputs) if shared else model
            return super().compute_loss(caller, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        # MoE: the router logits give TRL's load-balancing loss, weighted by router_aux_loss_coef (as TRL does).
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs, logps = self.answer_forward(model, inputs, **router)
        chosen, rejected = logps.chunk(2, dim=0)
        weights = self._wpo_weights(outputs, inputs["completion_mask"]) if self.use_weighting else 1.0
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            losses, chosen_rewards, rejected_rewards = preference_loss(
                chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], self.beta,
                loss_type, self.label_smoothing if loss_type == "sigmoid" else 0.0,
                self.f_divergence_type, self.f_alpha_divergence_coef,
            )
            loss = loss + weight * (losses * weights).mean()
        loss = self._with_aux_loss(loss, outputs, mode)
        self._log_rewards(mode, chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())
        return (loss, outputs) if return_outputs else loss

    def _reference_free_loss(self, model, inputs, return_outputs):
        """simpo or orpo: the policy pass alone (prefix-shared where possible), on length-normalised log-probs."""
        mode = "train" if self.model.training else "eval"
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs, _ = self.answer_forward(model, inputs, **router)
        chosen, rejected = mean_answer_logps(outputs.log_probs, inputs["completion_mask"]).chunk(2, dim=0)
        weights = self._wpo_weights(outputs, inputs["completion_mask"]) if self.use_weighting else 1.0
        losses, chosen_rewards, rejected_rewards = reference_free_loss(
            chosen, rejected, self.beta, self.loss_types[0], self.simpo_gamma, self.cpo_alpha, self.label_smoothing,
        )
        loss = self.loss_weights[0] * (losses * weights).mean()
        loss = self._with_aux_loss(loss, outputs, mode)
        self._log_rewards(mode, chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())
        return (loss, outputs) if return_outputs else loss

    def _with_aux_loss(self, loss, outputs, mode):
        if not self.aux_loss_enabled:
            return loss
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        return loss + self.router_aux_loss_coef * outputs.aux_loss

    @staticmethod
    def _wpo_weights(outputs, completion_mask):
        """WPO (Zhou et al. 2024), as TRL computes it: w = exp(mean over the answer of log p - log sum p^2) per
        answer, no gradient; each pair's loss is scaled by w_chosen * w_rejected."""
        mask = completion_mask[..., 1:]
        with torch.no_grad():
            aligned = (outputs.log_probs - outputs.log_sum_sq_probs)[:, -mask.size(1) :] * mask
        w_chosen, w_rejected = torch.exp(aligned.sum(dim=1) / mask.sum(dim=1).clamp_min(1)).chunk(2, dim=0)
        return w_chosen * w_rejected

    def _log_rewards(self, mode, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
        # The same metric names as TRL's, so dashboards and the held-out accuracy read the same either way. One entry
        # per pair, not per batch: TRL's log averages the entries, and a mean of batch means counted a short last
        # batch's pairs over (the held-out reward accuracy; as reward.py's, the review of session 32).
        gather = self.accelerator.gather_for_metrics  # the last batch's padding repeats under a launch: dropped
        metrics = self._metrics[mode]
        for name, values in (("rewards/chosen", chosen_rewards), ("rewards/rejected", rejected_rewards),
                             ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
                             # alignkit's own: the share of pairs whose rewards tie, which the accuracy counts as lost
                             ("rewards/ties", (chosen_rewards == rejected_rewards).float()),
                             ("rewards/margins", chosen_rewards - rejected_rewards), ("logps/chosen", chosen_logps),
                             ("logps/rejected", rejected_logps)):
            metrics[name].extend(gather(values.detach().float()).tolist())


class _SharedCall:
    """The model as TRL's DPO loss calls it: its fused forward (`fused_lm_head=True`, over the whole batch) runs
    on the packed pairs (`AlignDPOTrainer._shared_forward`, the reference pass's own path), any other call on the
    model itself."""

    def __init__(self, trainer, model, inputs):
        self.trainer, self.model, self.inputs = trainer, model, inputs

    def __call__(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head or args:
            return self.model(*args, fused_lm_head=fused_lm_head, **kwargs)
        # TRL's labels are input_ids outside the completion masked, what pack_pairs derives from the same batch.
        extra = {k: kwargs[k] for k in ("output_router_logits",) if k in kwargs}
        outputs, _ = self.trainer._shared_forward(self.model, self.inputs, **extra)
        return outputs
