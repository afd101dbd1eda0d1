"""A run's training and held-out data, as its settings name them: one dataset with a held-out share
(--eval_split) or its own test split (--dataset_test_split, TRL's name), or an alignment-handbook dataset mixture.

The mixture is the handbook's (alignment/data.py, get_dataset): each entry's split loaded, its `columns` kept,
a `weight` share of it drawn after a seeded shuffle, all concatenated and shuffled with the mixture's seed, then
`test_split_size` rows (or share) held out. The handbook's older dataset_mixer/dataset_splits become entries with
`test: true` for the test splits (alignkit.core.trl_names): those are held out whole. Every entry goes through
the one data normaliser (alignkit.core.data), so its rows are checked like any other data.
"""

from __future__ import annotations

import datasets

from alignkit import logger
from alignkit.core.args import ConfigError
from alignkit.core.data import DataError

_ENTRY_KEYS = {"id", "config", "split", "columns", "weight", "test"}


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
        if not isinstance(entry, dict) or not entry.get("id"):
            raise ConfigError(f"dataset_mixture: dataset {i} needs an 'id' (a Hub dataset id or a local file/folder)")
        where = f"dataset_mixture: dataset {i} ({entry['id']})"
        if set(entry) - _ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(set(entry) - _ENTRY_KEYS))}; the keys "
                              f"are {', '.join(sorted(_ENTRY_KEYS))}")
        weight = entry.get("weight")
        if weight is not None and not (isinstance(weight, (int, float)) and 0 < weight <= 1):
            raise ConfigError(f"{where}: weight {weight!r} must be a share in (0, 1]")
        if entry.get("columns") is not None:
            columns.append(sorted(entry["columns"]))
    if any(c != columns[0] for c in columns):
        raise ConfigError(f"dataset_mixture: the datasets keep different columns {columns}; they must match")
    size = mixture.get("test_split_size")
    if size is not None and not (isinstance(size, (int, float)) and size > 0):
        raise ConfigError(f"dataset_mixture: test_split_size {size!r} must be a share (< 1) or a row count (>= 1)")


def split(dataset, s):
    """(train, eval or None): a seeded shuffle, --max_samples, then the held-out share."""
    dataset = dataset.shuffle(seed=s.seed)
    if s.max_samples:
        dataset = dataset.select(range(min(s.max_samples, len(dataset))))
    if s.eval_split <= 0:
        return dataset, None
    return _hold_out(dataset, s.eval_split, s.seed, "eval_split")


def _hold_out(dataset, size, seed, name):
    size = size if size < 1 else int(size)
    if (size if size >= 1 else round(size * len(dataset))) < 1 or len(dataset) < 2 or (
            size >= 1 and size >= len(dataset)):
        raise ConfigError(f"{name} {size} leaves no training or no held-out rows out of {len(dataset)}; "
                          "change it, or pass 0")
    parts = dataset.train_test_split(test_size=size, seed=seed, shuffle=False)
    return parts["train"], parts["test"]


def _loader(kind):
    from alignkit.core.data import load_preferences, load_sft

    return load_sft if kind == "sft" else load_preferences


def load_train_eval(kind: str, s):
    """(train, eval or None) for sft.py ("sft") or dpo.py/reward.py ("preference"), from settings `s`."""
    load = _loader(kind)
    if s.dataset_mixture:
        return _mixture(kind, s)
    data = load(s.dataset_id, s.dataset_format, s.dataset_split, s.skip_invalid, s.dataset_config)
    if not s.dataset_test_split:
        return split(data, s)
    train = data.shuffle(seed=s.seed)
    if s.max_samples:
        train = train.select(range(min(s.max_samples, len(train))))
    held_out = load(s.dataset_id, s.dataset_format, s.dataset_test_split, s.skip_invalid, s.dataset_config)
    return train, held_out


def _entry(kind, s, entry, seed):
    from alignkit.core.data import load_rows

    rows, label = load_rows(entry["id"], entry.get("split", "train"), entry.get("config"))
    if entry.get("columns"):
        missing = [c for c in entry["columns"] if c not in rows.column_names]
        if missing:
            raise DataError(f"{label}: dataset_mixture columns {missing} are missing (columns found: "
                            f"{', '.join(rows.column_names)})")
        rows = rows.select_columns(entry["columns"])
    weight = entry.get("weight", 1.0)
    if weight is not None and not entry.get("test"):
        rows = rows.shuffle(seed=seed).select(range(int(len(rows) * weight)))
    return _loader(kind)(rows, s.dataset_format, "train", s.skip_invalid)


def _mixture(kind, s):
    m = s.dataset_mixture
    seed = m.get("seed", 0)
    train_parts, test_parts = [], []
    for entry in m["datasets"]:
        (test_parts if entry.get("test") else train_parts).append(_entry(kind, s, entry, seed))
    if not train_parts:
        raise ConfigError("dataset_mixture holds only test splits; add a train split")
    try:
        train = datasets.concatenate_datasets(train_parts).shuffle(seed=seed)
        held_out = datasets.concatenate_datasets(test_parts) if test_parts else None
    except ValueError as e:  # different normalised features: an SFT text dataset beside a messages one
        raise DataError(f"dataset_mixture: the datasets do not fit together ({e}); mix datasets of one format") from e
    if m.get("test_split_size"):
        train, carved = _hold_out(train, m["test_split_size"], seed, "dataset_mixture test_split_size")
        held_out = carved if held_out is None else datasets.concatenate_datasets([held_out, carved])
    if s.max_samples:
        train = train.select(range(min(s.max_samples, len(train))))
    if held_out is None and s.eval_split > 0:
        train, held_out = _hold_out(train, s.eval_split, s.seed, "eval_split")
    logger.info(f"dataset mixture: {len(train)} training rows from {len(train_parts)} dataset(s), "
                f"{len(held_out) if held_out is not None else 0} held out")
    return train, held_out
