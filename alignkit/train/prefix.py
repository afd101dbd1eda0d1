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
gradients. The answer labels are passed pre-shifted (`shift_labels`, which TRL's fused LM head scores
without shifting); `PackedPairs.unpack` puts per-token outputs back in the unshared (2B, T - 1) layout, so the
sums, ld_alpha and WPO weights downstream read the same tensors as without sharing.

The mask is boolean for sdpa (True = attend) and additive float (0 or the dtype's minimum) for eager attention,
the two forms transformers passes through unchanged when they come as 4D (masking_utils: "If the mask is
already 4D, simply return as-is").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
SUPPORTED_ATTENTION = ("sdpa", "eager")
# Batch keys the packed forward knows how to lay out; a batch with any other model input (Gemma's token types,
# images) runs unshared.
PACKABLE_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def unavailable_reason(model) -> str | None:
    """Why prefix sharing cannot run on `model`, or None when it can."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        return f"attention implementation {impl} takes no custom 4D mask (sdpa and eager do)"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "output_router_logits", False) or getattr(text_config, "num_experts_per_tok", None):
        return "a mixture-of-experts model: its load-balancing loss reads a 2D padding mask and counts the prompt twice"
    return None


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L), bool (sdpa) or additive float (eager)
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
               pad_token_id: int = 0) -> PackedPairs:
    """Pack TRL's [chosen..., rejected...] rows into one row per pair (layout in the module docstring)."""
    rows, T = input_ids.shape
    B = rows // 2
    device = input_ids.device
    lengths = attention_mask.sum(dim=1).long()
    cm = completion_mask.bool() & attention_mask.bool()
    len_c, len_r = lengths.chunk(2, dim=0)
    t = torch.arange(T, device=device).unsqueeze(0)
    s = shared_lengths(input_ids, attention_mask, completion_mask)  # (B,)
    L = int((len_c + len_r - s).max())

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

    is_token = segment >= 0
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    allowed = causal & is_token.unsqueeze(1) & ~((segment == 2).unsqueeze(2) & (segment == 1).unsqueeze(1))
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=device)  # padding rows attend to themselves: no NaN
    allowed = allowed.unsqueeze(1)
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed
    # Padding positions get position 0 (any value works: nothing sees them and they are not scored).
    return PackedPairs(packed_ids, positions.clamp(min=0), mask, shift_labels, index, scored, segment)

