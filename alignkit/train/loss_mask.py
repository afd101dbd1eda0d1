"""sft.py's loss mask, TRL's end tokens and the chat template, checked against the rows and the tokenizer before
the model loads.

- `check_loss_mask`: a loss mask the rows or the chat template cannot give (--train_on completions on plain text,
  TRL's assistant_only_loss on rows that are no conversation or under a template without {% generation %}
  markers), refused in one line; a TRL setting these rows leave without effect (completion_only_loss on
  conversations, eos_token where the template ends the turns), said. Each of these was TRL's traceback after the
  model loaded, or nothing at all.
- `check_chat_template`: tool calls under a chat template that drops them, refused in one line for every training
  script (sft.py through check_loss_mask; dpo.py, kto.py, reward.py and rl.py as their data is read): alignkit's
  refusal came after the model loaded.
- `check_end_tokens`: TRL's eos_token and pad_token outside the vocabulary, refused for every script that takes
  them (alignkit.train.training.preflight; rlaif.py on its starting model), from the tokenizer alone.
- `loss_mask_settings`: the SFTConfig flags that put the loss on completions or assistant turns where the data
  allows (--train_on); `loss_on`: what the loss then covers, which the run records (alignkit_config.json's loss_on).

The tokenizer is read here only where a check needs it (a tokenizer is cheap; the model is not), as the loader
reads it (alignkit.modeling.models.load_tokenizer, with --chat_template).
"""

from __future__ import annotations

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.saved_settings import note_not_applied

_COVERED = "_alignkit_loss_on"  # beside the settings' fields, as saved_settings keeps the keys not applied


def _data_name(s) -> str:
    return "the dataset mixture" if getattr(s, "dataset_mixture", None) else s.dataset_id


def _template_name(s) -> str:
    """The chat template this run trains with, as the user gave it."""
    given = getattr(s, "chat_template", None)
    if not given:
        return f"{s.model_id}'s chat template"
    if "{{" in given or "{%" in given:
        return "the chat template given inline (--chat_template, or a recipe's chat_template)"
    return f"the chat template --chat_template {given}"


def _tokenizer(s, model_id: str | None = None):
    """The tokenizer the run trains with, read as the loader reads it; None where it cannot be read apart from the
    model (a GGUF source, converted with the model) or fails to read: the model's load then says why."""
    from alignkit.core.groups import chat_template_text
    from alignkit.modeling.models import load_tokenizer, resolve, tokenizer_source

    if getattr(s, "chat_template", None):
        chat_template_text(s.chat_template)  # a missing or broken template: the loader's own line
    if getattr(s, "gguf_file", None) or str(s.model_id).endswith(".gguf"):
        return None
    try:
        chain = resolve(model_id or s.model_id, s.revision)
        if str(chain.base).endswith(".gguf"):
            return None
        return load_tokenizer(*tokenizer_source(chain, chain.base, chain.revision), s.trust_remote_code,
                              s.chat_template)
    except Exception:  # noqa: BLE001 - a model not found, custom code: load_model refuses it in its own words
        return None


def _end_tokens(s) -> dict:
    overrides = s.trainer_overrides if isinstance(getattr(s, "trainer_overrides", None), dict) else {}
    return {key: overrides[key] for key in ("eos_token", "pad_token") if overrides.get(key) is not None}


def check_end_tokens(s, tokenizer=None, model_id: str | None = None) -> None:
    """TRL's eos_token and pad_token (SFTConfig, DPOConfig, RewardConfig) outside the vocabulary, refused from the
    tokenizer alone: TRL's traceback once the model had loaded. `model_id`: the model the run trains (rlaif.py's
    starting model), else s.model_id; `tokenizer`: one already read, else read here where a token is given."""
    tokens = _end_tokens(s)
    model_id = model_id or s.model_id
    if not tokens or (tokenizer := tokenizer or _tokenizer(s, model_id)) is None:
        return
    vocab = tokenizer.get_vocab()
    for key, token in tokens.items():  # TRL's own check, once the model had loaded
        if token not in vocab:
            raise ConfigError(f"--{key} {token}: not a token of {model_id}'s tokenizer (TRL refuses it once the "
                              f"model has loaded; its own {key} is {getattr(tokenizer, key)}); pass a token the "
                              f"vocabulary has, or drop --{key}")


def marks_assistant_turns(tokenizer) -> bool:
    """Whether TRL can keep the loss on the assistant's tokens under this tokenizer's chat template: it has
    {% generation %} markers, or TRL knows a marked version of it (SFTTrainer swaps that in)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(getattr(tokenizer, "chat_template", None) or ""):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception:  # noqa: BLE001 - TRL raises for templates it has no training version of
        return False


def check_chat_template(s, dataset, needed: bool = False):
    """The chat template the run trains with, checked against the rows before the model loads: tool calls under one
    that does not render them refused (alignkit.modeling.models.require_chat_template, which also refuses
    conversations under none), from the tokenizer alone. require_chat_template's check after the load stays, for a
    tokenizer that cannot be read apart from the model; until this ran before it, a user waited for the weights
    (minutes on a 7B QLoRA) to be told about the data. The tokenizer is read only where the rows have tool calls, or
    where the caller needs it anyway (`needed`: sft.py's loss mask). Returns it, or None where it was not read or
    cannot be read apart from the model (a GGUF source: the load then says)."""
    from trl.data_utils import is_conversational

    from alignkit.core.message_columns import has_tool_calls
    from alignkit.modeling.models import require_chat_template

    tools = dataset is not None and len(dataset) and is_conversational(dataset[0]) and has_tool_calls(dataset)
    if not (needed or tools) or (tokenizer := _tokenizer(s)) is None:
        return None
    require_chat_template(tokenizer, s.model_id, dataset)
    return tokenizer


def check_loss_mask(s, dataset) -> None:
    """A loss mask the rows cannot have, refused as the data is read (before the model loads): --train_on
    completions and TRL's completion_only_loss on plain text (every token was trained, without a word), TRL's
    assistant_only_loss on rows that are no conversation or under a chat template without {% generation %}
    markers (TRL's tracebacks once the model had loaded), and tool calls under a chat template that does not render
    them (check_chat_template, as every training script checks them). completion_only_loss on conversations and
    eos_token where the chat template ends the turns are said: TRL leaves them without effect on these rows. TRL's
    eos_token and pad_token outside the vocabulary are preflight's (check_end_tokens): the tokenizer is read here
    only for the template."""
    from trl.data_utils import is_conversational

    if dataset is None or not len(dataset):
        return
    overrides = s.trainer_overrides if isinstance(s.trainer_overrides, dict) else {}
    columns = set(dataset.column_names)
    name = _data_name(s)
    rows = "plain text" if "text" in columns else "prompt/completion text" if "completion" in columns else "rows"
    if "text" in columns and s.train_on == "completions":
        raise ConfigError(f"--train_on completions: {name} holds plain text, with no completion apart from its "
                          "prompt; give prompt/completion rows or messages, or pass --train_on all")
    if "text" in columns and overrides.get("completion_only_loss") is True:
        raise ConfigError(f"--completion_only_loss true: {name} holds plain text, with no completion apart from its "
                          "prompt; give prompt/completion rows or messages, or drop --completion_only_loss true")
    conversations = is_conversational(dataset[0])
    if overrides.get("assistant_only_loss") is True and not conversations:
        raise ConfigError(f"--assistant_only_loss true needs conversations (messages): {name} holds {rows}; "
                          "leave it out (--train_on auto puts the loss on a completion where the rows have one)")
    if conversations and "prompt" not in columns and overrides.get("completion_only_loss") is not None:
        # TRL masks by completion_mask, which only prompt/completion rows get: the same losses either way
        note_not_applied(s, {"completion_only_loss": overrides["completion_only_loss"]},
                         f"--completion_only_loss {str(overrides['completion_only_loss']).lower()} not applied: it "
                         f"masks prompt/completion rows, and {name} holds conversations (messages), whose loss mask "
                         "is --train_on's (auto: the assistant turns, where the chat template marks them; all: every "
                         "token) or --assistant_only_loss")
    masked = conversations and (overrides.get("assistant_only_loss") is True or
                                (s.train_on == "completions" and "completion" not in columns
                                 and "assistant_only_loss" not in overrides))
    eos_token = _end_tokens(s).get("eos_token") if conversations else None  # said below if the template ends turns
    if (tokenizer := check_chat_template(s, dataset, needed=masked or eos_token is not None)) is None:
        return
    template = getattr(tokenizer, "chat_template", None) or ""
    if eos_token is not None and "eos_token" not in str(template):
        # TRL appends eos_token to text and completion rows only; a template that renders `eos_token` takes it
        logger.info(f"--eos_token {eos_token}: not added to {name}'s rows, conversations whose turns "
                    f"end as {_template_name(s)} writes them (TRL appends eos_token to plain text and "
                    "completions only); it becomes the saved tokenizer's eos token, the one generation stops at")
    if masked and template and not marks_assistant_turns(tokenizer):
        given = "--assistant_only_loss true" if overrides.get("assistant_only_loss") is True else \
            "--train_on completions"
        drop = "drop --assistant_only_loss true" if given.startswith("--assistant") else "use --train_on all"
        raise ConfigError(f"{given}: {_template_name(s)} has no {{% generation %}} markers around the assistant "
                          "turns (nor is it one TRL has a marked version of), so the assistant's tokens cannot be "
                          f"told apart; pass a template with them as --chat_template FILE, or {drop} (the loss then "
                          "covers every token)")


def loss_mask_settings(s, dataset, tokenizer) -> dict:
    """SFTConfig flags that put the loss on completions or assistant turns where the data allows (--train_on). An
    assistant_only_loss given in TRL's name (--trainer_overrides) is TRL's to apply (check_loss_mask checked it), and
    no template is needed for it. What the loss covers once TRL's names are applied over these flags is kept on `s`
    (`loss_on`) for the run's alignkit_config.json and card: "--train_on auto" alone does not say."""
    overrides = s.trainer_overrides if isinstance(s.trainer_overrides, dict) else {}
    flags = _loss_mask_flags(s.train_on, dataset, tokenizer, overrides)
    final = {**flags, **{k: v for k, v in overrides.items() if k in ("assistant_only_loss", "completion_only_loss")
                         and v is not None}}  # the user's TRL name wins (alignkit.train.training.trl_config)
    completions = "completion" in dataset.column_names and final.get("completion_only_loss") is not False
    object.__setattr__(s, _COVERED, "completions" if completions else "assistant turns"
                       if final.get("assistant_only_loss") else "every token")
    return flags


def loss_on(s) -> str | None:
    """What the loss of the run `s` covers, as loss_mask_settings decided: "completions", "assistant turns" or "every
    token"; None where it did not decide (another script's run)."""
    return getattr(s, _COVERED, None)


def _loss_mask_flags(train_on: str, dataset, tokenizer, overrides: dict) -> dict:
    columns = set(dataset.column_names)
    given = overrides.get("assistant_only_loss")
    if train_on == "all" or "text" in columns:
        return dict(completion_only_loss=False, assistant_only_loss=False)
    if "completion" in columns:
        return dict(completion_only_loss=True)
    # Conversations: TRL masks non-assistant tokens through {% generation %} markers in the chat template,
    # and swaps in a marked copy of the templates it knows.
    supported = marks_assistant_turns(tokenizer)
    if not supported and given is False:  # the user's TRL name wins (alignkit.train.training.trl_config)
        logger.info(f"--train_on {train_on}: loss on every token, as --assistant_only_loss false asks (this chat "
                    "template has no {% generation %} markers TRL can use either)")
        return dict(assistant_only_loss=False)
    if not supported and train_on == "completions":
        raise ConfigError(
            "--train_on completions needs a chat template with {% generation %} markers around assistant turns; "
            "pass one with --chat_template FILE, or use --train_on all"
        )
    if not supported:
        logger.info("loss on every token: this chat template has no {% generation %} markers TRL can use")
    return dict(assistant_only_loss=supported)
