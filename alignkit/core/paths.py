"""Where alignkit keeps what it builds or downloads once: $ALIGNKIT_CACHE, default ~/.cache/alignkit.

A neutral module, so the MT-Bench data, the reference log-prob cache and converted GGUF models find their
folder without importing a preset.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))
