"""The models an evaluation compares, as the user names them: --models NAME=ID_OR_PATH ... (evaluate.py mt_bench,
pairwise and lm_eval), vibes' --compare_to and alpaca_eval's --reference_model, a Hub id at a revision as
ID@REVISION; and the loader settings of each."""

from __future__ import annotations

import re
from pathlib import Path

from alignkit.core.args import ConfigError
from alignkit.modeling.chain import split_revision

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a model's NAME names its files: letters, digits, . _ -


def parse_models(entries: list[str]) -> dict[str, str]:
    """--models NAME=ID_OR_PATH ... -> {name: source}; a bare path is named after its folder. A source may be a
    Hub id at a revision, ID@REVISION (`model_loader` splits it)."""
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


def model_loader(s, source: str):
    """The loader settings of a --models source: `s`'s, for that model, at its @REVISION when it names one."""
    from alignkit.core.groups import loader_settings

    model, revision = split_revision(source)
    return loader_settings(s, model, revision=revision) if revision else loader_settings(s, source)
