"""bench/results.json as a markdown table (bench/results.md, and the README's Benchmarks section)."""

from __future__ import annotations


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _goal(value: float | None, goal: float) -> str:
    if value is None:
        return "not run"
    return f"{'met' if value >= goal else 'NOT met'} ({value:.2f}x, goal >= {goal}x)"


def _standard_error(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def machine_line(m: dict) -> str:
    return (f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, torch {m['torch']}, Python {m['python']}; "
            f"benchmarks ran with {m['torch_threads']} torch thread(s); load average at start "
            f"{m['load_average_at_start'][0]} (a shared machine)")


def _range(r: dict | None) -> str:
    """A median ratio with its min-max over interleaved rounds."""
    return "-" if not r else f"{r['median']:.2f}x (min {r['min']:.2f}x, max {r['max']:.2f}x)"


def prefix_lines(section: dict | None, what: str) -> list[str]:
    if not section:
        return []
    on, off = section["configs"]["sharing on"], section["configs"]["sharing off"]
    return ["", f"Prefix sharing ({what}; {section['pairs']} pairs whose prompts are at least half of each sequence, "
                f"alignkit's defaults, on vs off, {section['repeats']} interleaved rounds): "
                f"{_range(section['speedup'])} tokens/s ({on['tokens_per_s']:.1f} vs {off['tokens_per_s']:.1f}); "
                f"reward accuracy {on['reward_accuracy']:.3f} vs {off['reward_accuracy']:.3f}."]


def dpo_table(dpo: dict) -> list[str]:
    seed = dpo["configs"]["seed"]
    lines = [
        f"DPO: {dpo['train_pairs']} training pairs (same order for all), {dpo['eval_pairs']} held out; "
        f"lengths x{dpo['length_scale']:g} of full scale, max_length scaled alike (1512 -> {dpo['max_length_seed']}, "
        f"1024 -> {dpo['max_length_defaults']}); learning rate {dpo['learning_rate']:g}, beta {dpo['beta']:g} for all. "
        "Tokens are non-pad chosen + rejected tokens (prompt included); each pair is trained on once. "
        f"Every configuration ran once in each of {len(dpo['configs']['seed']['runs'])} interleaved rounds; figures "
        "are medians over rounds, and a ratio to the seed is taken within each round: defaults over the seed "
        f"{_range(dpo.get('speedup_vs_seed_range'))}. Reward accuracy "
        f"is over {dpo['eval_pairs']} held-out pairs: its binomial standard error at the seed's accuracy is "
        f"{_standard_error(seed['reward_accuracy'], dpo['eval_pairs']):.3f}.",
        "",
        "| configuration | tokens/s | vs seed | vs seed, CPU time | median step s (pairs) | s per pair vs seed "
        "| peak RSS MiB | vs seed | reward acc. | what changes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in dpo["configs"].items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {_x(r['tokens_per_s'] / seed['tokens_per_s'])} "
            f"| {_x(r['tokens_per_cpu_s'] / seed['tokens_per_cpu_s'])} "
            f"| {r['median_step_s']:.2f} ({r['pairs_per_step']}) "
            f"| {_x(r['median_step_s_per_pair'] / seed['median_step_s_per_pair'])} | {r['peak_rss_mib']} "
            f"| {_x(r['peak_rss_mib'] / seed['peak_rss_mib'])} | {r['reward_accuracy']:.3f} | {r['what']} |"
        )
    upfront = [f"{n} {r['tokens_per_s_with_precompute']:.1f} tokens/s "
               f"({_x(r['tokens_per_s_with_precompute'] / seed['tokens_per_s'])} vs seed)"
               for n, r in dpo["configs"].items() if r["precompute"]]
    if upfront:
        lines += ["", "With the (cold) precompute pass counted in, as a first run pays it: " + "; ".join(upfront) + "."]
    dropout = {n: r["lora_dropout"] for n, r in dpo["configs"].items() if r["lora_dropout"]["modules"]}
    if dropout and all(d["p"] == [0] for d in dropout.values()):
        lines += ["", "LoRA dropout: in every run with lora_dropout > 0, TRL's DPOConfig(disable_dropout=True) had set "
                      "all dropout modules to p=0 (measured on the model), so the 0.05 was never applied; the "
                      "dropout-0 lever only removes a no-op module call."]
    kept = sorted({(r["max_length"], r["train_rows"], r["eval_rows"]) for r in dpo["configs"].values()})
    lines += ["", "TRL drops pairs whose prompt alone reaches max_length: " + "; ".join(
        f"max_length {m} keeps {t} of {dpo['train_pairs']} training and {e} of {dpo['eval_pairs']} held-out pairs"
        for m, t, e in kept) + "."]
    lines += ["", f"Peak RSS of alignkit's defaults over a policy-only run (no reference at all): "
                  f"{_x(dpo['peak_rss_ratio_vs_policy_only'])} ({dpo['policy_only']['peak_rss_mib']} MiB)."]
    cache = dpo.get("refcache")
    if cache:
        lines += ["", f"Reference log-prob disk cache ({cache['pairs']} train + held-out pairs): first run "
                      f"{cache['cold_seconds']:.2f} s computing them ({cache['cold_forwards']} reference forwards), "
                      f"identical rerun {cache['warm_seconds']:.2f} s ({cache['warm_forwards']} forwards): "
                      f"{_x(cache['saving'])} faster."]
    lines += prefix_lines(dpo.get("prefix_sharing"), "the bench model")
    if dpo.get("noise"):
        lines += ["", "Noise: each configuration's tokens/s moved between rounds by (max - min) / median = " + ", ".join(
            f"{n} {v:.0%}" for n, v in dpo["noise"].items()) + "."]
    return lines


def command(results: dict) -> str:
    flags = (" --quick" if results["quick"] else "") + (f" --threads {results['threads']}" if results["threads"] else "")
    return f"python bench/run_all.py{flags}"


def markdown(results: dict) -> str:
    lines = ["# alignkit benchmarks", "", f"Machine: {machine_line(results['machine'])}.",
             f"Run: `{command(results)}` ({results['started']}, {results['seconds']} s).", ""]
    dpo, gen, judge, lim = (results.get(k) for k in ("dpo", "generation", "judge", "limit"))
    smol_ = results.get("smol")
    lines += ["## Goals", "",
              f"- DPO, alignkit defaults over the seed, tokens/s: {_goal(dpo and dpo['speedup_vs_seed'], 2.5)}"
              + (f", rounds {_range(dpo.get('speedup_vs_seed_range'))}; reward accuracy "
                 f"{dpo['reward_accuracy']['alignkit defaults']:.3f} vs seed {dpo['reward_accuracy']['seed']:.3f}"
                 if dpo else ""),
              f"- The same on SmolLM2-135M: {_goal(smol_ and smol_['speedup_vs_seed'], 2)}",
              f"- MFU of the defaults (fp32 CPU, measured matmul peak): "
              + (f"{'met' if lim['mfu'] >= 0.35 else 'NOT met'} ({lim['mfu']:.1%}, goal >= 35%)"
                 if lim and "mfu" in lim else "not run"),
              f"- Prefix sharing, on over off (prompts >= half of each sequence): "
              f"{_goal(dpo and dpo.get('prefix_sharing_speedup'), 1.3)}",
              f"- Generation, batched (16, label.py's default) over one at a time: "
              f"{_goal(gen and gen['batched_speedup'], 4)}"
              + (f", rounds {_range(gen['by_batch_size']['16']['speedup_range'] | {'median': gen['batched_speedup']})}"
                 if gen and "speedup_range" in gen["by_batch_size"]["16"] else ""),
              f"- Judging, --parallel 16 over 1: {_goal(judge and judge['parallel_16_speedup'], 12)}", ""]
    if dpo:
        lines += ["## DPO training", ""] + dpo_table(dpo) + [""]
    smol = results.get("smol")
    if smol:
        mfu = (lim or {}).get("smol_by_config", {})
        lines += ["## DPO training on SmolLM2-135M-Instruct", "",
                  f"{smol['model']}, {smol['model_params']:,} weights; {smol['train_pairs']} training pairs of the "
                  f"same data, max_length at {smol['max_length_scale']:.3f} of full scale (SmolLM2's tokenizer "
                  f"splits the made-up words). Defaults over the seed: "
                  f"{_range(smol.get('speedup_vs_seed_range')) if smol.get('speedup_vs_seed_range') else _x(smol['speedup_vs_seed'])} "
                  "tokens/s.", *prefix_lines(smol.get("prefix_sharing"), "SmolLM2")[1:], "",
                  "| configuration | tokens/s | median step (s) | peak RSS (MiB) | reward accuracy | MFU |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {n} | {r['tokens_per_s']:.1f} | {r['median_step_s']:.1f} | {r['peak_rss_mib']} "
                  f"| {r['reward_accuracy']:.3f} | {mfu[n]['mfu']:.1%} |" if n in mfu else
                  f"| {n} | {r['tokens_per_s']:.1f} | {r['median_step_s']:.1f} | {r['peak_rss_mib']} "
                  f"| {r['reward_accuracy']:.3f} | - |" for n, r in smol["configs"].items()]
        lines += [""]
    if gen:
        lines += ["## Generation (alignkit.modeling.generation.load_generator on transformers, as label.py and evaluate.py call it)", "",
                  f"{gen['prompts']} prompts, {gen['max_new_tokens']} new tokens each, temperature 0.7, "
                  f"{gen['rounds']} round(s).", "", "| batch size | tokens/s | vs one at a time |", "| ---: | ---: | ---: |"]
        lines += [f"| {b} | {r['tokens_per_s']:.1f} | {_x(r['speedup'])} |" for b, r in gen["by_batch_size"].items()]
        lines += [""]
    if judge:
        lines += ["## Judging (label.py against a local judge with "
                  f"{judge['latency_s'] * 1000:.0f} ms latency)", "",
                  f"{judge['pairs']} pairs, each judged in both orders.", "",
                  "| --parallel | labeled pairs/s (whole run) | vs 1 | judging phase alone | vs 1 |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {p} | {r['pairs_per_s']:.2f} | {_x(r['speedup'])} | {r['judge_pairs_per_s']:.2f} "
                  f"| {_x(r['judge_speedup'])} |" for p, r in judge["by_parallel"].items()]
        lines += [""]
    if results.get("rl"):
        from bench.rl_speed import table as rl_table

        lines += ["## Online RL (rl.py)", ""] + rl_table(results["rl"]) + [""]
    if lim:
        lines += ["## The limit", "", f"Measured fp32 matmul peak: {lim['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
                  "(best of the runs at the start and the end).", ""]
        if "by_config" in lim:
            lines += ["Model FLOPs per non-pad token: 4N + 6N_lora + 3A, plus 2N + A when the reference forward "
                      "runs in the step (N: matmul weights incl. the LM head, A: causal attention; see bench/limit.py).",
                      "", "| configuration | model GFLOP/token | model GFLOP/s | MFU | MFU, 6N convention |",
                      "| --- | ---: | ---: | ---: | ---: |"]
            lines += [f"| {n} | {m['model_flops_per_token'] / 1e9:.3f} | {m['model_flops_per_s'] / 1e9:.2f} "
                      f"| {m['mfu']:.1%} | {m['mfu_6n_convention']:.1%} |" for n, m in lim["by_config"].items()]
    return "\n".join(lines) + "\n"
