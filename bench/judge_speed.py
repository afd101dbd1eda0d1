"""Judging speed: label.py's labeled pairs/s against a local judge server with 200 ms latency, by --parallel.

The judge is tests/openai_server.py's FakeOpenAI (a real OpenAI-compatible HTTP server) in a process of its
own, as a remote judge would be, answering every request after `latency` seconds; it prefers the response
with the marker word, so both orders agree and every pair is labeled. label.py runs whole (in the worker
process, through runpy like the tests do) on existing responses files, with a fresh output per run so nothing
comes from its cache; each pair is judged in both orders (label.py's default), two requests per pair.
Reported: labeled pairs per second of the whole label.py run, and of its judging phase alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

PARALLEL = (1, 4, 16)
SLOT = re.compile(r"\[Response (A|B)\]\n(.*?)\n\[End of Response \1\]", re.S)


def marker_judge(body: dict) -> str:
    found = dict(SLOT.findall(body["messages"][-1]["content"]))
    return "A has the marker.\n[[A]]" if "MARKER" in found.get("A", "") else "B has the marker.\n[[B]]"


def serve(latency: float) -> None:
    """Run the judge server until this process is terminated; print its URL first."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    from openai_server import FakeOpenAI

    with FakeOpenAI(marker_judge, latency=latency) as server:
        print(server.base_url, flush=True)
        while True:
            time.sleep(3600)


def _label_script(folder: Path, base_url: str, parallel: int, name: str) -> dict:
    import alignkit.feedback.label_pairs as label_pairs

    phase = {}
    original = label_pairs.judge_pairs

    def timed(run, pairs):  # label.py looks judge_pairs up when its cell runs, so this wraps the real one
        started = time.perf_counter()
        try:
            return original(run, pairs)
        finally:
            phase["seconds"] = time.perf_counter() - started

    label_pairs.judge_pairs = timed
    out = folder / name / "prefs.jsonl"  # a fresh output and cache per run: nothing is judged from the cache
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["label.py", "--responses_a", str(folder / "a.jsonl"), "--responses_b", str(folder / "b.jsonl"),
                "--judge_base_url", base_url, "--judge_model", "bench-judge", "--parallel", str(parallel),
                "--output", str(out)]
    started = time.perf_counter()
    try:
        os.chdir(folder)
        runpy.run_path(str(common.ROOT / "label.py"), run_name="__main__")
    finally:
        sys.argv = argv
        os.chdir(cwd)
        label_pairs.judge_pairs = original
    seconds = time.perf_counter() - started
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    return {"labeled": summary["labeled"], "seconds": seconds, "judge_seconds": phase["seconds"]}


def worker(spec: dict) -> dict:
    common.offline_env()
    os.environ["OPENAI_API_KEY"] = "bench-no-key"  # the local server takes any key
    folder = Path(tempfile.mkdtemp(prefix="judge-bench-"))
    prompts = [f"question {i}: explain something useful." for i in range(spec["pairs"])]
    common.write_jsonl(folder / "a.jsonl", [{"prompt": p, "response": f"answer {i} MARKER"} for i, p in enumerate(prompts)])
    common.write_jsonl(folder / "b.jsonl", [{"prompt": p, "response": f"answer {i} plain"} for i, p in enumerate(prompts)])
    _label_script(folder, spec["base_url"], 4, "warm-up")  # imports, datasets, the client; not measured
    runs = {}
    for parallel in PARALLEL:
        runs[parallel] = _label_script(folder, spec["base_url"], parallel, f"parallel-{parallel}")
        runs[parallel]["pairs_per_s"] = runs[parallel]["labeled"] / runs[parallel]["seconds"]
        runs[parallel]["judge_pairs_per_s"] = runs[parallel]["labeled"] / runs[parallel]["judge_seconds"]
    base, base_judge = runs[1]["pairs_per_s"], runs[1]["judge_pairs_per_s"]
    return {"pairs": spec["pairs"], "latency_s": spec["latency"], "by_parallel": {
        str(p): {**r, "speedup": r["pairs_per_s"] / base, "judge_speedup": r["judge_pairs_per_s"] / base_judge}
        for p, r in runs.items()}}


def run(quick: bool, latency: float = 0.2) -> dict:
    server = subprocess.Popen([sys.executable, "-m", "bench.judge_speed", "--serve", str(latency)], cwd=common.ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(common.ROOT)})
    try:
        base_url = server.stdout.readline().strip()
        result = common.run_worker("judge_speed", {"base_url": base_url, "pairs": 48 if quick else 128,
                                                   "latency": latency})
    finally:
        server.terminate()
        server.wait(timeout=30)
    result["parallel_16_speedup"] = result["by_parallel"]["16"]["speedup"]
    result["parallel_4_speedup"] = result["by_parallel"]["4"]["speedup"]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help="JSON spec (bench.run_all makes it)")
    parser.add_argument("--serve", type=float, metavar="LATENCY", help="run the judge server with this latency")
    cli = parser.parse_args()
    if cli.serve is not None:
        serve(cli.serve)
    else:
        common.report(worker(json.loads(cli.worker)))
