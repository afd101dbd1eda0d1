"""Pairwise judges for AI-feedback labeling: verdicts, the judge kinds, and both-order agreement (the prompts they
are asked with: alignkit.feedback.judge_templates).

A judge sees one prompt and two responses, in slots A and B, and answers with text that ends in one of
FastChat's verdict tokens: [[A]], [[B]], or [[C]] for a tie. Every template here asks for them, so a judge
prompt written for FastChat's llm_judge (judge_prompts.jsonl) works unchanged.

Judges favour a slot (position bias), so by default each pair is judged twice, once in each order, and a pair
is labeled only when both orders name the same winner. A tie, a disagreement or an answer without a verdict is
never turned into a win.

Kinds (`--judge`):
- `openai`: any OpenAI-compatible chat endpoint, through alignkit.core.llm.ChatClient (the official client, with
  its retries and backoff);
- `hf`: a local transformers model, batched;
- `rm:RUN_FOLDER`: a reward.py model scores each answer once (RMJudge, through alignkit.feedback.rewards);
- `python:module:function` or `python:path/to/file.py:function`: `function(prompt, answer_a, answer_b)` returns
  "A", "B", "tie" (or text holding a verdict token), for tasks a rule or a verifier can check.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.code_digest import code_fingerprint
from alignkit.core.errors import UserError
from alignkit.feedback.judge_templates import Template, check_principle, load_template

TOKENS = {"A": "[[A]]", "B": "[[B]]", "tie": "[[C]]"}
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from the LAST verdict token in `text`; None when there is none.

    The last one, because judges often quote the format ("[[A]] if A is better, ...") before they decide.
    """
    found = _VERDICT.findall(text or "")
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]] if found else None


# ---------------------------------------------------------------------------------------------------------
# Requests and judges


@dataclass(frozen=True)
class Request:
    """One judgment to make: `answer_a` is in slot A. `key` names it in the cache."""

    key: str
    question: str
    answer_a: str
    answer_b: str
    messages: list[dict] | None = None  # the prompt's turns as they are (a reward model scores real turns)


def question_text(messages: list[dict]) -> str:
    """The prompt as the judge reads it: the user's text, or a transcript when there are several turns, a turn's
    tool calls written after its text (`[calls weather({"city": "Oslo"})]`) so the judge sees what was asked."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {' '.join(filter(None, [m['content'], _calls(m)]))}"
                        for m in messages)


def _calls(message: dict) -> str:
    import json

    calls = [c.get("function", c) for c in message.get("tool_calls") or () if isinstance(c, dict)]
    return "".join(f"[calls {c.get('name')}({json.dumps(c.get('arguments'), ensure_ascii=False)})]" for c in calls)


class Judge:
    """`judge(request)` -> the judge's raw text; `batched` judges (local models) take `judge_batch(requests)`."""

    kind = ""
    batched = False

    def __init__(self, name: str, template: Template | None):
        self.name, self.template = name, template

    def identity(self) -> dict:
        """Everything but the request that can change this judge's answer: the one description every judgment
        key derives from (label.py's cache). A subclass adds what it owns (endpoint, sampling, weights)."""
        return {"judge": self.key_name(), "template": self.template.fingerprint() if self.template else None}

    def key_name(self) -> str:
        """The judge in its keys: its name, where no identity of its own says more (an endpoint's model name)."""
        return self.name

    def judge(self, request: Request) -> str:
        raise NotImplementedError

    def judge_batch(self, requests: list[Request]) -> list[str]:
        return [self.judge(r) for r in requests]

    def fatal(self, error: Exception) -> bool:
        """True for errors that every further request would hit too (a bad key, an unknown model)."""
        return False

    def usage(self) -> dict | None:
        return None


class OpenAIJudge(Judge):
    kind = "openai"

    def __init__(self, template: Template, client):
        super().__init__(f"openai:{client.model}", template)
        self.client = client  # an alignkit.core.llm.ChatClient (llm.judge_client)

    def identity(self) -> dict:
        # Another server (or --judge_max_tokens, --judge_temperature) answers differently under the same model name.
        return {**super().identity(), **endpoint_identity(self.client)}

    def judge(self, request: Request) -> str:
        return self.client.complete(self.template.messages(request.question, request.answer_a, request.answer_b))

    def fatal(self, error: Exception) -> bool:
        return is_fatal(error)

    def usage(self) -> dict:
        return self.client.usage.as_dict()


def is_fatal(error: Exception) -> bool:
    import openai

    return isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError))


class HFJudge(Judge):
    """A local transformers model as the judge: greedy (or --judge_temperature) batched generation."""

    kind = "hf"
    batched = True

    def __init__(self, model_settings, template: Template, max_tokens=1024, temperature=0.0, batch_size=16):
        super().__init__(f"hf:{model_settings.model_id}", template)
        self.settings, self.max_tokens, self.temperature = model_settings, max_tokens, temperature
        self.batch_size, self.loaded, self._fold = batch_size, None, False

    def identity(self) -> dict:
        # The model as loaded (alignkit.modeling.identity: every loader setting, every file down its adapter
        # chain, the GGUF file, the hardware) and the sampling. Not the batch size: it changes speed, not answers.
        from alignkit.modeling.identity import model_identity

        return {**super().identity(), "model": model_identity(self.settings, "transformers"),
                "max_tokens": self.max_tokens, "temperature": self.temperature}

    def key_name(self) -> str:
        return "hf"  # the model by its identity, not its path: one folder however it is spelled, or moved

    def judge_batch(self, requests: list[Request]) -> list[str]:
        from alignkit.modeling.generation import generate

        if self.loaded is None:
            from alignkit.modeling.models import load_model, require_chat_template

            self.loaded = load_model(self.settings)
            require_chat_template(self.loaded.tokenizer, self.settings.model_id)
            probe = self.template.messages("q", "a", "b")
            try:
                self.loaded.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - some templates (Gemma, Mistral v0.1) refuse a system turn
                self._fold = True
        conversations = []
        for r in requests:
            messages = self.template.messages(r.question, r.answer_a, r.answer_b)
            if self._fold and messages[0]["role"] == "system":
                messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            conversations.append(messages)
        self._check_context(conversations)
        return generate(self.loaded.model, self.loaded.tokenizer, conversations, max_new_tokens=self.max_tokens,
                        temperature=self.temperature, batch_size=self.batch_size)

    _said_context = False

    def _check_context(self, conversations) -> None:
        """Say once when judge prompts (and --judge_max_tokens) exceed the judge model's context: transformers only
        warns of a length, and the judge's answers past it hold no verdict (counted as parse failures)."""
        context = getattr(self.loaded.model.config, "max_position_embeddings", None)
        if self._said_context or not context:
            return
        tokenizer = self.loaded.tokenizer
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if over := sum(n + self.max_tokens > context for n in lengths):
            self._said_context = True
            logger.warning(f"--judge hf: {over} of {len(lengths)} judge prompts (up to {max(lengths)} tokens) with "
                           f"--judge_max_tokens {self.max_tokens} exceed {self.settings.model_id}'s context of "
                           f"{context} tokens: their verdicts will likely be missing (parse failures). Use a judge "
                           "model with a longer context, or a smaller --judge_max_tokens")


class PythonJudge(Judge):
    """`function(prompt, answer_a, answer_b)`: the prompt's text (see question_text) and the two responses."""

    kind = "python"

    def __init__(self, spec: str, flag: str = "--judge"):
        super().__init__(spec, None)
        self.function = _import_function(spec, flag)

    def identity(self) -> dict:
        return {**super().identity(), "code": code_fingerprint(self.function)}  # edit the rule: old verdicts go

    def key_name(self) -> str:
        return function_key_name(self.function)

    said_no_verdict = False

    def judge(self, request: Request) -> str:
        verdict = self.function(request.question, request.answer_a, request.answer_b)
        text = verdict if isinstance(verdict, str) else ""
        exact = {"a": "A", "b": "B", "tie": "tie", "c": "tie"}.get(text.strip().lower())
        if exact:
            return TOKENS[exact]
        if parse_verdict(text) is None and not self.said_no_verdict:  # a parse failure (a rule may abstain): said once
            self.said_no_verdict = True
            shown = repr(verdict[:80]) if isinstance(verdict, str) else repr(verdict)
            logger.warning(f"--judge {self.name}: returned {shown}, which holds no verdict (counted as a parse "
                           "failure); it must return 'A', 'B' or 'tie' (or text holding [[A]], [[B]] or [[C]])")
        return text


def function_key_name(function) -> str:
    """A python: judge or grader in its keys: by what it is, not the path it was named by (its code is in the key)."""
    return f"python:{getattr(function, '__module__', '')}:{getattr(function, '__qualname__', '')}"


def split_spec(spec: str) -> tuple[str, str]:
    """(module or file, function) of `python:MODULE:FUNCTION`, `python:path/to/file.py:FUNCTION` or TRL scripts'
    dotted `python:MODULE.FUNCTION` (trl.rewards.accuracy_reward); either may be empty where the spec lacks it."""
    target = spec.removeprefix("python:")
    module_name, _, function_name = target.rpartition(":")
    if not module_name and not target.endswith(".py"):
        module_name, _, function_name = target.rpartition(".")
    return module_name, function_name


def import_function(spec: str, flag: str = "--judge", contract: str = "") -> object:
    """The function `python:MODULE:FUNCTION` (or `python:MODULE.FUNCTION`, or `python:path/to/file.py:FUNCTION`)
    names, for `flag`
    (--judge here, --reward in rl.py); `contract` says what it must take and return, for the error message."""
    module_name, function_name = split_spec(spec)
    usage = f"{flag} python:MODULE:FUNCTION (or python:path/to/file.py:FUNCTION)"
    if not module_name or not function_name:
        raise ConfigError(f"{flag} {spec!r}: expected {usage}")
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise ConfigError(f"{flag} {spec!r}: no such file {module_name} (a relative path is read from {os.getcwd()})")
    try:
        if module_name.endswith(".py"):
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if file_spec is None:
                raise ImportError(f"cannot load {module_name} as Python")
            # Its folder first on sys.path, as Python puts a script's: a module beside it is the one it imports
            # (and the one its key reads: alignkit.core.code_digest), not another of that name on the path.
            if sys.path[:1] != [folder := str(Path(module_name).resolve().parent)]:
                if folder in sys.path:  # further down, behind another module of the name: first
                    sys.path.remove(folder)
                sys.path.insert(0, folder)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        # The module not found: the spec's form may be wrong. Found, its code failed (a syntax error, an import
        # inside it): that code is what to fix, the form was right.
        name = getattr(e, "name", None) or ""
        if isinstance(e, ModuleNotFoundError) and name and (module_name + ".").startswith(name + "."):
            fix = f"expected {usage}"  # the judge's own module (or a package above it) is not there
        elif isinstance(e, ModuleNotFoundError) and name:
            fix = f"install {name.split('.')[0]} (pip install ...), or fix {module_name}, then run again"
        else:
            fix = f"fix {module_name}, then run again"
        raise ConfigError(f"{flag} {spec!r}: cannot import {module_name} ({type(e).__name__}: {e}); {fix}") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{flag} {spec!r}: {module_name} has no function {function_name!r}{contract}")
    return function


def _import_function(spec: str, flag: str = "--judge"):
    function = import_function(spec, flag)
    try:
        inspect.signature(function).bind("prompt", "answer_a", "answer_b")
    except TypeError:
        name = spec.rpartition(":")[2]
        raise ConfigError(f"{flag} {spec!r}: {name} must accept (prompt, answer_a, answer_b)") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return function


def make_judge(s, flag: str = "--judge openai") -> Judge:
    """The judge named by settings `s` (alignkit.core.config.LabelSettings); checks what it can before any work.
    flag: what its errors name an OpenAI judge by (rl.py's is `--reward judge`)."""
    if s.judge.startswith("python:"):
        return PythonJudge(s.judge)
    if s.judge.startswith("rm:"):  # a reward model scores each answer (alignkit.feedback.rewards)
        return RMJudge(s.judge, s, s.rm_tie_margin, s.generation_batch_size)
    template = load_template(s.judge_template, s.principle)
    check_principle(template, s)
    if s.judge == "openai":
        from alignkit.core.llm import judge_client

        return OpenAIJudge(template, judge_client(s, "gpt-4o-mini", flag))
    if s.judge == "hf":
        if not s.judge_model:
            raise ConfigError("--judge hf needs --judge_model: a Hub id or a local model folder")
        from alignkit.core.config import loader_settings

        # The generators' --chat_template and --chat_template_kwargs are for them; the judge model brings its own.
        model = loader_settings(s, s.judge_model, revision=s.judge_revision, chat_template=None,
                                chat_template_kwargs={})
        return HFJudge(model, template, s.judge_max_tokens, s.judge_temperature, s.generation_batch_size)
    raise ConfigError(f"--judge {s.judge!r}: expected openai, hf, rm:RUN_FOLDER, or python:module:function")


# ---------------------------------------------------------------------------------------------------------
# A reward model as the judge

_SCORES = re.compile(r"reward A: (\S+), reward B: (\S+)")


class _NotLoaded(UserError):
    """A local judge model that could not load: fatal, not one failed judgment among others."""


class RMJudge(Judge):
    """label.py's `--judge rm:RUN_FOLDER`: scores each answer once; the verdict follows the score difference."""

    kind = "rm"
    batched = True
    one_pass = True  # symmetric by construction: labeling asks for one order only

    def __init__(self, spec: str, settings, tie_margin: float = 0.0, batch_size: int = 16):
        super().__init__(spec, None)
        self.folder, self.settings, self.tie_margin, self.batch_size = spec[len("rm:"):], settings, tie_margin, batch_size
        if not self.folder:
            raise ConfigError(f"--judge {spec!r}: expected rm:RUN_FOLDER, a reward.py run folder")
        from alignkit.modeling.reward_models import REWARD, model_kind

        if Path(self.folder).exists():
            from alignkit.modeling.model_folders import check_model_source

            try:  # a folder that holds no model was found when the first batch loaded it, after every generation
                check_model_source(self.folder)
            except UserError as e:
                raise ConfigError(f"--judge {spec}: {e}") from None
        kind = model_kind(self.folder)
        if kind != REWARD:  # fail before any generation, with the loader's message for a causal LM
            from alignkit.modeling.reward_models import check_model_kind

            if not Path(self.folder).exists():
                raise ConfigError(f"--judge {spec}: no such folder; pass a reward.py run folder, e.g. rm:runs/tiny-reward")
            check_model_kind(self.folder, None, reward=True)
        self.reward = None  # an alignkit.feedback.rewards.RewardModel, loaded at the first batch

    def check_prompts(self, prompts) -> None:
        """Refuse, before anything is generated, a prompt this reward model cannot score: a conversation, for one
        trained on texts (alignkit.feedback.rewards.text_of), named by its file and row."""
        from alignkit.feedback.rewards import text_of, trained_on_text

        if trained_on_text(self.folder):
            for prompt in prompts:
                try:
                    text_of(self.folder, prompt.messages)
                except UserError as e:
                    raise UserError(f"{prompt.place}: {e}") from None

    def fatal(self, error: Exception) -> bool:
        # Not loaded, or a prompt it cannot score (a conversation, for a model trained on texts; one its template
        # refuses): every batch would fail alike, so labelling stops with the line.
        return isinstance(error, UserError)  # _NotLoaded is one

    def identity(self) -> dict:
        # The reward model as loaded: its files down to the base, and how it is loaded (dtype, quantization, the
        # hardware), since verdicts near the tie margin flip with the numerics.
        from alignkit.core.run_records import FOUR_BIT_FIELDS
        from alignkit.feedback.rewards import over_4bit_base, reward_loader_settings
        from alignkit.modeling.identity import model_identity

        loader = reward_loader_settings(self.folder, self.settings)
        four_bit = over_4bit_base(self.folder, loader)  # scored as it trained: NF4 keeps its key from before
        over = {} if four_bit is None else {"over_nf4_base": True} if four_bit == FOUR_BIT_FIELDS else \
            {"over_4bit_base": four_bit}
        return {**super().identity(), "model": model_identity(loader), **over, "tie_margin": self.tie_margin}

    def key_name(self) -> str:
        return "rm"  # the reward model by its identity, not its path

    def judge_batch(self, requests: list[Request]) -> list[str]:
        from alignkit.feedback.rewards import RewardModel

        if self.reward is None:
            try:
                self.reward = RewardModel(self.folder, self.batch_size, settings=self.settings)
            except Exception as e:  # every judgment would fail alike: `fatal` stops labelling with this line
                raise _NotLoaded(f"--judge {self.name}: the reward model did not load: {e}") from e
        # The conversation as it is, turn by turn (as reward.py trained and rl.py's rm: reward scores it), not its
        # flattened text. One pass per distinct (conversation, answer): both answers of every pair, each once.
        turns = {_turns_key(r): r.messages or [{"role": "user", "content": r.question}] for r in requests}
        wanted = list(dict.fromkeys((_turns_key(r), a) for r in requests for a in (r.answer_a, r.answer_b)))
        found = dict(zip(wanted, self.reward([turns[t] for t, _ in wanted], [a for _, a in wanted])))
        return [self.verdict(found[(_turns_key(r), r.answer_a)], found[(_turns_key(r), r.answer_b)]) for r in requests]

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


def _turns_key(request: Request) -> str:
    return json.dumps(request.messages, sort_keys=True) if request.messages else request.question


# ---------------------------------------------------------------------------------------------------------
# Both orders


ORDERS = ("ab", "ba")  # "ab": the pair's first response sits in slot A


def orders_for(both: bool, coin: int) -> tuple[str, ...]:
    """Both orders, or one order picked by `coin` so a single-order run has no systematic slot."""
    return ORDERS if both else (ORDERS[coin % 2],)


def winner(order: str, verdict: str | None) -> str | None:
    """Map a slot verdict back to the pair: "a", "b", "tie", or None (no verdict)."""
    if verdict in (None, "tie"):
        return verdict
    return "a" if (verdict == "A") == (order == "ab") else "b"


def combine(verdicts: dict[str, str | None]) -> str:
    """Outcome of a pair from its verdict per order: "a" or "b" (labeled), "tie", "disagree", "unparsed"."""
    if any(v is None for v in verdicts.values()):
        return "unparsed"
    winners = {winner(order, v) for order, v in verdicts.items()}
    if len(winners) > 1:
        return "disagree"
    return winners.pop()


# ---------------------------------------------------------------------------------------------------------
# Fingerprints


def endpoint_identity(client) -> dict:
    """What an OpenAI-compatible endpoint's answer depends on besides the messages (alignkit.core.llm.ChatClient):
    the server actually called (--*_base_url, else OPENAI_BASE_URL, else OpenAI), the model name there, and
    the sampling sent with every request. Part of every key that caches such an answer."""
    return {"base_url": str(client.client.base_url).rstrip("/"), "model": client.model,
            "temperature": client.temperature, "max_tokens": client.max_tokens}
