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


# ---------------------------------------------------------------------------------------------------------
# vLLM: the fast path for generation at scale (label.py, evaluate.py) when it is installed and a GPU is there.


def resolve_backend(requested: str = "auto") -> str:
    """"vllm" or "transformers"; auto picks vLLM when it is installed and CUDA is available, with one log line."""
    import importlib.util

    from . import logger

    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm":
        if not has_vllm:
            raise ValueError("--backend vllm needs vLLM: pip install vllm (on a machine with a CUDA GPU)")
        return "vllm"
    if requested == "transformers":
        return "transformers"
    if has_vllm and torch.cuda.is_available():
        logger.info("generation backend: vllm (installed, CUDA available)")
        return "vllm"
    why = "no CUDA device" if has_vllm else "vLLM is not installed (pip install vllm on a GPU machine)"
    logger.info(f"generation backend: transformers ({why})")
    return "transformers"


def vllm_generate(model_id: str, conversations: list[list[dict]], max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  trust_remote_code: bool = False, chat_template: str | None = None) -> list[str]:
    """The same answers as `generate`, from vLLM: one base model, plus at most one LoRA adapter on top."""
    from pathlib import Path

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from .models import adapter_chain, adapter_config, load_tokenizer

    base, chain = adapter_chain(model_id)
    if len(chain) > 1:
        raise ValueError(
            f"{model_id} is a chain of {len(chain)} adapters; vLLM serves one adapter on a base. Merge the chain "
            f"first (python merge.py --adapter_dir {model_id}) and pass the merged folder."
        )
    # The chat template travels with the adapter when training saved one there.
    template_source = chain[-1] if chain and Path(chain[-1], "tokenizer_config.json").is_file() else base
    template = chat_template or load_tokenizer(template_source, trust_remote_code=trust_remote_code).chat_template
    rank = adapter_config(chain[0])["r"] if chain else 16
    llm = LLM(model=base, enable_lora=bool(chain), max_lora_rank=max(rank, 8), seed=seed or 0,
              trust_remote_code=trust_remote_code)
    params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            max_tokens=max_new_tokens, seed=seed)
    lora = LoRARequest("adapter", 1, chain[0]) if chain else None
    outputs = llm.chat(conversations, params, lora_request=lora, chat_template=template, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outputs]
