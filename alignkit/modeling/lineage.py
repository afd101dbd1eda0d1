"""What a run trained over, by content, so that its adapter never loads over a part changed since.

An adapter or LoTA delta names the part below it by path (adapter_config.json, lota_config.json). When that part
is trained again in the same folder (an SFT run rerun with other settings: the earlier run is moved aside as
NAME.previous-TIME), the adapter above would load over the new one without a word: a model nobody trained.

- `remember_loaded(chain)`: the loader, for a training run, takes each local folder of the chain it loads by
  content (alignkit.modeling.identity.folder_files) at that moment: what the run really trains over, even if a
  folder changes before the run folder is claimed (a notebook's cells, another terminal).
- `trained_over(...)`: saved beside the run's settings (TRAINED_OVER in alignkit_config.json), each folder under
  both the path from the run folder and its absolute path, as the adapters record each other (relative for an
  adapter below, absolute for a delta or a local full model): a chain copied or moved, whole or in part, still
  finds its record.
- `check_trained_over(chain)`: the loader compares every local adapter's and delta's record with the chain it
  loads, file by file. A recorded file that differs or is gone refuses the load in one line naming the files
  and, when found, where the earlier run was moved. Files added since (a merge, an evaluation) and what no
  loader reads (a run's settings, metrics, optimizer and trainer state, a merge's record) do not count: a part
  trained again to the same weights is the same part. An adapter's config counts less its base's path: pointing
  base_model_name_or_path at a base that moved is not a new adapter.
- merge.py `--base_model` (a base that moved) is compared with the base the runs recorded, file by file.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from alignkit.core.digests import digest
from alignkit.core.errors import UserError
from alignkit.core.hub import RUN_RECORDS, TRAINER_STATE
from alignkit.core.run_records import RUN_CONFIG
from alignkit.modeling.chain import LOTA_CONFIG_FILE
from alignkit.modeling.identity import folder_files

# Its record of what a run trained over, in its settings file (alignkit.core.run_records.RUN_CONFIG).
TRAINED_OVER = "trained_over"
# Files of a run or checkpoint folder no loader reads: the Trainer's state, alignkit's records, the run's metrics.
_NOT_WEIGHTS = [*TRAINER_STATE, *RUN_RECORDS, "metrics.json"]
# {absolute folder: its files by content} as the loader last loaded it for training in this process.
_LOADED: dict[Path, dict[str, str]] = {}
# An adapter's config by content less the path of its base, recorded beside the file's own hash: pointing
# base_model_name_or_path at a base that moved (as a missing base's error says to) is not a retrained adapter.
_CONFIG = "adapter_config.json"
_CONFIG_BUT_BASE = "adapter_config.json, base_model_name_or_path aside"


def _contents(folder: Path) -> dict[str, str]:
    """folder_files, and an adapter's config without its base's path (_CONFIG_BUT_BASE)."""
    files = folder_files(folder)
    if _CONFIG in files:
        try:
            config = json.loads(Path(folder, _CONFIG).read_text())
            files[_CONFIG_BUT_BASE] = digest({k: v for k, v in config.items() if k != "base_model_name_or_path"})
        except (OSError, ValueError, AttributeError):  # unreadable, or no JSON object: the file's hash decides
            pass
    return files


def _changed(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """The files of a recorded folder that a loader reads and that differ now (an adapter's config by its content
    less its base's path, where the record has that)."""
    return [name for name, content in recorded.items() if not _not_weights(name) and now.get(name) != content
            and not (name == _CONFIG and _CONFIG_BUT_BASE in recorded)]


def folders(chain, gguf_file: str | None = None) -> list[Path]:
    """The local folders of a chain (alignkit.modeling.chain.Chain), resolved; a GGUF base counts by its file in
    the run's inputs instead (a folder of quantizations is gigabytes)."""
    parts = [*chain.adapters, *chain.deltas] + ([] if gguf_file else [chain.base])
    return [Path(part).resolve() for part in parts if Path(part).is_dir()]


def remember_loaded(chain, gguf_file: str | None = None) -> None:
    """Take the chain's local folders by content as they are loaded for training (see the module docstring)."""
    for folder in folders(chain, gguf_file):
        _LOADED[folder] = _contents(folder)


def trained_over(source: str, revision: str | None, gguf_file: str | None, folder: Path) -> list[dict]:
    """[{"path": from `folder`, "absolute": ..., "files": {name: content hash}}] for each local folder of
    `source`'s chain, as the loader loaded it in this process, else as it is now."""
    from alignkit.modeling.chain import resolve

    here = Path(folder).resolve()
    return [{"path": os.path.relpath(part, here), "absolute": str(part), "files": _LOADED.get(part) or
             _contents(part)} for part in folders(resolve(source, revision), gguf_file)]


def _not_weights(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _NOT_WEIGHTS)


def _record(folder) -> list[dict]:
    try:
        record = json.loads(Path(folder, RUN_CONFIG).read_text()).get(TRAINED_OVER)
    except (OSError, ValueError, AttributeError):  # AttributeError: a record that is no JSON object
        return []  # a Hub adapter, or a run saved before alignkit kept this record
    return record if isinstance(record, list) else []


def changed_below(folder, loaded: set[Path]) -> tuple[Path, list[str], dict] | None:
    """(the folder of `loaded` that changed since the run in `folder` trained over it, the files that differ, its
    record), or None."""
    here = Path(folder).resolve()
    for entry in _record(folder):
        places = [Path(os.path.normpath(here / entry["path"])), Path(entry["absolute"])]
        below = next((p for p in places if p in loaded and p != here), None)
        if below is None:
            continue  # not a part of this chain: the adapters' own paths decide what loads
        changed = _changed(entry["files"], _contents(below))
        if changed:
            return below, changed, entry["files"]
    return None


def check_trained_over(chain, base_model: str | None = None) -> None:
    """Refuse a chain with a part changed in place after a run trained over it (see the module docstring).
    `base_model` (merge.py --base_model: a base moved or renamed) replaces the recorded base: a local one must have
    the weights of the base the runs recorded (a Hub id, or a run without the record, is the user's to vouch for)."""
    parts = [*chain.adapters, *chain.deltas]
    loaded = {Path(part).resolve(): part for part in parts + ([] if base_model else [chain.base])}
    for part in parts:
        if found := changed_below(part, set(loaded)):
            below, changed, files = found
            earlier = _earlier(below, files)
            raise UserError(
                f"{part} was trained over {loaded[below]}, which has changed since ({', '.join(changed[:3])}: "
                "retrained in place?); together they are a model nobody trained. Train it again over the new one, "
                "or put the one it was trained over back" + (f" (it is in {earlier})" if earlier else "")
            )
    if base_model and Path(base_model).is_dir():
        _check_base_model(parts, set(loaded), base_model)
    if base_model and parts and not _recorded(lowest := (chain.deltas or chain.adapters)[0]):
        _unchecked_base(lowest, base_model)


def _recorded(folder) -> bool:
    """Whether the run in `folder` kept its record of what it trained over (empty over a Hub base: nothing local)."""
    from alignkit.core.run_records import run_config

    return TRAINED_OVER in run_config(folder)  # a checkpoint-N's: its run's


def _unchecked_base(part: str, base_model: str) -> None:
    """--base_model under a part with no record of what it trained over (a plain PEFT adapter, or a run saved before
    alignkit kept the record): nothing tells whether the folder it names was the base or an adapter below it, so
    the log says what stands in for what."""
    from alignkit import logger
    from alignkit.modeling.chain import _recorded_base, adapter_config

    lota = Path(part, LOTA_CONFIG_FILE)
    config = adapter_config(part) or (json.loads(lota.read_text()) if lota.is_file() else {})
    recorded = config.get("base_model_name_or_path")
    named = f" names {_recorded_base(part, recorded)!r} as its base and" if recorded else ""
    logger.warning(f"{part}{named} records no model it was trained over (a plain PEFT adapter, or a run saved before "
                   f"alignkit kept the record): --base_model {base_model} stands in for it unchecked; if that was "
                   "an adapter (a chain), it is left out of the model")


def _check_base_model(parts, loaded: set[Path], base_model: str) -> None:
    """--base_model against each run's record of the base it trained over (the recorded folder that is no part of
    the chain loaded): an adapter in its place, or other weights, would make a model nobody trained."""
    now = _contents(Path(base_model).resolve())
    chain = [_contents(p) for p in loaded]  # a part of the chain that moved is still found, by its content
    for part in parts:
        here = Path(part).resolve()
        for entry in _record(part):
            places = [Path(os.path.normpath(here / entry["path"])), Path(entry["absolute"])]
            if any(p in loaded or p == here for p in places) or any(not _changed(entry["files"], c) for c in chain):
                continue
            if any(name in entry["files"] for name in (_CONFIG, LOTA_CONFIG_FILE)):
                raise UserError(f"{part} was trained over {places[0]}, an adapter, which is gone: "
                                f"--base_model {base_model} would leave it out of the model. Put it back")
            changed = _changed(entry["files"], now)
            if changed:
                raise UserError(
                    f"--base_model {base_model} is not the base {part} was trained over ({entry['absolute']}: "
                    f"{', '.join(changed[:3])} differ{'s' if len(changed) == 1 else ''}); merged, they would be a "
                    "model nobody trained. Pass the base it was trained over (its files' hashes are in "
                    f"{Path(part, RUN_CONFIG)}), or, to merge onto another base on purpose, point "
                    f"base_model_name_or_path in {Path(part, 'adapter_config.json')} at it")


def check_models(s, sources, flag: str = "--models NAME=PATH ...") -> None:
    """Before any model of an evaluation runs: each is there (a preset's runs, trained first) and none is an adapter
    over a part retrained in place (else it was refused at its own load, after the models before it had run)."""
    from alignkit.modeling.chain import resolve
    from alignkit.modeling.presets import check_run_exists

    for source in sources:
        if source:
            check_run_exists(s, source, flag)
            if Path(source).exists():
                check_trained_over(resolve(source, getattr(s, "revision", None)))


def _earlier(folder: Path, files: dict[str, str]) -> Path | None:
    """Where the run folder moved aside when `folder` was trained again (NAME.previous-TIME, alignkit.train.
    run_folder) holds `files`, newest first: `folder`'s own, or its run's (a checkpoint-N inside it)."""
    for moved, inside in ((folder, ""), (folder.parent, folder.name)):
        for candidate in sorted(moved.parent.glob(f"{moved.name}.previous-*"), reverse=True):
            candidate = candidate / inside if inside else candidate
            if candidate.is_dir() and not _changed(files, _contents(candidate)):
                return candidate
    return None
