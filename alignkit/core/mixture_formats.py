"""The alignment-handbook's and TRL's dataset mixtures as alignkit's `dataset_mixture` (alignkit.core.mixture).

- the handbook's older `dataset_mixer` ({id: fraction}) with `dataset_splits`: `mixture_from_mixer`;
- TRL's DatasetMixtureConfig (`datasets` of path/name/split/columns/fraction, `test_split_size`), as `trl sft
  --config` reads it: `mixture_from_trl`.

alignkit.core.trl_names translates a recipe's keys with these; alignkit.core.mixture loads the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from alignkit.core.args import ConfigError


def mixture_from_mixer(mixer, splits, where, splits_where=None, configs=None, configs_where=None) -> dict:
    """The handbook's older `dataset_mixer` ({id: fraction}), `dataset_splits` and `dataset_configs` (each
    dataset's configuration, in the mixer's order) as its current `dataset_mixture`: the fraction of each train
    split (splits named "train..."), every test split held out whole (`test: true`), shuffled with the handbook's
    seed 42, as its get_datasets did. `where`, `splits_where` and `configs_where` name the values in an error."""
    if not isinstance(mixer, Mapping) or not mixer:
        raise ConfigError(f"{where}: dataset_mixer must map dataset ids to fractions, e.g. "
                          "{HuggingFaceH4/ultrafeedback_binarized: 1.0}")
    if isinstance(configs, str):  # several as a command line joins them
        configs = [p.strip() for p in configs.split(",") if p.strip()]
    if configs is not None and (not isinstance(configs, (list, tuple)) or len(configs) != len(mixer)):
        raise ConfigError(f"{configs_where or where}: dataset_configs {configs!r} must list one configuration per "
                          f"dataset of dataset_mixer ({len(mixer)}, in its order), as the handbook reads it")
    given = splits
    if isinstance(splits, str):  # one name, or several as a command line joins them: train_prefs,test_prefs
        splits = [p.strip() for p in splits.split(",") if p.strip()]
    splits = ["train", "test"] if splits is None else splits
    if not isinstance(splits, (list, tuple)) or not splits or not all(isinstance(x, str) for x in splits):
        raise ConfigError(f"{splits_where or where}: dataset_splits {given!r} must be a split name or a list of "
                          "them, e.g. [train_prefs, test_prefs]")
    entries = []
    for i, (dataset_id, fraction) in enumerate(mixer.items()):
        config = {"config": str(configs[i])} if configs is not None and configs[i] is not None else {}
        weight = _fraction(fraction)
        if weight is None:
            raise ConfigError(f"{where}: the fraction of {dataset_id} is {fraction!r}; dataset_mixer maps each "
                              f"dataset id to a fraction in (0, 1] of its train split, e.g. {{{dataset_id}: 0.5}}")
        for split in splits:
            if "train" in split:
                entries.append({"id": dataset_id, **config, "split": split, "weight": weight})
            elif "test" in split:
                entries.append({"id": dataset_id, **config, "split": split, "test": True})
            else:
                raise ConfigError(f"{where}: dataset_splits entry {split!r} names neither a train nor a test split "
                                  "(the handbook tells them apart by 'train'/'test' in the name)")
    return {"datasets": entries, "seed": 42}


# TRL's DatasetConfig keys (trl/scripts/utils.py) as the mixture's: load_dataset's path and name, and `fraction`.
_TRL_ENTRY = {"path": "id", "name": "config", "split": "split", "columns": "columns", "fraction": "fraction"}


def mixture_from_trl(entries, test_split_size, where) -> dict:
    """TRL's own mixture (DatasetMixtureConfig: `datasets` of path/name/split/columns/fraction, `test_split_size`),
    as `trl sft --config` reads it, into alignkit's dataset_mixture (alignkit.core.mixture takes TRL's `fraction`
    as TRL does: normalised shares of the mixture, none oversampled)."""
    if isinstance(entries, str):  # a JSON list from a command line
        try:
            entries = json.loads(entries)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid value for {where}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{where}: TRL's datasets must be a list of datasets, e.g. [{{path: trl-lib/tldr, split: "
                          "train}]")
    out = []
    for i, entry in enumerate(entries, 1):
        other = sorted(set(entry) - set(_TRL_ENTRY))
        if other:
            raise ConfigError(f"{where}: dataset {i}: {', '.join(other)} not supported (alignkit reads a dataset by "
                              f"path, name, split, columns and fraction); point path at the data file or folder")
        if "path" not in entry:
            raise ConfigError(f"{where}: dataset {i} needs a path (a Hub dataset id or a local file or folder)")
        out.append({_TRL_ENTRY[k]: v for k, v in entry.items() if v is not None})
    mixture = {"datasets": out}
    if test_split_size is not None:
        mixture["test_split_size"] = test_split_size
    return mixture


def _fraction(value) -> float | None:
    """A dataset_mixer fraction as a float in (0, 1], or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        weight = float(value)
    except ValueError:
        return None
    return weight if math.isfinite(weight) and 0 < weight <= 1 else None
