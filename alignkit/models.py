"""The one model loader every script uses.

`load_model(settings)` takes a Hub id, a local model folder, or an adapter folder. For an adapter folder the
base model is read from its adapter_config.json, recursively, so a DPO adapter trained on top of an SFT
adapter loads as base -> SFT -> DPO. It resolves the "auto" hardware settings (dtype, 4-bit, attention,
Liger) with one log line each, and returns the tokenizer with a safe pad token and a chat template.

`add_trainable_adapter` then puts a fresh LoRA adapter ("default") on top; adapters the model was loaded with
stay active and frozen, and `reference_mode` switches to them alone for the DPO reference pass.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import logger, quiet_library_noise

TRAINABLE = "default"  # PEFT's default adapter name; transformers' Trainer resumes this one


@dataclass
class Loaded:
    model: torch.nn.Module  # a PreTrainedModel, or a PeftModel when adapters were loaded
    tokenizer: object
    base_id: str  # the base model under all adapters
    adapters: list[str] = field(default_factory=list)  # adapter sources, base first
    frozen: list[str] = field(default_factory=list)  # their adapter names inside the PeftModel
    dtype: torch.dtype = torch.float32
    quantization: str = "none"


def _log_choice(what: str, value: str, why: str) -> None:
    logger.info(f"{what}: {value} ({why})")


def resolve_dtype(requested: str) -> torch.dtype:
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested != "auto":
        return names[requested]
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            _log_choice("dtype", "bf16", "CUDA with bf16 support")
            return torch.bfloat16
        _log_choice("dtype", "fp16", "this GPU lacks bf16")
        return torch.float16
    _log_choice("dtype", "fp32", "no CUDA device: bf16/fp16 training needs a GPU, so the CPU computes in fp32")
    return torch.float32


def resolve_quantization(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        _log_choice("quantization", "4bit", "QLoRA NF4 by default on CUDA; --quantization none to train in full precision")
        return "4bit"
    _log_choice("quantization", "none", "no CUDA device; --quantization 4bit still runs QLoRA on the CPU, slowly")
    return "none"


def resolve_attention(requested: str) -> str:
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        _log_choice("attention", "sdpa", "no CUDA device, so no flash attention")
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        _log_choice("attention", "sdpa", "flash-attn is not installed: pip install 'alignkit[gpu]' for flash_attention_2")
        return "sdpa"
    _log_choice("attention", "flash_attention_2", "CUDA and flash-attn installed")
    return "flash_attention_2"


def resolve_liger(requested: str) -> bool:
    if requested != "auto":
        return requested == "true"
    if not torch.cuda.is_available():
        return False  # Liger's Triton kernels need CUDA; the CPU path needs no log line beyond attention's
    if importlib.util.find_spec("liger_kernel") is None:
        _log_choice("liger", "off", "liger-kernel is not installed: pip install 'alignkit[gpu]'")
        return False
    _log_choice("liger", "on", "CUDA and liger-kernel installed")
    return True


def _sharded_launch() -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when accelerate launched this process to shard the model, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true") and os.environ.get(
        "ACCELERATE_DEEPSPEED_ZERO_STAGE", ""
    ) == "3":
        return "DeepSpeed ZeRO-3"
    return None


def adapter_config(source: str, revision: str | None = None) -> dict | None:
    """The adapter_config.json of `source` as a dict, or None when `source` is a full model."""
    path = Path(source)
    if path.is_dir():
        file = path / "adapter_config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    if path.exists() or source.count("/") != 1:
        return None
    # A Hub id: ask the Hub whether it holds an adapter; offline, let from_pretrained report the problem.
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "adapter_config.json", revision=revision)).read_text())
    except Exception:  # noqa: BLE001 - not an adapter, or not reachable: treat as a full model
        return None


def adapter_chain(source: str, revision: str | None = None) -> tuple[str, list[str]]:
    """(base model id, [adapter sources from the base upwards])."""
    chain: list[str] = []
    while (config := adapter_config(source, revision)) is not None:
        chain.insert(0, source)
        base = config.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{source}/adapter_config.json has no base_model_name_or_path; pass the base with --model_id")
        if len(chain) > 8:
            raise ValueError(f"adapter chain from {source} is longer than 8: does an adapter name itself as its base?")
        source = base
    return source, chain


def load_tokenizer(source: str, revision=None, trust_remote_code=False, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = Path(chat_template).read_text()
    set_pad_token(tok)
    return tok


def set_pad_token(tok) -> None:
    """Give the tokenizer a pad token that is not its eos token.

    With pad == eos, collators that mask padding also mask the real end-of-answer token, so the model never
    learns to stop. Prefer a token the vocabulary already has, so no embedding has to be added.
    """
    if tok.pad_token is not None and tok.pad_token != tok.eos_token:
        return
    vocab = tok.get_vocab()
    for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", tok.unk_token):
        if candidate and candidate in vocab and candidate != tok.eos_token:
            tok.pad_token = candidate
            return
    tok.add_special_tokens({"pad_token": "<|pad|>"})  # the loader then resizes the embeddings


def require_chat_template(tok, model_id: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"{model_id} has no chat template, and this data is conversational. Pass one with "
            "--chat_template FILE (a Jinja file: take it from an instruct model of the same family, or from TRL's "
            "trl/chat_templates folder)."
        )


def load_model(s, *, for_training: bool = False, full_precision: bool = False, dequantize: bool = False,
               base_model: str | None = None, reward: bool = False) -> Loaded:
    """Load `s.model_id` (settings from alignkit.config.ModelSettings) and any adapter chain under it.

    full_precision: never quantize (merging adapters must happen in full precision).
    dequantize: load the base in 4-bit NF4, then turn it back into plain weights before the adapters go on:
        the exact model a QLoRA adapter was trained against, in a form adapters can merge into.
    base_model: use this base instead of the one the adapter chain records (a moved or renamed base).
    reward: load a reward model (sequence classification, one output; see "Reward models" below) instead of a
        causal LM. Either way, a model of the other kind is an error that says what to pass instead.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_library_noise()
    base_id, chain = adapter_chain(s.model_id, s.revision)
    base_id = base_model or base_id
    check_model_kind(s.model_id, s.revision, reward, for_training)
    if chain:
        logger.info(f"{s.model_id} is an adapter; base model: {base_id}; adapters: {' -> '.join(chain)}")
    dtype = resolve_dtype(s.dtype)
    quantization = "4bit" if dequantize else "none" if full_precision else resolve_quantization(s.quantization)
    kwargs: dict = dict(
        revision=None if chain else s.revision, trust_remote_code=s.trust_remote_code, dtype=dtype,
        attn_implementation=resolve_attention(s.attn_implementation),
    )
    sharded = _sharded_launch()
    if quantization == "8bit" and sharded:
        raise ValueError(
            f"--quantization 8bit cannot be sharded by {sharded}: bitsandbytes supports that for 4-bit only. "
            "Use --quantization 4bit, or a DDP launch (recipes/accelerate/ddp.yaml)."
        )
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP and ZeRO-3 flatten parameters of one dtype: store the 4-bit weights in the compute dtype.
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quantization != "none" and torch.cuda.is_available() and not sharded:
        # Each process owns one GPU: device_map="auto" would spread a model over all of them and break DDP.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if reward:
        model = _load_reward_base(base_id, kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_id, **kwargs)
    if dequantize:
        model = model.dequantize()  # bitsandbytes' own NF4 -> float, weight by weight
        model.to(dtype)
        quantization = "none"
    if resolve_liger(s.use_liger):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # Layer kernels only: TRL's fused LM head replaces the loss, so Liger's fused cross-entropy stays off.
        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)

    # The tokenizer travels with the last adapter when it was saved there (it carries the chat template).
    tok_source = next((a for a in reversed(chain) if Path(a, "tokenizer_config.json").is_file()), base_id)
    tok = load_tokenizer(tok_source, None if chain else s.revision, s.trust_remote_code, s.chat_template)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id  # a reward model scores the last token before the padding
    if getattr(model, "generation_config", None) is not None:  # a reward model cannot generate: it has none
        model.generation_config.pad_token_id = tok.pad_token_id
        if tok.eos_token_id is not None:
            model.generation_config.eos_token_id = tok.eos_token_id

    frozen: list[str] = []
    if chain:
        from peft import PeftModel

        for i, source in enumerate(chain):
            name = f"frozen_{i}"
            if i == 0:
                model = PeftModel.from_pretrained(model, source, adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(source, adapter_name=name, is_trainable=False)
            frozen.append(name)
        model.base_model.set_adapter(frozen, inference_mode=True)
    if not for_training:
        model.eval()
    return Loaded(model, tok, base_id, chain, frozen, dtype, quantization)


def add_trainable_adapter(loaded: Loaded, s, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Put a fresh LoRA adapter on top: the base and any loaded adapters stay frozen and active.

    task_type "SEQ_CLS" (a reward model): PEFT also trains the score head and saves it with the adapter.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed

    # LoRA's A matrices start random, before the Trainer seeds anything: without this, --seed would not make
    # two runs (or a run and its resume's straight twin) start from the same weights.
    set_seed(s.seed)
    targets = s.lora_target_modules
    config = LoraConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, task_type=task_type, bias="none",
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    model = loaded.model
    if isinstance(model, PeftModel):
        model.add_adapter(TRAINABLE, config)
        # The trained adapter first: transformers' Trainer resumes the first active adapter.
        model.base_model.set_adapter([TRAINABLE, *loaded.frozen])
        model.set_requires_grad(loaded.frozen, requires_grad=False)
    else:
        model = get_peft_model(model, config)
    loaded.model = model
    return model


@contextlib.contextmanager
def reference_mode(model, frozen: list[str]):
    """Run `model` as the DPO reference: the trained adapter off, any frozen adapters it was loaded with on."""
    if not frozen:
        with model.disable_adapter():
            yield
        return
    lora = model.base_model
    active = list(lora.active_adapters)
    lora.set_adapter(frozen, inference_mode=True)
    try:
        yield
    finally:
        lora.set_adapter(active)  # this marks every active adapter trainable again ...
        model.set_requires_grad(frozen, requires_grad=False)  # ... so freeze the loaded ones once more


def save_adapter(model, tokenizer, out_dir: str | os.PathLike, base_source: str) -> None:
    """Save only the trained adapter, recording what it sits on (the base, or the adapter it was trained over)."""
    out = Path(out_dir)
    model.save_pretrained(out, selected_adapters=[TRAINABLE])
    tokenizer.save_pretrained(out)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    # A local base is recorded by absolute path so the adapter loads from any working directory.
    config["base_model_name_or_path"] = str(Path(base_source).resolve()) if Path(base_source).exists() else base_source
    config_file.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------------------
# Reward models: a sequence-classification head with one output ("score") on the same backbone.
#
# reward.py loads the base with AutoModelForSequenceClassification(num_labels=1): a fresh score head replaces
# the LM head. The LoRA adapter (task_type SEQ_CLS) trains the score head in full and saves it with the
# adapter (PEFT's modules_to_save), so a reward run folder is an adapter folder like any other.

REWARD, CAUSAL = "reward model", "causal language model"


def model_kind(source: str, revision: str | None = None) -> str | None:
    """REWARD or CAUSAL for a model or adapter folder (or Hub id); None when it cannot be told offline."""
    adapter = adapter_config(source, revision)
    if adapter is not None:
        return REWARD if adapter.get("task_type") == "SEQ_CLS" else CAUSAL
    file = Path(source, "config.json")
    try:
        if file.is_file():
            config = json.loads(file.read_text())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, revision=revision).to_dict()
    except Exception:  # noqa: BLE001 - unreachable or not a model: from_pretrained reports it properly later
        return None
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return REWARD if config.get("num_labels", len(config.get("id2label") or {0: 0})) == 1 else None
    return CAUSAL if architectures else None


def check_model_kind(source: str, revision: str | None, reward: bool, for_training: bool = False) -> None:
    """A reward model where a causal LM is needed (or the reverse) fails here, saying what to pass instead."""
    kind = model_kind(source, revision)
    if reward and kind == CAUSAL and not for_training:
        raise ValueError(
            f"{source} is a causal language model (no reward score head), not a reward model. Pass a reward.py run "
            "folder (or its merged/ folder) as rm:FOLDER; to judge with this model's text verdicts use --judge hf "
            f"--judge_model {source}; to get a reward model from it, train one: python reward.py --model_id {source}"
        )
    if not reward and kind == REWARD:
        raise ValueError(
            f"{source} is a reward model (a score head, no language-model head): it scores answers but cannot "
            "generate or be fine-tuned as a policy. Pass it as a judge, --judge rm:" + source + " (or "
            "alignkit.rewards.load('rm:" + source + "')), and pass a causal language model (an SFT/DPO run "
            "folder, a Hub id) as the generator or --model_id"
        )
    if reward and for_training and adapter_config(source, revision) is not None:
        what = "a reward model's adapter" if kind == REWARD else "a LoRA adapter"
        raise ValueError(
            f"{source} is {what}: reward.py trains a fresh adapter and score head on a full model. Merge it first "
            f"(python merge.py --adapter_dir {source}) and pass --model_id {Path(source, 'merged')}"
        )


def _load_reward_base(base_id: str, kwargs: dict):
    """The base as AutoModelForSequenceClassification with one output; the LM head's weights are not loaded."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    # A causal LM's checkpoint has lm_head.weight and no score.weight: both expected, so not warned about.
    with suppress_seqcls_warning():
        return AutoModelForSequenceClassification.from_pretrained(base_id, num_labels=1, **kwargs)


def load_lm_head(base_id: str, model, revision: str | None = None) -> torch.nn.Module:
    """The base's LM head, frozen, beside a reward model (for the LM term of reward.py's logexpwithlm loss).

    Only that one tensor is read from the checkpoint; with tied embeddings it is the input embedding matrix.
    """
    backbone_config = model.config.get_text_config()
    embeddings = model.get_input_embeddings().weight
    head = torch.nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False, device=embeddings.device,
                           dtype=embeddings.dtype if embeddings.is_floating_point() else torch.float32)
    if getattr(backbone_config, "tie_word_embeddings", False):
        head.weight = embeddings
    else:
        from safetensors import safe_open
        from transformers.utils import cached_file

        index = cached_file(base_id, "model.safetensors.index.json", revision=revision,
                            _raise_exceptions_for_missing_entries=False)
        shard = json.loads(Path(index).read_text())["weight_map"]["lm_head.weight"] if index else "model.safetensors"
        with safe_open(cached_file(base_id, shard, revision=revision), framework="pt") as f:
            weight = f.get_tensor("lm_head.weight")
        if weight.shape[0] < head.weight.shape[0]:  # the tokenizer added a pad token: its row stays zero
            weight = torch.cat([weight, weight.new_zeros(head.weight.shape[0] - weight.shape[0], weight.shape[1])])
        head.weight = torch.nn.Parameter(weight.to(head.weight.device, head.weight.dtype))
    head.requires_grad_(False)
    return head
