"""Reference-free losses (SimPO, ORPO) against DPO: step time, reference forwards and peak memory per step.

`python -m bench.reference_free [--steps 12] [--batch 32] [--threads 1]` trains alignkit's DPO trainer on the
tiny preset (its model and preference pairs, LoRA r=16, max_length 64, prefix sharing on) with each loss type
in a fresh process (so each peak RSS is its own), on one fixed batch: two warm-up steps, then `--steps` timed
`training_step`s (forward + backward). It prints, per loss, the median step time, its ratio to DPO's, the
reference forwards counted (AlignDPOTrainer.compute_ref_log_probs) and the peak RSS the steps added over the
process's footprint before them. The ratio is of CPU time (less sensitive than wall time to other processes on a
shared machine). DPO runs a no-grad reference forward per step; simpo and orpo run none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from bench import common

LOSSES = ("sigmoid", "simpo", "orpo")


def worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from alignkit.modeling import presets
    from alignkit.modeling.models import TRAINABLE
    from alignkit.train.trainers import AlignDPOTrainer
    from alignkit.core.progress import quiet_library_noise

    common.offline_env()
    quiet_library_noise()
    presets.build()
    forwards = {"reference": 0}
    original = AlignDPOTrainer.compute_ref_log_probs

    def counted(self, *args, **kwargs):
        forwards["reference"] += 1
        return original(self, *args, **kwargs)

    AlignDPOTrainer.compute_ref_log_probs = counted
    torch.manual_seed(0)
    path = presets.paths()["model"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                           adapter_name=TRAINABLE)
    rows = [json.loads(line) for line in open(presets.paths()["preferences"])][: spec["batch"]]
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-reffree-"), per_device_train_batch_size=spec["batch"],
                     max_length=64, loss_type=[spec["loss"]], report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = AlignDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step
    for _ in range(2):
        trainer.training_step(model, dict(batch))
    forwards["reference"] = 0
    rss_before = common.peak_rss_mib()
    times, cpu_times = [], []
    for _ in range(spec["steps"]):
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.training_step(model, dict(batch))
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {"loss": spec["loss"], "median_step_ms": 1000 * statistics.median(times),
            "median_step_cpu_ms": 1000 * statistics.median(cpu_times),
            "reference_forwards_per_step": forwards["reference"] / spec["steps"],
            "peak_rss_added_mib": round(common.peak_rss_mib() - rss_before, 1), "prefix_sharing": trainer.prefix_sharing,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    common.set_threads(a.threads)
    if a.worker:
        common.report(worker(json.loads(a.worker)))
        return
    results = [common.run_worker("reference_free", {"loss": loss, "steps": a.steps, "batch": a.batch}) for loss in LOSSES]
    dpo = results[0]["median_step_cpu_ms"]
    print(f"tiny preset, {a.batch} pairs a step, max_length 64, LoRA r=16, {a.threads} torch thread(s); "
          f"median of {a.steps} steps")
    print(f"{'loss':8} {'step ms':>8} {'CPU ms':>7} {'vs DPO':>7} {'ref fwd/step':>13} {'peak RSS added MiB':>19}")
    for r in results:
        print(f"{r['loss']:8} {r['median_step_ms']:8.1f} {r['median_step_cpu_ms']:7.1f} {r['median_step_cpu_ms'] / dpo:7.2f} "
              f"{r['reference_forwards_per_step']:13.0f} {r['peak_rss_added_mib']:19.1f}")


if __name__ == "__main__":
    main()
