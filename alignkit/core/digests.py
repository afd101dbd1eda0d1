"""The one digest every cache key and record in alignkit is made of: SHA-256 of a value as canonical JSON.

Canonical: keys sorted, anything JSON cannot write (a Path, a dtype) by its str(). `ensure_ascii` and `length` are
as each cache first made its keys (json.dumps' default escapes non-ASCII text; some keys are cut to 16 or 32
characters), so every key made before this module was shared is the same key. Datasets' rows, too big for JSON,
have their own (`rows_digest`).
"""

from __future__ import annotations

import hashlib
import json


def digest(value, length: int | None = None, ensure_ascii: bool = False) -> str:
    """Hex SHA-256 of `value` as canonical JSON, its first `length` characters (all 64 by default)."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=ensure_ascii)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def rows_digest(*datasets) -> str:
    """Hex SHA-256 of datasets' rows (their features, then every row in order; None for a missing one). The same
    rows read the same way give the same digest whether they are one Arrow table or the concatenation of several,
    a selection or shuffle of a larger one (an indices mapping) or a copy; other Arrow types for the same values
    (large_string, another column order) give another digest, so at worst a run starts over. Each 1,000 rows are
    copied out and written as an Arrow IPC stream into the hash, never all at once."""
    import pyarrow as pa

    hasher = hashlib.sha256()

    class Sink:  # where the IPC writer writes: straight into the hash
        closed = False

        def write(self, data) -> int:
            hasher.update(data)
            return len(data)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    for dataset in datasets:
        hasher.update(b"\0dataset")
        if dataset is None:
            continue
        hasher.update(json.dumps(dataset.features.to_dict(), sort_keys=True, default=str).encode())
        for batch in dataset.with_format("arrow").iter(batch_size=1000):
            # take() copies the rows into fresh buffers: a slice of a larger table would write its whole buffers.
            batch = batch.take(pa.array(range(batch.num_rows))).combine_chunks().replace_schema_metadata(None)
            with pa.ipc.new_stream(pa.PythonFile(Sink(), mode="w"), batch.schema) as writer:
                writer.write_table(batch)
    return hasher.hexdigest()
