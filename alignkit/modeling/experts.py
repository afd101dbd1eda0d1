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


def _named(targets: list[str], names) -> bool:
    """Whether --lora_target_modules names any of `names`, as PEFT matches a target (the name, or a dotted path
    ending in it)."""
    return targets == ["all-linear"] or any(t.rsplit(".", 1)[-1] in names for t in targets)


def check_dropout(s, model_config) -> None:
    """Before the weights load: LoRA dropout (alignkit's default 0.05) or DoRA on a family whose fused experts PEFT
    adapts ended in PEFT's ValueError ("ParamWrapper does not work with lora_dropout != 0", "... with DoRA") after
    the weights loaded. A config that cannot be read is left to the load, which says why in its own line."""
    targets = getattr(s, "lora_target_modules", None)
    dropout, dora = getattr(s, "lora_dropout", 0), getattr(s, "use_dora", False)
    if not (dropout or dora) or getattr(s, "adapter", "lora") != "lora" or not targets:
        return
    try:
        model_type = getattr(model_config(), "model_type", None)
    except Exception:  # noqa: BLE001 - from_pretrained reports the problem itself (custom code, a missing file)
        return
    experts = peft_expert_targets(model_type)
    if experts and _named(targets, experts):
        what = f"--lora_dropout {dropout}" if dropout else "--use_dora true"
        fix = "pass --lora_dropout 0" if dropout else "drop --use_dora"
        raise UserError(f"{what} on {s.model_id} ({model_type}, a mixture of experts): PEFT adapts its fused experts "
                        f"and its router as parameters, which take no LoRA dropout nor DoRA; {fix}, or "
                        "--lora_target_modules without them (e.g. q_proj,k_proj,v_proj,o_proj)")


def _stored(p) -> int:
    """The weights a parameter holds, whole: under ZeRO-3's zero.Init its local shape is [0] (ds_numel is the
    whole), and a 4-bit Params4bit packs two values a byte."""
    return getattr(p, "ds_numel", None) or p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)


def _fused_experts(model) -> list:
    """A mixture of experts' fused expert weights (3-D: transformers 5 keeps Mixtral's, Qwen-MoE's and OLMoE's
    experts so), not a vision tower's convolutions nor a hybrid model's conv1d."""
    return [p for name, p in model.named_parameters()
            if len(getattr(p, "ds_shape", p.shape)) >= 3 and "experts" in name.split(".")]


def say_unadapted(model, config) -> None:
    """One line where the new adapter leaves a mixture of experts' routed experts untouched: their weights are 3-D
    tensors, not linear layers, and PEFT adapts them (target_parameters) only for the families it knows (Mixtral's,
    not Qwen2-MoE's: found by the reward audit of session 30), and only where --lora_target_modules names them."""
    if getattr(config, "target_parameters", None):
        return
    fused = sum(_stored(p) for p in _fused_experts(model))
    if not fused:
        return
    share = fused / sum(_stored(p) for p in model.parameters())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    why = ("--lora_target_modules names none of their layers" if peft_expert_targets(model_type) else
           "PEFT does not adapt this family's fused 3-D expert weights")
    logger.info(f"LoRA adapts none of the routed experts ({share:.0%} of the weights): {why}; the attention, shared "
                "experts and other linear layers train")


def say_unquantized(model) -> None:
    """One line where a 4-bit load left a mixture of experts' fused expert tensors (3-D parameters: transformers 5
    keeps Mixtral's, Qwen-MoE's and OLMoE's experts so) in full precision: bitsandbytes quantizes linear layers only,
    so QLoRA's memory saving misses most of such a model, which went unsaid."""
    experts = _fused_experts(model)
    fused = sum(_stored(p) for p in experts)
    if not fused:
        return
    total = sum(_stored(p) for p in model.parameters())
    dtype = experts[0].dtype
    logger.info(f"4-bit: the experts' fused weights, {fused / total:.0%} of {type(model).__name__}'s, stay in "
                f"{str(dtype).removeprefix('torch.')}: bitsandbytes quantizes linear layers only, so QLoRA saves "
                "memory on the rest of this mixture of experts alone; budget the experts at full size")
