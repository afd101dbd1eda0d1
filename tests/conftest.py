"""Shared fixtures: an offline environment, the tiny preset built once, and whole script runs in-process.

Importing torch/transformers/TRL costs seconds per process, so scripts run in this process through
`run_script` (runpy with a patched argv), and the SFT and DPO runs that several tests read are made once
per session.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# pytest-xdist's workers (pyproject: one per core) share the cores out: torch's default, a thread per core in
# every worker, oversubscribes them, and its waiting threads then spin against each other (two workers building
# the tiny preset at once: 212 s each with 2 threads, 31 s with 1). Set before torch is imported; processes the
# tests start inherit it, and the scripts' `--num_threads auto` follows it (alignkit.core.threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)
    if "torch" in sys.modules:  # a plugin imported it already: the variable came too late for it
        sys.modules["torch"].set_num_threads(_share)

# No test may reach the Hub, wandb or a real API: fail fast instead of hanging on the closed network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _secret in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
    os.environ.pop(_secret, None)  # a developer's real credentials must not leak into test runs

# bitsandbytes imported on the real (CPU) torch, before any test fakes CUDA (test_gpu_paths.fake_gpus): its first
# import under a faked CUDA loads its CUDA backend, which fails half-way (torch._C has no _cuda_getCurrentRawStream)
# and left a broken module behind ("bitsandbytes has no attribute nn") for every later test of the process.
import alignkit  # noqa: F401, E402 - first: its log filters keep bitsandbytes' import warnings out, as in a script
try:
    import bitsandbytes  # noqa: F401, E402
except ImportError:
    pass


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """ALIGNKIT_CACHE for the session, with the tiny preset built in it."""
    cache = os.environ.get("ALIGNKIT_TEST_CACHE") or str(tmp_path_factory.mktemp("alignkit-cache"))
    os.environ["ALIGNKIT_CACHE"] = cache
    from alignkit.modeling import presets

    presets.build()
    return Path(cache)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test leaves os.environ as it found it: a script run in-process loads its `.env` into os.environ (so
    that secrets reach the libraries), and an ALIGNKIT_ or bare setting from one test's .env would otherwise
    change the runs of later tests in the same worker."""
    before = dict(os.environ)
    yield
    for name in [n for n in os.environ if n not in before]:
        del os.environ[name]
    os.environ.update({n: v for n, v in before.items() if os.environ.get(n) != v})


@pytest.fixture(autouse=True)
def _keep_accelerate_state():
    """Building a TRL config resets accelerate's process-wide state (transformers' TrainingArguments._setup_devices
    calls AcceleratorState._reset_state); a test that builds one without a trainer after it would leave the state
    empty, and a session-scoped trainer of another test in the same worker (sft_run) then fails in evaluate()."""
    import sys

    state = sys.modules.get("accelerate.state")
    saved = (dict(state.AcceleratorState._shared_state), dict(state.PartialState._shared_state)) if state else None
    yield
    if saved:
        for cls, before in zip((state.AcceleratorState, state.PartialState), saved):
            if before and not cls._shared_state:
                cls._shared_state.update(before)


@pytest.fixture
def hub_answers(monkeypatch):
    """A Hub to push to, for tests whose pushes go to a fake HfApi: these tests run offline (HF_HUB_OFFLINE=1),
    where a real push is refused before any work (alignkit.core.hub.require_token)."""
    from alignkit.core import sources

    monkeypatch.setattr(sources, "push_unreachable", lambda: None)


@pytest.fixture
def alignkit_log(caplog):
    """caplog for the toolkit's own log lines: its logger does not propagate to the root, so attach to it."""
    import logging

    logger = logging.getLogger("alignkit")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="alignkit")
    yield caplog
    logger.removeHandler(caplog.handler)


@contextlib.contextmanager
def static_flex_shapes():
    """FlexAttention on the CPU (forward only: torch has no backward there). transformers compiles flex_attention
    once per process; after a shape change torch recompiles it with dynamic shapes, and torch 2.13's CPU (C++)
    code for dynamic-shape FlexAttention does not compile (`cur_kvSplitSize8` undeclared). So each use starts
    from a clean compile cache, with static shapes only."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            yield
    finally:
        torch._dynamo.reset()


@pytest.fixture
def static_flex():
    with static_flex_shapes():
        yield


def run_script(name: str, *args: str, cwd: Path | None = None) -> dict:
    """Run a top-level cell script (sft.py, dpo.py, ...) in this process; returns its globals."""
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [name, *args]
    try:
        if cwd:
            os.chdir(cwd)
        return runpy.run_path(str(ROOT / name), run_name="__main__")
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)


def base_without_a_template(into: Path) -> Path:
    """The tiny preset's model copied into `into` as a base model: without a chat template (TRL's standard rows)."""
    import json
    import shutil

    from alignkit.modeling import presets

    shutil.copytree(presets.paths()["model"], into)
    config = json.loads((into / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (into / "tokenizer_config.json").write_text(json.dumps(config))
    for file in into.glob("chat_template*"):
        file.unlink()
    return into


def outlives_its_parent(parent, pid_file: Path) -> bool:
    """Once the child of `parent` (a Popen) has written its pid to `pid_file`: `parent` killed with SIGKILL (no
    `except` runs), then whether the child still ran 10 s later (it is killed then)."""
    import signal
    import time

    for _ in range(300):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":  # init's zombie until reaped: not running
                return False
        except (ProcessLookupError, OSError):
            return False
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


def in_two_ranks(target, folder: Path, *args, start: str = "fork") -> list[int]:
    """`target(rank, *args)` in two forked processes, ranks 0 and 1 of a gloo process group as under a launch on
    this CPU (the group's rendezvous file in `folder`); their exit codes. Forked, so `target` may be any function
    of the test module and see what the test patched; `start="spawn"` for a target that computes with torch (a
    forked child of a process whose OpenMP threads ran may wait forever on their lock)."""
    import multiprocessing

    ctx = multiprocessing.get_context(start)
    ranks = [ctx.Process(target=_as_rank, args=(target, rank, folder, args)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    return [process.exitcode for process in ranks]


def _as_rank(target, rank: int, folder: Path, args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- README runs that other test files read
# Some README commands train what a test file of their stage reads (the tiny reward model, the RLAIF rounds), so
# they run once, as written, in one project root for the whole session (tests/test_readme.py runs every other
# README command there too), and their files share a worker (pytest_xdist_make_scheduler below): a session fixture
# is made once per xdist worker, and two workers would each train it.
README_REWARD = ("python", "reward.py", "--preset", "tiny")
README_RLAIF = ("python", "rlaif.py", "--preset", "tiny", "--model_id", "runs/tiny-sft", "--rounds", "3")
README_SFT = ("python", "sft.py", "--preset", "tiny")  # what README_RLAIF starts from
# A README command run by a fixture (the test of that command asks for it): the fixture's name.
SHARED_README_RUNS = {README_REWARD: "reward_run", README_RLAIF: "rlaif_rounds"}
# Test files that read one of those runs, scheduled as one unit (the first named keeps its place in the queue).
SHARED_RUN_FILES = ("tests/test_readme.py", "tests/test_reward.py", "tests/test_rlaif.py")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: nothing without xdist (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (pyproject), but SHARED_RUN_FILES go to one worker together."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_RUN_FILES[0] if scope in SHARED_RUN_FILES else scope

    return SharedRunsTogether(config, log)


@pytest.fixture(scope="session")
def readme_project(tiny_cache, tmp_path_factory):
    """A project root as a user has it: the scripts and recipes, and the runs/ the README's commands write."""
    root = tmp_path_factory.mktemp("project")
    for path in [*ROOT.glob("*.py"), ROOT / "recipes"]:
        (root / path.name).symlink_to(path)
    return root


_README_RAN: dict[tuple, dict] = {}


def run_readme_command(project: Path, command) -> dict:
    """A README `python SCRIPT.py ...` command run as written in `project` (in this process), once per session
    (a later call returns the first one's): its globals, run_folder / folder made absolute."""
    command = tuple(command)
    if command not in _README_RAN:
        try:
            ran = run_script(command[1], *command[2:], cwd=project)
        except SystemExit as e:  # a script that ends with sys.exit(0) finished
            assert e.code in (0, None), f"{' '.join(command)} exited with {e.code}"
            ran = {}
        _README_RAN[command] = {**ran, **{k: project / ran[k] for k in ("run_folder", "folder")
                                                      if isinstance(ran.get(k), (str, Path))}}
    return _README_RAN[command]


@pytest.fixture(scope="session")
def reward_run(readme_project):
    """The README's `python reward.py --preset tiny`, once per session: the run's globals (run_folder, absolute;
    trainer, eval_data, ...) and its project root."""
    return {**run_readme_command(readme_project, README_REWARD), "project": readme_project}


@pytest.fixture(scope="session")
def rlaif_rounds(readme_project):
    """The README's RLAIF command, after the same command with `--rounds 1` (a process that ends between round 1
    and round 2): the first run's globals, round 1's files' mtimes then, and the README command's globals (it
    resumes at round 2 and runs rounds 2 and 3). On the README's runs/tiny-sft."""
    run_readme_command(readme_project, README_SFT)
    first = run_script(*README_RLAIF[1:-1], "1", cwd=readme_project)
    folder = readme_project / first["folder"]
    stamps = {p: p.stat().st_mtime_ns for p in (folder / "round-1").rglob("*") if p.is_file()}
    return {"project": readme_project, "folder": folder, "round_1_stamps": stamps,
            "round_2_after_first": (folder / "round-2").exists(),
            "second": run_readme_command(readme_project, README_RLAIF)}


@pytest.fixture(scope="session")
def sft_run(tiny_cache, tmp_path_factory):
    """`python sft.py --preset tiny`, once per session: the run's globals (run_folder, metrics, trainer, ...)."""
    out = tmp_path_factory.mktemp("runs")
    return run_script("sft.py", "--preset", "tiny", "--output_dir", str(out), "--run_name", "sft")


@pytest.fixture(scope="session")
def dpo_run(sft_run, tmp_path_factory):
    """`python dpo.py --preset tiny` on top of the session's SFT adapter."""
    out = tmp_path_factory.mktemp("runs")
    return run_script(
        "dpo.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--output_dir", str(out),
        "--run_name", "dpo",
    )
