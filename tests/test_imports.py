"""No import cycles among alignkit's modules (the house rule), found by parsing their imports.

Every `import` and `from ... import` counts, at module level or inside a function (a function-level import is a
dependency all the same: it only moves the cycle to run time), and so does the package whose `__init__` Python
runs first. A cycle is a strongly connected component of more than one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: the modules of `package` it imports}, from the .py files under root/package."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:  # `a.b.c` where `c` is a name inside module `a.b`: a.b
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                found = known(target) if target.split(".")[0] == package else None
                while found:  # the module and every package above it, whose __init__ runs first
                    if found != name:
                        graph[name].add(found)
                    found = found.rpartition(".")[0] or None
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_the_finder_sees_function_level_and_package_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.sub import a  # only when called\n")
    (pkg / "c.py").write_text("import os\nfrom pkg.sub.b import f\n")
    (pkg / "d.py").write_text("from . import c\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.sub.a", "pkg.sub.b"]]
    (pkg / "__init__.py").write_text("def setup():\n    from pkg.d import c\n")  # the package init, run first
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg", "pkg.c", "pkg.d", "pkg.sub.a", "pkg.sub.b"]]


def test_alignkit_has_no_import_cycles():
    graph = import_graph(ROOT, "alignkit")
    # The parser reads the real tree: the loader's module-level and function-level imports are there.
    assert "alignkit.modeling.lota_delta" in graph["alignkit.modeling.models"]
    assert "alignkit.modeling.gguf" in graph["alignkit.modeling.models"]  # imported inside load_model
    found = cycles(graph)
    assert found == [], "import cycles (move the responsibility that sits in the wrong module): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_readme_s_package_map_names_every_module():
    """The README's map of the package ("one module per concern") named 21 of its modules nowhere (found by the
    README walk of session 30): a reader looking for where the cache keys or the secrets live could not find them.
    Each module is named, in backticks, in its folder's row."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("The package `alignkit/` holds"):text.index("## Settings, data and runs")]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `alignkit/")}
    missing = [f"{path.parent.name}/{path.stem}" for path in sorted((ROOT / "alignkit").glob("*/*.py"))
               if path.stem != "__init__" and f"`{path.stem}`" not in rows.get(f"alignkit/{path.parent.name}/", "")]
    assert not missing, f"modules the README's package map does not name in their folder's row: {missing}"
