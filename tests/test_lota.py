"""LoTA (alignkit.train.lota, lota_mask; alignkit.modeling.lota_delta): the mask, the sparse delta on disk,
loading and merging it, DPO with it, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.core.config import DPOSettings, ModelSettings, SFTSettings
from alignkit.modeling import lota_delta
from alignkit.modeling.models import load_model
from alignkit.train import lota_mask

from conftest import run_script

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5]])
SPARSITY = 0.9


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---------------------------------------------------------------- the mask, on fixed tensors


def test_matrix_scope_keeps_the_largest_share_of_each_matrix():
    a = torch.tensor([[0.1, -5.0, 0.2, 0.0, 3.0], [0.3, 0.0, -0.4, 0.5, 0.05]])  # 10 entries: keep floor(0.3*10)=3
    b = torch.tensor([1.0, -2.0, 0.5, 0.25])  # 4 entries: keep floor(0.3*4)=1
    mask = lota_mask.compute_mask({"a": a, "b": b}, sparsity=0.7, scope="matrix")
    assert mask["a"].tolist() == [1, 4, 8]  # |-5|, |3|, |0.5|
    assert mask["b"].tolist() == [1]


def test_global_scope_uses_one_threshold_over_all_matrices():
    a = torch.tensor([10.0, 9.0, 8.0, 7.0])
    b = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mask = lota_mask.compute_mask({"a": a, "b": b}, sparsity=0.5, scope="global")  # keep 4 of 8: all of a
    assert mask["a"].tolist() == [0, 1, 2, 3] and mask["b"].tolist() == []


def test_exclude_mask_entries_are_never_chosen():
    a = torch.tensor([10.0, 9.0, 8.0, 7.0, 1.0, 0.5])
    mask = lota_mask.compute_mask({"a": a}, sparsity=0.5, exclude={"a": torch.tensor([0, 2])})
    assert mask["a"].tolist() == [1, 3, 4]  # the largest three outside the excluded 0 and 2


def test_masked_training_never_moves_entries_outside_the_mask_even_with_weight_decay_and_momentum():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    start = layer[0].weight.detach().clone()
    mask = {"0": torch.tensor([3, 17, 40])}
    lota_delta.attach(layer, {"0": layer[0]}, mask)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == 3  # AdamW holds state for the 3 masked entries, nothing dense
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    for _ in range(5):
        layer(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    changed = (layer[0].weight.detach() != start).reshape(-1).nonzero().reshape(-1)
    assert changed.tolist() == [3, 17, 40]
    with lota_delta.reference_mode(layer):  # the reference is exactly the starting weights
        assert torch.equal(layer[0].weight, start)


# ---------------------------------------------------------------- a LoTA SFT run


@pytest.fixture(scope="module")
def lota_sft(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lota")
    # Weight decay on: it must not move entries outside the mask either.
    return run_script(
        "sft.py", "--preset", "tiny", "--adapter", "lota", "--lota_sparsity", str(SPARSITY),
        "--lota_calibration_steps", "5", "--max_steps", "15", "--weight_decay", "0.1",
        "--output_dir", str(out), "--run_name", "sft",
    )


def _base_and_loaded(folder):
    config = json.loads((folder / lota_delta.CONFIG_FILE).read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    loaded = load_model(ModelSettings(model_id=str(folder), quantization="none"))
    return base, loaded


def test_saved_delta_changes_at_most_the_allowed_share_and_exactly_the_masked_entries(lota_sft):
    folder = lota_sft["run_folder"]
    delta, shapes = lota_delta.read_delta(folder)
    mask = lota_delta.load_mask(folder / lota_delta.MASK_FILE, shapes)
    base, loaded = _base_and_loaded(folder)
    assert loaded.deltas == [str(folder)]
    targeted = lota_delta.target_modules(base)
    assert set(shapes) == set(targeted) and len(shapes) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    base_weights = dict(base.named_parameters())
    new_weights = dict(loaded.model.named_parameters())
    for name, shape in shapes.items():
        indices, values = delta[name]
        assert torch.equal(indices, mask[name])
        assert indices.numel() <= math.floor((1 - SPARSITY) * math.prod(shape))
        assert indices.numel() > 0 and bool((values != 0).all())  # every masked entry was trained
        before, after = base_weights[f"{name}.weight"].reshape(-1), new_weights[f"{name}.weight"].reshape(-1)
        changed = (after != before).nonzero().reshape(-1)
        assert torch.equal(changed, indices), name  # exactly the masked entries, nothing else
        assert torch.allclose(after[indices] - before[indices], values, atol=1e-6)
    # The delta is a small fraction of the model on disk.
    assert (folder / lota_delta.DELTA_FILE).stat().st_size < 0.25 * sum(p.numel() * 4 for p in base.parameters())


def test_merged_logits_equal_base_plus_delta(lota_sft, tmp_path):
    folder = lota_sft["run_folder"]
    out = tmp_path / "merged"
    run_script("merge.py", "--adapter_dir", str(folder), "--output_dir", str(out))
    merged = AutoModelForCausalLM.from_pretrained(out)
    base, _ = _base_and_loaded(folder)
    delta, _ = lota_delta.read_delta(folder)
    with torch.no_grad():  # base + delta by hand
        for name, (indices, values) in delta.items():
            base.get_submodule(name).weight.view(-1)[indices] += values
    assert torch.allclose(logits(merged), logits(base), atol=1e-4)
    assert json.loads((out / "merge.json").read_text())["lota_deltas"] == [str(folder)]
    plain = AutoModelForCausalLM.from_pretrained(json.loads((out / "merge.json").read_text())["base_model"])
    assert not torch.allclose(logits(merged), logits(plain), atol=1e-3)  # not a no-op


def test_checkpoints_hold_the_sparse_values_not_the_model(lota_sft, tmp_path):
    folder = lota_sft["run_folder"]
    checkpoint = sorted(folder.glob("checkpoint-*"))[-1]
    assert (checkpoint / lota_delta.DELTA_FILE).is_file() and not (checkpoint / "model.safetensors").is_file()
    delta, _ = lota_delta.read_delta(checkpoint)
    final, _ = lota_delta.read_delta(folder)
    assert all(torch.equal(delta[n][1], final[n][1]) for n in final)  # the last checkpoint holds the final values


def test_only_the_writing_process_saves_the_delta(lota_sft, tmp_path):
    """transformers calls a trainer's _save on every process under DeepSpeed and DDP (its own returns early where
    args.should_save is false): LoTA's wrote on every rank, and under ZeRO-2 rank 1 crashed renaming the temporary
    mask file rank 0 had just renamed into the checkpoint (a CI run of session 34)."""
    from types import SimpleNamespace

    trainer = lota_sft["trainer"]
    save = type(trainer)._save  # the LoTA trainer's own
    assert type(trainer).__name__.startswith("LoTA")
    save(SimpleNamespace(args=SimpleNamespace(should_save=False)), str(tmp_path / "rank1"))
    assert not (tmp_path / "rank1").exists()
    save(trainer, str(tmp_path / "rank0"))
    assert (tmp_path / "rank0" / lota_delta.DELTA_FILE).is_file() and (tmp_path / "rank0" / lota_delta.MASK_FILE).is_file()


# ---------------------------------------------------------------- DPO on top of the SFT delta: LoTA vs LoRA


@pytest.fixture(scope="module")
def dpo_pair(lota_sft, tmp_path_factory):
    """LoRA and LoTA DPO with the same settings from the same start (the LoTA SFT model); LoTA's mask is kept
    disjoint from SFT's, as in the paper's sequential training."""
    out = tmp_path_factory.mktemp("lota-dpo")
    start = str(lota_sft["run_folder"])
    common = ["--preset", "tiny", "--model_id", start, "--max_steps", "30", "--output_dir", str(out)]
    lora = run_script("dpo.py", *common, "--run_name", "lora")
    sparse = run_script(
        "dpo.py", *common, "--run_name", "lota", "--adapter", "lota", "--lota_sparsity", str(SPARSITY),
        "--lota_calibration_steps", "10", "--lota_exclude_mask", start,
    )
    return lora, sparse


def test_lota_dpo_reward_accuracy_is_within_005_of_lora(dpo_pair):
    lora, sparse = dpo_pair
    acc_lora, acc_lota = lora["metrics"]["eval_rewards/accuracies"], sparse["metrics"]["eval_rewards/accuracies"]
    # At step 0 policy == reference, so every reward is 0 and the accuracy 0: both must have learned.
    assert acc_lora > 0.8 and acc_lota > 0.8
    assert abs(acc_lota - acc_lora) <= 0.05, (acc_lota, acc_lora)


def test_lota_dpo_reference_is_the_starting_model_without_a_second_copy(dpo_pair):
    _, sparse = dpo_pair
    trainer = sparse["trainer"]
    assert trainer.ref_model is None  # no second model was loaded
    assert sparse["loaded"].deltas == [str(sparse["settings"].model_id)]  # the SFT delta is in the start


def test_exclude_mask_gives_disjoint_task_masks(lota_sft, dpo_pair):
    _, sparse = dpo_pair
    delta, shapes = lota_delta.read_delta(sparse["run_folder"])
    first = lota_delta.load_mask(lota_sft["run_folder"], shapes)
    second = lota_delta.load_mask(sparse["run_folder"], shapes)
    assert sum(m.numel() for m in second.values()) > 0
    assert lota_delta.overlap(first, second) == 0


def test_two_deltas_add_up_and_the_overlap_is_reported(lota_sft, dpo_pair, tmp_path):
    _, sparse = dpo_pair
    out = tmp_path / "sum"
    run_script("merge.py", "--adapter_dir", str(sparse["run_folder"]), "--add_delta", str(lota_sft["run_folder"]),
               "--output_dir", str(out))
    report = json.loads((out / lota_delta.CONFIG_FILE).read_text())
    assert report["overlap"] == 0 and report["entries"] == report["entries_a"] + report["entries_b"]
    # Adding a delta to itself: every entry overlaps and the values double.
    twice = lota_delta.add_deltas(lota_sft["run_folder"], lota_sft["run_folder"], tmp_path / "twice")
    assert twice["overlap"] == twice["entries"] == twice["entries_a"]
    once, _ = lota_delta.read_delta(lota_sft["run_folder"])
    doubled, _ = lota_delta.read_delta(tmp_path / "twice")
    assert all(torch.allclose(doubled[n][1], 2 * once[n][1]) for n in once)


def test_a_lora_adapter_over_a_lota_delta_loads_both(dpo_pair, lota_sft):
    lora, _ = dpo_pair
    loaded = load_model(ModelSettings(model_id=str(lora["run_folder"]), quantization="none"))
    assert loaded.deltas == [str(lota_sft["run_folder"])] and loaded.adapters == [str(lora["run_folder"])]
    # The LoRA run trained on exactly this model: its held-out accuracy is reproduced by what the loader builds.
    assert torch.allclose(logits(loaded.model), logits(lora["trainer"].model), atol=1e-4)


def test_a_checkpoint_of_a_lora_run_over_a_lota_delta_keeps_the_delta(dpo_pair, lota_sft):
    """checkpoint-N of a LoRA run on a LoTA model named the bare base: loaded, merged or evaluated, it was base +
    LoRA, the delta silently left out. It names the run's --model_id now, and is the finished run's model."""
    from alignkit.modeling import chain

    lora, _ = dpo_pair
    run = Path(lora["run_folder"])
    last = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    resolved = chain.resolve(str(last))
    assert resolved.deltas == [str(lota_sft["run_folder"])] and resolved.adapters == [str(last)]
    from_checkpoint = logits(load_model(ModelSettings(model_id=str(last), quantization="none")).model)
    assert torch.allclose(from_checkpoint, logits(load_model(ModelSettings(model_id=str(run), quantization="none")).model),
                          atol=1e-5)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_0_1_is_refused(sparsity):
    for cls in (SFTSettings, DPOSettings):
        with pytest.raises(ValueError, match="lota_sparsity must lie strictly between 0 and 1"):
            cls(adapter="lota", lota_sparsity=sparsity)


def test_pushing_an_unmerged_delta_is_refused_before_training(lota_sft):
    from alignkit.core.hub import push

    with pytest.raises(ValueError, match="add --merge_adaptors"):
        SFTSettings(adapter="lota", push_to_hub=True, hub_repo_id="you/x")
    SFTSettings(adapter="lota", push_to_hub=True, hub_repo_id="you/x", merge_adaptors=True)
    with pytest.raises(ValueError, match="is a LoTA sparse delta"):
        push(lota_sft["run_folder"], "you/x")


def test_lota_with_4bit_quantization_is_refused():
    with pytest.raises(ValueError, match="--adapter lota needs full-precision weights.*--quantization 4bit"):
        DPOSettings(adapter="lota", quantization="4bit")
    SFTSettings(adapter="lora", quantization="4bit")  # LoRA still takes QLoRA


@pytest.mark.parametrize("env, launch", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
])
def test_lota_under_fsdp_or_zero3_is_refused_before_the_model_loads(tiny_cache, monkeypatch, env, launch):
    """FSDP cannot flatten the float32 delta beside bf16 weights, and ZeRO-3 hands SparseDelta an empty [0]
    partition: both are refused by name, with what to use instead, before from_pretrained runs."""
    from alignkit.core.args import ConfigError
    from alignkit.modeling import presets

    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loading)
    s = SFTSettings(model_id=presets.paths()["model"], adapter="lota", quantization="none")
    with pytest.raises(ConfigError, match=rf"^--adapter lota under {launch} is not supported: launch with DDP .*"
                                          r"ZeRO-2, or train with --adapter lora$"):
        load_model(s, for_training=True)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # ZeRO-2 keeps whole weights: LoTA is not refused
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(AssertionError, match="the model was loaded"):
        load_model(s, for_training=True)


def test_a_lora_run_over_a_lota_delta_is_refused_under_zero3_before_the_model_loads(lota_sft, monkeypatch):
    """ZeRO-3 builds the weights partitioned, so the delta found [0]-shaped weights on every rank: a "does not fit
    this model" error after the load. FSDP and ZeRO-2 load them whole first: taken."""
    from alignkit.core.args import ConfigError

    def loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loading)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    folder = str(lota_sft["run_folder"])
    s = DPOSettings(model_id=folder, quantization="none")
    with pytest.raises(ConfigError, match=rf"^{re.escape(folder)} holds a LoTA delta \(.*\), which adds into whole "
                                          r"weights, and DeepSpeed ZeRO-3 builds them partitioned: launch with DDP"):
        load_model(s, for_training=True)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(AssertionError, match="the model was loaded"):
        load_model(s, for_training=True)


def test_a_mask_from_another_model_is_refused(lota_sft, tmp_path):
    folder = lota_sft["run_folder"]
    _, shapes = lota_delta.read_delta(folder)
    mask = lota_delta.load_mask(folder, shapes)
    name = next(iter(shapes))
    wrong_shape = {**shapes, name: (shapes[name][0] + 1, shapes[name][1])}
    lota_delta.save_mask(mask, wrong_shape, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=f"made for another model: {name} has shape"):
        lota_delta.load_mask(tmp_path / "shape.safetensors", shapes)
    renamed = {k.replace("model.layers", "transformer.h"): v for k, v in shapes.items()}
    lota_delta.save_mask({k.replace("model.layers", "transformer.h"): v for k, v in mask.items()}, renamed, tmp_path / "names.safetensors")
    with pytest.raises(ValueError, match="made for another model or other --lota_target_modules"):
        run_script("sft.py", "--preset", "tiny", "--adapter", "lota", "--lota_mask", str(tmp_path / "names.safetensors"),
                   "--max_steps", "1", "--output_dir", str(tmp_path), "--run_name", "bad")


# ---------------------------------------------------------------- reuse: a given mask, a resumed run, the reference cache


def _no_calibration(monkeypatch):
    def calibrated(*a, **k):
        raise AssertionError("calibration ran although the mask was given")

    monkeypatch.setattr(lota_mask, "compute_mask", calibrated)


def test_a_given_mask_skips_calibration_and_is_the_one_trained(lota_sft, tmp_path, monkeypatch):
    _no_calibration(monkeypatch)
    run = run_script("sft.py", "--preset", "tiny", "--adapter", "lota", "--lota_mask", str(lota_sft["run_folder"]),
                     "--max_steps", "3", "--output_dir", str(tmp_path), "--run_name", "reuse")
    _, shapes = lota_delta.read_delta(lota_sft["run_folder"])
    given, trained = lota_delta.load_mask(lota_sft["run_folder"], shapes), lota_delta.load_mask(run["run_folder"], shapes)
    assert all(torch.equal(given[n], trained[n]) for n in shapes)


def test_only_the_main_process_writes_the_calibrated_mask(tiny_cache, tmp_path, monkeypatch):
    """Under a launch every process calibrates the same mask. Two processes renaming one temporary file into place
    raced, and the second crashed its rank (test_launch_real's LoTA launch, on a fast machine): the other ranks
    keep the mask in memory and write nothing."""
    import dataclasses
    from types import SimpleNamespace

    from alignkit.modeling import presets
    from alignkit.train import lota

    @dataclasses.dataclass
    class Args:  # the fields calibrate replaces
        output_dir: str = ""
        max_steps: int = 0
        save_strategy: str = "steps"
        eval_strategy: str = "steps"
        report_to: str = "none"
        load_best_model_at_end: bool = False

    class Calibration:  # moves the trainable delta a little, as a step would (a delta that never moved is refused)
        def __init__(self, main: bool):
            self.accelerator = SimpleNamespace(is_main_process=main)

        def train(self):
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.add_(0.01)

    monkeypatch.setattr(lota_mask, "_let_the_next_trainer_start", lambda trainer: None)
    s = DPOSettings(model_id=presets.paths()["model"], adapter="lota", quantization="none")
    for main in (False, True):
        model = lota.add_trainable_delta(load_model(s, for_training=True), s)
        folder = tmp_path / f"main-{main}"
        mask = lota_mask.calibrate(model, s, folder, lambda args, main=main: Calibration(main), Args())
        assert mask and (folder / lota_delta.MASK_FILE).is_file() == main
        assert not list(folder.glob(".*.tmp"))


def test_a_resumed_run_reuses_its_mask_and_ends_where_a_straight_run_does(tiny_cache, tmp_path, monkeypatch):
    args = ["--preset", "tiny", "--adapter", "lota", "--lota_calibration_steps", "4", "--max_steps", "12",
            "--save_steps", "6", "--output_dir", str(tmp_path), "--run_name", "run"]
    straight = run_script("sft.py", *args)
    final, _ = lota_delta.read_delta(straight["run_folder"])
    run = tmp_path / "run"
    import shutil

    shutil.rmtree(run / "checkpoint-12")  # as if killed after checkpoint 6
    (run / lota_delta.DELTA_FILE).unlink()
    _no_calibration(monkeypatch)  # the run's own mask is reused, not recalibrated
    resumed = run_script("sft.py", *args)
    assert resumed["resume_from"].endswith("checkpoint-6")
    again, _ = lota_delta.read_delta(run)
    for name in final:
        assert torch.equal(again[name][0], final[name][0])
        assert torch.allclose(again[name][1], final[name][1], atol=1e-5), name


def test_precomputed_reference_log_probs_are_cached_and_reused_with_lota(tiny_cache, tmp_path, monkeypatch):
    from alignkit.train import refcache

    monkeypatch.setattr(refcache, "cache_root", lambda: tmp_path / "ref_logps")  # empty, whatever ran before

    args = ["--preset", "tiny", "--adapter", "lota", "--lota_calibration_steps", "3", "--max_steps", "3",
            "--max_samples", "200", "--precompute_ref_log_probs", "--output_dir", str(tmp_path)]
    before: set = set()
    first = run_script("dpo.py", *args, "--run_name", "a")
    made = set(refcache.cache_root().glob("*.safetensors")) - before
    # Train and eval rows once each: calibration and sparse training share the entries (the delta is not in the key).
    assert len(made) == 2
    second = run_script("dpo.py", *args, "--run_name", "b")
    assert set(refcache.cache_root().glob("*.safetensors")) - before == made
    assert first["trainer"].ref_model is None
    assert second["metrics"]["eval_rewards/accuracies"] == pytest.approx(first["metrics"]["eval_rewards/accuracies"])


def test_lota_dpo_on_a_lora_sft_adapter_starts_from_the_sft_model_and_reloads_as_trained(sft_run, tmp_path):
    sft_folder = str(sft_run["run_folder"])
    run = run_script("dpo.py", "--preset", "tiny", "--model_id", sft_folder, "--adapter", "lota",
                     "--lota_calibration_steps", "3", "--max_steps", "5", "--output_dir", str(tmp_path), "--run_name", "d")
    trained = run["trainer"].model.eval()
    sft = load_model(ModelSettings(model_id=sft_folder, quantization="none")).model
    with lota_delta.reference_mode(trained):  # the reference: the delta off, the frozen SFT adapter on
        assert torch.allclose(logits(trained), logits(sft), atol=1e-4)
    assert not torch.allclose(logits(trained), logits(sft), atol=1e-4)  # the delta trained
    loaded = load_model(ModelSettings(model_id=str(run["run_folder"]), quantization="none"))
    assert loaded.adapters == [sft_folder] and loaded.deltas == [str(run["run_folder"])]
    assert torch.allclose(logits(loaded.model), logits(trained), atol=1e-4)


def test_vllm_refuses_a_delta_with_the_fix(lota_sft, monkeypatch):
    from fake_vllm import install

    from alignkit.modeling import generation

    install(monkeypatch, cuda=True)
    with pytest.raises(ValueError, match="holds a LoTA delta; vLLM serves LoRA adapters only. Merge it first"):
        generation.load_generator(ModelSettings(model_id=str(lota_sft["run_folder"])), "vllm")


# ---------------------------------------------------------------- the reference over a LoRA chain: as for LoRA


def _answer_logps(model, batch) -> torch.Tensor:
    """Summed answer log-probs of each row of a DPO batch, computed by hand (no packing, no fused head)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def test_lota_reference_keeps_the_chain_adapters_reference_adapters_names(sft_run, dpo_run, tmp_path):
    """LoTA DPO from a stacked chain (base -> SFT -> DPO adapters) with --reference_adapters 0: the reference
    log-probs are the bare base's; with 1 the SFT model's (rlaif.py's --reference start); by default the whole
    chain the run starts from, as the LoRA path does. The chain stays loaded and frozen, never merged away."""
    run = run_script("dpo.py", "--preset", "tiny", "--model_id", str(dpo_run["run_folder"]), "--adapter", "lota",
                     "--lota_calibration_steps", "2", "--max_steps", "2", "--reference_adapters", "0",
                     "--output_dir", str(tmp_path), "--run_name", "ref0")
    trainer, loaded = run["trainer"], run["loaded"]
    assert trainer.frozen_adapters == ["frozen_0", "frozen_1"] and trainer.reference_adapters == []
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "frozen_" in n)
    batch = next(iter(trainer.get_eval_dataloader()))

    def reference():
        with torch.no_grad():
            return torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))

    def of(model_id):
        return _answer_logps(load_model(ModelSettings(model_id=model_id, quantization="none")).model.eval(), batch)

    base, sft, start = of(loaded.base_id), of(str(sft_run["run_folder"])), of(str(dpo_run["run_folder"]))
    assert not torch.allclose(base, sft, atol=1e-3) and not torch.allclose(sft, start, atol=1e-3)
    assert torch.allclose(reference(), base, atol=1e-4)  # --reference_adapters 0: the bare base
    trainer.reference_adapters = ["frozen_0"]
    assert torch.allclose(reference(), sft, atol=1e-4)  # 1: base + SFT
    trainer.reference_adapters = trainer.frozen_adapters  # the default: the model the run starts from
    assert torch.allclose(reference(), start, atol=1e-4)
    assert not torch.allclose(_answer_logps(trainer.model, batch), start, atol=1e-4)  # the policy: the delta trained
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "frozen_" in n)


def test_a_calibration_that_moved_nothing_is_refused(tiny_cache, tmp_path):
    """One calibration step under the tiny preset's warmup ran at learning rate 0: the dense delta stayed zero and
    the mask was top-k over zeros, any entries at all (the 2-process tests trained on such masks)."""
    from alignkit.core.errors import UserError

    with pytest.raises(UserError, match=r"LoTA's 1 calibration steps moved no weight .* Raise --lota_calibration_steps"):
        run_script("sft.py", "--preset", "tiny", "--adapter", "lota", "--lota_calibration_steps", "1", "--max_steps",
                   "1", "--output_dir", str(tmp_path))


def test_what_a_chain_makes_impossible_is_refused_before_the_model_loads(lota_sft, sft_run, tmp_path, monkeypatch):
    """Found by a dpo.py audit: --reference_adapters 0 over a LoTA SFT run trained against the SFT model (the delta
    is in the weights), and --lora_modules_to_save over an SFT adapter stopped after the load with PEFT's traceback."""
    from alignkit.core.args import ConfigError
    from alignkit.train.training import preflight

    def loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loading)
    folder = str(lota_sft["run_folder"])
    out = str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=rf"^--reference_adapters 0 asks for the bare base as the reference, but "
                                          rf"{re.escape(folder)}'s chain holds the LoTA delta"):
        preflight(DPOSettings(model_id=folder, reference_adapters=0, output_dir=out))
    preflight(DPOSettings(model_id=folder, output_dir=out))  # the model it starts from: taken
    sft = str(sft_run["run_folder"])
    with pytest.raises(ConfigError, match=rf"^--lora_modules_to_save lm_head over the adapter {re.escape(sft)}: PEFT "
                                          r"cannot .* Merge it first \(python merge.py"):
        preflight(DPOSettings(model_id=sft, lora_modules_to_save=["lm_head"], output_dir=out))
    preflight(DPOSettings(model_id=sft, reference_adapters=0, output_dir=out))  # LoRA under it: the bare base
    from alignkit.core.config import SFTSettings

    preflight(SFTSettings(model_id=sft, lora_modules_to_save=["lm_head"], output_dir=out))  # sft.py trains it


def test_lora_settings_beside_adapter_lota_are_named_as_not_applied(alignkit_log):
    """--lora_r, --use_dora, --lora_modules_to_save with --adapter lota trained the same delta without a word."""
    from alignkit.core.saved_settings import not_applied

    s = DPOSettings(adapter="lota", lora_r=8, use_dora=True, lora_modules_to_save=["lm_head"])
    assert ("--lora_r, --use_dora, --lora_modules_to_save not applied: --adapter lota trains a sparse delta, not LoRA "
            "(its own settings are --lota_*)") in alignkit_log.text
    # ... and recorded, for the run's alignkit_config.json and card, as a recipe's keys not applied are
    why = "--adapter lota trains a sparse delta, not LoRA"
    assert not_applied(s) == {"lora_r": {"value": 8, "why": why}, "use_dora": {"value": True, "why": why},
                              "lora_modules_to_save": {"value": ["lm_head"], "why": why}}
    alignkit_log.clear()
    DPOSettings(adapter="lota")
    DPOSettings(lora_r=8)
    assert "not applied" not in alignkit_log.text
