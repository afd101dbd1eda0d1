"""Which kernels a load uses, decided before the weights load and logged once with the reason: the attention
implementation (`resolve_attention`: sdpa, eager for a model without sdpa, flash_attention_2 on a GPU that runs it,
flex_attention for DPO with prefix sharing where it is checked to pay) and Liger (`resolve_liger`).
"""

from __future__ import annotations

import importlib.util

import torch

from alignkit.core import launch
from alignkit.core.errors import UserError
from alignkit.core.launch import _log_choice, local_gpu


def packs_pairs(s, for_training: bool) -> bool:
    """Whether a load with settings `s` is for DPO training with prefix sharing on (dpo.py, and rlaif.py's rounds,
    which run it): the one run whose `auto` attention weighs FlexAttention (`resolve_attention`). sft.py, kto.py,
    reward.py, rl.py and every inference load (generation, judging, evaluation) keep the plain choice."""
    return for_training and getattr(s, "run_type", None) == "dpo" and bool(getattr(s, "prefix_sharing", False))


def resolve_attention(requested: str, dtype: torch.dtype | None = None, packed_config=None, model_config=None) -> str:
    """The attention implementation to load: an explicit request as given (checked where it would crash;
    flash_attention_2 or flex_attention without CUDA loads sdpa, in one line), else:

    - flex_attention for DPO with prefix sharing (`packed_config`: a callable giving the model's config, passed
      only where `packs_pairs`) on a CUDA GPU of compute capability >= 8.0, where alignkit.train.prefix's
      `flex_preferred` says yes (the model runs under flex_attention, no attention dropout, sharing applies)
      and its kernel passes alignkit.train.flex_check on this GPU (compiles, and matches plain attention, forward
      and backward, at the model's head sizes and dtype; else the choice below, with the failure in its line):
      the prompt is computed once on a kernel that skips masked blocks, where flash_attention_2 would turn sharing
      off and sdpa loses its flash kernel to the mask. No GPU figure backs this over flash_attention_2 without
      sharing yet: bench/gpu_dpo.py measures both sides, and `--attn_implementation flash_attention_2` (or sdpa)
      keeps the old choice. Older GPUs keep sdpa: FlexAttention's Triton kernels are untried there.
    - flash_attention_2 only where its kernels run: CUDA, compute capability >= 8.0, bf16/fp16 activations
      (flash-attn 2 has no fp32 kernel and no pre-Ampere build: a model loaded with it on a T4, or in fp32,
      imports fine and crashes in its first forward).
    - sdpa everywhere else.

    Where the choice is sdpa and the model's class has no sdpa attention in transformers (`model_config`: a
    callable giving its config; Gemma-2 and GPT-OSS: sdpa cannot softcap), eager instead, said in the same line;
    an explicit `--attn_implementation sdpa` there is refused before the model loads. The choice and its reason
    are one log line.
    """
    from alignkit.train.prefix import without_sdpa  # core does not import train at module level

    missing = without_sdpa(model_config) if requested == "sdpa" and model_config is not None else None
    if missing:
        raise UserError(f"--attn_implementation sdpa: {missing} has no sdpa attention in transformers; use eager "
                        "(or auto, which picks it)")

    def plain(why: str) -> str:  # sdpa, or eager for a model class without it
        missing = model_config is not None and without_sdpa(model_config)
        if missing:
            _log_choice("attention", "eager", f"{why}; {missing} has no sdpa attention in transformers")
            return "eager"
        _log_choice("attention", "sdpa", why)
        return "sdpa"

    half = dtype in (torch.bfloat16, torch.float16)
    if requested == "flash_attention_2" and torch.cuda.is_available():
        if not half:
            raise UserError("--attn_implementation flash_attention_2 needs --dtype bf16 or fp16 (flash-attn has no "
                            "fp32 kernels); use sdpa, or auto")
        if not launch._ampere_or_newer():
            raise UserError("--attn_implementation flash_attention_2 needs a GPU of compute capability >= 8.0 "
                            f"(this one: {torch.cuda.get_device_capability(local_gpu())}); use sdpa, or auto")
    if requested == "flash_attention_2" and not torch.cuda.is_available():
        # A recipe written for a GPU (the alignment-handbook's ask for flash_attention_2) runs here as it is.
        return plain("flash_attention_2 was asked for, but there is no CUDA device to run it")
    if requested == "flex_attention" and not torch.cuda.is_available():
        return plain("flex_attention was asked for, but there is no CUDA device (torch's FlexAttention has no "
                     "backward on a CPU)")
    if requested == "flash_attention_2" and not flash_attn_installed():
        return plain("flash_attention_2 was asked for, but flash-attn is not installed: pip install flash-attn "
                     "--no-build-isolation")
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return plain("no CUDA device, so no flash attention")
    note = ""  # why a DPO run with prefix sharing does not get flex_attention, appended to the plain choice's line
    if packed_config is not None:
        flex, why = _flex_for_prefix_sharing(packed_config, dtype or torch.float32)
        if flex:
            _log_choice("attention", "flex_attention", f"DPO with prefix sharing: {why}; not yet measured against "
                        "flash_attention_2 without sharing (bench/gpu_dpo.py); --attn_implementation "
                        "flash_attention_2 or sdpa overrides it")
            return "flex_attention"
        note = f"; not flex_attention for prefix sharing: {why}"
    if not launch._ampere_or_newer():
        return plain("flash-attn 2 needs compute capability >= 8.0" + note)
    if not half:
        return plain("flash-attn 2 needs bf16/fp16; this model computes in fp32" + note)
    if not flash_attn_installed():
        return plain("flash-attn is not installed: pip install flash-attn --no-build-isolation" + note)
    _log_choice("attention", "flash_attention_2", "CUDA >= 8.0, half precision, flash-attn installed" + note)
    return "flash_attention_2"


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def loads_as_auto(requested: str, dtype: str | None, cuda: bool) -> bool:
    """Whether an inference load asking for attention `requested` (not for DPO with prefix sharing) in `dtype` (a
    DTYPES name; auto or None: launch.dtype_choice's) loads what `auto` loads here (`resolve_attention`), so that a
    cache keys both as one model. Without CUDA (`cuda`), every one but eager: sdpa, or eager for a class without it,
    where an explicit sdpa is refused. On CUDA, flash_attention_2 always (it loads auto's flash_attention_2, falls
    back to auto's plain choice without flash-attn, or is refused before it loads), and sdpa where auto does not
    pick flash-attn (not installed, compute capability < 8.0, or fp32)."""
    if not cuda:
        return requested in ("sdpa", "flash_attention_2", "flex_attention")
    if requested == "flash_attention_2":
        return True
    half = (dtype if dtype not in (None, "auto") else launch.dtype_choice("auto")[0]) in ("bf16", "fp16")
    flash = half and flash_attn_installed() and launch._ampere_or_newer()
    return requested == "sdpa" and not flash


def _flex_for_prefix_sharing(packed_config, dtype: torch.dtype) -> tuple[bool, str]:
    """(whether, why) a DPO run with prefix sharing on this CUDA machine loads flex_attention (resolve_attention):
    where `flex_preferred` says it applies and its kernel passes alignkit.train.flex_check on this process's GPU
    (it compiles and matches plain attention at the model's head sizes and dtype), and on every other process's
    of the launch: they all load the same attention (every process reaches the agreement, whatever its answer)."""
    flex, why = _flex_on_this_gpu(packed_config, dtype)
    everywhere = launch.agreed_minimum(int(flex))  # called by every process, whatever its own answer
    if flex and not everywhere:
        return False, f"{why}, but not on every process of this launch (they all load the same attention)"
    return flex, why


def _flex_on_this_gpu(packed_config, dtype: torch.dtype) -> tuple[bool, str]:
    if not launch._ampere_or_newer():
        return False, "FlexAttention is tried on compute capability >= 8.0 only"
    from alignkit.train import flex_check  # core does not import train at module level
    from alignkit.train.prefix import flex_preferred

    config = packed_config()
    preferred, why = flex_preferred(config, "cuda")
    if not preferred:
        return False, why
    passed, how = flex_check.check(config, dtype, device=f"cuda:{local_gpu()}")
    return passed, f"{why}; {how}" if passed else how


def liger_runs() -> bool:
    """Whether Liger's kernels can run here: CUDA, and liger-kernel installed (what `auto` and `true` load)."""
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def resolve_liger(requested: str) -> bool:
    """Liger's kernels where asked for (true, a recipe's use_liger_kernel) or `auto` on CUDA with liger-kernel
    installed. Asked for where they cannot run (no CUDA: its Triton kernels need one; not installed), the run goes
    on without them in one log line, as a recipe written for a GPU runs here (it failed with ModuleNotFoundError
    once the model had loaded)."""
    if requested == "false":
        return False
    asked = " (use_liger true was asked for)" if requested == "true" else ""
    if not torch.cuda.is_available():
        if asked:
            _log_choice("liger", "off", f"no CUDA device: Liger's Triton kernels need one{asked}")
        return False  # auto: the CPU path needs no log line beyond attention's
    if importlib.util.find_spec("liger_kernel") is None:
        _log_choice("liger", "off", f"liger-kernel is not installed: pip install 'alignkit[gpu]'{asked}")
        return False
    if asked:
        return True
    _log_choice("liger", "on", "CUDA and liger-kernel installed")
    return True
