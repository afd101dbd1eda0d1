"""Where a model comes from: a Hub id or a local path, and the adapter chain from an adapter down to its base.

A neutral module (it imports no loader, card or Hub code), so the loader, the model card, the Hub upload and the
identity of a model as loaded (alignkit.modeling.identity) all read a chain the same way.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from alignkit.core.errors import UserError

# owner/name or name: letters, digits, - _ . (not first); no "..", no file suffix of a local data file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".yaml", ".yml", ".txt", ".jinja")


def is_hub_id(source) -> bool:
    """True for a Hub repo id (`owner/name` or `name`), False for a local path (existing or path-shaped)."""
    source = str(source or "")
    if not source or Path(source).exists() or ".." in source or source.lower().endswith(_FILE_SUFFIXES):
        return False
    return bool(_HUB_ID.match(source))


def adapter_config(source: str, revision: str | None = None) -> dict | None:
    """The adapter_config.json of `source` as a dict, or None when `source` is a full model."""
    path = Path(source)
    if path.is_dir():
        file = path / "adapter_config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    if path.exists() or source.count("/") != 1:
        return None
    # A Hub id: ask the Hub whether it holds an adapter; offline, let from_pretrained report the problem.
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "adapter_config.json", revision=revision)).read_text())
    except Exception:  # noqa: BLE001 - not an adapter, or not reachable: treat as a full model
        return None


def _recorded_base(adapter: str, base: str) -> str:
    """Where the base an adapter records lives: a relative path counts from the adapter's folder.

    save_adapter records a local adapter it was trained on relative to itself, so a chain copied or moved as a
    whole still resolves; absolute paths (older runs, local full models) and Hub ids stay as they are.
    """
    if Path(adapter).is_dir() and not Path(base).is_absolute():
        beside = Path(adapter, base)
        if beside.exists() or base.startswith("."):
            return os.path.normpath(os.path.abspath(beside))
    return base


def adapter_chain(source: str, revision: str | None = None) -> tuple[str, list[str]]:
    """(base model id, [adapter sources from the base upwards])."""
    chain: list[str] = []
    while (config := adapter_config(source, revision)) is not None:
        chain.insert(0, source)
        recorded = config.get("base_model_name_or_path")
        if not recorded:
            raise UserError(f"{source}/adapter_config.json has no base_model_name_or_path; pass the base with --model_id")
        if len(chain) > 8:
            raise UserError(f"adapter chain from {source} is longer than 8: does an adapter name itself as its base?")
        base = _recorded_base(source, recorded)
        if _looks_local(base) and not Path(base).exists():
            raise UserError(
                f"{source}/adapter_config.json names its base {recorded!r}, which is not there "
                f"({'relative paths count from the adapter folder; ' if base != recorded else ''}was it moved or "
                "deleted?). Put it back, or point base_model_name_or_path at where it is now (merge.py: --base_model)."
            )
        source = base
    return source, chain


def _looks_local(source: str) -> bool:
    """A filesystem path rather than a Hub id: absolute, ./ ../ ~, or more than one "/"."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
