"""A chat template that refuses a row (`raise_exception`), reported as the row it refused, in one line.

Templates call `raise_exception` on conversations they do not take: Gemma's and Mistral's on a system turn, many on
roles that do not alternate. TRL renders every row inside its dataset map when the trainer is built (sft, dpo, kto,
reward) and rl.py's trainer renders each batch's prompts while it trains, so the error was a traceback from deep in
`datasets`, or a crash at a later step, with no word of which row; generation (label.py, evaluate.py) likewise.
`refused` finds the first row the template refuses (only after TRL's map failed: a run whose rows all render pays
nothing), `check_prompts` renders rl.py's prompts once before training, and `render` is the generation prompt every
local engine (alignkit.modeling.generation) renders.
"""

from __future__ import annotations

import contextlib
import json

from alignkit.core.errors import UserError

_ANSWERS = ("messages", "completion", "chosen", "rejected")


def _conversations(row: dict):
    """(what, messages, add_generation_prompt) as TRL renders a row: the prompt alone, then with each answer."""
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt:
        yield "prompt", prompt, True
    for column in _ANSWERS:
        answer = row.get(column)
        if isinstance(answer, list) and answer and isinstance(answer[0], dict):
            yield column, (prompt if isinstance(prompt, list) else []) + answer, False


def _which(messages: list[dict]) -> str:
    """The conversation named by its first user turn: the data is shuffled and split by then, so no row number."""
    turn = next((m for m in messages if m.get("role") == "user"), messages[0])
    text = " ".join(str(turn.get("content", "")).split())
    return f"the one whose first user turn is {text if len(text) <= 60 else text[:57] + '...'!r}"


def row_template(row: dict | None) -> dict:
    """A row's own arguments of the chat template, as TRL's trainers pass them: its `tools` (JSON text decoded; none
    or [] is left out) and its `chat_template_kwargs` ({"enable_thinking": false})."""
    if not row:
        return {}
    tools = row.get("tools")
    tools = (json.loads(tools) if isinstance(tools, str) else tools) or None
    return {**({"tools": tools} if tools else {}), **(row.get("chat_template_kwargs") or {})}


def first_refused(tokenizer, named: dict) -> str | None:
    """'a row of <which data> (<its first user turn>), <column>: <the template's message>' for the first row of the
    datasets in `named` ({"the training data": dataset, ...}) that the chat template refuses; None when all render.
    The row is named by its text: the data TRL holds was normalised, shuffled and split, so a number would not
    point into the user's file."""
    from jinja2 import TemplateError

    for name, dataset in named.items():
        if dataset is None or not hasattr(dataset, "__iter__"):
            continue
        for row in dataset:
            template = row_template(row)  # as TRL's trainers read it
            for column, messages, generation in _conversations(row):
                try:
                    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                                  **template)
                except TemplateError as e:
                    return f"a row of {name} ({_which(messages)}), {column}: {e}"
    return None


@contextlib.contextmanager
def refusing(messages: list[dict], what: str = "a prompt"):
    """Around one conversation's rendering: the template's refusal as one line naming it by its first user turn."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as e:
        raise _refusal(f"{what} ({_which(messages)}): {e}") from None


def render(tokenizer, messages: list[dict], template: dict | None = None) -> str:
    """The text a model answers `messages` from (the template's generation prompt), with `template`'s arguments
    of the chat template (tools, enable_thinking, ...); a refusal is one line, and so is a prompt with a tool call
    for a template that renders none (the model would answer without the call)."""
    if any(m.get("tool_calls") for m in messages) and not _renders_tool_calls(tokenizer):
        raise UserError(f"the chat template does not render tool calls, and a prompt ({_which(messages)}) has them: "
                        "the model would answer without seeing the call. Pass --chat_template FILE with one that "
                        "renders tool_calls and tool turns (the model family's tool-calling template), or drop such "
                        "prompts")
    with refusing(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(template or {}))
    names = [t.get("function", t).get("name") for t in (template or {}).get("tools") or () if isinstance(t, dict)]
    if names and not any(name and name in text for name in names):  # a template without tools drops them silently
        raise UserError(f"the chat template does not render tools, and a prompt ({_which(messages)}) has them (its "
                        "tools column): the model would answer without knowing them. Pass --chat_template FILE with "
                        "one that renders tools (the model family's tool-calling template), or drop the column")
    return text


_TOOL_CALLING: dict[str, bool] = {}  # a chat template -> TRL's supports_tool_calling (it renders a test conversation)


def _renders_tool_calls(tokenizer) -> bool:
    key = str(getattr(tokenizer, "chat_template", None))
    if key not in _TOOL_CALLING:
        from trl.chat_template_utils import supports_tool_calling

        _TOOL_CALLING[key] = bool(supports_tool_calling(tokenizer))
    return _TOOL_CALLING[key]


def _refusal(where: str) -> UserError:
    return UserError(f"the chat template refuses {where}. Drop or rewrite such rows (a system turn can go into the "
                     "first user turn), or pass a --chat_template that takes them")


@contextlib.contextmanager
def refused(tokenizer, named: dict):
    """Around building a TRL trainer: a template's refusal inside TRL's dataset map becomes one line naming the row."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as e:
        found = first_refused(tokenizer, named) or f"a row while TRL prepared the data: {e}"
        raise _refusal(found) from None


def check_prompts(tokenizer, named: dict) -> None:
    """rl.py: every prompt renders before training (its trainer renders them batch by batch as it goes)."""
    found = first_refused(tokenizer, named)
    if found:
        raise _refusal(found)
