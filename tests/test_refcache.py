"""The reference log-prob disk cache (alignkit.train.refcache): an identical DPO rerun skips the reference pass.

Real tiny DPO runs with --precompute_ref_log_probs; the reference forward is counted by wrapping
AlignDPOTrainer.compute_ref_log_probs, which both TRL's precompute pass and the per-step path go through.
"""

from __future__ import annotations

import types

import pytest
import torch

from alignkit.train import refcache
from alignkit.train.trainers import AlignDPOTrainer

from conftest import in_two_ranks, run_script


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Reference forwards per run, and a cache folder of this test's own."""
    monkeypatch.setattr(refcache, "cache_root", lambda: tmp_path / "ref_logps")
    calls = {"n": 0}
    original = AlignDPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        calls["n"] += 1
        return original(self, model, inputs)

    monkeypatch.setattr(AlignDPOTrainer, "compute_ref_log_probs", counting)
    return calls


def dpo(tmp_path, calls, name, *extra) -> tuple[dict, int]:
    calls["n"] = 0
    out = run_script(
        "dpo.py", "--preset", "tiny", "--precompute_ref_log_probs", "true", "--max_samples", "240",
        "--max_steps", "2", "--output_dir", str(tmp_path / "runs"), "--run_name", name, "--resume", "false", *extra,
    )
    return out, calls["n"]


def ref_logps(run) -> torch.Tensor:
    data = run["trainer"].train_dataset
    return torch.tensor([data["ref_chosen_logps"], data["ref_rejected_logps"]])


def test_a_rerun_with_the_same_inputs_reuses_the_reference_log_probs(tiny_cache, tmp_path, counted):
    first, calls = dpo(tmp_path, counted, "first")
    assert calls > 0  # computed: nothing was cached yet
    assert len(list((tmp_path / "ref_logps").glob("*.safetensors"))) == 2  # train and held-out rows

    # Same base, data and max_length; another run name and beta (the reference does not depend on them).
    second, calls = dpo(tmp_path, counted, "second", "--dpo_beta", "0.2")
    assert calls == 0  # no reference forward at all: not before training, not per step, not at eval
    assert torch.equal(ref_logps(first), ref_logps(second))
    assert second["metrics"]["eval_rewards/accuracies"] >= 0  # training and evaluation ran on the cached values

    # Other data or another max_length: recomputed, and stored as entries of their own.
    _, calls = dpo(tmp_path, counted, "other-data", "--max_samples", "200")
    assert calls > 0
    short, calls = dpo(tmp_path, counted, "short", "--max_length", "12")
    assert calls > 0 and not torch.equal(ref_logps(first), ref_logps(short))
    assert len(list((tmp_path / "ref_logps").glob("*.safetensors"))) == 6


def test_the_key_ignores_the_trained_adapter_and_sees_every_base_weight(tiny_cache):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.modeling import presets

    def fingerprint(rank: int, seed: int, nudge: float = 0.0) -> str:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(presets.paths()["model"])
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight[0, 0] += nudge
        model = get_peft_model(model, LoraConfig(r=rank, target_modules="all-linear", task_type="CAUSAL_LM"))
        return refcache.model_fingerprint(model, skip_adapters={"default", "ref"})

    same = fingerprint(rank=16, seed=0)
    assert fingerprint(rank=4, seed=1) == same  # a new adapter of any rank or init: same reference
    assert fingerprint(rank=16, seed=0, nudge=1e-3) != same  # one base weight changed: another reference


def test_a_4bit_model_on_the_cpu_is_the_same_model_after_a_pass_without_gradients(tiny_cache, monkeypatch,
                                                                                   alignkit_log):
    """On a CPU with AVX512-BF16 (simulated on one without), bitsandbytes repacks 4-bit weights at the first
    eval-mode pass without gradients and gives them back with bf16 block scales: the model changed under the run
    and its reference key with it (a rerun that reused its train-set entry then missed its held-out one). Loaded by
    alignkit, the weights stay as loaded: the same fingerprint and the same training-mode logits after such a pass."""
    import bitsandbytes.nn.modules as bnb_modules

    from alignkit.core.config import ModelSettings
    from alignkit.modeling import models, presets

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = models.load_model(ModelSettings(model_id=presets.paths()["model"], quantization="4bit"),
                              for_training=True).model
    assert "the weights stay in bitsandbytes' standard 4-bit layout" in alignkit_log.text
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before, logits = refcache.model_fingerprint(model), model(ids).logits.detach()
    model.eval()
    with torch.no_grad():
        model(ids)  # the reference pass's conditions
    model.train()
    assert refcache.model_fingerprint(model) == before
    torch.testing.assert_close(model(ids).logits.detach(), logits, atol=0, rtol=0)


def sft_adapter(folder, seed: int) -> str:
    """A LoRA SFT adapter on the tiny base with seeded non-zero weights: two seeds, two different SFT models."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.modeling import presets

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(presets.paths()["model"])
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sft_adapters(tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-adapters")
    return [sft_adapter(root / name, seed) for name, seed in (("a", 1), ("b", 2))]


def test_a_zero3_partitioned_model_is_keyed_on_its_full_parameters(sft_adapters):
    """ZeRO-3 leaves each process an empty `.data` placeholder per parameter: the key must gather the real values
    (here through a stand-in for deepspeed.zero.GatheredParameters, one process), not hash the placeholders."""
    from types import SimpleNamespace

    from sharded_fingerprint import fake_deepspeed, load, partition_like_zero3, stand_in_trainer, tiny_dataset

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, unwrap_model=lambda m: m)
    keys = {}
    for adapter in sft_adapters:
        model, frozen = load(adapter)
        whole = refcache.cache_key(stand_in_trainer(model, accelerator, frozen), tiny_dataset())
        partition_like_zero3(model)
        assert all(p.numel() == 0 for p in model.parameters())
        with fake_deepspeed():
            keys[adapter] = refcache.cache_key(stand_in_trainer(model, accelerator, frozen), tiny_dataset())
        assert keys[adapter] == whole  # the gathered values, not the empty placeholders
        assert all(p.numel() == 0 for p in model.parameters())  # gathered one at a time, and released again
    assert len(set(keys.values())) == 2  # different SFT adapters: different reference log-probs, different keys


def test_two_processes_key_sharded_models_on_full_parameters(sft_adapters, tmp_path):
    """Two processes over gloo (accelerate launch): ZeRO-3-style partitions gathered by real all_gathers, FSDP's
    empty placeholders on the non-main process, and FSDP2 fully_shard (DTensor): every process gets the main
    process's key, it equals the unsharded key, and the two SFT adapters get different keys."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", str(ROOT / "tests" / "sharded_fingerprint.py"), str(tmp_path), *sft_adapters]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    written = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    # gloo's teardown can abort a process after its work ("terminate called without an active exception", seen once
    # in CI on a busy machine, the group destroyed or not): only once both processes wrote their keys, which are
    # what this test checks; an abort before that fails it.
    torn_down = "terminate called without an active exception" in done.stderr and all(f.is_file() for f in written)
    assert done.returncode == 0 or torn_down, done.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in written]
    assert ranks[0] == ranks[1]  # one key on every process
    keys = ranks[0]
    for adapter in sft_adapters:
        assert "fsdp2_error" not in keys[adapter], keys[adapter]["fsdp2_error"]
        assert keys[adapter]["zero3"] == keys[adapter]["whole"]
        assert keys[adapter]["placeholders"] == keys[adapter]["whole"]
        assert keys[adapter]["fsdp2"] == keys[adapter]["whole"]
    a, b = (keys[adapter]["whole"] for adapter in sft_adapters)
    assert a != b


def test_the_key_sees_the_attention_implementation_and_the_hardware(tiny_cache, monkeypatch):
    """The same weights on another kernel give other log-probs in the last bits: another entry, never a reuse."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from alignkit.modeling import presets

    model = AutoModelForCausalLM.from_pretrained(presets.paths()["model"], attn_implementation="sdpa")
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, unwrap_model=lambda m: m)
    args = SimpleNamespace(max_length=64, truncation_mode="keep_start", ld_alpha=None, bf16=False, fp16=False)
    trainer = SimpleNamespace(args=args, accelerator=accelerator, model=model, frozen_adapters=[])
    data = Dataset.from_dict({"prompt_ids": [[1, 2]], "chosen_ids": [[3]], "rejected_ids": [[4]]})
    sdpa = refcache.cache_key(trainer, data)
    assert refcache.cache_key(trainer, data) == sdpa
    model.config._attn_implementation = "eager"
    eager = refcache.cache_key(trainer, data)
    assert eager != sdpa
    monkeypatch.setattr(refcache, "hardware", lambda: "cuda:NVIDIA H200")
    assert refcache.cache_key(trainer, data) not in (sdpa, eager)


def _rank_uses_the_cache(rank, folder):
    """One process of two: rank 0's cache folder holds the entry, rank 1's (another machine's) does not."""
    import json

    import torch.distributed as dist
    from datasets import Dataset

    from alignkit.train import refcache

    refcache.cache_key = lambda trainer, dataset: "key"
    refcache.cache_root = lambda: folder / f"cache{rank}"

    def compute(trainer, dataset, batch_size):  # collective, as the real one is (gather_for_metrics)
        total = torch.tensor([1.0])
        dist.all_reduce(total)
        return {"ref_chosen_logps": torch.full((2,), -total.item()), "ref_rejected_logps": torch.full((2,), -3.0)}

    refcache.compute = compute
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(is_main_process=rank == 0),
                                    args=types.SimpleNamespace(max_length=8))
    data = refcache.with_ref_logps(trainer, Dataset.from_dict({"prompt": ["a", "b"]}), 2)
    (folder / f"rank{rank}.json").write_text(json.dumps(list(data["ref_chosen_logps"])))


def test_an_entry_not_every_process_can_read_is_computed_by_all_instead_of_hanging(tmp_path):
    """Multi-node with a cache folder per machine: the main process finds the entry, another does not. Computing is
    collective, so the processes must agree: all compute (before, rank 1 waited in its gather forever)."""
    import json

    from alignkit.train import refcache

    (tmp_path / "cache0").mkdir()
    refcache.save(tmp_path / "cache0" / "key.safetensors",
                  {"ref_chosen_logps": torch.full((2,), -9.0), "ref_rejected_logps": torch.full((2,), -9.0)}, {})
    assert in_two_ranks(_rank_uses_the_cache, tmp_path, tmp_path) == [0, 0]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[-2.0, -2.0]] * 2  # computed
