"""label.py's inputs read and checked: the prompts (--prompts, or --responses_a's) and the responses of a file
(--responses_a/_b), each row kept with its place ("FILE: row N") so that a message names it. alignkit.feedback.labeling
reads them into a run; rl.py and rlaif.py read prompts and responses files with the same code.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from alignkit.core.args import ConfigError
from alignkit.core.data import DataError, hh_prompt_messages, is_hh_prompt, template_arguments
from alignkit.core.data_files import RowInvalid, skipped_rows
from alignkit.core.digests import digest
from alignkit.core.row_checks import kept_message
from alignkit.feedback.label_records import Prompt

RESPONSE_FIELDS = ("response", "completion", "output", "answer")

# ---------------------------------------------------------------------------------------------------------
# Prompts


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _cell(row, column: str, place: str):
    """`row`'s value of `column`; a row without the field (a misspelt key) is one line naming it, where it read as
    an empty cell: "expected non-empty text ... got None" for a prompt, a response silently skipped."""
    if not isinstance(row, dict):  # a row of a list (7, "text"): skipped as any bad row under --skip_invalid
        raise RowInvalid(f"{place}: expected an object with named fields, got {_show(row)}.")
    if column not in row:
        from alignkit.core.row_checks import no_field

        raise RowInvalid(f"{place}: {no_field(row, column)}.")
    return row.get(column)


def _as_messages(value, where: str) -> list[dict]:
    """A prompt cell as role/content messages ending with a user turn. `where` is 'FILE: row N: field F'."""
    if is_hh_prompt(value):  # an HH prompt (split HH data): its turns, not one message holding the markers
        try:
            return hh_prompt_messages(value)
        except DataError as e:
            raise RowInvalid(f"{where}: {e}.") from None
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    # Messages keep their tool calls, tool turns and reasoning (alignkit.core.row_checks.kept_message): the template
    # renders them as in training. A context may end with a tool's result: the model answers from it.
    messages = [kept_message(m) for m in value] if isinstance(value, list) and value else [None]
    if all(messages):
        while messages and messages[-1]["role"] == "assistant":  # a whole conversation: its last answer goes
            messages.pop()
        if messages and (messages[-1]["role"] == "tool" or
                         messages[-1]["role"] == "user" and messages[-1]["content"].strip()):
            return messages
    raise RowInvalid(f"{where}: expected non-empty text, or role/content messages ending with a user (or tool) turn, "
                     f"got {_show(value)}.", "Fix the row, or point --prompt_field at the column holding the prompts.")


def _rows(source, split="train", config=None, skip_invalid=False):
    """(columns, rows, label, place(i) -> "FILE: row N", skipped_before(i) -> the lines skip_invalid skipped as
    invalid JSON before row i, all of them for None); no table is built, so a prompt column may hold text in one
    row and messages in another."""
    from alignkit.core.data import read_rows

    read = read_rows(source, split, config, skip_invalid)
    skipped_rows(read.label, list(read.skipped), len(read.skipped), len(read.rows), warn=False)  # every line invalid
    if len(read.rows) == 0:  # not "no column 'prompt' (columns: )"
        raise DataError(f"{read.label}: no rows: it is empty. Point it at data with rows.")
    # each row checked by _cell (--skip_invalid); the lines skipped are counted with the rows it skips
    return read.columns(), read.as_list(), read.label, read.place, read.skipped_before


def _column(columns, wanted: str, label: str, flag: str, fallbacks=()) -> str:
    for name in (wanted, *fallbacks):
        if name in columns:
            return name
    raise DataError(f"{label}: no column {wanted!r} (columns: {', '.join(columns)}). Pass {flag} with the column "
                    "that holds it.")


def check_prompts_split(s) -> None:
    """A single prompts file has no splits: a --prompts_split other than train is refused, as sft.py, dpo.py and
    reward.py refuse --dataset_split on one (alignkit.core.mixture.check_file_splits), rather than ignored with
    the whole file read. Without --prompts the prompts come from a responses file, a single file too."""
    from alignkit.core.data_files import single_file

    source = s.prompts or s.responses_a or s.responses_b
    if s.prompts_split != "train" and single_file(source):
        raise ConfigError(f"--prompts_split {s.prompts_split}: {source} is a single file, which has no splits (the "
                          "whole file is the prompts). Drop --prompts_split, or pass a folder or Hub dataset that has "
                          f"a {s.prompts_split} split")


def check_inputs(s) -> None:
    """The local input files checked as the prompts and responses cells read them (invalid JSON, no rows, a bad row)
    before anything is written beside the output (a run they stopped left its settings and an empty cache there).
    Rows --skip_invalid skips are said when the run reads them, not here too."""
    if not s.prompts or Path(s.prompts).exists():
        prompts_from(s, Counter(), quiet=True)
    for path in (s.responses_a, s.responses_b):
        if path:
            response_rows(path, s, quiet=True)


def prompts_from(s, stats: Counter, quiet: bool = False) -> tuple[list[Prompt], str]:
    """load_prompts' reading and checks, counting what it drops in `stats`: (the prompts, the source's label).
    quiet: rows --skip_invalid skips are not said (check_inputs: the run reads them again)."""
    check_prompts_split(s)
    skip = getattr(s, "skip_invalid", False)
    if s.prompts:
        columns, rows, label, place, bad = _rows(s.prompts, s.prompts_split, s.prompts_config, skip)
    else:
        columns, rows, label, place, bad = _rows(s.responses_a or s.responses_b, skip_invalid=skip)
    column = _column(columns, s.prompt_field, label, "--prompt_field", () if s.prompts else ("prompt",))
    prompts, seen, skipped, read, stopped = [], set(), [], 0, None
    for i, row in enumerate(rows):
        read = i + 1
        try:
            prompt = Prompt(_as_messages(_cell(row, column, place(i)), f"{place(i)}: field '{column}'"), place=place(i),
                            row=row if getattr(s, "keep_rows", False) else None,
                            template=template_arguments(row, place(i)))
        except RowInvalid as e:  # rl.py's --skip_invalid, as the training scripts' loaders skip (alignkit.core.data)
            if not getattr(s, "skip_invalid", False):
                raise
            skipped.append(e.reason)
            continue
        value = row.get(column)
        if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            stats["prompts ending with an answer"] += 1
        if prompt.key in seen and not getattr(s, "keep_rows", False):
            stats["duplicate prompts"] += 1
            continue
        seen.add(prompt.key)
        prompts.append(prompt)
        if s.max_prompts and len(prompts) >= s.max_prompts:
            stopped = i
            break
    # Only the invalid lines before the last row read: one past --max_prompts was never read ("skipped 1 of 3 rows"
    # named a line the run had not reached).
    bad = bad(stopped)
    # Without --prompts they are a responses file's, whose own read (response_rows) says the rows it skips, bad
    # responses too, in one line.
    skipped_rows(label, bad + skipped, read + len(bad), len(prompts), warn=not quiet and bool(s.prompts))
    if not prompts:
        raise DataError(f"{label}: no prompts: the dataset is empty")
    return prompts, label


# ---------------------------------------------------------------------------------------------------------
# Responses


def _response_text(value, where: str) -> str | None:
    """A response cell as text: a string, or an assistant message (list); None when the cell is null."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        if value[-1].get("role") != "assistant":
            raise RowInvalid(f"{where}: expected the last message to be the assistant's, got role "
                             f"{value[-1].get('role')!r}.")
        value = value[-1].get("content")
    if value is None or isinstance(value, str):
        return value
    raise RowInvalid(f"{where}: expected the response as text or an assistant message, got {_show(value)}.",
                     "Fix the row, or pass --response_field with the right column.")


def response_rows(path: str, s, quiet: bool = False) -> tuple[str, list[tuple[Prompt, str | None]]]:
    """A responses file's prompt column, and its rows as (prompt, response) in file order; each prompt keeps its
    place. With --skip_invalid a bad row is skipped and counted (skipped_rows, as prompts_from's): its prompt has no
    response from this file, and its pair is skipped as any prompt the file lacks. quiet: as prompts_from's."""
    columns, rows, label, place, bad = _rows(path, skip_invalid=getattr(s, "skip_invalid", False))
    prompt_column = _column(columns, s.prompt_field, label, "--prompt_field", ("prompt",))
    if s.response_field == "auto":
        found = [c for c in RESPONSE_FIELDS if c in columns]
        if not found:
            raise DataError(f"{label}: no response column (looked for {', '.join(RESPONSE_FIELDS)}; columns: "
                            f"{', '.join(columns)}). Pass --response_field with the column that holds the responses.")
        response_column = found[0]
    else:
        response_column = _column(columns, s.response_field, label, "--response_field")
    bad = bad()  # the whole file is read
    out, skipped = [], list(bad)
    for i, row in enumerate(rows):
        where = f"{place(i)}: field"
        try:
            prompt = Prompt(_as_messages(_cell(row, prompt_column, place(i)), f"{where} '{prompt_column}'"),
                            place=place(i), template=template_arguments(row, place(i)))  # matched with their tools
            response = _response_text(_cell(row, response_column, place(i)), f"{where} '{response_column}'")
        except RowInvalid as e:  # --skip_invalid: its prompt has no response from this file, as one it lacks
            if not getattr(s, "skip_invalid", False):
                raise
            skipped.append(e.reason)
            continue
        out.append((prompt, response))
    skipped_rows(label, skipped, len(rows) + len(bad), len(out), warn=not quiet)
    return prompt_column, out


def _row_of(place: str, other: str) -> str:
    """`other` ("FILE: row N") as "row N" when it is in the same file as `place`, else whole."""
    source, _, row = other.rpartition(": ")
    return row if source == place.rpartition(": ")[0] else other


def by_prompt(column: str, rows: list[tuple[Prompt, str | None]]) -> dict[str, str | None]:
    """{prompt key: response}. A prompt repeated with the same response counts once; with a different one, which
    response to pair is ambiguous, so it is refused, naming both rows, rather than one kept silently."""
    out: dict[str, str | None] = {}
    first: dict[str, str] = {}
    for prompt, text in rows:
        if prompt.key in out and out[prompt.key] != text:
            earlier = _row_of(prompt.place, first[prompt.key])
            raise DataError(f"{prompt.place}: field '{column}': the same prompt as {earlier} but a different response, "
                            "so which one to pair is ambiguous. Keep one row per prompt (delete or merge the other)")
        out.setdefault(prompt.key, text)
        first.setdefault(prompt.key, prompt.place)
    return out


def read_responses(path: str, s) -> dict[str, str | None]:
    """A responses file as {prompt key: response}, matched to the prompts by the prompt itself (not by row)."""
    return by_prompt(*response_rows(path, s))


def _brief(prompt: Prompt) -> str:
    """A prompt for a message: its text (its turns when there are several), both ends kept when it is long, where
    a stray space or line break shows."""
    value = prompt.messages[0]["content"] if len(prompt.messages) == 1 else prompt.messages
    text = repr(value)
    return text if len(text) <= 70 else f"{text[:40]}...{text[-25:]}"


def no_match(path: str, column: str, rows, prompts: list[Prompt]) -> str:
    """Why a responses file pairs with nothing: none of its prompts is one of the prompts to label. Prompts match
    exactly (as their cache keys hash them), so the example is a pair that differs only in leading or trailing
    whitespace when there is one, else the first row of each."""
    def stripped(prompt):
        return digest([{**m, "content": m["content"].strip()} for m in prompt.messages])

    near = {stripped(p): p for p in reversed(prompts)}
    theirs, ours = next(((r, near[stripped(r)]) for r, _ in rows if stripped(r) in near), (rows[0][0], prompts[0]))
    source = ours.place.rpartition(": ")[0]
    if theirs.messages == ours.messages:  # the same turns: the template columns differ
        why = " (the same turns with other tools or chat_template_kwargs columns)"
        fix = (f"Give its rows the same tools and chat_template_kwargs as {source}, or leave those columns out "
               "(label.py's own output: pass the --chat_template_kwargs it was made with)")
    elif stripped(theirs) == stripped(ours):
        why = " (they differ only in leading or trailing whitespace)"
        fix = "Strip the stray whitespace so the prompts are the same text"
    else:
        why, fix = "", f"Give it the same prompts as {source}, or pass --prompt_field with its column that holds them"
    return (f"{path}: none of its {len({r.key for r, _ in rows})} prompts (field '{column}') is one of the "
            f"{len(prompts)} prompts to label, which are matched exactly: e.g. its "
            f"{theirs.place.rpartition(': ')[2]}, {_brief(theirs)}, and {ours.place}, {_brief(ours)}{why}. {fix}")
