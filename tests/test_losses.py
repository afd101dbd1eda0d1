"""alignkit.losses.preference_loss against values computed by hand from the formulas."""

import math

import pytest
import torch

from alignkit.losses import preference_loss


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Two pairs: policy (chosen, rejected) and reference (chosen, rejected) summed log-probs.
PC, PR, RC, RR = [-10.0, -20.0], [-12.0, -18.0], [-11.0, -19.0], [-11.5, -18.5]


def tensors():
    return [torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)]


def h(i: int) -> float:
    return (PC[i] - PR[i]) - (RC[i] - RR[i])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_is_the_dpo_loss(beta):
    losses, chosen_rewards, rejected_rewards = preference_loss(*tensors(), beta=beta)
    assert h(0) == pytest.approx(1.5) and h(1) == pytest.approx(-1.5)
    for i in range(2):
        assert losses[i].item() == pytest.approx(-logsig(beta * h(i)), rel=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert rejected_rewards[i].item() == pytest.approx(beta * (PR[i] - RR[i]))


def test_label_smoothing_is_conservative_dpo():
    beta, eps = 0.1, 0.2
    losses, _, _ = preference_loss(*tensors(), beta=beta, label_smoothing=eps)
    for i in range(2):
        expected = -(1 - eps) * logsig(beta * h(i)) - eps * logsig(-beta * h(i))
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
    # Smoothing changes the loss: TRL's sigmoid would silently ignore it.
    plain, _, _ = preference_loss(*tensors(), beta=beta)
    assert not torch.allclose(losses, plain)


def test_ipo_is_squared_distance_to_half_inverse_beta():
    beta = 0.25
    losses, _, _ = preference_loss(*tensors(), beta=beta, loss_type="ipo")
    for i in range(2):
        assert losses[i].item() == pytest.approx((h(i) - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_gradients_push_chosen_up_and_rejected_down():
    pc, pr, rc, rr = (torch.tensor([v], requires_grad=i < 2) for i, v in enumerate([-5.0, -5.0, -5.0, -5.0]))
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises chosen, lowers rejected


def test_rewards_carry_no_gradient():
    pc = torch.tensor([-1.0], requires_grad=True)
    _, chosen_rewards, _ = preference_loss(pc, torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.1)
    assert not chosen_rewards.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=0.1, label_smoothing=0.6), "label_smoothing"),
        (dict(beta=0.1, loss_type="hinge"), "unknown loss_type"),
        (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "sigmoid"),
    ],
)
def test_bad_arguments_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(*tensors(), **kwargs)
