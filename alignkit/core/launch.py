"""The launch: which processes run, on which device, and what each feature may do there; decided before loading.

Every script calls `establish_launch(settings, script)` first. Under `accelerate launch` / torchrun it
- refuses, in one line naming the combination and what to use instead, what cannot work under this launch mode
  (`refusal`: the support matrix's "refused" cells), before any data or model is read;
- sets this process's CUDA device from LOCAL_RANK: bitsandbytes places a 4-bit model on
  `torch.cuda.current_device()` when no device map says otherwise (transformers/quantizers/quantizer_bnb_4bit.py
  `update_device_map`), which is GPU 0 on every rank until someone sets it;
- creates the process group (accelerate's PartialState, the one the Trainer later finds): transformers' FSDP
  RAM-efficient loading (`fsdp_cpu_ram_efficient_loading`: only local rank 0 reads the weights) checks
  `torch.distributed.is_initialized()` while the model loads (transformers/distributed/fsdp.py is_fsdp_enabled);
- under ZeRO-3, registers DeepSpeed's config so that from_pretrained builds the model partitioned
  (alignkit.core.zero3);
- keeps stdout on global rank 0 only, so a script's lines show once per launch (`--debug`: on every rank).

The loader's hardware decisions live here too, each logged once with its reason: dtype, quantization (and its
bitsandbytes config: under FSDP/ZeRO-3 the 4-bit weights are stored in the compute dtype), CPU threads and the
device map (the whole model on this process's GPU; under FSDP/ZeRO-3 only a 4-bit model, which
they cannot build sharded, is placed per rank); the attention kernel and Liger: alignkit.core.kernels.
alignkit.modeling.models only loads.

Launch modes: "one process", "DDP", "FSDP", "ZeRO-2" (also ZeRO-0/1), "ZeRO-3".
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core.errors import UserError, debugging, report_on_rank
from alignkit.core.zero3 import register_zero3_init

FSDP, ZERO3 = "FSDP", "DeepSpeed ZeRO-3"  # the two launches that shard the model (`sharded_launch`)
ONE_PROCESS = ("label.py", "evaluate.py", "merge.py", "rlaif.py")  # scripts that never run under a launcher


def _log_choice(what: str, value: str, why: str) -> None:
    logger.info(f"{what}: {value} ({why})")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def world_size() -> int:
    """Processes launched together (accelerate launch / torchrun set WORLD_SIZE); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's global rank: the process group's when one is running, else RANK (set by accelerate launch /
    torchrun); 0 for a plain run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_gpu() -> int:
    """This process's GPU: LOCAL_RANK under accelerate launch / torchrun, else the first visible one."""
    return int(os.environ.get("LOCAL_RANK", 0))


def sharded_launch() -> str | None:
    """FSDP or ZERO3 when accelerate launched this process to shard the model, else None."""
    if _flag("ACCELERATE_USE_FSDP"):
        return FSDP
    return ZERO3 if _flag("ACCELERATE_USE_DEEPSPEED") and zero_stage() == "3" else None


def zero_stage() -> str:
    """DeepSpeed's ZeRO stage as accelerate launched it: ACCELERATE_DEEPSPEED_ZERO_STAGE, or, where the accelerate
    config names a DeepSpeed JSON (deepspeed_config_file) and accelerate leaves that unset, the JSON's own
    zero_optimization.stage ("" when unreadable: DeepSpeed itself names the file)."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage or not file:
        return stage
    try:
        return str(json.loads(Path(file).read_text()).get("zero_optimization", {}).get("stage", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _deepspeed_json_precision() -> tuple[str, str] | None:
    """("bf16" or "fp16", the file) where the launch's DeepSpeed JSON enables one outright (true, not "auto")."""
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if _flag("ACCELERATE_USE_DEEPSPEED") else None
    try:
        config = json.loads(Path(file).read_text()) if file else {}
    except (OSError, ValueError):
        return None
    # bfloat16: DeepSpeed's older name for bf16
    for precision, key in (("bf16", "bf16"), ("bf16", "bfloat16"), ("fp16", "fp16")):
        section = config.get(key) if isinstance(config, dict) else None
        if isinstance(section, dict) and section.get("enabled") is True:
            return precision, file
    return None


def fsdp_version() -> int:
    """The FSDP version accelerate launched with (FSDP_VERSION; its plugin reads 1 when unset). Only FSDP2
    (torch's fully_shard) is supported: the tests launch it, and FSDP1's full-state-dict save is not proven."""
    return int(os.environ.get("FSDP_VERSION", "1"))


def launch_mode() -> str:
    """"one process", "DDP", "FSDP", "ZeRO-2" or "ZeRO-3", from the launcher's environment."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "ZeRO-3" if zero_stage() == "3" else "ZeRO-2"
    return "DDP" if world_size() > 1 else "one process"


def training_device() -> torch.device:
    """The device this process trains on: its own GPU, else the CPU (whatever device the model is loaded on)."""
    return torch.device("cuda", local_gpu()) if torch.cuda.is_available() else torch.device("cpu")


def other_accelerator() -> str | None:
    """An accelerator torch finds besides CUDA (Apple's MPS, Intel's XPU). alignkit does not use one: its 4-bit,
    attention, dtype and memory decisions are made for CUDA GPUs and the CPU, so without CUDA the CPU runs."""
    if torch.backends.mps.is_available():
        return "Apple MPS"
    xpu = getattr(torch, "xpu", None)
    return "Intel XPU" if xpu is not None and xpu.is_available() else None


# ---------------------------------------------------------------------------------------------------------
# What each feature may do under each launch mode


def refusal(s, script: str) -> str | None:
    """The one line that refuses `script` with settings `s` under this launch, or None when it is supported.

    Only combinations that cannot work are here; the README's support matrix says how every other one is proven.
    """
    mode, sharded = launch_mode(), sharded_launch()
    if script in ONE_PROCESS and world_size() > 1:
        return (f"{script} under accelerate launch ({mode}, {world_size()} processes): it runs as one process; run "
                f"`python {script} ...` (it uses this machine's GPU itself)")
    if sharded == FSDP and (version := fsdp_version()) != 2:
        return (f"FSDP1 (fsdp_version {version}, accelerate's default when the config names none) is not "
                "supported: set `fsdp_version: 2` in the accelerate config, as recipes/accelerate/fsdp.yaml does, or "
                "pass --fsdp_version 2 to accelerate launch")
    if script not in ONE_PROCESS and (conflict := _mixed_precision_conflict(s)):  # the training scripts
        return conflict
    if (getattr(s, "trainer_overrides", None) or {}).get("activation_offloading") and not torch.cuda.is_available():
        return ("activation_offloading on a CPU: TRL moves a GPU's activations to the CPU's memory, and with no GPU "
                "its hooks fail once the model has loaded; drop it (it is for a CUDA GPU)")
    quantization = getattr(s, "quantization", "none")
    if sharded and quantization == "8bit":
        return _no_8bit(sharded)
    if sharded and getattr(s, "adapter", "lora") == "lota":
        return (f"--adapter lota under {sharded} is not supported: launch with DDP (recipes/accelerate/ddp.yaml) or "
                "DeepSpeed ZeRO-2, or train with --adapter lora")
    if script in ("dpo.py", "kto.py") and sharded == FSDP and getattr(s, "precompute_ref_log_probs", False):
        return (f"{script} --precompute_ref_log_probs under FSDP: TRL runs the reference pass before FSDP wraps the model "
                "(its weights still on the CPU, the batches on the GPU); use a DDP or DeepSpeed launch, or drop "
                "--precompute_ref_log_probs (the reference is then the model with the adapter off, at no memory cost)")
    if script == "reward.py" and sharded and getattr(s, "loss", "") == "logexpwithlm" and getattr(s, "lm_loss_coef", 0):
        return (f"reward.py --loss logexpwithlm under {sharded}: its LM term needs the base's whole LM head beside a "
                "sharded model; use a DDP launch, or --lm_loss_coef 0 (logexp), or --loss logexp")
    if script == "rl.py":
        if sharded and any(str(r).startswith("rm:") for r in getattr(s, "reward", [])):
            return (f"rl.py --reward rm:FOLDER under {sharded}: the reward model would be sharded like the policy and "
                    "score nothing; use a DDP launch (each GPU holds the policy and the reward model), or serve it "
                    "and use --reward judge")
        # As flags (TRL's vllm_* fields are flags too, going to trainer_overrides), one or several.
        asked = [f"--{k}" for k in (getattr(s, "trainer_overrides", None) or {}) if k.startswith("vllm_")]
        asked += ["--vllm_mode server"] if getattr(s, "vllm_mode", "colocate") == "server" else []
        # rl.py's own vllm_gpu_memory_utilization (set when it is not its default, TRL's 0.3): it went to GRPOConfig
        # under --backend vllm only, so on transformers it was dropped without a word.
        memory = getattr(s, "vllm_gpu_memory_utilization", None)
        default = getattr(type(s), "__dataclass_fields__", {}).get("vllm_gpu_memory_utilization")
        set_memory = default is not None and memory != default.default
        asked += ["--vllm_gpu_memory_utilization"] if set_memory else []
        if asked and not wants_vllm(s):  # auto fell back to transformers: the vLLM settings would do nothing
            they, them = ("it", "it") if len(asked) == 1 else ("they", "them")
            return (f"rl.py {', '.join(asked)}: generation runs on transformers here (--backend {s.backend}; vLLM "
                    f"needs a CUDA GPU and the vllm package), so {they} would do nothing; drop {them}, or pass "
                    "--backend vllm on a machine with both")
        if set_memory and getattr(s, "vllm_mode", "colocate") == "server":  # TRL reads it in colocate mode only
            return ("rl.py --vllm_gpu_memory_utilization with --vllm_mode server: the server holds its own share of its "
                    "GPUs (trl vllm-serve --gpu_memory_utilization), so it would do nothing; drop it, or pass it to "
                    "trl vllm-serve")
        if getattr(s, "backend", "") == "vllm" and (lacking := vllm_lacking()):  # rl.resolve_backend's, sooner
            return vllm_refused(s, lacking)
        if wants_vllm(s) and resolve_quantization(quantization, for_training=True, log=False) == "4bit":
            return ("rl.py with vLLM and QLoRA (--quantization 4bit): TRL syncs packed 4-bit weights vLLM cannot load, "
                    "and each sync re-quantizes the frozen base (TRL issue #4973); use --backend transformers, or "
                    "--quantization none with vLLM")
    return None


def vllm_lacking() -> str | None:
    """What this machine lacks for vLLM generation, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None if importlib.util.find_spec("vllm") is not None else "vllm is not installed"


def vllm_refused(s, why: str) -> str:
    """rl.py's --backend vllm refused for `why`, named as given: TRL's use_vllm true as its flag, recipe key or
    variable (RLSettings keeps that label), not a --backend vllm the user never typed."""
    typed = getattr(s, "_vllm_as_given", None)
    if not typed:
        return f"--backend vllm: {why}; pass --backend transformers (or auto) to generate with transformers"
    return (f"{typed} true" if typed.startswith("--") else f"{typed} (--backend vllm)") + (
        f": {why}; drop it (or set it false) to generate with transformers")


def wants_vllm(s) -> bool:
    """Whether rl.py generates with vLLM: the decision alignkit.train.rl.resolve_backend makes (with its checks and
    log line) when the run starts, made here without them for `refusal`."""
    return s.backend == "vllm" or (s.backend == "auto" and torch.cuda.is_available()
                                   and importlib.util.find_spec("vllm") is not None)


def _no_8bit(sharded: str) -> str:
    return (f"--quantization 8bit cannot be sharded by {sharded}: bitsandbytes supports that for 4-bit only. "
            "Use --quantization 4bit, or a DDP launch (recipes/accelerate/ddp.yaml).")


@dataclass(frozen=True)
class Launch:
    mode: str  # one process, DDP, FSDP, ZeRO-2, ZeRO-3
    world_size: int
    local_rank: int
    device: torch.device


_distributed_state = None


def _start_process_group():
    """accelerate's PartialState: it creates the process group (nccl on GPUs, gloo on CPUs) and sets the device.

    The Trainer's TrainingArguments later find the same state (it is a singleton) and use it.
    """
    import atexit

    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if _end_process_group not in _AT_EXIT:
        _AT_EXIT.append(_end_process_group)
        atexit.register(_end_process_group)
    return state


_AT_EXIT: list = []


def _end_process_group() -> None:
    """At exit, the process group ended by this process: left to the interpreter's teardown, its gloo or NCCL
    threads were destroyed still running, and a process that had saved everything died of SIGABRT ("terminate
    called without an active exception"), failing the launch. Local to this process: no collective, no waiting."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def establish_launch(s=None, script: str = "") -> Launch:
    """The launch, established before anything loads (see the module docstring). Call it first in every script."""
    global _distributed_state
    why = refusal(s, script) if s is not None else None
    if why:
        error = UserError(why)
        # Before any process group: every process of the launch refuses alike, and one line per machine says it.
        error.said_by_local_rank_0 = world_size() > 1 and os.environ.get("LOCAL_RANK", "0") != "0"
        raise error
    launch = Launch(launch_mode(), world_size(), local_gpu(), training_device())
    if not torch.cuda.is_available() and (other := other_accelerator()):
        logger.info(f"device: cpu ({other} found: alignkit runs on CUDA GPUs or the CPU, and its 4-bit, attention "
                    f"and memory decisions are not made for {other})")
    if launch.world_size > 1:
        from alignkit.core.parent_death import stop_with_parent

        if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun's (accelerate launch's) ranks, started by its agent
            stop_with_parent(os.getppid())  # a launcher killed hard takes its ranks with it (they trained on alone)
        if torch.cuda.is_available():
            torch.cuda.set_device(launch.local_rank)  # before loading: bitsandbytes places on the current device
        hook = sys.excepthook
        _distributed_state = _start_process_group()
        rank = int(os.environ.get("RANK", 0))
        report_on_rank(hook, rank)  # torch's hook lost our error line
        logger.info(f"launch: {launch.mode}, {launch.world_size} processes; this one is local rank {launch.local_rank} "
                    f"on {launch.device}", extra={"every_rank": True})
        _quiet_other_ranks(rank)
        if launch.mode == FSDP and not fsdp_shards_here():
            logger.info("FSDP on a machine without CUDA: accelerate shards on GPUs only, so this launch trains as "
                        "DDP, each process holding the whole model (FSDP's refusals still apply)")
    if launch.mode == "ZeRO-3" and script not in ONE_PROCESS:
        requested = getattr(s, "quantization", "none") if s is not None else "none"
        register_zero3_init(resolve_quantization(requested, log=False) in ("4bit", "8bit"))
    return launch


def fsdp_shards_here() -> bool:
    """Whether accelerate turns FSDP on for this launch: on GPU launches only (accelerate/state.py's FSDP branch
    leaves MULTI_CPU out); tests/launched.py --fsdp-on-cpu lifts that check, and this with it."""
    return torch.cuda.is_available()


def _quiet_other_ranks(rank: int) -> None:
    """The scripts' own lines (`print`, PEFT's trainable-parameter count) once per launch, not once per process:
    only global rank 0 keeps its stdout, as `torchrun --local-ranks-filter 0` would. Warnings, errors and the
    lines logged with every_rank go to stderr and stay; `--debug` (ALIGNKIT_DEBUG=1) keeps every rank's stdout."""
    if rank != 0 and not debugging():
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")


def agreed_minimum(value: int) -> int:
    """The smallest `value` over all processes (all_reduce MIN), so that every rank takes the same decision; the
    value itself when no process group is running."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = training_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def every_process(value) -> list:
    """`value` as each process has it, in rank order (all_gather_object); `[value]` when no process group runs.
    For decisions every rank must take alike: compare the views, and stop all ranks together where they differ."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, value)
    return views


def free_memory(device: torch.device) -> int:
    """Bytes free for training on `device`: the GPU's free memory, or the host's available memory (psutil, which
    peft and TRL require, reads it on Linux, macOS and Windows alike)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


# ---------------------------------------------------------------------------------------------------------
# The loader's hardware decisions


def _ampere_or_newer() -> bool:
    """Compute capability >= 8.0 (A100, A10, L4, H100, RTX 30xx/40xx): native bf16 and flash-attn 2's kernels."""
    return torch.cuda.get_device_capability(local_gpu()) >= (8, 0)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(requested: str) -> torch.dtype:
    name, why = dtype_choice(requested)
    if requested == "auto":
        _log_choice("dtype", name, why)
    return DTYPES[name]


def dtype_choice(requested: str) -> tuple[str, str]:
    """(the dtype name a run computes in, why) for `--dtype requested`, without a log line."""
    if requested != "auto":
        return requested, f"--dtype {requested}"
    if torch.cuda.is_available():
        # torch.cuda.is_bf16_supported() defaults to including_emulation=True (torch/cuda/__init__.py: it then
        # returns True for any GPU that can hold a bf16 tensor), so V100/T4 would "support" bf16 and train in
        # slow emulation. Only native bf16 (Ampere and newer) counts.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", "CUDA with native bf16"
        return "fp16", "this GPU has no native bf16 (compute capability < 8.0)"
    return "fp32", "no CUDA device: bf16/fp16 compute needs a GPU, so the CPU computes in fp32"


def _mixed_precision_conflict(s) -> str | None:
    """The refusal when `accelerate launch` asks for a mixed precision (ACCELERATE_MIXED_PRECISION, from its config
    or --mixed_precision) other than the dtype this run computes in. transformers takes the launch's value where
    the run asks for neither bf16 nor fp16, so an fp32 run would autocast in bf16 behind its own log line, and
    DeepSpeed stops at its first step on any difference ("DeepSpeed config values that mismatch")."""
    launched, json_file = os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), None
    if launched not in ("bf16", "fp16") and (found := _deepspeed_json_precision()):  # "bf16": {"enabled": true}
        launched, json_file = found
    if launched not in ("bf16", "fp16") or not hasattr(s, "dtype"):
        return None
    ours, why = dtype_choice(s.dtype)
    if ours == launched:
        return None
    or_dtype = f", or pass --dtype {launched}" if s.dtype != "auto" else ""
    if json_file:
        return (f"the DeepSpeed config {json_file} enables {launched}, but this run computes in {ours} ({why}): set "
                f'"{launched}": {{"enabled": "auto"}} in {json_file} (DeepSpeed then takes the run\'s precision)'
                f"{or_dtype}")
    return (f"accelerate launch asks for mixed_precision {launched}, but this run computes in {ours} ({why}): launch "
            f"with --mixed_precision {'no' if ours == 'fp32' else ours} (or set it in the accelerate config){or_dtype}")


def resolve_quantization(requested: str, for_training: bool = True, log: bool = True) -> str:
    if requested != "auto":
        return requested
    say = _log_choice if log else (lambda *a: None)
    if not for_training:
        # Generation, judging, evaluation: a merged bf16 model must be judged as it is, not as its NF4 copy.
        say("quantization", "none", "inference loads the model as saved; --quantization 4bit to save memory")
        return "none"
    if torch.cuda.is_available():
        say("quantization", "4bit", "QLoRA by default on CUDA; --quantization none to train in full precision")
        return "4bit"
    say("quantization", "none", "no CUDA device; --quantization 4bit still runs QLoRA on the CPU, slowly")
    return "none"


@dataclass(frozen=True)
class FourBit:
    """bitsandbytes' 4-bit format: QLoRA's NF4 with double quantization (its block scales quantized too) unless the
    settings say otherwise (--bnb_4bit_quant_type fp4, --use_bnb_nested_quant false, TRL's names). A QLoRA adapter
    trained over one format is another model over the other: merge.py --dequantize and a QLoRA reward model read
    their run's (`trained_four_bit`)."""
    quant_type: str = "nf4"
    nested: bool = True

    @classmethod
    def of(cls, s) -> FourBit:
        """The format loader settings `s` ask for (ModelSettings' bnb_4bit_quant_type, use_bnb_nested_quant)."""
        return cls(getattr(s, "bnb_4bit_quant_type", "nf4"), bool(getattr(s, "use_bnb_nested_quant", True)))

    def __str__(self) -> str:
        return f"4-bit {self.quant_type.upper()}{' with double quantization' if self.nested else ''}"


def quantization_config(quantization: str, dtype: torch.dtype, four_bit: FourBit = FourBit()):
    """bitsandbytes' config for `quantization` ("4bit", "8bit"), or None; a 4-bit one in the format `four_bit`."""
    from transformers import BitsAndBytesConfig

    sharded = sharded_launch()
    if quantization == "8bit" and sharded:
        raise UserError(_no_8bit(sharded))
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=four_bit.quant_type, bnb_4bit_use_double_quant=four_bit.nested,
            bnb_4bit_compute_dtype=dtype,
            # FSDP and ZeRO-3 flatten parameters of one dtype: store the 4-bit weights in the compute dtype.
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def device_placement(quantization: str = "none", on_cpu: bool = False) -> dict:
    """from_pretrained's device_map: the whole model on this process's own GPU.

    Without a device_map, from_pretrained leaves the model on the CPU, and only the Trainer moves it to the GPU:
    generation, judging and evaluation (which have no Trainer) would run on the CPU of a GPU machine.
    device_map="auto" would spread one model over every visible GPU and break DDP, where each process owns one.
    FSDP and ZeRO-3 place a full-precision model themselves (none here); a 4-bit model they cannot build sharded,
    so it goes on this rank's GPU, as TRL's get_kbit_device_map puts it (bitsandbytes would otherwise take
    current_device()). on_cpu: CPU RAM even for a 4-bit model (merge.py --dequantize: a 7B in fp32 is 28 GB).
    """
    if not torch.cuda.is_available():
        return {}
    if on_cpu:
        return {"device_map": {"": "cpu"}} if quantization != "none" else {}
    if sharded_launch() and quantization == "none":
        return {}
    _log_choice("device", f"cuda:{local_gpu()}", "the whole model on this process's GPU")
    return {"device_map": {"": local_gpu()}}
