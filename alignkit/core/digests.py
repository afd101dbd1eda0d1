"""The one digest every cache key and record in alignkit is made of: SHA-256 of a value as canonical JSON.

Canonical: keys sorted, anything JSON cannot write (a Path, a dtype) by its str(). `ensure_ascii` and `length` are
as each cache first made its keys (json.dumps' default escapes non-ASCII text; some keys are cut to 16 or 32
characters), so every key made before this module was shared is the same key.
"""

from __future__ import annotations

import hashlib
import json


def digest(value, length: int | None = None, ensure_ascii: bool = False) -> str:
    """Hex SHA-256 of `value` as canonical JSON, its first `length` characters (all 64 by default)."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=ensure_ascii)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
