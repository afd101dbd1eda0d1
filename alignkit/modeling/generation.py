"""Batched generation through the tokenizer's chat template (used by evaluation, labeling and the tests).

`load_generator(settings, backend)` is what label.py and evaluate.py use: the model loaded once on vLLM or
transformers (`--backend`), then called chunk by chunk with the same arguments and answers either way.

Prompts are rendered with the generation prompt and left-padded, so every row of a batch ends where its
answer begins; the answer is cut at the tokenizer's eos token (which the loader keeps distinct from pad).
Batches are made of prompts of similar length (longest first), and the answers returned in the caller's
order: a short prompt batched with a long one would be padded to its length, and the padding costs as much
compute as real tokens (about a fifth of the time on varied chat prompts, see bench/generation_speed.py).
Where a batch is still mostly padding (a few prompts of mixed lengths), a CPU computes the prompts' cache row by
row without it (`ragged_prefill`).
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import torch

from alignkit.modeling.template_rows import render


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
    progress=None,
    templates: list[dict] | None = None,
    seeds: list[int] | None = None,
) -> list[str]:
    """One answer per conversation (a list of role/content messages ending with a user turn).

    temperature 0 means greedy decoding; above 0, sampling with top_p. `progress` (alignkit.core.progress.Progress)
    counts the answers batch by batch. `templates`: each conversation's arguments of the chat template (tools,
    enable_thinking, ...), or None. `seeds`: one per conversation: each samples from its own random stream
    (rows_sampled), so its answer does not depend on which others share its batch, nor on --batch_size; else `seed`
    seeds torch once for the call.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if seeds is not None and len(seeds) != len(conversations):
        raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
    per_row = seeds is not None and temperature > 0 and num_beams == 1
    templates = templates or [None] * len(conversations)
    texts = [render(tokenizer, c, t) for c, t in zip(conversations, templates, strict=True)]  # a refusal: one line
    # The template already wrote any bos token; adding special tokens again would double it.
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: out-of-memory shows at once
    answers: list[str] = [""] * len(texts)
    # Beam sampling draws for beams, not rows: no per-row stream fits it, so each conversation goes alone, seeded by
    # its own seed (its answer then depends on nothing else in the call, as the caches that omit the batch assume).
    beam_sampled = seeds is not None and temperature > 0 and num_beams > 1
    step = 1 if beam_sampled else batch_size
    with no_router_logits(model), _padded_on(tokenizer, "left"):
        for start in range(0, len(order), step):
            rows = order[start : start + step]
            batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            if beam_sampled:
                torch.manual_seed(seeds[rows[0]] % 2**63)
            with rows_sampled([seeds[i] for i in rows]) if per_row else contextlib.nullcontext() as draws:
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    **(ragged_prefill(model, batch) if num_beams == 1 else {}), **sampling,
                )
            if per_row and not draws[0]:
                raise RuntimeError("transformers sampled without torch.multinomial over the batch: alignkit's "
                                   "per-answer seeding (generation.rows_sampled) needs updating for this version")
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                answers[i] = text.strip()
            if progress is not None:
                progress.update(len(rows))
    return answers


@contextlib.contextmanager
def _padded_on(tokenizer, side: str):
    """The tokenizer pads on `side` inside, as it did after."""
    before, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield
    finally:
        tokenizer.padding_side = before


def _router_logits_off(model) -> list:
    """A mixture of experts configured to return its router logits (for the training loss) computes that loss from
    the 2D padding mask at every step, which the cached decoding's shorter inputs do not fit: a crash on any padded
    batch. Generation needs no router loss: turned off in the model's configs (returned, to turn on again)."""
    config = model.config
    routers = [c for c in {id(c): c for c in (config, config.get_text_config())}.values()
               if getattr(c, "output_router_logits", False)]
    for c in routers:
        c.output_router_logits = False
    return routers


@contextlib.contextmanager
def no_router_logits(model):
    """While generating (`generate`, and rl.py's rollouts through TRL's generate): see `_router_logits_off`."""
    routers = _router_logits_off(model)
    try:
        yield
    finally:
        for c in routers:
            c.output_router_logits = True


_REAL_MULTINOMIAL = torch.multinomial
_ROWS = threading.local()  # this thread's open rows_sampled: (its seeds, their generators, its draw count)
_INSTALL = threading.Lock()  # guards _open_in, the threads with rows_sampled open: torch.multinomial is ours while any
_open_in = 0


def _multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
    """torch.multinomial while some thread has rows_sampled open: that thread's batch draws row by row; every other
    call, and every other thread's, is torch's own."""
    rows = getattr(_ROWS, "open", None)
    if rows is not None and generator is None and out is None and probs.dim() == 2 and probs.shape[0] == len(rows[0]):
        seeds, generators, draws = rows
        if not generators:  # made on the device the probabilities are on (a model split over devices ends elsewhere)
            generators.extend(torch.Generator(device=probs.device).manual_seed(int(seed) % 2**63) for seed in seeds)
        draws[0] += 1
        return torch.cat([_REAL_MULTINOMIAL(probs[i : i + 1], num_samples, replacement, generator=g)
                          for i, g in enumerate(generators)])
    return _REAL_MULTINOMIAL(probs, num_samples, replacement, generator=generator, out=out)


@contextlib.contextmanager
def rows_sampled(seeds: list[int]):
    """While open, transformers' sampling in this thread draws each row of a batch from its own torch.Generator
    (seeded per row): the row's t-th token uses its generator's t-th draw, whatever else is in the batch.
    transformers samples every row from torch's one global stream (torch.multinomial over the batch), so a sampled
    answer changed with its batch's other rows and the batch size. Everything else of sampling is transformers' own
    (temperature, top_k, top_p and the model's generation config); other threads sample as torch does. Yields a
    count of the batch draws, which the caller checks: a transformers that no longer samples this way fails loudly
    instead of seeding per call."""
    draws = [0]
    outer, _ROWS.open = getattr(_ROWS, "open", None), (list(seeds), [], draws)
    global _open_in
    with _INSTALL:
        _open_in += 1
        torch.multinomial = _multinomial
    try:
        yield draws
    finally:
        _ROWS.open = outer
        with _INSTALL:
            _open_in -= 1
            if not _open_in:
                torch.multinomial = _REAL_MULTINOMIAL


RAGGED_PREFILL_PADDING = 0.25  # share of a batch's prompt positions that are padding, from which it pays


def ragged_prefill(model, batch) -> dict:
    """On a CPU, the prompts' KV cache computed row by row without padding, then left-padded into one batch cache
    that `model.generate` continues from: the cache as generate's keyword argument, or {} where the padded batch
    is as good or this cannot apply.

    A left-padded batch computes every padding position of its prompts like a real token: with prompts of
    mixed lengths in one batch (a few prompts, or the long tail of a sorted set) that is most of the prompt
    work, and a CPU, which is compute-bound, pays for all of it (about a quarter of the time of 16 mixed chat
    prompts answered with 32 tokens: bench/generation_speed.py). Each row's cache holds its prompt but the last
    token, right-aligned; padded slots are masked by the attention mask as before, and positions count from each
    row's first real token in both cases, so generation continues exactly as from the padded prefill (the
    tests compare greedy answers). A GPU computes the padding in parallel, where row-by-row calls would only
    add latency; caches other than plain full-attention layers (sliding windows, state-space layers) keep the
    padded path.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    lengths = mask.sum(dim=1).tolist()
    padding = rows * width - sum(lengths)
    if model.device.type != "cpu" or rows < 2 or width < 2 or padding < RAGGED_PREFILL_PADDING * rows * width:
        return {}
    caches = []
    for i, n in enumerate(lengths):
        if n < 2:  # nothing before its last token: its slots stay padding
            caches.append(None)
            continue
        try:
            out = model(input_ids=ids[i : i + 1, width - n : width - 1], use_cache=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            return {}
        name = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.x
        cache = out[name]
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return {}
        caches.append(cache)
    present = [(i, c) for i, c in enumerate(caches) if c is not None]
    if not present:
        return {}
    merged = DynamicCache()
    for layer in range(len(present[0][1].layers)):
        first = present[0][1].layers[layer]  # keys and values may differ in head size
        keys = first.keys.new_zeros(rows, first.keys.shape[1], width - 1, first.keys.shape[3])
        values = first.values.new_zeros(rows, first.values.shape[1], width - 1, first.values.shape[3])
        for i, cache in present:
            n = cache.layers[layer].keys.shape[-2]  # right-aligned: its slots before are the row's padding
            keys[i, :, width - 1 - n :] = cache.layers[layer].keys[0]
            values[i, :, width - 1 - n :] = cache.layers[layer].values[0]
        merged.update(keys, values, layer)
    return {name: merged}


# ---------------------------------------------------------------------------------------------------------
# Backends: the one entry point for label.py and evaluate.py. vLLM is the fast path for generation at scale
# when it is installed and a GPU is there; transformers (`generate` above) runs everywhere.


def resolve_backend(requested: str = "auto", num_beams: int = 1) -> str:
    """"vllm" or "transformers"; auto picks vLLM when it is installed and CUDA is available, with one log line."""
    import importlib.util

    from alignkit import logger
    from alignkit.core.args import ConfigError

    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm":
        if not has_vllm:
            raise ConfigError("--backend vllm needs vLLM: pip install vllm (on a machine with a CUDA GPU)")
        if num_beams > 1:  # vLLM's sampling has no beam search; silently sampling instead would mislead
            raise ConfigError("--num_beams > 1 (beam search) runs on --backend transformers only")
        return "vllm"
    if requested == "transformers":
        return "transformers"
    if has_vllm and torch.cuda.is_available():
        if num_beams > 1:
            logger.info("generation backend: transformers (beam search, --num_beams > 1, is not in vLLM)")
            return "transformers"
        logger.info("generation backend: vllm (installed, CUDA available)")
        return "vllm"
    why = "no CUDA device" if has_vllm else "vLLM is not installed (pip install vllm on a GPU machine)"
    logger.info(f"generation backend: transformers ({why})")
    return "transformers"


def load_generator(s, backend: str = "auto") -> Generator:
    """The model `s.model_id` (loader settings: alignkit.core.config.ModelSettings) loaded once on `backend`, ready
    to be called chunk after chunk, so callers can save each chunk's answers as it comes (crash safety).

    Only the chosen backend loads the model: with vLLM, transformers never holds the weights too.
    """
    backend = resolve_backend(backend)  # a resolved name passes through without a log line
    from alignkit.modeling.reward_models import check_model_kind

    check_model_kind(s.model_id, s.revision, reward=False)  # a reward model cannot generate, on either backend
    return VLLMGenerator(s) if backend == "vllm" else TransformersGenerator(s)


class Generator:
    """generator(conversations, max_new_tokens=, temperature=, top_p=, num_beams=, batch_size=, seed=, seeds=,
    templates=) -> one answer per conversation, in order, as `generate` gives them; leaving a `with` block frees
    the model. Each conversation renders with --chat_template_kwargs, its own `templates` entry (a prompt row's
    tools and chat_template_kwargs) on top."""

    chat_template_kwargs: dict = {}
    as_loaded: dict = {}  # how the model was loaded after every `auto`: backend, dtype, quantization

    def templates(self, conversations, templates) -> list[dict]:
        return [{**(self.chat_template_kwargs or {}), **(t or {})}
                for t in (templates or [None] * len(conversations))]

    def close(self) -> None:
        """Free the model's memory: the judge, or the next model, may need it."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TransformersGenerator(Generator):
    def __init__(self, s):
        from alignkit.modeling.models import load_model, require_chat_template

        self.loaded = load_model(s)
        require_chat_template(self.loaded.tokenizer, s.model_id)
        self.as_loaded = {"backend": "transformers", "dtype": str(self.loaded.dtype).removeprefix("torch."),
                          "quantization": self.loaded.quantization}
        self.chat_template_kwargs = dict(getattr(s, "chat_template_kwargs", None) or {})

    def __call__(self, conversations, templates=None, **sampling):
        return generate(self.loaded.model, self.loaded.tokenizer, conversations,
                        templates=self.templates(conversations, templates), **sampling)

    def close(self) -> None:
        self.loaded = None
        super().close()


def _snapshot(source: str, revision: str | None) -> str:
    """`source` as it is, or for a Hub repo at a revision its snapshot folder (downloaded once; offline, the cached
    one), for an engine that takes a path and no revision."""
    if not revision or Path(source).exists():
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source, revision=revision)


def vllm_memory(s, base: str, revision: str | None) -> dict:
    """vLLM's max_model_len and gpu_memory_utilization (GenerationSettings; defaults where `s` lacks them).

    max_model_len: vLLM sizes the KV cache for the model's whole context by default and refuses to start when one
    sequence of it does not fit (a 128k-context model on a 24 GB GPU); --max_model_len caps it, and is itself
    capped at the model's context, which vLLM refuses to exceed.
    gpu_memory_utilization: vLLM's 0.9 is a share of the GPU's *total* memory, checked against what is free at
    start: a second engine in the same process (generator B, a judge, the next model while the last one's memory
    is still being released) would not start. By default each engine takes 90% of what is free when it starts.
    """
    from transformers import AutoConfig

    from alignkit import logger
    from alignkit.modeling.models import local_gpu

    config = AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=s.trust_remote_code)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    wanted = getattr(s, "max_model_len", 8192)
    length = min(wanted, context) if context else wanted
    share = getattr(s, "gpu_memory_utilization", None)
    if share is None:
        free, total = torch.cuda.mem_get_info(local_gpu())
        share = round(0.9 * free / total, 3)
    logger.info(f"vLLM: max_model_len {length} (model context {context}), gpu_memory_utilization {share}")
    return {"max_model_len": length, "gpu_memory_utilization": share}


class VLLMGenerator(Generator):
    """One base model, plus at most one LoRA adapter on top (vLLM serves adapters, not chains of them).

    The loader's quantization and attention settings are transformers' own; vLLM serves in `--dtype` and
    picks its kernels itself.
    """

    def __init__(self, s):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from alignkit import logger
        from alignkit.modeling.models import (
            adapter_config, check_trained_over, load_tokenizer, require_chat_template, resolve, tokenizer_source,
        )

        resolved = resolve(s.model_id, s.revision)  # each part at its revision
        check_trained_over(resolved)  # a part below retrained in place: refused, as the transformers loader does
        base, revision, chain, deltas, revisions = resolved
        if deltas:  # LoTA deltas: vLLM has no way to add them
            raise ValueError(
                f"{s.model_id} holds a LoTA delta; vLLM serves LoRA adapters only. Merge it first (python merge.py "
                f"--adapter_dir {s.model_id}) and pass the merged folder, or use --backend transformers."
            )
        if len(chain) > 1:
            raise ValueError(
                f"{s.model_id} is a chain of {len(chain)} adapters; vLLM serves one adapter on a base. Merge the "
                f"chain first (python merge.py --adapter_dir {s.model_id}) and pass the merged folder."
            )
        if s.quantization in ("4bit", "8bit"):
            logger.warning(f"--quantization {s.quantization} applies to --backend transformers; vLLM serves "
                           f"{base} unquantized")
        # The tokenizer (and its chat template) travels with the adapter when training saved one there; the
        # template is checked and resolved here, as the transformers path does, so both answer alike.
        tok_source, tok_revision = tokenizer_source(resolved, base, revision)
        tokenizer = load_tokenizer(tok_source, tok_revision, s.trust_remote_code, s.chat_template)
        require_chat_template(tokenizer, s.model_id)
        self.template, self.tokenizer = tokenizer.chat_template, tokenizer
        self.chat_template_kwargs = dict(getattr(s, "chat_template_kwargs", None) or {})
        # A Hub adapter at a revision goes to vLLM as its snapshot folder: a LoRARequest names no revision.
        adapter = _snapshot(chain[0], revisions[chain[0]]) if chain else None
        # vLLM accepts LoRA ranks 8, 16, 32, ...: the adapter's rank rounded up to one of them.
        rank = adapter_config(adapter)["r"] if chain else 8
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(s.dtype, "auto")
        self.llm = LLM(model=base, tokenizer=tok_source, revision=revision, dtype=dtype,
                       tokenizer_revision=tok_revision,
                       trust_remote_code=s.trust_remote_code, enable_lora=bool(chain),
                       max_lora_rank=max(8, 1 << (rank - 1).bit_length()), **vllm_memory(s, base, revision))
        self.lora = LoRARequest("adapter", 1, adapter) if chain else None
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)  # as vLLM serves it
        self.as_loaded = {"backend": "vllm", "dtype": str(getattr(config, "dtype", None) or dtype).removeprefix(
            "torch."), "quantization": str(getattr(config, "quantization", None) or "none")}  # AWQ, GPTQ, FP8 served so

    def __call__(self, conversations, max_new_tokens=256, temperature=0.0, top_p=1.0, num_beams=1,
                 batch_size=16, seed=None, progress=None, templates=None, seeds=None):
        from vllm import SamplingParams

        if num_beams > 1:
            raise ValueError("--num_beams > 1 (beam search) runs on --backend transformers only")
        # batch_size is not passed on: vLLM schedules its own batches (continuous batching) within a call. `seeds`:
        # one request's own seed each (vLLM samples a seeded request from its own generator).
        def sampling(row_seed):
            return SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                  max_tokens=max_new_tokens, seed=row_seed)

        params = [sampling(row_seed) for row_seed in seeds] if seeds is not None else sampling(seed)
        templates = self.templates(conversations, templates)
        for conversation, template in zip(conversations, templates):  # vLLM renders with the same template: a
            render(self.tokenizer, conversation, template)           # refusal is one line first
        # vLLM takes one set of template arguments per call: one call per distinct set, answers back in order.
        groups: dict[str, list[int]] = {}
        for i, template in enumerate(templates):
            groups.setdefault(json.dumps(template, sort_keys=True, default=str), []).append(i)
        answers: list[str] = [""] * len(conversations)
        for rows in groups.values():
            template = dict(templates[rows[0]])
            tools = template.pop("tools", None)
            extra = {"tools": tools} if tools else {}
            if template:
                extra["chat_template_kwargs"] = template
            outputs = self.llm.chat([conversations[i] for i in rows],
                                    [params[i] for i in rows] if isinstance(params, list) else params,
                                    lora_request=self.lora, chat_template=self.template, use_tqdm=False, **extra)
            for i, o in zip(rows, outputs, strict=True):
                answers[i] = o.outputs[0].text.strip()
        if progress is not None:  # scheduled by vLLM: counted when the calls return
            progress.update(len(conversations))
        return answers

    def close(self) -> None:
        """Shut the engine down and wait until the GPU has its memory back. vLLM's engine core runs in a process of
        its own, which lets go of its memory some time after the engine is dropped; the next engine (a judge, the
        next model, rlaif.py's next round) reads the free memory to size itself and profiles its own load against
        it, and fails ("Error in memory profiling") when memory is still being released meanwhile."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        super().close()  # garbage-collects the engine (vLLM frees GPU memory only then) and empties torch's cache
        if torch.cuda.is_available():
            from alignkit.core.launch import local_gpu

            settled_free_memory(local_gpu())


def settled_free_memory(device: int, step_s: float = 0.5, timeout_s: float = 60.0, sleep=None) -> int:
    """The GPU's free memory once it has stopped rising (two readings `step_s` apart within 64 MiB), or after
    `timeout_s`: memory another process is still releasing is not yet free."""
    import time

    sleep = sleep or time.sleep
    last = torch.cuda.mem_get_info(device)[0]
    for _ in range(max(1, int(timeout_s / step_s))):
        sleep(step_s)
        now = torch.cuda.mem_get_info(device)[0]
        if now - last < 64 << 20:
            return now
        last = now
    return last
