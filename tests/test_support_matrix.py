"""The README's support matrix (launch modes x features) says how each cell is proven: every test it names exists
(with the parameter it names), and no cell is silent. A renamed or removed test, or a cell that says nothing,
fails here instead of leaving the README's claim unbacked."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

MODES = ["one GPU", "DDP", "FSDP (FSDP2)", "ZeRO-2", "ZeRO-3"]
# A cell is proven (it names a test or a test file), refused (it gives the line), or says what is not proven.
SAYS_HOW = re.compile(r"`(tests/)?test_\w+|refused|not proven|as any model|GPU")


def matrix() -> list[list[str]]:
    """The table's rows (feature first, then one cell per launch mode), header checked."""
    lines = (ROOT / "README.md").read_text().split("### The support matrix", 1)[1].splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("| feature")):]
    table = table[:next(i for i, line in enumerate(table) if not line.startswith("|"))]
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]
    assert split[0] == ["feature", *MODES], split[0]
    return split[2:]  # below the header and its --- line


def references(cell: str) -> list[str]:
    """The tests a cell names, as pytest ids: `test_x::test_y[p]`, `::test_z` (the same file), `test_x`,
    `tests/test_x.py`, and a bare `[p]` (the test named just before it)."""
    found, file, test = [], None, None
    for ref in re.findall(r"`([^`\s]+)`", cell):
        if m := re.fullmatch(r"(?:tests/)?(test_\w+)(?:\.py)?", ref):
            file, test = m.group(1), None
            found.append(f"tests/{file}.py")
        elif m := re.fullmatch(r"(test_\w+)?::(test_\w+)(\[[^\]]+\])?", ref):
            file = m.group(1) or file
            assert file, f"{ref} names no file and follows none in: {cell}"
            test = f"tests/{file}.py::{m.group(2)}"
            found.append(test + (m.group(3) or ""))
        elif re.fullmatch(r"\[[^\]]+\]", ref):
            assert test, f"{ref} follows no test in: {cell}"
            found.append(test + ref)
    return found


@pytest.fixture(scope="module")
def collected() -> set[str]:
    """Every test id in the files the matrix names, as pytest collects them."""
    files = sorted({ref.split("::")[0] for row in matrix() for cell in row[1:] for ref in references(cell)})
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider",
                           *files], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {line.strip() for line in done.stdout.splitlines() if "::" in line}


def test_every_cell_says_how_it_is_proven_or_that_it_is_refused():
    rows = matrix()
    assert len(rows) >= 15  # a parser that finds nothing fails
    for row in rows:
        assert len(row) == 1 + len(MODES), row
        for mode, cell in zip(MODES, row[1:]):
            assert SAYS_HOW.search(cell), f"{row[0]} under {mode} is silent: {cell!r}"
            assert "by hand" not in cell and "untested" not in cell, f"{row[0]} under {mode}: {cell!r}"


def test_every_test_the_matrix_names_exists(collected):
    named = [(row[0], ref) for row in matrix() for cell in row[1:] for ref in references(cell)]
    assert len(named) >= 50
    missing = []
    for feature, ref in named:
        if ref.endswith(".py"):
            exists = (ROOT / ref).is_file()
        elif ref.endswith("]"):
            exists = ref in collected
        else:
            exists = ref in collected or any(test.startswith(ref + "[") for test in collected)
        if not exists:
            missing.append(f"{feature}: {ref}")
    assert not missing, missing


def test_references_resolve_as_the_matrix_writes_them():
    cell = ("QLoRA: DDP 2-proc `test_launch_real::test_r[qlora]`; LoRA: `[lora-lm]`, `::test_s`; CPU "
            "`tests/test_kto.py`, `test_readme`")
    real = "tests/test_launch_real.py"
    assert references(cell) == [f"{real}::test_r[qlora]", f"{real}::test_r[lora-lm]", f"{real}::test_s",
                                "tests/test_kto.py", "tests/test_readme.py"]
