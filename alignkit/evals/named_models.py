"""The models an evaluation compares, as the user names them: --models NAME=ID_OR_PATH ... (evaluate.py mt_bench,
pairwise and lm_eval), vibes' --compare_to and alpaca_eval's --reference_model, a Hub id at a revision as
ID@REVISION (alignkit.core.groups.loader_settings reads that form)."""

from __future__ import annotations

import re
from pathlib import Path

from alignkit.core.args import ConfigError
from alignkit.core.sources import split_revision

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a model's NAME names its files: letters, digits, . _ -


def parse_models(entries: list[str]) -> dict[str, str]:
    """--models NAME=ID_OR_PATH ... -> {name: source}; a bare path is named after its folder. A source may be a
    Hub id at a revision, ID@REVISION (alignkit.core.groups.loader_settings loads it at that revision)."""
    models: dict[str, str] = {}
    for entry in entries:
        name, eq, source = entry.partition("=")
        if not eq:
            name, source = Path(entry.rstrip("/")).name, entry
        if not source or not NAME.match(name):
            raise ConfigError(f"--models entry {entry!r}: write NAME=ID_OR_PATH, with a NAME of letters, digits, "
                              "'.', '_' or '-' (it names the answer file)")
        if name in models:
            raise ConfigError(f"--models: the name {name!r} is given twice; give each model its own NAME=")
        if "@" in source and not Path(source).exists() and split_revision(source)[1] is None:
            raise ConfigError(f"--models entry {entry!r}: ID@REVISION takes a Hub id (owner/name) and a branch, tag "
                              "or commit after the @; a local folder has no revision")
        models[name] = source
    return models


def same_source(source: str) -> str:
    """A source as recorded beside its answers: a local path resolved (one folder however it is spelled)."""
    return str(Path(source).resolve()) if Path(source).exists() else source
