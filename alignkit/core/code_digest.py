"""The identity of a user's Python code (a `python:` judge, grader, reward or verifier, the presets' rule judges), for
the keys of what it computed: edit the code, or anything it reads, and its earlier results are not reused.

`code_fingerprint(function)` digests:
- the whole source file of the function (so the constants and helpers it uses count, not only its own lines), and
  every file of code that file imports, anywhere in it, all the way down: modules beside it, in its package
  (relative imports), in a package found on sys.path (`from mypkg.prefs import PREFER`), and alignkit's own.
  Installed libraries (the standard library, site-packages) are not followed: their files change with their
  versions;
- what is behind a callable that is not a plain function: `functools.partial`'s function and its bound arguments,
  a decorated function's `__wrapped__`, a callable object's class and its attributes, a bound method's function and
  its object's attributes.
Code with no source to read (a builtin, a C extension's function, bound data that is not plain JSON) gets a
token of this process: its results are reused within this process only, never by another run.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import sysconfig
import uuid
from pathlib import Path

from alignkit.core.digests import digest

_THIS_PROCESS = uuid.uuid4().hex  # stands for code alignkit cannot read: no other process reuses what it computed
_ALIGNKIT = Path(__file__).resolve().parents[1]  # the alignkit package folder
_MAX_FILES = 2000  # a walk that finds more has gone somewhere it should not: say so in the key, reuse nothing


def _installed_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    return tuple({Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)})


_INSTALLED = _installed_roots()


class _Unreadable(Exception):
    """Part of the code or its bound data cannot be read as source or plain data."""


def code_fingerprint(function) -> str:
    """A 16-character digest of `function`'s code and everything it reads (see the module docstring)."""
    data: list = []
    try:
        codes = list(_code_objects(function, data))
        files, texts = {}, []
        for code in codes:
            source = _source_file(code)
            if source is not None:
                _walk(source, files)
            elif inspect.isbuiltin(code) or isinstance(code, type) and code.__module__ == "builtins":
                texts.append(f"builtin {getattr(code, '__module__', '')}.{getattr(code, '__qualname__', code)}")
            else:  # typed into a notebook or a console: its own text, where Python kept it
                try:
                    texts.append(inspect.getsource(code))
                except (OSError, TypeError):
                    raise _Unreadable from None
    except _Unreadable:
        return digest({"unreadable": _THIS_PROCESS, "object": id(function)}, 16)
    if len(files) > _MAX_FILES:
        return digest({"unreadable": _THIS_PROCESS, "object": id(function)}, 16)
    anchor = next(iter(files), None)  # files named from the function's own folder: a moved project keeps its keys
    named = {os.path.relpath(path, anchor.parent) if anchor else str(path): sha for path, sha in files.items()}
    return digest({"files": named, "texts": texts, "data": data}, 16)


def _code_objects(obj, data: list, depth: int = 0):
    """The functions and classes whose source makes up `obj`, and (into `data`) the plain data bound into it."""
    if depth > 20:
        raise _Unreadable
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if isinstance(obj, functools.partial):
        data.append(_plain([list(obj.args), obj.keywords]))
        yield from _code_objects(obj.func, data, depth + 1)
    elif inspect.ismethod(obj):
        data.append(_plain(getattr(obj.__self__, "__dict__", None)) if not isinstance(obj.__self__, type) else
                    obj.__self__.__qualname__)
        yield from _code_objects(obj.__func__, data, depth + 1)
    elif inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
        yield obj
    else:  # a callable object: its class's code, and what it holds
        data.append(_plain(getattr(obj, "__dict__", None)))
        yield type(obj)


def _plain(value):
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):
        raise _Unreadable from None


def _source_file(code) -> Path | None:
    try:
        path = inspect.getsourcefile(code)
    except TypeError:
        return None
    return Path(path).resolve() if path and Path(path).is_file() else None


def _walk(start: Path, files: dict) -> None:
    """Every file of code reachable by imports from `start` (itself included), with its SHA-256, into `files`."""
    queue = [start]
    while queue and len(files) <= _MAX_FILES:
        path = queue.pop()
        if path in files:
            continue
        sha, imports = _read(path, path.stat())
        files[path] = sha
        for node_module, name, level in imports:
            found = _resolve(path, node_module, name, level)
            if found is not None and found not in files:
                queue.append(found)


@functools.lru_cache(maxsize=4096)
def _parsed(path: Path, mtime_ns: int, size: int, inode: int) -> tuple[str, tuple]:
    source = path.read_bytes()
    imports = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            imports += [("", alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imports += [(node.module or "", alias.name, node.level) for alias in node.names]
    return hashlib.sha256(source).hexdigest(), tuple(imports)


def _read(path: Path, stat) -> tuple[str, tuple]:
    return _parsed(path, stat.st_mtime_ns, stat.st_size, stat.st_ino)


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
    try:
        top = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError, AttributeError):
        return None
    if top is None or not top.origin or not Path(top.origin).is_file() or _installed(Path(top.origin)):
        return None  # a builtin, a namespace package, or an installed library
    for n in range(len(parts), 0, -1):  # a.b.NAME: the module a.b.NAME, else a.b (NAME is a name in it), ...
        try:
            spec = importlib.util.find_spec(".".join(parts[:n]))
        except (ImportError, ValueError, AttributeError):
            continue
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            return Path(spec.origin).resolve()
    return None


def _in_folder(base: Path, parts: list[str]) -> Path | None:
    for n in range(len(parts), 0, -1):  # a.b.NAME: a/b/NAME.py, else a/b/NAME/__init__.py, else a/b.py, ...
        for candidate in (base.joinpath(*parts[:n - 1], parts[n - 1] + ".py"), base.joinpath(*parts[:n], "__init__.py")):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _installed(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in _INSTALLED) and not resolved.is_relative_to(_ALIGNKIT)
