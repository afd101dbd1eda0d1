"""Every README command that runs offline (the ones on the `tiny` preset) runs as written: from a project root,
with its relative paths (runs/tiny-sft, runs/label-tiny/...), in an order where each finds what an earlier one
made. The commands are read from README.md itself, so a command changed there is the command tested here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script

# The order a reader would follow: what a command reads, an earlier stage wrote.
STAGES = ["sft.py", "reward.py", "label.py", "dpo.py", "kto.py", "rl.py", "rlaif.py", "evaluate.py", "merge.py"]


def readme_commands() -> list[list[str]]:
    """Each `python SCRIPT.py ... --preset tiny ...` of the README's code blocks (a `&&` chain counts as its
    parts; `accelerate launch` lines as they are), in stage order, README order within a stage, each once."""
    blocks, current, language = [], None, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh", "shell"):
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", " " + line, maxsplit=1)[0].strip()  # a trailing comment
            for part in line.split("&&"):
                if "--preset tiny" not in part:
                    continue
                words = shlex.split(part)
                if "--preset" not in words or words[words.index("--preset") + 1:][:1] != ["tiny"]:
                    continue
                if words[:1] == ["python"] or words[:2] == ["accelerate", "launch"]:
                    if words not in found:
                        found.append(words)
    script = lambda words: next(w for w in words if w.endswith(".py"))  # noqa: E731
    return sorted(found, key=lambda words: (words[0] == "accelerate", STAGES.index(script(words))))


COMMANDS = readme_commands()


def test_the_readme_has_its_offline_commands():
    """The first command's runs and a command of every stage are among them (a parser that finds nothing fails)."""
    assert ["python", "sft.py", "--preset", "tiny"] in COMMANDS
    assert ["python", "dpo.py", "--preset", "tiny", "--model_id", "runs/tiny-sft"] in COMMANDS
    assert {next(w for w in c if w.endswith(".py")) for c in COMMANDS} >= set(STAGES) - {"rlaif.py"}


@pytest.fixture(scope="module")
def project(tiny_cache, tmp_path_factory):
    """A project root as a user has it: the scripts and recipes, and the runs/ the commands write."""
    root = tmp_path_factory.mktemp("project")
    for path in [*ROOT.glob("*.py"), ROOT / "recipes"]:
        (root / path.name).symlink_to(path)
    return root


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[1:]) for c in COMMANDS])
def test_readme_command_runs_as_written(command, project):
    if command[0] == "accelerate":
        env = {**os.environ, "CI": "true"}
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *command[2:]], cwd=project,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    try:
        run_script(command[1], *command[2:], cwd=project)
    except SystemExit as e:  # a script that ends with sys.exit(0) finished
        assert e.code in (0, None), f"{' '.join(command)} exited with {e.code}"
    assert Path(project).is_dir()
