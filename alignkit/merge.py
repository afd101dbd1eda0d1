"""Merge adapters into their base model, check the merge, and save a standalone model.

Two ways to merge a QLoRA adapter (see peft#2105, qlora#254):
- default: into the base in full precision. The standard; the result is the original base plus the LoRA
  update. The adapter was trained against the NF4-rounded base, so this model differs slightly from the one
  that was trained. Never merge into the 4-bit weights themselves: re-quantizing rounds the small update away.
- `dequantize=True`: into the NF4 base turned back into plain weights, so the merged model is exactly the one
  that was trained, rounding of the base included. Use it for a QLoRA adapter whose quality you measured
  in training and want to keep bit for bit.

A chain (base -> SFT adapter -> DPO adapter) merges in order. Before anything is saved, the merged model's
logits on a few prompts are compared with the unmerged base-plus-adapters model; a difference above the
tolerance is an error that says by how much.

A reward model (reward.py: a LoRA adapter of task type SEQ_CLS with its score head) merges the same way; the
trained score head replaces the base's, and the check compares the rewards instead of the logits. The merged
model loads with AutoModelForSequenceClassification.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import logger
from .config import ModelSettings

# Max |logit difference| accepted between the merged and the unmerged model, by compute dtype: merging only
# reorders the same arithmetic, so the bound is float noise on logits of order 10.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}
CHECK_PROMPTS = ["Hello! What can you do?", "Name three fruits.", "Explain gravity to a child in one sentence."]
RUN_FILES = ("alignkit_config.json", "metrics.json")  # carried over so the merged folder describes itself


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


def merge_adapters(adapter_dir, output_dir, dtype: str = "auto", base_model: str | None = None,
                   dequantize: bool = False, max_shard_size: str = "5GB", trust_remote_code: bool = False) -> Path:
    """Merge the adapter chain ending at `adapter_dir` into its base; returns the output folder."""
    from .models import REWARD, load_model, model_kind

    reward = model_kind(str(adapter_dir)) == REWARD
    settings = ModelSettings(model_id=str(adapter_dir), dtype=dtype, trust_remote_code=trust_remote_code,
                             attn_implementation="eager", use_liger="false")
    loaded = load_model(settings, full_precision=True, dequantize=dequantize, base_model=base_model, reward=reward)
    if not loaded.adapters:
        raise ValueError(f"{adapter_dir} holds no adapter_config.json: there is nothing to merge")
    model, tok = loaded.model, loaded.tokenizer
    batch = _check_inputs(tok, model.device)
    with torch.no_grad():
        model.base_model.set_adapter(loaded.frozen)  # every adapter of the chain on, as in training
        expected = model(**batch).logits.float()
        merged = model.merge_and_unload(adapter_names=loaded.frozen)
        got = merged(**batch).logits.float()
    # Logits at every real token; a reward model's one score per sequence.
    diff = ((expected - got).abs() if reward else (expected - got).abs()[batch["attention_mask"].bool()]).max().item()
    tolerance = TOLERANCE[loaded.dtype]
    if not diff <= tolerance:  # also catches NaN
        raise RuntimeError(
            f"merge check failed: merged logits differ from base + adapters by up to {diff:.3g} "
            f"(tolerance {tolerance:g} for {loaded.dtype}); nothing was saved"
        )
    logger.info(f"merge check: max |logit difference| {diff:.2e} <= {tolerance:g} over {len(CHECK_PROMPTS)} prompts")
    out = Path(output_dir)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)  # with its chat template
    # Generation stops at the tokenizer's eos (the chat template's end of turn) and pads with its own token.
    if not reward:  # a reward model does not generate, and has no generation config
        merged.generation_config.pad_token_id = tok.pad_token_id
        merged.generation_config.eos_token_id = tok.eos_token_id
        merged.generation_config.save_pretrained(out)
    for name in RUN_FILES:
        if Path(adapter_dir, name).is_file():
            shutil.copy(Path(adapter_dir, name), out / name)
    (out / "merge.json").write_text(json.dumps({
        "base_model": loaded.base_id, "adapters": loaded.adapters, "dequantize": dequantize,
        "dtype": str(loaded.dtype).removeprefix("torch."), "max_logit_difference": diff, "tolerance": tolerance,
        "kind": "reward model" if reward else "causal language model",
    }, indent=2))
    return out
