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
  trained again to the same weights is the same part.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from alignkit.core.errors import UserError
from alignkit.core.hub import RUN_RECORDS, TRAINER_STATE
from alignkit.core.run_records import RUN_CONFIG
from alignkit.modeling.identity import folder_files

# Its record of what a run trained over, in its settings file (alignkit.core.run_records.RUN_CONFIG).
TRAINED_OVER = "trained_over"
# Files of a run or checkpoint folder no loader reads: the Trainer's state, alignkit's records, the run's metrics.
_NOT_WEIGHTS = [*TRAINER_STATE, *RUN_RECORDS, "metrics.json"]
# {absolute folder: its files by content} as the loader last loaded it for training in this process.
_LOADED: dict[Path, dict[str, str]] = {}


def folders(chain, gguf_file: str | None = None) -> list[Path]:
    """The local folders of a chain (alignkit.modeling.chain.Chain), resolved; a GGUF base counts by its file in
    the run's inputs instead (a folder of quantizations is gigabytes)."""
    parts = [*chain.adapters, *chain.deltas] + ([] if gguf_file else [chain.base])
    return [Path(part).resolve() for part in parts if Path(part).is_dir()]


def remember_loaded(chain, gguf_file: str | None = None) -> None:
    """Take the chain's local folders by content as they are loaded for training (see the module docstring)."""
    for folder in folders(chain, gguf_file):
        _LOADED[folder] = folder_files(folder)


def trained_over(source: str, revision: str | None, gguf_file: str | None, folder: Path) -> list[dict]:
    """[{"path": from `folder`, "absolute": ..., "files": {name: content hash}}] for each local folder of
    `source`'s chain, as the loader loaded it in this process, else as it is now."""
    from alignkit.modeling.chain import resolve

    here = Path(folder).resolve()
    return [{"path": os.path.relpath(part, here), "absolute": str(part), "files": _LOADED.get(part) or
             folder_files(part)} for part in folders(resolve(source, revision), gguf_file)]


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
        now = folder_files(below)
        changed = [name for name, content in entry["files"].items()
                   if not _not_weights(name) and now.get(name) != content]
        if changed:
            return below, changed, entry["files"]
    return None


def check_trained_over(chain, base_model: str | None = None) -> None:
    """Refuse a chain with a part changed in place after a run trained over it (see the module docstring).
    `base_model` (merge.py --base_model) replaces the recorded base: that one is the user's to vouch for."""
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
            if candidate.is_dir() and all(folder_files(candidate).get(n) == h for n, h in files.items()
                                          if not _not_weights(n)):
                return candidate
    return None
