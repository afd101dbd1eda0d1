"""The tables of TRL's and the alignment-handbook's names that alignkit.core.trl_names reads settings with.

- ALIASES: TRL's name for a setting alignkit has under its own, with the conversion of its value;
- NOT_APPLIED: keys that cannot apply, each with the value that is alignkit's behaviour anyway and the reason;
  DROPPED: an older TRL's fields; CUTS: how each TRL config cuts a long sequence, said in their reasons;
- REFUSED: TRL fields that cannot act because alignkit loads the model itself, refused when the settings are read;
  REFUSED_IN: those of some TRL configs only (TR-DPO's in dpo.py and kto.py); `refusal` says why for either;
- the names that mark a TRL command line or a TRL/handbook recipe, and TRL field types alignkit reads specially.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from alignkit.core.args import _FALSE, _TRUE, ConfigError
from alignkit.core.secrets import TOKEN_SETTINGS

DTYPE_SYNONYMS = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}  # TRL's
SKIP = object()  # an alias's value that leaves alignkit's setting as it is


def _bool(value, where) -> bool:
    text = str(value).strip().lower()
    if text not in _TRUE | _FALSE:
        raise ConfigError(f"invalid value for {where}: {value!r} is not a boolean (true/false)")
    return text in _TRUE


@dataclasses.dataclass(frozen=True)
class Alias:
    """TRL's `name` for alignkit's `target`; `convert(value, where)` gives the target's value (or SKIP)."""

    target: str
    convert: typing.Callable | None = None
    kind: type = str  # how a command line reads it: bool flags need no value
    note: str = ""
    everywhere: bool = False  # read by every training script, with the target or without (use_peft: always true)


def _on(value_if_true, value_if_false):
    """A TRL boolean that picks one of alignkit's choices. Its false value never replaces what another key of the
    same layer chose (`load_in_4bit: false` beside `load_in_8bit: true` is 8-bit)."""
    return lambda v, where: value_if_true if _bool(v, where) else _Weak(value_if_false)


@dataclasses.dataclass(frozen=True)
class _Weak:
    value: str


def _model_dtype(value):
    """TRL's torch_dtype: null (the recipes' `torch_dtype: null`) leaves --dtype alone, auto gives way to bf16/fp16,
    a dtype is the model's and wins over them (`translate`) in either order."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return SKIP
    return _Weak("auto") if str(value).strip().lower() == "auto" else value


def _use_peft(value, where):
    if not _bool(value, where):
        raise ConfigError(f"{where} false asks for full fine-tuning; alignkit trains adapters only. "
                          "Keep use_peft true (LoRA), pass --adapter lota to sft.py or dpo.py for a sparse full-rank "
                          "delta, or use TRL's own trainers for full fine-tuning")
    return SKIP


def _template_file(value, where):
    """TRL's chat_template_path: a Jinja file is --chat_template's; a tokenizer's folder or Hub id TRL also takes."""
    text = str(value)
    if value is None or text.strip().lower() in ("", "none", "null"):  # a TRL config dump's null: no template
        return SKIP
    if "{{" in text or "{%" in text or Path(text).is_file():
        return text
    raise ConfigError(f"invalid value for {where}: {text!r} is no Jinja template file; alignkit sets the template "
                      "from a file (--chat_template FILE): for a tokenizer's, pass its chat_template.jinja")


def _resume(value, where):
    """TrainingArguments' resume_from_checkpoint: true is --resume true (the run folder's last checkpoint); a path
    names one checkpoint, which alignkit does not pick: refused, naming the way."""
    text = str(value).strip()
    if text.lower() in _TRUE:
        return "true"
    if text.lower() in _FALSE | {"", "none", "null"}:
        return SKIP
    raise ConfigError(f"invalid value for {where}: {text!r}: alignkit resumes a run from its folder's last checkpoint "
                      "(--resume true, as resume_from_checkpoint true): point --output_dir/--run_name at that run "
                      "and pass --resume true (an earlier checkpoint: delete the later ones first)")


ALIASES = {
    "model_name_or_path": Alias("model_id"),
    "model_revision": Alias("revision"),
    "torch_dtype": Alias("dtype", lambda v, w: _model_dtype(v), note="null and auto: --dtype auto"),
    "dataset_name": Alias("dataset_id"),
    "dataset_train_split": Alias("dataset_split"),
    "hub_model_id": Alias("hub_repo_id"),
    "hub_private_repo": Alias("hub_public", lambda v, w: not _bool(v, w), bool),
    "beta": Alias("dpo_beta"),
    "max_seq_length": Alias("max_length", note="TRL < 0.20's SFTConfig name"),
    "load_in_4bit": Alias("quantization", _on("4bit", "none"), bool, "true: --quantization 4bit; false: none"),
    "load_in_8bit": Alias("quantization", _on("8bit", "none"), bool, "true: --quantization 8bit; false: none"),
    "bf16": Alias("dtype", _on("bf16", "fp32"), bool, "true: --dtype bf16; false: fp32"),
    "fp16": Alias("dtype", _on("fp16", "fp32"), bool, "true: --dtype fp16; false: fp32"),
    "use_liger_kernel": Alias("use_liger", lambda v, w: "true" if _bool(v, w) else "false", bool,
                              "alignkit's loader applies the kernels"),
    # SFTConfig/RewardConfig's template, passed through, reached TRL beside alignkit's tokenizer: a traceback after
    # the model loaded, and the row checks and --train_on auto read another template than the one trained on.
    "chat_template_path": Alias("chat_template", _template_file, note="a Jinja template file"),
    # The handbook's older ModelArguments/DataArguments names
    "use_flash_attention_2": Alias("attn_implementation", _on("flash_attention_2", "sdpa"), bool,
                                   "the handbook's: true: --attn_implementation flash_attention_2; false: sdpa"),
    "text_column": Alias("dataset_text_field", note="the handbook's name"),  # other scripts: NOT_APPLIED
    "use_peft": Alias("adapter", _use_peft, bool,
                      "alignkit always trains an adapter; required with TRL's names, false is refused", True),
    # GRPOConfig/RLOOConfig's switch, passed through, overrode rl.py's backend choice: a traceback without vLLM.
    "use_vllm": Alias("backend", _on("vllm", "transformers"), bool, "true: --backend vllm; false: transformers"),
    # Listed as not applied, a `--resume_from_checkpoint true` line went on with --resume auto's choice.
    "resume_from_checkpoint": Alias("resume", _resume, note="true: --resume true; a checkpoint's path is refused"),
}
# Names that mean TRL's vocabulary on a command line: with them, --output_dir is the run's own folder, use_peft is
# needed, the model loads unquantized and no share is held out unless asked, as in TRL (trl_names.Vocabulary.finish).
_TRL_ONLY = {"model_name_or_path", "dataset_name"}
# The handbook's DataArguments name before TRL's; transformers' name for eval_strategy before 4.46 (older recipes).
_RENAMED = {"preprocessing_num_workers": "dataset_num_proc", "evaluation_strategy": "eval_strategy"}
# Values an older TRL took that TRL names otherwise now, read as the new one in one line: packing_strategy ffd (TRL <
# 0.21, the handbook's smollm3 SFT recipe) was best-fit decreasing already, renamed bfd; TRL renames bfd-requeue itself.
_RENAMED_VALUES = {"packing_strategy": {"ffd": "bfd", "bfd-requeue": "bfd_split"}}
# A recipe in TRL's or the handbook's names: they name the model and the data so (alignkit's own say model_id).
_TRL_RECIPE_NAMES = _TRL_ONLY | {"dataset_mixer", "datasets"}

_ANY = object()
# key: (the value, or a tuple of values, that is alignkit's behaviour anyway, or _ANY: never applied, or a function of
# the script's TRL config names giving the value; the reason and what to use instead)
NOT_APPLIED = {
    "max_prompt_length": (_ANY, "TRL 1.x dropped it: max_length bounds prompt and answer together (sft.py, dpo.py, "
                                "kto.py, reward.py); GRPO and RLOO keep the prompt whole and stop the answer at "
                                "max_completion_length"),
    "overwrite_output_dir": (_ANY, "a run never overwrites: an earlier run in the folder is moved aside to "
                                   "NAME.previous-TIME, and --resume false starts over"),
    "hub_strategy": (_ANY, "alignkit pushes once, at the end, with a model card and without secrets: "
                           "--push_to_hub"),
    "hub_model_revision": ("main", "the handbook's branch to push to; alignkit pushes to the repo's main branch"),
    "dataset_streaming": (False, "alignkit reads and checks every row before training; use --max_samples"),
    "ignore_bias_buffers": (False, "not needed: LoRA runs have no buffers to sync"),
    # The script's own task type given is no news (reward.py's SEQ_CLS, TRL's reward script's): said only otherwise
    "lora_task_type": (lambda configs: "SEQ_CLS" if "RewardConfig" in configs else "CAUSAL_LM",
                       "set by the script: CAUSAL_LM, or SEQ_CLS in reward.py"),
    "lora_target_parameters": (None, "not supported; use --lora_target_modules"),
    "bnb_4bit_quant_storage": (_ANY, "chosen by the loader: the compute dtype under FSDP"),
    "use_liger_loss": (False, "TRL 1.x dropped GRPO's fused Liger loss; --use_liger is Liger's layer kernels (auto: "
                              "on CUDA when installed)"),
    # The handbook's older DataArguments and its configs' wandb fields
    "text_column": ("text", "the handbook's text column for continued pretraining; this script reads no text "
                            "column (sft.py: --dataset_text_field)"),
    "auto_insert_empty_system_msg": (False, "the handbook's empty system turn: alignkit renders each row's messages "
                                            "as they are; add the system turn to the data where the template needs "
                                            "one"),
    "truncation_side": ((None, "right"), "TRL 1.x cuts a sequence longer than max_length by the trainer's own rule, "
                                         "not the tokenizer's side: {cut}"),
    "wandb_entity": (None, "set WANDB_ENTITY in the environment or .env (wandb reads it; --wandb_project names the "
                           "project)"),
    "wandb_run_group": (None, "set WANDB_RUN_GROUP in the environment or .env (wandb reads it)"),
    "liger_kernel_config": (_ANY, "the loader applies Liger's layer kernels itself (--use_liger), with its fused "
                                  "cross-entropy off: TRL's loss replaces it"),
}
# SFTConfig's dataset_kwargs keys other than skip_prepare_dataset (TRL 1.x reads no other): TRL < 0.20's tokenizer and
# packing arguments, which the handbook's smollm and zephyr-7b-gemma SFT recipes still set. Named as not applied.
DATASET_KWARGS_GONE = ("TRL 1.x reads only skip_prepare_dataset from it, not {keys}: a conversation is tokenized by "
                       "its chat template alone (no second BOS), and packing adds no token between rows")
# Fields of older TRL configs that TRL 1.x dropped, where a script's TRL config has no field of that name (GRPO and
# RLOO keep max_completion_length): (refused, why). Refused where dropping it changes what trains; named otherwise.
DROPPED = {
    "rpo_alpha": (True, "TRL 1.x dropped it: RPO is DPO plus an NLL term on the chosen answers, "
                        "use --loss_type sigmoid,sft --loss_weights 1,ALPHA"),
    "reference_free": (True, "TRL 1.x dropped it; the reference-free losses are --loss_type simpo or orpo"),
    "max_completion_length": (False, "TRL 1.x dropped it for this trainer: max_length bounds prompt and answer "
                                     "together ({cut})"),
    "truncation_mode": (False, "{cut}"),  # TRL 0.x's KTOConfig had it
    "generate_during_eval": (False, "TRL 1.x dropped it; evaluate.py vibes shows a model's answers"),
    "force_use_ref_model": (False, "alignkit's reference is the model with the trained adapter off: no second model "
                                   "is loaded"),
    "ref_model_init_kwargs": (False, "no reference model is loaded: the reference is the model with the trained "
                                     "adapter off"),
    "use_logits_to_keep": (False, "TRL 1.x dropped it"),
}
# How each TRL config cuts a sequence longer than max_length (TRL 1.16: SFTConfig and DPOConfig have truncation_mode;
# KTOTrainer's collator keeps the start and its data filter drops a row whose prompt alone fills max_length;
# RewardTrainer drops a pair over max_length; GRPO and RLOO have no max_length), for "{cut}" in the reasons above.
_TRUNCATION_MODE = ("--truncation_mode says which end is cut: keep_start, its default, cuts the end (right); TRL's "
                    "deprecated --truncation_mode keep_end cuts the start (left)")
CUTS = {"SFTConfig": _TRUNCATION_MODE, "DPOConfig": _TRUNCATION_MODE,
        "KTOConfig": "KTOConfig has no truncation_mode: KTO always cuts the end (right), and drops a row whose prompt "
                     "alone is max_length tokens or more",
        "RewardConfig": "RewardConfig has no truncation_mode: a pair whose prompt + an answer is longer than "
                        "max_length is dropped, not cut",
        "GRPOConfig": "GRPOConfig and RLOOConfig have no max_length or truncation_mode: the prompt is kept whole and "
                      "the answer stops at --max_completion_length"}
CUTS["RLOOConfig"] = CUTS["GRPOConfig"]


def for_configs(reason: str, config_names) -> str:
    """A NOT_APPLIED or DROPPED reason as said in a script running `config_names`: "{cut}" is how its trainer
    cuts a sequence."""
    cut = next((CUTS[c] for c in config_names if c in CUTS), _TRUNCATION_MODE)
    return reason.replace("{cut}", cut)


# TRL fields that cannot act because alignkit loads the model itself: refused when the settings are read, in every
# script, rather than taken into a TRL config that never reads them (sft.py, reward.py) or refused after the load.
REFUSED = {"reward_model_name_or_path": "rl.py takes a reward.py model as --reward rm:FOLDER",
           "reward_funcs": "rl.py takes rewards as --reward, comma separated: rule, judge, rm:FOLDER or "
                           "python:module:function (python:trl.rewards.accuracy_reward works)",
           "model_init_kwargs": "alignkit loads the model itself; use --dtype, --quantization, --attn_implementation, "
                                "--revision",
           # GRPOTrainer's own arguments for agent training: not supported, named rather than "unknown setting"
           "tools": "rl.py runs no tools while it samples (TRL's GRPOTrainer(tools=...)); tool calls already in the "
                    "data are kept and rendered by the chat template",
           "environment_factory": "rl.py runs no environments (TRL's GRPOTrainer(environment_factory=...)); score "
                                  "completions with --reward python:module:function",
           # the handbook's: TRL's scripts have none (a tokenizer with other tokens trains another model)
           "tokenizer_name_or_path": "alignkit loads the tokenizer saved with the model (--model_id): save the "
                                     "tokenizer into the model's folder, or pass its template as --chat_template FILE",
           # TrainingArguments keeps it in every checkpoint's training_args.bin, and wandb records the command line
           **TOKEN_SETTINGS}
_TR_DPO = "TR-DPO moves the reference, which TRL does not support with a PEFT adapter"
# Fields of some TRL configs that cannot act in the scripts running them: (those configs, TRL's default, why), refused
# when the settings are read at any other value, rather than after the model and data load (dpo.py, kto.py). rl.py
# (GRPOConfig, RLOOConfig) refuses its own with its reason (alignkit.core.train_settings).
REFUSED_IN = {"sync_ref_model": (("DPOConfig", "KTOConfig"), False, _TR_DPO),
              "ref_model_mixup_alpha": (("DPOConfig", "KTOConfig"), 0.6, f"it tunes sync_ref_model: {_TR_DPO}"),
              "ref_model_sync_steps": (("DPOConfig", "KTOConfig"), 512, f"it tunes sync_ref_model: {_TR_DPO}"),
              # TRL's DPOTrainer turns it off itself after the load ("temporarily unavailable"); a saved config said
              # it was on.
              "padding_free": (("DPOConfig",), False, "TRL's DPOTrainer turns it off (\"temporarily unavailable\"): "
                                                      "dpo.py pads each batch, and --prefix_sharing puts a pair's "
                                                      "prompt in once"),
              # transformers' label smoother runs in Trainer.compute_loss, which these trainers replace.
              "label_smoothing_factor": (("DPOConfig", "KTOConfig", "RewardConfig", "GRPOConfig", "RLOOConfig"), 0.0,
                                         "transformers' label smoother never runs in TRL's preference, reward and RL "
                                         "trainers (their losses are their own); DPO's label smoothing (cDPO, robust) "
                                         "is --label_smoothing")}


def refusal(name: str, value, config_names) -> str | None:
    """Why TRL's field `name` at `value` (as TRL types it) is refused in a script running `config_names`, or None."""
    if name in REFUSED:
        return REFUSED[name]
    configs, default, why = REFUSED_IN.get(name, ((), None, ""))
    return why if set(configs) & set(config_names) and value != default else None


_MODEL_AND_SCRIPT = ("ModelConfig", "ScriptArguments")
# TRL str fields that also take a bool, which TRL's __post_init__ turns into a word (GRPOConfig: "True or group",
# "False or none"); the type hint alone says str, and "false" reached TRL as a word it refuses.
_BOOL_WORDS = {"scale_rewards": {True: "group", False: "none"}}
# TrainingArguments' `dict | str` fields whose str is only JSON text (fsdp_config's and deepspeed's name a file).
_MAPPINGS = {"gradient_checkpointing_kwargs": '{"use_reentrant": false}', "lr_scheduler_kwargs": '{"min_lr": 1e-6}'}
# TRL's behaviour for alignkit settings that have no field of the same name there, for --help (a TRL command line
# that leaves them out trains differently).
# Defaults that read differently from TRL's but mean the same where alignkit uses them (revision none is the main
# branch; no test split is read unless asked; the held-out share is settled by trl_names.Vocabulary.finish).
_SAME_MEANING = {"revision", "dataset_test_split", "eval_split"}
# One dataset's settings that a dataset_mixture names for each of its datasets, and the values that still mean
# something beside it (TRL's scripts read the mixture's "train" and "test" rows): the first, what it goes back to
# when an earlier layer's dataset goes (trl_names), any other refused (alignkit.core.mixture.check_beside_mixture).
BESIDE_MIXTURE = {"dataset_split": ("train",), "dataset_config": (None,), "dataset_test_split": (None, "test", "auto")}
# What a dataset mixture names itself, per dataset (its splits, configurations): a single dataset's defaults do not
# apply beside one, and the defaults line leaves them out.
_MIXTURE_HAS_ITS_OWN = set(BESIDE_MIXTURE)
_TRL_DEFAULTS_UNDER_OTHER_NAMES = {  # field: (TRL's value, as --help says it)
    "warmup_ratio": (0.0, "0 (warmup_steps 0)"),
    "eval_split": (0.0, "0 (no rows held out)"),
    "group_by_length": ("false", "false (train_sampling_strategy random)"),
}
# TRL's defaults of None that mean a library's own choice, said in words (ModelConfig.lora_target_modules None: PEFT's
# per-model default), where alignkit's differs: the defaults line and --help name them as the others.
_TRL_NONE_DEFAULTS = {"lora_target_modules": ("none", "PEFT's per-model default (q_proj,v_proj for Llama)")}
