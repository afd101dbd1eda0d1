"""LoTA (alignkit.train.lota) against LoRA on the tiny preset: DPO step time and memory, and forgetting.

    python -m bench.lota                 # both parts, about ten minutes on 2 CPU cores
    python -m bench.lota --quick         # fewer steps

Speed and memory: dpo.py --preset tiny from the base model, LoRA (r=16, all linear layers) and LoTA (sparsity
0.9, all linear layers), the same steps, data and seed, each in a fresh process so its peak RSS is its own. Reported:
median optimizer-step time of the trained phase (LoTA's calibration is timed separately: it is dense fine-tuning),
peak RSS (peak CUDA memory on a GPU), trainable values and the bytes of optimizer state AdamW holds at the end.

Forgetting: task 1 is the tiny SFT data ("name three fruits." -> "apple,pear,plum."). Task 2 is preference data
in a conflicting format: the chosen answer lists the same three words as "apple; pear; plum", the rejected one is
task 1's format. SFT on task 1, then DPO on task 2 on top (same settings for both kinds; LoTA's DPO mask excludes
its SFT mask, the paper's sequential variant). Reported: task-1 loss (mean token NLL of 200 task-1 conversations)
after SFT and after DPO, and task-2 held-out reward accuracy (so less forgetting is not just less learning).
Reported, not asserted: one seed on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common

RESULTS = common.ROOT / "bench" / "lota_results.json"


def _script(name: str, *args: str) -> dict:
    old = sys.argv
    sys.argv = [name, *args]
    try:
        return runpy.run_path(str(common.ROOT / name), run_name="__main__")
    finally:
        sys.argv = old


def _optimizer_bytes(trainer) -> int:
    import torch

    return sum(t.numel() * t.element_size() for state in trainer.optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------- workers
def speed_worker(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from alignkit.train import trainers

    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append(time.perf_counter() - self.t)

    original = trainers.AlignDPOTrainer.__init__

    def with_clock(self, *a, **kw):  # every trainer the script builds (LoTA's calibration one too) is timed
        original(self, *a, **kw)
        self.add_callback(Clock())

    trainers.AlignDPOTrainer.__init__ = with_clock
    started = time.perf_counter()
    run = _script("dpo.py", "--preset", "tiny", "--output_dir", spec["out"], "--run_name", spec["kind"],
                  "--max_steps", str(spec["steps"]), "--eval_split", "0", "--save_steps", "100000", *spec["flags"])
    wall = time.perf_counter() - started
    calibration = steps[: len(steps) - spec["steps"]]
    trained = steps[len(calibration):][1:]  # the first step allocates
    model = run["trainer"].model
    return {
        "kind": spec["kind"], "step_seconds": statistics.median(trained),
        "calibration_seconds": round(sum(calibration), 3), "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(common.peak_rss_mib(), 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": _optimizer_bytes(run["trainer"]),
    }


def task1_loss(model_dir: str, rows: list[dict]) -> float:
    """Mean token NLL of task-1 conversations (every token) under the model `model_dir` loads as."""
    import torch

    from alignkit.core.config import ModelSettings
    from alignkit.modeling.models import load_model

    loaded = load_model(ModelSettings(model_id=model_dir, quantization="none"))
    tok, model = loaded.tokenizer, loaded.model
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = tok(tok.apply_chat_template(row["messages"], tokenize=False), return_tensors="pt",
                      add_special_tokens=False).input_ids
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def task2_rows(preferences: Path) -> list[dict]:
    rows = []
    for line in preferences.read_text().splitlines():
        row = json.loads(line)
        good = row["chosen"][0]["content"]
        words = good.rstrip(".").split(",")
        rows.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": "; ".join(words)}],
                     "rejected": [{"role": "assistant", "content": good}]})
    return rows


def forgetting_worker(spec: dict) -> dict:
    from alignkit.modeling import presets

    kind, out, steps = spec["kind"], spec["out"], spec["steps"]
    lota = ["--adapter", "lota", "--lota_calibration_steps", str(spec["calibration"])] if kind == "lota" else []
    task1 = [json.loads(line) for line in Path(presets.paths()["sft"]).read_text().splitlines()[:200]]
    sft = _script("sft.py", "--preset", "tiny", "--output_dir", out, "--run_name", f"{kind}-sft",
                  "--max_steps", str(steps), *lota)
    sft_dir = str(sft["run_folder"])
    exclude = ["--lota_exclude_mask", sft_dir] if kind == "lota" else []
    dpo = _script("dpo.py", "--preset", "tiny", "--model_id", sft_dir, "--dataset_id", spec["task2"],
                  "--output_dir", out, "--run_name", f"{kind}-dpo", "--max_steps", str(steps), *lota, *exclude)
    return {
        "kind": kind, "task1_loss_base": task1_loss(presets.paths()["model"], task1),
        "task1_loss_after_sft": task1_loss(sft_dir, task1), "task1_loss_after_dpo": task1_loss(str(dpo["run_folder"]), task1),
        "task2_reward_accuracy": dpo["metrics"].get("eval_rewards/accuracies"),
    }


# ---------------------------------------------------------------------------------------------- the run
def run(work: Path, quick: bool = False) -> dict:
    from alignkit.modeling import presets

    presets.build()
    steps = 20 if quick else 60
    calibration = 10 if quick else 20
    speed = {}
    for kind, flags in (("lora", []), ("lota", ["--adapter", "lota", "--lota_calibration_steps", str(calibration)])):
        speed[kind] = common.run_worker("lota", {"part": "speed", "kind": kind, "out": str(work / "speed"),
                                                 "steps": steps, "flags": flags})
        print(f"lota bench speed {kind}: {speed[kind]}", flush=True)
    task2 = common.write_jsonl(work / "task2.jsonl", task2_rows(Path(presets.paths()["preferences"])))
    forgetting = {}
    for kind in ("lora", "lota"):
        forgetting[kind] = common.run_worker("lota", {"part": "forgetting", "kind": kind, "out": str(work / "forget"),
                                                      "steps": steps, "calibration": calibration, "task2": str(task2)})
        print(f"lota bench forgetting {kind}: {forgetting[kind]}", flush=True)
    return {"steps": steps, "calibration_steps": calibration, "speed": speed, "forgetting": forgetting,
            "step_time_ratio": speed["lota"]["step_seconds"] / speed["lora"]["step_seconds"],
            "peak_rss_ratio": speed["lota"]["peak_rss_mib"] / speed["lora"]["peak_rss_mib"]}


def markdown(r: dict) -> str:
    s, f = r["speed"], r["forgetting"]
    lines = [
        f"### LoTA vs LoRA (tiny preset, {r['steps']} DPO steps; LoTA calibrates {r['calibration_steps']} dense steps first)",
        "", "| | step (ms) | calibration (s) | peak RSS (MiB) | trainable values | AdamW state (KiB) |", "|---|---|---|---|---|---|",
    ]
    for kind in ("lora", "lota"):
        x = s[kind]
        lines.append(f"| {kind} | {1000 * x['step_seconds']:.1f} | {x['calibration_seconds']:.1f} | {x['peak_rss_mib']:.0f} | "
                     f"{x['trainable_values']:,} | {x['optimizer_state_bytes'] / 1024:.0f} |")
    lines += ["", "Forgetting: task-1 loss (lower is better) after SFT on task 1, then DPO on a conflicting task 2:", "",
              "| | base | after SFT | after DPO | rise | task-2 reward accuracy |", "|---|---|---|---|---|---|"]
    for kind in ("lora", "lota"):
        x = f[kind]
        lines.append(f"| {kind} | {x['task1_loss_base']:.3f} | {x['task1_loss_after_sft']:.3f} | {x['task1_loss_after_dpo']:.3f} | "
                     f"{x['task1_loss_after_dpo'] - x['task1_loss_after_sft']:+.3f} | {x['task2_reward_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    common.offline_env()
    if cli.worker:
        spec = json.loads(cli.worker)
        common.report(speed_worker(spec) if spec["part"] == "speed" else forgetting_worker(spec))
        return
    with tempfile.TemporaryDirectory(prefix="alignkit-lota-bench-") as work:
        results = run(Path(work), cli.quick)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
