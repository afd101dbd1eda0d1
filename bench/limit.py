"""The limit: this machine's measured fp32 matmul throughput, and the DPO runs' model FLOPs utilisation against it.

Peak: torch.matmul of two n x n fp32 matrices (2 n^3 FLOPs), best of several repeats at a few sizes, with
torch's default threads. On a shared machine the best repeat is the one least disturbed by other work.

Model FLOPs per computed training token of a LoRA DPO step (non-pad; with prefix sharing a pair's shared prompt
is one set of tokens, not two), counted from the model itself:
  N     = weights of every matmul on a token's path: the decoder's linear layers and the LM head (the input
          embedding is a lookup, no matmul);
  N_l   = LoRA weights of the trained adapter (A and B);
  A     = 2 * layers * hidden * T, causal attention scores and mixing in the forward, T the sequence length
          (averaged per token: sum T^2 / sum T over the measured batches; with prefix sharing the shared prefix's
          s^2 is counted once per pair);
  policy forward 2N + 2N_l + A; policy backward 2N + 2N_l + 2A (gradients of the activations, through the
  frozen weights too) + 2N_l (gradients of the LoRA weights; frozen weights get none);
  reference forward, when it runs in the step: 2N + A.
  => 4N + 6N_l + 3A per token, plus 2N + A with the reference forward every step.
Gradient-checkpointing recomputation and padding are not useful work and are not counted (they show up as a
lower MFU). The usual full fine-tuning convention, 6N (+ 2N for the reference), is reported beside it.
"""

from __future__ import annotations

import time


def matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 5) -> dict:
    import torch

    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b)
            fastest = min(fastest, time.perf_counter() - started)
        best[n] = 2 * n**3 / fastest
    return {"flops_per_s": max(best.values()), "by_size_gflops": {str(n): round(f / 1e9, 1) for n, f in best.items()},
            "threads": torch.get_num_threads(), "repeats": repeats}


def flops_per_token(counts: dict, reference_in_step: bool) -> dict:
    """Model FLOPs per non-pad token (see the module docstring), from the counts a DPO worker reports."""
    n, n_l = counts["matmul_params"], counts["lora_params"]
    attention = 2 * counts["layers"] * counts["hidden"] * counts["mean_tokens_per_sequence_weighted"]
    exact = 4 * n + 6 * n_l + 3 * attention + (2 * n + attention if reference_in_step else 0)
    convention = 6 * n + (2 * n if reference_in_step else 0)
    return {"model_flops_per_token": exact, "convention_6n_flops_per_token": convention}


def mfu(result: dict, peak: float) -> dict:
    per_token = flops_per_token(result["counts"], reference_in_step=not result["precompute"])
    tokens_per_s = result["computed_tokens_per_s"]  # with prefix sharing a prompt is computed (and counted) once
    achieved = per_token["model_flops_per_token"] * tokens_per_s
    return {**per_token, "model_flops_per_s": achieved, "mfu": achieved / peak,
            "mfu_6n_convention": per_token["convention_6n_flops_per_token"] * tokens_per_s / peak}
