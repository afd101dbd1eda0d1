"""Judge prompts: the pairwise Template (FastChat's shape), alignkit's `default` and `self_reference` prompts, and
FastChat judge_prompts.jsonl entries read as templates (`load_template`), checked before any request.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path

from alignkit.core.args import ConfigError
from alignkit.core.digests import digest


@dataclass(frozen=True)
class Template:
    """As in FastChat: a system prompt used as it is, and a user prompt in str.format syntax with {question},
    {answer_a}, {answer_b} (literal braces written {{ and }}). Both may name the {principle}."""

    name: str
    system: str
    prompt: str
    principle: str = ""

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict]:
        fields = dict(question=question, answer_a=answer_a, answer_b=answer_b, principle=self.principle)
        system = self.system.replace("{principle}", self.principle)
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": self.prompt.format(**fields)}]

    def fingerprint(self) -> str:
        """Changes whenever the text the judge sees could change: part of every cache key."""
        uses_principle = "{principle}" in self.system + self.prompt
        return digest([self.system, self.prompt, self.principle if uses_principle else ""], 16)


_VERDICT_RULE = ("End with your verdict alone on the last line, exactly one of: [[A]] if response A is better, "
                 "[[B]] if response B is better, [[C]] if they are equally good.")
_LAYOUT = ("[User Prompt]\n{question}\n\n[Response A]\n{answer_a}\n[End of Response A]\n\n"
           "[Response B]\n{answer_b}\n[End of Response B]")

DEFAULT = Template(
    "default",
    "You are an impartial judge. Two AI assistants answered the same user prompt; decide which response serves "
    "the user better. Weigh whether it follows the instructions, is correct, helpful, relevant and clear. The "
    "order of the responses, their length and the assistants' names must not sway you. First explain your "
    "reasoning in a few sentences. " + _VERDICT_RULE,
    _LAYOUT,
)

# Bao et al. 2024: the judge answers the prompt itself first, then uses its own answer as the reference for
# comparing the two responses under one general principle.
SELF_REFERENCE = Template(
    "self_reference",
    "You are an impartial judge. Before you judge two AI assistants' responses to a user prompt, you answer the "
    "prompt yourself, and your own answer then serves as the reference. The principle to judge by: {principle}\n"
    "Work in three steps. 1. Under the heading 'My answer:', write your own best answer to the prompt. "
    "2. Compare response A and response B with your answer and with each other in the light of the principle, "
    "in a few sentences; their order and their length must not sway you. 3. " + _VERDICT_RULE,
    _LAYOUT,
)

_FIELDS = {"question", "answer_a", "answer_b", "principle"}


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def check_principle(template: Template, s) -> None:
    """A --principle the user set is read only by a template that names {principle}: with another (the default
    one), it was ignored without a word."""
    if not dataclasses.is_dataclass(s):  # rl.py's view of its settings: it checks its own (rl_rewards)
        return
    default = next((f.default for f in dataclasses.fields(s) if f.name == "principle"), s.principle)
    if s.principle != default and "{principle}" not in template.system + template.prompt:
        raise ConfigError(f"--principle is read only by a judge template that names {{principle}} (--judge_template "
                          f"self_reference, or your own); {template.name} does not: pass --judge_template "
                          "self_reference, or drop --principle")


def load_template(spec: str, principle: str = "") -> Template:
    """`default`, `self_reference`, or a FastChat judge_prompts.jsonl file (`FILE#NAME` picks one entry)."""
    if spec in ("default", "self_reference"):
        return dataclasses.replace(DEFAULT if spec == "default" else SELF_REFERENCE, principle=principle)
    path, _, wanted = spec.partition("#")
    if not Path(path).is_file():
        raise ConfigError(f"--judge_template {spec!r}: no such file. Use default, self_reference, or a FastChat "
                          "judge_prompts.jsonl file (one JSON object a line with system_prompt and prompt_template)")
    from alignkit.core.journal import read_jsonl

    entries, problems = [], []
    for number, entry in read_jsonl(path, "each line holds one judge prompt object"):
        name = str(entry.get("name", f"line {number}"))
        if wanted and name != wanted:
            continue
        problem = _template_problem(entry)
        if problem and wanted:
            raise ConfigError(f"{path}: line {number} ({name}): {problem}")
        (problems if problem else entries).append((number, name, problem or entry))
    if not entries:
        if wanted:
            raise ConfigError(f"{path}: no judge prompt named {wanted!r}")
        found = "; ".join(f"line {n} ({name}): {why}" for n, name, why in problems) or "the file is empty"
        raise ConfigError(f"{path}: no usable pairwise judge prompt ({found})")
    if len(entries) > 1:
        names = ", ".join(name for _, name, _ in entries)
        raise ConfigError(f"{path} holds several pairwise judge prompts ({names}); pick one with "
                          f"--judge_template {path}#NAME")
    number, name, entry = entries[0]
    return Template(f"{Path(path).name}#{name}", entry.get("system_prompt") or "", entry["prompt_template"], principle)


def _template_problem(entry: dict) -> str | None:
    """Why this judge_prompts.jsonl entry cannot judge a pair here, or None when it can."""
    if entry.get("type", "pairwise") != "pairwise":
        return f"field 'type': {entry.get('type')!r} is not a pairwise prompt"
    template, system = entry.get("prompt_template"), entry.get("system_prompt", "")
    if not isinstance(template, str) or not template.strip():
        return "field 'prompt_template': expected non-empty text"
    if not isinstance(system, str):
        return "field 'system_prompt': expected text"
    try:
        names = _placeholders(template)
    except ValueError as e:
        return f"field 'prompt_template': not a valid format string ({e}); write literal braces as {{{{ and }}}}"
    unknown = sorted(names - _FIELDS)
    if unknown:
        return (f"field 'prompt_template': placeholder {{{unknown[0]}}} is not supported; alignkit fills "
                "{question}, {answer_a}, {answer_b} and {principle}")
    if not {"answer_a", "answer_b"} <= _placeholders(template):
        return "field 'prompt_template': must contain {answer_a} and {answer_b}"
    return None
