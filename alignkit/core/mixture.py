"""A run's training and held-out data, as its settings name them: one dataset with a held-out share
(--eval_split) or its own test split (--dataset_test_split, TRL's name), or an alignment-handbook dataset mixture.

The mixture is the handbook's (alignment/data.py, get_dataset): each entry's split loaded, its `columns` kept,
a `weight` share of it drawn after a seeded shuffle, all concatenated and shuffled with the mixture's seed, then
`test_split_size` rows (or share) held out. The handbook's older dataset_mixer/dataset_splits become entries with
`test: true` for the test splits (alignkit.core.mixture_formats): those are held out whole. TRL's own mixture
(DatasetMixtureConfig: `datasets` of path/name/split/columns/fraction) comes in with its `fraction`, taken as TRL's
get_dataset takes it: shares normalised over the mixture, the first rows of each, none oversampled. Every entry goes
through the one data normaliser (alignkit.core.data) before its share is drawn, so its rows are checked like any other
data, and a bad one is named by its own file and row.
"""

from __future__ import annotations

import dataclasses
import math

import datasets

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.data import DataError

_ENTRY_KEYS = {"id", "config", "split", "columns", "weight", "fraction", "test"}


def check_mixture(mixture) -> None:
    """Refuse a malformed dataset_mixture before any work, naming the key and the fix."""
    if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list) or not mixture["datasets"]:
        raise ConfigError("dataset_mixture needs a non-empty 'datasets' list: {datasets: [{id: ..., split: ..., "
                          "weight: 1.0}], seed: 0, test_split_size: 0.1}")
    unknown = set(mixture) - {"datasets", "seed", "test_split_size"}
    if unknown:
        raise ConfigError(f"dataset_mixture: unknown key(s) {', '.join(sorted(unknown))}; the keys are datasets, "
                          "seed and test_split_size")
    columns = []
    for i, entry in enumerate(mixture["datasets"], 1):
        if not isinstance(entry, dict) or not entry.get("id") or not isinstance(entry["id"], str):
            raise ConfigError(f"dataset_mixture: dataset {i} needs an 'id' (a Hub dataset id or a local file/folder)")
        where = f"dataset_mixture: dataset {i} ({entry['id']})"
        if set(entry) - _ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(set(entry) - _ENTRY_KEYS))}; the keys "
                              f"are {', '.join(sorted(_ENTRY_KEYS))}")
        for key in ("split", "config"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ConfigError(f"{where}: {key} {entry[key]!r} must be a name, e.g. {key}: train")
        if "test" in entry and not isinstance(entry["test"], bool):
            raise ConfigError(f"{where}: test {entry['test']!r} must be true (held out whole) or false")
        weight = entry.get("weight")
        if weight is not None and not (_number(weight) and 0 < weight <= 1):
            raise ConfigError(f"{where}: weight {weight!r} must be a share in (0, 1]")
        fraction = entry.get("fraction")
        if fraction is not None and not (_number(fraction) and fraction > 0):
            raise ConfigError(f"{where}: fraction {fraction!r} must be a share above 0 (TRL's: the shares are "
                              "normalised over the mixture)")
        if fraction is not None and (weight is not None or entry.get("test")):
            raise ConfigError(f"{where}: fraction (TRL's mixture) beside {'weight' if weight is not None else 'test'}"
                              " (the handbook's): use one format")
        kept = entry.get("columns")
        if kept is not None and not (isinstance(kept, list) and all(isinstance(c, str) for c in kept)):
            raise ConfigError(f"{where}: columns {kept!r} must be a list of column names, e.g. "
                              "columns: [prompt, chosen, rejected]")
        if kept is not None:
            columns.append(sorted(kept))
    fractions = [e.get("fraction") is not None for e in mixture["datasets"]]
    if any(fractions) and not all(fractions):
        raise ConfigError("dataset_mixture: fraction must be set for every dataset of the mixture or for none (as "
                          "in TRL)")
    if any(c != columns[0] for c in columns):
        raise ConfigError(f"dataset_mixture: the datasets keep different columns {columns}; they must match")
    seed = mixture.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"dataset_mixture: seed {seed!r} must be a whole number >= 0, e.g. seed: 42")
    size = mixture.get("test_split_size")
    if size is not None and not (_number(size) and size > 0 and (size < 1 or size == int(size))):
        raise ConfigError(f"dataset_mixture: test_split_size {size!r} must be a share below 1, or a whole number "
                          "of rows, e.g. test_split_size: 0.1")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# A dataset's attribute: the settings that shape its rows as it was read, which prepare_run compares with its own (a
# notebook's Data cell that failed after the settings changed leaves the data read under the earlier ones in place).
READ_UNDER = "_alignkit_read_under"
# The settings the loaders read (the data group, the split's seed, rl.py's prompts, reward.py's margins): another
# learning rate set between the Data and Run folder cells leaves the rows as they are.
DATA_SETTINGS = ("dataset_id", "dataset_config", "dataset_split", "dataset_test_split", "eval_split", "max_samples",
                 "dataset_format", "dataset_text_field", "dataset_mixture", "skip_invalid", "seed", "max_prompts",
                 "prompt_field", "use_margin")


# A held-out dataset's attribute: where its rows come from, which a run records (alignkit_config.json's held_out,
# with their count) and its card names: {"split": NAME} (a split of its own: --dataset_test_split, auto resolved;
# with "of_rows", its row count, where --max_samples took fewer), {"share": EVAL_SPLIT, "of": SPLIT or None} (held
# out of the training rows: a share below 1, a row count from 1), or {"mixture": "test rows"}.
HELD_OUT = "_alignkit_held_out"


def held_out_from(dataset, **source):
    """`dataset` (a held-out set, or None), marked with where its rows come from (see HELD_OUT)."""
    if dataset is not None:
        setattr(dataset, HELD_OUT, source)
    return dataset


def said_held_out(held: dict | None) -> str | None:
    """Where a run's held-out rows came from, in words, as alignkit_config.json records it (HELD_OUT): for its card."""
    if not isinstance(held, dict) or not isinstance(held.get("rows"), int):
        return None
    share, of = held.get("share"), held.get("of") or "the training rows"
    whole = f"of the {held['of_rows']} " if held.get("of_rows") else ""
    where = (f"{whole + 'rows of ' if whole else ''}split {held['split']}" if held.get("split")
             else f"{whole or 'the '}dataset_mixture's test rows" if share is None
             else f"a {share} share of {of}" if share < 1 else f"rows held out of {of}")
    return f"{held['rows']} ({where})"


def data_settings(s) -> dict:
    """The DATA_SETTINGS of `s` (those it has: a settings class, or any object with such attributes)."""
    return {k: getattr(s, k) for k in DATA_SETTINGS if hasattr(s, k)}


def read_under(s, *data, keys=DATA_SETTINGS) -> tuple:
    """`data`, each dataset marked with the settings of `s` that shaped its rows (see READ_UNDER): `keys`, those a
    reader's rows depend on or were checked against (rl.py's prompts: not the seed nor a held-out share, but the
    generation batch its prompts must fill)."""
    import copy

    settings = copy.deepcopy({k: getattr(s, k) for k in keys if hasattr(s, k)})
    for d in data:
        if d is not None:
            setattr(d, READ_UNDER, settings)
    return data


def split(dataset, s, kind=None):
    """(train, eval or None): a seeded shuffle, --max_samples, then the held-out share (for SFT rows with a prompt,
    preference pairs and KTO's unpaired answers, whole prompts: see _hold_out)."""
    dataset = dataset.shuffle(seed=s.seed)
    if s.max_samples:
        dataset = dataset.select(range(min(s.max_samples, len(dataset))))
    if s.eval_split <= 0:
        return read_under(s, dataset, None)
    train, held_out = _hold_out(dataset, s.eval_split, s.seed, "eval_split", kind)
    from alignkit.core.data_files import single_file  # a file has no splits to name (imported where it is used)

    of = None if single_file(getattr(s, "dataset_id", None)) else getattr(s, "dataset_split", None)
    return read_under(s, train, held_out_from(held_out, share=s.eval_split, of=of))


def _hold_out(dataset, size, seed, name, kind=None):
    """(train, held out): `size` rows (>= 1) or a share (< 1), counted as datasets' train_test_split counts them.
    SFT rows with a prompt ("sft": prompt/completion rows, conversations by their turns before the last assistant
    one: _prompt_keys), preference pairs ("preference") and KTO's unpaired answers ("unpaired") are held out by whole prompts (at
    least that many rows): several answers or pairs sampled for one prompt (label.py --num_samples) otherwise put the
    prompt on both sides, its held-out loss measured on a prompt the model trained on, and a pair read as two answers
    trains its chosen half while its rejected half is scored as unseen. Where every prompt has one row (and for plain
    text rows, which have no prompt) this is the plain split."""
    n = len(dataset)
    if not (_number(size) and size > 0 and (size < 1 or size == int(size))):  # 1.5 was held out as 1 row
        raise ConfigError(f"{name} {size!r} must be a share below 1, or a whole number of rows")
    size = size if size < 1 else int(size)
    held = math.ceil(size * n) if size < 1 else size
    other = "pass 0" if name == "eval_split" else "drop it"
    if n < 2:
        raise ConfigError(f"{name} {size}: {n} row(s) cannot be split into training and held-out rows. Add rows, "
                          f"or {other}")
    if held >= n:
        raise ConfigError(f"{name} {size} leaves no training rows: it holds out {min(held, n)} of the {n} rows. "
                          f"Hold out fewer (a smaller share, or fewer than {n} rows), or {other}")
    keys = _prompt_keys(dataset) if kind in ("sft", "unpaired", "preference") else None
    if keys is not None:
        rows = {"unpaired": "answers", "preference": "pairs"}.get(kind, "rows")
        return _hold_out_prompts(dataset, keys, held, name, other, rows)
    parts = dataset.train_test_split(test_size=size, seed=seed, shuffle=False)
    return parts["train"], parts["test"]


def _prompt_keys(dataset) -> list[str] | None:
    """Each normalised row's prompt, as text to compare: its `prompt` column, or an SFT `messages` row's turns
    before its last assistant turn (with none, a key of its own); None for rows without a prompt (SFT's plain text).
    A row whose turns answer another row's prompt on the way (a conversation cut into one row per turn: [q, a] and
    [q, a, q2, a2]) shares that row's key: held out alone, its answer `a` would be trained on in the other."""
    import json

    def key(turns) -> str:  # a message's keys left None by Arrow (another row's tool_calls) are no part of it
        if isinstance(turns, list):
            turns = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in turns]
        return json.dumps(turns, sort_keys=True, default=str)

    def answered(turns) -> list[int]:  # where an assistant turn answers the turns before it
        return [n for n, m in enumerate(turns) if isinstance(m, dict) and m.get("role") == "assistant"] \
            if isinstance(turns, list) else []

    if "prompt" in dataset.column_names:
        prompts = list(dataset["prompt"])
        answers = [answered(turns) for turns in prompts]  # each prompt's assistant turns, found once
    elif "messages" in dataset.column_names:  # a conversation that opens with its answer has no prompt to share
        conversations = list(dataset["messages"])
        answers = [answered(turns) for turns in conversations]
        prompts = [turns[:max(at, default=0)] or None for turns, at in zip(conversations, answers)]
        answers = [at[:-1] for at in answers]  # the prompt's own: every one before the last, where it ends
    else:
        return None
    keys = [key(p) if p is not None else f"row {i}" for i, p in enumerate(prompts)]
    group = {k: k for k in keys}  # union-find over prompts: a row joins the prompts its turns answer on the way

    def root(k):
        while group[k] != k:
            group[k] = k = group[group[k]]
        return k

    for k, turns, at in zip(keys, prompts, answers):
        for n in at if turns is not None else ():
            if (earlier := key(turns[:n])) in group:
                group[root(earlier)] = root(k)
    return [root(k) for k in keys]


def _hold_out_prompts(dataset, keys, held, name, other, rows="answers"):
    """The last prompts of the (shuffled) rows (`keys`: each row's prompt), every row (answer, pair or SFT row) to
    each, until `held` rows are held out. A prompt with more rows than `held` is passed over while another fits:
    one prompt of 900 rows beside 100 of one row each held out 900 for an --eval_split of 50."""
    from collections import Counter

    answers, chosen, count = Counter(keys), set(), 0
    order = list(dict.fromkeys(reversed(keys)))  # prompts, the one whose last row is last first
    if len(order) == 1:  # one prompt for every row: there is no other way to hold any out
        # (It said "so 1 pairs are held out one by one": the count and the row kind agree now, and say what it means.)
        some = f"{held} {rows if held != 1 else rows[:-1]}"
        logger.info(f"{name}: all {len(dataset)} {rows} share one prompt, so no prompt can be held out whole: {some} "
                    f"of it {'are' if held != 1 else 'is'} held out, and that prompt is in training too")
        parts = dataset.train_test_split(test_size=held, shuffle=False)
        return parts["train"], parts["test"]
    fitting = [key for key in order if answers[key] <= held] or order[:1]  # none fits: the first, as ever
    for key in fitting:
        if count >= held:
            break
        chosen.add(key)
        count += answers[key]
    if len(chosen) == len(order):
        raise ConfigError(f"{name}: the {len(dataset)} {rows} have {len(order)} prompt(s); holding out {held} "
                          f"{rows}, every one to a held-out prompt with it, leaves no training rows. Hold out "
                          f"fewer, add prompts, or {other}")
    train = [i for i, key in enumerate(keys) if key not in chosen]
    test = [i for i, key in enumerate(keys) if key in chosen]
    if len(order) < len(keys):  # some prompt has several rows (one row per prompt: the plain split, said as ever)
        logger.info(f"{name}: {len(test)} of {len(dataset)} {rows} held out, every one to {len(chosen)} of the "
                    f"{len(order)} prompts")
    return dataset.select(train), dataset.select(test)


def _loader(kind, s):
    import functools

    from alignkit.core.data import load_preferences, load_sft, load_unpaired

    if kind == "sft":  # TRL's dataset_text_field: the column the text format reads
        return functools.partial(load_sft, text_field=getattr(s, "dataset_text_field", "text"))
    return {"preference": load_preferences, "unpaired": load_unpaired}[kind]


def load_train_eval(kind: str, s, load=None):
    """(train, eval or None) for sft.py ("sft"), dpo.py ("preference") or kto.py ("unpaired"), from settings `s`.
    `load`: the loader of one split, load(source, format, split, skip_invalid, config_name), in place of the kind's
    own (reward.py's adds each split's margins from its own rows: alignkit.train.reward.pairs_loader)."""
    train, held_out = _load_train_eval(kind, s, load)
    if kind == "unpaired":
        check_both_labels(train, s, held_out)
    return read_under(s, train, held_out)


def check_both_labels(train, s, held_out=None) -> None:
    """KTO's training answers are of both labels. With one alone the loss has nothing to weigh it against (TRL's
    advice on desirable_weight, computed with the missing class counted as 1, is then nonsense): refused in one
    line, before the model loads, naming the counts and the fix (the held-out share, where it took the other
    label's answers: the data has both)."""
    desirable = sum(train["label"])
    undesirable = len(train) - desirable
    if (desirable and undesirable) or not len(train):
        return
    data = "the dataset_mixture" if s.dataset_mixture else s.dataset_id
    have, missing, label, threshold = (("desirable", "undesirable", "false", "higher") if desirable else
                                       ("undesirable", "desirable", "true", "lower"))
    if held_out is not None and len(held_out) and (sum(held_out["label"]) if missing == "desirable" else
                                                     len(held_out) - sum(held_out["label"])):
        raise DataError(f"{data}: the held-out share (--eval_split) took every {missing} answer, leaving "
                        f"{max(desirable, undesirable)} {have} answers and no {missing} one to train on: KTO learns "
                        f"from the two against each other. Hold out fewer (a smaller --eval_split, or 0), or add "
                        f"answers labelled {label}")
    raise DataError(f"{data}: the training data holds {max(desirable, undesirable)} {have} answers and no {missing} "
                    f"one: KTO learns from the two against each other. Add answers labelled {label} (label.py "
                    f"--mode pointwise: a {threshold} --grade_threshold), or pass preference pairs (each becomes one of "
                    "each)" + (", or train on these answers with sft.py" if desirable else ""))


def _load_train_eval(kind: str, s, load=None):
    load = load or _loader(kind, s)
    if s.dataset_mixture:  # a --dataset_id given beside it is named as unused where the settings are read
        return _mixture(kind, s)
    check_file_splits(s)
    test_split = _test_split(s) if s.dataset_test_split == "auto" else s.dataset_test_split
    data = load(s.dataset_id, s.dataset_format, s.dataset_split, s.skip_invalid, s.dataset_config)
    if not test_split:
        return split(data, s, kind)
    train = data.shuffle(seed=s.seed)
    if s.max_samples:
        train = train.select(range(min(s.max_samples, len(train))))
    held_out = load(s.dataset_id, s.dataset_format, test_split, s.skip_invalid, s.dataset_config)
    (train,), (held_out,) = _one_kind([train, held_out], 1, ["the training split", "the test split"])  # both splits read alike: texts, or conversations
    return train, _capped(held_out, s, f"split {test_split}", split=test_split)


def _capped(held_out, s, what: str, **source):
    """A held-out split of its own (a test split, a mixture's test entries) under --max_samples: at most that many of
    its rows too, seeded as the training rows are (a quick run evaluated every row of a 2,000-row test split);
    marked with where its rows come from (`source`, see HELD_OUT), and their whole count where fewer were kept."""
    if held_out is None:
        return None
    if s.max_samples and len(held_out) > s.max_samples:
        logger.info(f"--max_samples {s.max_samples}: evaluating on {s.max_samples} of the {len(held_out)} held-out "
                    f"rows ({what})")
        source["of_rows"] = len(held_out)
        held_out = held_out.shuffle(seed=s.seed).select(range(s.max_samples))
    return held_out_from(held_out, **source)


def _test_split(s) -> str | None:
    """--dataset_test_split auto (a line in TRL's names with dataset_name that asks for evaluation): the dataset's
    `test` split, which TRL's scripts evaluate on, where it has one; else None, the --eval_split share. Said in one
    line either way."""
    from alignkit.core.data_files import single_file, split_names

    names = split_names(s.dataset_id, s.dataset_config)
    if s.dataset_split != "test" and "test" in names:
        logger.info(f"held-out data: the dataset's test split, as TRL's scripts evaluate (dataset_test_split test); "
                    f"--eval_split {s.eval_split or 0.05} holds a share of {s.dataset_split} out instead")
        return "test"
    if s.eval_split <= 0:
        raise ConfigError(f"--dataset_test_split auto: {s.dataset_id} has no test split to evaluate on besides "
                          f"{s.dataset_split}, and --eval_split 0 holds nothing out. Pass --dataset_test_split with "
                          "a split it has, or --eval_split 0.05")
    others = [n for n in names if n != s.dataset_split]
    other = ("rows in a folder as train.jsonl and test.jsonl evaluate on the test rows" if single_file(s.dataset_id)
             else f"--dataset_test_split NAME evaluates on a split it has ({', '.join(others)})" if others
             else "--dataset_test_split NAME evaluates on a split it has")
    logger.info(f"held-out data: an eval_split {s.eval_split} share of {s.dataset_split}, as {s.dataset_id} has no "
                f"test split besides it (TRL's scripts would evaluate on test); {other}")
    return None


def check_beside_mixture(s) -> None:
    """TrainSettings `s`: one dataset's split or configuration beside a dataset_mixture (set in its layer or a later
    one; from an earlier layer they went with the dataset it replaced: alignkit.core.trl_names), refused: TRL's
    scripts read the mixture's train and test rows (a KeyError for any other split name); they were unused here
    without a word."""
    from alignkit.core.trl_tables import BESIDE_MIXTURE

    default = {f.name: f.default for f in dataclasses.fields(s)}
    if s.dataset_test_split not in BESIDE_MIXTURE["dataset_test_split"]:
        raise ValueError(f"--dataset_test_split {s.dataset_test_split} beside a dataset_mixture: the mixture "
                         "names its own held-out rows (entries with test: true, or test_split_size). Give its "
                         f"held-out dataset an entry with split: {s.dataset_test_split} and test: true (with the "
                         f"handbook's dataset_mixer: list it in dataset_splits beside the train split, which holds "
                         "out a split whose name has 'test' in it), and remove this setting")
    if s.dataset_split not in (*BESIDE_MIXTURE["dataset_split"], default["dataset_split"]):
        raise ValueError(f"--dataset_split {s.dataset_split} beside a dataset_mixture: the mixture names the "
                         "split of each of its datasets (split: on an entry; with the handbook's dataset_mixer, "
                         "dataset_splits); remove this setting")
    if s.dataset_config not in BESIDE_MIXTURE["dataset_config"]:
        raise ValueError(f"--dataset_config {s.dataset_config} beside a dataset_mixture: the mixture names the "
                         "configuration of each of its datasets (config: on an entry; with the handbook's "
                         "dataset_mixer, dataset_configs); remove this setting")


def check_file_splits(s) -> None:
    """A single local file has no splits: refuse --dataset_test_split (its "test split" would be the training rows
    themselves), a --dataset_split other than train (it would be read as the whole file) and a --dataset_config
    (it has no configurations), rather than ignore them."""
    from alignkit.core.data_files import single_file

    if not single_file(s.dataset_id):
        return
    if getattr(s, "dataset_test_split", None) not in (None, "auto"):  # auto: the --eval_split share
        raise ConfigError(f"--dataset_test_split {s.dataset_test_split}: {s.dataset_id} is a single file, which has "
                          "no splits, so the held-out rows would be the training rows. Hold out a share with "
                          "--eval_split 0.05, or put the rows in a folder as train.jsonl and test.jsonl (or use a Hub "
                          "dataset with a test split)")
    if getattr(s, "dataset_config", None):  # TRL hands it to load_dataset, which refuses it for a file
        raise ConfigError(f"--dataset_config {s.dataset_config}: {s.dataset_id} is a single file, which has no "
                          "configurations. Drop --dataset_config, or pass the Hub dataset that has it")
    defaults = {f.name: f.default for f in dataclasses.fields(s)} if dataclasses.is_dataclass(s) else {}
    if s.dataset_split not in ("train", defaults.get("dataset_split")):  # a default names its Hub dataset's split
        raise ConfigError(f"--dataset_split {s.dataset_split}: {s.dataset_id} is a single file, which has no splits "
                          "(the whole file is the training data). Drop --dataset_split, or pass a folder or Hub "
                          f"dataset that has a {s.dataset_split} split")


def _entry(kind, s, entry, number, seed):
    """One entry's normalised rows: checked before its `weight` share is drawn, so a bad row is named by its own
    file and row."""
    from alignkit.core.data_files import read_rows, single_file

    where = f"dataset_mixture: dataset {number} ({entry['id']})"
    split_name = entry.get("split") or "train"
    if split_name != "train" and single_file(entry["id"]):
        raise ConfigError(f"{where}: split {split_name!r}, but a single file has no splits (the whole file would "
                          "be read). Drop the entry's split, and give held-out rows their own file (an entry with "
                          "test: true) or hold out a share with test_split_size (with dataset_mixer, set "
                          "dataset_splits: [train])")
    rows = read_rows(entry["id"], split_name, entry.get("config"))
    if entry.get("columns"):
        rows = rows.keep(entry["columns"])
    data = _loader(kind, s)(rows, s.dataset_format, "train", s.skip_invalid)
    weight = entry.get("weight", 1.0)
    if weight is not None and not entry.get("test") and entry.get("fraction") is None:
        count = int(len(data) * weight)
        if count < 1:
            raise ConfigError(f"{where}: weight {weight} selects no rows: {weight} of its {len(data)} rows is less "
                              f"than one row. Raise it to at least {math.ceil(1000 / len(data)) / 1000}, or drop the "
                              "entry")
        data = data.shuffle(seed=seed).select(range(count))
    return data


def _one_kind(parts, trains: int, names=None):
    """(train parts, test parts), all conversational where texts (TRL's standard format) and conversations mix:
    TRL reads one kind per dataset, and the text datasets are read as one user and one assistant turn each. Rows of
    other columns (messages beside prompt/completion rows, a text column beside either) are refused, each part
    (`names`: what to call them) named with its columns."""
    from alignkit.core.data import as_conversation, is_text_dataset

    kinds = [is_text_dataset(part) if len(part) else None for part in parts]  # an empty part says nothing
    rows = {"messages", "text", "prompt", "completion", "chosen", "rejected", "label"}  # a row's own columns
    columns = [sorted(set(part.column_names) & rows) if len(part) else None for part in parts]
    if len({tuple(c) for c in columns if c is not None}) > 1:
        names = names or [f"dataset {n}" for n in range(1, len(parts) + 1)]
        said = "; ".join(f"{name}: {', '.join(c)}" for name, c in zip(names, columns) if c is not None)
        raise DataError(f"the datasets do not fit together: their rows have different columns ({said}); TRL trains "
                        "one format per dataset: write them in one (prompt/completion rows as messages: the prompt's "
                        "turns, then the completion's)")
    if True in kinds and False in kinds:
        logger.info("dataset_mixture: datasets of texts beside conversations: the texts are read as one user and one "
                    "assistant turn each (TRL's standard format needs every dataset as text)")
        parts = [part.map(as_conversation) if text and len(part) else part for part, text in zip(parts, kinds)]
    return parts[:trains], parts[trains:]


def _mixture(kind, s):
    m = s.dataset_mixture
    seed = m.get("seed", 0)
    train_parts, test_parts = [], []
    for number, entry in enumerate(m["datasets"], 1):
        (test_parts if entry.get("test") else train_parts).append(_entry(kind, s, entry, number, seed))
    if not train_parts:
        raise ConfigError("dataset_mixture holds only test splits; add a train split")
    fractions = [e["fraction"] for e in m["datasets"] if e.get("fraction") is not None]
    if fractions:  # TRL's get_dataset: shares of the mixture, capped so that no dataset is oversampled
        shares = [f / sum(fractions) for f in fractions]
        total = min(len(part) / share for part, share in zip(train_parts, shares))
        train_parts = [part.select(range(round(share * total))) for part, share in zip(train_parts, shares)]
    from alignkit.core.message_columns import align_messages

    # Texts beside conversations become conversations; a tool-calling dataset's JSON messages make every part's JSON.
    names = [f"{e['id']}{' (test)' if e.get('test') else ''}" for e in m["datasets"]]
    names = [n for n, e in zip(names, m["datasets"]) if not e.get("test")] + \
        [n for n, e in zip(names, m["datasets"]) if e.get("test")]  # in the order of the parts
    train_parts, test_parts = _one_kind(train_parts + test_parts, len(train_parts), names)
    aligned = align_messages(train_parts + test_parts)
    train_parts, test_parts = aligned[:len(train_parts)], aligned[len(train_parts):]
    try:
        train = datasets.concatenate_datasets(train_parts).shuffle(seed=seed)
        held_out = datasets.concatenate_datasets(test_parts) if test_parts else None
    except ValueError as e:  # different normalised features: an SFT text dataset beside a messages one
        raise DataError(f"dataset_mixture: the datasets do not fit together ({e}); mix datasets of one format") from e
    if m.get("test_split_size"):
        train, carved = _hold_out(train, m["test_split_size"], seed, "dataset_mixture test_split_size", kind)
        held_out = carved if held_out is None else datasets.concatenate_datasets([held_out, carved])
    if s.max_samples:
        train = train.select(range(min(s.max_samples, len(train))))
    held_out = _capped(held_out, s, "the dataset_mixture's test rows", mixture="test rows")
    if held_out is None and s.eval_split > 0:
        train, held_out = _hold_out(train, s.eval_split, s.seed, "eval_split", kind)
        held_out_from(held_out, share=s.eval_split, of="the dataset_mixture")
    logger.info(f"dataset mixture: {len(train)} training rows from {len(train_parts)} dataset(s), "
                f"{len(held_out) if held_out is not None else 0} held out")
    return train, held_out
