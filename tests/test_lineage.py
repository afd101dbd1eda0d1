"""What a run trained over (alignkit.modeling.lineage): an adapter whose part below was trained again in place is
refused before its weights load; the same weights again, files added since and a chain moved still load."""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import pytest

from alignkit.core.args import ConfigError
from alignkit.core.config import DPOSettings, ModelSettings
from alignkit.core.errors import UserError
from alignkit.modeling import lineage, presets
from alignkit.modeling.chain import resolve

from conftest import run_script
from test_identity import retrain


def _settings(model_id) -> ModelSettings:
    return ModelSettings(model_id=str(model_id), dtype="fp32", attn_implementation="eager", use_liger="false")


def _copy_chain(sft_run, dpo_run, into: Path) -> tuple[Path, Path]:
    """The session's SFT and DPO run folders copied at the same places relative to each other."""
    sft_folder, dpo_folder = Path(sft_run["run_folder"]).resolve(), Path(dpo_run["run_folder"]).resolve()
    root = Path(os.path.commonpath([sft_folder, dpo_folder]))
    sft, dpo = (into / p.relative_to(root) for p in (sft_folder, dpo_folder))
    for source, target in ((sft_folder, sft), (dpo_folder, dpo)):
        shutil.copytree(source, target)
    return sft, dpo


def test_an_adapter_over_a_part_retrained_in_place_is_refused_before_its_weights_load(sft_run, dpo_run, tmp_path):
    """SFT trained again in its folder (the earlier run moved aside as NAME.previous-TIME) would load under the
    DPO adapter unnoticed; the record refuses it in one line naming where the earlier SFT went."""
    from alignkit.modeling.models import load_model

    record = json.loads((Path(dpo_run["run_folder"]) / lineage.RUN_CONFIG).read_text())[lineage.TRAINED_OVER]
    recorded = {Path(entry["absolute"]) for entry in record}
    assert Path(sft_run["run_folder"]).resolve() in recorded and Path(presets.paths()["model"]).resolve() in recorded
    sft, dpo = _copy_chain(sft_run, dpo_run, tmp_path)  # a chain copied whole keeps its record (relative paths)

    (sft / "README.md").write_text("a new card")  # files no loader reads, and files added since, do not count
    (sft / "merged").mkdir()
    for record_file in ("alignkit_config.json", "metrics.json", "merge.json", "trainer_state.json", "optimizer.pt"):
        (sft / record_file).write_text("{}")  # a run's records and training state: the same weights, the same model
    assert load_model(_settings(dpo)).adapters

    earlier = sft.parent / f"{sft.name}.previous-20261204-020000"
    shutil.copytree(sft, earlier)  # run_folder moves the earlier run aside, then trains the new one in its place
    retrain(sft / "adapter_model.safetensors", b"x" * (sft / "adapter_model.safetensors").stat().st_size)
    with pytest.raises(UserError) as refused:
        load_model(_settings(dpo))
    message = str(refused.value)
    assert "\n" not in message and f"{dpo} was trained over {sft}" in message and "adapter_model.safetensors" in \
        message and f"(it is in {earlier})" in message
    # merge.py's --base_model replaces the recorded base: the adapters below are still checked.
    with pytest.raises(UserError, match="was trained over"):
        load_model(_settings(dpo), base_model=presets.paths()["model"])
    # --resume true would train the run's checkpoints on over the new SFT: refused (auto starts over by itself).
    from alignkit.train.run_folder import prepare_run

    resume = DPOSettings(model_id=str(sft), output_dir=str(dpo.parent), run_name=dpo.name, resume="true",
                         report_to="none")
    with pytest.raises(ConfigError, match=r"--resume true: .*checkpoints were trained over .*adapter_model"):
        prepare_run(resume, "dpo")


def test_evaluations_refuse_a_changed_chain_before_any_model_runs(sft_run, dpo_run, tmp_path, monkeypatch):
    """evaluate.py pairwise, alpaca_eval and lm_eval refused the DPO adapter over a retrained SFT only when they
    came to load it, after the SFT model had answered every prompt (hours on a 7B)."""
    from alignkit.modeling import generation

    sft, dpo = _copy_chain(sft_run, dpo_run, tmp_path)
    retrain(sft / "adapter_model.safetensors", b"x" * (sft / "adapter_model.safetensors").stat().st_size)
    monkeypatch.setattr(generation, "load_generator", lambda *a, **k: pytest.fail("a model ran before the check"))
    for command in (["pairwise", "--preset", "tiny", "--models", f"sft={sft}", f"dpo={dpo}"],
                    ["alpaca_eval", "--preset", "tiny", "--reference_model", str(sft), "--model_id", str(dpo)]):
        with pytest.raises(UserError, match=rf"^{re.escape(str(dpo))} was trained over {re.escape(str(sft))}"):
            run_script("evaluate.py", *command, "--output_dir", str(tmp_path / command[0]))
        assert not list((tmp_path / command[0]).rglob("*.jsonl"))
    # vibes (the first model answered, then the second was refused) and label.py's two generators (found by an
    # audit): over an SFT retrained for real (other weights, a whole file), which loads
    from safetensors.torch import load_file, save_file

    sft, dpo = _copy_chain(sft_run, dpo_run, tmp_path / "real")
    weights = load_file(sft / "adapter_model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, sft / "adapter_model.safetensors")
    for script, command in (("evaluate.py", ["vibes", "--model_id", str(sft), "--compare_to", str(dpo), "--prompts",
                                             "Hi"]),
                            ("label.py", ["--preset", "tiny", "--num_samples", "0", "--model_a", str(sft),
                                          "--model_b", str(dpo), "--output", str(tmp_path / "label" / "pairs.jsonl")])):
        with pytest.raises(UserError, match=rf"^{re.escape(str(dpo))} was trained over {re.escape(str(sft))}"):
            run_script(script, *command)


def test_the_same_adapter_trained_twice_saves_the_same_config(sft_run, dpo_run):
    """PEFT keeps target_modules as a set and saved it in the set's order, which changes with each process's hash
    seed: an SFT run rerun with the same settings was another SFT to every record of it (and to --resume auto)."""
    for folder in (Path(sft_run["run_folder"]), *Path(dpo_run["run_folder"]).glob("checkpoint-*")):
        targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
        assert isinstance(targets, list) and targets == sorted(targets) and len(targets) > 1, folder


def test_a_run_records_the_chain_it_loaded_and_finds_it_moved(tiny_cache, tmp_path):
    """The record is what the loader loaded (a folder changed between the load and the claim, in a notebook, is
    not what was trained), under both the relative and the absolute path: an adapter copied away from a local base
    it names by absolute path still checks that base."""
    loaded = tmp_path / "loaded"
    shutil.copytree(presets.paths()["model"], loaded)
    before = lineage.folder_files(loaded)
    lineage.remember_loaded(resolve(str(loaded)))
    retrain(loaded / "model.safetensors", b"y" * (loaded / "model.safetensors").stat().st_size)
    (entry,) = lineage.trained_over(str(loaded), None, None, tmp_path / "run")
    assert entry == {"path": "../loaded", "absolute": str(loaded.resolve()), "files": before}
    lineage._LOADED.clear()

    base = tmp_path / "base"
    shutil.copytree(presets.paths()["model"], base)
    run = run_script("sft.py", "--preset", "tiny", "--model_id", str(base), "--max_steps", "1", "--eval_split", "0",
                     "--output_dir", str(tmp_path / "runs"), "--run_name", "sft", "--report_to", "none")
    moved = tmp_path / "elsewhere" / "deeper" / "sft"
    shutil.copytree(run["run_folder"], moved)  # the adapter alone, to another depth: it names its base absolutely
    retrain(base / "model.safetensors", b"z" * (base / "model.safetensors").stat().st_size)
    with pytest.raises(UserError, match=f"{moved} was trained over {base}, which has changed since"):
        lineage.check_trained_over(resolve(str(moved)))


def test_merge_add_delta_refuses_a_delta_over_a_part_retrained_in_place(tmp_path):
    """merge.py --add_delta read both deltas' files and summed them without a word."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (base / "model.safetensors").write_bytes(b"base weights")
    deltas = []
    for name in ("task_a", "task_b"):
        delta = tmp_path / name
        delta.mkdir()
        (delta / "lota_config.json").write_text(json.dumps({"lota": True, "base_model_name_or_path": str(base)}))
        (delta / "lota_delta.safetensors").write_bytes(b"delta")
        below = lineage.trained_over(str(base), None, None, delta)
        (delta / lineage.RUN_CONFIG).write_text(json.dumps({lineage.TRAINED_OVER: below}))
        deltas.append(delta)
    retrain(base / "model.safetensors", b"base weighs2")
    with pytest.raises(UserError, match=f"{deltas[0]} was trained over {base}, which has changed since"):
        run_script("merge.py", "--adapter_dir", str(deltas[0]), "--add_delta", str(deltas[1]),
                   "--output_dir", str(tmp_path / "sum"))


def test_merge_base_model_takes_a_moved_base_checked_by_content(sft_run, dpo_run, tmp_path, alignkit_log):
    """merge.py --base_model is for a base that moved; the chain was refused before the flag was read ("not there
    ... merge.py: --base_model"), and a base of other weights would have merged without a word. It is checked
    against the runs' record of the base they trained over; an adapter gone from the middle of the chain is
    refused, not left out."""
    sft, dpo = _copy_chain(sft_run, dpo_run, tmp_path / "runs")
    base = Path(presets.paths()["model"]).resolve()
    moved = tmp_path / "moved-base"
    shutil.copytree(base, moved)
    config = json.loads((sft / "adapter_config.json").read_text())
    (sft / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=r"names its base .*gone.*which is not there.*merge\.py: --base_model"):
        run_script("merge.py", "--adapter_dir", str(dpo), "--output_dir", str(tmp_path / "no"))
    run = run_script("merge.py", "--adapter_dir", str(dpo), "--base_model", str(moved), "--output_dir",
                     str(tmp_path / "merged"))
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["base_model"] == str(moved)
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["adapters"] == [str(sft), str(dpo)], run

    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    retrain(other / "model.safetensors", b"y" * (other / "model.safetensors").stat().st_size)
    with pytest.raises(UserError) as refused:
        run_script("merge.py", "--adapter_dir", str(dpo), "--base_model", str(other), "--output_dir",
                   str(tmp_path / "other"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--base_model {other} is not the base ") and \
        f"({base}: model.safetensors differs)" in message and "base_model_name_or_path in" in message
    assert not (tmp_path / "other").exists()

    # The SFT adapter moved too, and DPO's base_model_name_or_path pointed at it: the chain is whole, by content.
    dpo_config = (dpo / "adapter_config.json").read_text()
    moved_sft = tmp_path / "elsewhere" / "sft"
    shutil.move(str(sft), str(moved_sft))
    (dpo / "adapter_config.json").write_text(json.dumps({**json.loads(dpo_config),
                                                         "base_model_name_or_path": str(moved_sft)}))
    run_script("merge.py", "--adapter_dir", str(dpo), "--base_model", str(moved), "--output_dir",
               str(tmp_path / "merged-again"))
    shutil.move(str(moved_sft), str(sft))
    (dpo / "adapter_config.json").write_text(dpo_config)

    shutil.rmtree(sft)  # the SFT adapter gone: --base_model must not quietly merge DPO alone onto the base
    with pytest.raises(UserError, match=rf"{re.escape(str(dpo))} was trained over {re.escape(str(sft))}, an adapter, "
                                        r"which is gone: --base_model .* would leave it out of the model"):
        run_script("merge.py", "--adapter_dir", str(dpo), "--base_model", str(moved), "--output_dir",
                   str(tmp_path / "alone"))
    # Without the record (a plain PEFT adapter, or a run saved before alignkit kept it) nothing tells whether the
    # folder its config names was the base or an adapter: the merge goes on as asked, and the log says what it did.
    settings = json.loads((dpo / "alignkit_config.json").read_text())
    (dpo / "alignkit_config.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "trained_over"}))
    alignkit_log.clear()
    run_script("merge.py", "--adapter_dir", str(dpo), "--base_model", str(moved), "--output_dir",
               str(tmp_path / "alone"))
    (line,) = [r.getMessage() for r in alignkit_log.records if "stands in for it unchecked" in r.getMessage()]
    assert line.startswith(f"{dpo} names {str(sft)!r} as its base and records no model it was trained over") and \
        line.endswith("if that was an adapter (a chain), it is left out of the model")
    # A run over a Hub base records nothing local (trained_over: []): it is a record, and no warning (the main use of
    # --base_model: a local copy of the Hub base).
    from alignkit.modeling.chain import Chain
    from alignkit.modeling.lineage import check_trained_over

    (dpo / "alignkit_config.json").write_text(json.dumps({**settings, "trained_over": []}))
    alignkit_log.clear()
    check_trained_over(Chain("org/base", None, [str(dpo)], [], {}), base_model=str(moved))
    assert "unchecked" not in alignkit_log.text
