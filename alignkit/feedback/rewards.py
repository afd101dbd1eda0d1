"""Rewards from anywhere behind one callable, and a reward model as label.py's judge.

`load("rm:FOLDER")` returns `reward(prompts, answers) -> list[float]`: `prompts[i]` is a list of role/content
messages (the turns before the answer) and `answers[i]` the answer's text. Training code (online RL) calls it
without caring where a reward comes from. FOLDER is a reward.py run folder (base + LoRA adapter + score head)
or a merged reward model.

A reward model scores a conversation by its score head on the last token: r(x, y) = w . h_T(x ⊕ y), a real
number whose differences, not values, mean something (Bradley-Terry: P(y1 ≻ y2 | x) = σ(r(x, y1) − r(x, y2))).

label.py's `--judge rm:RUN_FOLDER` (alignkit.feedback.judge.RMJudge) scores answers through `RewardModel`.

A reward model is scored as it was trained. reward.py records its rows' format in metrics.json (`reward_rows`,
carried into merged folders), and every run in its alignkit_config.json when training starts (`data_rows`, for a
checkpoint-N or a run that stopped early): one trained on conversations scores a conversation through the chat template; one
trained on TRL's standard rows (texts) scores the prompt's text followed by the answer, with no template, even
when the tokenizer has one (through the template it would score inputs it never saw). One trained with QLoRA
(its run records its base loaded in 4-bit, `loaded_as`) scores over that base rounded to its 4-bit format (NF4 with
double quantization unless the run asked otherwise) and dequantized, the weights its adapter and score head trained
over, wherever the caller loads in full precision (`over_4bit_base`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.core.args import ConfigError
from alignkit.modeling.template_rows import refusing

PREFIX = "rm:"
ROWS_KEY = "reward_rows"  # metrics.json: "text" (TRL's standard rows) or "conversations"
LENGTH_KEY = "trained_max_length"  # metrics.json: its --max_length (TRL's RewardTrainer dropped longer pairs)
QUANTIZATION_KEY = "trained_quantization"  # metrics.json: how its base was loaded ("4bit": QLoRA, in the format
# its bnb_4bit_quant_type and use_bnb_nested_quant keys say, alignkit.core.run_records.FOUR_BIT_FIELDS)


def _record(folder: str) -> dict:
    """The reward model's metrics.json (reward.py writes it; merge.py carries it; a push uploads it): its own, or
    for a Hub repo (owner/repo) as the loader sees it; {} when there is none (or offline and not cached)."""
    import json

    from alignkit.core.journal import read_json

    if not Path(folder).is_dir() and folder.count("/") == 1:
        try:
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(folder, "metrics.json")).read_text())
        except Exception:  # noqa: BLE001 - none uploaded, or offline and not cached: no record
            return {}
    return read_json(Path(folder, "metrics.json"))


def trained_on_text(folder: str) -> bool:
    """Whether the reward model in `folder` (or Hub repo) was trained on texts, as its run recorded it: metrics.json
    (reward.py writes it at the end; merge.py carries it over; a push uploads it), else the run's
    alignkit_config.json (`data_rows`, written when training starts): a run stopped before the end, a checkpoint-N
    inside it, a merge of one. A model without a record (one not trained by reward.py, an older run) counts as
    conversational."""
    from alignkit.core.run_records import run_config

    if (recorded := _record(folder).get(ROWS_KEY)) is not None:
        return recorded == "text"
    return run_config(folder).get("data_rows") == "text"  # a checkpoint-N's: its run's


def token_ids(tokenizer, conversations: list[list[dict] | str],
              template_kwargs: dict | None = None) -> list[list[int]]:
    """Each conversation's tokens as TRL's RewardTrainer tokenizes a pair's answer (`score`'s docstring says how)."""
    ids = []
    for c in conversations:
        if isinstance(c, str):
            eos = tokenizer.eos_token or ""
            ids.append(tokenizer(text=c if c.endswith(eos) else c + eos)["input_ids"])
            continue
        with refusing(c, "an answer to score"):  # a template's refusal names the conversation in one line
            ids.append(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True,
                                                     **(template_kwargs or {}))["input_ids"])
    return ids


def score(model, tokenizer, conversations: list[list[dict] | str], batch_size: int = 16,
          max_length: int | None = None, template_kwargs: dict | None = None,
          longer: Callable[[list[int]], None] | None = None) -> list[float]:
    """The reward of each whole conversation (prompt turns + the assistant's answer), in the caller's order.

    Tokenized exactly as TRL's RewardTrainer tokenizes training pairs (the chat template, tokenize=True; a text,
    TRL's standard format: the text itself, ending with the eos token), right padded; a conversation longer than
    max_length keeps its last max_length tokens (the score reads the end). `template_kwargs` go to the chat
    template (rl.py: GRPOConfig's chat_template_kwargs, as TRL renders a reward model's conversations).
    `longer` gets the tokenized lengths, before any truncation (RewardModel says where they pass its training's).
    """
    ids = token_ids(tokenizer, conversations, template_kwargs)
    if longer is not None:
        longer([len(i) for i in ids])
    return score_ids(model, tokenizer.pad_token_id, ids, batch_size, max_length)


def score_ids(model, pad: int, ids: list[list[int]], batch_size: int = 16,
              max_length: int | None = None) -> list[float]:
    """`score` of conversations already tokenized (reward.py's held-out report: TRL's RewardTrainer's own tokens of
    the pairs it kept), `pad` the tokenizer's pad_token_id."""
    if max_length:
        ids = [i[-max_length:] for i in ids]
    order = sorted(range(len(ids)), key=lambda n: -len(ids[n]))  # similar lengths share a batch: less padding
    out = [0.0] * len(ids)
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(ids[n]) for n in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, n in enumerate(chunk):
                input_ids[row, :len(ids[n])] = torch.tensor(ids[n])
                mask[row, :len(ids[n])] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for row, n in enumerate(chunk):
                out[n] = float(logits[row, 0].float())
    return out


def trained_length(folder: str) -> int | None:
    """The --max_length a reward model trained at (its metrics.json, which a merge and a push carry; a run's
    settings for runs before the record), None where unknown or unlimited."""
    from alignkit.core.run_records import run_config

    said = _record(folder).get(LENGTH_KEY)
    if said is None and Path(folder).is_dir():
        said = run_config(folder).get("max_length")
    return said if isinstance(said, int) and not isinstance(said, bool) else None


def reward_loader_settings(folder: str, settings=None):
    """How a reward model in `folder` is loaded, given the caller's loader settings (dtype, quantization, ...):
    a score head needs no chat template of the generators', nor Liger's fused LM-head loss. Its cache keys
    describe these settings (alignkit.modeling.identity)."""
    from alignkit.core.config import GenerationSettings, ModelSettings, loader_settings

    settings = settings or ModelSettings()
    # The generators' chat template arguments are theirs: a reward model's scoring gets its own (rl.py's trainer
    # hands GRPOConfig's to it per call, alignkit.train.rl_rewards).
    own = {"chat_template_kwargs": {}} if isinstance(settings, GenerationSettings) else {}
    return loader_settings(settings, folder, chat_template=None, use_liger="false", **own)


def over_4bit_base(folder: str, loader) -> dict | None:
    """The 4-bit format (alignkit.core.run_records.trained_four_bit: NF4 with double quantization, unless its run
    asked for another) of the base the reward model in `folder` scores over, rounded to it and dequantized; None
    when it scores over the base as the caller loads it. A format when its run trained it with QLoRA (its base
    loaded in 4-bit: alignkit.core.run_records.trained_quantization, or metrics.json's trained_quantization for a
    copy without the run's settings, a Hub push) and the caller loads in full precision (--quantization auto or
    none, as inference does): its adapter and score head were trained over those weights, not the full-precision
    base's. --quantization 4bit loads 4-bit weights as the caller's format says; 8bit is the caller's choice. A merged
    reward model holds its weights already."""
    from alignkit.core.run_records import trained_four_bit, trained_quantization

    if loader.quantization not in ("auto", "none"):
        return None
    record = {}  # its metrics.json, read where its run's settings do not tell
    if Path(folder).is_dir():  # its run's record (a checkpoint-N's: its run's), else its metrics.json (a copy)
        over = Path(folder, "adapter_config.json").is_file() and \
            (trained_quantization(folder) or (record := _record(folder)).get(QUANTIZATION_KEY)) == "4bit"
    elif folder.count("/") == 1 and (record := _record(folder)).get(QUANTIZATION_KEY) == "4bit":  # a Hub adapter
        from alignkit.modeling.chain import resolve

        over = bool(resolve(folder, None).adapters)
    else:
        over = False
    return trained_four_bit(folder, record) if over else None


def _trained_as(folder: str) -> str | None:
    """How the reward model in `folder` was trained, as its scores hold: "none" (full precision: a merged model's
    saved weights too, whatever its run loaded), "4bit" or "8bit" (its run's record, else its metrics.json); None
    where neither tells (a Hub model without a record: nothing to say)."""
    from alignkit.core.run_records import trained_quantization

    if Path(folder, "merge.json").is_file():
        return "none"
    said = trained_quantization(folder) if Path(folder).is_dir() else None
    return said or _record(folder).get(QUANTIZATION_KEY)


class RewardModel:
    """A loaded reward model as a callable: reward(prompts, answers) -> one float per answer."""

    def __init__(self, folder: str, batch_size: int = 16, max_length: int | None = None, settings=None):
        from alignkit.modeling.models import load_model

        if not Path(folder).exists() and folder.count("/") != 1:
            raise ConfigError(f"{PREFIX}{folder}: no such folder; pass a reward.py run folder (or its merged/ "
                              "folder), e.g. rm:runs/tiny-reward")
        self.folder, self.batch_size, self.max_length = folder, batch_size, max_length
        self.text = trained_on_text(folder)
        self.trained_length, self._said_longer = trained_length(folder), False
        loader = reward_loader_settings(folder, settings)
        # Scored as it trained: a QLoRA reward model over its base rounded to its 4-bit format, in the compute dtype.
        if (four_bit := over_4bit_base(folder, loader)) is not None:
            import dataclasses

            from alignkit import logger
            from alignkit.core.launch import FourBit

            loader = dataclasses.replace(loader, **four_bit)
            logger.info(f"{PREFIX}{folder} was trained with QLoRA: it scores over its base rounded to "
                        f"{FourBit.of(loader)} and dequantized, the weights it trained over (--quantization 4bit "
                        "keeps them in 4-bit)")
        elif loader.quantization in ("4bit", "8bit") and (trained := _trained_as(folder)) not in (
                None, loader.quantization):
            from alignkit import logger

            over = "in full precision" if trained == "none" else f"over a {trained[0]}-bit base"
            logger.info(f"{PREFIX}{folder}: loaded in {loader.quantization[0]}-bit, as --quantization "
                        f"{loader.quantization} asks (to fit beside the policy), though it trained {over}: its scores "
                        "differ from its training's a little; --quantization auto scores it as it trained")
        self.loaded = load_model(loader, reward=True, dequantize=four_bit is not None)
        if not self.text and not getattr(self.loaded.tokenizer, "chat_template", None):  # score() would fail
            raise ConfigError(f"{PREFIX}{folder} has no chat template, and its run does not record text rows "
                              f"(metrics.json {ROWS_KEY}, or data_rows in its run's alignkit_config.json). Retrain it "
                              "with this reward.py (which records them), on "
                              "conversational rows, or on a model with a chat template")

    def __call__(self, prompts: list[list[dict]] | list[str], answers: list[str],
                 template_kwargs: dict | None = None) -> list[float]:
        """One reward per answer to its prompt: a conversation (role/content messages), or a text, one user turn
        (as label.py and rl.py send a prompt written as text; it was read letter by letter as messages)."""
        if isinstance(prompts, str) or isinstance(answers, str):
            raise ValueError("pass lists: reward(prompts, answers), one prompt (a text or a conversation) per answer")
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers: pass one prompt per answer")
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        answers = [_answer_text(a) for a in answers]  # one assistant message (a preference row's form) as its text
        if self.text:  # as TRL's RewardTrainer joined its standard rows: the prompt's text, then the answer
            inputs = [self.text_of(p) + a for p, a in zip(prompts, answers)]
        else:
            inputs = [[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
        return score(self.loaded.model, self.loaded.tokenizer, inputs, self.batch_size, self.max_length,
                     template_kwargs, longer=self._say_longer)

    def _say_longer(self, lengths: list[int]) -> None:
        """One line, the first time answers pass the length the reward model trained at (TRL's RewardTrainer drops
        longer pairs): scored whole all the same, at lengths it never saw (a RewardModel(max_length=N) keeps the
        last N tokens instead)."""
        scored = [min(n, self.max_length or n) for n in lengths]  # as score() truncates
        if self._said_longer or not self.trained_length or not (over := [n for n in scored
                                                                         if n > self.trained_length]):
            return
        from alignkit import logger
        from alignkit.core.launch import process_rank

        self._said_longer = True
        if process_rank() == 0:  # a warning reaches the log from every rank: rl.py under DDP said it per process
            logger.warning(f"{PREFIX}{self.folder} trained on sequences of up to {self.trained_length} tokens "
                           f"(--max_length); {len(over)} of {len(lengths)} scored here are longer (up to "
                           f"{max(over)}), scored at lengths it never saw: retrain it with a larger --max_length to "
                           "trust those scores (said once)")

    def text_of(self, prompt: list[dict]) -> str:
        return text_of(self.folder, prompt)


def _answer_text(answer) -> str:
    """An answer's text: as given, or the content of the one assistant message a preference row holds (scored as
    the dict it was, inside the assistant turn, it got a number and no error)."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict) and \
            answer[0].get("role") == "assistant" and isinstance(answer[0].get("content"), str):
        return answer[0]["content"]
    raise ValueError(f"an answer must be its text, or one assistant message; got {type(answer).__name__} "
                     f"({answer!r:.60})")


def text_of(folder: str, prompt: list[dict]) -> str:
    """A prompt's text, for the reward model in `folder` trained on texts: one user turn; more is refused in one
    line."""
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    from alignkit.core.errors import UserError
    from alignkit.modeling.template_rows import _which

    raise UserError(f"{PREFIX}{folder} was trained on text rows (a prompt's text, then the answer), so it scores "
                    f"prompts written as text; {_which(prompt)} has {len(prompt)} turns. Judge such prompts with a "
                    "reward model trained on conversations")


def load(spec: str, **kwargs) -> Callable[[list[list[dict]], list[str]], list[float]]:
    """The reward function named by `spec`: `rm:FOLDER` (a reward.py run folder or a merged reward model)."""
    if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
        raise ConfigError(f"reward {spec!r}: expected rm:FOLDER, a reward.py run folder or its merged/ folder")
    return RewardModel(spec[len(PREFIX):], **kwargs)
