"""DPO on a GPU: stock TRL DPOTrainer against alignkit's defaults, one DPO step's full work at real lengths.

    python bench/gpu_dpo.py                          # on a CUDA machine: every scenario, 3 interleaved rounds
    python bench/gpu_dpo.py --only qlora_7b_1024 --rounds 1 --steps 4 --batch 8   # one scenario, shorter
    python bench/gpu_dpo.py --cpu-smoke              # tiny shapes on a CPU: the same model work, in seconds

Scenarios (random weights, seeded, written once to a folder so both sides load the same model from disk, as a
user's script and dpo.py do):
- qlora_7b_1024 / qlora_7b_2048: a Mistral-7B-v0.1-shaped model in 4-bit NF4 with double quantization (QLoRA),
  bf16 compute, LoRA r=16 alpha=32 on every linear layer, max_length 1024 / 2048;
- dense_1b: a Llama-3.2-1B-shaped model in bf16, no quantization, LoRA r=16, max_length 1024.
Data: bench.common's preference pairs at full scale (log-normal prompt and answer lengths, UltraFeedback-like in
shape: prompt median 100 tokens, answer median 250, a long tail that max_length cuts); one word is one token.

Each step is DPO's full work: the reference forward (both sides run it every step: neither default precomputes),
the policy forward and backward, and the optimizer step. The sides:
- trl: `AutoModelForCausalLM.from_pretrained` (BitsAndBytesConfig NF4 where quantized) with the best attention
  available (flash_attention_2 when flash-attn is installed, else sdpa), `DPOTrainer(peft_config=LoRA)` with
  DPOConfig's defaults (gradient checkpointing on) but the bench's batch and learning rate;
- alignkit: dpo.py's path (alignkit's loader, `--attn_implementation auto`, adapter, trl_config,
  AlignDPOTrainer with prefix sharing and length-grouped batches), alignkit.core.config's defaults; on a GPU,
  auto loads flex_attention for these models (where alignkit.train.flex_check passes: head size 128), so prefix
  sharing runs on FlexAttention's block-sparse kernel;
- alignkit-flash_attention_2 (alignkit-sdpa without flash-attn; with --other-attention, on by default on a GPU):
  the same with `--attn_implementation` set to what auto picked before FlexAttention (flash_attention_2: prefix
  sharing off; sdpa: sharing with a dense mask). Whether auto's flex choice stands is this figure against the
  alignkit row (alignkit.core.kernels.resolve_attention).
Per-device batch: as large as fits, found per configuration (bench.batch_search: doubling from --batch-start on the
longest pairs, each try a process of its own, cached in the --work folder), or --batch N for all; no gradient
accumulation. Every configuration draws its steps' pairs from the same file, each run in a fresh process (its
peak GPU memory is its own), interleaved: round 1 runs each once, round 2 again, ... Ratios are taken within a
round and reported as the median over rounds; at searched batches the memory ratio compares each side at its own
largest batch, and the batches themselves say which side fits more.

Reported per configuration: tokens/s (the data's non-pad tokens, prompt counted twice per pair on every side,
over the measured steps' wall time; the first step is left out), peak GPU memory (torch.cuda.max_memory_allocated
over the whole process: weights, activations, optimizer), MFU: model FLOPs of the tokens the model computed
(bench.limit.flops_per_token: a shared prompt once; recomputation under gradient checkpointing not counted) over
the GPU's bf16 dense peak (BF16_DENSE_TFLOPS, or --peak_tflops). Writes bench/gpu_dpo.json and bench/gpu_dpo.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # alignkit and bench without a pip install

from bench import batch_search, common  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPES = {  # (config class, shape)
    "mistral_7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                         sliding_window=4096, max_position_embeddings=32768)),
    "llama_1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     max_position_embeddings=4096, tie_word_embeddings=True)),
    # --cpu-smoke: the same classes at toy size (the vocabulary is the bench tokenizer's)
    "tiny_mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                           sliding_window=4096, max_position_embeddings=512)),
    "tiny_llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                       max_position_embeddings=512, tie_word_embeddings=True)),
}
SCENARIOS = {
    "qlora_7b_1024": dict(shape="mistral_7b", quantization="4bit", max_length=1024),
    "qlora_7b_2048": dict(shape="mistral_7b", quantization="4bit", max_length=2048),
    "dense_1b": dict(shape="llama_1b", quantization="none", max_length=1024),
}
SMOKE = {  # the same scenarios at toy size: max_length scaled by 1/16 like bench.dpo_speed
    "qlora_7b_1024": dict(shape="tiny_mistral", quantization="4bit", max_length=64),
    "qlora_7b_2048": dict(shape="tiny_mistral", quantization="4bit", max_length=128),
    "dense_1b": dict(shape="tiny_llama", quantization="none", max_length=64),
}
# NVIDIA's datasheet bf16 tensor-core peaks, dense (no sparsity), in TFLOP/s, by a substring of the device name.
BF16_DENSE_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                     "A10": 125.0, "RTX 4090": 165.2}
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "flash-attn")


# ---------------------------------------------------------------------------------------------- the machine
def machine(device: str) -> dict:
    import torch

    info = {"device": device, "python": platform.python_version(), "versions": {}}
    for package in PACKAGES:
        try:
            info["versions"][package] = version(package)
        except PackageNotFoundError:
            info["versions"][package] = None
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info.update(common.machine())
    return info


def bf16_peak(gpu: str | None, override: float | None) -> float | None:
    """The GPU's bf16 dense peak in FLOP/s (--peak_tflops wins), None where unknown (no MFU then)."""
    if override:
        return override * 1e12
    for name, tflops in BF16_DENSE_TFLOPS.items():  # "H100 PCIe" before "H100": the first match counts
        if gpu and name in gpu:
            return tflops * 1e12
    return None


def best_trl_attention() -> str:
    """What a TRL user gets at best without extra wiring: flash_attention_2 when flash-attn is installed (also what
    alignkit's auto picked before FlexAttention: the alignkit-<attention> row)."""
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


# ---------------------------------------------------------------------------------------------- model and data
def write_model(shape: str, folder: Path, device: str) -> Path:
    """A seeded random model of `shape` in bf16 with bench.common's tokenizer, saved to `folder` (once)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    tok_folder = common.build_model(folder.parent / "bench-tokenizer")  # the word-level tokenizer (and a toy model)
    tok = AutoTokenizer.from_pretrained(tok_folder)
    cls_name, dims = SHAPES[shape]
    config = getattr(transformers, cls_name)(**dims, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a CPU takes minutes over 7B random weights
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_data(work: Path, pairs: int) -> Path:
    return common.write_jsonl(work / "pairs.jsonl", common.preference_rows(pairs, length_scale=1.0, seed=0))


def gradient_check(device: str, attn: str) -> dict:
    """Packed (under `attn`) against unshared (sdpa) on a small fp32 Mistral with a sliding window (8) shorter
    than the pairs (48 tokens): the largest |difference| of the answer log-probs and of any weight's gradient,
    after the reference-style forward and the policy's backward. On a GPU with flex_attention this is the check
    a CPU cannot run (FlexAttention has no backward there); on a CPU it checks the sdpa mask."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from bench.gpu_prefix import answer_logps, batch

    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, sliding_window=8, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(config).float()
    data = batch(3, 24, 24, config.vocab_size, device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 to fp32: the comparison is of the layouts, not of TF32
    try:
        outputs = {}
        for shared in (False, True):
            model.set_attn_implementation(attn if shared else "sdpa")
            model.zero_grad()
            logps = answer_logps(model, *data, shared)
            logps.sum().backward()
            outputs[shared] = logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    (l_off, g_off), (l_on, g_on) = outputs[False], outputs[True]
    return {"attention": attn, "sliding_window": config.sliding_window, "tokens_per_row": 48,
            "max_logp_diff": float((l_on - l_off).abs().max()),
            "max_grad_diff": max(float((g_on[n] - g_off[n]).abs().max()) for n in g_off),
            "max_grad": max(float(g.abs().max()) for g in g_off.values())}


# ---------------------------------------------------------------------------------------------- one configuration
def configurations(other_attention: bool) -> dict[str, dict]:
    from bench.dpo_speed import defaults_config

    import dataclasses

    from trl import DPOConfig

    defaults = defaults_config()  # alignkit.core.config's DPO defaults, nothing copied
    stock = {f.name: f.default for f in dataclasses.fields(DPOConfig)}  # TRL's own defaults, read the same way
    # The LoRA a TRL user passes: the same rank, alpha and dropout as alignkit's, so the adapters do equal work.
    trl = dict(trainer="trl", lora_r=defaults["lora_r"], lora_alpha=defaults["lora_alpha"],
               lora_dropout=defaults["lora_dropout"], gradient_checkpointing=stock["gradient_checkpointing"],
               precompute=stock["precompute_ref_log_probs"], max_grad_norm=stock["max_grad_norm"],
               optim=stock["optim"], attn=best_trl_attention())
    configs = {"trl": trl, "alignkit": {**defaults, "attn": None}}  # None: --attn_implementation auto
    if other_attention:
        configs[f"alignkit-{best_trl_attention()}"] = {**defaults, "attn": best_trl_attention()}
    return configs


def _linear_4bit():
    """bitsandbytes' 4-bit linear layer class (PEFT's LoRA wrapper of it is not one), or a never-matching type."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return ()
    return Linear4bit


def worker(spec: dict) -> dict:
    """Train `spec["steps"] + 1` steps of one configuration in this process; its figures. The trainer's output folder
    is a temporary one, removed after (each CPU smoke run of CI left an empty gpu-dpo-* folder in /tmp)."""
    with tempfile.TemporaryDirectory(prefix="gpu-dpo-") as out:
        return _worker(spec, Path(out))


def _worker(spec: dict, out: Path) -> dict:
    import torch

    from alignkit.core.progress import quiet_library_noise
    from bench.dpo_speed import _build, _counts, _measured  # noqa: F401 - _measured wraps the trainer inside _build

    common.offline_env()
    quiet_library_noise()
    if spec.get("smoke_fits") is not None and spec["batch"] > spec["smoke_fits"]:  # --cpu-smoke --smoke-fits
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (faked: a smoke try of more than {spec['smoke_fits']} "
                                          "pairs)")
    cuda = torch.cuda.is_available() and not spec["cpu"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    started = time.perf_counter()
    trainer = _build(spec, out)
    setup_s = time.perf_counter() - started
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    trainer.train()
    measured = trainer.steps[1:]  # the first step allocates and warms up (and compiles, under flex)
    seconds = sum(s[0] for s in measured)
    tokens, computed = sum(s[1] for s in measured), sum(s[5] for s in measured)
    counts = _counts(model)
    counts["mean_tokens_per_sequence_weighted"] = sum(s[3] for s in measured) / computed
    return {
        "name": spec["name"], "setup_seconds": round(setup_s, 1), "steps": len(measured), "tokens": tokens,
        "seconds": seconds, "tokens_per_s": tokens / seconds, "computed_tokens_per_s": computed / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else common.peak_rss_mib() / 1024,
        "peak_memory_kind": "max_memory_allocated" if cuda else "peak RSS (CPU)",
        "attention": config._attn_implementation, "prefix_sharing": bool(getattr(trainer, "prefix_sharing", False)),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "counts": counts, "precompute": False,
        "loss": trainer.state.log_history[-1].get("train_loss"),
        "linear_4bit_layers": sum(isinstance(m, _linear_4bit()) for m in model.modules()),
    }


# ---------------------------------------------------------------------------------------------- the runs
def _ratio(a: list[dict], b: list[dict], key: str) -> dict:
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def _run(spec: dict, a, work: Path) -> dict:
    """One worker run: in this process on a CPU smoke (it proves the model work runs; its memory is not compared),
    else in a fresh process."""
    if a.cpu_smoke:
        return worker(spec)
    return common.run_worker("gpu_dpo", spec, env={"ALIGNKIT_CACHE": str(work / "cache")}, timeout=a.timeout)


def batch_sizes(name: str, scenario: dict, configs: dict, base: dict, a, work: Path) -> tuple[dict, dict]:
    """Per configuration, the per-device batch: --batch for all, else the largest it fits (bench.batch_search, two
    steps a try on the scenario's worst pairs), and the searches' tries [batch, fitted]."""
    if a.batch:
        return {c: a.batch for c in configs}, {}
    worst = common.write_jsonl(work / name / "worst.jsonl", batch_search.worst_rows(2 * a.max_batch,
                                                                                    scenario["max_length"]))

    def search(config_name: str) -> dict:
        def fits(batch: int) -> bool:
            spec = {**configs[config_name], **base, "name": config_name, "train": str(worst), "eval": str(worst),
                    "pairs": 2 * batch, "batch": batch, "steps": 1, "smoke_fits": a.smoke_fits}
            print(f"{name}: {config_name} tries batch {batch}", flush=True)
            try:
                _run(spec, a, work)
            except Exception as e:  # noqa: BLE001 - out of memory means "does not fit"; anything else is a bug
                if not batch_search.is_out_of_memory(e):
                    raise
                return False
            return True

        batch, tries = batch_search.largest_batch(fits, a.batch_start, a.max_batch)
        return {"batch": batch, "tries": tries}

    found = {}
    for c in configs:  # one search per configuration and search setting, kept in the --work folder
        key = f"{name}/{c}/start {a.batch_start}, cap {a.max_batch}, smoke fits {a.smoke_fits}"
        found[c] = batch_search.cached(work / "batch_search.json", key, lambda c=c: search(c))
    return {c: f["batch"] for c, f in found.items()}, {c: f["tries"] for c, f in found.items()}


def run_scenario(name: str, scenario: dict, a, work: Path, peak: float | None) -> dict:
    from bench.limit import flops_per_token

    device = "cpu" if a.cpu_smoke else "cuda"
    folder = write_model(scenario["shape"], work / scenario["shape"], device)
    configs = configurations(a.other_attention)
    base = {"model": str(folder), "accum": 1, "max_length": scenario["max_length"], "dtype": "bf16",
            "quantization": scenario["quantization"], "cpu": a.cpu_smoke, "lr": 1e-5}
    batches, tries = batch_sizes(name, scenario, configs, base, a, work)
    failed = {c: "no batch fits, not even 1 pair" for c, b in batches.items() if b is None}
    data = write_data(work / name, (a.steps + 1) * max((b for b in batches.values() if b), default=1))
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for round_ in range(1, a.rounds + 1):
        for config_name, config in configs.items():
            if config_name in failed:
                continue
            spec = {**config, **base, "name": config_name, "train": str(data), "eval": str(data), "steps": a.steps,
                    "pairs": (a.steps + 1) * batches[config_name], "batch": batches[config_name]}
            print(f"{name}: {config_name} (round {round_}/{a.rounds}, batch {batches[config_name]})", flush=True)
            try:
                r = _run(spec, a, work)
            except Exception as e:  # noqa: BLE001 - alignkit's rows (flex, the other attention) report what failed
                if config_name == "trl":
                    raise
                failed[config_name] = str(e)[-2000:]
                print(f"  failed (recorded; the other rows go on): {str(e)[-300:]}", flush=True)
                continue
            runs[config_name].append(r)
            print(f"  {r['tokens_per_s']:.0f} tokens/s, peak memory {r['peak_memory_gib']:.2f} GiB, "
                  f"{r['attention']}, prefix sharing {r['prefix_sharing']}", flush=True)
    out = {"max_length": scenario["max_length"], "quantization": scenario["quantization"],
           "shape": scenario["shape"], "batch": batches, "batch_search": tries, "steps_measured": a.steps,
           "rounds": a.rounds, "configs": {}, "failed": failed}
    runs = {name: rs for name, rs in runs.items() if name not in failed}
    for config_name, rs in runs.items():
        merged = {k: rs[0][k] for k in ("attention", "prefix_sharing", "gradient_checkpointing")}
        merged["batch"] = batches[config_name]
        merged["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rs)
        merged["peak_memory_gib"] = max(r["peak_memory_gib"] for r in rs)
        per_token = flops_per_token(rs[0]["counts"], reference_in_step=True)["model_flops_per_token"]
        achieved = per_token * statistics.median(r["computed_tokens_per_s"] for r in rs)
        merged["model_tflops_per_s"] = achieved / 1e12
        merged["mfu"] = achieved / peak if peak else None
        merged["runs"] = rs
        out["configs"][config_name] = merged
    for config_name in runs:
        if config_name != "trl" and "trl" in runs:
            suffix = "" if config_name == "alignkit" else "_" + config_name.split("-", 1)[1]
            speed = _ratio(runs[config_name], runs["trl"], "tokens_per_s")
            out["speedup_vs_trl" + suffix] = speed["median"]
            out["speedup_vs_trl_range" + suffix] = speed
            memory = _ratio(runs[config_name], runs["trl"], "peak_memory_gib")
            out["peak_memory_ratio_vs_trl" + suffix] = memory["median"]
    out["mfu"] = out["configs"].get("alignkit", {}).get("mfu")  # alignkit's defaults
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"CPU smoke ({m.get('cpu', '?')})"
    lines = [f"# DPO on a GPU: stock TRL vs alignkit's defaults ({where})", "",
             "Written by `python bench/gpu_dpo.py` (see its docstring for what is measured). Versions: "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".", ""]
    if result["cpu_smoke"]:
        lines += ["**A CPU smoke run on toy shapes: these figures say the script runs, nothing about speed.**", ""]
    check = result.get("packed_vs_unshared", {})
    if "error" in check:
        lines += [f"Packed vs unshared under {check['attention']}: failed ({check['error'][-200:]}).", ""]
    elif check:
        lines += [f"Packed ({check['attention']}) vs unshared (sdpa), fp32, sliding window {check['sliding_window']} "
                  f"< {check['tokens_per_row']} tokens: max |log-prob difference| {check['max_logp_diff']:.1e}, "
                  f"max |gradient difference| {check['max_grad_diff']:.1e} (largest gradient {check['max_grad']:.1e}).",
                  ""]
    lines += ["| scenario | config | attention | prefix sharing | batch | tokens/s | peak memory (GiB) | MFU |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, s in result["scenarios"].items():
        for config_name, c in s["configs"].items():
            mfu = f"{c['mfu']:.1%}" if c["mfu"] is not None else "n/a"
            lines.append(f"| {name} | {config_name} | {c['attention']} | {c['prefix_sharing']} | {c['batch']} | "
                         f"{c['tokens_per_s']:.0f} | {c['peak_memory_gib']:.2f} | {mfu} |")
    lines += [""]
    for name, s in result["scenarios"].items():
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k.startswith(("speedup_vs_trl", "peak_memory_ratio"))
                           and not k.endswith("range") and "range_" not in k)
        how = "batch as large as fits" if s["batch_search"] else "batch fixed"
        failed = "".join(f"; {c} failed: {why[-200:]}" for c, why in s["failed"].items())
        lines.append(f"- {name} (max_length {s['max_length']}, {how}, {s['rounds']} rounds): {ratios}{failed}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help="JSON spec of one configuration (the main process makes it)")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy shapes on a CPU: proves the script runs")
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per run (after one warm-up)")
    parser.add_argument("--batch", type=int, help="pairs per device on every side (default: the largest each side "
                        "fits, bench.batch_search; 2 on a CPU smoke)")
    parser.add_argument("--batch-start", type=int, default=4, help="the batch search's first try (then it doubles, "
                        "or halves)")
    parser.add_argument("--max-batch", type=int, default=64, help="the batch search goes no higher")
    parser.add_argument("--smoke-fits", type=int, help="CPU smoke: search the batch, faking out-of-memory for tries "
                        "of more than this many pairs")
    parser.add_argument("--other-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="also run alignkit with what auto picked before flex_attention (default: on a GPU)")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's bf16 dense peak, where the table lacks it")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for gpu_dpo.json and gpu_dpo.md")
    parser.add_argument("--work", type=Path, help="folder for the model and data (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration run")
    a = parser.parse_args(argv)
    if a.worker:
        common.report(worker(json.loads(a.worker)))
        return {}
    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with --cpu-smoke for the CPU check, or on a GPU machine")
    if a.cpu_smoke:
        a.rounds, a.steps = min(a.rounds, 1), min(a.steps, 1)
        a.batch = None if a.smoke_fits is not None else min(a.batch or 2, 2)
        a.batch_start, a.max_batch = min(a.batch_start, 2), min(a.max_batch, 4)  # toy sizes: at most 2 tries
    elif a.smoke_fits is not None:
        raise SystemExit("error: --smoke-fits fakes out-of-memory on a --cpu-smoke run only")
    # On a CPU, auto is sdpa on both alignkit rows (and FlexAttention has no backward there): one row is enough.
    a.other_attention = (not a.cpu_smoke) if a.other_attention is None else a.other_attention
    scenarios = SMOKE if a.cpu_smoke else SCENARIOS
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu-dpo-work-"))
    info = machine("cpu" if a.cpu_smoke else "cuda")
    peak = None if a.cpu_smoke else bf16_peak(info.get("gpu"), a.peak_tflops)
    result = {"machine": info, "cpu_smoke": a.cpu_smoke, "bf16_dense_peak_tflops": peak and peak / 1e12,
              "scenarios": {}}
    check_attn = "sdpa" if a.cpu_smoke else "flex_attention"
    try:
        result["packed_vs_unshared"] = gradient_check("cpu" if a.cpu_smoke else "cuda", check_attn)
    except Exception as e:  # noqa: BLE001 - recorded: the timing runs still say something
        result["packed_vs_unshared"] = {"attention": check_attn, "error": str(e)[-2000:]}
    print(f"packed vs unshared: {result['packed_vs_unshared']}", flush=True)
    for name in a.only or list(scenarios):
        result["scenarios"][name] = run_scenario(name, scenarios[name], a, work, peak)
        result[name] = result["scenarios"][name]  # flat keys: qlora_7b_1024.speedup_vs_trl, dense_1b.mfu, ...
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_dpo_smoke" if a.cpu_smoke else "gpu_dpo"
    (a.out / f"{stem}.json").write_text(json.dumps({k: v for k, v in result.items() if k != "scenarios"}, indent=1))
    (a.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
