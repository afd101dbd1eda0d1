"""One data normaliser: load SFT and preference data from a file, folder, in-memory rows or the Hub, and turn every
supported dataset shape into TRL's layouts, with errors that name the source, the row and the field: message lists
(conversational), or texts where the data is in TRL's standard format (TRL joins those without a chat template).
Reading the sources, and each row's place in them, is alignkit.core.data_files'; the checks of one row's messages,
answers and pairs are alignkit.core.row_checks'."""
from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping

import datasets

from alignkit.core.data_files import FILE_TYPES, DataError, RowInvalid, Rows, load_rows, read_rows, skipped_rows
from alignkit.core.message_columns import TEMPLATE_COLUMNS, as_dataset
from alignkit.core.row_checks import (_answer, _bad, _check_prompt, _messages, _pair, _RowError, _same, _text, _turn,
                                      ends_without_answer, split_where_they_part)

__all__ = ["DataError", "FILE_TYPES", "PREFERENCE_FORMATS", "SFT_FORMATS", "Rows", "load_rows", "read_rows",
           "load_preferences", "load_sft", "load_unpaired", "detect_format", "is_hh_prompt", "hh_prompt_messages"]

logger = logging.getLogger("alignkit")

PREFERENCE_FORMATS = ("explicit", "ultrafeedback", "hh", "shp", "stack_exchange", "self_reference")
SFT_FORMATS = ("messages", "sharegpt", "prompt_completion", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_FIX = "Fix the row, or pass --skip_invalid to skip invalid rows."
# Per-row columns TRL's trainers hand to the chat template (trl/data_utils.py apply_chat_template): kept as they are,
# so that a row's `chat_template_kwargs` ({"enable_thinking": false}, the SmolLM3 recipes) and `tools` still apply.
_TEMPLATE_COLUMNS = TEMPLATE_COLUMNS
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# ---------------------------------------------------------------- preference formats
def _explicit(row, names=("prompt", "chosen", "rejected"), standard=True):
    """TRL's explicit prompt: texts stay texts (its standard format, `standard`), else message lists."""
    if is_hh_prompt(row.get(names[0])):  # HH already split (the DPO reference code's form): parse its turns
        return _hh_split(row, names)
    if standard and all(isinstance(row.get(name), str) for name in names):  # TRL's standard format: plain text
        return _pair(*(_text(row.get(name), name) for name in names), names[1:], names[0])
    prompt = _messages(row.get(names[0]), names[0], "user")
    context_c, chosen = _answer(row.get(names[1]), names[1], prompt)
    context_r, rejected = _answer(row.get(names[2]), names[2], prompt)
    if context_c and context_r and not _same(context_c, context_r):  # whole conversations that part earlier
        context_c, chosen, rejected = split_where_they_part(context_c + chosen, context_r + rejected, names[1:])
    return _pair(context_c or context_r or prompt, chosen, rejected, names[1:], names[0])


def _ultrafeedback(row):
    for field in ("chosen", "rejected"):
        if not isinstance(row.get(field), list):
            raise _bad(field, "a list of messages (the whole conversation)", row.get(field))
    context_c, chosen = _answer(row["chosen"], "chosen")
    context_r, rejected = _answer(row["rejected"], "rejected")
    if not _same(context_c, context_r):  # TRL's implicit prompt: the turns they share (a trajectory may differ)
        context_c, chosen, rejected = split_where_they_part(context_c + chosen, context_r + rejected)
    return _pair(context_c, chosen, rejected, prompt_field="chosen")


def _hh_transcript(text, field):
    expected = "a transcript '\\n\\nHuman: ...\\n\\nAssistant: ...' ending with an Assistant turn"
    parts = _HH_TURN.split("\n\n" + text.lstrip()) if isinstance(text, str) else []
    if len(parts) < 5 or parts[0].strip() or parts[-2] != "Assistant":
        raise _bad(field, expected, text)
    turns = [_turn("user" if who == "Human" else "assistant", _text(said.strip(), field, f"turn {i} ({who}): "))[0]
             for i, (who, said) in enumerate(zip(parts[1::2], parts[2::2]), 1)]
    return turns[:-1], turns[-1:]


def is_hh_prompt(value) -> bool:
    """True for an Anthropic HH prompt as split copies and the DPO reference code cut it: the transcript through
    its last Assistant marker, i.e. text that starts with "Human:" (or "\n\nHuman:") and ends with
    "\n\nAssistant:". Both ends are required, so an ordinary prompt that merely mentions "Human:" is not one."""
    return (isinstance(value, str) and value.lstrip().startswith("Human:")
            and value.rstrip().endswith("\n\nAssistant:"))


def hh_prompt_messages(text) -> list[dict]:
    """The user/assistant turns of an HH prompt (see is_hh_prompt), markers removed, ending with the user's."""
    try:
        return _hh_prompt(text, "prompt")
    except _RowError as e:
        raise DataError(e.problem) from None


def _hh_prompt(text, field):
    if not is_hh_prompt(text):
        raise _bad(field, "an HH prompt '\\n\\nHuman: ...\\n\\nAssistant:' (the transcript through its last "
                          "'Assistant:')", text)
    parts = _HH_TURN.split("\n\n" + text.strip())  # ["", "Human", said, ..., "Human", said, "Assistant", ""]
    return [_turn("user" if who == "Human" else "assistant", _text(said.strip(), field, f"turn {i} ({who}): "))[0]
            for i, (who, said) in enumerate(zip(parts[1:-2:2], parts[2:-2:2]), 1)]


def _hh_answer(value, field, prompt):
    """One answer of split HH: the text after the prompt's last "Assistant:" (its leading space dropped), or the
    whole transcript, which must then continue the prompt. A transcript starts with "Human:" and holds an
    "\n\nAssistant:" marker; an answer alone never does (the reference code cuts at the last one, via rfind), so
    an answer whose own text begins with "Human:" (28 rows of HH's harmless-base test split) is kept as it is."""
    if isinstance(value, str) and value.lstrip().startswith("Human:") and "\n\nAssistant:" in value:
        context, answer = _hh_transcript(value, field)
        if not _same(context, prompt):
            raise _RowError(field, "expected a transcript that starts with the prompt's turns, or the answer alone")
        return answer
    if not isinstance(value, str):
        return _answer(value, field, prompt)[1]
    text = _text(value, field).strip()
    if _HH_TURN.search(text):
        raise _RowError(field, "expected the answer alone (the text after the prompt's last 'Assistant:'), got text "
                               "holding further 'Human:'/'Assistant:' turns")
    return _turn("assistant", text)


def _hh_split(row, names=("prompt", "chosen", "rejected")):
    prompt = _hh_prompt(row.get(names[0]), names[0])
    chosen, rejected = (_hh_answer(row.get(name), name, prompt) for name in names[1:])
    return _pair(prompt, chosen, rejected, names[1:], names[0])


def _hh(row):
    if row.get("prompt") is not None:  # split HH: prompt, then the two answers
        return _hh_split(row)
    prompt, chosen = _hh_transcript(row.get("chosen"), "chosen")
    prompt_r, rejected = _hh_transcript(row.get("rejected"), "rejected")
    if not _same(prompt, prompt_r):
        raise _RowError("rejected", "expected the same conversation as 'chosen' before the last 'Assistant:' turn, "
                                    "got a different one")
    return _pair(prompt, chosen, rejected, prompt_field="chosen")


def _implicit_text(row):
    """TRL's standard preference row with an implicit prompt: two texts whose common beginning is the prompt, split
    as trl.extract_prompt splits it (a space before the answers goes with them)."""
    chosen, rejected = _text(row.get("chosen"), "chosen"), _text(row.get("rejected"), "rejected")
    if chosen.strip() == rejected.strip():  # the split below left no answer: it said 'chosen' was empty
        raise _RowError("rejected", "expected an answer different from 'chosen', got the same text (identical "
                                    "answers carry no preference signal)")
    end = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    end -= end > 0 and chosen[end - 1] == " "
    if not chosen[:end].strip():
        raise _RowError("rejected", "expected the same prompt at the start of 'chosen' and 'rejected' (TRL's implicit "
                                    "prompt), got texts that differ from the start: put the prompt in a 'prompt' "
                                    "column")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[end:].strip():
            raise _RowError(name, f"expected an answer after the prompt both texts begin with (TRL's implicit "
                                  f"prompt), got none: '{name}' is only the start of the other; put the prompt in "
                                  "a 'prompt' column and the answers in 'chosen' and 'rejected'")
    return _pair(chosen[:end], chosen[end:], rejected[end:], prompt_field="chosen")


def _shp(row):
    prompt = _turn("user", _text(row.get("history"), "history"))
    a, b = (_text(row.get(field), field) for field in ("human_ref_A", "human_ref_B"))
    label = row["labels"].strip() if isinstance(row.get("labels"), str) else row.get("labels")
    if label not in (0, 1, "0", "1"):
        raise _bad("labels", "1 (human_ref_A preferred) or 0 (human_ref_B preferred)", row.get("labels"))
    chosen, rejected = (a, b) if label in (1, "1") else (b, a)
    return _pair(prompt, _turn("assistant", chosen), _turn("assistant", rejected), ("human_ref_A", "human_ref_B"),
                 "history")


def _stack_exchange(row):
    prompt = _turn("user", _text(row.get("question"), "question"))
    answers = row.get("answers")
    if not isinstance(answers, list) or len(answers) < 2:
        raise _bad("answers", "a list of at least 2 answers", answers)
    scored = []
    for i, answer in enumerate(answers, 1):
        score = answer.get("pm_score") if isinstance(answer, dict) else None
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise _bad("answers", "a number in 'pm_score'", score, f"answer {i}: ")
        scored.append((score, _text(answer.get("text"), "answers", f"answer {i}: 'text': ")))
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    if best[0] == worst[0]:
        raise _RowError("answers", f"expected answers with different pm_score values, got all {best[0]}")
    return _pair(prompt, _turn("assistant", best[1]), _turn("assistant", worst[1]), ("answers", "answers"), "question")


# ---------------------------------------------------------------- SFT formats
def _sft_messages(row, field="messages"):
    messages = _messages(row.get(field), field)
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise _RowError(field, f"expected at least one assistant turn to learn from, got roles [{roles}]")
    return {"messages": messages}


def _sft_sharegpt(row):
    """ShareGPT turns as messages. LLaMA-Factory's tool turns too: `function_call` (its value the call as JSON,
    {"name": ..., "arguments": {...}}, or a list of them) is an assistant turn with tool_calls, `observation` the
    tool's turn; a row's `system` text opens the conversation."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise _bad("conversations", "a list of {'from': ..., 'value': ...} turns", turns)
    system = row.get("system")  # LLaMA-Factory's: used when the conversation does not open with its own system turn
    opens = isinstance(turns[0], dict) and turns[0].get("from") == "system" if turns else False
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() and not opens \
        else []
    for i, turn in enumerate(turns, 1):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(turn.get("value"), i)})
        elif who == "observation":
            messages.append({"role": "tool", "content": turn.get("value")})
        elif who in SHAREGPT_ROLES:
            messages.append({"role": SHAREGPT_ROLES[who], "content": turn.get("value")})
        else:
            raise _bad("conversations", f"'from' to be one of {', '.join([*SHAREGPT_ROLES, *_SHAREGPT_TOOL_ROLES])}",
                       who, f"message {i}: ")
    return _sft_messages({"conversations": messages}, "conversations")


_SHAREGPT_TOOL_ROLES = ("function_call", "observation")  # LLaMA-Factory's


def _sharegpt_calls(value, i: int) -> list[dict]:
    """A `function_call` turn's value ({"name": ..., "arguments": ...} as JSON text, or a list of them) as tool calls
    in the chat templates' form: {"type": "function", "function": {"name", "arguments" as a mapping}}."""
    expected = 'the call as JSON, {"name": ..., "arguments": {...}} (or a list of them)'
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raise _bad("conversations", expected, value, f"message {i}: 'value': ") from None
    calls = [calls] if isinstance(calls, Mapping) else calls
    if not isinstance(calls, list) or not calls or not all(isinstance(c, Mapping) and c.get("name") for c in calls):
        raise _bad("conversations", expected, value, f"message {i}: 'value': ")
    out = []
    for call in calls:
        arguments = call.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise _bad("conversations", expected, value, f"message {i}: 'value': ") from None
        if not isinstance(arguments, Mapping):  # templates read them as a mapping (arguments.items())
            raise _bad("conversations", expected, value, f"message {i}: 'value': ")
        out.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return out


def _sft_prompt_completion(row):
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):  # TRL's standard format
        return {"prompt": _text(row["prompt"], "prompt"), "completion": _text(row["completion"], "completion")}
    prompt = _messages(row.get("prompt"), "prompt", "user")
    context, completion = _answer(row.get("completion"), "completion", prompt)
    return {"prompt": _check_prompt(context or prompt, "prompt"), "completion": completion}


# What a KTO label may be (`_unpaired`), as its refusal lists it.
LABELS = ('true or false (a boolean; 1 or 0, 1.0 or 0.0; or the text "true", "false", "1", "0", "1.0" or "0.0" in '
          'any case)')


def _unpaired(row):
    """One labelled answer (KTO): prompt, completion, label true (desirable) or false (undesirable)."""
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0", "1.0", "0.0"):
        label = label.strip().lower() in ("true", "1", "1.0")
    # TRL casts the label to bool: 1 desirable, 0 undesirable; a CSV or parquet export often stores them as 1.0, 0.0
    if type(label) in (int, float) and label in (0, 1):
        label = bool(label)
    if label is None and row.get("chosen") is not None and row.get("rejected") is not None:
        raise _RowError("label", "a preference pair (chosen, rejected) among labelled rows (prompt, completion, "
                                 "label): a file is one or the other (each pair becomes two labelled rows); move the "
                                 "pairs to a file of their own and train on both (a dataset_mixture), or label this row")
    if not isinstance(label, bool):
        raise _bad("label", LABELS, label)
    return {**_sft_prompt_completion(row), "label": label}


# Format -> (normaliser, required columns). "auto" tries them in this order, most specific first; hh and
# ultrafeedback share their columns and are told apart by the type of `chosen` (transcript string or message list).
_TABLES = {
    "preference": {
        "shp": (_shp, ("history", "human_ref_A", "human_ref_B", "labels")),
        "stack_exchange": (_stack_exchange, ("question", "answers")),
        "self_reference": (functools.partial(_explicit, names=("message", "chose", "reject"), standard=False),
                           ("message", "chose", "reject")),
        "explicit": (_explicit, ("prompt", "chosen", "rejected")),
        "hh": (_hh, ("chosen", "rejected")),
        "ultrafeedback": (_ultrafeedback, ("chosen", "rejected")),
        "implicit": (_implicit_text, ("chosen", "rejected")),
    },
    "sft": {
        "messages": (_sft_messages, ("messages",)),
        "sharegpt": (_sft_sharegpt, ("conversations",)),
        "prompt_completion": (_sft_prompt_completion, ("prompt", "completion")),
        "text": (lambda row: {"text": _text(row.get("text"), "text")}, ("text",)),
    },
}
_TABLES["unpaired"] = {"unpaired": (_unpaired, ("prompt", "completion", "label")), **_TABLES["preference"]}
_NOTES = {"hh": " as transcript strings, or split after an HH prompt column", "ultrafeedback": " as message lists",
          "implicit": " as plain texts that begin with the same prompt: TRL's standard implicit prompt"}


def _choices(kind):
    names = list(_TABLES[kind])
    return "; ".join(f"{name} ({', '.join(_TABLES[kind][name][1])}{_NOTES.get(name, '')})" for name in names)


def detect_format(columns, kind, source=None) -> str:
    """The `kind` ("preference" or "sft") format of data with these columns: a list of names, or a mapping of
    name -> example value or datasets feature (only that tells hh transcripts from ultrafeedback message lists)."""
    if kind not in _TABLES:
        raise ValueError(f"kind must be one of {', '.join(_TABLES)}, got {kind!r}")
    names = list(columns)
    for name, (_, required) in _TABLES[kind].items():
        if all(column in names for column in required):
            sample = columns.get("chosen") if isinstance(columns, Mapping) else None
            if name not in ("hh", "ultrafeedback", "implicit"):
                return name
            if sample is not None:  # a string, or a datasets.Value("string") feature, is an hh transcript
                is_text = isinstance(sample, str) or getattr(sample, "dtype", None) in ("string", "large_string")
                if is_text and isinstance(sample, str) and not _HH_TURN.search("\n\n" + sample.lstrip()):
                    return "implicit"  # plain text, no Human:/Assistant: turns: TRL's standard implicit prompt
                return "hh" if is_text else "ultrafeedback"
    where = f"{source}: " if source else ""
    if other := _another_scripts_rows(set(map(str, names)), kind):  # its fix is another script, not a rename
        raise DataError(f"{where}{other}")
    import difflib

    known = {column for _, required in _TABLES[kind].values() for column in required}
    typos = [f"{name} (did you mean {close[0]}?)" for name in map(str, names) if name not in known
             and (close := difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8))]
    hint = f"Rename {', '.join(typos)}, or" if typos else "Rename the columns, or"
    # Plain text under another name is TRL's dataset_text_field (sft.py reads that column as the text).
    def is_text(name):
        sample = columns.get(name) if isinstance(columns, Mapping) else None
        return isinstance(sample, str) or getattr(sample, "dtype", None) in ("string", "large_string")

    texts = [name for name in map(str, names) if is_text(name)]
    text = f" For plain text in one column, --dataset_text_field {texts[0] if texts else 'COLUMN'}." if \
        kind == "sft" else ""
    raise DataError(f"{where}cannot tell the {kind} format from the columns [{', '.join(map(str, names))}]. "
                    f"{hint} pass --dataset_format with one of: {_choices(kind)}.{text}")


def _another_scripts_rows(names: set, kind: str) -> str | None:
    """TRL's rows of a kind another script trains on (or none does), said as such: the near-name hint that the
    columns got otherwise led astray (KTO's 'label' renamed to SHP's 'labels'; pairs trained as their prompts)."""
    if {"prompt", "completions", "labels"} <= names:
        return ("TRL's stepwise supervision rows (prompt, completions, labels: a process reward model's data), which "
                "no alignkit script trains on")
    if {"prompt", "completion", "label"} <= names and kind == "preference":
        return "TRL's unpaired preference rows (prompt, completion, label): kto.py trains on them"
    if {"chosen", "rejected"} <= names and kind == "sft":
        return ("preference pairs (chosen, rejected): dpo.py, reward.py (and kto.py, which unpairs them) train on "
                "them; sft.py needs messages, prompt/completion or text rows")
    return None


def _load(kind, source, format, split, skip_invalid, config_name, text_field="text", kept=None):
    if format != "auto" and format not in _TABLES[kind]:
        raise DataError(f"unknown {kind} data format {format!r}; choose auto or one of: {_choices(kind)}")
    read = read_rows(source, split, config_name, skip_invalid)
    data, label = read.rows, read.label
    skipped_rows(label, list(read.skipped), len(read.skipped), len(data), warn=False)  # each line invalid JSON
    if len(data) == 0:
        raise DataError(f"{label}: no usable rows: the dataset is empty. Point it at a file with data rows.")
    if isinstance(data, datasets.Dataset):
        features, data = dict(data.features), data.to_list()
    else:
        features = {}
    columns = {}  # first non-null value of each column, so that detection can look at types (and at hh markers)
    for row in data:
        columns.update({k: v for k, v in row.items() if columns.get(k) is None} if isinstance(row, dict) else {})
    columns.update({k: v for k, v in features.items() if columns.get(k) is None})
    if not columns:  # no row is an object: say so of the first, not "no format has these columns"
        read.dicts()
    if text_field != "text" and text_field not in columns and {"messages", "prompt"} & set(columns):
        # TRL reads conversational rows as conversations whatever dataset_text_field says (a handbook recipe sets
        # it beside chat data): so does alignkit.
        logger.info(f"{label}: --dataset_text_field {text_field} is no column of these rows: they are read by their "
                    "own columns (messages, or prompt and completion), as TRL reads them")
    elif text_field != "text":  # TRL's dataset_text_field: that column is each row's text
        if text_field not in columns:
            raise DataError(f"{label}: --dataset_text_field {text_field}: no such column (columns found: "
                            f"{', '.join(map(str, columns))})")
        data = [{**{k: v for k, v in row.items() if k not in (text_field, "text")}, "text": row.get(text_field)}
                if isinstance(row, dict) else row for row in data]
        columns = {("text" if k == text_field else k): v for k, v in columns.items() if k != "text"}
        format = "text" if format == "auto" else format
    format = detect_format(columns, kind, label) if format == "auto" else format
    normalise, required = _TABLES[kind][format]
    for column in required:
        if column not in columns:
            raise DataError(f"{label}: format {format!r} needs column {column!r}, which is missing (columns found: "
                            f"{', '.join(map(str, columns))}). Rename it, or pick the right --dataset_format.")
    out, skipped, rows_at = [], list(read.skipped), []  # rows_at: each kept row's number in `data`
    carried = [c for c in _TEMPLATE_COLUMNS if c in columns]
    for i, row in enumerate(data):
        try:
            if not isinstance(row, dict):
                raise _bad(None, "an object with named fields", row)
            out.append({**normalise(row), **{c: _template_column(row.get(c), c) for c in carried}})
            rows_at.append(i)
        except _RowError as e:
            field = f"field '{e.field}': " if e.field else ""
            reason = f"{read.place(i)}: {field}{e.problem}."
            if not skip_invalid:
                raise RowInvalid(reason, _FIX) from None
            skipped.append(reason)
    skipped_rows(label, skipped, len(data) + len(read.skipped), len(out))
    out = _one_kind(out, label)
    if kind == "sft" and (notice := ends_without_answer(out, lambda j: read.place(rows_at[j]))):
        logger.warning(f"{label}: {notice}")  # TRL trains such rows as they are: so does alignkit, saying so
    if kept is not None:
        kept.extend(rows_at)
    return as_dataset(out)


def _is_text(row) -> bool:
    """A normalised row in TRL's standard format (texts) rather than the conversational one (message lists)."""
    return any(isinstance(row.get(field), str) for field in ("prompt", "chosen", "completion", "text"))


def _one_kind(rows, label) -> list[dict]:
    """TRL reads a dataset as conversational or standard from its first row (trl.data_utils.is_conversational),
    and Arrow keeps one type per column: where texts and message lists mix, the texts become conversations."""
    texts = sum(map(_is_text, rows))
    if texts in (0, len(rows)):
        return rows
    logger.info(f"{label}: {texts} of {len(rows)} rows are texts among conversations: read as one user and one "
                "assistant turn each (TRL's standard format needs every row as text)")
    return [as_conversation(row) for row in rows]


def as_conversation(row: dict) -> dict:
    """A normalised row with its texts as one user turn (the prompt) and assistant turns (the answers), as rows in
    TRL's standard format are read beside conversational ones (a dataset or a dataset_mixture of both kinds)."""
    return {k: _turn("user" if k == "prompt" else "assistant", v)
            if k in ("prompt", "chosen", "rejected", "completion") and isinstance(v, str) else v
            for k, v in row.items()}


def is_text_dataset(data: datasets.Dataset) -> bool:
    """A normalised dataset in TRL's standard format (texts), as its first row says (rows are of one kind)."""
    return len(data) > 0 and _is_text(data[0])


def _template_column(value, column):
    if column == "chat_template_kwargs" and value is not None and not isinstance(value, Mapping):
        raise _bad(column, "a mapping of chat template arguments, e.g. {\"enable_thinking\": false}", value)
    if column == "tools":  # as TRL's trainers read it: JSON text decoded, and no tools (None, [], "") as None
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except ValueError:
                raise _bad(column, "a list of tool schemas, or that list as JSON text", value) from None
        if value and not (isinstance(value, list) and all(isinstance(t, Mapping) for t in value)):
            raise _bad(column, "a list of tool schemas ({\"type\": \"function\", \"function\": {...}})", value)
        return value or None
    return {} if value is None and column == "chat_template_kwargs" else value  # TRL unpacks it: never None


def template_arguments(row: dict, where: str) -> dict:
    """A prompt row's `tools` and `chat_template_kwargs` checked as training rows' are, in the form the chat template
    takes them ({"tools": [...], **kwargs}; no tools left out). A bad one is one line naming `where` (file and row)
    and the field."""
    try:
        tools, kwargs = (_template_column(row.get(c), c) for c in ("tools", "chat_template_kwargs"))
    except _RowError as e:
        raise RowInvalid(f"{where}: field '{e.field}': {e.problem}.", "Fix the row, or leave the column out") from None
    return {**({"tools": tools} if tools else {}), **kwargs}


def load_preferences(source, format="auto", split="train", skip_invalid=False, config_name=None,
                     kept: list | None = None) -> datasets.Dataset:
    """Preference pairs: `prompt` (the turns before the answer), `chosen` and `rejected` ([assistant turn]); or
    the three as texts, for TRL's standard format. `kept`, a list, gets the source row number of each pair (the
    rows --skip_invalid kept: reward.py's margins are read by them)."""
    return _load("preference", source, format, split, skip_invalid, config_name, kept=kept)


def load_sft(source, format="auto", split="train", skip_invalid=False, config_name=None,
             text_field="text") -> datasets.Dataset:
    """SFT rows: `messages`, or `prompt`/`completion` message lists (or texts), or `text`, depending on the data.
    text_field: the column of plain text (TRL's dataset_text_field), read as the text format."""
    return _load("sft", source, format, split, skip_invalid, config_name, text_field)


def load_unpaired(source, format="auto", split="train", skip_invalid=False, config_name=None) -> datasets.Dataset:
    """Labelled answers for KTO: `prompt` (the turns before the answer), `completion` ([assistant turn]; both texts
    for TRL's standard format) and `label`
    (True: desirable). Preference pairs in any supported format become two rows each: chosen True, rejected False."""
    data = _load("unpaired", source, format, split, skip_invalid, config_name)
    if "label" in data.column_names:
        return data
    carried = [c for c in _TEMPLATE_COLUMNS if c in data.column_names]
    return as_dataset([
        {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen", **{c: row[c] for c in carried}}
        for row in data for side in ("chosen", "rejected")
    ])
