"""The checks every row of alignkit.core.data goes through: a message list, a turn's text, an answer split from the
turns before it, a preference pair; each failure a _RowError naming the column, what was expected and what was
found (alignkit.core.data adds the source, the row and the fix). Messages keep the keys a chat template renders
beside role and content (a tool call, a tool turn's name and id, the reasoning)."""
from __future__ import annotations

import json

from alignkit.core.data_files import _show

ROLES = ("system", "user", "assistant", "tool")


class _RowError(Exception):  # one invalid row: the column at fault, what was expected and what was found
    def __init__(self, field, problem):
        super().__init__(problem)
        self.field, self.problem = field, problem


# ---------------------------------------------------------------- row checks
def _bad(field, expected, value, where=""):
    return _RowError(field, f"{where}expected {expected}, got {_show(value)}")


def _text(value, field, where=""):
    if not isinstance(value, str) or not value.strip():
        raise _bad(field, "non-empty text", value, where)
    return value


def _turn(role, content):
    return [{"role": role, "content": content}]


# Message keys beside role and content, kept as written: TRL hands whole messages to the chat template, which renders
# a tool call, a tool turn's name and id, and the reasoning where the model's template knows them.
_EXTRA_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")
_SAYS_WITHOUT_TEXT = {"tool_calls", "reasoning_content", "thinking"}


def _messages(value, field, role=None):
    """A list of role/content messages, or a string that becomes one `role` message (refused if role is None)."""
    if isinstance(value, str) and role:
        return _turn(role, _text(value, field))
    if not isinstance(value, list) or not value:
        raise _bad(field, "a non-empty string or a list of messages" if role else "a non-empty list of messages", value)
    out = []
    for i, message in enumerate(value, 1):
        where = f"message {i}: "
        if not isinstance(message, dict):
            raise _bad(field, "a {'role': ..., 'content': ...} dict", message, where)
        if message.get("role") not in ROLES:
            raise _bad(field, f"'role' to be one of {', '.join(ROLES)}", message.get("role"), where)
        extra = {key: message[key] for key in _EXTRA_KEYS if message.get(key) not in (None, "", [])}
        if message["role"] == "system" and message.get("content") == "":
            continue  # an empty system prompt says nothing; ShareGPT dumps are full of them
        # No text beside a call or the reasoning, or a tool that returned nothing: a turn all the same ("").
        if message.get("content") in (None, "") and (message["role"] == "tool" or set(extra) & _SAYS_WITHOUT_TEXT):
            out.append({"role": message["role"], "content": "", **extra})
            continue
        out += [{**_turn(message["role"], _text(message.get("content"), field, where + "'content': "))[0], **extra}]
    if not out:
        raise _bad(field, "at least one non-empty message", value)
    return out


def kept_message(message) -> dict | None:
    """A prompt's message as generation keeps it (alignkit.feedback.labeling): its role and text, and the keys beside
    them that the chat template renders (a tool call, a tool turn's name and id, the reasoning); a call, the
    reasoning or a tool turn without text has content "". None when it is no such message."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        return None
    extra = {key: message[key] for key in _EXTRA_KEYS if message.get(key) not in (None, "", [])}
    content = message.get("content")
    if content in (None, "") and (message["role"] == "tool" or set(extra) & _SAYS_WITHOUT_TEXT):
        content = ""
    return {"role": message["role"], "content": content, **extra} if isinstance(content, str) else None


def _same(a, b):
    """The same turns: roles, texts (stripped) and what else they carry (tool calls, reasoning)."""
    return [_said(m) for m in a] == [_said(m) for m in b]


def _said(message: dict) -> tuple:
    return message["role"], message["content"].strip(), json.dumps({k: v for k, v in message.items()
                                                                     if k not in ("role", "content")}, sort_keys=True)


_ANSWER_ROLES = ("assistant", "tool")  # an answer's turns: the model's, and the tools' it called


def _answer(value, field, prompt=None):
    """Split a string or a conversation into (the turns before the answer, the answer). Beside a prompt, turns of
    the assistant and its tools alone are the answer as written (TRL's completion: a tool-calling trajectory, call,
    tool turn, answer, is one); a whole conversation's answer is its final assistant turn (pairs whose earlier
    turns differ are split where they part: `split_where_they_part`)."""
    conv = _messages(value, field, "assistant")
    if conv[-1]["role"] != "assistant":
        raise _RowError(field, f"expected a conversation ending with an assistant turn, got a last turn with role "
                               f"{conv[-1]['role']!r}")
    if len(conv) > 1 and prompt and all(m["role"] in _ANSWER_ROLES for m in conv):
        if conv[0]["role"] != "assistant":
            raise _RowError(field, "expected an answer that opens with an assistant turn, got one opening with a "
                                   f"{conv[0]['role']!r} turn")
        return [], conv
    if len(conv) > 1 and prompt:
        # A whole conversation may open with a system turn that its prompt column leaves out (the handbook's rows).
        skip = 0 if prompt[0]["role"] == "system" else next(i for i, m in enumerate(conv) if m["role"] != "system")
        if not _same(conv[skip:skip + len(prompt)], prompt):
            raise _RowError(field, "expected a conversation that starts with the prompt turns, got one starting with "
                                   + _show(conv[0]["content"]))
    return conv[:-1], conv[-1:]


def split_where_they_part(chosen: list[dict], rejected: list[dict], names=("chosen", "rejected")):
    """Two whole conversations whose turns before their final answers differ, as TRL's extract_prompt splits them:
    the prompt is the turns they share (cut back to end at a user or tool turn), each answer the turns after it,
    which may hold tool calls and tool turns (a trajectory) but no user turn: (prompt, chosen, rejected)."""
    shared = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if _said(c) != _said(r)),
                  min(len(chosen), len(rejected)))
    while shared and chosen[shared - 1]["role"] not in ("user", "tool"):
        shared -= 1
    answers = chosen[shared:], rejected[shared:]
    if not shared or any(m["role"] not in _ANSWER_ROLES for answer in answers for m in answer):
        raise _RowError(names[1], f"expected the same turns before the final answer as '{names[0]}', got different "
                                  "ones (answers may differ in assistant and tool turns, a tool-calling trajectory, "
                                  "but not in user turns)")
    return chosen[:shared], *answers


def _check_prompt(prompt, field):
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        roles = ", ".join(m["role"] for m in prompt) or "none"
        raise _RowError(field, f"expected prompt turns ending with a user turn before the answer, got roles [{roles}]")
    return prompt


def _pair(prompt, chosen, rejected, names=("chosen", "rejected"), prompt_field="prompt"):
    """A checked pair: conversational (message lists), or TRL's standard format (texts, used as they are)."""
    if not isinstance(prompt, str):
        _check_prompt(prompt, prompt_field)
    said = [answer.strip() if isinstance(answer, str) else [_said(m) for m in answer] for answer in (chosen, rejected)]
    if said[0] == said[1]:
        raise _RowError(names[1], f"expected an answer different from '{names[0]}', got the same text "
                                  "(identical answers carry no preference signal)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def no_field(row: dict, name: str) -> str:
    """"no field 'NAME' (is 'NAEM' a misspelling of it?); its fields: ..." for a row without the field: a misspelt
    key read as an empty cell said "got None", or skipped the row without a word."""
    import difflib

    close = difflib.get_close_matches(name, [str(k) for k in row], n=1)
    named = f" (is '{close[0]}' a misspelling of it?)" if close else ""
    return f"no field {name!r}{named}; its fields: {', '.join(map(str, row)) or 'none'}"



def ends_without_answer(rows: list[dict], place) -> str | None:
    """The notice for SFT conversations whose last turn is not the assistant's ([assistant, user], a transcript cut
    after a user turn): TRL trains them as they are, and the turns after the last answer teach nothing, or the wrong
    thing. `place(j)`: row j's place ("FILE: row N"). None where every conversation ends with an answer."""
    ends = [j for j, row in enumerate(rows) if row.get("messages") and row["messages"][-1]["role"] != "assistant"]
    if not ends:
        return None
    return (f"{len(ends)} of {len(rows)} conversations end with a turn that is not the assistant's (the first: "
            f"{place(ends[0])}, a {rows[ends[0]]['messages'][-1]['role']} turn last). The turns after the last "
            "assistant turn teach nothing under --train_on auto's assistant-only loss (a chat template with "
            "{% generation %} markers), and are trained as text otherwise (--train_on all, or a template without the "
            "markers: the model learns to write them). End each conversation with the assistant's answer, or drop "
            "the trailing turns")
