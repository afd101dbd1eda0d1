"""Prefix sharing for DPO (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing").

TRL's DPO batch holds each pair twice, prompt included: `input_ids` (2B, T) = [prompt+chosen rows...,
prompt+rejected rows...], right-padded, with `completion_mask` marking the answer tokens. `pack_pairs` turns it
into B rows with the shared prompt computed once:

    row i:  [ shared (s) | P chosen (len_c - s) | P rejected (len_r - s) | pad ]
    positions 0 .. s-1 | s .. len_c-1         | s .. len_r-1            |

`shared` is the pair's common prefix but for its last prompt token P, which opens both answer segments: the
logit that predicts an answer's first token comes from P, and one position can carry one label only, so P is
computed twice (one token per pair), each answer's own prediction at its own copy. s = min(common prefix,
prompt length - 1), never below 0 (s = 0 packs the two rows end to end: no sharing, still exact).

Attention (4D, (B, 1, L, L)): query a sees key b iff b <= a, b is not padding, and not (a in the rejected
segment and b in the chosen one). So every token sees exactly the tokens it saw in its own unshared row, at the
same positions (position ids continue from the prompt's end in both segments): the same hidden states, hence
the same log-probs, and, since the shared prefix's gradient is the sum of what both answers send it, the same
gradients. (Exactly so without dropout; with LoRA dropout, which dpo.py keeps, the shared prompt draws one dropout
mask for both answers where two rows draw two: another sample of the same noise.) The answer labels are passed pre-shifted (`shift_labels`, which TRL's fused LM head scores
without shifting); `PackedPairs.unpack` puts per-token outputs back in the unshared (2B, T - 1) layout, so the
sums, ld_alpha and WPO weights downstream read the same tensors as without sharing.

Which attention each token sees is the model's own: a layer with a sliding window W (Mistral-v0.1, Phi-3-mini-4k,
Qwen2/3 with use_sliding_window, Gemma-2/3's and Cohere2's local layers, ...) lets query a see key b only when their
positions are less than W apart, and the packed mask applies the same rule on the original positions (packed
indices are not positions: a rejected answer sits after the chosen one). transformers passes a custom 4D mask
through unchanged for sliding-window layers too (masking_utils: "If the mask is already 4D, simply return
as-is"), so the window has to be in it: a model whose layers all see the same window gets one mask, a model
with full and sliding layers (`config.layer_types`) a dict {"full_attention": ..., "sliding_attention": ...},
which its forward takes as its per-layer-type masks.

Three forms of that mask, by attention implementation (`sharing_path` says which applies and why):
- "sdpa-mask": a dense (B, 1, L, L) mask, boolean for sdpa (True = attend), additive float (0 or the dtype's
  minimum) for eager. Exact, but a custom mask keeps sdpa from its flash kernel.
- "flex": a FlexAttention BlockMask built from a mask_mod with the same rule, for transformers'
  `flex_attention` implementation, whose kernel skips the blocks the mask rules out entirely (the prefix-sharing
  paper's implementation). torch's FlexAttention has no backward on a CPU; its forward runs there.
- "off": flash_attention_2/3 and other kernels take no custom mask; mixture-of-experts models (their
  load-balancing loss); layer types other than full and sliding-window attention. The trainer then runs the
  unshared pass and logs the reason once.

`--attn_implementation auto` loads flex_attention for a dpo.py run with prefix sharing on a CUDA GPU where
`flex_preferred` says yes and its kernel passes alignkit.train.flex_check on that GPU
(alignkit.core.kernels.resolve_attention); no GPU figure backs that over
flash_attention_2 without sharing yet: bench/gpu_dpo.py measures both, and an explicit flash_attention_2 or sdpa
is kept.

Compiled shapes (flex): transformers runs FlexAttention through one `torch.compile(flex_attention)`
(transformers/integrations/flex_attention.py, WrappedFlexAttention: torch's default dynamic=None, or
dynamic=False for training under torch 2.6), and on a GPU the BlockMask comes from a compiled create_block_mask.
A new packed shape (B, L) fails a guard and recompiles: from the second shape on with dynamic shapes where torch
allows them, else (static shapes: torch 2.6's training compile, automatic_dynamic_shapes off) once per shape and
grad mode, until torch._dynamo.config.recompile_limit (8) leaves flex_attention uncompiled (a dense, slow path).
So the flex path pads the packed length to `flex_length(L)`: a whole number of FlexAttention's 128-token blocks
(its kernel's unit), and past 8 blocks one of 4 lengths per doubling (1280, 1536, 1792, 2048, 2560, ...): at
most 12 lengths up to 2048 tokens (max_length 1024), 16 up to 4096, at under 25% padding (under 128 tokens up to
1024). Padding positions are segment -1: no real token sees them, nothing is scored there, the log-probs do not
change; the kernel skips their blocks, the linear layers still compute them. B is the per-device batch (a short
last batch is one more shape). The sdpa and eager masks keep the exact length (nothing compiled there).
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from alignkit import logger

IGNORE = -100
MASK_ATTENTION = ("sdpa", "eager")  # take a dense custom 4D mask
FLEX_ATTENTION = "flex_attention"  # takes a BlockMask
SDPA_MASK, FLEX, OFF = "sdpa-mask", "flex", "off"
FLEX_BLOCK = 128  # FlexAttention's block (torch's _DEFAULT_SPARSE_BLOCK_SIZE): the flex path pads to whole blocks
FLEX_EXACT_BLOCKS = 8  # up to this many blocks every whole-block length is kept; past it, 4 lengths per doubling
# Layer types whose mask the packed layout reproduces: whether the layer attends within a sliding window.
WINDOWED = {"full_attention": False, "sliding_attention": True}
# How transformers 5's decoders take one mask per layer type (Gemma2/3, Qwen2/3, Cohere2, GPT-OSS, ...).
_PER_TYPE_IDIOM = "causal_mask_mapping := attention_mask, dict"
# Batch keys the packed forward knows how to lay out; a batch with any other model input (Gemma's token types,
# images) runs unshared.
PACKABLE_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@dataclass(frozen=True)
class SharingPath:
    kind: str  # SDPA_MASK, FLEX or OFF
    reason: str

    def __str__(self) -> str:
        if self.kind == OFF:
            return f"prefix sharing off: {self.reason}"
        return f"prefix sharing: {self.kind} ({self.reason})"


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_windows(config) -> dict[str | None, int | None] | str:
    """The sliding window of each layer type as transformers masks it ({None: w} when the model has no
    `layer_types`: every layer takes the one mask, windowed iff `sliding_window` is set), or why the packed
    layout cannot reproduce some layer type's mask."""
    text = _text_config(config)
    window = getattr(text, "sliding_window", None) or None  # Qwen2-MoE writes 0 for "no window"
    types = getattr(text, "layer_types", None)
    if not types:
        return {None: window}
    unknown = sorted(set(types) - set(WINDOWED))
    if unknown:
        return f"layer types {unknown} (only full and sliding-window attention are laid out)"
    return {t: window if WINDOWED[t] else None for t in sorted(set(types))}


@functools.lru_cache(maxsize=None)
def _module_takes_mask_per_layer_type(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    try:
        return module is not None and _PER_TYPE_IDIOM in inspect.getsource(module)
    except (OSError, TypeError):  # no source (a frozen or compiled install): assume not
        return False


def _model_class(config):
    """The causal-LM class transformers would build for `config` (to read its modeling module), or None."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""), None)
    except Exception:  # noqa: BLE001 - an unknown or remote-code model: its modeling is not inspected
        return None


def without_sdpa(model_config) -> str | None:
    """The model's class name when transformers gives it no sdpa attention (`_supports_sdpa = False`: Gemma-2 and
    GPT-OSS, whose softcapping or sinks sdpa cannot do), else None. `model_config`: a callable giving the config."""
    try:
        cls = _model_class(model_config())
    except Exception:  # noqa: BLE001 - unreadable here: from_pretrained reports the problem itself
        return None
    return cls.__name__ if cls is not None and getattr(cls, "_supports_sdpa", True) is False else None


def sharing_path(config, attn_implementation: str | None = None, model_class=None) -> SharingPath:
    """Which prefix-sharing path applies to a model with `config` under `attn_implementation` (default: the one
    the config was loaded with), and why. `model_class` (default: transformers' causal-LM class for the
    config) is read only for models that mix full and sliding-window layers: they need a decoder that takes a
    dict of masks per layer type."""
    impl = attn_implementation or getattr(config, "_attn_implementation", None)
    text = _text_config(config)
    if getattr(text, "output_router_logits", False) or _experts(text):
        return SharingPath(OFF, "a mixture-of-experts model: its load-balancing loss reads a 2D padding mask and "
                                "counts the prompt twice")
    if impl in MASK_ATTENTION:
        kind, why = SDPA_MASK, f"{impl} with a custom 4D mask (exact; sdpa cannot use its flash kernel with it)"
    elif impl == FLEX_ATTENTION:
        kind, why = FLEX, "FlexAttention with a block mask: blocks the mask rules out are skipped"
    else:
        return SharingPath(OFF, f"attention implementation {impl} takes no custom mask (sdpa, eager and "
                                "flex_attention do)")
    windows = layer_windows(config)
    if isinstance(windows, str):
        return SharingPath(OFF, windows)
    if len(set(windows.values())) > 1:
        model_class = model_class or _model_class(config)
        if model_class is None or not _module_takes_mask_per_layer_type(model_class.__module__):
            return SharingPath(OFF, "full and sliding-window layers, and the model's forward takes no mask per "
                                    "layer type")
        why += "; one mask per layer type: " + ", ".join(f"{t} window {w}" for t, w in windows.items())
    elif windows and next(iter(windows.values())):
        why += f"; sliding window {next(iter(windows.values()))}"
    return SharingPath(kind, why)


def _experts(config) -> bool:
    """Whether the config is a mixture of experts's: its experts per token at the top (Mixtral, Qwen-MoE, DeepSeek,
    GPT-OSS), or in DBRX's ffn_config (`moe_top_k`), or a count of experts above one."""
    ffn = getattr(config, "ffn_config", None)
    ffn = SimpleNamespace(**ffn) if isinstance(ffn, dict) else ffn  # a config read from JSON may keep it a dict
    counts = [getattr(config, name, None) for name in ("num_local_experts", "num_experts", "n_routed_experts")]
    return bool(getattr(config, "num_experts_per_tok", None) or getattr(ffn, "moe_top_k", None)
                or any(isinstance(n, int) and n > 1 for n in counts))


def flex_length(length: int) -> int:
    """The packed length the flex path pads `length` to (module docstring, "Compiled shapes"): whole 128-token
    blocks, and past 8 blocks the next of 4 lengths per doubling (9 blocks -> 10, 17 -> 20, 33 -> 40)."""
    blocks = -(-max(length, 1) // FLEX_BLOCK)
    if blocks > FLEX_EXACT_BLOCKS:
        step = (1 << ((blocks - 1).bit_length() - 1)) // 4  # a quarter of the power of two below
        blocks = -(-blocks // step) * step
    return blocks * FLEX_BLOCK


def flex_preferred(config, device_type: str, model_class=None) -> tuple[bool, str]:
    """Whether `--attn_implementation auto` should load `flex_attention` for a DPO run with prefix sharing on
    `device_type`, and why (for the log line).

    Yes only where FlexAttention can train and sharing applies on it: a CUDA device (torch's FlexAttention has no
    backward on a CPU), a model class transformers runs under flex_attention, no attention dropout (flex
    refuses it in training), and `sharing_path` not off. Then the prompt is computed once on a kernel that skips
    the masked blocks, where sdpa with the same mask loses its flash kernel and flash_attention_2 turns sharing
    off. Whether that beats flash_attention_2 without sharing depends on the prompt share and lengths:
    bench/gpu_dpo.py measures it; no GPU figure backs this choice yet.
    """
    if device_type != "cuda":
        return False, f"FlexAttention has no backward on {device_type}"
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():
        return False, f"torch {torch.__version__} has no FlexAttention transformers runs (it needs torch >= 2.5)"
    model_class = model_class or _model_class(config)
    if model_class is None or not getattr(model_class, "_supports_flex_attn", False):
        return False, f"{getattr(model_class, '__name__', config.model_type)} does not run under flex_attention"
    if getattr(_text_config(config), "attention_dropout", 0.0):
        return False, "attention dropout (flex_attention refuses it in training)"
    path = sharing_path(config, FLEX_ATTENTION, model_class)
    if path.kind == OFF:
        return False, f"prefix sharing is off on it anyway ({path.reason})"
    return True, "prefix sharing on a kernel that skips masked blocks (sdpa with the mask loses its flash kernel; " \
                 "flash_attention_2 takes no mask)"


def choose(model) -> SharingPath:
    """`sharing_path` of a loaded model (a PEFT model's base), logged once: the path and its reason."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = sharing_path(base.config, model_class=type(base))
    logger.info(str(path))
    return path


def unavailable_reason(model) -> str | None:
    """Why prefix sharing cannot run on `model`, or None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = sharing_path(base.config, model_class=type(base))
    return path.reason if path.kind == OFF else None


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    # (B, 1, L, L) bool (sdpa), additive float (eager) or a BlockMask (flex_attention); a dict of them by layer
    # type for models with full and sliding-window layers
    attention_mask: torch.Tensor | dict
    shift_labels: torch.Tensor  # (B, L): the token each position predicts, IGNORE where none is scored
    index: torch.Tensor  # (2B, T - 1): packed position of each unshared prediction position
    scored: torch.Tensor  # (2B, T - 1): whether that unshared position predicts an answer token
    segment: torch.Tensor  # (B, L): 0 shared prefix, 1 chosen, 2 rejected, -1 padding

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids)

    def unpack(self, per_token: torch.Tensor | None) -> torch.Tensor | None:
        """(B, L) per-position values -> (2B, T - 1) in the unshared layout, 0 where nothing is scored."""
        if per_token is None:
            return None
        source = per_token.repeat(2, 1)  # row r of [chosen..., rejected...] reads pair r mod B
        gathered = source.gather(1, self.index.clamp(max=per_token.size(1) - 1))
        return gathered.masked_fill(~self.scored, 0)

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the packed batch."""
        return int((self.segment >= 0).sum())


def can_pack(inputs: dict) -> bool:
    """The batch is TRL's text layout: only packable keys, an even number of right-padded rows."""
    if set(inputs) - PACKABLE_KEYS or "attention_mask" not in inputs or inputs["input_ids"].size(0) % 2:
        return False
    mask = inputs["attention_mask"]
    if mask.dim() != 2:
        return False
    lengths = mask.sum(dim=1, keepdim=True)
    right_padded = torch.arange(mask.size(1), device=mask.device).unsqueeze(0) < lengths
    return bool((mask.bool() == right_padded).all())


def shared_lengths(input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """s of each pair (module docstring): the tokens computed once instead of twice, (B,)."""
    T = input_ids.size(1)
    lengths = attention_mask.sum(dim=1).long()
    cm = completion_mask.bool() & attention_mask.bool()
    # Prompt length of each row: the first answer token, or the whole row when truncation left no answer.
    prompt = torch.where(cm.any(dim=1), cm.long().argmax(dim=1), lengths)
    ids_c, ids_r = input_ids.chunk(2, dim=0)
    len_c, len_r = lengths.chunk(2, dim=0)
    p_c, p_r = prompt.chunk(2, dim=0)
    t = torch.arange(T, device=input_ids.device).unsqueeze(0)
    common = ((ids_c == ids_r) & (t < torch.minimum(len_c, len_r).unsqueeze(1))).long().cumprod(dim=1).sum(dim=1)
    return torch.minimum(common, torch.minimum(p_c, p_r) - 1).clamp(min=0)


def pack_pairs(input_ids, attention_mask, completion_mask, attn_implementation="sdpa", dtype=torch.float32,
               pad_token_id: int = 0, config=None) -> PackedPairs:
    """Pack TRL's [chosen..., rejected...] rows into one row per pair (layout in the module docstring).

    `config` (the model's) gives the sliding windows (`layer_windows`); without it every layer attends to the
    whole causal past, which is right for a model without windows only."""
    rows, T = input_ids.shape
    B = rows // 2
    device = input_ids.device
    lengths = attention_mask.sum(dim=1).long()
    cm = completion_mask.bool() & attention_mask.bool()
    len_c, len_r = lengths.chunk(2, dim=0)
    t = torch.arange(T, device=device).unsqueeze(0)
    s = shared_lengths(input_ids, attention_mask, completion_mask)  # (B,)
    L = int((len_c + len_r - s).max())
    if attn_implementation == FLEX_ATTENTION:
        L = flex_length(L)  # few distinct shapes to compile (module docstring); the padding is masked, not scored

    # Packed position of every unshared token: chosen rows keep theirs; a rejected row's tokens past the shared
    # prefix go after its pair's chosen segment.
    q_c = t.expand(B, T)
    q_r = torch.where(t < s.unsqueeze(1), t, len_c.unsqueeze(1) + t - s.unsqueeze(1))
    q = torch.cat([q_c, q_r], dim=0)  # (2B, T)
    valid = t < lengths.unsqueeze(1)  # (2B, T)
    pair = torch.arange(rows, device=device).unsqueeze(1).expand(rows, T) % B

    packed_ids = torch.full((B, L), pad_token_id, dtype=input_ids.dtype, device=device)
    positions = torch.full((B, L), -1, dtype=torch.long, device=device)  # -1 marks padding until the end
    segment = torch.full((B, L), -1, dtype=torch.long, device=device)  # 0 shared, 1 chosen, 2 rejected
    seg_of_row = torch.cat([torch.ones(B, T, dtype=torch.long, device=device),
                            torch.full((B, T), 2, dtype=torch.long, device=device)], dim=0)
    seg_of_row = torch.where(t < s.repeat(2).unsqueeze(1), torch.zeros_like(seg_of_row), seg_of_row)
    packed_ids[pair[valid], q[valid]] = input_ids[valid]
    positions[pair[valid], q[valid]] = t.expand(rows, T)[valid]
    segment[pair[valid], q[valid]] = seg_of_row[valid]

    # Pre-shifted labels: unshared position j predicts token j + 1 when that token is an answer token.
    labels = input_ids[:, 1:].masked_fill(~cm[:, 1:], IGNORE)  # (2B, T - 1)
    index, scored = q[:, :-1], labels != IGNORE
    shift_labels = torch.full((B, L), IGNORE, dtype=input_ids.dtype, device=device)
    shift_labels[pair[:, :-1][scored], index[scored]] = labels[scored]

    windows = layer_windows(config) if config is not None else {None: None}
    if isinstance(windows, str):
        raise ValueError(f"prefix sharing cannot lay out this model: {windows}")
    by_window = {w: _mask(segment, positions, w, attn_implementation, dtype) for w in set(windows.values())}
    if len(by_window) == 1:
        mask = next(iter(by_window.values()))
    else:  # one mask per layer type, which the model's forward takes as its own (sharing_path checked that)
        mask = {layer_type: by_window[w] for layer_type, w in windows.items()}
    # Padding positions get position 0 (any value works: nothing sees them and they are not scored).
    return PackedPairs(packed_ids, positions.clamp(min=0), mask, shift_labels, index, scored, segment)


def _allowed(q, kv, seg_q, seg_kv, pos_q, pos_kv, window: int | None):
    """Whether packed query q sees packed key kv (elementwise over broadcast tensors; seg_* and pos_* are their
    segments and original positions): kv is a token at or before q, not in the chosen answer when q is in the
    rejected one, and, with a sliding window, fewer than `window` positions back (masking_utils'
    sliding_window_overlay: kv > q - window). Every row sees itself, so padding rows get no NaN."""
    ok = (kv <= q) & (seg_kv >= 0) & ~((seg_q == 2) & (seg_kv == 1))
    if window is not None:
        ok = ok & (pos_q - pos_kv < window)
    return ok | (q == kv)


def _mask(segment, positions, window, attn_implementation, dtype):
    """The packed mask in the form `attn_implementation` takes (module docstring)."""
    B, L = segment.shape
    if attn_implementation == FLEX_ATTENTION:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            return _allowed(q, kv, segment[b, q], segment[b, kv], positions[b, q], positions[b, kv], window)

        # Compiled mask building on a GPU (what transformers does: it never holds the dense L x L mask).
        return create_block_mask(mask_mod, B, None, L, L, device=segment.device, _compile=segment.is_cuda)
    idx = torch.arange(L, device=segment.device)
    q, kv = idx.view(L, 1), idx.view(1, L)
    allowed = _allowed(q, kv, segment.unsqueeze(2), segment.unsqueeze(1), positions.unsqueeze(2),
                       positions.unsqueeze(1), window).unsqueeze(1)  # (B, 1, L, L)
    if attn_implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed
