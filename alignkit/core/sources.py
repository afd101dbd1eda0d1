"""How a model is named: a Hub id or a local path, and a Hub id at a revision written ID@REVISION.

A neutral core module (it imports nothing of alignkit's but errors), so the loader settings
(alignkit.core.groups.loader_settings), the chain of adapters (alignkit.modeling.chain), the Hub upload and the
model card all tell a Hub id from a path one way.
"""

from __future__ import annotations

import re
from pathlib import Path

# owner/name or name: letters, digits, - _ . (not first); no "..", no file suffix of a local data file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".yaml", ".yml", ".txt", ".jinja")


def is_hub_id(source) -> bool:
    """True for a Hub repo id (`owner/name` or `name`), False for a local path (existing or path-shaped)."""
    source = str(source or "")
    if not source or Path(source).exists() or ".." in source or source.lower().endswith(_FILE_SUFFIXES):
        return False
    return bool(_HUB_ID.match(source))


def split_revision(source: str) -> tuple[str, str | None]:
    """(model, revision) of a model named as ID@REVISION where a flag names a second model (evaluate.py --models,
    --compare_to, label.py --model_a); (source, None) for anything else, a local path with an @ in it included."""
    model, at, revision = str(source).rpartition("@")
    if at and revision and not Path(source).exists() and is_hub_id(model):
        return model, revision
    return source, None
