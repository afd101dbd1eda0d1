"""The models an evaluation compares, as the user names them: --models NAME=ID_OR_PATH ... (evaluate.py mt_bench,
pairwise and lm_eval), vibes' --compare_to and alpaca_eval's --reference_model, a Hub id at a revision as
ID@REVISION (alignkit.core.groups.loader_settings reads that form); and a model recorded beside its kept answers or
outputs, told the same model at another path (same_source, copied_from)."""

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


def copied_from(recorded: str, source: str, then: dict | None, now: dict | None) -> bool:
    """Whether the model recorded at path `recorded` is the local folder `source` moved or copied (a copy of runs/, a
    moved project): `then` and `now`, the identity_parts recorded beside the output and made now, pair `source` with a
    path of `recorded`'s folder name (alignkit.modeling.identity.moved_parts). Its content, not its path, then decides,
    and a refusal says what changed in it. One test for MT-Bench answers and AlpacaEval outputs alike."""
    import os

    from alignkit.modeling.identity import moved_parts

    if not Path(source).exists():
        return False
    was = moved_parts(then, now).get(os.path.abspath(source))
    return was is not None and Path(was).name == Path(recorded).name
