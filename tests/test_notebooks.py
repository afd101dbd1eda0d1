"""notebooks/: generated from the cell scripts, never stale, and each one runs top to bottom in a real kernel.

The notebooks run in pipeline order (sft -> label -> dpo -> evaluate -> merge; rl, rlaif, reward) in one shared working folder,
each in its own ipykernel started from this very Python (so the kernel sees the same venv as pytest), on the
tiny preset. Settings reach the kernels the way a notebook user sets them without argv: environment variables.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# Not importorskip: without the dev extra (jupytext, nbclient, ipykernel) these tests must fail, not vanish.
import nbformat
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

sys.path.insert(0, str(ROOT / "notebooks"))
import build  # noqa: E402  (notebooks/build.py)

CELL_TIMEOUT = 600  # seconds per cell; a whole SFT or DPO run is one cell


# ---------------------------------------------------------------------------------------------------------
# Generated, and up to date


def test_committed_notebooks_match_a_fresh_build(tmp_path):
    # A script edited without `python notebooks/build.py` afterwards fails here, naming the notebook.
    assert build.main(["--out_dir", str(tmp_path)]) == 0
    for name in build.SCRIPTS:
        fresh, committed = tmp_path / f"{name}.ipynb", ROOT / "notebooks" / f"{name}.ipynb"
        assert committed.is_file(), f"notebooks/{name}.ipynb is missing: run python notebooks/build.py"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"notebooks/{name}.ipynb is stale: run python notebooks/build.py")
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(p.name for p in tmp_path.iterdir())


def test_build_is_deterministic_and_check_names_stale_notebooks(tmp_path):
    out = tmp_path / "nb"
    assert build.main(["--out_dir", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert build.main(["--out_dir", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # byte-identical rebuild
    # The command line a developer and CI run: exit 0 when current, non-zero naming each stale notebook.
    check = [sys.executable, str(ROOT / "notebooks" / "build.py"), "--check", "--out_dir", str(out)]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    dpo = out / "dpo.ipynb"
    nb = nbformat.reads(dpo.read_text(), as_version=4)
    nb.cells[3].source += "\nprint('edited by hand')"
    dpo.write_text(nbformat.writes(nb) + "\n")
    (out / "merge.ipynb").unlink()
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 1
    assert "dpo.ipynb: stale" in result.stderr and "merge.ipynb: missing" in result.stderr
    assert "sft.ipynb" not in result.stderr and "python notebooks/build.py" in result.stderr


def test_notebooks_are_clean_python3_notebooks_with_settings_first():
    for name in build.SCRIPTS:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: outputs committed"
        # The first code cell is where a notebook user changes settings without argv: an overrides dict.
        assert re.search(r"^overrides: dict = \{\}", code[0].source, re.M), f"{name}.ipynb: no overrides dict"


def test_the_cells_a_refusal_names_are_the_notebook_s_own_headings():
    """A training notebook's refusals name its cells by its settings class's notebook_cells (alignkit.train.
    cell_checks): rl.ipynb's are Prompts, Run folder, Rewards, Model, where its refusals named a 'Data' cell it does
    not have and left its Rewards cell out. The titles are the notebook's own `## ` headings, in order, and the cells
    a script's start_run names as built (rl.py's rewards) are among them."""
    from alignkit.core import config

    trained = [name for name in build.SCRIPTS if "prepare_run(settings" in (ROOT / f"{name}.py").read_text()]
    assert {"sft", "dpo", "kto", "reward", "rl"} <= set(trained), trained
    for name in trained:
        script = (ROOT / f"{name}.py").read_text()
        cls = getattr(config, re.search(r"parse_config\(\s*(\w+)", script).group(1))
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        headings = [line[3:].strip() for c in nb.cells if c.cell_type == "markdown"
                    for line in c.source.splitlines() if line.startswith("## ")]
        assert list(dict.fromkeys(cls.notebook_cells.values())) == headings, f"{name}.py: {cls.__name__}"
        assert {"data", "run folder", "model", "train"} <= set(cls.notebook_cells), name
        for role in re.findall(r"built=\[[^\]]*?\(\w+, \"([^\"]+)\"\)", script):
            assert role in cls.notebook_cells and role in cls.not_read_by, f"{name}.py names a cell {role!r}"
    assert config.RLSettings.notebook_cells["data"] == "Prompts" and "rewards" in config.RLSettings.notebook_cells


def test_rl_s_settings_cell_example_starts_from_the_sft_run_the_readme_names():
    """rl.ipynb's example overrides left model_id out, so a notebook user following it trained on the bare base
    where notebooks/README.md starts rl from runs/tiny-sft; the README's command lines say the same."""
    example = re.search(r"^#.*?overrides = (\{[^}]*\})", (ROOT / "rl.py").read_text(), re.M)
    assert example, "rl.py: no example overrides"
    named = json.loads(example.group(1))
    readme = (ROOT / "notebooks" / "README.md").read_text()
    said = re.search(r"rl and rlaif also start from `([^`]+)`\s*\(`overrides = (\{[^`]*\})`\)", readme)
    assert said and named.get("model_id") == said.group(1) == json.loads(said.group(2))["model_id"], named
    assert named["preset"] == "tiny"
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("python rl.py --preset tiny")]
    assert lines and all(f"--model_id {named['model_id']}" in line for line in lines), lines


# ---------------------------------------------------------------------------------------------------------
# Executed in a real kernel


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernelspec dir whose only `python3` kernel is this interpreter.

    Without it jupyter_client would pick the first python3 spec on JUPYTER_PATH, which on a developer machine
    may be ~/.local/share/jupyter's, i.e. another Python without this venv's packages.
    """
    kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
    (kernels / "python3").mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (this venv)", "language": "python"}
    (kernels / "python3" / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


def kernel_env(cache: Path, **settings: str) -> dict:
    env = dict(os.environ)  # conftest's offline switches (HF_HUB_OFFLINE, WANDB_MODE...) included
    # The kernel must import this checkout's alignkit even when it is not pip-installed (a plain venv).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(ALIGNKIT_CACHE=str(cache), **settings)
    env.pop("CI", None)  # a user's notebook, not a CI log: progress bars show (alignkit.core.progress)
    return env


def streamed(cell) -> str:
    """A cell's printed text, stdout and stderr in order. The kernel flushes its streams on a timer, so one print
    can come back as several outputs ("...\n" split from its newline): tests read the text, not the pieces."""
    return "".join(o.text for o in cell.outputs if o.output_type == "stream")


def text_of(nb) -> str:
    """All stream and result text of an executed notebook."""
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                # A progress bar (stderr) ends on "\r", not a newline: keep the next print on a line of its own.
                text.append(out.text if out.text.endswith("\n") or out.name != "stderr" else out.text + "\n")
            elif out.output_type in ("execute_result", "display_data"):
                text.append(out.data.get("text/plain", ""))
    return "".join(text)


def execute(name: str, cwd: Path, env: dict, specs: KernelSpecManager):
    """Run notebooks/<name>.ipynb top to bottom in a fresh kernel; returns the notebook with its outputs."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(cwd)}})
    # cleanup_kc: shut the kernel down even though we made its manager (nbclient would leave it running, with
    # a model in memory, until pytest exits). A failing cell raises CellExecutionError with the traceback.
    client.execute(env=env, cleanup_kc=True)
    return nb


def test_kernel_runs_this_python_and_a_later_cell_run_first_fails_in_one_line(kernel_specs, tmp_path):
    """A cell of a script's notebook run before its first cell (after a kernel restart, or picked from the middle)
    showed Python's traceback for a name the first cell sets: one line from the first import of alignkit on."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import sys; from alignkit.core.args import is_notebook; print(sys.executable, is_notebook())"),
        nbformat.v4.new_code_cell("settings.model_id"),
        nbformat.v4.new_code_cell("from alignkit.core.errors import UserError\nraise UserError('no such file')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    NotebookClient(nb, km=km, timeout=120, startup_timeout=120, allow_errors=True).execute(
        env=kernel_env(tmp_path), cwd=str(tmp_path), cleanup_kc=True)
    assert streamed(nb.cells[0]).split() == [sys.executable, "True"]
    for cell, said in zip(nb.cells[1:], ("error: name 'settings' is not defined: the cell above that sets it has "
                                         "not run", "error: no such file")):
        assert [o.output_type for o in cell.outputs] == ["stream"] and streamed(cell).startswith(said), cell.outputs


def test_overrides_in_the_first_cell_set_the_settings(kernel_specs, tiny_cache, tmp_path):
    # What the first cell tells a notebook user to do: edit the overrides dict and run the cell. Each
    # notebook's own first code cell, so edited, runs in one kernel; nothing else sets the preset.
    edits = {"sft": {"max_steps": 7}, "label": {"max_prompts": 3}, "dpo": {"dpo_beta": 0.25},
             "evaluate": {"max_new_tokens": 5}, "merge": {"dtype": "fp32"}}
    cells = []
    for name, edit in edits.items():
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.source.count("overrides: dict = {}") == 1, f"{name}.ipynb: no overrides dict in the first cell"
        cells.append(nbformat.v4.new_code_cell(
            first.source.replace("overrides: dict = {}", f"overrides: dict = {{'preset': 'tiny', **{edit!r}}}")))
        field, = edit
        cells.append(nbformat.v4.new_code_cell(f"print({name!r}, settings.preset, repr(settings.{field}))"))
    # A misspelt setting: one line under the cell, as on a command line, not an 80-line traceback; the cell counts
    # as failed, and the kernel lives on.
    sft = next(c for c in nbformat.read(ROOT / "notebooks" / "sft.ipynb", as_version=4).cells if c.cell_type == "code")
    cells.append(nbformat.v4.new_code_cell(sft.source.replace("overrides: dict = {}",
                                                              "overrides: dict = {'preset': 'tiny', 'lora_rr': 4}")))
    cells.append(nbformat.v4.new_code_cell("raise KeyboardInterrupt  # the stop button"))
    # A cell run after a failed one, using what the failed cell would have set: one line saying so, not a traceback
    # pointing at this cell. A NameError inside a function is a bug: its traceback stays.
    cells.append(nbformat.v4.new_code_cell("trainer.train()"))
    # The kernel has load_model (imported by the cell that sets `loaded`): not a typo of it, as Python judges.
    cells.append(nbformat.v4.new_code_cell("from alignkit.modeling.models import load_model\nloaded.tokenizer"))
    cells.append(nbformat.v4.new_code_cell("def f():\n    return missing_name\nf()"))
    # A typo of a name the kernel has: Python's hint (not `setings`: the failed settings cell took `settings` out).
    cells.append(nbformat.v4.new_code_cell("print(overides)"))
    cells.append(nbformat.v4.new_code_cell("print('alive')"))
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": build.KERNELSPEC})
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    env = kernel_env(tiny_cache)
    env.pop("PRESET", None)
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, startup_timeout=120, allow_errors=True).execute(
        env=env, cwd=str(tmp_path), cleanup_kc=True)
    printed = [streamed(c).strip() for c in nb.cells[1:-7:2]]
    assert printed == [f"{name} tiny {next(iter(edit.values()))!r}" for name, edit in edits.items()]
    bad, stopped, unset, unloaded, bug, typo, alive = nb.cells[-7:]
    assert {o.output_type for o in unloaded.outputs} == {"stream"} and streamed(unloaded).startswith(
        "error: name 'loaded' is not defined: the cell above that sets it has not run") and \
        "\n" not in streamed(unloaded).strip(), unloaded.outputs
    assert [o.ename for o in typo.outputs if o.output_type == "error"] == ["NameError"]
    assert {o.output_type for o in unset.outputs} == {"stream"} and streamed(unset).strip() == (
        "error: name 'trainer' is not defined: the cell above that sets it has not run, or stopped with an error; "
        "fix that and run the cells from there down (Run All Above, then this one)")
    assert [o.ename for o in bug.outputs if o.output_type == "error"] == ["NameError"]
    from alignkit.core.errors import INTERRUPTED_IN_CELL  # one line, not a traceback into TRL

    assert "".join(o.text for o in stopped.outputs).strip() == INTERRUPTED_IN_CELL, stopped.outputs
    said = "".join(o.text for o in bad.outputs if o.get("name") == "stderr").splitlines()
    assert [o.output_type for o in bad.outputs if o.output_type == "error"] == []  # no traceback
    assert [line for line in said if line.startswith("error:")] == [
        "error: unknown setting: 'lora_rr' (in overrides; did you mean lora_r?). --help lists every setting, TRL's "
        "names included"], said
    assert streamed(alive).strip() == "alive"


class Pipeline:
    """The notebooks run once each, in one working folder; a notebook first runs the ones it needs."""

    NEEDS = {"sft": [], "label": [], "dpo": ["sft"], "kto": ["sft"], "evaluate": ["sft", "dpo"], "merge": ["dpo"], "rl": ["sft"],
             "rlaif": ["sft"], "reward": []}
    # Environment variables, the notebook way to set things from outside (argv is the kernel's, not ours).
    SETTINGS = {
        "sft": {"PRESET": "tiny"},
        "label": {"PRESET": "tiny"},
        # DPO on top of the SFT adapter, as in real use; evaluate.py then compares the two runs.
        "dpo": {"PRESET": "tiny", "MODEL_ID": "runs/tiny-sft"},
        "kto": {"PRESET": "tiny", "MODEL_ID": "runs/tiny-sft"},  # KTO on the pairs split in two, over the SFT adapter
        # A kernel has no argv for the command, so evaluate.py reads it from COMMAND; the tiny preset's models
        # are the two run folders the notebooks above wrote.
        "evaluate": {"PRESET": "tiny", "COMMAND": "pairwise"},
        "merge": {"PRESET": "tiny"},
        # Online RL and one RLAIF round on a few prompts, both from the SFT notebook's adapter.
        "rl": {"PRESET": "tiny", "MODEL_ID": "runs/tiny-sft"},
        "rlaif": {"PRESET": "tiny", "MODEL_ID": "runs/tiny-sft", "ROUNDS": "1", "MAX_PROMPTS": "8", "NUM_SAMPLES": "4"},
        # 3 of the preset's 30 epochs: the notebook's run, report and picture are tested here, not the model's
        # quality (3 epochs do not learn the rule yet; the whole recipe's held-out accuracy: tests/test_reward.py).
        "reward": {"PRESET": "tiny", "ALIGNKIT_NUM_TRAIN_EPOCHS": "3"},
    }

    def __init__(self, cwd: Path, cache: Path, specs: KernelSpecManager):
        self.cwd, self.cache, self.specs, self.outputs, self.failed = cwd, cache, specs, {}, set()
        self.notebooks = {}  # name -> the executed notebook, outputs and all

    def run(self, name: str) -> str:
        if name in self.failed:  # its own test shows the traceback; do not spend minutes failing again
            raise RuntimeError(f"notebooks/{name}.ipynb failed earlier in this session (see its test)")
        if name not in self.outputs:
            for need in self.NEEDS[name]:
                self.run(need)
            try:
                self.notebooks[name] = execute(name, self.cwd, kernel_env(self.cache, **self.SETTINGS[name]),
                                               self.specs)
                self.outputs[name] = text_of(self.notebooks[name])
            except Exception:
                self.failed.add(name)
                raise
        return self.outputs[name]


@pytest.fixture(scope="module")
def pipeline(tiny_cache, kernel_specs, tmp_path_factory):
    return Pipeline(tmp_path_factory.mktemp("notebook-pipeline"), tiny_cache, kernel_specs)


def test_sft_notebook(pipeline):
    out = pipeline.run("sft")
    assert re.search(r"^adapter: runs/tiny-sft$", out, re.M), out[-2000:]
    assert (pipeline.cwd / "runs/tiny-sft/adapter_model.safetensors").is_file()


def displayed(nb, mime: str) -> list:
    """Every displayed output of `mime` type, in cell order (with its cell's index)."""
    return [(i, out.data[mime]) for i, cell in enumerate(nb.cells) for out in cell.get("outputs", [])
            if out.output_type in ("display_data", "execute_result") and mime in out.data]


def shows(pipeline, name: str, *files: str) -> None:
    """The notebook's last code cell displays exactly these pictures, the very files the run wrote."""
    nb = pipeline.notebooks[name]
    last_code = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    pictures = [base64.b64decode(png) for i, png in displayed(nb, "image/png") if i == last_code]
    assert pictures == [(pipeline.cwd / f).read_bytes() for f in files], f"{name}.ipynb: {len(pictures)} pictures"


def test_training_in_a_notebook_shows_a_live_bar_and_its_picture(pipeline):
    # ipykernel's stderr is no TTY: the bar must not depend on one. transformers draws its notebook bar (an HTML
    # <progress> element with the steps and the time left) when the Trainer's disable_tqdm is off.
    pipeline.run("sft")
    nb = pipeline.notebooks["sft"]
    train_cell = next(i for i, c in enumerate(nb.cells) if "trainer.train(" in c.source)
    bars = [html for i, html in displayed(nb, "text/html") if i == train_cell and "<progress" in html]
    assert bars, "no training progress bar in the training cell's outputs"
    steps = json.loads((pipeline.cwd / "runs/tiny-sft/metrics.json").read_text())["global_step"]
    assert f"[{steps}/{steps} " in bars[-1]  # it ran to the last step
    # The last cell shows training.png, the very file the run wrote; the summary block names it.
    last_code = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    pictures = [png for i, png in displayed(nb, "image/png") if i == last_code]
    png = (pipeline.cwd / "runs/tiny-sft/training.png").read_bytes()
    assert len(pictures) == 1 and base64.b64decode(pictures[0]) == png
    assert re.search(r"^  picture +runs/tiny-sft/training\.png$", pipeline.outputs["sft"], re.M)
    # Without ipywidgets (as here), no tqdm "IProgress not found" warning under the first cell: text bars work.
    assert "IProgress not found" not in pipeline.outputs["sft"]


def test_label_notebook(pipeline):
    out = pipeline.run("label")
    assert "wrote runs/label-tiny/preferences.jsonl" in out, out[-2000:]
    rows = [json.loads(line) for line in (pipeline.cwd / "runs/label-tiny/preferences.jsonl").read_text().splitlines()]
    assert len(rows) >= 20
    assert all(set(row) >= {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"] for row in rows)


def test_dpo_notebook_beats_chance(pipeline):
    out = pipeline.run("dpo")
    assert re.search(r"^adapter: runs/tiny-dpo$", out, re.M), out[-2000:]
    (accuracy,) = re.findall(r"held-out reward accuracy: ([0-9.]+)", out)
    assert float(accuracy) > 0.6  # chance is 0.5
    # It trained on top of the SFT notebook's adapter, not on the bare base model.
    config = json.loads((pipeline.cwd / "runs/tiny-dpo/adapter_config.json").read_text())
    # (recorded relative to the DPO adapter, so runs/ can be moved as a whole)
    base = pipeline.cwd / "runs/tiny-dpo" / config["base_model_name_or_path"]
    assert base.resolve() == (pipeline.cwd / "runs/tiny-sft").resolve()


def test_kto_notebook_raises_rule_following(pipeline):
    out = pipeline.run("kto")
    assert re.search(r"^adapter: runs/tiny-kto$", out, re.M), out[-2000:]
    after, before = map(float, re.search(r"^rule-following after KTO: ([0-9.]+) \(before: ([0-9.]+)\)$", out, re.M).groups())
    assert after > before, out[-2000:]
    shows(pipeline, "kto", "runs/tiny-kto/training.png")


def test_evaluate_notebook_prints_the_pairwise_table(pipeline):
    out = pipeline.run("evaluate")
    assert "dpo vs sft  (judge: rule; 29 matches, 0 judge errors)" in out, out[-3000:]
    assert re.search(r"^overall +29 ", out, re.M) and "adj. win rate" in out
    assert (pipeline.cwd / "outputs/pairwise-tiny/results.json").is_file()
    nb = pipeline.notebooks["evaluate"]  # the results cell shows the win-rate chart it wrote
    results = next(i for i, c in enumerate(nb.cells) if "run.report()" in c.source)
    assert [base64.b64decode(png) for i, png in displayed(nb, "image/png") if i == results] == [
        (pipeline.cwd / "outputs/pairwise-tiny/results.png").read_bytes()]


def test_merge_notebook(pipeline):
    out = pipeline.run("merge")
    assert re.search(r"^merged model: runs/tiny-dpo/merged$", out, re.M), out[-2000:]
    assert (pipeline.cwd / "runs/tiny-dpo/merged/model.safetensors").is_file()


def test_rl_notebook(pipeline):
    out = pipeline.run("rl")
    assert re.search(r"^adapter: runs/tiny-rl$", out, re.M), out[-2000:]
    first, last = map(float, re.search(r"^reward: ([0-9.]+) at the first log, ([0-9.]+) at the last$", out, re.M).groups())
    assert last > first  # GRPO on the rule raises the reward of the policy's own samples
    config = json.loads((pipeline.cwd / "runs/tiny-rl/adapter_config.json").read_text())
    base = pipeline.cwd / "runs/tiny-rl" / config["base_model_name_or_path"]  # recorded relative to the adapter
    assert base.resolve() == (pipeline.cwd / "runs/tiny-sft").resolve()


def test_rlaif_notebook(pipeline):
    out = pipeline.run("rlaif")
    assert "| 1 |" in out and "final adapter: runs/tiny-rlaif/round-1/dpo" in out, out[-2000:]
    shows(pipeline, "rlaif", "runs/tiny-rlaif/win_rate.png")
    assert "Launch(" not in out  # the first cell's launch is no stray cell output


def test_reward_notebook_reports_held_out_pairs_and_draws_them(pipeline):
    out = pipeline.run("reward")
    (accuracy,) = re.findall(r"held-out accuracy: ([0-9.]+)", out)
    assert 0 <= float(accuracy) <= 1, out[-2000:]
    shows(pipeline, "reward", "runs/tiny-reward/training.png", "runs/tiny-reward/rewards_histogram.png")


def test_a_training_cell_run_again_is_refused_and_the_cells_from_run_folder_resume(kernel_specs, tiny_cache, tmp_path):
    """What a notebook user does: run the training cell a second time. It trained the model in memory again as a
    fresh run (the finished run moved aside, 4 more steps on the trained adapter, metrics saying 4). Now it is one
    error line naming the cells to run; running them resumes at the last step and trains nothing more."""
    nb = nbformat.read(ROOT / "notebooks" / "sft.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    run_folder_cell = next(c for c in code if "prepare_run(" in c.source)
    train_cell = next(c for c in code if "start_run(" in c.source)
    save_cell = next(c for c in code if "finish(" in c.source)
    first = code[0]
    assert first.source.count("overrides: dict = {}") == 1
    cells = [*nb.cells, nbformat.v4.new_code_cell(train_cell.source),  # the training cell again
             # Saving then saves the run the cell trained (TRL's config, built by the refused cell, reset accelerate's
             # state under the trained model: an AttributeError traceback from accelerate).
             nbformat.v4.new_code_cell(save_cell.source),
             # The settings cell run with other settings, then the saving cell alone: refused (it recorded the new
             # model_id as the adapter's base, and the new settings for a model trained with others).
             nbformat.v4.new_code_cell(first.source.replace("overrides: dict = {}", "overrides: dict = {'lora_r': 4}")),
             nbformat.v4.new_code_cell(save_cell.source), nbformat.v4.new_code_cell(first.source),
             nbformat.v4.new_code_cell("print('alive')"),
             nbformat.v4.new_code_cell(run_folder_cell.source + "\nprint('resume_from', resume_from)"),
             nbformat.v4.new_code_cell(train_cell.source), nbformat.v4.new_code_cell(save_cell.source),
             # The settings cell with a typo, then on down (Shift+Enter): the Data cell ran on the earlier settings,
             # and the Run folder cell after it resumed and saved the earlier run again.
             nbformat.v4.new_code_cell(first.source.replace("overrides: dict = {}",
                                                            "overrides: dict = {'max_steps': '5x'}")),
             nbformat.v4.new_code_cell(next(c for c in code if "load_train_eval(" in c.source).source),
             # Settings that parse but are refused further down the cell (a launch config's bf16 for an fp32 run):
             # they stayed in the kernel, and the Data cell ran on them.
             nbformat.v4.new_code_cell("import os\nos.environ['ACCELERATE_MIXED_PRECISION'] = 'bf16'\n"
                                       + first.source),
             nbformat.v4.new_code_cell("os.environ.pop('ACCELERATE_MIXED_PRECISION')\n"
                                       + next(c for c in code if "load_train_eval(" in c.source).source)]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": build.KERNELSPEC})
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    env = kernel_env(tiny_cache, PRESET="tiny", ALIGNKIT_MAX_STEPS="4", ALIGNKIT_SAVE_STEPS="2")
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, startup_timeout=120, allow_errors=True).execute(
        env=env, cwd=str(tmp_path), cleanup_kc=True)
    again, saved, _, refused, _, alive, run_folder_again, train_again, save_again, typo, data, launch, data_again = \
        nb.cells[-13:]
    stopped = ("error: settings: the settings cell stopped with an error (see its line), so its earlier settings are "
               "gone from the kernel: fix it and run it, then the cells from there down")
    said = [line for cell in (typo, data) for line in streamed(cell).splitlines() if line.startswith("error:")]
    assert said == ["error: invalid value for overrides key 'max_steps': '5x' is not an int", stopped], said
    said = [line for cell in (launch, data_again) for line in streamed(cell).splitlines() if line.startswith("error:")]
    assert len(said) == 2 and "accelerate launch asks for mixed_precision bf16" in said[0] and said[1] == stopped, said
    assert [o.output_type for cell in (typo, data, launch, data_again) for o in cell.outputs
            if o.output_type == "error"] == []
    assert [o for o in saved.outputs if o.output_type == "error"] == [] and "adapter saved to runs/tiny-sft" in \
        text_of(nbformat.v4.new_notebook(cells=[saved])), saved.outputs
    said = "".join(o.text for o in refused.outputs if o.get("name") == "stderr").splitlines()
    assert [line for line in said if line.startswith("error:")] == [
        "error: the settings changed since tiny-sft trained (lora_r): saving would record them for a model trained "
        "with others. Set them back and run this cell again, or run the 'Run folder', 'Model' and 'Train' cells again, "
        "then this one"], refused.outputs
    assert json.loads((tmp_path / "runs/tiny-sft/adapter_config.json").read_text())["r"] != 4
    said = "".join(o.text for o in again.outputs if o.get("name") == "stderr").splitlines()
    assert [o.output_type for o in again.outputs if o.output_type == "error"] == []  # no traceback
    assert [line for line in said if line.startswith("error:")] == [
        "error: runs/tiny-sft was already trained in this session: run the cells from 'Run folder' on again (Run "
        "folder, Model, Train); it resumes from the last checkpoint, or starts over where the settings changed"], said
    assert streamed(alive).strip() == "alive"
    assert not list((tmp_path / "runs").glob("tiny-sft.previous-*"))  # the finished run stayed where it was
    assert "resume_from runs/tiny-sft/checkpoint-4" in text_of(nbformat.v4.new_notebook(cells=[run_folder_again]))
    for cell in (train_again, save_again):
        assert [o for o in cell.outputs if o.output_type == "error"] == [], cell.outputs
    assert json.loads((tmp_path / "runs/tiny-sft/metrics.json").read_text())["global_step"] == 4


def test_the_rlaif_settings_example_starts_where_the_readme_says():
    """rlaif's settings cell's example left out model_id: a notebook user following it started from the bare base,
    while notebooks/README.md says rlaif starts from runs/tiny-sft (the rlaif notebook audit of session 58)."""
    import ast

    readme = " ".join((ROOT / "notebooks" / "README.md").read_text().split())
    assert "rl and rlaif also start from `runs/tiny-sft`" in readme
    nb = nbformat.read(ROOT / "notebooks" / "rlaif.ipynb", as_version=4)
    settings = next(c for c in nb.cells if c.cell_type == "code").source
    example = ast.literal_eval(re.search(r"^#\s*overrides = (\{.*\})", settings, re.M).group(1))
    assert example["preset"] == "tiny" and example["model_id"] == "runs/tiny-sft"
    assert "python rlaif.py --preset tiny --model_id runs/tiny-sft" in (ROOT / "README.md").read_text()
