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
    a selection or shuffle of a larger one (an indices mapping) or a copy, and whether strings, binaries and lists
    are Arrow's large types (polars and pandas write large_string) or not; another column order gives another digest,
    so at worst a run starts over. Each 1,000 rows are copied out and written as an Arrow IPC stream into the hash,
    never all at once."""
    import datasets as hf_datasets
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
        schema = dataset.features.arrow_schema
        plain = pa.schema([field.with_type(_plain_type(field.type)) for field in schema])
        features = hf_datasets.Features.from_arrow_schema(plain) if plain != schema else dataset.features
        hasher.update(json.dumps(features.to_dict(), sort_keys=True, default=str).encode())
        for batch in dataset.with_format("arrow").iter(batch_size=1000):
            # take() copies the rows into fresh buffers: a slice of a larger table would write its whole buffers.
            batch = batch.take(pa.array(range(batch.num_rows))).combine_chunks().replace_schema_metadata(None)
            if plain != schema:
                batch = batch.cast(plain.remove_metadata())
            with pa.ipc.new_stream(pa.PythonFile(Sink(), mode="w"), batch.schema) as writer:
                writer.write_table(batch)
    return hasher.hexdigest()


def _plain_type(kind):
    """An Arrow type with its large strings, binaries and lists as the plain ones (the same values)."""
    import pyarrow as pa

    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_large_binary(kind):
        return pa.binary()
    if pa.types.is_large_list(kind) or pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_plain_type(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_plain_type(field.type)) for field in kind])
    return kind


def decisive_sampling(sampling: dict) -> dict:
    """`sampling` ({temperature, top_p, seed, ...}) as an answer cache keys on it: temperature 0 decodes greedily (or
    by beam search) and reads neither top_p nor the seed, so both are None there: another --seed finds the greedy
    answers already made, and an answer recorded with its seed compares equal to one recorded without."""
    if sampling.get("temperature") == 0:
        return {**sampling, **{k: None for k in ("top_p", "seed") if k in sampling}}
    return dict(sampling)


def changed_settings(then: dict, now: dict, read=decisive_sampling) -> list[str]:
    """The keys of `now` whose recorded value `then` differs, named as given: those that `read` (how decoding reads
    them) tells apart too, a greedy run's other seed being no change; else every one that differs."""
    read_then, read_now = read(then), read(now)
    differ = [k for k, v in now.items() if then.get(k) != v]
    return [k for k in differ if read_then.get(k) != read_now.get(k)] or differ


def sample_seed(*parts) -> int:
    """One sampled answer's seed, from what names it (the run's --seed, a sample number, the prompt's key, a turn):
    alignkit.modeling.generation samples each answer from its own stream with it, whatever its batch."""
    return int(digest(list(parts))[:15], 16)
