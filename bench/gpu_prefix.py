"""Prefix sharing on a GPU: is the packed pass (one row per pair, a 4D block mask) faster than two rows per pair
there too, and does it give the same answer log-probs?

    python bench/gpu_prefix.py            # on a CUDA machine: bf16, a ~1.2B Llama-shaped model, random weights
    python bench/gpu_prefix.py --cpu      # a dry run of this script on a tiny model

On a CPU every padding position and every masked attention score costs compute, so the packed row wins by the
prompt tokens it saves (bench/dpo_speed.py). On a GPU, sdpa with a custom mask cannot use the flash kernel, and
the packed row's attention is over a longer sequence, so this measures the trade on one DPO step's model work: the reference
forward (no grad) and the policy forward and backward (weights frozen, as under LoRA), at prompt shares of a quarter, a half and three quarters.
It prints the max |difference| of the summed answer log-probs (packed vs two rows) and the step time of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # alignkit without a pip install


def batch(pairs: int, prompt: int, answer: int, vocab: int, device):
    """TRL's layout: [prompt+chosen rows..., prompt+rejected rows...], right-padded, answers of varied length."""
    import torch

    g = torch.Generator().manual_seed(0)
    width = prompt + answer
    ids = torch.zeros(2 * pairs, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i in range(pairs):
        p = torch.randint(3, vocab, (prompt,), generator=g)
        for row in (i, pairs + i):
            n = int(torch.randint(answer // 2, answer + 1, (1,), generator=g))
            ids[row, :prompt], ids[row, prompt : prompt + n] = p, torch.randint(3, vocab, (n,), generator=g)
            mask[row, : prompt + n] = 1
            completion[row, prompt : prompt + n] = 1
    return ids.to(device), mask.to(device), completion.to(device)


def answer_logps(model, ids, mask, completion, shared: bool):
    """Summed answer log-probs of every row, [chosen..., rejected...], through the packed or the unshared pass."""
    import torch

    from alignkit.train import prefix

    if shared:
        packed = prefix.pack_pairs(ids, mask, completion, attn_implementation=model.config._attn_implementation,
                                   dtype=model.dtype, config=model.config)  # the model's mask form and windows
        logits = model(**packed.model_inputs(), use_cache=False).logits.float()
        labels = packed.shift_labels.clamp(min=0)
        per_token = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        per_token = per_token.masked_fill(packed.shift_labels < 0, 0)
        return packed.unpack(per_token).sum(-1)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    per_token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token * completion[:, 1:]).sum(-1)


def step_seconds(model, data, shared: bool, repeats: int) -> float:
    """Median time of one step's model work: reference forward (no grad), policy forward and backward."""
    import statistics

    import torch

    times = []
    for _ in range(repeats + 1):  # the first warms up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            answer_logps(model, *data, shared)
        answer_logps(model, *data, shared).sum().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="a dry run on a tiny model")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch")
    parser.add_argument("--length", type=int, default=1024, help="prompt + longest answer, in tokens")
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    device = "cpu" if a.cpu else "cuda"
    if a.cpu:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512)
        a.length, a.pairs, a.repeats = 64, 2, 1
    else:  # about Llama-3.2-1B's shape
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):  # initialised where it runs: a CPU takes long over 1B random weights
        check = LlamaForCausalLM(config).float()  # the equality check in fp32
    data = batch(2, a.length // 2, a.length // 2, shape["vocab_size"], device)
    with torch.no_grad():
        gap = (answer_logps(check, *data, True) - answer_logps(check, *data, False)).abs().max().item()
    print(f"fp32, packed vs two rows: max |answer log-prob difference| {gap:.2e}", flush=True)
    del check
    dtype = torch.float32 if a.cpu else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    # As a LoRA run trains: the weights frozen, gradients flowing through every layer to the input.
    model.requires_grad_(False)
    model.enable_input_require_grads()
    if not a.cpu:
        model.gradient_checkpointing_enable()  # as a 24 GB run would train
    name = torch.cuda.get_device_name(0) if not a.cpu else "CPU (dry run)"
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"{name}, {params:.2f}B weights ({dtype}), sdpa, {a.pairs} pairs x {a.length} tokens, median of "
          f"{a.repeats} steps", flush=True)
    print("| prompt share | two rows (s) | packed (s) | speedup |", flush=True)
    print("| ---: | ---: | ---: | ---: |", flush=True)
    for share in (0.25, 0.5, 0.75):
        prompt = int(a.length * share)
        data = batch(a.pairs, prompt, a.length - prompt, shape["vocab_size"], device)
        unshared = step_seconds(model, data, False, a.repeats)
        shared = step_seconds(model, data, True, a.repeats)
        print(f"| {share:.2f} | {unshared:.3f} | {shared:.3f} | {unshared / shared:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
