"""TRL's own field types: how a flag's or a recipe's value becomes what a field of a TRL config takes (trl_value,
checked before the model loads), how a command line reads the field (cli_kind), and the fields and choices TRL's
dataclasses declare, read from TRL itself. alignkit.core.trl_names speaks TRL's names with these."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing

from alignkit.core.args import _FALSE, _TRUE, ConfigError
from alignkit.core.trl_tables import DTYPE_SYNONYMS

__all__ = ["cli_kind", "same_meaning", "trl_choices", "trl_fields", "trl_value", "typed_overrides", "unset"]


def _members(tp) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def cli_kind(tp):
    """How a command line reads a TRL field: a bool flag may come bare, a list takes several values."""
    members = _members(tp)
    if bool in members:
        return bool
    if any(m is list or typing.get_origin(m) is list for m in members):
        return list[str]
    return str


def trl_value(raw, tp, where):
    """`raw` (a string from a flag or the environment, or a YAML/Python value) as TRL's field type `tp` takes it;
    an enum's value is checked here, before the model loads."""
    members = _members(tp)
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    literals = [a for m in members if typing.get_origin(m) is typing.Literal for a in typing.get_args(m)]
    value = raw
    if isinstance(raw, str):
        text = raw.strip()
        low = text.lower()
        if low in ("none", "null") and type(None) in members:
            return None
        if bool in members and low in _TRUE | _FALSE:
            return low in _TRUE
        for number in (int, float):
            if number in members:
                try:
                    return number(text)
                except ValueError:
                    pass
        if any(m is dict or typing.get_origin(m) is dict for m in members) and text.startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"invalid value for {where}: not valid JSON ({e})") from None
        if any(m is list or typing.get_origin(m) is list for m in members) and (
                str not in members or "," in text):
            return [p.strip() for p in text.split(",") if p.strip()]
        if (pair := next((m for m in members if typing.get_origin(m) is tuple), None)) and str not in members:
            return _tuple_value(text, pair, where)  # RLOO's reward_clip_range: -0.5,0.5 (YAML's list as it is)
        if str not in members and not enums and not literals:
            raise ConfigError(f"invalid value for {where}: {raw!r} is not {' or '.join(map(_name, members))}")
    elif raw is False and any("no" in {e.value for e in m} for m in enums):  # YAML 1.1's bare `no` (eval_strategy)
        value = "no"
    elif not _fits(raw, members):  # a YAML or JSON value of another type (optim: 5): TRL fails on it after loading
        raise ConfigError(f"invalid value for {where}: {raw!r} is not {' or '.join(map(_name, members))}")
    if enums and isinstance(value, str):
        allowed = [e.value for m in enums for e in m]
        if value not in allowed:
            raise ConfigError(f"invalid value for {where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if literals and value not in literals and not (str in members and isinstance(value, str)):
        raise ConfigError(f"invalid value for {where}: {value!r} is not one of {', '.join(map(str, literals))}")
    return value


def same_meaning(value, other) -> bool:
    """Whether alignkit's own setting, given as `other`, says what the TRL alias's converted `value` says: the same
    words, numbers, truth values or lists, however written (bf16 and bfloat16, 1e-5 and 0.00001, true and True)."""
    def atom(v):
        if isinstance(v, bool):
            return v
        text = str(v).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        try:
            return float(text)
        except ValueError:
            return DTYPE_SYNONYMS.get(text, text)

    def norm(v):
        return tuple(map(atom, v if isinstance(v, (list, tuple)) else str(v).strip("[]()").split(",")))

    return norm(value) == norm(other)


def unset(v) -> bool:
    """A value that says nothing (None, or "none"/"null" as a flag or a config dump writes it)."""
    return v is None or str(v).strip().lower() in ("none", "null")


def _tuple_value(text: str, tp, where) -> list:
    """A fixed-length tuple field written A,B (or [A, B], (A, B)), as the list TRL takes from a YAML recipe."""
    kinds = typing.get_args(tp)
    parts = [p.strip() for p in text.strip("[]()").split(",") if p.strip()]
    example = ",".join({float: ("-1.0", "1.0"), int: ("-1", "1")}.get(k, ("a", "b"))[i % 2] for i, k in enumerate(kinds))
    if Ellipsis in kinds:  # tuple[float, ...]: any number of them
        kinds = kinds[:1] * max(len(parts), 1)
    if len(parts) != len(kinds):
        raise ConfigError(f"invalid value for {where}: {text!r}: expected {len(kinds)} values separated by commas, "
                          f"e.g. {example}")
    try:
        return [kind(part) for kind, part in zip(kinds, parts)]
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value for {where}: {text!r}: expected {' and '.join(map(_name, kinds))} values "
                          f"separated by commas, e.g. {example}") from None


def _fits(value, members) -> bool:
    """Whether a non-string `value` has one of the types `members` (a TRL field's); True where a member is a type
    this cannot judge (Any, a class of TRL's own)."""
    simple = (type(None), bool, int, float, str, list, dict)
    kinds = [typing.get_origin(m) or m for m in members]
    if any(k is typing.Literal and value in typing.get_args(m) for k, m in zip(kinds, members)):
        return True
    if any(not (k in simple or (isinstance(k, type) and issubclass(k, enum.Enum)) or k is typing.Literal)
           for k in kinds):
        return True
    if value is None or isinstance(value, bool):
        return type(value) in kinds
    if isinstance(value, enum.Enum):
        return type(value) in kinds
    if isinstance(value, (int, float)):
        return float in kinds or (isinstance(value, int) and int in kinds)
    if isinstance(value, (list, tuple)):
        return list in kinds
    if isinstance(value, dict):
        return dict in kinds
    return True


def _name(tp) -> str:
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


@functools.cache
def trl_fields(names: tuple[str, ...]) -> dict:
    """{field name: type} of TRL's dataclasses `names` (e.g. ("DPOConfig",)), read from TRL itself."""
    import trl

    out = {}
    for name in names:
        cls = getattr(trl, name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, hints.get(f.name, f.type))
    return out


def typed_overrides(overrides: dict, names: tuple[str, ...]) -> dict:
    """--trainer_overrides with each string value of a field that takes no string as TRL's field takes it
    ('{"sync_ref_model": "false"}': False, '"7"': 7; a flag's value is converted so too): the string reached TRL as
    it was, where "false" is true. A field that takes strings gets the string ("none" is report_to's word, not
    JSON's null)."""
    types = trl_fields(tuple(names))

    def typed(k, v):
        if not isinstance(v, str) or k not in types or str in _members(types[k]):
            return v
        return trl_value(v, types[k], f"--trainer_overrides {k}")

    return {k: typed(k, v) for k, v in overrides.items()}


@functools.cache
def trl_choices(names: tuple[str, ...]) -> dict:
    """{field name: the values it takes} where TRL's dataclasses `names` list them (field metadata "choices")."""
    import trl

    out = {}
    for name in names:
        for f in dataclasses.fields(getattr(trl, name)):
            if f.init and f.metadata.get("choices"):
                out.setdefault(f.name, list(f.metadata["choices"]))
    return out
