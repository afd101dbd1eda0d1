"""What every benchmark shares: the machine, a fixed ~28M-parameter Llama-style model, preference data, subprocesses.

The model is built here, never downloaded: a word-level tokenizer over 8,192 made-up words (one word is one
token, so lengths are exact) and a randomly initialised Llama (seeded, so every run and every configuration
gets the same weights).

The preference data has the heavy-tailed lengths of real chat preference data (log-normal prompt and answer
lengths; UltraFeedback-like in shape: most answers short, a long tail beyond max_length), scaled by
`length_scale` so a run fits a 2-core CPU; the max_length settings under comparison are scaled by the same
factor, so the share of sequences they cut is the one they would cut at full length. What makes an answer
preferred is simple and learnable in a few dozen steps from a random model: chosen answers use words of a
"helpful" subset more often than rejected ones. Reward accuracy on held-out pairs measures whether a
configuration learns it as well as another (label noise keeps its ceiling below 1: some rejected answers have
more helpful words than their chosen one).
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lengths at full scale, in tokens: log-normal medians and spreads (sigma of the log).
PROMPT_MEDIAN, PROMPT_SIGMA = 100, 1.0
ANSWER_MEDIAN, ANSWER_SIGMA = 250, 0.8
LONGEST = 2048  # no sequence part is longer, at full scale
# A small "helpful" subset: a randomly initialised model's LM head can raise 16 words' logits together (their
# rows share a direction) but not 400 (their sum is nearly orthogonal to any one of them).
HELPFUL_SHARE = 16
CHOSEN_RATE, REJECTED_RATE = 0.3, 0.1  # share of an answer's words drawn from it: chosen answers usually have more
SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=4096)


# ---------------------------------------------------------------------------------------------- the machine
def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- words
def words() -> list[str]:
    """8,186 distinct made-up words (consonant-vowel syllables), the same on every run."""
    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    found: dict[str, None] = {}
    while len(found) < MODEL["vocab_size"] - len(SPECIAL):
        found["".join(rng.choice(syllables) for _ in range(rng.choice((2, 3))))] = None
    return list(found)


def helpful_and_filler() -> tuple[list[str], list[str]]:
    vocab = words()
    return vocab[:HELPFUL_SHARE], vocab[HELPFUL_SHARE:]


# ---------------------------------------------------------------------------------------------- the model
def build_model(folder: Path) -> Path:
    """Save the tokenizer and the seeded random Llama to `folder` (a few seconds); returns the folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    vocab = {token: i for i, token in enumerate(SPECIAL + words())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<|pad|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[:3]})
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- the data
def _length(rng: random.Random, median: float, sigma: float, scale: float) -> int:
    return max(1, min(round(LONGEST * scale), round(rng.lognormvariate(0.0, sigma) * median * scale)))


def _answer(rng: random.Random, n: int, rate: float, helpful: list[str], filler: list[str]) -> str:
    return " ".join(rng.choice(helpful) if rng.random() < rate else rng.choice(filler) for _ in range(n))


def preference_rows(n: int, length_scale: float, seed: int = 0, long_prompts: bool = False) -> list[dict]:
    """n conversational preference pairs (prompt / chosen / rejected) with heavy-tailed lengths.

    With `long_prompts`, each prompt has at least as many words as the longer of its two answers, so the prompt
    is at least half of each sequence (the data prefix sharing is measured on: multi-turn chats, long contexts).
    """
    rng = random.Random(seed)
    helpful, filler = helpful_and_filler()
    rows = []
    for _ in range(n):
        prompt_n = _length(rng, PROMPT_MEDIAN, PROMPT_SIGMA, length_scale)
        if long_prompts:  # the answer lengths first; without it the draws stay in their old order (same data)
            chosen_n, rejected_n = (_length(rng, ANSWER_MEDIAN, ANSWER_SIGMA, length_scale) for _ in range(2))
            prompt_n = max(prompt_n, chosen_n, rejected_n)
        prompt = " ".join(rng.choice(filler) for _ in range(prompt_n))
        if not long_prompts:
            chosen_n, rejected_n = (_length(rng, ANSWER_MEDIAN, ANSWER_SIGMA, length_scale) for _ in range(2))
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": _answer(rng, chosen_n, CHOSEN_RATE, helpful, filler)}],
            "rejected": [{"role": "assistant", "content": _answer(rng, rejected_n, REJECTED_RATE, helpful, filler)}],
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------- subprocesses
def run_worker(module: str, spec: dict, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run `python -m bench.<module> --worker SPEC` in a fresh process (so its peak RSS is its own); the worker
    prints one JSON line starting with RESULT."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--worker", json.dumps(spec)], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **(env or {})},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench.{module} worker failed ({proc.returncode}) for {spec}:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def set_threads(threads: int | None) -> None:
    """Use `threads` torch threads here and in every worker started after this (None: torch's default).

    Under other processes' load, a parallel region waits for its slowest thread, and a thread that lost its
    core waits a whole time slice: small operations then run several times slower with 2 threads than with 1.
    """
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)
        import torch

        torch.set_num_threads(threads)


def offline_env() -> None:
    """Benchmarks never touch the network (the Hub, wandb)."""
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
