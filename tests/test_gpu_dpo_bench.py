"""bench/gpu_dpo.py's CPU smoke mode: the benchmark's model work (a QLoRA NF4 Mistral-shaped model at two
max_lengths, an unquantized Llama-shaped one; stock TRL DPOTrainer and alignkit's defaults, each a full DPO step:
reference pass, policy forward and backward, optimizer) runs on toy shapes, and the result file carries the keys
the GPU run fills in. The speed figures of a CPU smoke say nothing and are not asserted. The per-device batch
search (bench.batch_search) keeps the largest batch that fit, on a fake predicate and on the smoke run with a
faked out-of-memory limit."""

from __future__ import annotations

import json
import tempfile

import pytest


def test_cpu_smoke_runs_every_scenario_and_writes_the_result_keys(tmp_path, monkeypatch):
    from bench import gpu_dpo

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the workers' output folders go

    gpu_dpo.main(["--cpu-smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    assert not list((tmp_path / "tmp").glob("gpu-dpo-*"))  # each run left an empty folder in /tmp
    result = json.loads((tmp_path / "gpu_dpo_smoke.json").read_text())
    assert result["cpu_smoke"] and result["machine"]["versions"]["trl"]
    for name in ("qlora_7b_1024", "qlora_7b_2048", "dense_1b"):
        scenario = result[name]
        trl, ours = scenario["configs"]["trl"], scenario["configs"]["alignkit"]
        assert not trl["prefix_sharing"] and ours["prefix_sharing"]  # each side ran as itself
        assert trl["batch"] == ours["batch"] == 2 and not scenario["batch_search"]  # fixed: no search on the smoke
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


def test_the_batch_search_keeps_the_largest_batch_that_fit():
    from bench.batch_search import is_out_of_memory, largest_batch

    fits = lambda batch: batch <= 13  # noqa: E731 - a GPU that holds 13 pairs
    assert largest_batch(fits, start=4) == (8, [[4, True], [8, True], [16, False]])
    assert largest_batch(fits, start=32) == (8, [[32, False], [16, False], [8, True]])
    assert largest_batch(lambda b: True, start=4, cap=20) == (16, [[4, True], [8, True], [16, True]])
    assert largest_batch(lambda b: False, start=2) == (None, [[2, False], [1, False]])
    import torch

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    stderr = "torch.OutOfMemoryError: CUDA out of memory."  # a worker process's last words
    assert is_out_of_memory(RuntimeError(f"bench.gpu_dpo worker failed (1) for {{...}}:\n{stderr}"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug stops the search


def test_cpu_smoke_searches_the_batch_under_a_faked_memory_limit(tmp_path, monkeypatch):
    import argparse

    from bench import batch_search, gpu_dpo

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    gpu_dpo.main(["--cpu-smoke", "--only", "dense_1b", "--smoke-fits", "2", "--out", str(tmp_path),
                  "--work", str(work)])
    scenario = json.loads((tmp_path / "gpu_dpo_smoke.json").read_text())["dense_1b"]
    assert scenario["batch"] == {"trl": 2, "alignkit": 2}  # 2 fitted, 4 "ran out of memory"
    assert scenario["batch_search"] == {"trl": [[2, True], [4, False]], "alignkit": [[2, True], [4, False]]}
    assert all(c["batch"] == 2 and c["runs"][0]["tokens"] > 0 for c in scenario["configs"].values())
    rows = batch_search.worst_rows(2, max_length=64)  # the tries' pairs: every answer longer than max_length
    assert all(len(r[k][0]["content"].split()) == 64 for r in rows for k in ("chosen", "rejected"))
    # A later call with the same --work folder reuses the search: no try runs again.
    monkeypatch.setattr(gpu_dpo, "_run", lambda *a, **k: pytest.fail("a try ran again"))
    a = argparse.Namespace(batch=None, batch_start=2, max_batch=4, smoke_fits=2, cpu_smoke=True)
    batches, _ = gpu_dpo.batch_sizes("dense_1b", gpu_dpo.SMOKE["dense_1b"], gpu_dpo.configurations(False), {}, a, work)
    assert batches == {"trl": 2, "alignkit": 2}


def test_the_gpu_session_script_runs_its_steps_within_its_budget(tmp_path):
    """bench/gpu_session.sh, the prepared commands for the first session lent a GPU, at toy size on the CPU (its
    `install` is pip's own --no-index --target, not run here): without a command it prints its usage; `run`
    gives every step one line in summary.txt, in order, having run to its end, been stopped at the budget or not
    started for want of it, and the first step (the headline benchmark) leaves its result file."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "GPU_SESSION_CPU": "1",
           "PYTHON": sys.executable, "ALIGNKIT_CACHE": str(tmp_path / "cache")}
    usage = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "device run (carry [\"wheels\"])" in usage.stdout
    run = subprocess.run(["bash", "bench/gpu_session.sh", "run", "40"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    steps = ["gpu_dpo-qlora_7b_1024", "gpu_dpo-dense_1b", "gpu_dpo-qlora_7b_2048", "gpu_smoke"]
    assert [line.split(":")[0] for line in lines] == steps, run.stdout + run.stderr
    assert lines[0].startswith("gpu_dpo-qlora_7b_1024: exit 0 after")
    assert all(" exit " in line or ": not run (" in line for line in lines)
    assert json.loads((tmp_path / "out" / "gpu_dpo-qlora_7b_1024" / "gpu_dpo_smoke.json").read_text())["qlora_7b_1024"]
    assert lines[-1].startswith("gpu_smoke: not run (") or "exit 124" in lines[-1]  # 40 s: the smoke does not fit
