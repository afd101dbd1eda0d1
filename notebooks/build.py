"""Regenerate notebooks/*.ipynb from the top-level cell scripts, or check that they are up to date.

    python notebooks/build.py            # rewrite every notebook from its script
    python notebooks/build.py --check    # exit 1 naming each notebook that is stale, missing or orphaned

The scripts (`# %%` percent format) are the source; the notebooks are build output, never edited by hand.
The output is deterministic (fixed cell ids, no outputs, no tool versions or timestamps in the metadata), so a
rebuild of unchanged scripts is byte-identical and `--check` is a plain byte comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "notebooks"
SCRIPTS = ("sft", "label", "dpo", "kto", "evaluate", "merge", "reward", "rl", "rlaif")  # pipeline order
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def render(script: Path) -> str:
    """The notebook for one script, as the exact text written to disk."""
    nb = jupytext.read(script, fmt="py:percent")
    note = nbformat.v4.new_markdown_cell(
        f"*Generated from [`{script.name}`](../{script.name}) by `python notebooks/build.py`: edit the script, "
        "then rebuild; changes made here are lost.*"
    )
    nb.cells.insert(0, note)
    for i, cell in enumerate(nb.cells):
        # jupytext and nbformat give new cells random ids; fixed ones keep rebuilds byte-identical.
        cell.id = f"{script.stem}-{i:02d}"
        cell.metadata = {}  # jupytext's round-trip hints (lines_to_next_cell, ...) mean nothing in a notebook
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # Only what a notebook needs: no jupytext block, whose version would churn with every jupytext release.
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    nb.nbformat, nb.nbformat_minor = 4, 5
    nbformat.validate(nb)
    return nbformat.writes(nb, version=4) + "\n"


def build(out_dir: Path = HERE) -> dict[Path, str]:
    """{notebook path: text} for every script, under out_dir."""
    return {out_dir / f"{name}.ipynb": render(ROOT / f"{name}.py") for name in SCRIPTS}


def stale(out_dir: Path = HERE) -> list[str]:
    """Problems with the notebooks in out_dir, one line each; empty when they match the scripts."""
    expected = build(out_dir)
    problems = []
    for path, text in expected.items():
        if not path.is_file():
            problems.append(f"{path.name}: missing")
        elif path.read_bytes() != text.encode("utf-8"):
            problems.append(f"{path.name}: stale (its script {path.stem}.py changed since the last build)")
    for path in sorted(out_dir.glob("*.ipynb")):
        if path not in expected:
            problems.append(f"{path.name}: not generated from any script (remove it, or add its script to SCRIPTS)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook is out of date")
    parser.add_argument("--out_dir", type=Path, default=HERE, help="where the notebooks go (default: notebooks/)")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.out_dir)
        for line in problems:
            print(f"{args.out_dir / line}", file=sys.stderr)
        if problems:
            print("rebuild them: python notebooks/build.py", file=sys.stderr)
            return 1
        print(f"{len(SCRIPTS)} notebooks up to date")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in build(args.out_dir).items():
        # newline="": the text's "\n" is written as is on every OS, so Windows rebuilds match too.
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
