"""The training scripts under real sharded launches on this CPU: two processes over gloo, through the Trainer.

- DeepSpeed ZeRO-3 and ZeRO-2, with the project's own configs (recipes/accelerate/deepspeed_zero{3,2}.yaml, at 2
  processes and no mixed precision): DeepSpeed's CPU accelerator runs ZeRO for real (it communicates over gloo
  when oneCCL is not installed), partitioning, gathering and saving as on GPUs.
- FSDP2 with recipes/accelerate/fsdp.yaml: accelerate 1.16 turns FSDP on for GPU launches only, so
  tests/launched.py lifts that one check; the wrapping, sharding (`fully_shard` over gloo) and gathering are
  accelerate's, transformers' and torch's own.

Each launch trains 2 steps and finishes (a timeout catches a hang); the SIGTERM test's launch is stopped mid-run
and then resumed. DeepSpeed's CPU-only shared-memory op is not compiled (tests/launched.py says why).
tests/launched.py reports the distributed type the Trainer really ran under, the batches dpo.py really packed
(prefix sharing) and the calls of alignkit's own preference loss. One SFT adapter per launch mode (QLoRA; under
ZeRO-2 in FP4 without nested scales) is shared by the runs built on it, and one plain-LoRA SFT adapter (FSDP2,
ZeRO-3) by simpo.
DDP launches: tests/test_launch_real.py and tests/test_distributed.py (here only a mixture of experts with QLoRA,
beside its sharded launches).
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT
from openai_server import FakeOpenAI
from test_distributed import tiny_mixtral
from test_launch_real import accelerate_launch, assert_each_rank_scored_with, assert_vllm_would_get_the_merged_policy
from test_launch_real import STOPPED, assert_qlora_on_each_rank, launched_reports, stopped_by_sigterm
from test_launch_real import TOOL_CALL, rows_each_rank_trained_on, texts_without_a_template, tool_calling_chats
from test_launch_real import tool_calling_pairs, unpaired_texts
from test_launch_real import cache, runs  # noqa: F401 - its fixtures: a cache and runs folder of this module's own

# Not importorskip: deepspeed is in the dev extra, and without it these tests must fail, not vanish.
assert importlib.util.find_spec("deepspeed"), "deepspeed is missing: pip install -r requirements-dev.txt"

CONFIGS = {"zero3": "deepspeed_zero3.yaml", "zero2": "deepspeed_zero2.yaml", "fsdp": "fsdp.yaml", "ddp": None}
TYPE = {"zero3": "DEEPSPEED", "zero2": "DEEPSPEED", "fsdp": "FSDP", "ddp": "MULTI_CPU"}
TINY = ["--preset", "tiny", "--max_steps", "2", "--save_steps", "100", "--logging_steps", "1"]
QLORA = ["--quantization", "4bit"]
FP4 = [*QLORA, "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "false"]  # TRL's names for the other format


def launch_args(mode: str, script: str, run: Path, *flags: str, vllm_sync: Path | None = None,
                rows_with: str | None = None) -> list[str]:
    """accelerate launch's arguments for `script` under `mode` through tests/launched.py (with `rows_with`, each
    process reports how many of its training rows hold that text), into the run folder `run`."""
    # 2 processes, fp32: below; "ddp" (beside the sharded modes for the mixture of experts) is --multi_gpu
    config = ["--config_file", str(ROOT / "recipes" / "accelerate" / CONFIGS[mode])] if CONFIGS[mode] else []
    shim = [str(ROOT / "tests" / "launched.py"), *(["--fsdp-on-cpu"] if mode == "fsdp" else []),
            *(["--vllm-sync", str(vllm_sync)] if vllm_sync else []),
            *(["--rows-with", rows_with] if rows_with is not None else [])]
    return [*config, *shim, script, *flags, "--output_dir", str(run.parent), "--run_name", run.name]


def launch(mode: str, script: str, run: Path, *flags: str, cache: Path, vllm_sync: Path | None = None,
           env: dict | None = None, rows_with: str | None = None) -> dict:
    """`script` under `mode` on two processes; returns what both processes reported (tests/launched.py), which
    with `vllm_sync` also saves what TRL's weight sync would hand a colocated vLLM engine there, and with
    `rows_with` each rank's (training rows holding that text, training rows) under "rows"."""
    output = accelerate_launch(launch_args(mode, script, run, *flags, vllm_sync=vllm_sync, rows_with=rows_with),
                               cache, env, multi_gpu=mode == "ddp")
    reports = launched_reports(output)
    assert {r[1] for r in reports} == {TYPE[mode]}, reports  # the Trainer ran under the launch asked for
    if "4bit" in flags:  # QLoRA on each process: one that loaded the base in full precision passed every other check
        assert_qlora_on_each_rank(output, flags)  # in the format asked for
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    return {"output": output, "packed": min(r[2] for r in reports), "own": min(r[3] for r in reports),
            "metrics": metrics, "reference_saves": dict(sorted((r[0], r[5]) for r in reports)),
            "rows": rows_each_rank_trained_on(output) if rows_with is not None else None}


def whole_adapter(run: Path) -> dict:
    """The saved adapter, checked whole: each LoRA matrix at its full shape, rank x the layer's input features (A)
    and the layer's output features x rank (B), the layer's read from the base model's own weights. A partition
    (ZeRO-3's empty [0]) or a shard (FSDP's slice of the rows) fails, where a check of non-empty tensors passed it.
    A layer the base's files do not name (a mixture of experts' fused experts and router, which PEFT adapts as
    parameters, one ParamWrapper nested in another: `experts.base_layer.lora_A`) is checked against the adapter
    PEFT builds unsharded on the base (on the meta device, reading no weights)."""
    weights = load_file(run / "adapter_model.safetensors")
    from alignkit.modeling.chain import resolve

    config = json.loads((run / "adapter_config.json").read_text())
    shapes, base = {}, resolve(str(run)).base
    if base.endswith(".gguf"):  # the folder it was converted into, in this test's cache
        from alignkit.modeling import gguf

        base = gguf.model_source(base)[0]
    for file in Path(base).glob("*.safetensors"):  # down the chain to the base model
        with safe_open(file, "pt") as f:
            shapes.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    checked, unsharded = 0, {}
    for name, tensor in weights.items():
        lora = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", name)
        if lora and f"{lora[1]}.weight" not in shapes:
            unsharded = unsharded or _unsharded_shapes(run)
            assert tuple(tensor.shape) == unsharded[name], (name, tuple(tensor.shape), unsharded[name])
            checked += 1
        elif lora:
            out_features, in_features = shapes[f"{lora[1]}.weight"]
            rank = config.get("rank_pattern", {}).get(lora[1], config["r"])
            whole = (rank, in_features) if lora[2] == "A" else (out_features, rank)
            assert tuple(tensor.shape) == whole, (name, tuple(tensor.shape), whole)
            checked += 1
    assert checked and all(t.numel() > 0 for t in weights.values()), {k: t.shape for k, t in weights.items()}
    return weights


def _unsharded_shapes(run: Path) -> dict:
    """{name: shape} of the adapter saved at `run` as PEFT builds it on its base in one process (on the meta device)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig.from_pretrained(str(run))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.base_model_name_or_path))
    with warnings.catch_warnings():  # the fused gate_up_proj's patterns, applied all the same (alignkit/core/progress.py)
        warnings.filterwarnings("ignore", "The following (rank|alpha)_pattern keys", RuntimeWarning)
        adapter = get_peft_model(base, config)
    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(adapter).items()}


# The QLoRA chain of each mode (sft.py, then dpo.py and kto.py over its adapter): under ZeRO-2 in TRL's other 4-bit
# format (FP4 without nested scales), checked as loaded on each rank (the 4-bit format row's cell; NF4 under ZeRO-2:
# reward_zero2 below).
CHAIN = {"zero3": QLORA, "fsdp": QLORA, "zero2": FP4}


@pytest.fixture(scope="module", params=["zero3", "fsdp", "zero2"])
def sft(request, cache, runs):
    """sft.py with QLoRA under ZeRO-3, FSDP2 and ZeRO-2 (FP4): the adapter the runs below train on."""
    mode = request.param
    run = runs / f"sft-{mode}"
    done = launch(mode, "sft.py", run, *TINY, *CHAIN[mode], cache=cache)
    assert done["metrics"]["global_step"] == 2
    return mode, run


@pytest.fixture(scope="module", params=["zero3", "fsdp"])
def lora_sft(request, cache, runs):
    """sft.py with plain LoRA (no quantization) under ZeRO-3 (the model built partitioned) and FSDP2."""
    mode = request.param
    run = runs / f"sft-lora-{mode}"
    done = launch(mode, "sft.py", run, *TINY, "--quantization", "none", cache=cache)
    assert done["metrics"]["global_step"] == 2
    return mode, run


@pytest.fixture(scope="module")
def reward_zero2(cache, runs):
    """reward.py with QLoRA and logexpwithlm under ZeRO-2 (the LM term needs the base's whole LM head, which ZeRO-2
    keeps on every rank); rl.py scores with it below."""
    run = runs / "reward-lm-zero2"
    done = launch("zero2", "reward.py", run, *TINY, *QLORA, "--loss", "logexpwithlm", cache=cache)
    return run, done


def test_sft_saves_a_whole_adapter(sft):
    weights = whole_adapter(sft[1])
    # In fp32 (these configs' mixed_precision no) the QLoRA adapter is saved fp32 under every launch: under ZeRO-3
    # it kept TRL's bf16 cast (the launch audit of session 33).
    assert {t.dtype for t in weights.values()} == {torch.float32}


# Under ZeRO-3 and ZeRO-2 dpo.py and kto.py run twice: with the default reference (the adapter switched off at each
# step, on the partitioned engine under ZeRO-3) and with --precompute_ref_log_probs; FSDP runs the default (precompute
# is refused under FSDP: tests/test_launch.py). The support matrix audit of session 28 found the ZeRO cells' default
# path unrun; ZeRO-2's precompute cells said "not proven at 2 processes" until session 34.
REFERENCES = {"zero3": (False, True), "fsdp": (False,), "zero2": (False, True)}


def test_dpo_packs_its_batches_precomputes_and_merges(sft, cache, runs):
    """dpo.py's defaults (prefix sharing, alignkit's own sigmoid loss) on the sharded QLoRA model, with
    --merge_adaptors (the main process merges after the others are done); under ZeRO-3 and ZeRO-2 also
    --precompute_ref_log_probs. Its rows: the preset's pairs some of whose chosen answers are tool-calling
    trajectories (the support matrix's row said "not proven at 2 processes"), read the same on every process, each
    call and its tool turn rendered by the template in every rank's training rows."""
    mode, sft_run = sft
    (runs / f"dpo-{mode}-data").mkdir()
    data, pairs = tool_calling_pairs(runs / f"dpo-{mode}-data")
    for precomputed in REFERENCES[mode]:
        run = runs / f"dpo-{mode}{'-precomputed' if precomputed else ''}"
        precompute = ["--precompute_ref_log_probs", "true"] if precomputed else []
        done = launch(mode, "dpo.py", run, *TINY, *CHAIN[mode], "--model_id", str(sft_run), "--loss_type", "sigmoid",
                      "--merge_adaptors", *precompute, *data, cache=cache, rows_with=TOOL_CALL)
        assert done["packed"] > 0 and done["own"] > 0
        (held, trained), other = done["rows"]
        assert other == (held, trained) and 0 < held <= 8 and trained < pairs, done["output"][-3000:]
        if precompute:  # the main process alone writes the reference entries (train and held-out rows)
            assert "pairs cached in" in done["output"] and done["reference_saves"] == {"0": 2, "1": 0}, done
        else:
            assert "pairs cached in" not in done["output"] and not any(done["reference_saves"].values()), done
        whole_adapter(run)
        merge = json.loads((run / "merged" / "merge.json").read_text())
        assert merge["max_logit_difference"] <= merge["tolerance"]


def test_kto(sft, cache, runs):
    """kto.py with QLoRA (the support matrix said "QLoRA itself not proven" under FSDP and ZeRO); under ZeRO-3 and
    ZeRO-2 also with --precompute_ref_log_probs, whose cache file every process reads (TRL named it
    at random per process for an in-memory dataset). Under a sharded model (FSDP, ZeRO-3) the tiny preset's rule
    check is skipped with its line; under ZeRO-2 the model is whole on each rank, so it samples. Its rows: the
    preset's pairs split in two, some chosen answers tool-calling trajectories (the support matrix's row said "not
    proven at 2 processes"), each call and its tool turn rendered by the template in every rank's training rows.
    The precomputed run (ZeRO-3, ZeRO-2) trains on KTO's standard unpaired rows instead (texts: prompt, completion,
    label; the row of TRL's standard rows said "not proven at 2 processes" for kto.py under these launches), as plain
    text though the SFT adapter has a chat template: every rank's training rows all the texts, the run recorded as
    trained on text."""
    mode, sft_run = sft
    (runs / f"kto-{mode}-data").mkdir()
    tools, pairs = tool_calling_pairs(runs / f"kto-{mode}-data")
    unpaired_texts(texts := runs / f"kto-{mode}-data" / "texts.jsonl")
    for precomputed in REFERENCES[mode]:
        run = runs / f"kto-{mode}{'-precomputed' if precomputed else ''}"
        precompute = ["--precompute_ref_log_probs", "true"] if precomputed else []
        data = ["--dataset_id", str(texts)] if precomputed else tools
        done = launch(mode, "kto.py", run, *TINY, *CHAIN[mode], "--model_id", str(sft_run), *precompute, *data,
                      cache=cache, rows_with="Q: " if precomputed else TOOL_CALL)
        assert done["metrics"]["global_step"] == 2
        (held, trained), other = done["rows"]
        if precomputed:  # each row as its texts (prompt, completion and TRL's mismatched KL completion)
            assert held == trained > 0 and other == (held, trained), done["output"][-3000:]
        else:  # a trajectory in its own row's completion, and in another row's as TRL's mismatched KL completion
            assert other == (held, trained) and 0 < held <= 16 and trained < 2 * pairs, done["output"][-3000:]
        assert json.loads((run / "alignkit_config.json").read_text())["data_rows"] == \
            ("text" if precomputed else "conversations")
        assert (run / "kto_reference").is_dir() == precomputed  # train and held-out rows, one file each, if asked
        if precompute:
            assert len(list((run / "kto_reference").glob("cache-*.arrow"))) == 2
        sampled = "rule-following after KTO" in done["output"]
        assert sampled == (mode == "zero2"), done["output"][-2000:]
        assert sampled or "rule-following is not measured under" in done["output"]
        whole_adapter(run)


def test_rl(sft, request, cache, runs):
    """rl.py (GRPO, transformers backend): generation on the sharded model, every rank in step. The rule reward, a
    python: reward and a judge (each process its own judgments file); under ZeRO-2 also a reward.py model
    (`rm:FOLDER`), which each rank holds whole beside the policy (refused under ZeRO-3 and FSDP:
    tests/test_launch.py)."""
    mode, sft_run = sft
    run = runs / f"rl-{mode}"
    rm = request.getfixturevalue("reward_zero2")[0] if mode == "zero2" else None
    # A python: reward and a judge beside the rule, each on each rank's own rows (and under ZeRO-2 the reward model)
    (runs / "short.py").write_text("def short(prompts, completions, **kwargs):\n"
                                   "    assert all(isinstance(c, str) for c in completions)\n"
                                   "    return [1.0 / (1 + len(c)) for c in completions]\n")
    rewards = ["--reward", f"rule,python:{runs / 'short.py'}:short,judge{f',rm:{rm}' if rm else ''}",
               *(["--reward_weights", "1,1,1,0.5"] if rm else []), "--judge_model", "judge", "--max_retries", "0",
               "--logging_steps", "1"]
    synced = runs / f"rl-{mode}-vllm-sync.safetensors"
    with FakeOpenAI(lambda body: "Good. Rating: [[8]]") as server:
        done = launch(mode, "rl.py", run, "--preset", "tiny", "--model_id", str(sft_run), "--max_steps", "1",
                      "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_prompts", "16",
                      "--save_steps", "100", "--quantization", "none", "--warmup_ratio", "0", *rewards,
                      "--judge_base_url", server.base_url, cache=cache, vllm_sync=synced,
                      env={"ALIGNKIT_DEBUG": "1"} if rm else None)  # every rank's stdout
    assert done["metrics"]["global_step"] == 1
    whole_adapter(run)
    # What TRL's weight sync would load into a colocated vLLM engine on this launch: the merged policy, gathered
    # from the shards or partitions (vLLM itself needs CUDA).
    assert_vllm_would_get_the_merged_policy(run, synced)
    # Both processes judged their own rows into their own files, every completion rated 8 of 10
    logged = done["output"]
    assert "'rewards/short/mean'" in logged and "'rewards/judge_pointwise/mean': '0.8'" in logged, logged[-3000:]
    assert "'judge/requests': 16" in logged  # both processes' 8 completions, summed
    files = {p.name: p.read_text().count("\n") for p in (run / "judge.cache").iterdir()}
    assert files.keys() == {"judgments.jsonl", "judgments.rank1.jsonl"} and all(files.values()), files
    if rm:  # each rank built every reward function, and the reward model scored the completions
        assert_each_rank_scored_with(done["output"], f"rule_reward, short, judge_pointwise, rm:{rm.name}", rm)
        # Trained with QLoRA, it scores over its base rounded to NF4 and dequantized, as it trained.
        assert "was trained with QLoRA: it scores over its base rounded to 4-bit NF4" in done["output"]


# Each launch's rows: "tools", the preset's pairs some of whose chosen answers are tool-calling trajectories
# (test_launch_real.tool_calling_pairs); "texts", TRL's standard rows over a base without a chat template (the
# launch of the same mode on "tools" keeps conversational rows proven).
@pytest.mark.parametrize("mode, flags, rows", [("zero3", ("--loss", "logexp"), "texts"), ("zero3", QLORA, "tools"),
                                               ("fsdp", (), "tools"), ("fsdp", ("--loss", "logexp"), "texts"),
                                               ("zero2", (), "tools"), ("zero2", ("--loss", "logexp"), "texts")],
                         ids=["zero3-logexp", "zero3-qlora", "fsdp", "fsdp-logexp", "zero2", "zero2-logexp"])
def test_reward_with_its_held_out_report(mode, flags, rows, cache, runs):
    """The whole reward.py under a sharded model: the fresh score head zeroed (under ZeRO-3 in its partition), the
    held-out report on every rank (a sharded forward is a collective), its scores and picture written once.
    reward.py's pieces checked against the unsharded model under FSDP: test_launch_real.py. With QLoRA under ZeRO-3
    (the model built whole, partitioned once training starts) its first step failed: TRL's bf16 score head met the
    fp32 run's hidden states ("expected m1 and m2 to have the same dtype"). Under ZeRO-3 plain LoRA trains with
    --loss logexp (the QLoRA run keeps the default, bradley_terry); FSDP2 and ZeRO-2 (the model whole on each rank)
    run both losses (ZeRO-2's logexp and its text rows: the support matrix said "not proven at 2 processes"), beside
    reward_zero2's logexpwithlm. Their rows (the support matrix's rows of
    tool calls and of TRL's standard rows said "not proven at 2 processes" under these launches): read the same on
    every process, each call and its tool turn rendered by the template, or each pair tokenized as its texts, in
    every rank's training rows."""
    run = runs / "-".join(["reward", mode, *(flag.lstrip("-") for flag in flags)])
    (into := runs / f"{run.name}-data").mkdir()
    data, pairs = tool_calling_pairs(into) if rows == "tools" else (texts_without_a_template(into), None)
    done = launch(mode, "reward.py", run, *TINY, *flags, *data, cache=cache,
                  rows_with=TOOL_CALL if rows == "tools" else "Q: ")
    (held, trained), other = done["rows"]
    if rows == "tools":
        assert other == (held, trained) and 0 < held <= 8 and trained < pairs, done["output"][-3000:]
    else:  # trained on text rows, and recorded so (a judge scores it on texts)
        assert held == trained > 0 and other == (held, trained), done["output"][-3000:]
    assert done["metrics"]["reward_rows"] == ("text" if rows == "texts" else "conversations"), done["metrics"]
    loss = "logexp" if "logexp" in flags else "bradley_terry"
    assert json.loads((run / "alignkit_config.json").read_text())["loss"] == loss
    held_out = json.loads((run / "held_out_rewards.json").read_text())
    assert done["metrics"]["held_out_pairs"] == len(held_out["chosen"]) > 0
    scored = [json.loads(line) for line in (run / "held_out_pairs.jsonl").read_text().splitlines()]
    assert [line["row"] for line in scored] == held_out["rows"] and [line["chosen_reward"] for line in scored] == \
        held_out["chosen"]  # each pair once, beside its rewards, whichever rank scored it
    assert (run / "rewards_histogram.png").is_file()
    weights = whole_adapter(run)
    assert {t.dtype for t in weights.values()} == {torch.float32}  # LoRA and the score head, fp32 as the run


def test_reward_logexpwithlm_with_qlora_under_zero2(reward_zero2):
    """The LM term needs the base's whole LM head: ZeRO-2 keeps the model whole on every rank."""
    run, done = reward_zero2
    assert done["metrics"]["held_out_pairs"] > 0
    whole_adapter(run)


def test_sft_with_lora_saves_a_whole_adapter(lora_sft):
    whole_adapter(lora_sft[1])


def test_simpo_on_the_lora_adapter(lora_sft, cache, runs):
    """dpo.py --loss_type simpo (reference-free: the policy pass alone) with plain LoRA on the sharded model:
    batches packed, alignkit's own reference-free loss."""
    mode, sft_run = lora_sft
    run = runs / f"simpo-{mode}"
    done = launch(mode, "dpo.py", run, *TINY, "--quantization", "none", "--model_id", str(sft_run), "--loss_type",
                  "simpo", cache=cache)
    assert done["packed"] > 0 and done["own"] > 0 and done["metrics"]["global_step"] == 2
    whole_adapter(run)


def test_sft_in_8bit_under_zero2(cache, runs):
    """--quantization 8bit under ZeRO-2 (the support matrix said "not proven at 2 processes"; refused under FSDP and
    ZeRO-3, which would shard the LLM.int8 layers): the model whole on each rank, in 8-bit on both, the run
    finished."""
    run = runs / "sft-8bit-zero2"
    done = launch("zero2", "sft.py", run, *TINY, "--quantization", "8bit", cache=cache)
    assert done["metrics"]["global_step"] == 2
    assert sorted(re.findall(r"^launched: rank (\d) 8-bit layers [1-9]\d*$", done["output"], re.M)) == ["0", "1"], \
        done["output"][-2000:]
    assert json.loads((run / "alignkit_config.json").read_text())["loaded_as"]["quantization"] == "8bit"
    whole_adapter(run)


def test_lota_under_zero2(cache, runs):
    """LoTA's two trainers in one process (dense calibration, then the sparse run): the second one's accelerator
    takes DeepSpeed's plugin again. Prefix sharing packs its batches."""
    run = runs / "lota-zero2"
    done = launch("zero2", "dpo.py", run, *TINY, "--adapter", "lota", "--lota_calibration_steps", "2", cache=cache)
    assert done["packed"] > 0 and done["metrics"]["global_step"] == 2
    assert re.search(r"LoTA calibration moved [1-9][\d,]* entries", done["output"])  # a mask of moved entries
    assert any(run.glob("lota_mask*"))
    # A LoRA run over that delta under FSDP2: the delta goes into the whole weights before they are sharded, and the
    # finished adapter names the LoTA run as its base. FSDP's checkpoints hold its sharded state (for resuming), no
    # adapter files for CheckpointBase to rewrite. (Under ZeRO-3, which builds the weights partitioned, a delta is
    # refused before loading: tests/test_lota.py.)
    from alignkit.modeling import chain

    over = runs / "lora-on-lota-fsdp"
    done = launch("fsdp", "dpo.py", over, *TINY, "--save_steps", "1", "--model_id", str(run), cache=cache)
    assert done["metrics"]["global_step"] == 2
    whole_adapter(over)
    assert chain.resolve(str(over)).deltas == [str(run.resolve())]
    assert (over / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    assert not (over / "checkpoint-2" / "adapter_config.json").exists()


def test_orpo_with_merge_under_zero2(cache, runs):
    """A reference-free loss (no reference pass at all), then --merge_adaptors."""
    run = runs / "orpo-zero2"
    done = launch("zero2", "dpo.py", run, *TINY, "--loss_type", "orpo", "--merge_adaptors", cache=cache)
    assert done["packed"] > 0 and done["own"] > 0
    assert (run / "merged" / "merge.json").is_file()
    whole_adapter(run)


@pytest.fixture(scope="module")
def mixtral(cache, runs):
    """tests/test_distributed.py's tiny random Mixtral, shared by the mixture-of-experts launches below."""
    return tiny_mixtral(runs / "mixtral")


# The support matrix's MoE row said "not proven at 2 processes" for these cells (plain LoRA under DDP:
# tests/test_distributed.py). QLoRA where the launch shards or replicates 4-bit layers (the fused experts stay in
# full precision beside them), plain LoRA under ZeRO-2. Under FSDP2 and ZeRO-3 the 4-bit layers are TRL's other format
# (FP4 without nested scales), checked as loaded on each rank: the 4-bit format row's cells. The loss: the tiny
# preset's sigmoid,sft (TRL's), and under ZeRO-2 dpo.py's default, sigmoid (alignkit's own): the dpo.py row's cell
# "plain LoRA with the default loss" under ZeRO-2.
MOE = [pytest.param("ddp", QLORA, id="ddp-qlora"), pytest.param("fsdp", FP4, id="fsdp-qlora-fp4"),
       pytest.param("zero2", ("--loss_type", "sigmoid"), id="zero2"), pytest.param("zero3", FP4, id="zero3-qlora-fp4")]


@pytest.mark.parametrize("mode, flags", MOE)
def test_a_mixture_of_experts_trains_dpo_with_lora_on_its_experts(mode, flags, mixtral, cache, runs):
    """dpo.py on a Mixtral, LoRA on its attention, router and fused experts (PEFT's ParamWrapper, no dropout),
    the router's load-balancing loss logged: the adapter of the routed experts saved whole (not a shard nor a
    partition) and changed by training (its B matrices start at zero). Its batches are not packed (prefix sharing is
    off on a mixture of experts: alignkit/train/prefix.py); the sigmoid loss is alignkit's own."""
    run = runs / f"dpo-moe-{mode}"
    done = launch(mode, "dpo.py", run, *TINY, *flags, "--model_id", str(mixtral), "--lora_dropout", "0", cache=cache)
    assert done["metrics"]["global_step"] == 2
    assert done["packed"] == 0 and (done["own"] > 0) == ("sigmoid" in flags), done["output"][-2000:]
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("aux_loss" in e for e in state["log_history"]), state["log_history"][:2]
    experts = {k: t for k, t in whole_adapter(run).items() if ".experts." in k}
    assert any("lora_B" in k for k in experts) and \
        all(t.abs().sum() > 0 for k, t in experts.items() if "lora_B" in k), list(experts)


@pytest.mark.parametrize("mode, script", [("zero3", "sft.py"), ("fsdp", "kto.py")])
def test_a_mixture_of_experts_trains_sft_and_kto_with_plain_lora_on_its_experts(mode, script, mixtral, cache, runs):
    """sft.py and kto.py (TRL's losses) on the Mixtral with plain LoRA where the model is sharded (the MoE row said
    "not proven at 2 processes"): the router's load-balancing loss logged, the routed experts' adapter saved whole
    and changed by training. kto.py's rows: KTO's standard unpaired rows (texts: prompt, completion, label; the
    support matrix's row of TRL's standard rows said "not proven at 2 processes" for kto.py under FSDP2), trained
    as plain text though the Mixtral has a chat template: every rank's training rows all the texts, the run recorded
    as trained on text (kto.py on conversational rows under FSDP2: test_kto[fsdp])."""
    run = runs / f"{script[:-3]}-moe-{mode}"
    texts = script == "kto.py"
    data = ["--dataset_id", str(runs / f"{run.name}-texts.jsonl")] if texts else []
    if texts:
        unpaired_texts(Path(data[1]))
    done = launch(mode, script, run, *TINY, "--model_id", str(mixtral), "--lora_dropout", "0", *data, cache=cache,
                  rows_with="Q: " if texts else None)
    assert done["metrics"]["global_step"] == 2
    if texts:  # each rank's training rows (prompt and completion, and TRL's mismatched KL completion) all texts
        (held, trained), other = done["rows"]
        assert held == trained > 0 and other == (held, trained), done["output"][-3000:]
        assert json.loads((run / "alignkit_config.json").read_text())["data_rows"] == "text"
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("aux_loss" in e for e in state["log_history"]), state["log_history"][:2]
    experts = {k: t for k, t in whole_adapter(run).items() if ".experts." in k}
    assert any("lora_B" in k for k in experts) and \
        all(t.abs().sum() > 0 for k, t in experts.items() if "lora_B" in k), list(experts)


# Each rank's part of a checkpoint, which each writes itself: FSDP2's sharded model (torch.distributed.checkpoint),
# DeepSpeed's partitioned optimizer state (ZeRO-3 also gathers the adapter for its save; ZeRO-2's rank 0 saves it).
SHARDS = {"fsdp": "pytorch_model_fsdp_0/__{rank}_0.distcp",
          "zero3": "global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
          "zero2": "global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}


@pytest.mark.parametrize("mode", SHARDS)
def test_a_sigterm_to_the_launcher_saves_each_rank_s_shard_of_one_step_and_resumes_it(mode, cache, tmp_path):
    """A scheduler's stop under FSDP2, ZeRO-3 and ZeRO-2 (the support matrix said "not proven at 2 processes"): as
    under DDP (test_launch_real's test_a_sigterm_to_the_launcher_...) the ranks vote and stop at the same step, and
    the checkpoint, a collective every rank reaches there, holds each rank's shard of it; the same command resumes
    from it and finishes. Its data: conversations with tool calls among plain ones (the support matrix's tool-call
    row said "not proven at 2 processes" under these launches), each call and its tool turn rendered by the
    template in every rank's training rows."""
    run = tmp_path / "stopped"
    chats, rows = tool_calling_chats(tmp_path)
    flags = ["--preset", "tiny", *STOPPED, *chats]
    step, _ = stopped_by_sigterm(launch_args(mode, "sft.py", run, *flags), run, cache, multi_gpu=False)
    for rank in (0, 1):
        assert (run / f"checkpoint-{step}" / SHARDS[mode].format(rank=rank, step=step)).is_file(), \
            sorted(str(p.relative_to(run)) for p in (run / f"checkpoint-{step}").rglob("*"))
    if mode != "fsdp":  # DeepSpeed's checkpoint holds the adapter, gathered whole (FSDP2's: its sharded state alone)
        whole_adapter(run / f"checkpoint-{step}")
    done = launch(mode, "sft.py", run, *flags, cache=cache, rows_with=TOOL_CALL)
    assert f"resuming from {run / f'checkpoint-{step}'}" in done["output"]
    assert done["metrics"]["global_step"] == 40
    assert done["rows"] == [(8, rows)] * 2, done["output"][-3000:]  # every row (--eval_split 0), 8 with the call
    whole_adapter(run)
