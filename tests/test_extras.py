"""Optional extras (alignkit.core.extras): a missing one is one `error:` line naming the pip command that adds it,
raised before any model loads; the core never imports them."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from alignkit.core.config import DPOSettings
from alignkit.core.errors import UserError
from alignkit.core.extras import MissingExtra
from alignkit.train.training import resolve_report_to

from conftest import ROOT

EVAL_LINE = 'pip install -e ".[eval]"'
TRACKING_LINE = 'pip install -e ".[tracking]"'


def hide(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_alpaca_eval_missing(monkeypatch):
    from alignkit.evals import alpacaeval_annotate

    hide(monkeypatch, "alpaca_eval")
    with pytest.raises(MissingExtra, match=r"evaluate\.py alpaca_eval needs the alpaca_eval package") as e:
        alpacaeval_annotate.load_package()
    assert EVAL_LINE in str(e.value) and "\n" not in str(e.value)


def test_fastchat_missing(monkeypatch):
    from alignkit.evals import fastchat_compat

    monkeypatch.setattr(fastchat_compat, "_modules", None)  # not imported yet in this process
    hide(monkeypatch, "fastchat", "fastchat.llm_judge")
    with pytest.raises(MissingExtra, match=r"MT-Bench judging .* needs the fastchat package") as e:
        fastchat_compat.load()
    assert EVAL_LINE in str(e.value)


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_tracker_missing_and_present(monkeypatch, tracker):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no key needed: only the package is in question
    hide(monkeypatch, "wandb", "tensorboard", "tensorboardX")
    with pytest.raises(MissingExtra, match=f"--report_to {tracker} needs the {tracker} package") as e:
        resolve_report_to(DPOSettings(report_to=tracker))
    assert TRACKING_LINE in str(e.value) and "--report_to none" in str(e.value)
    monkeypatch.setitem(sys.modules, tracker, types.ModuleType(tracker))  # installed: no complaint
    assert resolve_report_to(DPOSettings(report_to=tracker)) == tracker
    assert resolve_report_to(DPOSettings(report_to="none")) == "none"  # nothing asked, nothing needed


def test_report_to_all_takes_the_installed_trackers_that_can_log_without_a_prompt(monkeypatch, tmp_path, caplog):
    """TRL and transformers take `--report_to all` (every tracker installed), as handbook recipes may write it;
    alignkit refused it as "not one of auto, none, wandb, tensorboard". It takes wandb and tensorboard where installed,
    wandb only where it logs without a login prompt (a key, a login, or WANDB_MODE=offline), and says which."""
    from alignkit.core.args import parse_config

    assert parse_config(DPOSettings, ["--report_to", "all"]).report_to == ["all"]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    hide(monkeypatch, "wandb", "tensorboard", "tensorboardX")
    assert resolve_report_to(DPOSettings(report_to="all")) == "none"
    assert "--report_to all: none" in caplog.text
    for tracker in ("wandb", "tensorboard"):
        monkeypatch.setitem(sys.modules, tracker, types.ModuleType(tracker))
    assert resolve_report_to(DPOSettings(report_to="all")) == "tensorboard"  # wandb would ask for a login
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_report_to(DPOSettings(report_to=["all", "tensorboard"])) == ["tensorboard", "wandb"]
    # The session's review: WANDB_MODE=disabled took wandb; --wandb_project was dropped without the key's line.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_report_to(DPOSettings(report_to="all")) == "tensorboard"
    monkeypatch.delenv("WANDB_MODE")
    with pytest.raises(UserError, match="wandb logging is on, but WANDB_API_KEY is not set"):
        resolve_report_to(DPOSettings(report_to="all", wandb_project="myproj"))


def test_wandb_never_records_a_password_from_the_command_line(monkeypatch):
    """wandb stores the command line in its run metadata: rl.py's --judge_base_url with user:password went up
    with it (found in the offline .wandb file)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    monkeypatch.setattr(sys, "argv", ["rl.py", "--judge_base_url", "http://alice:SuperSecretPass123@h:8000/v1"])
    assert resolve_report_to(DPOSettings(report_to="wandb")) == "wandb"
    assert sys.argv == ["rl.py", "--judge_base_url", "http://alice:***@h:8000/v1"]


def test_the_command_prints_one_line_before_loading_anything(tiny_cache, tmp_path):
    # The whole script as a user runs it, tensorboard hidden from it: one `error:` line, exit 2, no traceback.
    code = ("import runpy, sys; sys.modules['tensorboard'] = sys.modules['tensorboardX'] = None; "
            "sys.argv = ['dpo.py', '--preset', 'tiny', '--report_to', 'tensorboard']; "
            f"runpy.run_path({str(ROOT / 'dpo.py')!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALIGNKIT_CACHE": str(tiny_cache)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and "Traceback" not in proc.stderr
    assert "--report_to tensorboard needs the tensorboard package" in errors[0] and TRACKING_LINE in errors[0]
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_core_modules_import_without_the_extras():
    # sft/dpo/merge/label/reward/rl's modules import in a fresh process where no extra is installed.
    code = ("import sys; sys.modules.update(dict.fromkeys(['fastchat', 'alpaca_eval', 'wandb', 'tensorboard', "
            "'tensorboardX'])); import alignkit.train.training, alignkit.train.trainers, alignkit.modeling.merge, "
            "alignkit.feedback.labeling, alignkit.feedback.label_inputs, alignkit.feedback.label_pairs, alignkit.feedback.label_records, "
            "alignkit.train.reward, alignkit.train.rl, alignkit.core.card, "
            "alignkit.train.report, alignkit.evals.evaluation, trl; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
