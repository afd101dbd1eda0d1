"""Reward models: a sequence-classification head with one output ("score") on the same backbone.

reward.py loads the base with AutoModelForSequenceClassification(num_labels=1): a fresh score head replaces the LM
head. The LoRA adapter (task_type SEQ_CLS) trains the score head in full and saves it with the adapter (PEFT's
modules_to_save), so a reward run folder is an adapter folder like any other. Here: telling a reward model from a
causal LM (`model_kind`, `check_model_kind`, before any weights load), loading the base with its score head, and
the base's LM head beside it for reward.py's logexpwithlm loss (`load_lm_head`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignkit.core.errors import ConfigError
from alignkit.modeling.chain import adapter_config

REWARD, CAUSAL = "reward model", "causal language model"


def model_kind(source: str, revision: str | None = None) -> str | None:
    """REWARD or CAUSAL for a model or adapter folder (or Hub id); None when it cannot be told offline."""
    adapter = adapter_config(source, revision)
    if adapter is not None:
        return REWARD if adapter.get("task_type") == "SEQ_CLS" else CAUSAL
    file = Path(source, "config.json")
    try:
        if file.is_file():
            config = json.loads(file.read_text())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, revision=revision).to_dict()
    except Exception:  # noqa: BLE001 - unreachable or not a model: from_pretrained reports it properly later
        return None
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return REWARD if config.get("num_labels", len(config.get("id2label") or {0: 0})) == 1 else None
    return CAUSAL if architectures else None


# How to judge with a causal LM's text verdicts instead, by the script that asked for a reward model: label.py's
# (and a library caller's) local judge, or rl.py's OpenAI-compatible one (rl.py has no --judge).
JUDGE_ADVICE = {"label.py": "to judge with this model's text verdicts use --judge hf --judge_model {source}",
                "rl.py": "to reward with this model's text verdicts serve it at an OpenAI-compatible endpoint and use "
                         "--reward judge --judge_base_url URL --judge_model NAME"}


def check_model_kind(source: str, revision: str | None, reward: bool, for_training: bool = False,
                     script: str = "label.py") -> None:
    """A reward model where a causal LM is needed (or the reverse) fails here, saying what to pass instead;
    `script`: whose flags the advice names (JUDGE_ADVICE)."""
    kind = model_kind(source, revision)
    if reward and kind == CAUSAL and not for_training:
        raise ConfigError(
            f"{source} is a causal language model (no reward score head), not a reward model. Pass a reward.py run "
            f"folder (or its merged/ folder) as rm:FOLDER; {JUDGE_ADVICE[script].format(source=source)}; to get a "
            "reward model from it, train one: " + (
                f"python merge.py --adapter_dir {source}, then python reward.py --model_id {source}/merged (reward.py "
                "trains on a whole model)" if adapter_config(source, revision) is not None else
                f"python reward.py --model_id {source}")
        )
    if not reward and kind == REWARD:
        raise ConfigError(
            f"{source} is a reward model (a score head, no language-model head): it scores answers but cannot "
            "generate or be fine-tuned as a policy. Pass it as rm:" + source + " (label.py --judge, rl.py --reward, "
            "or alignkit.feedback.rewards.load('rm:" + source + "')), and pass a causal language model (an SFT/DPO "
            "run folder, a Hub id) as the generator or --model_id"
        )
    if reward and for_training and adapter_config(source, revision) is not None:
        what = "a reward model's adapter" if kind == REWARD else "a LoRA adapter"
        raise ConfigError(
            f"{source} is {what}: reward.py trains a fresh adapter and score head on a full model. Merge it first "
            f"(python merge.py --adapter_dir {source}) and pass --model_id {Path(source, 'merged')}"
        )


def check_reward_family(config) -> None:
    """A family transformers has no sequence-classification class for (OLMoE in transformers 5) cannot carry a score
    head: refused in one line before the weights load (from_pretrained raised a ValueError listing ~150 classes)."""
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES or \
            "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {}):  # its own code's class
        return
    raise ConfigError(f"a reward model needs a sequence-classification head, and transformers {__version__} has none "
                      f"for {config.model_type} models (no AutoModelForSequenceClassification class): train the reward "
                      "model on another family, or reward with a judge instead (rl.py --reward judge or python:, "
                      "label.py --judge hf or python:)")


def load_reward_base(base_id: str, kwargs: dict, config=None):
    """The base as AutoModelForSequenceClassification with one output; the LM head's weights are not loaded.
    `config`: its config, checked first (check_reward_family)."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    if config is not None:
        check_reward_family(config)

    # A causal LM's checkpoint has lm_head.weight and no score.weight: both expected, so not warned about.
    with suppress_seqcls_warning():
        return AutoModelForSequenceClassification.from_pretrained(base_id, num_labels=1, **kwargs)


def load_lm_head(base_id: str, model, revision: str | None = None) -> torch.nn.Module:
    """The base's LM head, frozen, beside a reward model (for the LM term of reward.py's logexpwithlm loss).

    Only that one tensor is read from the checkpoint; with tied embeddings it is the input embedding matrix.
    """
    backbone_config = model.config.get_text_config()
    embeddings = model.get_input_embeddings().weight
    head = torch.nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False, device=embeddings.device,
                           dtype=embeddings.dtype if embeddings.is_floating_point() else torch.float32)
    if getattr(backbone_config, "tie_word_embeddings", False):
        head.weight = embeddings
    else:
        from safetensors import safe_open
        from transformers.utils import cached_file

        index = cached_file(base_id, "model.safetensors.index.json", revision=revision,
                            _raise_exceptions_for_missing_entries=False)
        shard = json.loads(Path(index).read_text())["weight_map"]["lm_head.weight"] if index else "model.safetensors"
        with safe_open(cached_file(base_id, shard, revision=revision), framework="pt") as f:
            weight = f.get_tensor("lm_head.weight")
        if weight.shape[0] < head.weight.shape[0]:  # the tokenizer added a pad token: its row stays zero
            weight = torch.cat([weight, weight.new_zeros(head.weight.shape[0] - weight.shape[0], weight.shape[1])])
        head.weight = torch.nn.Parameter(weight.to(head.weight.device, head.weight.dtype))
    head.requires_grad_(False)
    return head
