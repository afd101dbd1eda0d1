"""Reading data sources into rows: a .json/.jsonl/.parquet/.csv file, a folder of such files (or one written by
save_to_disk), a Dataset, a list of dicts or a Hub dataset. Every row keeps its place (its file and row, or its
line in a JSON-lines file), so that a message about it can name them; a file that cannot be read is reported with
its line and the fix. alignkit.core.data turns the rows into the conversational layout."""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
from typing import NamedTuple

import datasets

from alignkit.core.errors import UserError

__all__ = ["DataError", "FILE_TYPES", "RowInvalid", "Rows", "load_rows", "read_rows", "single_file", "split_names",
           "skipped_rows"]

logger = logging.getLogger("alignkit")

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(UserError):
    """A problem in the user's data or data arguments; the message says where it is and how to fix it."""


class RowInvalid(DataError):
    """One row's problem: the message is `reason` ("FILE: row N: field F: what is wrong.") then `fix`. A reader under
    --skip_invalid keeps the reason alone (skipped_rows): a skipped row needs no fix."""

    def __init__(self, reason: str, fix: str = "Fix the row."):
        super().__init__(f"{reason} {fix}")
        self.reason, self.fix = reason, fix

    def __reduce__(self):  # pickled or copied as made: its args are the whole message, not (reason, fix)
        return type(self), (self.reason, self.fix)


def skipped_rows(label: str, skipped: list[str], read: int, kept: int, warn: bool = True) -> None:
    """--skip_invalid's reckoning, the same for every reader of rows (the training loaders, label.py's and rl.py's
    prompts and responses files): no row kept is one error naming the first problem; some rows skipped is one
    warning (not `warn`: a check of rows read again later, which says it then)."""
    if skipped and not kept:
        raise DataError(f"{label}: no usable rows: all {read} rows are invalid. First problem: {skipped[0]}")
    if skipped and warn:
        logger.warning("%s: skipped %d of %d rows as invalid (--skip_invalid). First problem: %s",
                       label, len(skipped), read, skipped[0])


def _show(value):
    if value is None:
        return "nothing (the field is missing or null)"
    text = repr(value)
    return f"{type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


class Rows(NamedTuple):
    """Rows as read, before any table is built (so a column may hold different types in different rows)."""

    rows: list | datasets.Dataset
    label: str
    places: list | None = None  # per row: its row (line) number in `label`, or (file, number); None: 1..n
    skipped: tuple = ()  # read with skip_invalid: the JSON lines that did not parse, each as skipped_rows says it
    skipped_at: tuple = ()  # their line numbers, in the same order

    def place(self, i) -> str:
        """Row i's place as a message starts with it: "FILE: row N"."""
        where = self.places[i] if self.places else i + 1
        return f"{where[0]}: row {where[1]}" if isinstance(where, tuple) else f"{self.label}: row {where}"

    def skipped_before(self, row: int | None = None) -> list[str]:
        """The `skipped` lines before row `row` (by index), all of them for None: a reader that stops after a row
        (--max_prompts) never read the lines past it, and a line it never read is not one it skipped."""
        if row is None or not self.skipped_at:
            return list(self.skipped)
        line = self.places[row] if self.places else row + 1
        return [said for said, at in zip(self.skipped, self.skipped_at) if at < line]

    def columns(self) -> list[str]:
        """Every row's columns, in order of appearance."""
        if isinstance(self.rows, datasets.Dataset):
            return list(self.rows.column_names)
        return list(dict.fromkeys(key for row in self.rows if isinstance(row, dict) for key in row))

    def as_list(self) -> list:
        """The rows as a list, each as read (a row that is no object too: its reader says so, by its place)."""
        return self.rows.to_list() if isinstance(self.rows, datasets.Dataset) else self.rows

    def dicts(self) -> list[dict]:
        """The rows as dicts; a row that is no object is refused, by its place."""
        rows = self.as_list()
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{self.place(i)}: expected an object with named fields, got {_show(row)}. "
                                "Fix the row.")
        return rows

    def keep(self, columns) -> Rows:
        """Only these columns (a dataset_mixture entry's `columns`); a missing one is refused."""
        missing = [c for c in columns if c not in self.columns()]
        if missing:
            raise DataError(f"{self.label}: dataset_mixture columns {missing} are missing (columns found: "
                            f"{', '.join(self.columns())}). Fix the entry's columns, or the data.")
        if isinstance(self.rows, datasets.Dataset):
            return self._replace(rows=self.rows.select_columns(list(columns)))
        return self._replace(rows=[{c: r.get(c) for c in columns} if isinstance(r, dict) else r for r in self.rows])


# ---------------------------------------------------------------- sources
def load_rows(source, split="train", config_name=None) -> tuple[datasets.Dataset, str]:
    """Load `source` (a file, folder, Dataset, list of dicts or Hub id) as a Dataset; return (dataset, label)."""
    read = read_rows(source, split, config_name)
    if isinstance(read.rows, datasets.Dataset):
        return read.rows, read.label
    rows, columns = read.dicts(), read.columns()
    try:  # every row's columns, not only the first row's (Dataset.from_list drops the others)
        return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns}), read.label
    except Exception as e:  # pyarrow refuses a column whose type differs between rows
        raise DataError(_type_clash(read, rows, columns) or f"{read.label}: cannot build a table of the rows "
                        f"({e}). Give each column one type in every row.") from e


def _arrow_ok(values) -> bool:
    import pyarrow as pa

    try:
        pa.array(values)
        return True
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return False


def _type_clash(read, rows, columns) -> str | None:
    """The first row whose value a table cannot hold beside the rows before it, as a message (None: not found)."""
    for column in columns:
        values = [row.get(column) for row in rows]
        if _arrow_ok(values):
            continue
        lo, hi = 0, len(values) - 1  # the shortest failing prefix ends at the culprit
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if _arrow_ok(values[:mid + 1]) else (lo, mid)
        where = f"{read.place(lo)}: field '{column}'"
        first = next((i for i in range(lo) if values[i] is not None), None)
        if first is None:
            return (f"{where}: holds values of different types ({_show(values[lo])}), which a table cannot store. "
                    "Fix the row.")
        was, got = values[first], values[lo]
        source, _, row = read.place(first).rpartition(": ")
        earlier = row if source == read.place(lo).rpartition(": ")[0] else read.place(first)
        expected = (f"a value shaped like {earlier}'s ({_show(was)})" if type(was) is type(got)
                    else f"{type(was).__name__} as in {earlier}")
        return f"{where}: expected {expected}, got {_show(got)}; a column holds one type in every row. Fix the row."
    return None


def read_rows(source, split="train", config_name=None, skip_invalid=False) -> Rows:
    """The rows of `source` (see load_rows) with their places, without building a table. skip_invalid: a JSON line
    that does not parse is left out and named in the Rows' `skipped` (its reader counts it, --skip_invalid)."""
    if isinstance(source, Rows):
        return source
    if isinstance(source, datasets.DatasetDict):
        return Rows(_pick_split(source, split, "<DatasetDict>"), f"<DatasetDict split {split}>")
    if isinstance(source, datasets.Dataset):
        return Rows(source, "<in-memory dataset>")
    if isinstance(source, (list, tuple)):
        return Rows(list(source), "<list of rows>")
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"unsupported data source of type {type(source).__name__}; pass a file path, a folder, "
                        "a Hub dataset id, a datasets.Dataset or a list of dicts")
    label = os.fspath(source)
    path = os.path.expanduser(label)
    if os.path.isfile(path):
        return _read_file(path, label, skip_invalid)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            return _read_folder(path, label, split)
        try:
            return Rows(_pick_split(datasets.load_from_disk(path), split, label), label)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{label}: cannot load the folder written by save_to_disk: {e}") from e
    check_exists(label)
    label += f" (config {config_name}, split {split})" if config_name else f" (split {split})"
    try:
        return Rows(datasets.load_dataset(os.fspath(source), config_name, split=split), label)
    except Exception as e:
        raise DataError(f"{label}: no such local file or folder, and loading it as a Hugging Face Hub dataset "
                        f"failed: {e}") from e


def check_exists(source: str) -> None:
    """A data source that names a local file or folder (by its form) must be there: one line, before any work."""
    label = os.fspath(source)
    path = os.path.expanduser(label)
    if not os.path.exists(path) and (not _HUB_ID.match(label) or label.lower().endswith(FILE_TYPES)):
        raise DataError(f"{label}: file not found. Pass an existing {', '.join(FILE_TYPES)} file, a dataset "
                        "folder, or a Hub dataset id such as 'owner/name'.")


def single_file(source) -> bool:
    """Whether `source` names one local file: it has no splits, whatever split is asked for."""
    return isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.expanduser(os.fspath(source)))


def split_names(source, config_name=None) -> list[str]:
    """The splits `source` has, as read_rows reads them (a single file, a Dataset or a list: train alone)."""
    if isinstance(source, datasets.DatasetDict):
        return list(source)
    if not isinstance(source, (str, os.PathLike)):
        return ["train"]
    label = os.fspath(source)
    path = os.path.expanduser(label)
    if os.path.isfile(path):
        return ["train"]
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):  # save_to_disk's DatasetDict
            with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
                return list(json.load(f).get("splits", []))
        if os.path.exists(os.path.join(path, "state.json")):  # save_to_disk's Dataset: every split is it
            return ["train"]
        return list(_splits(path, _data_files(path)))
    check_exists(label)
    try:
        return list(datasets.get_dataset_split_names(label, config_name))
    except Exception as e:
        raise DataError(f"{label}: no such local file or folder, and listing its splits as a Hugging Face Hub "
                        f"dataset failed: {e}") from e


def _pick_split(data, split, label):
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{label}: no split {split!r}; the splits are {', '.join(data)}. Pass one of them.")
        return data[split]
    return data


# ---------------------------------------------------------------- folders
def _data_files(path) -> list[str]:
    found = []
    for top, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if not f.startswith((".", "__")))
        found += [os.path.join(top, f) for f in sorted(files) if f.lower().endswith(FILE_TYPES)
                  and not f.startswith(".")]
    return found


def _splits(path, files) -> dict[str, list[str]]:
    """{split: files}, as load_dataset names a folder's splits (train.jsonl, data/test-00000-of-00001.parquet)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(path), path)
    except Exception:  # no file the library counts as data: every one of ours is the train split
        resolved = {}
    wanted = {os.path.abspath(f) for f in files}
    splits = {str(name): [f for f in found if os.path.abspath(f) in wanted] for name, found in resolved.items()}
    return {name: found for name, found in splits.items() if found} or {"train": files}


def _split_hint(path, files, splits, split) -> str:
    """How to make `split` a split of the folder, as load_dataset reads file names: train, test and validation
    from a name's start (train_prefs.jsonl is train), any other name only as data/NAME-00000-of-00001.EXT."""
    ext = os.path.splitext(files[0])[1]
    if split in ("train", "test", "validation"):
        return f"Pass one of them, or name a file after the split (e.g. {split}{ext})."
    named = next((f for f in files if os.path.splitext(os.path.basename(f))[0] == split), None)
    read_as = next((name for name, found in splits.items() if named in found), None) if named else None
    said = f"{os.path.relpath(named, path)} is the split {read_as!r}: a file name that starts with train, test or " \
           "validation makes that split. " if read_as else ""
    return (f"{said}Pass one of them, or name the file data/{split}-00000-of-00001{ext} (how the datasets library "
            "names any other split).")


def _read_folder(path, label, split) -> Rows:
    files = _data_files(path)
    if not files:
        others = sorted(n for n in os.listdir(path) if not n.startswith("."))
        held = f"it holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}" if others else "it is empty"
        raise DataError(f"{label}: the folder holds no {', '.join(FILE_TYPES)} data files ({held}). Put the rows in "
                        "such a file, or pass the data file itself.")
    splits = _splits(path, files)
    if split not in splits:
        raise DataError(f"{label}: no split {split!r}; the folder's files make the split(s) {', '.join(splits)}. "
                        f"{_split_hint(path, files, splits, split)}")
    rows, places, columns = [], [], {}
    for file in splits[split]:
        name = os.path.join(label, os.path.relpath(file, path))
        read = _read_file(file, name)
        rows += read.rows
        places += [(name, read.places[i] if read.places else i + 1) for i in range(len(read.rows))]
        if len(read.rows):
            columns[name] = read.columns()
    first = next(iter(columns), None)
    differ = [name for name in columns if set(columns[name]) != set(columns[first])]
    if differ:
        shown = "; ".join(f"{name} has {', '.join(map(str, columns[name])) or 'none'}" for name in [first, *differ[:3]])
        raise DataError(f"{label}: the folder's files hold different columns: {shown}. Give every file the same "
                        "columns, or load the files apart (e.g. one dataset_mixture entry each).")
    return Rows(rows, label, places)


# ---------------------------------------------------------------- files
def _read_file(path, label, skip_invalid=False) -> Rows:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"{label}: unsupported file type {suffix!r}; use one of {', '.join(FILE_TYPES)}")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return Rows(pq.read_table(path).to_pylist(), label)
        with open(path, "rb") as f:
            raw = f.read()
    except (OSError, ValueError) as e:
        raise DataError(f"{label}: cannot read the file: {e}") from e
    text = decode_text(raw, label)
    return _read_csv(text, label) if suffix == ".csv" else _read_json(text, label, skip_invalid)


def decode_text(raw: bytes, label) -> str:
    """The file's text; a UTF-8 byte order mark (Excel's "CSV UTF-8", some editors) is dropped, as utf-8-sig does.
    Not UTF-8 is one line naming the line, the byte and the fix: the one wording for every file alignkit reads
    (data, prompts, eval sets, caches: alignkit.core.journal.read_jsonl)."""
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line, column = raw.count(b"\n", 0, e.start) + 1, len(raw[start:e.start].decode("utf-8", "replace")) + 1
        excel = " (in Excel: CSV UTF-8)" if str(label).lower().endswith((".csv", ".tsv")) else ""
        raise DataError(f"{label}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}). "
                        f"Save the file as UTF-8{excel}.") from None


def _read_csv(text, label) -> Rows:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, places = [], []  # each row by its first line, as an editor numbers it (the header is line 1)
    try:
        ended, lines = (1 if text.strip() else 0), text.split("\n")  # the header's last line
        for row in reader:
            start = ended + 1 + _blank_lines_before(lines, ended)
            ended = reader.line_num
            if None in row:  # more values than the header names: the columns would be shifted
                raise DataError(f"{label}: row {start}: {len(reader.fieldnames) + len(row[None])} values, but the "
                                f"header names {len(reader.fieldnames)} columns. Fix the row (quote a value that "
                                "holds a comma).")
            rows.append(row)
            places.append(start)
    except csv.Error as e:
        raise DataError(f"{label}: line {reader.line_num}: cannot read the CSV ({e}). Fix the line.") from e
    return Rows(rows, label, places)


def _blank_lines_before(lines: list[str], after: int) -> int:
    """The blank lines right after line `after` (csv skips them before a row)."""
    n = 0
    while after + n < len(lines) and not lines[after + n].strip("\r"):
        n += 1
    return n


def _parses(text) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _read_json(text, label, skip_invalid=False) -> Rows:
    if not text.strip():
        return Rows([], label)
    try:  # a JSON array (or one object) ...
        data = json.loads(text)
        if isinstance(data, (list, dict)):
            return Rows(data if isinstance(data, list) else [data], label)
        whole = None
    except json.JSONDecodeError as e:
        whole = e
    lines = [line for line in text.splitlines() if line.strip()]
    # Not one object per line, unless --skip_invalid and most lines are (a JSON-lines file whose first line is broken)
    rows_file = skip_invalid and 2 * sum(line.lstrip().startswith("{") and _parses(line) for line in lines) > len(lines)
    if whole is not None and lines[0].lstrip()[:1] in ("[", "{") and not _parses(lines[0]) and not rows_file:
        line, column, problem = _json_problem(text, whole)
        raise DataError(f"{label}: line {line}: invalid JSON ({problem} at column {column}). Fix it there: the "
                        "file must hold one JSON array of objects, or one JSON object per line.") from None
    rows, numbers, skipped, skipped_at = [], [], [], []  # ... or JSON lines, numbered by line: "row N" is line N
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                reason = f"{label}: line {number}: invalid JSON ({_problem(e)} at column {e.colno})."
                if not skip_invalid:
                    raise DataError(f"{reason} Fix the line so that it holds one JSON object.") from e
                skipped.append(reason)
                skipped_at.append(number)
                continue
            numbers.append(number)
    return Rows(rows, label, numbers, tuple(skipped), tuple(skipped_at))


def _json_problem(text, error) -> tuple[int, int, str]:
    """(line, column, problem) of a whole-document JSON error; a trailing comma is named at the comma itself."""
    before = text[:error.pos].rstrip()
    if before.endswith(",") and text[error.pos:error.pos + 1] in ("]", "}"):
        at = len(before) - 1
        return text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at), f"a trailing comma before '{text[error.pos]}'"
    return error.lineno, error.colno, _problem(error)


def _problem(error) -> str:
    """json's message without its dangling "at" ("Unterminated string starting at"): the column follows."""
    return error.msg.removesuffix(" at")

