"""merge.py and the Hub push: merged logits equal the adapters', QLoRA merges, the upload, no secrets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.core import errors
from alignkit.core.config import ModelSettings
from alignkit.core.errors import UserError
from alignkit.modeling import merge as merge_module
from alignkit.modeling.models import load_model

from conftest import run_script

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def fake_hub(monkeypatch, hub_answers):
    """HfApi at its boundary: record create_repo and upload_folder, with the files as they are at upload time."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kw):
        calls["create_repo"] = dict(repo_id=repo_id, private=private, repo_type=repo_type, token=self.token)
        # as the Hub answers: a bare name lands in the token's namespace
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, folder_path, repo_id, repo_type=None, ignore_patterns=None, delete_patterns=None, **kw):
        import fnmatch

        root = Path(folder_path)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        kept = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns or [])]
        calls["upload_folder"] = dict(repo_id=repo_id, repo_type=repo_type, files=kept, root=root,
                                      delete_patterns=delete_patterns)
        return "commit"

    def repo_info(self, repo_id, repo_type=None, **kw):  # an existing repo keeps its visibility
        return type("Info", (), {"private": calls.get("existing_private", calls["create_repo"]["private"])})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtokenForTests123456")
    return calls


def test_merged_chain_reloads_from_disk_with_the_same_logits(dpo_run, sft_run, tmp_path):
    out = tmp_path / "merged"
    import os

    # A relative --adapter_dir, from another folder: merge.json records where each part is, and the card names
    # each local part alike (it showed the top one as given, `../../runs/tiny-dpo`, the one below as `.../tiny-sft`).
    relative = os.path.relpath(dpo_run["run_folder"], tmp_path)
    run_script("merge.py", "--adapter_dir", relative, "--output_dir", "merged", cwd=tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(out)
    stacked = load_model(ModelSettings(model_id=str(dpo_run["run_folder"]), quantization="none")).model
    assert torch.allclose(logits(merged), logits(stacked), atol=1e-4)
    # Not a no-op: the merged model is not the base.
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "merge.json").read_text())["base_model"])
    assert not torch.allclose(logits(merged), logits(base), atol=1e-3)
    # Both adapters of the chain, in order.
    assert json.loads((out / "merge.json").read_text())["adapters"] == [str(Path(sft_run["run_folder"]).resolve()),
                                                                         str(Path(dpo_run["run_folder"]).resolve())]
    # A merged model has its card without a push too (it had none): what it was merged from, with the run's stage.
    card = (out / "README.md").read_text()
    assert "Merged into the base:" in card and "DPO" in card and str(out) not in card
    assert (f"Merged into the base: `.../{Path(sft_run['run_folder']).name}` -> "
            f"`.../{Path(dpo_run['run_folder']).name}`") in card and "../" not in card.replace(".../", "")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.pad_token != tok.eos_token
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id and generation["pad_token_id"] == tok.pad_token_id


def test_a_checkpoint_of_a_run_on_an_adapter_is_the_whole_chain(dpo_run, sft_run, tmp_path):
    """A checkpoint of dpo.py on the SFT adapter (checkpoint-N) names the bare base in its adapter_config.json and
    keeps the SFT adapter in its frozen_0 subfolder. Loaded, merged or evaluated, it is base + SFT + DPO (before:
    base + DPO, the SFT adapter silently left out); the last checkpoint is the finished run's model."""
    from alignkit.modeling import chain, identity

    run = Path(dpo_run["run_folder"])
    last = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert last.name == f"checkpoint-{dpo_run['trainer'].state.global_step}"
    assert chain.resolve(str(last)).adapters == [str(last / "frozen_0"), str(last)]
    assert chain.resolve(str(last)).base == chain.resolve(str(run)).base
    at = lambda source: logits(load_model(ModelSettings(model_id=str(source), quantization="none")).model)  # noqa: E731
    from_checkpoint, finished, sft = at(last), at(run), at(sft_run["run_folder"])
    assert torch.allclose(from_checkpoint, finished, atol=1e-5)
    assert not torch.allclose(from_checkpoint, sft, atol=1e-3)  # the DPO adapter is on too
    # Its identity counts the frozen copy's files, so a cache never confuses it with the DPO adapter alone.
    assert len(identity.chain_identity(str(last))) == 3  # the checkpoint, its frozen_0 and the base
    # Merged, it keeps its run's settings (the card's stage; a reward model's rows) and its own figures at its step
    # from its trainer_state.json (before: none), not the finished run's metrics.
    merge_module.merge_adapters(str(last), tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "alignkit_config.json").read_text())["run_type"] == "dpo"
    metrics = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    logged = json.loads((last / "trainer_state.json").read_text())["log_history"]
    assert metrics["checkpoint"] == last.name and metrics["global_step"] == dpo_run["trainer"].state.global_step
    assert metrics["loss"] == [e for e in logged if "loss" in e][-1]["loss"]
    assert "train_runtime" not in metrics  # the finished run's summary is not the checkpoint's
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"## Metrics at {last.name}" in card and "Final metrics" not in card and "DPO" in card


def test_a_merge_replaces_its_output_whole_and_a_killed_one_leaves_the_earlier_merge_as_it_was(
        sft_run, dpo_run, tmp_path, monkeypatch, alignkit_log):
    """merge_adapters wrote straight into --output_dir: a kill mid-write left the new weights under the earlier
    merge.json and card (a folder that loads as another model than it says). It now writes beside the folder and
    puts the result in place whole; a folder holding anything else is never replaced: a merge into a merged
    folder removed the user's notes there, and the evaluations recorded for the model there since (by suffix, any
    .txt or .json was a merge's)."""
    from alignkit.core.card import record_evaluation

    out = tmp_path / "m1"
    merge_module.merge_adapters(str(sft_run["run_folder"]), out)
    record = json.loads((out / "merge.json").read_text())
    assert "model.safetensors" in record["files"] and "README.md" in record["files"]
    (out / "model-00002-of-00002.safetensors").write_text("a shard an earlier merge wrote, which this one did not")
    (out / "merge.json").write_text(json.dumps({**record, "files": [*record["files"],
                                                                    "model-00002-of-00002.safetensors"]}))
    merge_module.merge_adapters(str(sft_run["run_folder"]), out)
    assert not (out / "model-00002-of-00002.safetensors").exists()
    (out / "my_notes.txt").write_text("mine")
    record_evaluation(out, "mt_bench", {"score": 7.5})
    with pytest.raises(merge_module.UserError, match=r"^--output_dir .*m1 holds my_notes.txt, alignkit_evals.json "
                                                     r"\(evaluations recorded since the merge\), which its merge did "
                                                     r"not write, and the merge replaces the folder whole: move them "
                                                     r"out, or pass another --output_dir$"):
        merge_module.merge_adapters(str(sft_run["run_folder"]), out)
    assert (out / "my_notes.txt").read_text() == "mine"
    (out / "my_notes.txt").unlink()
    (out / "alignkit_evals.json").unlink()
    merge_module.merge_adapters(str(sft_run["run_folder"]), out)
    weights = (out / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module.shutil, "copy", killed)  # after the weights, before merge.json
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge_adapters(str(dpo_run["run_folder"]), out)
    assert (out / "model.safetensors").read_bytes() == weights  # the earlier merge, whole
    # The partial folder (a whole model's size) is removed on the way out, not left until the next merge; a merge
    # never resumes, so its line says so instead of the generic "what was finished is kept; ... goes on from there".
    assert [p.name for p in tmp_path.iterdir()] == ["m1"]
    assert f"the merge was interrupted, and a merge does not resume: nothing of it is kept (its partial folder is " \
           f"removed); the earlier merge in {out} is kept as it was; run the same command again to merge again" \
           in alignkit_log.text
    assert errors._SAID_HOW_TO_GO_ON  # the script's generic interrupted line is not said a second time
    errors._SAID_HOW_TO_GO_ON.clear()
    assert json.loads((out / "merge.json").read_text())["adapters"] == [str(sft_run["run_folder"])]
    monkeypatch.undo()
    merge_module.merge_adapters(str(dpo_run["run_folder"]), out)  # the next merge clears what was cut short
    assert json.loads((out / "merge.json").read_text())["adapters"][-1] == str(dpo_run["run_folder"])
    assert [p.name for p in tmp_path.iterdir()] == ["m1"]
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(merge_module.UserError, match="holds other things than a merged model"):
        merge_module.merge_adapters(str(dpo_run["run_folder"]), tmp_path)


def test_an_interrupt_at_any_point_of_the_swap_leaves_one_whole_merge_and_says_which(
        sft_run, dpo_run, tmp_path, monkeypatch, alignkit_log):
    """The swap of a merge into its folder: a Ctrl-C landing between `final -> .final.replaced` and the `try` skipped
    the return of the earlier merge (the folder missing, the next merge deleting the earlier one for good); the card
    was written after the swap, so a Ctrl-C there left the new merge without it; and one after the swap was said to
    have kept nothing of the new merge and the earlier one "as it was". Now the card is written before the swap,
    the renames are one step, a leftover earlier merge goes back in its place, and the line says what is there."""
    from alignkit.core import card

    out = tmp_path / "m1"
    merge_module.merge_adapters(str(sft_run["run_folder"]), out)
    earlier, earlier_card = (out / "model.safetensors").read_bytes(), (out / "README.md").read_text()
    rename, rmtree = Path.rename, shutil.rmtree

    def stopped_line(kept: str) -> str:
        return (f"the merge was interrupted, and a merge does not resume: nothing of it is kept (its partial folder is "
                f"removed); {kept}; run the same command again to merge again")

    def the_earlier_merge_whole():
        assert (out / "model.safetensors").read_bytes() == earlier and (out / "README.md").read_text() == earlier_card
        assert json.loads((out / "merge.json").read_text())["adapters"] == [str(sft_run["run_folder"])]
        assert [p.name for p in tmp_path.iterdir()] == ["m1"]
        assert stopped_line(f"the earlier merge in {out} is kept as it was") in alignkit_log.text
        alignkit_log.clear()
        errors._SAID_HOW_TO_GO_ON.clear()

    def renamed_then_stopped(self, target):  # the Ctrl-C lands just after the earlier merge moved aside
        moved = rename(self, target)
        if self == out:
            raise KeyboardInterrupt
        return moved

    def not_renamed(self, target):  # the new merge's rename into place
        if Path(self).name == ".m1.partial":
            raise KeyboardInterrupt
        return rename(self, target)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    for where, stop in [(Path, ("rename", renamed_then_stopped)), (Path, ("rename", not_renamed)),
                        (card, ("model_card", killed))]:
        monkeypatch.setattr(where, *stop)
        with pytest.raises(KeyboardInterrupt):
            merge_module.merge_adapters(str(dpo_run["run_folder"]), out)
        monkeypatch.undo()
        the_earlier_merge_whole()

    def earlier_removal_stopped(path, *args, **kwargs):  # the swap is done; the earlier merge's removal is cut short
        if Path(path).name == ".m1.replaced" and Path(path).exists():
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(merge_module.shutil, "rmtree", earlier_removal_stopped)
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge_adapters(str(dpo_run["run_folder"]), out)
    monkeypatch.undo()
    assert json.loads((out / "merge.json").read_text())["adapters"][-1] == str(dpo_run["run_folder"])
    assert "DPO" in (out / "README.md").read_text()  # the new merge, with its own card
    assert (tmp_path / ".m1.replaced" / "model.safetensors").read_bytes() == earlier
    assert f"the merge was interrupted after it finished: the new merge is in {out}, whole, with its card; the " \
           f"earlier merge left in {tmp_path / '.m1.replaced'} is removed by the next merge into it" \
           in alignkit_log.text
    assert "nothing of it is kept" not in alignkit_log.text
    alignkit_log.clear()
    errors._SAID_HOW_TO_GO_ON.clear()

    # A merge killed hard (SIGKILL) inside the swap: the earlier merge beside the folder, the folder missing. The next
    # merge puts it back first (it deleted it as a leftover), so that merge stopped in turn leaves it in its place.
    rmtree(out)
    monkeypatch.setattr(merge_module.shutil, "copy", killed)
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge_adapters(str(dpo_run["run_folder"]), out)
    monkeypatch.undo()
    assert "was missing and" in alignkit_log.text and "put back" in alignkit_log.text
    the_earlier_merge_whole()

    # An empty folder stopped into is said to be as it was, not to keep an earlier merge.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(merge_module.shutil, "copy", killed)
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge_adapters(str(dpo_run["run_folder"]), empty)
    monkeypatch.undo()
    assert stopped_line(f"{empty} is as it was (empty)") in alignkit_log.text
    assert "earlier merge" not in alignkit_log.text and not any(empty.iterdir())
    errors._SAID_HOW_TO_GO_ON.clear()


def test_qlora_adapter_merges_both_ways(tiny_cache, tmp_path, alignkit_log):
    run = run_script("dpo.py", "--preset", "tiny", "--quantization", "4bit", "--max_steps", "15",
                     "--eval_split", "0", "--output_dir", str(tmp_path), "--run_name", "qlora")
    adapter = str(run["run_folder"])
    trained = load_model(ModelSettings(model_id=adapter, quantization="4bit")).model  # what was trained
    full = merge_module.merge_adapters(adapter, tmp_path / "full")
    dequantized = merge_module.merge_adapters(adapter, tmp_path / "dequantized", dequantize=True)
    want = logits(trained)
    got_full = logits(AutoModelForCausalLM.from_pretrained(full))
    got_dequantized = logits(AutoModelForCausalLM.from_pretrained(dequantized))
    # --dequantize reproduces the NF4-trained model up to bitsandbytes' kernel arithmetic (~0.06 in the logits
    # here); the full-precision merge is the original base + update, which is further from it (~1.6 here).
    assert (got_dequantized - want).abs().max() < 0.2
    assert (got_full - want).abs().max() > 10 * (got_dequantized - want).abs().max()
    assert json.loads((tmp_path / "dequantized" / "merge.json").read_text())["dequantized_from"] == \
        "4-bit NF4 with double quantization"

    # A run that trained over FP4 without double quantization (--bnb_4bit_quant_type fp4 --use_bnb_nested_quant
    # false, TRL's names) merges into its base rounded to FP4: --dequantize always rounded to NF4, another model.
    fp4_run = tmp_path / "fp4"
    shutil.copytree(adapter, fp4_run)
    config = json.loads((fp4_run / "alignkit_config.json").read_text())
    config.update(bnb_4bit_quant_type="fp4", use_bnb_nested_quant=False)
    (fp4_run / "alignkit_config.json").write_text(json.dumps(config))
    fp4_trained = logits(load_model(ModelSettings(model_id=str(fp4_run), quantization="4bit", bnb_4bit_quant_type="fp4",
                                                  use_bnb_nested_quant=False)).model)
    import bitsandbytes as bnb

    fp4_merged = merge_module.merge_adapters(str(fp4_run), tmp_path / "fp4-merged", dequantize=True)
    got_fp4 = logits(AutoModelForCausalLM.from_pretrained(fp4_merged))
    assert (got_fp4 - fp4_trained).abs().max() < 0.2
    assert (got_fp4 - want).abs().max() > 3 * (got_fp4 - fp4_trained).abs().max()  # NF4 is another base
    assert json.loads((fp4_merged / "merge.json").read_text())["dequantized_from"] == "4-bit FP4"
    assert "dequantized from 4-bit FP4" in (fp4_merged / "README.md").read_text()
    layers = [m for m in load_model(ModelSettings(model_id=str(fp4_run), quantization="4bit", bnb_4bit_quant_type="fp4",
                                                  use_bnb_nested_quant=False)).model.modules()
              if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "fp4" and not m.weight.quant_state.nested for m in layers)
    assert "4-bit weights: 4-bit FP4 (--bnb_4bit_quant_type, --use_bnb_nested_quant)" in alignkit_log.text


def test_a_failed_check_saves_nothing_and_says_by_how_much(dpo_run, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    original = LoraModel.merge_and_unload

    def lossy_merge(self, *args, **kwargs):  # a merge that loses part of the update
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.01)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", lossy_merge)
    # One line (a UserError: it was a RuntimeError's traceback), with what to do meanwhile.
    with pytest.raises(merge_module.UserError, match=r"^merge check failed: merged logits differ from base \+ "
                                                     r"adapters by up to [0-9.e-]+ \(tolerance [0-9.e-]+, in fp32\); "
                                                     r"nothing was saved. The adapter works unmerged"):
        merge_module.merge_adapters(str(dpo_run["run_folder"]), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_push_builds_the_right_upload_with_a_model_card(dpo_run, tmp_path, fake_hub):
    out = tmp_path / "merged"
    run_script("merge.py", "--adapter_dir", str(dpo_run["run_folder"]), "--output_dir", str(out),
               "--push_to_hub", "--hub_repo_id", "me/tiny-dpo")
    assert fake_hub["create_repo"] == dict(repo_id="me/tiny-dpo", private=True, repo_type="model",
                                           token="hf_FAKEtokenForTests123456")
    files = fake_hub["upload_folder"]["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "generation_config.json"} <= set(files)
    card = (out / "README.md").read_text()
    assert "me/tiny-dpo" in card and "eval_rewards/accuracies" in card and "dpo_beta" in card
    # The saved dtype (merge.py's --dtype, fp32 on this CPU) on every device there is, not fp32 on the CPU always.
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-dpo", dtype=torch.float32, device_map="auto")' in card
    assert "hf_FAKEtokenForTests123456" not in card


def test_a_bare_repo_name_or_none_lands_in_the_token_s_namespace(dpo_run, tmp_path, fake_hub, alignkit_log):
    """A recipe's `hub_model_id: zephyr-7b-dpo-full` (no namespace) was uploaded to that bare id, which the Hub
    refuses after the whole run; --push_to_hub alone was refused, where TRL names the repo after the run."""
    out = tmp_path / "merged"
    run_script("merge.py", "--adapter_dir", str(dpo_run["run_folder"]), "--output_dir", str(out),
               "--push_to_hub", "--hub_repo_id", "tiny-dpo-bare")
    assert fake_hub["create_repo"]["repo_id"] == "tiny-dpo-bare" and fake_hub["upload_folder"]["repo_id"] == (
        "me/tiny-dpo-bare")
    assert 'from_pretrained("me/tiny-dpo-bare"' in (out / "README.md").read_text()
    run_script("merge.py", "--adapter_dir", str(dpo_run["run_folder"]), "--output_dir", str(tmp_path / "m2"),
               "--push_to_hub")
    name = Path(dpo_run["run_folder"]).name
    assert fake_hub["upload_folder"]["repo_id"] == f"me/{name}"
    assert f"no --hub_repo_id: pushing to {name} in your account" in alignkit_log.text
    from alignkit.core.run_records import repo_name  # a checkpoint's: its run's name and step, not checkpoint-N

    assert repo_name(tmp_path / "tiny-dpo" / "checkpoint-20") == "tiny-dpo-checkpoint-20"
    assert repo_name(tmp_path / "tiny-dpo") == "tiny-dpo"


def test_public_push_and_adapter_push(sft_run, dpo_run, tmp_path, fake_hub):
    import shutil

    # An adapter whose base is on the Hub (here the tiny base stands in for it under a Hub id).
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_run["run_folder"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "me/tiny-base"}))
    (adapter / "checkpoint-5").mkdir()
    (adapter / "checkpoint-5" / "optimizer.pt").write_text("not for the Hub")
    run_script("merge.py", "--adapter_dir", str(adapter), "--push_to_hub", "--push", "adapter",
               "--hub_repo_id", "me/sft-adapter", "--hub_public")
    assert fake_hub["create_repo"]["private"] is False
    files = fake_hub["upload_folder"]["files"]
    assert "adapter_model.safetensors" in files and "README.md" in files
    assert not any(f.startswith(("checkpoint-", "merged")) for f in files)
    card = (adapter / "README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "base_model: me/tiny-base" in card
    # An adapter on top of a local SFT adapter cannot be loaded by anyone else: refused, with the way out.
    with pytest.raises(ValueError, match="push the merged model"):
        run_script("merge.py", "--adapter_dir", str(dpo_run["run_folder"]), "--push_to_hub", "--push", "adapter",
                   "--hub_repo_id", "me/dpo-adapter")


def test_the_push_advice_for_an_adapter_on_a_local_adapter_walks_the_chain(tmp_path, monkeypatch):
    """An adapter on a local SFT adapter was told to push that adapter first (merge.py --adapter_dir SFT --push
    adapter), which was refused in turn where the SFT adapter stood on a local base too (the merge.py audit)."""
    from alignkit.core.hub import check_pushable

    monkeypatch.chdir(tmp_path)

    def adapter(name, base):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        return tmp_path / name

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    adapter("sft", "../base")
    with pytest.raises(UserError) as refused:
        check_pushable(adapter("dpo", "../sft"))
    said = str(refused.value)
    assert f"a chain over the local model {tmp_path / 'base'}" in said and "--push merged" in said
    assert "--push adapter" not in said and "push that base first" not in said
    # Over a Hub base: the adapters below, from the one on the Hub base up, the first with its command.
    first, middle = adapter("hub-sft", "org/base"), adapter("hub-mid", "../hub-sft")
    with pytest.raises(UserError) as refused:
        check_pushable(adapter("hub-dpo", "../hub-mid"))
    said = str(refused.value)
    assert f"from the base up ({first} then {middle}; the first is on org/base)" in said
    assert f"merge.py --adapter_dir {first} --push_to_hub --push adapter --hub_repo_id you/base" in said


def test_missing_token_fails_before_merging(dpo_run, tmp_path, monkeypatch):
    """Offline, that is said first (a token would not help; it asked for one); online, the missing token."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = ["--adapter_dir", str(dpo_run["run_folder"]), "--output_dir", str(tmp_path / "m"), "--push_to_hub",
            "--hub_repo_id", "me/x"]
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1 is set.*\(HF_HUB_OFFLINE unset, with a token: HF_TOKEN "
                                         r"in the environment or in \.env\)"):  # both fixes at once, not one a run
        run_script("merge.py", *args)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        run_script("merge.py", *args)
    # A token, HF_HUB_OFFLINE not set, and no Hub that answers: the way out said "(HF_HUB_OFFLINE unset)", which it
    # was (found by the merge audit). Only what applies.
    from alignkit.core import sources

    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(sources, "hub_silent", lambda: "the Hub at https://hub.test does not answer (timed out)")
    with pytest.raises(ValueError, match=r"^pushing to the Hub needs the Hub, and the Hub at https://hub\.test does "
                                         r"not answer \(timed out\): run where it answers, or leave out --push_to_hub "
                                         r"and push the result once it does$") as refused:
        run_script("merge.py", *args)
    assert "HF_HUB_OFFLINE" not in str(refused.value)
    assert not (tmp_path / "m").exists()


def test_dpo_merge_and_push_go_through_the_same_module(sft_run, tmp_path, fake_hub, monkeypatch):
    secrets = {"WANDB_API_KEY": "wandbFAKEkey98765432", "OPENAI_API_KEY": "sk-FAKEopenaiKEY1234567"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    run = run_script("dpo.py", "--preset", "tiny", "--model_id", str(sft_run["run_folder"]), "--max_steps", "3",
                     "--report_to", "none", "--merge_adaptors", "--push_to_hub", "--hub_repo_id", "me/pushed",
                     "--output_dir", str(tmp_path), "--run_name", "pushed")
    upload = fake_hub["upload_folder"]
    assert upload["repo_id"] == "me/pushed" and upload["root"] == Path(run["run_folder"]) / "merged"
    assert "model.safetensors" in upload["files"] and "README.md" in upload["files"]
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for value in [*secrets.values(), "hf_FAKEtokenForTests123456"]:
            assert value.encode() not in data, f"{value} leaked into {path}"


def test_a_pushed_checkpoint_keeps_its_trainer_state_and_local_records_home(sft_run, tmp_path, fake_hub,
                                                                           alignkit_log):
    """Found by the merge audit: pushing an adapter from a checkpoint-N folder uploaded its optimizer, RNG and
    trainer state, and training_args.bin with every TrainingArguments field; every push uploaded merge.json and
    alignkit_config.json with local paths; an earlier push of the other kind stayed in the repo (it then loaded as
    base + the old adapter); and an existing repo's visibility was logged as asked, not as it is."""
    import shutil

    checkpoint = tmp_path / "run" / "checkpoint-5"
    shutil.copytree(sft_run["run_folder"], checkpoint, ignore=shutil.ignore_patterns("checkpoint-*", "merged"))
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "me/tiny-base"}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        (checkpoint / name).write_text("trainer state")
    # A merge written inside it (--output_dir .../final), one cut short (.merged.partial/): whole models of their
    # own, with records naming local paths, were uploaded beside the adapter (the patterns matched the top only).
    for sub in ("final", ".merged.partial"):
        (checkpoint / sub).mkdir()
        for name in ("model.safetensors", "config.json", "merge.json", "alignkit_config.json"):
            (checkpoint / sub / name).write_text("a merged model's")
    (checkpoint / "notes").mkdir()
    (checkpoint / "notes" / "trainer_state.json").write_text("trainer state")
    fake_hub["existing_private"] = True  # the repo is there already, private
    run_script("merge.py", "--adapter_dir", str(checkpoint), "--push_to_hub", "--push", "adapter", "--hub_repo_id",
               "me/ck", "--hub_public")
    upload = fake_hub["upload_folder"]
    assert "adapter_model.safetensors" in upload["files"] and "README.md" in upload["files"]
    assert not {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
                "alignkit_config.json", "merge.json"} & set(upload["files"])
    assert not [f for f in upload["files"] if "/" in f], upload["files"]
    assert {"config.json", "*.safetensors", "adapter_config.json"} <= set(upload["delete_patterns"])
    assert "pushed" in alignkit_log.text and "(private)" in alignkit_log.text
    # A checkpoint of a run on top of an adapter names the bare base and keeps the one below in frozen_0: pushed as
    # an adapter, the Hub copy loaded as base + this adapter alone. And a mistyped folder made an empty repo, then
    # a FileNotFoundError traceback.
    shutil.copytree(sft_run["run_folder"], checkpoint / "frozen_0", ignore=shutil.ignore_patterns("checkpoint-*"))
    fake_hub.clear()
    with pytest.raises(UserError, match=r"^.*checkpoint-5 is a checkpoint of a run on top of 1 adapter\(s\) \(its "
                                        r"frozen_0\): pushed as an adapter it would load without them"):
        run_script("merge.py", "--adapter_dir", str(checkpoint), "--push_to_hub", "--push", "adapter",
                   "--hub_repo_id", "me/ck")
    with pytest.raises(UserError, match=r"^.*checkpoint-6 is not there: name a run folder"):
        run_script("merge.py", "--adapter_dir", str(tmp_path / "run" / "checkpoint-6"), "--push_to_hub", "--push",
                   "adapter", "--hub_repo_id", "me/ck")
    assert fake_hub == {}  # no repo made


def test_an_output_dir_that_is_a_file_or_holds_other_things_says_which(tmp_path):
    """--output_dir naming a file was said to hold "other things than a merged model", and a folder of notes was
    refused without naming them, where an earlier merge's refusal names what its merge did not write (the merge.py
    audit of session 93). Checked before the adapter is read: any --adapter_dir does."""
    import re

    file = tmp_path / "model.bin"
    file.write_text("x")
    with pytest.raises(UserError, match=f"^--output_dir {re.escape(str(file))} is a file, not a folder: pass a folder "):
        merge_module.merge_adapters(str(tmp_path / "run"), file)
    notes = tmp_path / "new"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=re.escape(f"--output_dir {notes} holds other things than a merged model "
                                                  "(notes.txt): the merge replaces")):
        merge_module.merge_adapters(str(tmp_path / "run"), notes)
    for name in ("a.txt", "b.txt", "c.txt"):
        (notes / name).write_text("")
    (notes / "runs").mkdir()
    with pytest.raises(UserError, match=re.escape("model (a.txt, b.txt, c.txt and 2 more): ")):
        merge_module.merge_adapters(str(tmp_path / "run"), notes)
    (notes / "merge.json").write_text("{}")  # an earlier merge's: only what a merge does not write
    with pytest.raises(UserError, match=re.escape("model (runs/): ")):
        merge_module.merge_adapters(str(tmp_path / "run"), notes)
    assert file.read_text() == "x" and (notes / "notes.txt").read_text() == "mine"


def test_output_dir_naming_an_adapter_or_a_model_is_refused_not_replaced(dpo_run, sft_run, tmp_path):
    """merge.py --adapter_dir X --output_dir X replaced the adapter folder with its own merge (only file suffixes
    were checked); so would a base model's folder. --dequantize on a run trained on full weights merged into the
    NF4-rounded base, another model, and passed its check."""
    import shutil

    from alignkit.core.errors import UserError

    plain = tmp_path / "plain"
    shutil.copytree(sft_run["run_folder"], plain, ignore=shutil.ignore_patterns("checkpoint-*", "*.png", "merged"))
    before = sorted(p.name for p in plain.iterdir())
    with pytest.raises(UserError, match="holds other things than a merged model"):
        merge_module.merge_adapters(str(plain), plain)
    assert sorted(p.name for p in plain.iterdir()) == before
    base = json.loads((plain / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = tmp_path / "a-model"
    shutil.copytree(Path(plain, base) if not Path(base).is_absolute() else base, model)
    with pytest.raises(UserError, match="holds other things than a merged model"):
        merge_module.merge_adapters(str(plain), model)
    # A folder of data or notes (every file .json, .md or .txt) was taken for a merge cut short, and deleted.
    notes = tmp_path / "notes"
    notes.mkdir()
    for name, text in (("train.json", '{"a": 1}'), ("NOTES.md", "mine"), ("todo.txt", "x")):
        (notes / name).write_text(text)
    with pytest.raises(UserError, match="holds other things than a merged model"):
        merge_module.merge_adapters(str(plain), notes)
    assert sorted(p.name for p in notes.iterdir()) == ["NOTES.md", "todo.txt", "train.json"]
    # What save_pretrained writes beside a merge for some families (a tokenizer's named templates in a subfolder, a
    # tiktoken vocabulary, trust_remote_code's modeling file) made the same merge command refuse its own output.
    again = merge_module.merge_adapters(str(plain), tmp_path / "again")
    (again / "additional_chat_templates").mkdir()
    (again / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    (again / "qwen.tiktoken").write_text("x")
    (again / "modeling_custom.py").write_text("# remote code")
    record = json.loads((again / "merge.json").read_text())  # as a merge of those families records them
    (again / "merge.json").write_text(json.dumps({**record, "files": [
        *record["files"], "additional_chat_templates/tool_use.jinja", "qwen.tiktoken", "modeling_custom.py"]}))
    assert merge_module.merge_adapters(str(plain), again) == again and (again / "merge.json").is_file()
    (again / "runs").mkdir()  # any other subfolder is not a merge's
    with pytest.raises(UserError, match="holds other things than a merged model"):
        merge_module.merge_adapters(str(plain), again)
    # An earlier merge that is the base of the chain being merged was replaced by its own adapter's merge.
    merged = merge_module.merge_adapters(str(plain), tmp_path / "merged-base")
    weights = (merged / "model.safetensors").read_bytes()
    over = tmp_path / "over"
    shutil.copytree(plain, over)
    adapter = json.loads((over / "adapter_config.json").read_text())
    (over / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": str(merged)}))
    with pytest.raises(UserError, match=r"^--output_dir .*merged-base is the base of the model being merged "
                                        r"\(.*over sits on it\): the merge would replace it; pass another"):
        merge_module.merge_adapters(str(over), merged)
    assert (merged / "model.safetensors").read_bytes() == weights
    with pytest.raises(UserError, match=r"^--dequantize merges into the base rounded to 4-bit, .* was trained with "
                                        r"--quantization none: drop --dequantize$"):
        merge_module.merge_adapters(str(dpo_run["run_folder"]), tmp_path / "deq", dequantize=True)
    # --quantization auto, recorded as given, is what the loader made of it (`loaded_as`): full precision here.
    config = json.loads((plain / "alignkit_config.json").read_text())
    assert config["loaded_as"]["quantization"] == "none"
    (plain / "alignkit_config.json").write_text(json.dumps({**config, "quantization": "auto"}))
    with pytest.raises(UserError, match=r"was trained with --quantization none: drop --dequantize$"):
        merge_module.merge_adapters(str(plain), tmp_path / "deq", dequantize=True)


def test_an_unfinished_run_and_a_checkpoint_cut_off_are_said_to_be_so(tmp_path):
    """Found by the merge audit: a DPO run killed after checkpoint-50 (alignkit's card, its settings, its
    checkpoints, one cut off while it was saved) was "not a model folder: it holds no config.json", and its
    checkpoint-60 the same: nothing said the run had not finished, nor which checkpoint to use. Said before any model
    loads, by merge.py and evaluate.py alike, each naming its own flag."""
    import re

    run = tmp_path / "tiny-dpo-killed"
    run.mkdir()
    (run / "alignkit_config.json").write_text(json.dumps({"run_type": "dpo", "model_id": "runs/tiny-sft"}))
    (run / "README.md").write_text("# tiny-dpo-killed\n")
    for step in (40, 50):
        (run / f"checkpoint-{step}").mkdir()
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (run / "checkpoint-60").mkdir()  # killed while it was saved: its config written, not yet its weights nor state
    (run / "checkpoint-60" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    latest = re.escape(str(run / "checkpoint-50"))
    with pytest.raises(UserError, match=rf"^{re.escape(str(run))} holds no finished model: its training has not "
                                        rf"finished \(it is running, or it stopped or was killed after checkpoint-50\)\. "
                                        rf"Pass --adapter_dir {latest}, its latest complete checkpoint \(a model too: "
                                        r"the run at that step\), or run that training command again to resume it "
                                        r"and finish$"):
        run_script("merge.py", "--adapter_dir", str(run))
    with pytest.raises(UserError, match=rf"^{re.escape(str(run / 'checkpoint-60'))} has no trainer_state\.json \(cut "
                                        rf"off while it was saved\): pass --adapter_dir {latest} instead, its run's "
                                        r"latest complete checkpoint"):
        run_script("merge.py", "--adapter_dir", str(run / "checkpoint-60"))
    with pytest.raises(UserError, match=rf"^{re.escape(str(run))} holds no finished model: .*Pass --model_id {latest}"):
        run_script("evaluate.py", "vibes", "--model_id", str(run), "--prompts", "hi")
    for step in (40, 50):
        shutil.rmtree(run / f"checkpoint-{step}")
    with pytest.raises(UserError, match=rf"^{re.escape(str(run))} holds no model yet: its training has not finished "
                                        r"and has saved no complete checkpoint"):
        run_script("merge.py", "--adapter_dir", str(run))
    with pytest.raises(UserError, match=r"has no trainer_state\.json \(cut off while it was saved\): its run .* has no "
                                        r"complete checkpoint; run that training command again"):
        run_script("merge.py", "--adapter_dir", str(run / "checkpoint-60"))
    assert not any(p.name.startswith("merged") for p in run.rglob("*"))


def test_a_checkpoint_merges_beside_it_its_card_naming_the_adapter_below(dpo_run, sft_run):
    """Found by the merge audit: `merge.py --adapter_dir RUN/checkpoint-N` wrote RUN/checkpoint-N/merged, which a
    resumed run deletes with the checkpoint without a word; and its card (from merge.json) said "Merged into the
    base: `.../frozen_0` -> `.../checkpoint-N`", frozen_0 being the checkpoint's own copy of the SFT adapter."""
    run, sft = Path(dpo_run["run_folder"]), Path(sft_run["run_folder"])
    last = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (last / "frozen_0").is_dir()
    out = run / f"merged-{last.name}"
    try:
        said = run_script("merge.py", "--adapter_dir", str(last))
        assert said["merged_dir"] == out and out.is_dir() and not (last / "merged").exists()
        card = (out / "README.md").read_text()  # named after its run and step, not `merged-checkpoint-N`
        assert card.split("---\n", 2)[2].lstrip().startswith(f"# {run.name}-merged-{last.name}\n")
        assert json.loads((out / "merge.json").read_text())["adapters"] == [str(sft.resolve()), str(last.resolve())]
        assert f"Merged into the base: `.../{sft.name}` -> `.../{last.name}`" in card and "frozen_0" not in card
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the session's run folder, as the other tests find it
