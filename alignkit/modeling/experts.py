"""A mixture of experts under alignkit's loader: transformers 5 keeps the routed experts' weights as fused 3-D
tensors, not linear layers, and PEFT and bitsandbytes treat them apart. Each function says, or refuses before the
weights load, what that means for a run: which experts LoRA adapts, its dropout, their precision under 4-bit."""

from __future__ import annotations

from alignkit import logger
from alignkit.core.errors import UserError


def peft_expert_targets(model_type: str) -> dict:
    """{module name: fused expert parameter} that PEFT turns LoRA targets into for this family (its transformers-5
    conversion: Mixtral's, Qwen3-MoE's, OLMoE's, DeepSeek's...), {} where it adapts no fused expert."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a PEFT before the conversion: no expert is targeted
        return {}
    family = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    return getattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {}).get(family) or {}


def check_dropout(s, model_config) -> None:
    """Before the weights load: LoRA dropout on a family whose fused experts PEFT adapts ended in PEFT's ValueError
    ("ParamWrapper does not work with lora_dropout != 0") after the load, under alignkit's default --lora_dropout."""
    targets = getattr(s, "lora_target_modules", None)
    if not getattr(s, "lora_dropout", 0) or getattr(s, "adapter", "lora") != "lora" or not targets:
        return
    model_type = getattr(model_config(), "model_type", None)
    experts = peft_expert_targets(model_type)
    if experts and (targets == ["all-linear"] or set(targets) & set(experts)):
        raise UserError(f"--lora_dropout {s.lora_dropout} on {s.model_id} ({model_type}, a mixture of experts): "
                        "PEFT adapts its fused experts' 3-D weights, which take no LoRA dropout; pass --lora_dropout "
                        "0, or --lora_target_modules without the experts' layers (e.g. q_proj,k_proj,v_proj,o_proj)")


def say_unadapted(model, config) -> None:
    """One line where the new adapter leaves a mixture of experts' routed experts untouched: their weights are 3-D
    tensors, not linear layers, and PEFT targets them (target_parameters) only for the families it knows (Mixtral's,
    not Qwen2-MoE's: found by the reward audit of session 30), so the attention and any shared expert alone train."""
    if getattr(config, "target_parameters", None):
        return
    experts = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 3 and "experts" in name.split("."))
    if experts:
        total = sum(p.numel() for p in model.parameters())
        logger.info(f"LoRA adapts none of the routed experts ({experts / total:.0%} of the weights: fused 3-D tensors "
                    "PEFT does not target for this family); the attention, shared experts and other linear layers "
                    "train")


def say_unquantized(model) -> None:
    """One line where a 4-bit load left a mixture of experts' fused expert tensors (3-D parameters: transformers 5
    keeps Mixtral's, Qwen-MoE's and OLMoE's experts so) in full precision: bitsandbytes quantizes linear layers only,
    so QLoRA's memory saving misses most of such a model, which went unsaid."""
    experts = [p for name, p in model.named_parameters() if p.dim() >= 3 and "experts" in name.split(".")]
    fused = sum(p.numel() for p in experts)  # not a vision tower's convolutions, nor a hybrid model's conv1d
    if not fused:
        return
    # A Params4bit packs two 4-bit values per byte: its count of stored values is half the weights it holds.
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    dtype = experts[0].dtype
    logger.info(f"4-bit: the experts' fused weights, {fused / total:.0%} of {type(model).__name__}'s, stay in "
                f"{str(dtype).removeprefix('torch.')}: bitsandbytes quantizes linear layers only, so QLoRA saves "
                "memory on the rest of this mixture of experts alone; budget the experts at full size")
