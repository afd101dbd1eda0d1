"""The one model loader every script uses.

`load_model(settings)` takes a Hub id, a local model folder, or an adapter folder. For an adapter folder the
base model is read from its adapter_config.json, recursively, so a DPO adapter trained on top of an SFT
adapter loads as base -> SFT -> DPO. The "auto" hardware settings (dtype, 4-bit, attention, Liger, threads, the
device map) are alignkit.core.launch's decisions, one log line each; it returns the tokenizer with a safe pad
token and a chat template.

`add_trainable_adapter` then puts a fresh LoRA adapter ("default") on top; adapters the model was loaded with
stay active and frozen, and `reference_mode` switches to them alone for the DPO reference pass.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core.saved_settings import mark_built
from alignkit.core.errors import UserError
from alignkit.core.groups import chat_template_text
from alignkit.core.progress import quiet_library_noise
from alignkit.core.run_records import remember_attention, remember_loaded_as
from alignkit.modeling import experts, lota_delta
from alignkit.modeling.lineage import check_trained_over, remember_loaded
from alignkit.modeling.model_folders import check_model_source  # noqa: F401 - importable from here too
from alignkit.modeling.reward_models import check_model_kind, check_reward_family, load_reward_base
# Where a model comes from (alignkit.modeling.chain): importable from here too, as before.
from alignkit.modeling.chain import (  # noqa: F401 - importable from here too
    _looks_local, _recorded_base, adapter_chain, adapter_config, resolve, tokenizer_source,
)

# The launch's decisions (dtype, quantization, attention, Liger, device map) live in alignkit.core.launch, the CPU
# threads in alignkit.core.threads; `local_gpu` and `_sharded_launch` stay importable from here for the modules
# that read them.
from alignkit.core.kernels import packs_pairs, resolve_attention, resolve_liger
from alignkit.core.launch import (  # noqa: F401 - local_gpu is re-exported
    ZERO3, FourBit, device_placement, local_gpu, quantization_config, resolve_dtype, resolve_quantization,
    sharded_launch as _sharded_launch,
)
from alignkit.core.threads import apply_num_threads

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
    deltas: list[str] = field(default_factory=list)  # LoTA delta folders added into weights (alignkit.modeling.lota_delta)
    base_revision: str | None = None  # the Hub revision base_id was loaded at


def fit_embeddings(model, tok) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model (a pad token was added); never shrink.

    Under ZeRO-3's zero.Init the embedding weight is partitioned and its local shape is [0]; comparing with it
    would resize (shrink) a vocabulary padded past the tokenizer. The module's num_embeddings is the full count.
    """
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None) or model.config.get_text_config().vocab_size
    if len(tok) > rows:
        added = [t for t, i in tok.get_added_vocab().items() if i >= rows]
        logger.info(f"embeddings: {rows} -> {len(tok)} rows, as the tokenizer has more tokens than the model "
                    f"({', '.join(added[:3]) or 'tokens'} past its last row); PEFT saves the embeddings whole with "
                    "the adapter then, and a merged model keeps the new size")
        model.resize_token_embeddings(len(tok))


def cast_adapters(model, names: list[str], dtype: torch.dtype) -> None:
    """Store the frozen adapters `names` in the compute dtype, as the base's weights are.

    PEFT upcasts loaded adapters to fp32 (autocast_adapter_dtype=True: peft/tuners/tuners_utils.py
    cast_adapter_dtype). Beside a bf16 base that breaks FSDP, which flattens each decoder layer, frozen adapter
    included, into one tensor ("Must flatten tensors with uniform dtype"; transformers wraps only the *trainable*
    LoRA layers separately, transformers/distributed/fsdp.py update_fsdp_plugin_peft), and ZeRO-3, whose
    all-gather buffers take the first parameter's dtype (trl/trainer/dpo_trainer.py, the comment above
    `autocast_adapter_dtype = False`). A frozen adapter gains nothing from fp32: it is never updated.
    """
    if not dtype.is_floating_point:
        return
    for name, param in model.named_parameters():
        if param.is_floating_point() and any(f".{adapter}." in name for adapter in names) and param.dtype != dtype:
            param.data = param.data.to(dtype)


def keep_trainable_fp32(model, args=None) -> int:
    """QLoRA: store the trainable LoRA weights in fp32 (autocast still computes in bf16/fp16); returns how many moved.

    TRL casts every trainable parameter of a quantized model to bf16 (trl/trainer/dpo_trainer.py and
    sft_trainer.py, "When using QLoRA, the PEFT adapter weights are converted to bf16"). With plain AdamW at a
    DPO learning rate most updates are below bf16's resolution and round away (a 3-step tiny 4-bit DPO moved 10
    of 1024 lora_A entries), and on an fp16 GPU the grad scaler refuses non-fp32 parameters. QLoRA itself keeps
    the adapters in fp32. Under DeepSpeed with bf16 or fp16 (`args`, the trainer's) they stay: its engine casts every
    parameter to its dtype at any ZeRO stage and keeps fp32 masters itself. In fp32 (mixed_precision no) they move
    too: TRL's cast left bf16 adapters, and under ZeRO-3 a reward model's bf16 score head met fp32 hidden states."""
    from alignkit.core.launch import launch_mode

    if args is None and _sharded_launch() == ZERO3:
        return 0
    if args is not None and (args.bf16 or args.fp16) and launch_mode().startswith("ZeRO"):
        return 0
    moved = 0
    for param in model.parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition (the model built under zero.Init): DeepSpeed's to cast
            continue
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            moved += 1
    if moved:
        logger.info(f"trainable weights: fp32 ({moved} tensors back from TRL's bf16 cast, so updates too small for "
                    "bf16 still land; the forward still computes in the compute dtype)")
    return moved


@contextlib.contextmanager
def custom_code(source: str):
    """transformers' refusal of a model that ships its own code ("contains custom code ... pass the argument
    trust_remote_code=True", a ValueError with its traceback) as one line naming alignkit's flag."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code=True" not in str(e):
            raise
        raise UserError(f"{source} ships its own model code, which runs only with --trust_remote_code: pass it if you "
                        "trust that code (read it first), or use a model transformers supports natively") from None


def load_tokenizer(source: str, revision=None, trust_remote_code=False, chat_template: str | None = None):
    from transformers import AutoTokenizer

    from alignkit.modeling.gguf import model_source

    source, revision = model_source(source, None, revision)  # a .gguf file: its converted folder
    with custom_code(source):
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = chat_template_text(chat_template)  # alignkit.core.groups: a file or inline Jinja
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


def require_chat_template(tok, model_id: str, data=None) -> None:
    """A chat template, where the data is conversational (`data`: its rows; None: always), and one that renders tool
    calls where the data has them. Standard rows (texts) are joined as plain text by TRL and need none."""
    if data is not None and len(data):
        from trl.data_utils import is_conversational

        if not is_conversational(data[0]):
            return
    if not getattr(tok, "chat_template", None):
        raise UserError(
            f"{model_id} has no chat template, and this data is conversational. Pass one with "
            "--chat_template FILE (a Jinja file: take it from an instruct model of the same family, or from TRL's "
            "trl/chat_templates folder)."
        )
    from alignkit.core.message_columns import has_tool_calls

    if data is not None and has_tool_calls(data):
        from trl.chat_template_utils import supports_tool_calling

        if not supports_tool_calling(tok):  # TRL's check: the call's name, arguments and the tool turn rendered
            raise UserError(f"{model_id}'s chat template does not render tool calls, and this data has them: the "
                            "model would train on the turns around each call without the call. Pass --chat_template "
                            "FILE with one that renders tool_calls and tool turns (the model family's tool-calling "
                            "template), or drop the calls from the data")


def config_reader(source: str, revision: str | None, trust_remote_code: bool):
    """The model's config as a function that reads it once, when first asked: the checks before the weights load
    (and rlaif.py's, before round 1) read it only where they need it."""
    from transformers import AutoConfig

    return functools.cache(functools.partial(AutoConfig.from_pretrained, source, revision=revision,
                                             trust_remote_code=trust_remote_code))


def _other_shapes(adapter: str, base: str, error: str) -> str:
    """The line for an adapter whose weights do not fit the base it is loaded over (PEFT's size mismatch): an
    adapter without alignkit's record of its base, or --base_model naming another model of the family."""
    first = next((line.strip() for line in error.splitlines() if "size mismatch" in line), "")
    if "embed_tokens" in first or "lm_head" in first or "embed_out" in first:  # saved whole after a vocabulary grew
        return (f"{adapter} does not fit {base}: its saved embeddings hold another vocabulary size "
                f"({first.removeprefix('size mismatch for ').rstrip('.')}); load it with the tokenizer it was trained "
                "with (saved in its folder) over the base it was trained on")
    return (f"{adapter} does not fit {base}: its LoRA weights have other shapes than this base's layers "
            f"({first.removeprefix('size mismatch for ').rstrip('.')}); load it over the base it was trained on "
            "(its adapter_config.json's base_model_name_or_path, or --base_model)")


def load_model(s, *, for_training: bool = False, full_precision: bool = False, dequantize: bool = False,
               base_model: str | None = None, on_cpu: bool = False, reward: bool = False) -> Loaded:
    """Load `s.model_id` (settings from alignkit.core.config.ModelSettings) and any adapter chain under it.

    full_precision: never quantize (merging adapters must happen in full precision).
    dequantize: load the base in 4-bit (in `s`'s format: NF4 with double quantization unless it says otherwise),
        then turn it back into plain weights before the adapters go on: the exact model a QLoRA adapter was
        trained against, in a form adapters can merge into.
    base_model: use this base instead of the one the adapter chain records (a moved or renamed base).
    on_cpu: keep the model in CPU RAM even on a GPU machine (merging in fp32: a 7B model takes 28 GB).
    reward: load a reward model (sequence classification, one output; see "Reward models" below) instead of a
        causal LM. Either way, a model of the other kind is an error that says what to pass instead.
    """
    from transformers import AutoModelForCausalLM

    quiet_library_noise()
    check_model_source(s.model_id, cache=False)  # before the libraries retry an unreachable Hub for a minute
    if getattr(s, "chat_template", None):
        chat_template_text(s.chat_template)  # a missing or broken template: one line now, not after the weights
    # The chain down to the base, each part at its revision; LoTA deltas in it go into the weights (lota_delta).
    resolved = resolve(s.model_id, s.revision, base_model)
    check_trained_over(resolved, base_model)  # a part below retrained in place: refused, before the weights load
    if for_training:  # what this run trains over, as loaded: its record (alignkit.modeling.lineage)
        remember_loaded(resolved, getattr(s, "gguf_file", None))
    base_id, base_revision, chain, deltas, revisions = resolved
    base_id, base_revision = (base_model, None) if base_model else (base_id, base_revision)
    check_model_kind(s.model_id, s.revision, reward, for_training)
    if chain:
        logger.info(f"{s.model_id} is an adapter; base model: {base_id}; adapters: {' -> '.join(chain)}")
    dtype = resolve_dtype(s.dtype)  # auto's choice is said there; a training run says the one it was given too
    if for_training and s.dtype != "auto":
        logger.info(f"dtype: {s.dtype} (as given: --dtype, or TRL's torch_dtype, bf16 or fp16)")
    quantization = ("4bit" if dequantize else "none" if full_precision
                    else resolve_quantization(s.quantization, for_training))
    quantization = lota_delta.full_precision(s, quantization, deltas)
    if for_training:  # recorded in the run's settings: "auto" on CUDA trains QLoRA (alignkit.core.run_records)
        remember_loaded_as(s.model_id, quantization, dtype, base_id, base_revision, chain, deltas)
    kwargs: dict = dict(revision=base_revision, trust_remote_code=s.trust_remote_code, dtype=dtype)
    lota_delta.check_launch(s, _sharded_launch(), deltas)  # LoTA under FSDP/ZeRO-3, a delta under ZeRO-3: refused
    four_bit = FourBit.of(s)
    config = quantization_config(quantization, dtype, four_bit)  # 8-bit under FSDP/ZeRO-3 is refused here
    if quantization == "4bit" and four_bit != FourBit():  # QLoRA's NF4 with double quantization goes unsaid
        logger.info(f"4-bit weights: {four_bit} (--bnb_4bit_quant_type, --use_bnb_nested_quant)")
    if quantization == "4bit" and not dequantize:
        _say_other_format(chain, four_bit)
    if config is not None:
        kwargs["quantization_config"] = config
    kwargs.update(device_placement(quantization, on_cpu=on_cpu))
    from alignkit.modeling.gguf import model_source

    if not (str(base_id).endswith(".gguf") or getattr(s, "gguf_file", None)):  # GGUF sources check themselves
        check_model_source(base_id, revision=base_revision)
    # A GGUF base (--model_id FILE.gguf, or --gguf_file NAME) loads from its converted folder, cached once;
    # base_id stays the GGUF source, so adapters record where their base really came from.
    weights, revision = model_source(base_id, getattr(s, "gguf_file", None), kwargs["revision"])
    kwargs["revision"] = revision
    # The model's config, read only if it has to be: DPO with prefix sharing may get flex_attention from it, and a
    # model class without sdpa (Gemma-2) gets eager where sdpa would be the choice.
    model_config = config_reader(weights, revision, s.trust_remote_code)
    packed_config = model_config if packs_pairs(s, for_training) else None
    if for_training:
        lota_delta.check_experts(s, model_config)  # LoTA on a mixture of experts: refused before the weights load
        if reward:  # a family without a score head first: no --lora_dropout fixes that (load_reward_base checks too)
            try:
                config = model_config()
            except Exception:  # noqa: BLE001 - one that cannot be read is left to the load, which says why
                config = None
            if config is not None:
                check_reward_family(config)
        experts.check_dropout(s, model_config)
    kwargs["attn_implementation"] = resolve_attention(s.attn_implementation, dtype, packed_config, model_config)
    with custom_code(s.model_id):
        if reward:
            model = load_reward_base(weights, kwargs, model_config())
        else:
            model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    if for_training:  # the attention it runs, for the run's record: a recipe's flash_attention_2 runs sdpa on a CPU
        remember_attention(s.model_id, model.config._attn_implementation or kwargs["attn_implementation"])
    apply_num_threads(getattr(s, "num_threads", "auto"), model, getattr(s, "preset", None))
    if quantization == "4bit":
        experts.say_unquantized(model)
    if quantization == "4bit" and keep_4bit_layout(model) and not torch.cuda.is_available():  # a GPU run never repacks
        logger.info("4-bit on the CPU: the weights stay in bitsandbytes' standard 4-bit layout (its AVX512-BF16 "
                    "repacking rounds their block scales to bf16 at the first pass without gradients, changing "
                    "the model mid-run)")
    if dequantize:
        model = model.dequantize()  # bitsandbytes' own 4-bit -> float, weight by weight
        model.to(dtype)
        quantization = "none"
    if resolve_liger(s.use_liger):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # Layer kernels only: TRL's fused LM head replaces the loss, so Liger's fused cross-entropy stays off.
        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)

    # The tokenizer travels with the last adapter when it was saved there (it carries the chat template).
    tok = load_tokenizer(*tokenizer_source(resolved, weights, revision), s.trust_remote_code, s.chat_template)
    fit_embeddings(model, tok)
    model.config.pad_token_id = tok.pad_token_id  # a reward model scores the last token before the padding
    if getattr(model, "generation_config", None) is not None:  # a reward model cannot generate: it has none
        model.generation_config.pad_token_id = tok.pad_token_id
        if tok.eos_token_id is not None:
            model.generation_config.eos_token_id = tok.eos_token_id
    lota_delta.apply_deltas(model, deltas)

    frozen: list[str] = []
    if chain:
        from peft import PeftModel

        for i, source in enumerate(chain):
            name = f"frozen_{i}"
            # A Hub adapter's weights at the revision its config was read at (--revision, or what the one above records)
            at = {"revision": revisions[source]} if revisions[source] and not Path(source).exists() else {}
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, source, adapter_name=name, is_trainable=False, **at)
                else:
                    model.load_adapter(source, adapter_name=name, is_trainable=False, **at)
            except RuntimeError as error:  # PEFT's state_dict error: dozens of lines, one per weight
                if "size mismatch" not in str(error):
                    raise
                raise UserError(_other_shapes(source, base_id, str(error))) from None
            # Its recorded base is the adapter below, relative to its own folder (save_adapter); PEFT read that from
            # the folder the run is in, for the base's vocabulary, at every checkpoint save ("Could not find a config
            # file in ../../tiny-sft"): in memory it names the base model whose vocabulary that is, where it is.
            model.peft_config[name].base_model_name_or_path = \
                str(Path(weights).resolve()) if Path(weights).is_dir() else weights  # a Hub base: its id
            frozen.append(name)
        model.base_model.set_adapter(frozen, inference_mode=True)
    if frozen and for_training:
        cast_adapters(model, frozen, dtype)
    if not for_training:
        model.eval()
    return Loaded(model, tok, base_id, chain, frozen, dtype, quantization, deltas, base_revision)


def _say_other_format(chain: list[str], four_bit: FourBit) -> None:
    """One line where a QLoRA adapter of the chain trained over its base in another 4-bit format than this load's:
    the base it sits on now is not the one it learned on (run_records.trained_four_bit)."""
    from alignkit.core.run_records import trained_four_bit, trained_quantization

    for part in chain:
        if Path(part).is_dir() and trained_quantization(part) == "4bit":
            then = trained_four_bit(part)
            trained = FourBit(then["bnb_4bit_quant_type"], bool(then["use_bnb_nested_quant"]))
            if trained != four_bit:
                logger.warning(f"{part} trained over its base in {trained}; this load rounds the base to {four_bit}, "
                               f"another model under the adapter: pass --bnb_4bit_quant_type {trained.quant_type} "
                               f"--use_bnb_nested_quant {str(trained.nested).lower()} to load the base it trained over")
                return


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
    _check_targets(loaded.model, targets, s.model_id)
    config = LoraConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, task_type=task_type, bias="none",
        # Copies: PEFT adds its head ("score", "classifier") to modules_to_save in place, which changed the
        # settings themselves (saved so in alignkit_config.json, and another run to --resume auto).
        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
        use_rslora=getattr(s, "use_rslora", False), use_dora=getattr(s, "use_dora", False),
        modules_to_save=list(saved) if (saved := getattr(s, "lora_modules_to_save", None)) is not None else None,
        revision=loaded.base_revision,  # a checkpoint's adapter_config.json names the base, at this revision
    )
    model = loaded.model
    # ZeRO-3 all-gathers into buffers of the first parameter's dtype: PEFT's fp32 upcast of the new adapter beside a
    # bf16 base fails the first optimizer step (TRL passes the same flag for this, trl/trainer/dpo_trainer.py).
    autocast = _sharded_launch() != ZERO3
    if isinstance(model, PeftModel):
        model.add_adapter(TRAINABLE, config, autocast_adapter_dtype=autocast)
        # The trained adapter first: transformers' Trainer resumes the first active adapter.
        model.base_model.set_adapter([TRAINABLE, *loaded.frozen])
        model.set_requires_grad(loaded.frozen, requires_grad=False)
    else:
        model = get_peft_model(model, config, autocast_adapter_dtype=autocast)
    # PEFT keeps target_modules as a set (all-linear expands to one) and saves it in the set's order, which changes
    # with each process's hash seed: the same adapter trained twice would differ in its adapter_config.json.
    trained = model.peft_config[TRAINABLE]
    if isinstance(trained.target_modules, set):
        trained.target_modules = sorted(trained.target_modules)
    if isinstance(getattr(trained, "target_parameters", None), set):  # PEFT's MoE conversion makes a set too
        trained.target_parameters = sorted(trained.target_parameters)
    experts.say_unadapted(model, trained)
    if loaded.deltas:  # what its checkpoints name as their base (alignkit.train.trainers.CheckpointBase)
        model.alignkit_checkpoint_base = (s.model_id, getattr(s, "revision", None))
    loaded.model = model
    return mark_built(model, s)  # a notebook's training cell refuses a model built under other settings


def _check_targets(model, targets: list[str], source: str) -> None:
    """Every --lora_target_modules name matches a module, as PEFT matches it (the name, or its last parts): a name
    the model lacks was PEFT's traceback when none matched, and nothing at all when another one did."""
    if targets == ["all-linear"]:
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        # A layer PEFT wrapped (training over an adapter) is NAME.base_layer: named as NAME.
        linear = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and "lora_" not in n} - {"lm_head", "score"})
        raise UserError(f"--lora_target_modules: {source} has no module named {', '.join(missing)}; its linear "
                        f"layers are {', '.join(linear)} (or pass all-linear)")


@contextlib.contextmanager
def reference_mode(model, frozen: list[str], keep: list[str] | None = None):
    """Run `model` as the DPO reference: the trained adapter off, the frozen adapters it was loaded with on.

    keep: only these of the frozen adapters stay on (the chain's first ones: an earlier model in the chain is the
    reference, as rlaif.py's `--reference start`); default: all of them.
    """
    keep = list(frozen) if keep is None else list(keep)
    if not keep:
        try:
            with model.disable_adapter():
                yield
        finally:  # enabling the adapters again marks every active one trainable (peft enable_adapters) ...
            if frozen:
                model.set_requires_grad(frozen, requires_grad=False)  # ... so freeze the loaded ones once more
        return
    lora = model.base_model
    active = list(lora.active_adapters)
    lora.set_adapter(keep, inference_mode=True)
    try:
        yield
    finally:
        lora.set_adapter(active)  # this marks every active adapter trainable again ...
        model.set_requires_grad(frozen, requires_grad=False)  # ... so freeze the loaded ones once more


def save_adapter(model, tokenizer, out_dir: str | os.PathLike, base_source: str,
                 state_dict: dict | None = None, revision: str | None = None) -> None:
    """Save only the trained adapter, recording what it sits on (the base, or the adapter it was trained over).

    state_dict: the full weights when the model is sharded (alignkit.train.training.gathered_state_dict).
    revision: the Hub revision base_source was loaded at, recorded in PEFT's own field so that the adapter loads
    on that revision again (alignkit.modeling.chain), here and in PEFT's AutoPeftModel.
    """
    out = Path(out_dir)
    model.save_pretrained(out, selected_adapters=[TRAINABLE], state_dict=state_dict)
    tokenizer.save_pretrained(out)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    # A local adapter underneath is recorded relative to this one, so the chain can be copied or moved as a whole
    # (adapter_chain resolves it from here); a local full model by absolute path, so an adapter copied away from
    # it still finds it; a Hub id as it is.
    base = Path(base_source)
    if (base / "adapter_config.json").is_file():
        recorded = os.path.relpath(base.resolve(), out.resolve())
    else:
        recorded = str(base.resolve()) if base.exists() else base_source
    config["base_model_name_or_path"] = recorded
    config["revision"] = None if base.exists() else revision
    config_file.write_text(json.dumps(config, indent=2))
    from alignkit.core.card import model_card

    # The card TRL and PEFT left names the base "None" (a local one) or by its local path: write alignkit's.
    (out / "README.md").write_text(model_card(out))


def keep_4bit_layout(model) -> int:
    """Keep bitsandbytes from repacking `model`'s 4-bit layers for its CPU kernel; how many layers would have been.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2 here) repacks a Linear4bit's weight for its fast kernel at the
    first forward in eval mode without gradients (a reference pass, an evaluation), and converts it back when a
    state dict is taken, "best-effort": the block scales (absmax) come back in bf16. So from that first pass on the
    base model computes with other weights than it was loaded with, and its identity (the reference cache's
    key) depends on whether such a pass has run. The same model on a CPU without AVX512-BF16 never changes. Kept
    in the layout it was loaded in, every pass on every CPU computes with the weights as loaded."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
