"""The one config mechanism every alignkit script uses.

A settings ``@dataclass`` becomes a parser with this precedence, lowest to highest:
dataclass defaults < preset < .env file < environment < ``--config`` YAML < CLI flags < ``overrides``.
Field ``dpo_beta`` is ``--dpo_beta VALUE`` / ``--dpo_beta=VALUE`` and env var ``ALIGNKIT_DPO_BETA``.

Environment variables: every setting is read as ``ALIGNKIT_<NAME>``; the bare upper-case name only for the few
names the seed project documented (``BARE_ENV_NAMES``: ``DPO_BETA``, ``MODEL_ID``, ...), so a ``SEED``, ``MODE`` or
``OUTPUT`` left in a shell or a cluster's environment never changes a run. Each one read is logged by name, and
an ALIGNKIT_ variable that no script reads is an unknown setting (alignkit.core.environment).

A class may speak a second vocabulary (``cls.vocabulary()``, e.g. TRL's names, alignkit.core.trl_names): it
translates every layer's keys into fields, and every key that is neither is reported in one message.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import yaml
from dotenv import load_dotenv

from alignkit.core.environment import (BARE_ENV_NAMES, ENV_PREFIX, SETTING_SOURCES, log_environment, read_environment,
                                      stray_variables)
from alignkit.core.errors import ConfigError, forget_failed_settings, is_notebook  # noqa: F401 - ConfigError is re-exported
from alignkit.core.saved_settings import is_secret_field, is_set, keep_not_applied, not_applied_record
from alignkit.core.secrets import TOKEN_SETTINGS, name_secret_variables, redact

__all__ = ["ConfigError", "setting", "parse_config", "redact", "is_notebook", "command_line", "BARE_ENV_NAMES",
           "ENV_PREFIX"]

_MISSING = dataclasses.MISSING
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def setting(default=_MISSING, help: str = "", choices=None, default_factory=_MISSING, whole: bool = False,
            synonyms: Mapping | None = None, flags: bool = False):
    """``dataclasses.field`` carrying the help text and allowed values shown by ``--help``.

    whole: a list whose values are kept whole, never split at commas (prompts hold commas: "Hello, who are
    you?" is one prompt); on a command line each value is its own argument, and a string from the environment
    or a --config file is one value.
    synonyms: other spellings of the choices, e.g. TRL's {"bfloat16": "bf16"}; accepted from every layer.
    flags: a string of another script's flags (rlaif.py's --label_args): on a command line the next argument is
    its value even when it starts with --, so `--label_args "--parallel 32"` works as a shell user writes it.
    A ``dict`` setting takes a YAML mapping or a JSON object, and merges key by key across the layers.
    A settings class's ``help_texts`` ({name: text}) replaces a shared field's help in its own --help, where that
    script does otherwise than the field's text says (reward.py's --max_length), without copying the field.
    """
    if isinstance(default, (list, dict, set)):  # dataclasses rejects mutable defaults; copy per instance instead
        default, default_factory = _MISSING, (lambda d=default: type(d)(d))
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "choices": list(choices) if choices else None, "whole": whole,
                                       "synonyms": dict(synonyms or {}), "flags": flags})


# ---------------------------------------------------------------- types and conversion
def field_defaults(cls) -> dict:
    """Each init field's default (a default_factory called): what a setting is when no layer sets it. Used by the
    parser and by --resume auto (a setting added since a run was saved, left at its default, is no change)."""
    return {f.name: f.default if f.default is not _MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.init and (f.default is not _MISSING or f.default_factory is not _MISSING)}


def _unwrap_optional(tp):
    """(X, True) for ``X | None`` / ``Optional[X]``, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return tp, False


def _list_item(tp):
    """Element type of ``list[X]`` (``str`` for bare ``list``), or None if tp is not a list."""
    if tp is list:
        return str
    return (typing.get_args(tp) or (str,))[0] if typing.get_origin(tp) is list else None


def _is_mapping(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    item = _list_item(inner)
    name = f"list of {_type_name(item)}" if item is not None else "mapping" if _is_mapping(inner) else getattr(
        inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def _scalar(raw, tp, where):
    if tp is bool and str(raw).strip().lower() in _TRUE | _FALSE:  # str(True) == "True": YAML booleans work too
        return str(raw).strip().lower() in _TRUE
    expected = {bool: "a boolean (true/false, 1/0, yes/no, on/off)", int: "an int", float: "a float",
                str: "a string"}.get(tp, f"a valid {_type_name(tp)}")
    try:
        # YAML `true` for a number or string is a mistake, not 1; a YAML list for a string is a mistake too.
        if tp is bool or isinstance(raw, bool) or (tp is str and not isinstance(raw, (str, int, float))):
            raise ValueError
        if tp is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return raw if isinstance(raw, tp) else tp(raw)  # int(" 3"), float(2), str(5), Path("x")...
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value for {where}: {raw!r} is not {expected}") from None


def _mapping(raw, where) -> dict:
    """A YAML mapping or a JSON object (from a flag or the environment) as a dict."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            example = ('{"datasets": [{"id": "data/pairs.jsonl"}], "test_split_size": 0.05}' if "mixture" in str(where)
                       else '{"optim": "paged_adamw_8bit"}')  # the setting's own kind of object
            raise ConfigError(f"invalid value for {where}: not valid JSON ({e}); pass a JSON object, e.g. "
                              f"'{example}'") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"invalid value for {where}: {raw!r} is not a mapping (a JSON object or YAML mapping)")
    return dict(raw)


def _convert(raw, tp, where, choices=None, whole=False, synonyms=None):
    """Turn a raw value (string from CLI/env, or YAML/Python object) into the annotated type.

    whole: a string is one list item, not a comma-separated list (setting(whole=True)).
    synonyms: other spellings of the choices (setting(synonyms=...))."""
    inner, optional = _unwrap_optional(tp)
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"invalid value for {where}: None is not allowed, expected {_type_name(tp)}")
    if _is_mapping(inner):
        return _mapping(raw, where)
    if synonyms and isinstance(raw, str) and raw.strip().lower() in synonyms:
        raw = synonyms[raw.strip().lower()]
    if choices and {"true", "false"} <= set(choices) and str(raw).strip().lower() in _TRUE | _FALSE:
        raw = "true" if str(raw).strip().lower() in _TRUE else "false"  # auto/true/false: YAML booleans too
    item = _list_item(inner)
    if item is None:
        items = [value := _scalar(raw, inner, where)]
    else:
        if isinstance(raw, str):  # CLI tokens, env vars and YAML strings are comma separated, unless whole
            raw = [raw] if whole else [p.strip() for p in raw.split(",") if p.strip()]
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"invalid value for {where}: {raw!r} is not a {_type_name(inner)}")
        value = items = [_scalar(x, item, where) for x in raw]
    if choices and (v := next((v for v in items if v not in choices), _MISSING)) is not _MISSING:
        raise ConfigError(f"invalid value for {where}: {v!r} is not one of {', '.join(map(str, choices))}")
    return value


def _suggest(name, names, prefix="", cls=None, vocab=None, fields=(), why_not=False):
    """The way to say it: (`why_not`) why a second vocabulary (alignkit.core.trl_names) knows `name` but not for this
    script, a setting the class names elsewhere (`elsewhere`: name -> where it goes instead), or the closest setting
    name, of those the vocabulary does not name as not applied or refused."""
    if why_not and vocab is not None and (why := vocab.why_not(name, fields)):
        return f"; {why}"
    elsewhere = getattr(cls, "elsewhere", {}) or {}
    if str(name) in elsewhere:
        return f"; {elsewhere[str(name)]}"
    if vocab is not None:
        if own := vocab.own_name(str(name), fields):  # kto.py's --beta for dpo.py's --dpo_beta, not a near name
            return f"; did you mean {prefix}{own}?"
        names = vocab.suggestable(names, fields)
    close = difflib.get_close_matches(str(name), list(names), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


# ---------------------------------------------------------------- layers
def _parse_cli(argv, types_, whole=frozenset(), flags=frozenset(), switches=frozenset()):
    """Return ({name: raw string, or a list for a `whole` field}, config path or None, wants_help, unknown names).
    Raw values are converted later. A `whole` field's values are its arguments as given, repeated flags adding
    more. An unknown option takes the values after it, so that every unknown one is reported together."""
    values, config, wants_help, i, unknown = {}, None, False, 0, []
    is_option = lambda tok: tok.startswith("--") or tok == "-h"  # noqa: E731  ("-0.5" stays a value)
    while i < len(argv):
        tok, i = argv[i], i + 1
        if tok in ("-h", "--help"):
            wants_help = True
            continue
        if tok == "--debug":  # read by alignkit.core.errors: show the traceback of a user error; not a setting
            continue
        if i == 1 and tok.lower().endswith((".yaml", ".yml")) and not tok.startswith("-"):
            config = tok  # the alignment-handbook's way: `run_sft.py recipe.yaml [--flag value ...]`, as --config
            continue
        if not tok.startswith("--") or tok == "--":
            kind = "option" if tok.startswith("-") else "argument"
            raise ConfigError(f"unexpected {kind} {tok!r}: options are written --name VALUE (see --help)")
        name, eq, inline = tok[2:].partition("=")
        name = name.replace("-", "_")  # accept --dpo-beta too
        vals = [inline] if eq else []
        if not eq and name in flags and i < len(argv):  # its value is flags itself: take it whole
            vals, i, eq = [argv[i]], i + 1, "="
        while not eq and i < len(argv) and not is_option(argv[i]):
            vals, i = vals + [argv[i]], i + 1
        if name == "config":
            if len(vals) != 1:
                raise ConfigError("--config expects one value: the path of a YAML file")
            if config is not None:
                raise ConfigError(f"two recipes: {config} and --config {vals[0]}; give one")
            config = vals[0]
            continue
        switch = lambda n: _unwrap_optional(types_.get(n))[0] is bool or n in switches  # noqa: E731
        if name not in types_ and name.startswith("no_") and switch(name[3:]) and not vals:
            values[name[3:]] = "false"  # HfArgumentParser's --no_<flag> for a flag that defaults to true (TRL's CLI)
            continue
        if name not in types_:
            unknown.append(name)
            continue
        inner, _ = _unwrap_optional(types_[name])
        if name in whole:
            values[name] = [*values.get(name, []), *vals]
        elif _list_item(inner) is not None:
            values[name] = ",".join(vals)  # `a b` and `a,b` both become "a,b"; `--x none` stays "none"
        elif switch(name) and not vals:  # a bool, or a choice of auto/true/false (TRL's bool there)
            values[name] = "true"
        elif len(vals) != 1:
            got = f"got {len(vals)}: {' '.join(vals)}" if vals else "got none"
            raise ConfigError(f"--{name} expects one value, {got}")
        else:
            values[name] = vals[0]
    return values, config, wants_help, unknown


def _load_yaml(path, source):
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path} (given by {source}); check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text; save the file as UTF-8") from None
    except yaml.YAMLError as e:  # one line: pyyaml's own message spans several, with a drawing of the spot
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}not valid YAML ({problem}); fix the file there") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of option: value, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "[]"
    return str(value).lower() if value is None or isinstance(value, bool) else str(value) or "''"


def _help_groups(cls, fields) -> list[tuple[str, list[str]]]:
    """(title, field names) in the order --help shows them: the class's `help_groups` (most used first), then
    the fields no group names, under the class's `help_title`."""
    groups, seen = [], set()
    for title, names in getattr(cls, "help_groups", ()):
        present = [n for n in names if n in fields and n not in seen]
        seen |= set(present)
        if present:
            groups.append((title, present))
    rest = [n for n in fields if n not in seen]
    if rest:
        groups.insert(min(len(groups), getattr(cls, "help_rest_at", len(groups))),
                      (getattr(cls, "help_title", "settings"), rest))
    return groups


def _print_help(cls, fields, types_, defaults, prog, description, vocab, presets=None):
    parser = argparse.ArgumentParser(prog=prog, description=description, add_help=False,
                                     usage=f"{prog} [--config FILE] [--OPTION VALUE ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=vocab.help_text(fields) if vocab else None)
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("--config", metavar="FILE", help=f"YAML file of {{option: value}} [env: {ENV_PREFIX}CONFIG]")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error, not just its message [env: ALIGNKIT_DEBUG=1]")
    for title, names in _help_groups(cls, fields):
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            choices = f.metadata.get("choices") or (sorted(presets) if name == "preset" and presets else None)
            inner, _ = _unwrap_optional(types_[name])
            metavar = "{%s}" % ",".join(map(str, choices)) if choices else (
                "[BOOL]" if inner is bool else "A,B,..." if _list_item(inner) else _type_name(inner).upper())
            default = "required" if name not in defaults else "***" if is_secret_field(name) and is_set(
                defaults[name]) else redact(_show(defaults[name]))
            env = f"{ENV_PREFIX}{name.upper()}" + (f" or {name.upper()}" if name.upper() in BARE_ENV_NAMES else "")
            also = vocab.aliases_of(name) if vocab else []
            also = f"; also --{', --'.join(also)}" if also else ""
            if vocab and name in defaults:
                also += vocab.default_note(name, _show(defaults[name]))
            said = getattr(cls, "help_texts", {}).get(name, f.metadata.get("help", ""))  # the class's own, if any
            text = f"{said} [{_type_name(types_[name])}; default: {default}; env: {env}{also}]"
            group.add_argument(f"--{name}", metavar=metavar, help=text.strip().replace("%", "%%"))
    print(parser.format_help())


# ---------------------------------------------------------------- layers in a second vocabulary
def _translate(vocab, layer, where, fields, label):
    """(layer in field names, unknown keys, (key, why) not applied): a second vocabulary's keys become fields;
    `where` names the layer, `label(key)` a value in it, in messages."""
    if vocab is None:  # a script without TRL's names (merge.py, label.py, evaluate.py) refuses a token as they do
        if token := next((k for k in layer if k in TOKEN_SETTINGS and k not in fields), None):
            raise ConfigError(f"{label(token)} has no effect in alignkit: {TOKEN_SETTINGS[token]}; drop it")
        return dict(layer), [k for k in layer if k not in fields], []
    return vocab.translate(layer, where, fields, label)


# ---------------------------------------------------------------- entry point
# The variables a .env file put into os.environ in this process, with their values (parse_config).
_FROM_DOTENV: dict[str, str] = {}


# A preset's setting that would override another one the user gave: it yields (back to its own default). The
# Trainer counts --max_steps over --num_train_epochs, so the tiny rl preset's 60 steps overrode `--num_train_epochs 1`;
# vibes asked the preset's 64 prompts after the one given with `--prompts` (the evaluate audit of session 31).
PRESET_YIELDS = {"max_steps": "num_train_epochs", "prompts_file": "prompts"}


def parse_config(cls, args=None, overrides=None, env_file=".env", presets=None, prog=None, description=None):
    """Build an instance of dataclass ``cls`` from all layers (see module docstring). In a notebook, settings that
    fail take the earlier ones of this class out of the kernel here (a `%%time` cell keeps the error from IPython,
    a helper function hides the call from the cell's text), and a settings cell that fails further down does the
    same (alignkit.core.errors._settings_cell_failed)."""
    try:
        return _parse_config(cls, args, overrides, env_file, presets, prog, description)
    except ConfigError:
        forget_failed_settings(cls)
        raise


def command_line() -> list[str]:
    """The flags on the command line: sys.argv[1:], but none in a kernel or an IPython console, whose argv (`-f
    kernel.json`, --no-banner, a launcher's own) is theirs. IPython's `%run script.py FLAGS` and `ipython script.py --
    FLAGS` hand the script its flags as sys.argv, argv[0] the script: read where the code asking (the innermost
    caller outside alignkit) is that script's (they were dropped without a word: the notebook audit of session 32).
    A kernel's cell is no file of argv[0]'s, whatever launched the kernel (ipykernel, Spyder, PyCharm, Colab)."""
    if not is_notebook():
        return sys.argv[1:]
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # alignkit/
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame = frame.f_back
    caller = frame.f_code.co_filename if frame is not None else ""
    argv0 = sys.argv[0] if sys.argv else ""
    same = bool(argv0) and os.path.isfile(argv0) and os.path.isfile(caller) and os.path.samefile(argv0, caller)
    return sys.argv[1:] if same else []


def _parse_config(cls, args, overrides, env_file, presets, prog, description):
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"parse_config expects a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)  # resolves string annotations from `from __future__ import annotations`
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    types_ = {n: hints.get(n, f.type) for n, f in fields.items()}
    if "config" in fields:
        raise ConfigError(f"{cls.__name__}: field name 'config' is reserved for --config FILE; rename the field")
    vocab = cls.vocabulary() if hasattr(cls, "vocabulary") else None

    if args is None:
        args = command_line()
    whole = frozenset(n for n, f in fields.items() if f.metadata.get("whole"))
    cli_types = {**(vocab.cli_types() if vocab else dict.fromkeys(TOKEN_SETTINGS, str)), **types_}
    flags = frozenset(n for n, f in fields.items() if f.metadata.get("flags"))
    switches = frozenset(n for n, f in fields.items() if {"true", "false"} <= set(f.metadata.get("choices") or ()))
    cli, config_path, wants_help, unknown_flags = _parse_cli(list(args), cli_types, whole, flags, switches)

    env_from_file = set()
    for name, value in _FROM_DOTENV.items():  # a .env read earlier in this process (a notebook's first cell run
        if os.environ.get(name) == value:    # again): its values go, so the file is read as it is now
            del os.environ[name]
    _FROM_DOTENV.clear()
    if env_file is not None:
        before = set(os.environ)  # override=False: real env vars win; secrets such as HF_TOKEN reach libraries
        load_dotenv(env_file, override=False)
        env_from_file = set(os.environ) - before
        _FROM_DOTENV.update((name, os.environ[name]) for name in env_from_file)
    env_names = [*fields, *(vocab.env_names(fields) if vocab else [])]
    env, env_labels = read_environment(env_names, env_from_file, env_file)
    found_in_env = dict(env)

    config_source = "--config"
    if config_path is None and os.environ.get(f"{ENV_PREFIX}CONFIG"):
        config_path, config_source = os.environ[f"{ENV_PREFIX}CONFIG"], f"env var {ENV_PREFIX}CONFIG"
    recipe = _load_yaml(config_path, config_source) if config_path else {}
    raw_recipe = dict(recipe)  # in its own names (TRL's, the handbook's, or alignkit's)
    overrides = dict(overrides or {})

    # Every layer in field names; every key that is no setting, from every layer, in one message.
    unknown, notes, dropped = [], [], {}  # dropped: the keys named as not applied, recorded with the settings
    translated = []
    places = ("the environment", str(config_path), "the command line", "overrides")  # each layer's, translate's `where`
    as_typed = [functools.partial(vocab.spelled, where) if vocab else str for where in places]  # --beta, not --dpo_beta
    labels = (lambda k: env_labels.get(as_typed[0](k), f"env var {ENV_PREFIX}{as_typed[0](k).upper()}"),
              lambda k: f"{config_path}: key {as_typed[1](k)}", lambda k: f"--{as_typed[2](k)}",
              lambda k: f"overrides key {as_typed[3](k)!r}")
    for (layer, show), where, label in zip(((env, lambda k: f"{ENV_PREFIX}{k.upper()}"), (recipe, str),
                                            (cli, lambda k: f"--{k}"), (overrides, repr)), places, labels):
        fields_layer, bad, said = _translate(vocab, layer, where, fields, label)
        dashes = "--" if layer is cli else ""
        unknown += [f"{show(k)} (in {where}"
                    f"{_suggest(k, [*fields, *cli_types], dashes, cls, vocab, fields, why_not=True)})" for k in bad]
        notes += [f"{key}: {why}" for key, why in said]
        dropped.update(not_applied_record(said, layer))
        translated.append(fields_layer)
    if vocab is not None and vocab.deferred:  # a TRL field's bad value that no later layer set again
        raise next(iter(vocab.deferred.values()))
    unknown += [f"--{k} (on the command line{_suggest(k, [*cli_types, 'config'], '--', cls, vocab, fields)})"
                for k in unknown_flags]
    unknown += stray_variables(env_names, env_from_file, env_file)
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}. --help lists "
                          "every setting" + (", TRL's names included" if vocab else ""))
    if notes:
        logging.getLogger("alignkit").warning("not applied, and why: " + " | ".join(dict.fromkeys(notes)))
    typed = {k for layer in (env, recipe, cli, overrides) for k in layer}  # the names the user gave, before translation
    env, recipe, cli, overrides = translated

    layers = list(zip((env, recipe, cli, overrides), labels))
    kinds = ("env", "recipe", "cli", "overrides")  # what `given` records of each layer

    def convert(n, raw, label):
        meta = fields[n].metadata
        return _convert(raw, types_[n], label, meta.get("choices"), n in whole, meta.get("synonyms"))

    defaults = field_defaults(cls)
    preset_keys: set = set()  # what the preset set: the user's choice, as much as a flag (Vocabulary.finish)
    if presets is not None and "preset" in fields:
        # The preset name itself may come from any layer; the highest one wins like any other field.
        name = defaults.get("preset")
        for layer, label in layers:
            if "preset" in layer:
                name = convert("preset", layer["preset"], label("preset"))
        if name:
            if name not in presets:
                known = ", ".join(sorted(presets)) or "(none defined)"
                raise ConfigError(f"unknown preset {name!r}; known presets: {known}")
            for key, value in presets[name].items():
                if key not in fields:
                    raise ConfigError(f"preset {name!r} sets unknown field {key!r}{_suggest(key, fields)}")
                defaults[key] = convert(key, value, f"preset {name!r}: key {key}")
            defaults["preset"], preset_keys = name, set(presets[name])

    if wants_help:
        prog = prog or (cls.__name__ if is_notebook() or not sys.argv else os.path.basename(sys.argv[0]))
        _print_help(cls, fields, types_, defaults, prog, description, vocab, presets)
        raise SystemExit(0)

    values, given, bad = dict(defaults), {}, {}
    for (layer, label), kind in zip(layers, kinds):
        for n, raw in layer.items():
            try:
                value = convert(n, raw, label(n))
            except ConfigError as error:  # a later layer may set it again: a flag fixes a recipe's bad value
                bad[n] = error
                continue
            bad.pop(n, None)
            if isinstance(value, dict) and isinstance(values.get(n), dict):  # mappings merge key by key
                value = {**values[n], **value}
            values[n], given[n] = value, kind
    if bad:
        raise next(iter(bad.values()))
    for ours, theirs in PRESET_YIELDS.items():  # a preset only sets defaults, these included
        if ours in preset_keys and ours not in given and theirs in given and ours in fields:
            values[ours] = field_defaults(cls)[ours]
    log_environment(found_in_env, env_labels, lambda n: (n, None) if n in fields else
                    vocab.field_of(n, fields) if vocab else (None, None),
                    list(zip((recipe, cli, overrides), (str(config_path), "the command line", "overrides"))))
    if vocab is not None:
        vocab.finish(values, given, recipe_keys=set(recipe), raw_recipe_keys=set(raw_recipe), preset_keys=preset_keys)
    for n in (n for n in fields if n not in values):
        raise ConfigError(f"missing required option --{n} (or env var {ENV_PREFIX}{n.upper()}, or key {n} in the "
                          "--config file)")
    # A variable a setting names as holding a key (--judge_api_key_env MY_KEY) is a secret whatever it is called.
    name_secret_variables(*(values.get(n) for n in fields if n.endswith("_key_env") and isinstance(values.get(n), str)))
    sources = SETTING_SOURCES.set({n: (kind, labels[kinds.index(kind)](n)) for n, kind in given.items()})
    try:
        return keep_not_applied(cls(**values), dropped)
    except (ValueError, TypeError) as e:  # __post_init__ validation is a user-facing config problem too
        trl = {n: [a for a in vocab.aliases_of(n) if a in typed] for n in fields  # --beta typed, dpo_beta said
               if vocab and re.search(rf"\b{n}\b", str(e))}
        said = re.sub(r"^--(\w+)\b", lambda m: (  # the value's own place: an overrides key, a recipe key, a variable
            labels[kinds.index(given[m[1]])](m[1]) if m[1] in given else m[0]), str(e))
        raise ConfigError(said + "".join(f" ({n} is TRL's {' / '.join(a)})" for n, a in trl.items() if a)) from e
    finally:
        SETTING_SOURCES.reset(sources)
