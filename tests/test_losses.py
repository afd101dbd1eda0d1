"""alignkit.train.losses.preference_loss against values computed by hand from the formulas."""

import math
import re

import pytest
import torch

from alignkit.core.config import DPOSettings
from alignkit.core.errors import UserError
from alignkit.train.losses import answer_logps, mean_answer_logps, preference_loss, reference_free_loss


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
        (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
        (dict(beta=0.1, f_divergence_type="kl"), "f_divergence_type"),
        (dict(beta=0.1, loss_type="hinge"), "unknown loss_type"),
        (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "sigmoid"),
    ],
)
def test_bad_arguments_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(*tensors(), **kwargs)


@pytest.mark.parametrize("eps", [-0.01, 0.0, 0.2, 0.49, 0.5, 0.7])
def test_label_smoothing_bounds_agree_between_settings_and_loss(eps):
    """[0, 0.5) in both: at 0.5 the smoothed label is a coin flip and the loss has no gradient."""
    outcomes = []
    for check in (lambda: DPOSettings(label_smoothing=eps), lambda: preference_loss(*tensors(), 0.1, "sigmoid", eps)):
        try:
            check()
            outcomes.append("ok")
        except ValueError as e:
            assert "label_smoothing" in str(e)
            assert isinstance(e, UserError)  # the project's own type: a script prints one line, no traceback
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1] == ("ok" if 0 <= eps < 0.5 else "refused")


@pytest.mark.parametrize("loss_type", [["ipo"], ["ipo", "hinge"], ["hinge"]])
def test_label_smoothing_no_loss_reads_is_refused_at_settings_time(loss_type):
    with pytest.raises(ValueError, match=f"--label_smoothing 0.3 has no effect with --loss_type {','.join(loss_type)}"):
        DPOSettings(loss_type=loss_type, label_smoothing=0.3)


def test_label_smoothing_where_a_loss_reads_it_is_accepted():
    for loss_type in (["sigmoid"], ["sigmoid", "ipo"], ["robust"], ["ipo", "exo_pair"]):
        assert DPOSettings(loss_type=loss_type, label_smoothing=0.1).label_smoothing == 0.1


def test_answer_logps_sum_the_answer_and_ld_alpha_weights_the_tail():
    """Two pairs over 6 positions; answers of 2 (chosen) vs 4 (rejected) tokens, then 3 vs 1.
    LD-DPO: the first min(len_c, len_r) tokens count fully, the rest times ld_alpha."""
    mask = torch.tensor([
        [0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0],  # chosen rows: 2 and 3 answer tokens
        [0, 0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0, 0],  # rejected rows: 4 and 1 answer tokens
    ])
    # Next-token log-probs line up with mask[:, 1:]; 0 outside the answer, as the fused head gives them.
    per_token = -torch.arange(1, 7, dtype=torch.float64).repeat(4, 1) * mask[:, 1:]
    assert answer_logps(per_token, mask).tolist() == [-5.0, -6.0, -14.0, -1.0]
    # chosen 0: shared 2 tokens; rejected 0: -(2+3) shared + alpha * -(4+5) tail; pair 1: shared 1.
    assert answer_logps(per_token, mask, ld_alpha=0.5).tolist() == [-5.0, -1.0 - 0.5 * 5.0, -5.0 - 0.5 * 9.0, -1.0]
    assert answer_logps(per_token, mask, ld_alpha=1.0).tolist() == answer_logps(per_token, mask).tolist()


@pytest.mark.parametrize("f, score", [
    ("reverse_kl", lambda u: u),
    ("forward_kl", lambda u: 1 - math.exp(-u)),
    ("js_divergence", lambda u: math.log(2) + logsig(u)),
    ("alpha_divergence", lambda u: (math.exp(-0.7 * u) - 1) / -0.7),
])
def test_f_divergence_scores_replace_the_log_ratios(f, score):
    beta = 0.1
    losses, chosen_rewards, _ = preference_loss(*tensors(), beta=beta, f_divergence_type=f, f_alpha_divergence_coef=0.3)
    for i in range(2):
        h_f = score(PC[i] - RC[i]) - score(PR[i] - RR[i])
        assert losses[i].item() == pytest.approx(-logsig(beta * h_f), rel=1e-6)  # alpha: in fp32, as TRL
        assert chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]))  # rewards stay the log-ratios


# ---------------------------------------------------------------------------------------------------------
# Reference-free losses: SimPO and ORPO, on length-normalised log-probs (the two pairs' answers: 4/5 and 2/6 tokens)

LENGTHS_C, LENGTHS_R = [4, 2], [5, 6]
AC = [PC[i] / LENGTHS_C[i] for i in range(2)]  # -2.5, -10
AR = [PR[i] / LENGTHS_R[i] for i in range(2)]  # -2.4, -3


def averaged():
    return torch.tensor(AC, dtype=torch.float64), torch.tensor(AR, dtype=torch.float64)


def test_mean_answer_logps_divide_by_the_answer_tokens():
    # Next-token log-probs line up with mask[:, 1:]; rows of 4, 2, 5 and 6 answer tokens summing to PC and PR.
    mask = torch.zeros(4, 8, dtype=torch.long)
    for row, n in enumerate(LENGTHS_C + LENGTHS_R):
        mask[row, 1 : 1 + n] = 1
    per_token = mask[:, 1:].double() * torch.tensor(AC + AR, dtype=torch.float64)[:, None]
    assert mean_answer_logps(per_token, mask).tolist() == pytest.approx(AC + AR, rel=1e-12)


@pytest.mark.parametrize("beta, gamma, eps, alpha", [(2.0, 1.0, 0.0, 0.0), (2.5, 0.5, 0.1, 0.0), (0.1, 0.3, 0.0, 1.0)])
def test_simpo_is_the_papers_loss(beta, gamma, eps, alpha):
    """Meng et al. 2024, eq. 6: -log sigmoid(beta/|yw| log p(yw) - beta/|yl| log p(yl) - gamma); cDPO smoothing
    and CPO's NLL term as TRL's CPOTrainer adds them."""
    losses, chosen_rewards, rejected_rewards = reference_free_loss(*averaged(), beta, "simpo", gamma, alpha, eps)
    for i in range(2):
        z = beta * AC[i] - beta * AR[i] - gamma
        expected = -(1 - eps) * logsig(z) - eps * logsig(-z) - alpha * AC[i]
        assert losses[i].item() == pytest.approx(expected, abs=1e-6, rel=1e-6)
        assert chosen_rewards[i].item() == pytest.approx(beta * AC[i]) and rejected_rewards[i].item() == pytest.approx(beta * AR[i])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_is_the_papers_loss(beta):
    """Hong et al. 2024, eqs. 6-7: L_SFT + lambda * -log sigmoid(log(odds(yw) / odds(yl))), odds(y) = P / (1 - P)
    with P = exp(mean token log-prob); L_SFT is the chosen answer's mean token NLL."""
    losses, chosen_rewards, _ = reference_free_loss(*averaged(), beta, "orpo")
    for i in range(2):
        pw, pl = math.exp(AC[i]), math.exp(AR[i])
        log_odds_ratio = math.log((pw / (1 - pw)) / (pl / (1 - pl)))
        assert losses[i].item() == pytest.approx(-AC[i] - beta * logsig(log_odds_ratio), abs=1e-6, rel=1e-6)
        assert chosen_rewards[i].item() == pytest.approx(beta * AC[i])


def _trl_self(**fields):
    from types import SimpleNamespace

    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), alpha=0.0, **fields)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_matches_trls_cpo_trainer(eps):
    """TRL's CPOTrainer.cpo_loss with loss_type simpo (and cpo_alpha 0) on the same averaged log-probs."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trl_self = _trl_self(beta=2.0, simpo_gamma=0.8, label_smoothing=eps, loss_type="simpo")
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trl_self, *averaged())
    losses, chosen, rejected = reference_free_loss(*averaged(), 2.0, "simpo", 0.8, 0.0, eps)
    assert torch.allclose(losses, trl_losses, atol=1e-6, rtol=0)
    assert torch.allclose(chosen, trl_chosen) and torch.allclose(rejected, trl_rejected)


def test_orpo_matches_trls_orpo_trainer():
    """TRL's ORPOTrainer: loss = NLL(chosen) - mean(beta * log sigmoid(log odds)), its odds_ratio_loss on the same
    averaged log-probs; its NLL is the chosen tokens' mean, which is -AC when the chosen answers are equally long."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    ac, ar = averaged()
    ac = torch.tensor([-2.5, -2.5 / 3], dtype=torch.float64)  # two chosen answers of one length: the NLL terms agree
    trl_or, trl_chosen, _, _, _ = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.3), ac, ar)
    trl_loss = -ac.mean() - trl_or.mean()
    losses, chosen, _ = reference_free_loss(ac, ar, 0.3, "orpo")
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert torch.allclose(chosen, trl_chosen.double())


def test_orpo_is_finite_where_an_answer_has_no_tokens_or_a_certain_one():
    """A prompt as long as max_length leaves both answers no tokens (mean log-prob 0 / 1 = 0); a model sure of every
    token gives 0 too. log(1 - exp(0)) is -inf, so the log odds were NaN and so was the batch's loss. Now the mean is
    capped at -1e-6 inside the odds, and every other pair's loss and gradient are the formula's."""
    ac = torch.tensor([-0.9, 0.0, 0.0], requires_grad=True)
    ar = torch.tensor([-1.3, 0.0, -0.5], requires_grad=True)
    losses, _, _ = reference_free_loss(ac, ar, 0.1, "orpo")
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(ac.grad).all() and torch.isfinite(ar.grad).all()
    pw, pl = math.exp(-0.9), math.exp(-1.3)
    assert losses[0].item() == pytest.approx(0.9 - 0.1 * logsig(math.log((pw / (1 - pw)) / (pl / (1 - pl)))), rel=1e-6)
    assert losses[1].item() == pytest.approx(0.1 * math.log(2), rel=1e-5)  # an empty pair: no preference either way
    assert losses[2].item() < 0.01  # the certain chosen answer: the odds-ratio term all but saturated


def test_an_unknown_loss_type_is_refused_at_settings_time_and_trl_s_own_are_all_known():
    """TRL names an unknown loss type only inside its loss, mid-training; alignkit's list is TRL's own."""
    import inspect
    import re

    from trl import DPOTrainer

    from alignkit.train.losses import TRL_LOSS_TYPES

    trl_list = re.search(r"Unknown loss type: \{loss_type\}\. Should be one of \[(.*?)\]",
                         inspect.getsource(DPOTrainer).replace('"\n', "").replace('  "', ""), re.S)
    assert tuple(re.findall(r"'(\w+)'", trl_list.group(1))) == TRL_LOSS_TYPES
    with pytest.raises(UserError, match="unknown --loss_type sigmod: did you mean sigmoid"):
        DPOSettings(loss_type=["sigmod"])
    for loss_type in TRL_LOSS_TYPES:  # exo_pair needs label smoothing (TRL refuses it without)
        DPOSettings(loss_type=[loss_type], label_smoothing=0.001 if loss_type == "exo_pair" else 0.0)


def test_a_well_known_loss_name_points_where_it_is():
    """`dpo.py --loss_type dpo` said "did you mean ipo?" (the dpo.py audit of session 33): the nearest spelling, not TRL's
    name for DPO's loss. A name users reach for says where its loss is, in one line, and is never a real loss type."""
    from alignkit.train.losses import KNOWN_ELSEWHERE, REFERENCE_FREE, TRL_LOSS_TYPES

    for given, said in (("dpo", "TRL names DPO's loss sigmoid: pass --loss_type sigmoid"), ("DPO", "--loss_type sigmoid"),
                        ("kto", "use kto.py"), ("kto_pair", "use kto.py"), ("slic", "--loss_type hinge"),
                        ("rpo", "--loss_type sigmoid,sft --loss_weights 1,ALPHA"), ("cpo", "--loss_type simpo"),
                        ("grpo", "use rl.py --algo grpo")):
        with pytest.raises(UserError, match=rf"^unknown --loss_type {given}: .*{re.escape(said)}") as error:
            DPOSettings(loss_type=["sigmoid", given])
        assert "did you mean" not in str(error.value) and "\n" not in str(error.value)
    assert not set(KNOWN_ELSEWHERE) & {*TRL_LOSS_TYPES, *REFERENCE_FREE}


def test_grpo_loss_types_are_read_from_the_installed_trl_and_a_typo_is_refused_before_the_first_step():
    """GRPOTrainer accepts any loss_type and raises at its first step; its own comparisons name the losses."""
    from trl import GRPOTrainer

    from alignkit.core.args import parse_config
    from alignkit.core.config import RLSettings
    from alignkit.train.losses import compared_loss_types

    known = compared_loss_types(GRPOTrainer)
    assert {"grpo", "dapo", "dr_grpo", "bnpo"} <= known and not known & {"sequence", "token"}  # no other field's values
    for loss_type in sorted(known):
        assert parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--loss_type", loss_type]).trainer_overrides == {
            "loss_type": loss_type}
    with pytest.raises(UserError, match="unknown loss_type dr_gpro for GRPO: did you mean dr_grpo?"):
        parse_config(RLSettings, env_file=None, args=["--reward", "rule", "--loss_type", "dr_gpro"])
    assert compared_loss_types(type("NoSource", (), {})) == set()  # nothing to read: no check rather than a wrong one


def test_reference_free_gradients_prefer_the_chosen_answer():
    for loss_type in ("simpo", "orpo"):
        ac, ar = (torch.tensor([v], requires_grad=True) for v in (-2.0, -2.0))
        losses, _, _ = reference_free_loss(ac, ar, 0.5, loss_type)
        losses.sum().backward()
        assert ac.grad.item() < 0 < ar.grad.item(), loss_type


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="sigmoid"), "reference-free loss_type"),
    (dict(loss_type="orpo", label_smoothing=0.1), "no effect with --loss_type orpo"),
    (dict(loss_type="simpo", beta=0.0), "beta"),
])
def test_reference_free_bad_arguments_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reference_free_loss(*averaged(), **{"beta": 0.1, **kwargs})
    with pytest.raises(ValueError, match="reference_free_loss"):
        preference_loss(*tensors(), beta=0.1, loss_type="simpo")  # no reference to read: the other function


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type=["simpo", "sft"]), "simpo reads no reference model and runs alone"),
    (dict(loss_type=["sigmoid", "orpo"]), "orpo reads no reference model and runs alone"),
    (dict(loss_type=["orpo"], precompute_ref_log_probs=True), "--precompute_ref_log_probs has no effect"),
    (dict(loss_type=["simpo"], reference_adapters=0), "--reference_adapters has no effect"),
    (dict(loss_type=["orpo"], cpo_alpha=1.0), "--cpo_alpha applies to --loss_type simpo only, not orpo"),
    (dict(simpo_gamma=1.0), "--simpo_gamma applies to --loss_type simpo only, not sigmoid"),
])
def test_reference_free_settings_refused_at_settings_time(kwargs, message):
    with pytest.raises(UserError, match=message):
        DPOSettings(**kwargs)


def test_rlaif_refuses_a_reference_for_a_reference_free_loss():
    from alignkit.core.config import RLAIFSettings

    with pytest.raises(UserError, match="--reference start has no effect with --loss_type orpo"):
        RLAIFSettings(loss_type=["orpo"], reference="start")
    assert RLAIFSettings(loss_type=["orpo"]).reference == "previous"


def test_simpo_reads_label_smoothing():
    assert DPOSettings(loss_type=["simpo"], label_smoothing=0.1).label_smoothing == 0.1


def test_dpo_s_held_out_reward_accuracy_is_the_share_of_pairs_whatever_the_batches():
    """TRL's log averages each metric's entries: one per batch made the held-out reward accuracy a mean of batch
    means (9 pairs in batches of 8 and 1, 3 of 8 then 1 of 1 right, said (3/8 + 1) / 2; the review of session 32,
    as reward.py's eval_accuracy). One entry per pair: the pairs' own means."""
    from collections import defaultdict
    from types import SimpleNamespace

    from alignkit.train.trainers import AlignDPOTrainer

    trainer = SimpleNamespace(accelerator=SimpleNamespace(gather_for_metrics=lambda t: t),
                              _metrics={"eval": defaultdict(list)})
    for chosen, rejected in (([1.0] * 3 + [0.0] * 5, [0.0] * 3 + [1.0] * 5), ([2.0], [0.0])):
        c, r = torch.tensor(chosen), torch.tensor(rejected)
        AlignDPOTrainer._log_rewards(trainer, "eval", c, r, c - 5, r - 5)
    logged = {k: sum(v) / len(v) for k, v in trainer._metrics["eval"].items()}
    assert logged["rewards/accuracies"] == pytest.approx(4 / 9)
    assert logged["rewards/margins"] == pytest.approx((3 - 5 + 2) / 9)
    assert logged["logps/chosen"] == pytest.approx((3 + 2) / 9 - 5)
    assert logged["rewards/ties"] == 0
    # Ties counted apart: an adapter that never changed (a run all inside the warmup's first step) has every pair at
    # reward 0, its accuracy 0.000 read as "always wrong" (the evaluate.py audit of session 67).
    trainer._metrics["eval"].clear()
    AlignDPOTrainer._log_rewards(trainer, "eval", torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, -1.0]), torch.zeros(4),
                                 torch.zeros(4))
    assert sum(trainer._metrics["eval"]["rewards/ties"]) == 3
