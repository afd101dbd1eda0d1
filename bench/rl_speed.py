"""rl.py speed on the tiny preset: optimizer steps/s and where a step's time goes (generating, judging, training).

Each configuration is `python rl.py --preset tiny` (GRPO from the tiny base model, 8 completions per prompt,
batch 32) for a fixed number of steps, run in this process as the script runs, with:
- rule: the preset's rule as the reward (judging costs almost nothing);
- judge: `--reward judge` against tests/openai_server.py's FakeOpenAI with a fixed latency per request,
  --parallel 8, a fresh judgment cache, so every completion is one real HTTP request.
steps/s is global_step over train_runtime; the shares are rl.py's own `time/*_share` logs averaged over the run
(generating: TRL's _generate; judging: the reward functions; training: the rest of each step).
"""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import sys
import tempfile
from pathlib import Path

from bench import common

STEPS = 20


def _run(folder: Path, name: str, steps: int, extra: list[str]) -> dict:
    argv = ["rl.py", "--preset", "tiny", "--output_dir", str(folder), "--run_name", name, "--max_steps", str(steps),
            "--logging_steps", "1", "--save_steps", "100000", "--report_to", "none", *extra]
    old = sys.argv
    sys.argv = argv
    try:
        g = runpy.run_path(str(common.ROOT / "rl.py"), run_name="__main__")
    finally:
        sys.argv = old
    history = g["trainer"].state.log_history
    logs = [e for e in history if "time/generating_share" in e][1:]  # the first step warms up
    summary = history[-1]
    share = {part: statistics.mean(e[f"time/{part}_share"] for e in logs) for part in ("generating", "judging", "training")}
    return {"steps": g["trainer"].state.global_step, "steps_per_s": g["trainer"].state.global_step / summary["train_runtime"],
            "shares": share, "command": " ".join(argv)}


def run(quick: bool = False, latency: float = 0.02) -> dict:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from openai_server import FakeOpenAI

    from alignkit.modeling import presets

    presets.build()
    steps = 6 if quick else STEPS
    out = {"latency_s": latency, "by_reward": {}}
    with tempfile.TemporaryDirectory(prefix="alignkit-rl-bench-") as tmp:
        out["by_reward"]["rule"] = _run(Path(tmp), "rule", steps, ["--reward", "rule"])
        with FakeOpenAI(lambda body: "Fine.\nRating: [[7]]", latency=latency) as server:
            out["by_reward"]["judge"] = _run(Path(tmp), "judge", steps, [
                "--reward", "judge", "--judge_base_url", server.base_url, "--judge_model", "bench", "--parallel", "8",
                "--judge_cache", str(Path(tmp) / "judge-cache")])
    return out


def table(rl: dict) -> list[str]:
    lines = [f"rl.py --preset tiny (GRPO, 8 completions per prompt, batch 32); judge: FakeOpenAI with "
             f"{rl['latency_s'] * 1000:.0f} ms latency per request, --parallel 8.", "",
             "| reward | steps/s | generating | judging | training |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rl["by_reward"].items():
        s = r["shares"]
        lines.append(f"| {name} | {r['steps_per_s']:.2f} | {s['generating']:.0%} | {s['judging']:.0%} | "
                     f"{s['training']:.0%} |")
    return lines


if __name__ == "__main__":
    sys.path.insert(0, str(common.ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the fake judge takes per request")
    cli = parser.parse_args()
    common.offline_env()
    result = run(cli.quick, cli.latency)
    print(json.dumps(result, indent=2))
    print("\n".join(table(result)))
