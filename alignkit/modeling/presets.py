"""The `tiny` preset: the whole pipeline offline, on a CPU, in minutes.

It builds once, and caches under $ALIGNKIT_CACHE (default ~/.cache/alignkit):
- a small Llama-style model (2 layers, 64 wide) with a byte-level BPE tokenizer trained here and a chat
  template, briefly pretrained on chat-formatted text so it already speaks the format;
- data whose preferences a rule can check. The prompt asks for three things of one category ("name three
  fruits."); an answer ("apple,pear,plum.") follows the rule when its three words all belong to that category. Each
  word of the pretraining text is on-topic half of the time, of the SFT demonstrations 60% of the time, and every
  preference pair has a rule-following chosen answer and a rejected one that breaks it. So SFT teaches the format,
  and DPO must teach the rule: held-out reward accuracy rises, and the model follows the rule more often.

`score` and `rule_judge` are the preset's judges for label.py and evaluate.py.

`named(stage)` is every preset's defaults for a script (`tiny` here, `smol` in alignkit.modeling.smol: SmolLM2-135M
from its PyPI wheel), `judge(preset)` the rule judge of `--judge_model rule`, and `ensure` builds what a
preset needs before a script runs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from alignkit import logger
from alignkit.core.errors import UserError
from alignkit.core.paths import build_once, cache_dir

VERSION = "tiny-v3"  # the cache folder's name; an edit to this module rebuilds the preset in it (`_recipe`)
CATEGORIES = {
    "colors": "red blue green yellow purple orange pink brown black white",
    "animals": "cat dog horse cow sheep goat tiger lion bear wolf",
    "fruits": "apple banana cherry grape lemon mango peach pear plum melon",
    "tools": "hammer saw drill wrench chisel pliers shovel rake axe file",
    "vegetables": "carrot potato onion garlic pepper cabbage lettuce celery spinach pea",
    "instruments": "piano guitar violin drum flute trumpet harp cello banjo oboe",
    "sports": "soccer tennis golf rugby hockey boxing rowing skiing surfing cricket",
    "countries": "france spain italy japan china india brazil chile peru egypt",
}
WORDS = {cat: words.split() for cat, words in CATEGORIES.items()}
TEMPLATES = ["name three {c}.", "list three {c}.", "give me three {c}.", "which three {c} come to mind?"]
SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
# {% generation %} marks the assistant's tokens, so TRL can train on them alone (assistant_only_loss).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SIZES = {"pretrain": 4000, "sft": 1200, "preferences": 1200, "prompts": 64}


def tiny_dir() -> Path:
    return cache_dir() / VERSION


def paths() -> dict[str, str]:
    d = tiny_dir()
    return {
        "model": str(d / "model"),
        "sft": str(d / "sft.jsonl"),
        "preferences": str(d / "preferences.jsonl"),
        "prompts": str(d / "prompts.jsonl"),
    }


def defaults(stage: str) -> dict:
    """The preset's defaults for a script stage ("sft", "dpo", "reward", ...); alignkit.core.args applies them under every flag."""
    p = paths()
    common = dict(
        model_id=p["model"], quantization="none", num_threads="1", max_length=64, per_device_train_batch_size=16,
        per_device_eval_batch_size=32, gradient_accumulation_steps=1, gradient_checkpointing=False,
        lora_r=16, lora_alpha=32, lora_dropout=0.0, warmup_ratio=0.05, logging_steps=10, save_steps=25,
        eval_split=0.1, output_dir="runs",
    )
    if stage == "sft":
        return {**common, "dataset_id": p["sft"], "dataset_split": "train", "learning_rate": 2e-3, "run_name": "tiny-sft"}
    if stage == "dpo":
        # DPO plus an NLL term on the chosen answers (TRL's "sft" loss, as in RPO): plain DPO on a model this
        # small learns the preference but wrecks the answer format within an epoch; the NLL term holds it.
        return {**common, "dataset_id": p["preferences"], "dataset_split": "train", "learning_rate": 1e-3,
                "num_train_epochs": 3.0, "loss_type": ["sigmoid", "sft"],
                "run_name": "tiny-dpo"}
    if stage == "kto":
        # KTO on the pairs split into labelled answers (chosen: desirable, rejected: undesirable), from the base
        # or from the SFT adapter (--model_id runs/tiny-sft), which stays frozen under the new one.
        return {**common, "dataset_id": p["preferences"], "dataset_split": "train", "learning_rate": 1e-3,
                "num_train_epochs": 2.0, "run_name": "tiny-kto"}
    if stage == "reward":
        # A reward model on the base model (a fresh score head + LoRA) learns the rule from the pairs alone. It
        # must compare each answer word with the prompt's category at the last token, which this small model
        # learns slowly: 30 epochs of small batches (about 40 s) reach held-out accuracy 0.86-0.91 over seeds 1, 2,
        # 3 and 42 at 1e-3, on prompts held out whole (0.83 for seed 42 on another CPU); at 5e-4 they spread over
        # 0.75-0.94 (one CPU to another moved seed 42 from 0.90 to 0.75), and 2 epochs stay near 0.68.
        return {**common, "dataset_id": p["preferences"], "dataset_split": "train", "learning_rate": 1e-3,
                "per_device_train_batch_size": 8, "num_train_epochs": 30.0, "save_steps": 1000,
                "run_name": "tiny-reward"}
    if stage == "rl":
        # GRPO from the SFT adapter (--model_id runs/tiny-sft) on the preset's prompts, rewarded by its rule.
        # Answers are three words, so 16 new tokens suffice; 8 samples per prompt give the group baseline.
        return {**common, "dataset_id": p["prompts"], "dataset_split": "train", "eval_split": 0.0, "max_length": None,
                "learning_rate": 3e-3, "max_steps": 60, "per_device_train_batch_size": 32, "num_generations": 8,
                "max_completion_length": 16, "temperature": 1.0, "beta": 0.01, "logging_steps": 5,
                "save_steps": 30, "reward": ["rule"], "run_name": "tiny-rl"}
    if stage == "rlaif":
        # Rounds of label.py (six samples per prompt, rule-judged) -> dpo.py (the preset's DPO recipe, one epoch
        # on each round's pairs) -> evaluate.py pairwise against the previous round, rule-judged.
        return {**defaults("dpo"), "dataset_id": p["prompts"], "num_train_epochs": 1.0, "num_samples": 6,
                "sample_temperature": 1.0, "max_new_tokens": 16, "judge": "python:alignkit.modeling.presets:rule_judge",
                "eval_judge_model": "rule", "eval_prompts": p["prompts"], "run_name": "tiny-rlaif"}
    if stage == "label":
        # Six sampled answers per prompt from the base model, every pair judged by the checkable rule.
        return dict(
            model_id=p["model"], quantization="none", num_threads="1", prompts=p["prompts"], num_samples=6, temperature=1.0,
            max_new_tokens=16, generation_batch_size=64, judge="python:alignkit.modeling.presets:rule_judge",
            output="runs/label-tiny/preferences.jsonl",
        )
    if stage == "evaluate":
        # evaluate.py pairwise: the SFT run against the DPO run trained on top of it, in the run folders that
        # `sft.py --preset tiny` and `dpo.py --preset tiny --model_id runs/tiny-sft` write; rule-judged.
        # Sampled at temperature 1, the models' own distribution: greedy answers collapse to one repeated word
        # ("plum,plum,plum."), which the rule passes, and lower temperatures hide most rule breaking.
        return dict(
            model_id=p["model"], quantization="none", num_threads="1", prompts_file=p["prompts"], max_new_tokens=16,
            temperature=1.0, batch_size=64, models=["sft=runs/tiny-sft", "dpo=runs/tiny-dpo"],
            baseline="sft", judge_model="rule", output_dir="outputs/pairwise-tiny",
        )
    return common


# ---------------------------------------------------------------------------------------------------------
# The rule, and the judges built on it


def category_of(prompt: str) -> str | None:
    found = [c for c in CATEGORIES if re.search(rf"\b{c}\b", prompt)]
    return found[0] if len(found) == 1 else None


def score(prompt: str, answer: str) -> float:
    """Share of the answer's three words that belong to the prompt's category (0 when not three words)."""
    category = category_of(prompt)
    words = re.findall(r"[a-z]+", answer.lower())
    if category is None or len(words) != 3:
        return 0.0
    return sum(w in WORDS[category] for w in words) / 3


def follows_rule(prompt: str, answer: str) -> bool:
    return score(prompt, answer) == 1.0


def rule_judge(prompt: str, answer_a: str, answer_b: str) -> str:
    """Pairwise verdict "A", "B" or "tie" by the rule's score."""
    a, b = score(prompt, answer_a), score(prompt, answer_b)
    return "A" if a > b else "B" if b > a else "tie"


# ---------------------------------------------------------------------------------------------------------
# Data


def _prompt(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(CATEGORIES))
    return category, rng.choice(TEMPLATES).format(c=category)


def _answer(rng: random.Random, category: str, p_follow: float, n_wrong: int | None = None) -> str:
    """Three distinct words; each from `category` with probability p_follow (or exactly n_wrong off-topic)."""
    others = [w for c, ws in WORDS.items() if c != category for w in ws]
    wrong = [rng.random() >= p_follow for _ in range(3)] if n_wrong is None else [i < n_wrong for i in range(3)]
    rng.shuffle(wrong)
    pool_right, pool_wrong = rng.sample(WORDS[category], 3), rng.sample(others, 3)
    words = [pool_wrong[i] if w else pool_right[i] for i, w in enumerate(wrong)]
    return ",".join(words) + "."  # no spaces: BPE would learn a second, space-prefixed token per word


def make_data(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    data: dict[str, list[dict]] = {k: [] for k in SIZES}
    for _ in range(SIZES["pretrain"]):
        cat, prompt = _prompt(rng)
        data["pretrain"].append({"messages": [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": _answer(rng, cat, 0.5)}]})
    for _ in range(SIZES["sft"]):
        cat, prompt = _prompt(rng)
        data["sft"].append({"messages": [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": _answer(rng, cat, 0.6)}]})
    for _ in range(SIZES["preferences"]):
        cat, prompt = _prompt(rng)
        data["preferences"].append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": _answer(rng, cat, 1.0, n_wrong=0)}],
            "rejected": [{"role": "assistant", "content": _answer(rng, cat, 0.0, n_wrong=rng.randint(1, 3))}],
        })
    for _ in range(SIZES["prompts"]):
        category, prompt = _prompt(rng)
        data["prompts"].append({"prompt": prompt, "category": category})  # evaluate.py pairwise groups by it
    return data


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and model


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _pretrain(model, tok, texts: list[str], steps: int = 600, seed: int = 0) -> float:
    """A short plain-PyTorch LM pretraining, so the base already knows the chat format and the words."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = None
    for _ in range(steps):
        batch = tok(rng.sample(texts, 32), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def build(force: bool = False) -> Path:
    """Build the preset's model and data once; later calls return the cached folder at once, unless this module
    (the recipe: data, tokenizer, model, pretraining) changed since: then it is built again, no version to bump."""
    return build_once(tiny_dir(), "done", _build_into, force=force,
                      current=lambda text: _done_recipe(text) == _recipe())


def _recipe() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _done_recipe(text: str) -> str | None:
    try:
        return json.loads(text).get("recipe")
    except (ValueError, AttributeError):
        return None


def _build_into(work: Path) -> str:
    """The preset's files in `work`; the text of its done file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.core.progress import apply_to_libraries

    apply_to_libraries()  # save_pretrained's bar: drawn in a terminal, not into a batch job's log
    logger.info(f"building the tiny preset (once; about half a minute) in {work.parent}")
    data = make_data()
    tok = _train_tokenizer([_render(row["messages"]) for row in data["pretrain"]])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    texts = [tok.apply_chat_template(row["messages"], tokenize=False) for row in data["pretrain"]]
    final_loss = _pretrain(model, tok, texts)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    for name in ("sft", "preferences", "prompts"):
        with open(work / f"{name}.jsonl", "w") as f:
            for row in data[name]:
                f.write(json.dumps(row) + "\n")
    logger.info(f"tiny preset built (pretraining loss {final_loss:.2f})")
    return json.dumps({"version": VERSION, "recipe": _recipe(), "pretrain_loss": final_loss})


def _render(messages: list[dict]) -> str:
    """The chat template's text, without needing a tokenizer yet (for training the tokenizer itself)."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def ensure(settings) -> None:
    """Build the preset's files when a script runs with --preset tiny (or points at its cached folder)."""
    from alignkit.modeling import smol

    if getattr(settings, "preset", None) == "tiny" or str(tiny_dir()) in str(getattr(settings, "model_id", "")):
        build()
    smol.ensure(settings)


def named(stage: str) -> dict[str, dict]:
    """Every preset's defaults for a script stage: what scripts pass to parse_config as `presets`."""
    from alignkit.modeling import smol

    return {"tiny": defaults(stage), "smol": smol.defaults(stage)}


def judge(preset: str | None):
    """The rule judge `--judge_model rule` stands for under `preset` (the tiny one when none is named)."""
    from alignkit.modeling import smol

    return smol.rule_judge if preset == "smol" else rule_judge


def check_run_exists(s, source: str, flag: str = "--models NAME=PATH ...") -> None:
    """A preset's models are runs the user trains first: say how, rather than failing to load a missing folder."""
    if getattr(s, "preset", None) == "tiny" and not Path(source).exists():
        raise UserError(f"{source} not found: train the tiny runs first (python sft.py --preset tiny; python "
                          f"dpo.py --preset tiny --model_id runs/tiny-sft), or pass {flag}")
    if getattr(s, "preset", None) == "smol" and not Path(source).exists():
        raise UserError(f"{source} not found: train it first (python label.py --preset smol; python dpo.py "
                          f"--preset smol), or pass {flag}")
