"""Settings as they are saved: a run's alignkit_config.json, the settings a model or rewards were built under.
Secret fields ("token", "api_key", "secret", "password" in the name, tokenizer special tokens aside) are written as
`***`, and every text value passes through redact, so no key reaches a saved file.

Beside the fields, settings parsed from a recipe or flags keep the keys they named as not applied (parse_config's
"not applied, and why" line: `not_applied(cfg)`) and those a setting's check named (`note_not_applied`:
--precompute_ref_batch_size without the precompute, LoRA's settings under --adapter lota, ...), which a run records
in its alignkit_config.json and card."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Mapping

from alignkit.core.journal import write_atomic
from alignkit.core.secrets import redact

_SECRET_WORDS = ("token", "api_key", "secret", "password")
# Tokenizer special tokens ("<pad>", "</s>") are settings, not credentials: hiding them would only lose information.
_SPECIAL_TOKENS = {f"{p}_token" for p in ("pad", "eos", "bos", "unk", "sep", "cls", "mask")}


def is_secret_field(name) -> bool:
    # "tokenizer_name" and "max_new_tokens" are not credentials; "*_env" fields hold a variable's NAME.
    n = re.sub("tokenizer|tokens", "", str(name).lower())
    return not n.endswith("_env") and n not in _SPECIAL_TOKENS and any(w in n for w in _SECRET_WORDS)


def is_set(value) -> bool:
    # Numbers are never credentials (`token_budget: int` must survive); empty values reveal nothing.
    return bool(value) and not isinstance(value, (int, float))


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): "***" if is_secret_field(k) and is_set(v) else _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))  # str, Path, Enum...: their text form is what a reader wants


def config_to_dict(cfg) -> dict:
    """JSON-safe dict of all fields of dataclass instance ``cfg``, with secrets replaced by ``***``."""
    return _jsonable(cfg)


def mark_built(obj, cfg):
    """Mark `obj` (a model, rl.py's rewards) as built under settings `cfg`: a notebook's training cell trains only
    what was built under the settings its Run folder cell decided (alignkit.train.cell_checks)."""
    obj._alignkit_built_under = copy.deepcopy(config_to_dict(cfg))  # a copy: later edits in place count
    return obj


def save_config(cfg, path) -> None:
    """Write ``config_to_dict(cfg)`` as indented JSON, creating parent directories; atomically, so a crash leaves
    the earlier config or this one (a resume reads it to decide what it continues)."""
    write_atomic(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


def not_applied_record(said: list[tuple[str, str]], layer: Mapping) -> dict:
    """{key: {"value": its value in `layer`, "why": the first clause of its reason}} of the (key, reason) pairs a
    layer's translation named as not applied (parse_config's "not applied, and why" line says them) on its keys."""
    return {key: {"value": layer.get(key), "why": re.split(r"[:;(]", why, maxsplit=1)[0].strip()} for key, why in said}


def keep_not_applied(cfg, record: dict):
    """`cfg` with `record` (not_applied_record's, every layer) beside its fields, after what its checks named
    (`note_not_applied`): no setting, never compared."""
    object.__setattr__(cfg, "_alignkit_not_applied", {**getattr(cfg, "_alignkit_not_applied", {}), **record})
    return cfg


def with_values(cfg, **changes):
    """A copy of `cfg` with `changes` to its fields, taken as they are: what the settings hold beside their fields
    (the keys not applied, rl.py's vLLM setting as typed, what the loss covers) kept, and their checks not run again.
    A dataclasses.replace runs __post_init__ again, outside the parse: it drops those, and says a check's warning a
    second time. A shallow copy: read it, do not change its values in place."""
    if unknown := changes.keys() - {f.name for f in dataclasses.fields(cfg)}:
        raise TypeError(f"{type(cfg).__name__} has no field {', '.join(sorted(unknown))}")
    new = copy.copy(cfg)
    vars(new).update(changes)
    return new


def note_not_applied(cfg, keys: Mapping, warning: str) -> None:
    """A setting's check found `keys` ({key: value}) given but not applied: `warning` is the log line (it starts
    with the flags and "not applied: " and the reason), and the keys join `cfg`'s record (their card and
    alignkit_config.json say them, as a recipe's keys not applied)."""
    from alignkit import logger

    logger.warning(warning)
    why = warning.split("not applied: ", 1)[-1]
    keep_not_applied(cfg, not_applied_record([(key, why) for key in keys], keys))


def not_applied(cfg) -> dict:
    """The keys the settings `cfg` were parsed from named as not applied (keep_not_applied), JSON-safe; {} if none."""
    return _jsonable(getattr(cfg, "_alignkit_not_applied", None) or {})
