"""bench/gpu_dpo.py's CPU smoke mode: the benchmark's model work (a QLoRA NF4 Mistral-shaped model at two
max_lengths, an unquantized Llama-shaped one; stock TRL DPOTrainer and alignkit's defaults, each a full DPO step:
reference pass, policy forward and backward, optimizer) runs on toy shapes, and the result file carries the keys
the GPU run fills in. The speed figures of a CPU smoke say nothing and are not asserted."""

from __future__ import annotations

import json


def test_cpu_smoke_runs_every_scenario_and_writes_the_result_keys(tmp_path, monkeypatch):
    from bench import gpu_dpo

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))

    gpu_dpo.main(["--cpu-smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    result = json.loads((tmp_path / "gpu_dpo_smoke.json").read_text())
    assert result["cpu_smoke"] and result["machine"]["versions"]["trl"]
    for name in ("qlora_7b_1024", "qlora_7b_2048", "dense_1b"):
        scenario = result[name]
        trl, ours = scenario["configs"]["trl"], scenario["configs"]["alignkit"]
        assert not trl["prefix_sharing"] and ours["prefix_sharing"]  # each side ran as itself
        for config in (trl, ours):
            run = config["runs"][0]
            assert run["steps"] == 1 and run["tokens"] > 0 and run["loss"] is not None
            # QLoRA: every decoder linear layer in NF4 (2 layers x 7), on both sides; none in the dense scenario
            assert run["linear_4bit_layers"] == (14 if scenario["quantization"] == "4bit" else 0)
        assert scenario["speedup_vs_trl"] == ours["tokens_per_s"] / trl["tokens_per_s"]  # one round: its ratio
        assert scenario["peak_memory_ratio_vs_trl"] > 0
        assert "mfu" in scenario  # None on a CPU: no bf16 peak to divide by
    # The 4-bit scenarios really are 4-bit, the dense one is not; max_length differs between the two QLoRA ones.
    assert result["qlora_7b_1024"]["quantization"] == "4bit" and result["dense_1b"]["quantization"] == "none"
    assert result["qlora_7b_2048"]["max_length"] == 2 * result["qlora_7b_1024"]["max_length"]
    assert "CPU smoke run" in (tmp_path / "gpu_dpo_smoke.md").read_text()
    # The layout check the GPU run makes under flex_attention (log-probs and gradients), here under sdpa.
    check = result["packed_vs_unshared"]
    assert check["attention"] == "sdpa" and check["max_grad"] > 0
    assert check["max_logp_diff"] < 1e-4 and check["max_grad_diff"] < 1e-4
