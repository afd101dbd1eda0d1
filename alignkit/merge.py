"""Merge adapters into their base model, check the merge, and save a standalone model.

The base is loaded in full precision: merging into 4-bit weights rounds the adapter's small update away.
A chain (base -> SFT adapter -> DPO adapter) merges in order. Before the merged model is saved, its logits on
a few prompts are compared with the unmerged base-plus-adapters model; a difference above the tolerance is
an error that says by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import logger

# Max |logit difference| accepted between the merged and the unmerged model, by compute dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}
CHECK_PROMPTS = ["Hello! What can you do?", "Name three fruits.", "Explain gravity to a child in one sentence."]


@dataclass
class _MergeSource:
    """The ModelSettings fields load_model reads, for a merge."""

    model_id: str
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    quantization: str = "none"
    attn_implementation: str = "eager"  # the plainest kernel, so both sides of the check compute alike
    use_liger: str = "false"


def _check_inputs(tokenizer, device):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template else p
        for p in CHECK_PROMPTS
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = side
    return batch


def merge_adapters(adapter_dir: str, output_dir, dtype: str = "auto", max_shard_size: str = "5GB",
                   trust_remote_code: bool = False) -> Path:
    from .models import load_model

    loaded = load_model(_MergeSource(str(adapter_dir), dtype=dtype, trust_remote_code=trust_remote_code),
                        full_precision=True)
    if not loaded.adapters:
        raise ValueError(f"{adapter_dir} holds no adapter_config.json: there is nothing to merge")
    model, tok = loaded.model, loaded.tokenizer
    batch = _check_inputs(tok, model.device)
    with torch.no_grad():
        model.base_model.set_adapter(loaded.frozen)  # every adapter of the chain on, as in training
        expected = model(**batch).logits
        merged = model.merge_and_unload(adapter_names=loaded.frozen)
        got = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    diff = (expected - got).abs()[mask].max().item()
    tolerance = TOLERANCE[loaded.dtype]
    if diff > tolerance:
        raise RuntimeError(
            f"merge check failed: merged logits differ from base+adapter by up to {diff:.3g} "
            f"(tolerance {tolerance:g} for {loaded.dtype}); the merged model was not saved"
        )
    logger.info(f"merge check: max |logit difference| {diff:.2e} <= {tolerance:g}")
    out = Path(output_dir)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)
    merged.generation_config.pad_token_id = tok.pad_token_id
    merged.generation_config.eos_token_id = tok.eos_token_id
    merged.generation_config.save_pretrained(out)
    return out
