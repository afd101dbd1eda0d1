"""Rewards from anywhere behind one callable, and a reward model as label.py's judge.

`load("rm:FOLDER")` returns `reward(prompts, answers) -> list[float]`: `prompts[i]` is a list of role/content
messages (the turns before the answer) and `answers[i]` the answer's text. Training code (online RL) calls it
without caring where a reward comes from. FOLDER is a reward.py run folder (base + LoRA adapter + score head)
or a merged reward model.

A reward model scores a conversation by its score head on the last token: r(x, y) = w . h_T(x ⊕ y), a real
number whose differences, not values, mean something (Bradley-Terry: P(y1 ≻ y2 | x) = σ(r(x, y1) − r(x, y2))).

`RMJudge` is `label.py --judge rm:RUN_FOLDER`: one forward pass per answer, batched, so there is no order bias
to average out and no both-orders pass. A pair's verdict is A when r_A − r_B > --rm_tie_margin, B when
r_B − r_A > --rm_tie_margin, else a tie; the labeled rows carry both scores.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.core.args import ConfigError
from alignkit.feedback.judge import TOKENS, Judge, Request, folder_fingerprint

PREFIX = "rm:"


def score(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16,
          max_length: int | None = None) -> list[float]:
    """The reward of each whole conversation (prompt turns + the assistant's answer), in the caller's order.

    Tokenized exactly as TRL's RewardTrainer tokenizes training pairs (the chat template, tokenize=True), right
    padded; a conversation longer than max_length keeps its last max_length tokens (the score reads the end).
    """
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
    if max_length:
        ids = [i[-max_length:] for i in ids]
    order = sorted(range(len(ids)), key=lambda n: -len(ids[n]))  # similar lengths share a batch: less padding
    out = [0.0] * len(ids)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
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


class RewardModel:
    """A loaded reward model as a callable: reward(prompts, answers) -> one float per answer."""

    def __init__(self, folder: str, batch_size: int = 16, max_length: int | None = None, settings=None):
        from alignkit.core.config import ModelSettings, loader_settings
        from alignkit.modeling.models import load_model

        if not Path(folder).exists() and folder.count("/") != 1:
            raise ConfigError(f"{PREFIX}{folder}: no such folder; pass a reward.py run folder (or its merged/ "
                              "folder), e.g. rm:runs/tiny-reward")
        # A score head needs no chat template of the generators', nor Liger's fused LM-head loss.
        model_settings = loader_settings(settings or ModelSettings(), folder, chat_template=None, use_liger="false")
        self.folder, self.batch_size, self.max_length = folder, batch_size, max_length
        self.loaded = load_model(model_settings, reward=True)

    def __call__(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers: pass one prompt per answer")
        conversations = [[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
        return score(self.loaded.model, self.loaded.tokenizer, conversations, self.batch_size, self.max_length)


def load(spec: str, **kwargs) -> Callable[[list[list[dict]], list[str]], list[float]]:
    """The reward function named by `spec`: `rm:FOLDER` (a reward.py run folder or a merged reward model)."""
    if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
        raise ConfigError(f"reward {spec!r}: expected rm:FOLDER, a reward.py run folder or its merged/ folder")
    return RewardModel(spec[len(PREFIX):], **kwargs)


# ---------------------------------------------------------------------------------------------------------
# The judge

_SCORES = re.compile(r"reward A: (\S+), reward B: (\S+)")


class RMJudge(Judge):
    """label.py's `--judge rm:RUN_FOLDER`: scores each answer once; the verdict follows the score difference."""

    kind = "rm"
    batched = True
    one_pass = True  # symmetric by construction: labeling asks for one order only

    def __init__(self, spec: str, settings, tie_margin: float = 0.0, batch_size: int = 16):
        super().__init__(spec, None)
        self.folder, self.settings, self.tie_margin, self.batch_size = spec[len(PREFIX):], settings, tie_margin, batch_size
        if not self.folder:
            raise ConfigError(f"--judge {spec!r}: expected rm:RUN_FOLDER, a reward.py run folder")
        from alignkit.modeling.models import REWARD, model_kind

        kind = model_kind(self.folder)
        if kind != REWARD:  # fail before any generation, with the loader's message for a causal LM
            from alignkit.modeling.models import check_model_kind

            if not Path(self.folder).exists():
                raise ConfigError(f"--judge {spec}: no such folder; pass a reward.py run folder, e.g. rm:runs/tiny-reward")
            check_model_kind(self.folder, None, reward=True)
        self.reward: RewardModel | None = None

    def identity(self) -> dict:
        return {**super().identity(), "files": folder_fingerprint(self.folder), "tie_margin": self.tie_margin}

    def judge_batch(self, requests: list[Request]) -> list[str]:
        if self.reward is None:
            self.reward = RewardModel(self.folder, self.batch_size, settings=self.settings)
        # One pass per distinct (prompt, answer) in the batch: both answers of every pair, each scored once.
        wanted = list(dict.fromkeys((r.question, a) for r in requests for a in (r.answer_a, r.answer_b)))
        found = dict(zip(wanted, self.reward([[{"role": "user", "content": q}] for q, _ in wanted],
                                             [a for _, a in wanted])))
        return [self.verdict(found[(r.question, r.answer_a)], found[(r.question, r.answer_b)]) for r in requests]

    def verdict(self, a: float, b: float) -> str:
        """Text holding both scores and the verdict token, as cached and parsed by label.py."""
        winner = "A" if a - b > self.tie_margin else "B" if b - a > self.tie_margin else "tie"
        return f"reward A: {a:.6g}, reward B: {b:.6g} {TOKENS[winner]}"

    def label_fields(self, texts: dict[str, str], chosen_slot: dict[str, str]) -> dict:
        """The two scores for a labeled row, from any one judgment text (order -> text; order -> "A"/"B")."""
        order, text = next(iter(texts.items()))
        found = _SCORES.search(text or "")
        if not found:
            return {}
        a, b = float(found.group(1)), float(found.group(2))
        chosen, rejected = (a, b) if chosen_slot[order] == "A" else (b, a)
        return {"chosen_score": chosen, "rejected_score": rejected}
