"""Batched generation through the tokenizer's chat template (used by evaluation, labeling and the tests).

Prompts are rendered with the generation prompt and left-padded, so every row of a batch ends where its
answer begins; the answer is cut at the tokenizer's eos token (which the loader keeps distinct from pad).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    batch_size: int = 16,
    seed: int | None = None,
) -> list[str]:
    """One answer per conversation (a list of role/content messages ending with a user turn).

    temperature 0 means greedy decoding; above 0, sampling with top_p.
    """
    if seed is not None:
        torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in conversations[start : start + batch_size]
            ]
            # The template already wrote any bos token; adding special tokens again would double it.
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers
