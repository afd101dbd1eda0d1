"""The identity of a user's Python code (a `python:` judge, grader, reward or verifier, the presets' rule judges), for
the keys of what it computed: edit the code, or a data file it names, and its earlier results are not reused.

`code_fingerprint(function)` digests:
- the whole source file of the function (so the constants and helpers it uses count, not only its own lines), and
  every file of code that file imports, anywhere in it, all the way down: modules beside it, in its package
  (relative imports), in a package found on sys.path (`from mypkg.prefs import PREFER`), and alignkit's own.
  Installed libraries (the standard library, site-packages) are not followed: their files change with their
  versions. Imports are found by reading the files, never by importing anything;
- the data files a user's file of code names in a string (`Path(__file__).parent / "prefs.json"`, `open("rules.yaml")`
  beside it, an absolute path), by content, each as the code names it: a rule that reads its preferences from a file
  changes with it. Only files of data count (DATA_SUFFIXES: not a log the rule writes, which would change its key at
  every run); a file found any other way (a name built from parts, an environment variable, a folder listed) is not;
- a function typed into a notebook or a console: its text, and the plain values of the globals it reads (a constant
  set in another cell);
- what is behind a callable that is not a plain function: `functools.partial`'s function and its bound arguments,
  a decorated function's `__wrapped__`, a callable object's class and its state (`__dict__`, `__slots__`, or how it
  pickles: `operator.itemgetter(1)`), a bound method's function and its object's state; a builtin by its qualified
  name (and a bound one's object).
Plain data is JSON, and sets, tuples, paths, bytes and compiled regexes by their content. Code or data alignkit
cannot read gets a token of this process, said once in a warning: its results are reused within this process
only, never by another run (nor does such a run resume).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import inspect
import json
import os
import re
import sys
import sysconfig
import uuid
from pathlib import Path

from alignkit.core.digests import digest

_THIS_PROCESS = uuid.uuid4().hex  # stands for code alignkit cannot read: no other process reuses what it computed
_ALIGNKIT = Path(__file__).resolve().parents[1]  # the alignkit package folder
_MAX_FILES = 2000  # a walk that finds more has gone somewhere it should not: say so in the key, reuse nothing
_MAX_DATA = 64 * 2**20  # a data file named in code over this size counts by its size and time of change
_WARNED: set = set()


def _installed_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    return tuple({Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)})


_INSTALLED = _installed_roots()


class _Unreadable(Exception):
    """Part of the code or its bound data cannot be read as source or plain data."""


def code_fingerprint(function) -> str:
    """A 16-character digest of `function`'s code and everything it reads (see the module docstring)."""
    data: list = []
    files, texts = {}, []
    try:
        for code in list(_code_objects(function, data)):
            source = _source_file(code)
            if isinstance(code, str):  # a builtin, by its name
                texts.append(code)
            elif source is not None:
                _walk(source, files)
            else:  # typed into a notebook or a console: its own text, where Python kept it, and what it reads
                try:
                    texts.append(inspect.getsource(code))
                except (OSError, TypeError):
                    raise _Unreadable from None
                data.append(_globals_read(code))
        if len(files) > _MAX_FILES:
            raise _Unreadable
    except _Unreadable:
        name = getattr(function, "__qualname__", type(function).__qualname__)
        if name not in _WARNED:
            _WARNED.add(name)
            from alignkit import logger

            logger.warning(f"{name}: alignkit cannot read all of its code or the data bound into it, so what it "
                           "computes is reused within this process only (not by a rerun, nor to resume)")
        return digest({"unreadable": _THIS_PROCESS, "object": id(function)}, 16)
    return digest({"files": {_name(path, files): sha for path, sha in files.items()}, "texts": texts, "data": data},
                  16)


def _name(path, files: dict) -> str:
    """alignkit's files as alignkit/...; the others from the function's own folder (a moved project keeps its keys);
    a data file as its file of code names it."""
    if isinstance(path, tuple):
        code, named = path
        return f"{_name(code, files)}: {named}"
    if path.is_relative_to(_ALIGNKIT):
        return path.relative_to(_ALIGNKIT.parent).as_posix()
    return os.path.relpath(path, next(iter(files)).parent)


def _code_objects(obj, data: list, depth: int = 0):
    """The functions and classes whose source makes up `obj` (a builtin: its name), and (into `data`) the plain data
    bound into it."""
    if depth > 20:
        raise _Unreadable
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if isinstance(obj, functools.partial):
        data.append(_plain([list(obj.args), obj.keywords]))
        yield from _code_objects(obj.func, data, depth + 1)
    elif inspect.ismethod(obj):
        owner = obj.__self__
        data.append(owner.__qualname__ if isinstance(owner, type) else _state(owner))
        yield from _code_objects(obj.__func__, data, depth + 1)
    elif inspect.isbuiltin(obj) or inspect.ismethoddescriptor(obj) or type(obj).__name__ == "method-wrapper":
        owner = getattr(obj, "__self__", None)
        if owner is not None and not inspect.ismodule(owner):  # "A".startswith: its string counts
            data.append(owner.__qualname__ if isinstance(owner, type) else _plain(owner))
        name = getattr(obj, "__qualname__", None)
        if not name:
            raise _Unreadable
        yield f"builtin {getattr(obj, '__module__', None) or getattr(owner, '__name__', '')}.{name}"
    elif inspect.isfunction(obj) or inspect.isclass(obj):
        yield obj
    else:  # a callable object: its class's code, and what it holds
        data.append(_state(obj))
        if type(obj).__module__ == "builtins":
            yield f"builtin {type(obj).__qualname__}"
        else:
            yield type(obj)


def _state(obj):
    """An object's state as plain data: its __dict__ and __slots__, else how it pickles (a C class's arguments)."""
    state, found = {}, False
    if isinstance(getattr(obj, "__dict__", None), dict):
        state.update(vars(obj))
        found = True
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in [slots] if isinstance(slots, str) else slots:  # __slots__ = "word" names one
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                state[f"slot {slot}"] = getattr(obj, slot)
                found = True
    if not found:
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception:  # noqa: BLE001 - an object that will not pickle: nothing to read
            raise _Unreadable from None
        if not isinstance(reduced, tuple) or len(reduced) < 2:
            raise _Unreadable
        state["reduced"] = list(reduced[1:3])
    return _plain(state)


def _plain(value):
    """`value` as JSON-able data, read by content; _Unreadable where it holds anything else."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((_plain(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))}
    if isinstance(value, os.PathLike):
        return {"path": os.fspath(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": hashlib.sha256(value).hexdigest()}
    if isinstance(value, re.Pattern):
        return {"regex": _plain(value.pattern), "flags": value.flags}
    raise _Unreadable


def _globals_read(function) -> dict:
    """The plain values of the globals a function typed into a notebook reads (its code's names, nested ones too);
    another kind of value by its type's name."""
    if not inspect.isfunction(function):
        return {}
    names, stack = set(), [function.__code__]
    while stack:
        code = stack.pop()
        names |= set(code.co_names)
        stack += [c for c in code.co_consts if inspect.iscode(c)]
    out = {}
    for name in sorted(names & function.__globals__.keys()):
        value = function.__globals__[name]
        if inspect.ismodule(value) or callable(value):
            continue
        try:
            out[name] = _plain(value)
        except _Unreadable:
            out[name] = f"a {type(value).__qualname__}"
    return out


def _source_file(code) -> Path | None:
    if isinstance(code, str):
        return None
    try:
        path = inspect.getsourcefile(code)
    except TypeError:
        return None
    return Path(path).resolve() if path and Path(path).is_file() else None


def _walk(start: Path, files: dict) -> None:
    """Every file of code reachable by imports from `start` (itself included), with its SHA-256, into `files`, and
    the data files a user's file names (not alignkit's own: its strings name files of the runs it makes)."""
    queue = [start]
    while queue and len(files) <= _MAX_FILES:
        path = queue.pop()
        if path in files:
            continue
        sha, imports, named = _read(path, path.stat())
        files[path] = sha
        for node_module, name, level in imports:
            found = _resolve(path, node_module, name, level)
            if found is not None and found not in files:
                queue.append(found)
        for name in named if not path.is_relative_to(_ALIGNKIT) else ():
            data = Path(name) if os.path.isabs(name) else path.parent / name
            try:  # a string too long for a file name (a prompt in Chinese), a folder it may not read: no file
                if data.is_file() and data.suffix.lower() in DATA_SUFFIXES:
                    files[(path, name)] = _data_sha(data)  # as the code names it: a moved project keeps its key
            except (OSError, ValueError):
                continue


# The files a rule's strings may name as its data, by suffix: what a rule reads, not what it writes (a log named in
# its code would change its key at every run).
DATA_SUFFIXES = frozenset({".json", ".jsonl", ".yaml", ".yml", ".toml", ".txt", ".csv", ".tsv", ".parquet",
                           ".pkl", ".pickle", ".npy", ".npz", ".pt", ".safetensors", ".jinja", ".md"})


def _data_sha(path: Path) -> str:
    """A named data file's SHA-256; one over _MAX_DATA by its size and time of change (read whole, it would slow every
    key of the rule that names it)."""
    stat = path.stat()
    if stat.st_size > _MAX_DATA:
        return f"size {stat.st_size}, changed {stat.st_mtime_ns} {stat.st_ctime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _parsed(path: Path, mtime_ns: int, ctime_ns: int, size: int, inode: int) -> tuple[str, tuple, tuple]:
    """The file's SHA-256, imports and the strings in it that could name a file ("prefs.json", "data/rules.yaml"),
    read once per state of the file (a write changes its ctime, which no copy that keeps times can set back)."""
    source = path.read_bytes()
    imports, named = [], set()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            imports += [("", alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imports += [(node.module or "", alias.name, node.level) for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and 0 < len(node.value) < 256 \
                and "\n" not in node.value and "." in node.value.rsplit("/", 1)[-1].strip("."):
            named.add(node.value)
    return hashlib.sha256(source).hexdigest(), tuple(imports), tuple(sorted(named))


def _read(path: Path, stat) -> tuple[str, tuple, tuple]:
    return _parsed(path, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)


def _resolve(path: Path, module: str, name: str, level: int) -> Path | None:
    """The file an import in `path` reads (`from MODULE import NAME`, `import NAME`; `level` dots), or None for an
    installed library's, a builtin's, or one not found."""
    parts = [p for p in (module.split(".") + name.split(".")) if p and p != "*"]
    if level:  # relative: from the package `level` folders up
        return _in_folder(path.parents[min(level, len(path.parents)) - 1], parts)
    if not parts:
        return None
    if parts[0] == "alignkit":
        return _in_folder(_ALIGNKIT.parent, parts)
    beside = _in_folder(path.parent, parts)  # a module beside the file (a script's folder is on sys.path)
    if beside is not None:
        return beside
    try:  # on sys.path, found without importing anything (importlib.util.find_spec imports the parents)
        top = importlib.machinery.PathFinder.find_spec(parts[0], sys.path)
    except Exception:  # noqa: BLE001 - a broken path entry: not followed
        return None
    if top is None:
        return None  # a builtin, or not importable from here
    if top.submodule_search_locations:  # a package: the rest of the name inside its folder
        folder = Path(next(iter(top.submodule_search_locations)))
        found = _in_folder(folder.parent, parts)
    else:
        found = Path(top.origin).resolve() if top.origin and Path(top.origin).is_file() else None
    return None if found is None or _installed(found) else found


def _in_folder(base: Path, parts: list[str]) -> Path | None:
    for n in range(len(parts), 0, -1):  # a.b.NAME: a/b/NAME.py, else a/b/NAME/__init__.py, else a/b.py, ...
        for candidate in (base.joinpath(*parts[:n - 1], parts[n - 1] + ".py"), base.joinpath(*parts[:n], "__init__.py")):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _installed(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in _INSTALLED) and not resolved.is_relative_to(_ALIGNKIT)
