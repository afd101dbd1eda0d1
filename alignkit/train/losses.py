"""Preference losses that TRL lacks or computes differently, as pure functions, and which losses read what.

TRL's DPOTrainer ignores `label_smoothing` for `loss_type="sigmoid"` (TRL >= 0.29: it only feeds `robust`,
`exo_pair` and `aot`), and its `ipo` divides the log-ratios by the completion length. This module follows the
DPO paper's reference code (Rafailov et al. 2023, github.com/eric-mitchell/direct-preference-optimization):

    h = s(pc - rc) - s(pr - rr)          log-probs summed over the response tokens (LD-DPO: see answer_logps)
    sigmoid (cDPO when eps > 0):  loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    ipo:                          loss = (h - 1 / (2 * beta)) ** 2
    rewards:                      chosen = beta * (pc - rc),  rejected = beta * (pr - rr)

`s` is the f-divergence score of a log-ratio u (f-DPO, Wang et al. 2023; TRL's `f_divergence_type`):
reverse_kl u (plain DPO), forward_kl 1 - exp(-u), js_divergence log 2 + logsigmoid(u), alpha_divergence
(exp((a - 1) u) - 1) / (a - 1). Every score is 0 at u = 0, so an untrained policy has h = 0 under each.

Reference-free losses (`reference_free_loss`) read the policy alone, through length-normalised log-probs
a = (summed answer log-prob) / (answer tokens), so no reference pass runs at all:

    simpo (Meng et al. 2024, eq. 6; cDPO-smoothed as TRL's CPOTrainer):
        z = beta * (ac - ar) - gamma
        loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z) + cpo_alpha * (-ac)    (cpo_alpha: CPO's NLL term)
    orpo (Hong et al. 2024, eqs. 6-7; lambda is beta, as in TRL's ORPOTrainer):
        log odds(y) = a - log(1 - exp(a))      (a capped at -1e-6: odds of at most 1e6, never infinite)
        loss = -ac - beta * logsigmoid(log odds(yc) - log odds(yr))                     (SFT NLL + lambda * L_OR)
    rewards:  chosen = beta * ac,  rejected = beta * ar   (what TRL's CPO and ORPO trainers log)

The NLL term is each chosen answer's mean token NLL (ORPO's per-example form; the CPO paper writes a whole
answer's log-likelihood, and TRL averages over the tokens of the whole batch, the same as here when the chosen
answers are equally long).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignkit.core.args import ConfigError

# The loss types this module computes; AlignDPOTrainer routes a list made only of these here instead of to TRL.
LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")
# Of those, the ones that read no reference: AlignDPOTrainer runs no reference pass for them.
REFERENCE_FREE = ("simpo", "orpo")
# TRL's loss types that read label_smoothing (TRL's sigmoid does not: alignkit's does, as cDPO).
TRL_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16 DPOTrainer's loss types (its "Unknown loss type" list; tests/test_losses.py reads it from TRL's source).
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# ORPO's log odds a - log(1 - exp(a)) is infinite at a = 0: an answer cut away to no tokens by max_length, or one
# the model is sure of to float precision. Capped there (odds 1e6, where the odds-ratio term has all but saturated).
ORPO_MAX_MEAN_LOGP = -1e-6


def is_own_loss(loss_types) -> bool:
    """True when every loss type is computed here; one TRL-only name sends the whole list to TRL."""
    return set(loss_types) <= set(LOSS_TYPES)


def is_reference_free(loss_types) -> bool:
    """True for a reference-free loss; check_loss_types makes sure it stands alone."""
    return any(t in REFERENCE_FREE for t in loss_types)


# TRL's loss types whose per-pair loss TRL's DPOTrainer cannot scale in place by the WPO weights (use_weighting):
# sft's is one value expanded to the batch ("more than one element of the written-to tensor refers to a single memory
# location"), hinge's a ReLU's output that its backward reads ("modified by an inplace operation"). TRL 1.x.
TRL_UNWEIGHTABLE = ("sft", "hinge")


def check_weighting(use_weighting: bool, loss_types) -> None:
    """use_weighting (WPO) with a loss computed by TRL that fails mid-step under it (TRL_UNWEIGHTABLE), or that TRL
    refuses to weight once the model has loaded (aot sorts the pairs, so a pair's weight would go to another): refused."""
    if use_weighting and {"aot", "aot_unpaired"} & set(loss_types):
        raise ConfigError(f"--use_weighting with --loss_type {','.join(loss_types)}: aot sorts the pairs, so WPO's "
                          "per-pair weights would land on other pairs (TRL refuses it); drop --use_weighting, or use "
                          "another loss type")
    broken = [t for t in loss_types if t in TRL_UNWEIGHTABLE]
    if use_weighting and broken and not is_own_loss(loss_types):
        raise ConfigError(f"--use_weighting with --loss_type {','.join(loss_types)}: TRL's DPOTrainer fails to weight "
                          f"{' and '.join(broken)} (it scales the loss in place; the step fails); use --loss_type "
                          "sigmoid (alignkit's loss, which weights it), or drop --use_weighting")


# TRL's DPOTrainer refuses an f-divergence with other losses in its __init__, after the model loaded (f-DPO's
# log Z term cancels only in the chosen-rejected difference of these losses).
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}


def check_trl_refusals(loss_types, label_smoothing: float, overrides: dict) -> None:
    """What TRL's DPOTrainer refuses only once the model is loaded (minutes of a 7B QLoRA load), said as the
    settings are read, with the fix."""
    names = ",".join(loss_types)
    if "exo_pair" in loss_types and not label_smoothing:
        raise ConfigError(f"--loss_type {names}: exo_pair needs --label_smoothing above 0 (the EXO paper recommends "
                          "1e-3)")
    divergence = overrides.get("f_divergence_type")
    if divergence not in (None, "reverse_kl") and not set(loss_types) <= F_DIVERGENCE_LOSSES:
        raise ConfigError(f"--f_divergence_type {divergence} with --loss_type {names}: f-DPO applies to "
                          f"{', '.join(sorted(F_DIVERGENCE_LOSSES))} only; drop --f_divergence_type (reverse_kl, "
                          "DPO's own), or use one of those loss types")


# Loss names users reach for that TRL spells otherwise or trains elsewhere: each one's pointer, said instead of a near
# spelling (`dpo` was "did you mean ipo?", not TRL's sigmoid).
KNOWN_ELSEWHERE = {
    "dpo": "TRL names DPO's loss sigmoid: pass --loss_type sigmoid",
    "slic": "TRL names SLiC's loss hinge: pass --loss_type hinge",
    "rpo": "RPO is DPO plus an NLL term on the chosen answers: --loss_type sigmoid,sft --loss_weights 1,ALPHA (RPO's "
           "alpha)",
    "cpo": "alignkit runs no CPOTrainer; the nearest is --loss_type simpo --simpo_gamma 0 --cpo_alpha 1 (CPO's loss "
           "over length-normalised log-probs, reference-free)",
    "kto": "KTO trains on unpaired thumbs-up/down rows: use kto.py",
    "kto_pair": "TRL 1.x dropped kto_pair; KTO trains on unpaired thumbs-up/down rows: use kto.py",
    "grpo": "GRPO trains on rewards of sampled answers, not preference pairs: use rl.py --algo grpo",
    "rloo": "RLOO trains on rewards of sampled answers, not preference pairs: use rl.py --algo rloo",
}


def check_loss_types(loss_types) -> None:
    """Every loss type is one alignkit or TRL computes (TRL would only say so mid-training); a reference-free loss
    runs alone: combined with a reference-based one, the reference pass would be back."""
    import difflib

    known = (*TRL_LOSS_TYPES, *REFERENCE_FREE)
    for name in loss_types:
        if name not in known and name.lower() in KNOWN_ELSEWHERE:
            raise ConfigError(f"unknown --loss_type {name}: {KNOWN_ELSEWHERE[name.lower()]}")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown --loss_type {name}: {hint}choose from {', '.join(known)}")
    free = [t for t in loss_types if t in REFERENCE_FREE]
    if free and len(loss_types) > 1:
        raise ConfigError(
            f"--loss_type {','.join(loss_types)}: {free[0]} reads no reference model and runs alone; drop the other "
            "loss types (simpo adds an NLL term with --cpo_alpha; orpo has its own)"
        )


def compared_loss_types(trainer_cls) -> set[str]:
    """The loss_type values `trainer_cls`'s source compares `loss_type` with (`self.loss_type == "dapo"`,
    `args.loss_type in ["bnpo", ...]`), read from the installed TRL: GRPOConfig lists them in no field that can be
    read, and a hand list would refuse a loss the next TRL adds. Empty when the source cannot be read."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(trainer_cls)))
    except (OSError, TypeError, SyntaxError):  # no source shipped (a frozen install): nothing to check against
        return set()
    found = set()
    for node in ast.walk(tree):
        operands = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
        if any(isinstance(o, ast.Attribute) and o.attr == "loss_type" for o in operands):
            found |= {c.value for o in operands for c in ast.walk(o)
                      if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return found


def check_grpo_loss_type(loss_type: str) -> None:
    """GRPOTrainer takes any loss_type and raises "Unknown loss type" at the first step, after the model loaded
    and the first completions were sampled: checked here against the losses it computes."""
    import difflib

    from trl import GRPOTrainer

    known = sorted(compared_loss_types(GRPOTrainer))
    if known and loss_type not in known:
        close = difflib.get_close_matches(loss_type, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown loss_type {loss_type} for GRPO: {hint}the installed TRL computes "
                          f"{', '.join(known)}")


def check_label_smoothing(label_smoothing: float, loss_types=("sigmoid",)) -> None:
    """label_smoothing must lie in [0, 0.5) and be read by one of `loss_types`; else a ConfigError (a ValueError) with the fix.

    At 0.5 the smoothed label is a coin flip (the sigmoid loss has no gradient); above it prefers the rejected
    answer. DPOSettings (settings time) and AlignDPOTrainer (the effective TRL config) both call this.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if not label_smoothing:
        return
    names = ",".join(loss_types)
    if not is_own_loss(loss_types) and "sigmoid" in loss_types:
        others = [t for t in loss_types if t not in LOSS_TYPES]
        raise ConfigError(
            f"label_smoothing (cDPO) with loss_type {names}: alignkit smooths sigmoid (cDPO) beside its own losses "
            f"({', '.join(LOSS_TYPES)}); with {', '.join(others)} TRL computes the loss, and TRL ignores label "
            "smoothing for sigmoid. Pass --loss_type sigmoid (a preset may have set another list), or drop "
            "--label_smoothing"
        )
    readers = {"sigmoid", "simpo", *TRL_SMOOTHED} if is_own_loss(loss_types) else set(TRL_SMOOTHED)
    if not readers & set(loss_types):
        raise ConfigError(
            f"--label_smoothing {label_smoothing} has no effect with --loss_type {names}: it smooths sigmoid (cDPO), "
            f"simpo and TRL's {', '.join(TRL_SMOOTHED)}; drop --label_smoothing or use --loss_type sigmoid"
        )


def answer_logps(per_token: torch.Tensor, completion_mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """Each row's summed answer log-prob, shape (rows,); the batch is [chosen..., rejected...].

    `per_token` (rows, >= T - 1) are the fused LM head's next-token log-probs, 0 where the label is -100 (outside
    the answer); `completion_mask` (rows, T) marks the answer tokens. Its last T - 1 columns line up with them.
    LD-DPO (`ld_alpha`, Liu et al. 2024): with l = min(len chosen, len rejected) of the pair, the first l answer
    tokens count fully and the rest with weight ld_alpha: sum(shared) + ld_alpha * sum(tail). The same op order
    as TRL's DPOTrainer, so a policy pass in TRL and a reference pass here give bit-identical sums.
    """
    shift_mask = completion_mask[..., 1:]
    per_token = per_token[:, -shift_mask.size(1) :]  # prompt-learning PEFT prepends virtual tokens
    if ld_alpha is None:
        return per_token.sum(dim=1)
    positions = shift_mask.cumsum(dim=1)
    chosen_lens, rejected_lens = shift_mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens)
    shared = torch.cat([shared, shared], dim=0).to(per_token.device).unsqueeze(1)
    shared_mask = (positions > 0) & (positions <= shared)
    tail_mask = positions > shared
    return (per_token * shared_mask).sum(dim=1) + ld_alpha * (per_token * tail_mask).sum(dim=1)


def mean_answer_logps(per_token: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Each row's answer log-prob divided by its answer tokens, shape (rows,): SimPO's and ORPO's length-normalised
    log-prob (`per_token` and `completion_mask` as for answer_logps)."""
    return answer_logps(per_token, completion_mask) / completion_mask[..., 1:].sum(dim=1).clamp_min(1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: branch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def reference_free_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example `(losses, chosen_rewards, rejected_rewards)` of simpo or orpo (module docstring) from the
    length-normalised answer log-probs (`mean_answer_logps`), each of shape (batch,).

    Raises ValueError for another loss_type, a beta <= 0, or label smoothing outside [0, 0.5) or with orpo.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in REFERENCE_FREE:
        raise ValueError(f"unknown reference-free loss_type {loss_type!r}; expected one of {REFERENCE_FREE}")
    check_label_smoothing(label_smoothing, [loss_type])
    if loss_type == "simpo":
        z = beta * (chosen_logps - rejected_logps) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        if cpo_alpha:
            losses = losses - cpo_alpha * chosen_logps
    else:
        # In float32 at least, as TRL does: log(1 - exp(a)) loses everything in bf16 near a = 0.
        dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
        chosen, rejected = (logps.to(dtype).clamp(max=ORPO_MAX_MEAN_LOGP) for logps in (chosen_logps, rejected_logps))
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        losses = (-chosen_logps.to(dtype) - beta * F.logsigmoid(log_odds)).to(chosen_logps.dtype)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def f_divergence_score(log_ratio: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5):
    """f'(exp(u)) of the policy/reference log-ratio u: the f-DPO score (formulas in the module docstring)."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit a -> 1 is log t: reverse KL
            return log_ratio
        # Clamped as TRL does, so exp stays finite once cast back to a half dtype.
        t = torch.clamp(((alpha - 1.0) * log_ratio).float(), max=11.0 if log_ratio.dtype == torch.float16 else 80.0)
        return (torch.exp(t) - 1.0).to(log_ratio.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCES}")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example `(losses, chosen_rewards, rejected_rewards)`, each of shape (batch,).

    Raises ValueError for an unknown `loss_type` or `f_divergence_type`, a `beta` <= 0, a `label_smoothing`
    outside [0, 0.5), or label smoothing with ipo (it would be silently dropped).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES or loss_type in REFERENCE_FREE:
        expected = tuple(t for t in LOSS_TYPES if t not in REFERENCE_FREE)
        raise ValueError(f"unknown loss_type {loss_type!r} for preference_loss; expected one of {expected} "
                         "(reference-free losses: reference_free_loss)")
    check_label_smoothing(label_smoothing, [loss_type])
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = (
        f_divergence_score(chosen_ratio, f_divergence_type, f_alpha_divergence_coef)
        - f_divergence_score(rejected_ratio, f_divergence_type, f_alpha_divergence_coef)
    )
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    # Rewards carry no gradient: they are for logging and accuracy, as in the reference code.
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    return losses, chosen_rewards, rejected_rewards
