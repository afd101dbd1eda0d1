"""Before `--attn_implementation auto` loads flex_attention for prefix sharing: does its kernel work on this GPU?

FlexAttention compiles a Triton kernel for the model's head size, dtype and this GPU, and that compile can fail
where the rest of the model runs: its backward needs more shared memory than many GPUs have at head sizes over
128 (Gemma's 256 on an RTX 4090, an A10G or a Blackwell workstation card: "No valid triton configs.
OutOfMemoryError: out of resource", pytorch/pytorch#133254, #180278, #198224), and a kernel can compile and still
be wrong. A user who chose nothing should not meet either in the middle of a run.

So `check` runs, on this process's GPU, one packed prefix-sharing attention the way the model will: the masks of
alignkit.train.prefix.pack_pairs (two pairs of different lengths, the model's sliding window), the model's head
size, query and key-value heads, logit softcap and compute dtype, through transformers' own compiled
`flex_attention_forward` in training mode; then its backward. It compares the output and the gradients of the
query, key and value with plain attention under the same mask, computed in float32 from the same (rounded)
inputs. Either failing (an exception, or a difference past the dtype's tolerance) sends `auto` to its plain
choice with the reason in its one log line (alignkit.core.kernels.resolve_attention).

Cost: a compile of the forward and backward kernels at a 256-token shape, about what the run's own first batch
shape costs (transformers compiles flex_attention once per process, and a second shape recompiles it with
dynamic shapes anyway). Checked once per process for each model shape, dtype and device.
"""

from __future__ import annotations

import functools

import torch

from alignkit.train import prefix

# Largest |difference| from float32 attention, as a fraction of the largest |reference value| (outputs) or
# |reference gradient| (each of q, k, v), by compute dtype. Plain attention computed wholly in bf16 (fp16) is off
# by under 1e-2 (1e-3) on these inputs, a kernel that accumulates in float32 by less; a wrong mask or kernel is
# off by order 1.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 5e-3}  # float32: TF32 matmuls where on
PROMPT, CHOSEN, REJECTED = (96, 80), (64, 40), (80, 24)  # two pairs: prompt and answer lengths (packed: 256)


def heads(text) -> tuple[int, int, int, int]:
    """(query heads, key-value heads, query/key head size, value head size) of a (text) config's attention."""
    n_heads = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return n_heads, n_kv, head_dim, getattr(text, "v_head_dim", None) or head_dim


def check(config, dtype: torch.dtype, device: str, backward: bool = True) -> tuple[bool, str]:
    """(whether flex_attention trains correctly here, why) for a model with `config` computing in `dtype` on
    `device` (module docstring). `backward=False` checks the forward only (a CPU has no FlexAttention backward)."""
    text = prefix._text_config(config)
    n_heads, n_kv, head_dim, v_dim = heads(text)
    softcap = getattr(text, "attn_logit_softcapping", None)
    windows = prefix.layer_windows(config)
    window = max((w for w in windows.values() if w), default=None) if isinstance(windows, dict) else None
    key = (n_heads, n_kv, head_dim, v_dim, softcap, window, dtype, str(device), backward)
    return _check(*key)


@functools.cache
def _check(n_heads, n_kv, head_dim, v_dim, softcap, window, dtype, device, backward) -> tuple[bool, str]:
    size = f"head size {head_dim}" + (f"/{v_dim}" if v_dim != head_dim else "")
    what = f"{size}, {n_heads} query / {n_kv} key-value heads, {str(dtype).removeprefix('torch.')}"
    try:
        worst = _compare(n_heads, n_kv, head_dim, v_dim, softcap, window, dtype, torch.device(device), backward)
    except Exception as e:  # noqa: BLE001 - any failure of the kernel means: do not train on it
        lines = [line for line in str(e).splitlines() if line.strip()] or [""]
        return False, f"FlexAttention failed its check ({what}): {type(e).__name__}: {lines[0][:300]}"
    finally:
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    name, diff = max(worst.items(), key=lambda item: item[1])
    if diff > TOLERANCE[dtype]:
        return False, (f"FlexAttention disagrees with plain attention ({what}): {name} off by {diff:.1e} of its "
                       f"largest value (tolerance {TOLERANCE[dtype]:.0e})")
    passes = "forward and backward" if backward else "forward"
    return True, f"its kernel passed a {passes} check on this device ({what}; largest difference {diff:.1e})"


def _compare(n_heads, n_kv, head_dim, v_dim, softcap, window, dtype, device, backward) -> dict[str, float]:
    """Run the packed attention under flex_attention and in float32 by hand; the relative differences."""
    from transformers.integrations.flex_attention import flex_attention_forward

    packed = _packed_layout(window, device)
    block_mask, dense = packed.attention_mask, prefix._mask(packed.segment, packed.position_ids, window, "sdpa",
                                                            torch.float32)
    B, L = packed.segment.shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, d, generator=generator).to(device)
               for h, d in ((n_heads, head_dim), (n_kv, head_dim), (n_kv, v_dim)))
    grad_out = torch.randn(B, L, n_heads, v_dim, generator=generator).to(device)
    module = torch.nn.Module()  # flex_attention_forward reads `training` (transformers compiles per mode)
    module.training = backward
    with torch.set_grad_enabled(backward):
        inputs = [t.to(dtype).requires_grad_(backward) for t in (q, k, v)]
        out, _ = flex_attention_forward(module, *inputs, block_mask, softcap=softcap)
        ref_inputs = [t.to(dtype).float().requires_grad_(backward) for t in (q, k, v)]  # the same inputs
        ref = _plain_attention(*ref_inputs, dense, softcap)
        diffs = {"output": _relative(out, ref)}
        if backward:
            (out.float() * grad_out).sum().backward()
            (ref * grad_out).sum().backward()
            for name, got, want in zip("qkv", inputs, ref_inputs, strict=True):
                diffs[f"grad of {name}"] = _relative(got.grad, want.grad)
    return diffs


def _packed_layout(window, device) -> prefix.PackedPairs:
    """Two pairs in TRL's [chosen..., rejected...] layout, packed by pack_pairs for flex_attention."""
    rows = [*zip(PROMPT, CHOSEN, strict=True), *zip(PROMPT, REJECTED, strict=True)]  # (prompt, answer) lengths
    T = max(p + a for p, a in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        answer = 2 if i < len(PROMPT) else 3  # the prompts agree, the answers differ from their first token
        ids[i, :p], ids[i, p:p + a] = torch.arange(4, 4 + p), answer
        mask[i, :p + a], completion[i, p:p + a] = 1, 1
    window_config = type("Windowed", (), {"sliding_window": window})()
    return prefix.pack_pairs(ids.to(device), mask.to(device), completion.to(device),
                             attn_implementation=prefix.FLEX_ATTENTION, config=window_config)


def _plain_attention(q, k, v, allowed, softcap):
    """softmax(q k^T / sqrt(d) [softcapped], masked) v in float32; (B, L, H, Dv) like flex_attention_forward."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
