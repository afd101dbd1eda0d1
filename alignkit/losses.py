"""Preference losses that TRL lacks or computes differently, as one pure function.

TRL's DPOTrainer ignores `label_smoothing` for `loss_type="sigmoid"` (TRL >= 0.29: it only feeds `robust`,
`exo_pair` and `aot`), and its `ipo` divides the log-ratios by the completion length. This module follows the
DPO paper's reference code (Rafailov et al. 2023, github.com/eric-mitchell/direct-preference-optimization):

    h = (pc - pr) - (rc - rr)            log-probs summed over the response tokens
    sigmoid (cDPO when eps > 0):  loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    ipo:                          loss = (h - 1 / (2 * beta)) ** 2
    rewards:                      chosen = beta * (pc - rc),  rejected = beta * (pr - rr)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The loss types this function computes; dpo.py routes these here instead of to TRL.
LOSS_TYPES = ("sigmoid", "ipo")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example `(losses, chosen_rewards, rejected_rewards)`, each of shape (batch,).

    Raises ValueError for an unknown `loss_type`, a `beta` <= 0, or a `label_smoothing` outside [0, 0.5]
    (above 0.5 the smoothed label prefers the rejected answer).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid (cDPO) loss, not to ipo")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} for alignkit.losses; expected one of {LOSS_TYPES}")
    # Rewards carry no gradient: they are for logging and accuracy, as in the reference code.
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
