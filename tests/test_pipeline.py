"""Whole runs of sft.py and dpo.py on the tiny preset: they learn, resume, quantize, merge and keep secrets."""

from __future__ import annotations

import json
import os
import signal
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.core.args import ConfigError
from alignkit.core.config import ModelSettings
from alignkit.modeling import presets
from alignkit.modeling.generation import generate
from alignkit.modeling.models import load_model, reference_mode

from conftest import ROOT, run_script


def rule_score(model_id: str, samples: int = 4) -> float:
    """Mean rule score of sampled answers (temperature 0.7, fixed seed) over the preset's prompts."""
    prompts = [json.loads(line)["prompt"] for line in open(presets.paths()["prompts"])] * samples
    loaded = load_model(ModelSettings(model_id=model_id, quantization="none"))
    answers = generate(loaded.model, loaded.tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       max_new_tokens=16, temperature=0.7, batch_size=64, seed=0)
    return sum(presets.score(p, a) for p, a in zip(prompts, answers)) / len(prompts)


def first_logged(trainer, key):
    return next(entry[key] for entry in trainer.state.log_history if key in entry)


def test_sft_learns_the_data_and_saves_an_adapter(sft_run):
    folder, trainer = Path(sft_run["run_folder"]), sft_run["trainer"]
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == presets.paths()["model"]
    # The held-out loss of base + adapter is below the base model's own on the same rows.
    with trainer.model.disable_adapter():
        base_loss = trainer.evaluate()["eval_loss"]
    assert sft_run["metrics"]["eval_loss"] < base_loss - 0.005
    saved = json.loads((folder / "alignkit_config.json").read_text())
    assert saved["preset"] == "tiny" and saved["model_id"] == presets.paths()["model"]
    # Where the held-out rows came from, and how many: the card names it (a TRL line's dataset_test_split auto
    # was recorded as "auto", whichever it resolved to).
    held = len(sft_run["eval_data"])  # the tiny preset's data is one file: no split to name
    assert saved["held_out"] == {"share": saved["eval_split"], "of": None, "rows": held}
    assert f"| held-out rows | {held} (a {saved['eval_split']} share of the training rows) |" in \
        (folder / "README.md").read_text()


def test_dpo_from_the_sft_adapter_trains_a_new_adapter_on_top(sft_run, dpo_run):
    folder, trainer = Path(dpo_run["run_folder"]), dpo_run["trainer"]
    # The SFT adapter was loaded frozen under the new one, and the new adapter records it as its base.
    assert trainer.frozen_adapters == ["frozen_0"]
    config = json.loads((folder / "adapter_config.json").read_text())
    # Recorded relative to the new adapter, so the two can be moved together (tests/test_trust.py).
    assert config["base_model_name_or_path"] == os.path.relpath(Path(sft_run["run_folder"]).resolve(), folder.resolve())
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "frozen_0" in n)
    # Held-out reward accuracy: chance is 0.5 (and at step 0, with policy == reference, it is 0).
    assert dpo_run["metrics"]["eval_rewards/accuracies"] > 0.8
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.015


def test_reference_is_the_sft_model_not_the_base(sft_run, dpo_run):
    trainer = dpo_run["trainer"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    sft = load_model(ModelSettings(model_id=str(sft_run["run_folder"]), quantization="none")).model
    with torch.no_grad():
        with reference_mode(model, trainer.frozen_adapters):
            reference = model(input_ids=ids).logits
        policy = model(input_ids=ids).logits
        expected = sft(input_ids=ids).logits
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the trained adapter does change the model


def test_reference_adapters_pick_an_earlier_model_of_the_chain_as_the_reference(sft_run, dpo_run, tmp_path):
    """DPO on top of base -> SFT -> DPO with --reference_adapters 1: the reference is base + SFT (rlaif.py's
    `--reference start`), while the policy carries the whole chain; 0 is the bare base."""
    import warnings

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        run = run_script("dpo.py", "--preset", "tiny", "--model_id", str(dpo_run["run_folder"]), "--max_steps", "2",
                         "--reference_adapters", "1", "--output_dir", str(tmp_path), "--run_name", "ref1")
    trainer = run["trainer"]
    assert trainer.frozen_adapters == ["frozen_0", "frozen_1"] and trainer.reference_adapters == ["frozen_0"]
    # The DPO adapter records its base relative to itself (../tiny-sft); PEFT read that from the folder the run was in
    # at every checkpoint save, for the base's vocabulary, and warned that it found no config there (the rlaif audit
    # of session 31). In memory every frozen adapter names the base model, where it is.
    configs = trainer.accelerator.unwrap_model(trainer.model).peft_config
    assert {configs[f].base_model_name_or_path for f in ("frozen_0", "frozen_1")} == {
        str(Path(presets.paths()["model"]).resolve())}
    assert not [w for w in warned if "Could not find a config file" in str(w.message)]
    assert list(tmp_path.glob("ref1/checkpoint-*/frozen_1"))  # a checkpoint saved them
    batch = next(iter(trainer.get_eval_dataloader()))
    sft = load_model(ModelSettings(model_id=str(sft_run["run_folder"]), quantization="none")).model
    ids = batch["input_ids"][:, :5]
    with torch.no_grad():
        chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
        expected = sft(input_ids=ids).logits
        with reference_mode(trainer.model, trainer.frozen_adapters, trainer.reference_adapters):
            reference = trainer.model(input_ids=ids).logits
    assert torch.allclose(reference, expected, atol=1e-5)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "frozen_" in n)
    trainer.reference_adapters = trainer.frozen_adapters  # the default: the whole chain the run starts from
    with torch.no_grad():
        whole, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    assert not torch.allclose(chosen, whole, atol=1e-4)  # the DPO adapter of the chain does count by default
    with pytest.raises(ConfigError, match="--reference_adapters 3"):
        run_script("dpo.py", "--preset", "tiny", "--model_id", str(dpo_run["run_folder"]), "--max_steps", "1",
                   "--reference_adapters", "3", "--output_dir", str(tmp_path), "--run_name", "ref3")


def test_a_bare_base_reference_pass_leaves_the_loaded_adapters_frozen(dpo_run):
    """--reference_adapters 0: the pass runs with every adapter off, and peft's enable_adapters marks each active
    adapter trainable when they come back on; the loaded (SFT) adapter must stay frozen, or it gets gradients and
    counts in the gradient-norm clipping."""
    model = dpo_run["model"]  # the PeftModel: the SFT adapter frozen under the trained one
    with reference_mode(model, ["frozen_0"], []):
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    frozen = [p.requires_grad for n, p in model.named_parameters() if ".frozen_0." in n]
    trained = [p.requires_grad for n, p in model.named_parameters() if ".default." in n]
    assert frozen and not any(frozen) and trained and all(trained)


def test_dpo_preset_makes_the_model_follow_the_rule_more_often(tiny_cache, tmp_path):
    run = run_script("dpo.py", "--preset", "tiny", "--output_dir", str(tmp_path))
    assert run["metrics"]["eval_rewards/accuracies"] > 0.8
    before, after = rule_score(presets.paths()["model"]), rule_score(str(run["run_folder"]))
    assert after > before + 0.03, (before, after)


def test_qlora_4bit_dpo_trains_on_the_cpu(tiny_cache, tmp_path):
    import bitsandbytes as bnb

    run = run_script("dpo.py", "--preset", "tiny", "--quantization", "4bit", "--max_steps", "30",
                     "--output_dir", str(tmp_path), "--run_name", "qlora")
    model = run["trainer"].accelerator.unwrap_model(run["trainer"].model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.is_loaded_in_4bit
    assert run["metrics"]["eval_rewards/accuracies"] > 0.7
    assert (Path(run["run_folder"]) / "adapter_model.safetensors").is_file()


def test_resume_after_a_killed_run_matches_an_uninterrupted_one(tiny_cache, tmp_path):
    """Stopped by a SIGTERM (a scheduler's stop) just after its checkpoint at step 20, the run saves the step under
    way as a checkpoint and says so (it died where it stood, leaving steps 21- to train again); the same command
    resumes from that step and ends where the straight run does."""
    from alignkit.core.errors import EXIT_TERMINATED, INTERRUPTED

    args = ["--preset", "tiny", "--max_steps", "60", "--save_steps", "20", "--output_dir", str(tmp_path)]
    env = {**os.environ, "ALIGNKIT_CACHE": str(tiny_cache)}
    env.pop("WORLD_SIZE", None)
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a pipe nobody reads until the end could fill and block it
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "dpo.py", *args, "--run_name", "killed"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while not (run / "checkpoint-20" / "trainer_state.json").is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == EXIT_TERMINATED, err
    assert not (run / "adapter_model.safetensors").is_file()  # it really stopped before the end
    saved = max(int(c.name.rsplit("-", 1)[1]) for c in run.glob("checkpoint-*"))
    assert 20 < saved < 40 and f"SIGTERM: saving step {saved} as a checkpoint" in err, err
    assert (run / "alignkit_failed.txt").read_text().startswith(f"Terminated: SIGTERM at step {saved}")
    # One line says what is kept and how to go on (the script's generic "interrupted" line said it again)
    assert "the run was stopped (SIGTERM); its checkpoints stay in" in err.strip().splitlines()[-1]
    assert INTERRUPTED not in err

    resumed = run_script("dpo.py", *args, "--run_name", "killed")
    assert resumed["resume_from"].endswith(f"checkpoint-{saved}")
    straight = run_script("dpo.py", *args, "--run_name", "straight")
    assert resumed["trainer"].state.global_step == straight["trainer"].state.global_step == 60
    # Same trajectory up to float noise (CPU kernels may sum in another order from one process to the next).
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], rel=2e-2, abs=1e-3), key
    # train_loss is the whole run's mean (transformers' summary is the mean over the resumed steps only).
    assert resumed["metrics"]["train_loss"] == pytest.approx(straight["metrics"]["train_loss"], rel=2e-2)
    # TRL's count of the tokens trained goes on from the checkpoint's (it started again at 0: the card and
    # metrics.json reported the resumed steps' tokens only).
    def tokens(run):
        return [e["num_tokens"] for e in run["trainer"].state.log_history if "num_tokens" in e][-1]

    assert tokens(resumed) == tokens(straight) > 0
    assert resumed["metrics"]["eval_num_tokens"] == straight["metrics"]["eval_num_tokens"]


def test_a_run_with_other_settings_does_not_resume_from_this_one(tiny_cache, tmp_path, capfd):
    common = ["--preset", "tiny", "--max_steps", "10", "--save_steps", "5", "--output_dir", str(tmp_path),
              "--run_name", "same-name"]
    from alignkit.modeling.identity import chain_identity

    run_script("dpo.py", *common)
    run = tmp_path / "same-name"
    adapter, metrics = (run / "adapter_model.safetensors").read_bytes(), (run / "metrics.json").read_text()
    picture = (run / "training.png").read_bytes()
    identity = chain_identity(str(run))
    # The same command again: it resumes at step 10 of 10 (mid-epoch), where transformers trained one more step.
    capfd.readouterr()
    again = run_script("dpo.py", *common)
    assert again["resume_from"].endswith("checkpoint-10") and again["trainer"].state.global_step == 10
    said = "".join(capfd.readouterr())
    assert "train_runtime" not in said  # TRL's summary of no step (train_loss 0.0) not shown
    # The finished run's picture stays (redrawn from the checkpoint's history, it lost the final held-out points),
    # and the summary gives the run's own wall time (it said 0m 00s).
    runtime = json.loads(metrics)["train_runtime"]
    assert (run / "training.png").read_bytes() == picture
    assert re.search(rf"steps\s+10 in {int(round(runtime)) // 60}m {int(round(runtime)) % 60:02d}s", said), said
    assert (run / "adapter_model.safetensors").read_bytes() == adapter
    assert again["metrics"]["global_step"] == 10
    # Its metrics stay the finished run's (rewritten, they said train_loss 0.0 from TRL's summary of no step), so
    # the model is the same model to every cache and to rlaif.py's rounds over it.
    assert (run / "metrics.json").read_text() == metrics and json.loads(metrics)["train_loss"] > 0
    assert chain_identity(str(run)) == identity
    # Killed after its last checkpoint, before it wrote metrics.json: the rerun trains no step and writes the
    # run's own figures (TRL's summary of no step says train_loss 0.0).
    (run / "metrics.json").unlink()
    run_script("dpo.py", *common)
    assert json.loads((run / "metrics.json").read_text())["train_loss"] == pytest.approx(
        json.loads(metrics)["train_loss"], rel=1e-3)
    changed = run_script("dpo.py", *common, "--dpo_beta", "0.3")
    assert changed["resume_from"] is None
    assert list(tmp_path.glob("same-name.previous-*"))  # the earlier run was moved aside, not lost


def test_dpo_losses_match_the_formula_on_a_real_batch(tiny_cache, tmp_path):
    """The trainer's cDPO loss equals -(1-e)logsig(b*h) - e*logsig(-b*h) from log-probs computed here."""
    beta, eps = 0.3, 0.2
    run = run_script("dpo.py", "--preset", "tiny", "--max_steps", "3", "--loss_type", "sigmoid",
                     "--dpo_beta", str(beta), "--label_smoothing", str(eps), "--output_dir", str(tmp_path),
                     "--run_name", "cdpo")
    trainer = run["trainer"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = next(iter(trainer.get_eval_dataloader()))
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()

        def summed_logps():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            token = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            return (token * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)

        pc, pr = summed_logps()
        with reference_mode(model, trainer.frozen_adapters):
            rc, rr = summed_logps()
    h = (pc - pr) - (rc - rr)
    assert h.abs().max() > 1e-3  # the adapter moved, so the check is not at h = 0
    F = torch.nn.functional
    expected = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("flags", [["--loss_type", "ipo", "--dpo_beta", "0.5"],
                                   ["--loss_type", "hinge"],
                                   ["--loss_type", "sigmoid,sft", "--loss_weights", "1,0.5"]])
def test_other_loss_types_run(tiny_cache, tmp_path, flags):
    run = run_script("dpo.py", "--preset", "tiny", "--max_steps", "3", "--eval_split", "0",
                     "--output_dir", str(tmp_path), *flags)
    assert run["trainer"].state.global_step == 3
    assert run["trainer"].own_loss == (flags[1] == "ipo")


def test_label_smoothing_with_trl_losses_is_refused(tiny_cache, tmp_path):
    with pytest.raises(ValueError, match="ignores label smoothing"):
        run_script("dpo.py", "--preset", "tiny", "--max_steps", "1", "--loss_type", "sigmoid,hinge",
                   "--label_smoothing", "0.1", "--output_dir", str(tmp_path))
    assert not list(tmp_path.iterdir())  # the refused run left no folder behind


def test_merge_adaptors_writes_a_model_with_the_same_logits(dpo_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run = run_script("dpo.py", "--preset", "tiny", "--model_id", str(dpo_run["settings"].model_id), "--max_steps",
                     "5", "--merge_adaptors", "--output_dir", str(tmp_path), "--run_name", "merge")
    folder = Path(run["run_folder"])
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged")
    stacked = load_model(ModelSettings(model_id=str(folder), quantization="none")).model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, stacked(input_ids=ids).logits, atol=1e-4)


def test_no_secret_reaches_a_written_file(tiny_cache, tmp_path, monkeypatch):
    secrets = {"HF_TOKEN": "hf_FAKEtokenVALUE1234567", "WANDB_API_KEY": "wandbFAKEkey98765432",
               "OPENAI_API_KEY": "sk-FAKEopenaiKEY1234567"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    run_script("sft.py", "--preset", "tiny", "--max_steps", "2", "--report_to", "none", "--merge_adaptors",
               "--output_dir", str(tmp_path), "--run_name", "secrets")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 5
    for path in written:
        data = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in data, f"{value} leaked into {path}"


def test_wandb_without_a_key_fails_fast_instead_of_prompting(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ValueError, match="WANDB_API_KEY"):
        run_script("dpo.py", "--preset", "tiny", "--wandb_project", "p", "--output_dir", str(tmp_path))


def test_push_without_a_token_fails_before_any_work(tiny_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached login token
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online (offline, that is said first: a token would not help)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        run_script("dpo.py", "--preset", "tiny", "--push_to_hub", "--merge_adaptors", "--hub_repo_id", "me/x",
                   "--output_dir", str(tmp_path))  # merged: the local base is no refusal of its own
    assert not (tmp_path / "tiny-dpo").exists()  # no run folder was even made
