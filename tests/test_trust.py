"""No good run thrown away, errors a user can act on (issue 11, points 6-11).

A failed rerun leaves the earlier run where it was; an adapter chain copied elsewhere still loads and merges; an
unreachable Hub fails in seconds with the way out; user errors are one line and exit status 2; model cards name
the real base; bitsandbytes' kernel warning stays out of runs without 4-bit weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.core.config import ModelSettings
from alignkit.core.data import DataError
from alignkit.core.errors import UserError
from alignkit.core.card import model_card
from alignkit.modeling import presets
from alignkit.modeling.models import adapter_chain, load_model

from conftest import ROOT, run_script


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def script(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """Run a script as a user does (`python name args`): (return code, stdout, stderr, seconds)."""
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr, time.time() - start


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- 6. a failed rerun keeps the good run
def test_a_failed_rerun_leaves_the_good_run_where_it_was(tiny_cache, tmp_path, monkeypatch):
    common = ["--preset", "tiny", "--max_steps", "4", "--save_steps", "2", "--eval_split", "0",
              "--output_dir", str(tmp_path), "--run_name", "run"]
    run_script("sft.py", *common)
    folder = tmp_path / "run"
    good = snapshot(folder)
    assert "adapter_model.safetensors" in good and "checkpoint-4/trainer_state.json" in good

    def still_there():
        assert snapshot(folder) == good
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "run"]  # nothing moved aside or left

    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]},
                                         {"messages": "not a conversation"}])
    with pytest.raises(DataError, match="bad.jsonl"):  # other settings, bad data
        run_script("sft.py", *common, "--learning_rate", "1e-3", "--dataset_id", str(tmp_path / "bad.jsonl"))
    still_there()
    with pytest.raises(UserError, match="model not found"):  # other settings, missing model
        run_script("sft.py", *common, "--lora_r", "4", "--model_id", str(tmp_path / "no-such-model"))
    still_there()

    # Other settings, failing inside training before its first checkpoint: removed, the good run back in place.
    from alignkit.train.trainers import AlignSFTTrainer

    real_step = AlignSFTTrainer.training_step

    def broken_step(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(AlignSFTTrainer, "training_step", broken_step)
    with pytest.raises(RuntimeError, match="simulated"):
        run_script("sft.py", *common, "--lora_r", "4")
    still_there()

    # Failing after its first checkpoint: the new run keeps its checkpoint, marked failed; the good run is aside.
    def step_then_fail(self, *args, **kwargs):
        if self.state.global_step >= 3:
            raise RuntimeError("crash after a checkpoint (simulated)")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(AlignSFTTrainer, "training_step", step_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run_script("sft.py", *common, "--lora_r", "4")
    assert (folder / "checkpoint-2").is_dir() and "crash after a checkpoint" in (folder / "alignkit_failed.txt").read_text()
    (aside,) = tmp_path.glob("run.previous-*")
    assert snapshot(aside) == good


# ---------------------------------------------------------------- 7. a copied chain loads, merges, is not pushed
def test_a_copied_adapter_chain_loads_and_merges_without_the_originals(tiny_cache, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    tiny = ["--preset", "tiny", "--max_steps", "3", "--eval_split", "0", "--output_dir", str(runs)]
    run_script("sft.py", *tiny, "--run_name", "sft")
    run_script("dpo.py", *tiny, "--run_name", "dpo", "--model_id", str(runs / "sft"))
    config = json.loads((runs / "dpo" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../sft"  # the chain, relative to the adapter
    # The SFT adapter's base is a full model outside runs/: recorded by absolute path, so it is found from anywhere.
    assert json.loads((runs / "sft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        Path(presets.paths()["model"]).resolve())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = load_model(ModelSettings(model_id=str(runs / "dpo"), quantization="none")).model(input_ids=ids).logits

    elsewhere = tmp_path / "elsewhere" / "copied-runs"
    shutil.copytree(runs, elsewhere)
    shutil.rmtree(runs)
    monkeypatch.chdir(tmp_path / "elsewhere")  # and from another working directory
    base, chain = adapter_chain("copied-runs/dpo")
    assert chain == [str(elsewhere / "sft"), "copied-runs/dpo"] and base == str(Path(presets.paths()["model"]).resolve())
    with torch.no_grad():
        after = load_model(ModelSettings(model_id="copied-runs/dpo", quantization="none")).model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    run_script("merge.py", "--adapter_dir", "copied-runs/dpo", "--output_dir", "merged")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "elsewhere" / "merged")(input_ids=ids).logits
    assert torch.allclose(merged, before, atol=1e-4)

    # Old runs recorded their base by absolute path: still followed.
    config = json.loads((elsewhere / "dpo" / "adapter_config.json").read_text())
    (elsewhere / "dpo" / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": str(elsewhere / "sft")}))
    assert adapter_chain(str(elsewhere / "dpo"))[1] == [str(elsewhere / "sft"), str(elsewhere / "dpo")]
    # A base that is gone is named, with the fix, instead of being tried as a Hub repo id.
    shutil.rmtree(elsewhere / "sft")
    with pytest.raises(UserError, match="names its base .*which is not there"):
        adapter_chain(str(elsewhere / "dpo"))


def test_pushing_an_adapter_on_a_local_adapter_is_refused_before_any_upload(dpo_run, tmp_path, monkeypatch,
                                                                             hub_answers):
    import huggingface_hub

    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: uploads.append(kw))
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtokenForTests123456")
    with pytest.raises(UserError, match=r"on the local adapter \.\./\S*sft, a chain over the local model \S+, which "
                                        r"nobody else can load from the Hub: push the merged model instead"):
        run_script("merge.py", "--adapter_dir", str(dpo_run["run_folder"]), "--push_to_hub", "--push", "adapter",
                   "--hub_repo_id", "me/dpo-adapter")
    # sft.py/dpo.py --push_to_hub without --merge_adaptors would push such an adapter: refused before training.
    with pytest.raises(UserError, match="--merge_adaptors"):
        run_script("dpo.py", "--preset", "tiny", "--push_to_hub", "--hub_repo_id", "me/x", "--output_dir",
                   str(tmp_path))
    assert uploads == [] and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- 8. an unreachable Hub fails in seconds
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections to it are refused


def test_an_unreachable_hub_fails_in_seconds_with_the_way_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "dpo.py"), "--dpo_beta", "0.1"], cwd=tmp_path, env={
        **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    took = time.time() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert "cannot reach the Hugging Face Hub" in error[0] and env["HF_ENDPOINT"] in error[0]
    assert "mistralai/Mistral-7B-Instruct-v0.2" in error[0] and "HF_HUB_OFFLINE=1" in error[0]
    assert "--preset tiny" in error[0]
    assert took < 45, took  # the libraries' retries took 73 s; this is imports plus one refused connection
    assert not list(tmp_path.iterdir())  # no run folder


@pytest.mark.parametrize("command", ["vibes", "merge", "chain"])
def test_every_path_to_a_hub_model_asks_the_hub_before_fetching(command, sft_run, tmp_path, monkeypatch):
    """evaluate.py vibes, merge.py and label.py's answer cache reached the Hub first through the adapter-chain
    reading (an hf_hub_download that retries for a minute before alignkit's one line): 35 to 95 seconds."""
    import huggingface_hub
    import transformers.utils.hub
    from huggingface_hub import constants

    from alignkit.core.sources import HubUnreachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")

    fetches = []

    def fetched(*a, **k):  # recorded: the callers swallow what a download raises
        fetches.append(a)
        raise OSError("fetched from the Hub before asking whether it answers")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetched)
    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", fetched)
    with pytest.raises(HubUnreachable, match="cannot reach the Hugging Face Hub .* someorg/somemodel"):
        if command == "vibes":
            run_script("evaluate.py", "vibes", "--model_id", "someorg/somemodel", "--prompts", "hi", cwd=tmp_path)
        elif command == "merge":  # an adapter whose base is on the Hub
            adapter = tmp_path / "adapter"
            shutil.copytree(sft_run["run_folder"], adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
            config = json.loads((adapter / "adapter_config.json").read_text())
            (adapter / "adapter_config.json").write_text(json.dumps({**config,
                                                                      "base_model_name_or_path": "someorg/somemodel"}))
            run_script("merge.py", "--adapter_dir", str(adapter), cwd=tmp_path)
        else:  # what every cache key and model kind reads first (label.py's generator identity among them)
            from alignkit.modeling.identity import model_identity

            model_identity(ModelSettings(model_id="someorg/somemodel"))
    assert fetches == []


# ---------------------------------------------------------------- 9. user errors: one line, status 2
def test_a_user_error_is_one_line_and_exit_2_in_a_real_process(tiny_cache, tmp_path):
    """As a user meets it, in a process of its own (the excepthook the script installs, the exit status the shell
    sees); --debug brings the traceback back. Each kind of bad input, in-process: tests/test_bad_inputs.py."""
    bad = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"},
                                                 {"prompt": "hi", "chosen": "a"}])
    env = {"ALIGNKIT_CACHE": str(tiny_cache), "HF_HOME": str(tmp_path / "hf")}
    args, expected = ["dpo.py", "--preset", "tiny", "--dataset_id", str(bad)], "prefs.jsonl"
    code, out, err, _ = script(*args, cwd=tmp_path, env=env)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and expected in err.strip().splitlines()[-1], err[-3000:]
    code, out, err, _ = script(*args, "--debug", cwd=tmp_path, env=env)
    assert code == 2 and "Traceback" in err and expected in err


def test_debug_from_the_environment_and_unexpected_errors_keep_their_traceback(tmp_path):
    code, _, err, _ = script("merge.py", "--adapter_dirr", "x", cwd=tmp_path, env={"ALIGNKIT_DEBUG": "1"})
    assert code == 2 and "Traceback" in err and "ConfigError" in err
    # A bug is not a user error: Python's own report, status 1.
    boom = tmp_path / "boom.py"
    boom.write_text("from alignkit.core.errors import report_user_errors\nreport_user_errors()\n"
                    "raise KeyError('bug')\n")
    proc = subprocess.run([sys.executable, str(boom)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'bug'" in proc.stderr


def test_ctrl_c_is_one_line_on_the_command_line_and_under_a_notebook_cell(tmp_path, capsys):
    """A Ctrl-C (a kernel's stop button) printed a traceback 30-50 lines deep into TRL: now one line saying what is
    kept and how to go on, status 130 as a shell reports SIGINT; --debug / ALIGNKIT_DEBUG=1 keep the traceback."""
    import signal

    from alignkit.core import errors

    slow = tmp_path / "slow.py"
    slow.write_text("import sys, time\nfrom alignkit.core.errors import report_user_errors\nreport_user_errors()\n"
                    "print('ready', flush=True)\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ALIGNKIT_DEBUG", None)
    # A launch's other ranks (RANK 1) stop without the line: rank 0 says it for the launch (each rank said it).
    for debug, code, said, rank in ((False, 130, [errors.INTERRUPTED], "0"), (True, -signal.SIGINT, None, "0"),
                                    (False, 130, [], "1")):
        # SIGINT at its default in the child: a test worker (xdist) ignores it, and a child that starts with it
        # ignored never gets Python's KeyboardInterrupt handler.
        proc = subprocess.Popen([sys.executable, str(slow), *(["--debug"] if debug else [])], cwd=tmp_path,
                                env={**env, "RANK": rank},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        if said is not None:
            assert err.strip().splitlines() == said
        else:
            assert "Traceback" in err and "KeyboardInterrupt" in err

    class Shell:  # IPython's shell, as far as the handler uses it
        def _showtraceback(self, *args):
            raise AssertionError("a traceback")

    errors._SAID_HOW_TO_GO_ON.clear()  # an earlier in-process run's stop, which no kernel handler consumed
    errors._show_in_cell(Shell(), KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err.strip() == errors.INTERRUPTED_IN_CELL
    # A run folder's own line said what is kept and the cells to run: the generic line (run the cell again) said
    # a second, other way on. Once: the kernel's next stop says its own.
    errors.said_how_to_go_on()
    errors._show_in_cell(Shell(), KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == ""
    errors._show_in_cell(Shell(), KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err.strip() == errors.INTERRUPTED_IN_CELL
    # A stop inside torch.no_grad()'s own entry (after it turned gradients off) left them off for the kernel: every
    # later training failed ("does not require grad"). The stop is made to land there; the handler turns them on.
    real = torch.set_grad_enabled

    def stopped_after(mode):
        real(mode)
        raise KeyboardInterrupt

    torch.set_grad_enabled = stopped_after
    try:
        with torch.no_grad():
            pass
    except KeyboardInterrupt as error:
        stop = error
    finally:
        torch.set_grad_enabled = real
    assert not torch.is_grad_enabled()
    errors._show_in_cell(Shell(), KeyboardInterrupt, stop, stop.__traceback__)
    assert torch.is_grad_enabled() and capsys.readouterr().err.strip() == errors.INTERRUPTED_IN_CELL
    torch.set_grad_enabled(False)  # a notebook's own choice: a stop elsewhere leaves it as it is
    errors._show_in_cell(Shell(), KeyboardInterrupt, KeyboardInterrupt(), None)
    assert not torch.is_grad_enabled() and capsys.readouterr().err.strip() == errors.INTERRUPTED_IN_CELL
    torch.set_grad_enabled(True)
    # A stop while a library imported (a cold first cell takes seconds to import TRL) leaves it half-imported: run
    # again, the cell failed inside it with a 400-line traceback. The way out is a restart, said in one line; for an
    # import statement (its traceback has no importlib frames) as for importlib.import_module.
    (tmp_path / "slow_library.py").write_text("raise KeyboardInterrupt\n")
    sys.path.insert(0, str(tmp_path))
    try:
        for how in ("statement", "import_module"):
            try:
                if how == "statement":
                    import slow_library  # noqa: F401
                else:
                    import importlib

                    importlib.import_module("slow_library")
            except KeyboardInterrupt as error:
                errors._show_in_cell(Shell(), KeyboardInterrupt, error, error.__traceback__)
            assert capsys.readouterr().err.strip() == errors.INTERRUPTED_IMPORT, how
    finally:
        sys.path.remove(str(tmp_path))


# ---------------------------------------------------------------- 10. model cards name the real base
def test_model_cards_name_the_real_base_never_a_local_path(sft_run, dpo_run, tmp_path):
    tiny_model = presets.paths()["model"]
    for folder in (Path(sft_run["run_folder"]), Path(dpo_run["run_folder"])):
        card = (folder / "README.md").read_text()  # the card the run folder keeps
        assert "[None]" not in card and "huggingface.co/None" not in card
        assert "a local model (LlamaForCausalLM, llama; folder `model`)" in card
        assert tiny_model not in card and str(Path(tiny_model).resolve()) not in card
        assert "base_model:" not in card  # the Hub metadata names Hub repos only
    assert "on top of the adapter `sft`" in (Path(dpo_run["run_folder"]) / "README.md").read_text()

    # An adapter on a Hub model names and links it, and tags it as its base_model.
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_run["run_folder"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "me/tiny-base"}))
    card = model_card(adapter, "me/sft-adapter")
    assert "SFT of [me/tiny-base](https://huggingface.co/me/tiny-base) with LoRA" in card
    assert "base_model: me/tiny-base" in card and 'from_pretrained("me/sft-adapter", dtype="auto", device_map="auto")' in card

    # A merged model of a local base: "a local model" too, and no local path anywhere in its card.
    from alignkit.modeling.merge import merge_adapters

    merged = merge_adapters(str(dpo_run["run_folder"]), tmp_path / "merged")
    card = model_card(merged, "me/merged")
    assert "a local model (LlamaForCausalLM" in card and str(tmp_path) not in card
    assert str(Path(tiny_model).resolve()) not in card and str(Path(dpo_run["run_folder"]).parent) not in card


def test_the_run_type_is_recorded_in_the_saved_config_and_named_by_the_card(sft_run, dpo_run, tmp_path):
    for run, run_type in [(sft_run, "sft"), (dpo_run, "dpo")]:
        assert json.loads((Path(run["run_folder"]) / "alignkit_config.json").read_text())["run_type"] == run_type
    # The card reads the recorded type, not a field name: a reward run has no dpo_beta and is no SFT either.
    reward = tmp_path / "reward"
    shutil.copytree(sft_run["run_folder"], reward)
    saved = json.loads((reward / "alignkit_config.json").read_text())
    (reward / "alignkit_config.json").write_text(json.dumps({**saved, "run_type": "reward"}))
    card = model_card(reward, "me/rm")
    assert "Reward model of" in card and "- reward\n" in card and "SFT of" not in card


def test_stage_settings_map_into_trls_config_and_bad_overrides_are_a_config_error(tmp_path):
    from trl import DPOConfig

    from alignkit.core.args import ConfigError
    from alignkit.core.config import DPOSettings
    from alignkit.train.training import trl_config

    s = DPOSettings(dpo_beta=0.3, label_smoothing=0.1, loss_weights=[1.0], precompute_ref_log_probs=True,
                    report_to="none")
    args = trl_config(DPOConfig, s, tmp_path, torch.float32)
    assert (args.beta, args.label_smoothing, args.loss_type, args.loss_weights, args.precompute_ref_log_probs) == (
        0.3, 0.1, ["sigmoid"], [1.0], True)
    with pytest.raises(ConfigError, match="--trainer_overrides is not valid JSON"):
        trl_config(DPOConfig, DPOSettings(report_to="none", trainer_overrides="{optim: x}"), tmp_path, torch.float32)
    # transformers edits TRL's fsdp_config in place (a string layer class made a list, its own keys added): the
    # settings' own dict changed, saved so in alignkit_config.json.
    import copy

    from alignkit.core.args import parse_config
    from alignkit.core.saved_settings import config_to_dict

    s = parse_config(DPOSettings, ["--fsdp", "full_shard auto_wrap", "--fsdp_config",
                                   '{"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}', "--report_to", "none"],
                     env_file=None)
    before = copy.deepcopy(config_to_dict(s))
    trl_config(DPOConfig, s, tmp_path, torch.float32)
    assert config_to_dict(s) == before
    # A JSON string where TRL's field is a bool or a number goes to TRL as its type, as a flag's does: "false" reached
    # TRL as the string, which is true (found by an audit: '{"sync_ref_model": "false"}' was refused as TR-DPO).
    s = parse_config(DPOSettings, ["--report_to", "none", "--trainer_overrides",
                                   '{"logging_first_step": "false", "sync_ref_model": "false", "save_steps": "7"}'],
                     env_file=None)
    args = trl_config(DPOConfig, s, tmp_path, torch.float32)
    assert (args.logging_first_step, args.sync_ref_model, args.save_steps) == (False, False, 7)
    # A field that takes strings keeps its string: report_to's "none" is its word, not JSON's null (it became None,
    # and transformers refused [None] once the model had loaded).
    s = parse_config(DPOSettings, ["--trainer_overrides", '{"report_to": "none", "optim": "adamw_torch"}'],
                     env_file=None)
    assert s.trainer_overrides == {"report_to": "none", "optim": "adamw_torch"}
    assert trl_config(DPOConfig, s, tmp_path, torch.float32).report_to == []
    with pytest.raises(ConfigError, match=r"^invalid value for --trainer_overrides logging_first_step: 'maybe' is not "
                                          r"bool$"):
        parse_config(DPOSettings, ["--trainer_overrides", '{"logging_first_step": "maybe"}'], env_file=None)


def test_a_reward_run_keeps_its_lora_modules_to_save_as_given(tiny_cache, tmp_path):
    """PEFT adds its head ("classifier", "score") to LoraConfig's modules_to_save in place: the settings' own list
    grew, so start_run refused the run as changed since prepare_run, and alignkit_config.json recorded the grown
    list (another run to --resume auto)."""
    run = run_script("reward.py", "--preset", "tiny", "--max_steps", "1", "--eval_split", "0", "--lora_modules_to_save",
                     "score", "--output_dir", str(tmp_path), "--run_name", "rm")
    assert run["settings"].lora_modules_to_save == ["score"]
    assert json.loads((tmp_path / "rm" / "alignkit_config.json").read_text())["lora_modules_to_save"] == ["score"]


def test_train_on_completions_without_generation_markers_is_a_config_error():
    from types import SimpleNamespace

    from alignkit.core.args import ConfigError
    from alignkit.train.loss_mask import loss_mask_settings

    def run(train_on, trainer_overrides=None):
        return SimpleNamespace(train_on=train_on, trainer_overrides=trainer_overrides or {})

    tokenizer = SimpleNamespace(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    conversations = SimpleNamespace(column_names=["messages"])
    with pytest.raises(ConfigError, match="--train_on completions needs a chat template with"):
        loss_mask_settings(run("completions"), conversations, tokenizer)
    assert loss_mask_settings(run("auto"), conversations, tokenizer) == {"assistant_only_loss": False}
    # --assistant_only_loss false as well (TRL's name wins, alignkit.train.training.trl_config): no template needed
    # for it, and no refusal once the model had loaded (session 31's note).
    assert loss_mask_settings(run("completions", {"assistant_only_loss": False}), conversations, tokenizer) == \
        {"assistant_only_loss": False}


def test_a_run_records_and_cards_what_its_loss_covered(sft_run):
    """Every sft.py card showed `train_on "auto"`, which covers the assistant turns, the completions or every token
    by the rows and the chat template (the last said in the log only): the run records what it resolved to, for its
    card (the sft.py audit). The decision is loss_mask_settings', TRL's names over --train_on included."""
    from types import SimpleNamespace

    from alignkit.core.card import model_card
    from alignkit.train.loss_mask import loss_mask_settings, loss_on

    config = json.loads((sft_run["run_folder"] / "alignkit_config.json").read_text())
    assert config["train_on"] == "auto" and config["loss_on"] == "assistant turns"  # the tiny template marks them
    assert '| loss_on | `"assistant turns"` |' in model_card(sft_run["run_folder"])
    marked = sft_run["loaded"].tokenizer
    plain = SimpleNamespace(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for rows, tokenizer, train_on, given, covered in (
            (["messages"], plain, "auto", {}, "every token"), (["messages"], marked, "all", {}, "every token"),
            (["messages"], marked, "all", {"assistant_only_loss": True}, "assistant turns"),
            (["prompt", "completion"], marked, "auto", {}, "completions"),
            (["prompt", "completion"], marked, "auto", {"completion_only_loss": False}, "every token"),
            (["text"], marked, "auto", {}, "every token")):
        s = SimpleNamespace(train_on=train_on, trainer_overrides=given)
        loss_mask_settings(s, SimpleNamespace(column_names=rows), tokenizer)
        assert loss_on(s) == covered, (rows, train_on, given)


def test_trl_settings_conversations_leave_without_effect_are_said(tiny_cache, alignkit_log):
    """--completion_only_loss on conversations, and --eos_token where the chat template ends each turn, trained the
    same losses without a word (audit); on prompt/completion rows both act, and nothing is said."""
    from datasets import Dataset

    from alignkit.core.args import parse_config
    from alignkit.core.config import SFTSettings
    from alignkit.modeling import presets
    from alignkit.train.loss_mask import check_loss_mask

    s = parse_config(SFTSettings, env_file=None, presets={"tiny": presets.defaults("sft")},
                     args=["--preset", "tiny", "--completion_only_loss", "true", "--eos_token", "<|system|>"])
    alignkit_log.clear()
    turns = [{"role": "user", "content": "name three fruits."}, {"role": "assistant", "content": "apple,pear,plum."}]
    check_loss_mask(s, Dataset.from_list([{"messages": turns}] * 2))
    assert "--completion_only_loss true not applied: it masks prompt/completion rows" in alignkit_log.text
    from alignkit.core.saved_settings import not_applied  # recorded too, for the run's config and card

    record = not_applied(s)["completion_only_loss"]
    assert record["value"] is True and re.fullmatch(r"it masks prompt/completion rows, and \S+sft\.jsonl holds "
                                                    "conversations", record["why"]), record
    assert "--eos_token <|system|>: not added to" in alignkit_log.text
    assert "it becomes the saved tokenizer's eos token" in alignkit_log.text
    alignkit_log.clear()
    check_loss_mask(s, Dataset.from_list([{"prompt": "name three fruits.", "completion": "apple,pear,plum."}] * 2))
    assert "not applied" not in alignkit_log.text and "--eos_token" not in alignkit_log.text


def test_sft_reads_the_tokenizer_once_for_its_end_tokens(tiny_cache, monkeypatch):
    """sft.py checked --eos_token/--pad_token against the tokenizer in preflight (check_end_tokens) and again in
    check_loss_mask, reading the tokenizer a second time (a re-read of the code): preflight's check is the one, and
    check_loss_mask reads the tokenizer only where the chat template decides something (a loss mask, an eos_token on
    conversations)."""
    from datasets import Dataset

    from alignkit.core.args import parse_config
    from alignkit.core.config import SFTSettings
    from alignkit.train import loss_mask

    s = parse_config(SFTSettings, env_file=None, presets={"tiny": presets.defaults("sft")}, args=["--preset", "tiny"])
    s.trainer_overrides = {"pad_token": loss_mask._tokenizer(s).eos_token}  # one the vocabulary has
    reads = []
    real = loss_mask._tokenizer
    monkeypatch.setattr(loss_mask, "_tokenizer", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    loss_mask.check_end_tokens(s)  # preflight's
    turns = [{"role": "user", "content": "name three fruits."}, {"role": "assistant", "content": "apple,pear,plum."}]
    for rows in ([{"messages": turns}] * 2, [{"prompt": "name three fruits.", "completion": "apple,pear,plum."}] * 2):
        loss_mask.check_loss_mask(s, Dataset.from_list(rows))
    assert len(reads) == 1


# ---------------------------------------------------------------- 11. no bitsandbytes kernel warning, no DeepSpeed CPU note
def test_a_run_without_4bit_weights_prints_none_of_the_libraries_notes(tiny_cache, tmp_path):
    """bitsandbytes' CPU-kernel warning (printed on import on a CPU with AVX512-BF16), DeepSpeed's CPU note and
    transformers' checkpoint-mtime note: nothing for the user to act on."""
    code, out, err, _ = script("sft.py", "--preset", "tiny", "--max_steps", "3", "--save_steps", "1", "--eval_split",
                               "0", "--output_dir", str(tmp_path), cwd=tmp_path,
                               env={"ALIGNKIT_CACHE": str(tiny_cache)})
    assert code == 0, err[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    assert "gemm_4bit_forward" not in out + err and "kernels-community" not in out + err, (
        "bitsandbytes' CPU-kernel warning got through" if "gemm_4bit_forward" in probe.stderr else
        "this CPU has no AVX512-BF16 and bitsandbytes printed something else")
    assert (tmp_path / "tiny-sft" / "adapter_model.safetensors").is_file()
    # Nor DeepSpeed's import-time "Setting accelerator to CPU" (printed by every run on a machine without a GPU).
    import torch

    if not torch.cuda.is_available():  # what DeepSpeed prints on a machine without a GPU
        deepspeed = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True)
        assert "Setting accelerator to CPU" in deepspeed.stdout + deepspeed.stderr
    assert "Setting accelerator to CPU" not in out + err
    # Nor transformers' "mtime may not be reliable" when checkpoints come within a second (3 in a tiny run).
    assert "mtime may not be reliable" not in out + err


def test_the_trainer_s_note_on_resuming_stacked_adapters_is_dropped():
    """Every resume of a run over an SFT adapter logged "Multiple active adapters detected will only consider the
    first adapter": the Trainer reloads the trained adapter, and alignkit turns the frozen ones back on after it.
    (Its own handler and level here: whatever transformers' verbosity an earlier test left.)"""
    import logging

    import alignkit  # noqa: F401 - installs the filters

    trainer_log = logging.getLogger("transformers.trainer")
    said, level = [], trainer_log.level
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    trainer_log.addHandler(handler)
    trainer_log.setLevel(logging.WARNING)
    try:
        trainer_log.warning("Multiple active adapters detected will only consider the first adapter")
        trainer_log.warning("another trainer warning stays")
    finally:
        trainer_log.removeHandler(handler)
        trainer_log.setLevel(level)
    assert said == ["another trainer warning stays"]


def test_sigterm_takes_ctrl_c_s_path_and_a_training_ends_its_step_first(tmp_path):
    """A SIGTERM (a scheduler's stop, `timeout`, `docker stop`) killed a script where it stood: no "interrupted"
    line, no alignkit_failed.txt, label.py's finished work unsaved since its last write. It now takes Ctrl-C's path
    with status 143; during a training the first one waits for the step's end (the trainer saves it), the second
    stops at once (one right after the first is the same stop: a scheduler's, and a launcher's forward of it). A
    process forked from the script (a DataLoader's worker) is stopped by it as before, silently."""
    import signal

    from alignkit.core import errors

    slow = tmp_path / "slow.py"
    slow.write_text(
        "import os, sys, time\nfrom alignkit.core import errors\nerrors.report_user_errors()\n"
        "errors.SAME_STOP_S = 0.5\n"
        "if sys.argv[1] == 'fork':\n"  # the child says it runs first: a signal before Python's after-fork is lost
        "    r, w = os.pipe()\n    child = os.fork()\n"
        "    if child == 0:\n        os.write(w, b'x')\n        time.sleep(60)\n        os._exit(0)\n"
        "    os.read(r, 1)\n    print('ready', flush=True)\n    os.kill(child, 15)\n"
        "    print(os.waitpid(child, 0)[1], flush=True)\n"
        "    sys.exit(0)\n"
        "if sys.argv[1] == 'prep':\n"  # in a training's preparation (TRL tokenizing): no step to wait for
        "    with errors.keep_interrupts():\n        print('ready', flush=True)\n        time.sleep(60)\n"
        "with errors.keep_interrupts():\n"
        "    errors.training_steps()\n"  # the trainer's loop has begun (before it, a SIGTERM stops at once)
        "    print('ready', flush=True)\n"
        "    for step in range(600):\n"
        "        if errors.sigterm_asked():\n            print('asked at its step end', flush=True)\n"
        "        time.sleep(0.1)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ALIGNKIT_DEBUG", None)
    env.pop("WORLD_SIZE", None)

    def start(how):
        proc = subprocess.Popen([sys.executable, str(slow), how], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        assert proc.stdout.readline().strip() == "ready"
        return proc

    proc = start("train")
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "asked at its step end"  # the first: the step goes on to its end
    proc.send_signal(signal.SIGTERM)  # at once after it: the same stop (a scheduler's, and a launcher's forward)
    time.sleep(1)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # the second, later: at once, Ctrl-C's one line, 143
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == errors.EXIT_TERMINATED == 143, err
    assert err.strip().splitlines() == [errors.INTERRUPTED]
    proc = start("prep")  # before the trainer's loop, a SIGTERM stops at once (it waited for the first step's end)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err.strip().splitlines() == [errors.INTERRUPTED]
    proc = start("fork")
    # Read through the same reader as start(): its "ready" line may have brought the next one into its buffer, which
    # communicate() (reading the pipes themselves) never sees (this failed once under a loaded CI).
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 0 and out.split() == [str(signal.SIGTERM)] and not err, (out, err)  # killed by it


def test_a_sigterm_while_a_refusal_is_said_ends_the_process_without_a_second_report(tmp_path):
    """A launch's rank refusing (it waits for local rank 0 to say it) while the launcher stops it: under FSDP and
    ZeRO-3 the SIGTERM came into the excepthook as Terminated, and Python printed "Error in sys.excepthook" and the
    refusal again (the reward/rl audit of session 32). It ends the process as Python would, without a word."""
    import signal

    script = tmp_path / "refused.py"
    script.write_text("from alignkit.core import errors\nerrors.report_user_errors()\nerrors.OTHER_RANKS_WAIT = 20\n"
                      "error = errors.UserError('refused here')\nerror.said_by_local_rank_0 = True\n"
                      "print('ready', flush=True)\nraise error\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ALIGNKIT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(2)  # in the excepthook's wait
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and not err.strip(), err


def test_a_sigterm_saves_the_step_under_way_unless_no_run_resumes_the_trainer(monkeypatch):
    """At a step's end after a SIGTERM, the trainer saves the step as a checkpoint and stops (Ctrl-C's path);
    LoTA's calibration, which a rerun starts again, stops without saving."""
    from types import SimpleNamespace

    from alignkit.core import errors
    from alignkit.train.resuming import EndsAtMaxSteps

    class Trainer:
        def __init__(self):
            self.state, self.saved = SimpleNamespace(global_step=7), []
            self.control = SimpleNamespace(should_save=False, should_training_stop=False)

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            self.saved.append(self.control.should_save and self.control.should_training_stop)

    class Aligned(EndsAtMaxSteps, Trainer):
        pass

    monkeypatch.setitem(errors._SIGTERM, "stopping", False)  # put back after: stop_for_sigterm sets it
    trainer = Aligned()
    trainer._maybe_log_save_evaluate()
    assert trainer.saved == [False]  # no SIGTERM: the schedule's own
    monkeypatch.setitem(errors._SIGTERM, "asked", True)
    with pytest.raises(errors.Terminated, match="SIGTERM at step 7, saved as checkpoint-7"):
        trainer._maybe_log_save_evaluate()
    assert trainer.saved == [False, True]
    calibration = Aligned()
    calibration.saves_on_sigterm = False
    with pytest.raises(errors.Terminated):
        calibration._maybe_log_save_evaluate()
    assert calibration.saved == []


def test_a_ctrl_c_dropped_inside_a_finalizer_stops_the_training_at_its_next_step(monkeypatch):
    """A Ctrl-C in the first second of training landed in the garbage collection the Trainer runs (a dataset's
    __del__), where Python drops exceptions ("Exception ignored in ..."): the run trained to its end with exit
    status 0 (found by an audit). The training remembers it and stops at its next step."""
    import signal

    from alignkit.core.errors import keep_interrupts
    from alignkit.train.resuming import EndsAtMaxSteps

    class Trainer:
        def training_step(self, *args, **kwargs):
            return "trained"

    class Aligned(EndsAtMaxSteps, Trainer):
        pass

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):  # the handler runs here, inside __del__, and its exception is dropped
                pass

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    # Python's own handler, as a script and a kernel have it (a test runner's worker may have set another)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with keep_interrupts():
            Finalized()
            assert dropped == [KeyboardInterrupt]  # Python's "Exception ignored in ...": nothing raised here
            with pytest.raises(KeyboardInterrupt):
                Aligned().training_step()
            assert Aligned().training_step() == "trained"  # once
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
