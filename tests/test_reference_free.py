"""SimPO and ORPO in dpo.py (`--loss_type simpo` / `orpo`): no reference pass runs at all, the loss is the
formula's on the policy's length-normalised log-probs, prefix sharing still applies, and the tiny preset learns
the preference (held-out reward accuracy >= 0.8, as the issue asks)."""

from __future__ import annotations

import pytest
import torch

from alignkit.train import trainers
from alignkit.train.losses import mean_answer_logps, reference_free_loss

from conftest import run_script
from test_prefix_sharing import _trainer


@pytest.fixture
def reference_passes(monkeypatch):
    """Counts every way a reference pass can start: per step, precomputed (refcache), or the adapter switched off."""
    calls = []
    for name in ("compute_ref_log_probs", "_reference_mode", "_precompute_ref_logps"):
        original = getattr(trainers.AlignDPOTrainer, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(trainers.AlignDPOTrainer, name, counted)
    return calls


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_no_reference_pass_runs(tiny_cache, tmp_path, reference_passes, loss_type):
    """sigmoid is the control: the same counter sees its reference passes (train and eval)."""
    run = run_script("dpo.py", "--preset", "tiny", "--loss_type", loss_type, "--max_steps", "2", "--eval_split", "16",
                     "--output_dir", str(tmp_path), "--run_name", loss_type)
    assert run["trainer"].prefix_sharing  # the policy pass is still prefix-shared
    if loss_type == "sigmoid":
        assert reference_passes.count("compute_ref_log_probs") >= 3  # two steps and the held-out pass
    else:
        assert reference_passes == []
        assert 0 <= run["metrics"]["eval_rewards/accuracies"] <= 1


def test_orpo_learns_the_tiny_preference_without_a_reference(tiny_cache, tmp_path, reference_passes):
    """The full tiny run (three epochs, about 5 s of training): measured held-out reward accuracy 1.0."""
    run = run_script("dpo.py", "--preset", "tiny", "--loss_type", "orpo", "--output_dir", str(tmp_path))
    assert reference_passes == []
    assert run["metrics"]["eval_rewards/accuracies"] >= 0.8


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_trainer_loss_is_the_formula_and_prefix_sharing_keeps_it(tiny_cache, tmp_path, loss_type):
    trainer, batch = _trainer(tmp_path, loss_type=loss_type, beta=2.0)
    trainer.simpo_gamma, trainer.cpo_alpha = 0.7, 0.5
    trainer.model.train()
    results = {}
    for sharing in (True, False):
        trainer.prefix_sharing = sharing
        loss = trainer.compute_loss(trainer.model, dict(batch))
        results[sharing] = loss.item()
    # The formula, from an unshared plain forward of the same batch.
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
        per_token = per_token * (labels[:, 1:] != -100)
    chosen, rejected = mean_answer_logps(per_token, batch["completion_mask"]).chunk(2)
    expected = reference_free_loss(chosen, rejected, 2.0, loss_type, 0.7, 0.5)[0].mean().item()
    assert results[True] == pytest.approx(expected, abs=1e-5)
    assert results[False] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("override", [dict(ld_alpha=0.5), dict(f_divergence_type="forward_kl"),
                                      dict(precompute_ref_log_probs=True)])
def test_settings_that_need_a_reference_are_refused_in_the_trainer(override):
    """--trainer_overrides can set them past DPOSettings: check_dpo_config refuses them before TRL tokenizes."""
    from trl import DPOConfig

    from alignkit.core.args import ConfigError

    args = DPOConfig(output_dir="unused", loss_type=["orpo"], report_to="none", use_cpu=True, **override)
    with pytest.raises(ConfigError, match=f"{next(iter(override))}=.* has no effect with --loss_type orpo"):
        trainers.check_dpo_config(args)
