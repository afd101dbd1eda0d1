"""How normalised rows become a Dataset: message columns whose messages carry tool calls or reasoning, stored as JSON.

TRL hands whole messages to the chat template. Arrow stores a list of messages as structs with one set of keys, so
every message without `tool_calls` (or `name`, `reasoning_content`, ...) would get it as None, and a template that
tests `'tool_calls' in message` (Llama 3.1's) renders the None. datasets' Json feature keeps each message as written.
alignkit.core.data builds every normalised dataset through `as_dataset`; alignkit.core.mixture aligns the parts of a
mixture (`align_messages`); the training scripts refuse, before the model loads, data with tool calls for a chat
template that cannot render them (`has_tool_calls`, alignkit.train.loss_mask.check_chat_template).
"""

from __future__ import annotations

import datasets

MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected", "completion")


def as_dataset(rows: list[dict]) -> datasets.Dataset:
    """Normalised rows as a Dataset: a message column whose messages carry keys beside role and content is stored as
    JSON, and so is a `tools` column of schemas (they differ from row to row), and a `chat_template_kwargs` column
    whose rows name different arguments (Arrow would give {} the other rows' keys as None: enable_thinking=None)."""
    rich = {c for c in MESSAGE_COLUMNS if any(_has_extra(row.get(c)) for row in rows)}
    tools = [row.get("tools") for row in rows]
    if any(tools) and all(t is None or isinstance(t, list) for t in tools):
        rich.add("tools")
    kwargs = [row["chat_template_kwargs"] for row in rows if isinstance(row.get("chat_template_kwargs"), dict)]
    if len({frozenset(k) for k in kwargs}) > 1:
        rich.add("chat_template_kwargs")
    if not rich:
        return datasets.Dataset.from_list(rows)
    plain = datasets.Dataset.from_list([{k: v for k, v in row.items() if k not in rich} for row in rows]).features
    return datasets.Dataset.from_list(rows, features=datasets.Features(
        {k: _json(k) if k in rich else plain[k] for k in rows[0]}))


def _json(column: str):
    """A column's JSON feature: one mapping per row for chat_template_kwargs, else a list (messages, tools)."""
    return datasets.Json() if column == "chat_template_kwargs" else datasets.List(datasets.Json())


def _has_extra(value) -> bool:
    return isinstance(value, list) and any(isinstance(m, dict) and set(m) - {"role", "content"} for m in value)


def _is_json(feature) -> bool:
    return isinstance(feature, datasets.Json) or isinstance(getattr(feature, "feature", None), datasets.Json)


TEMPLATE_COLUMNS = ("chat_template_kwargs", "tools")  # per-row columns TRL hands to the chat template


def align_messages(parts: list[datasets.Dataset]) -> list[datasets.Dataset]:
    """Datasets to concatenate, a column that is JSON in one (see `as_dataset`) made JSON in all. A template column
    (chat_template_kwargs, tools) of any part is JSON in every part, and a part without it gets {} / None: Arrow
    would fill one part's kwargs with another's keys as None, and TRL unpacks a row's chat_template_kwargs (None
    there is a TypeError)."""
    json = {c for part in parts for c, f in part.features.items() if _is_json(f)}
    if len(parts) > 1:
        json |= {c for part in parts for c in TEMPLATE_COLUMNS if c in part.column_names}
    aligned = []
    for part in parts:
        for column in TEMPLATE_COLUMNS:
            if column in json and column not in part.column_names:
                default = {} if column == "chat_template_kwargs" else None
                part = part.map(lambda _, c=column, v=default: {c: v},
                                features=datasets.Features({**part.features, column: _json(column)}))
        if any(c in json and not _is_json(f) for c, f in part.features.items()):
            part = part.cast(datasets.Features({c: _json(c) if c in json else f for c, f in part.features.items()}))
        aligned.append(part)
    return aligned


def has_tool_calls(data) -> bool:
    """Whether a normalised dataset has a message with tool calls (only JSON message columns can hold them)."""
    columns = [c for c, f in getattr(data, "features", {}).items() if c in MESSAGE_COLUMNS and _is_json(f)]
    return any(isinstance(m, dict) and m.get("tool_calls") for c in columns for row in data[c] for m in row or ())
