"""TRL settings in DPO (`--trainer_overrides`): each takes effect on both loss paths, alike in the policy and the
reference pass, or is refused by name. alignkit's own path is `--loss_type sigmoid` (or ipo); TRL's is any list
with a TRL-only name. `sigmoid,sigmoid_norm --loss_weights 1,0` is TRL's plain sigmoid loss, so the
two paths can be compared on the same first batch.

At step 0 the new LoRA adapter is zero, so the policy equals the reference: every reward is exactly 0 and the
sigmoid loss is log 2 (times the WPO weights, plus the MoE aux loss).
"""

from __future__ import annotations

import json
import logging
import math

import pytest

from alignkit.core.args import ConfigError
from alignkit.train.trainers import check_dpo_config

from conftest import run_script

# sigmoid_norm weighted 0: TRL's plain sigmoid (hinge would do too, but TRL's WPO weighting crashes on it).
OWN, TRL = ["--loss_type", "sigmoid"], ["--loss_type", "sigmoid,sigmoid_norm", "--loss_weights", "1,0"]


def first_step(tmp_path, name, *flags, overrides=None) -> tuple[dict, object]:
    """A one-step tiny DPO run: (its step-1 log, which holds the step-0 forward's metrics; the trainer)."""
    extra = ["--trainer_overrides", json.dumps(overrides)] if overrides else []
    run = run_script("dpo.py", "--preset", "tiny", "--max_steps", "1", "--logging_steps", "1", "--eval_split", "0",
                     "--output_dir", str(tmp_path), "--run_name", name, *flags, *extra)
    return run["trainer"].state.log_history[0], run["trainer"]


def uneven_pairs(tmp_path) -> str:
    """The tiny preferences with chosen answers of 3 or 5 words against rejected ones of 3: LD-DPO has a tail."""
    from alignkit.modeling import presets

    rows = [json.loads(line) for line in open(presets.paths()["preferences"])][:64]
    for row in rows[::2]:
        answer = row["chosen"][0]["content"]
        row["chosen"][0]["content"] = answer[:-1] + "," + ",".join(answer[:-1].split(",")[:2]) + "."
    path = tmp_path / "uneven.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("loss", [OWN, ["--loss_type", "sigmoid,sft"]], ids=["alignkit", "trl"])
def test_ld_alpha_weights_the_policy_and_the_reference_alike(tiny_cache, tmp_path, loss):
    data = ["--dataset_id", uneven_pairs(tmp_path)]
    plain, _ = first_step(tmp_path, "plain", *loss, *data)
    ld, trainer = first_step(tmp_path, "ld", *loss, *data, overrides={"ld_alpha": 0.0})
    assert trainer.own_loss == (loss == OWN)
    assert ld["rewards/chosen"] == 0.0 and ld["rewards/rejected"] == 0.0  # measured 11.45 when only TRL's policy had it
    # ld_alpha took effect: with 0, tokens past the shorter answer of each pair no longer count.
    assert ld["logps/chosen"] + ld["logps/rejected"] > plain["logps/chosen"] + plain["logps/rejected"] + 1e-3


def test_wpo_weighting_acts_on_alignkits_loss_as_on_trls(tiny_cache, tmp_path):
    plain, _ = first_step(tmp_path, "plain", *OWN)
    own, _ = first_step(tmp_path, "own", *OWN, overrides={"use_weighting": True})
    trl, _ = first_step(tmp_path, "trl", *TRL, overrides={"use_weighting": True})
    assert plain["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(own["loss"] - math.log(2)) > 1e-3  # weighted: log 2 * mean(w_chosen * w_rejected)
    assert own["loss"] == pytest.approx(trl["loss"], abs=1e-4)


def tiny_moe(folder) -> str:
    """A two-layer Mixtral with the tiny preset's tokenizer: a Mixture-of-Experts model with a router aux loss."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from alignkit.modeling import presets

    tokenizer = AutoTokenizer.from_pretrained(presets.paths()["model"])
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_moe_router_aux_loss_is_added_on_both_paths(tiny_cache, tmp_path):
    model = tiny_moe(tmp_path / "moe")
    own, _ = first_step(tmp_path, "own", *OWN, "--model_id", model)
    trl, _ = first_step(tmp_path, "trl", *TRL, "--model_id", model)
    assert own["aux_loss"] > 0
    assert own["loss"] == pytest.approx(math.log(2) + 0.5 * own["aux_loss"], abs=2e-4)
    assert own["loss"] == pytest.approx(trl["loss"], abs=1e-4)
    off, _ = first_step(tmp_path, "off", *OWN, "--model_id", model, overrides={"router_aux_loss_coef": 0.0})
    assert "aux_loss" not in off and off["loss"] == pytest.approx(math.log(2), abs=1e-4)


def dpo_config(**kwargs):
    from trl import DPOConfig

    return DPOConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False, **kwargs)


@pytest.mark.parametrize("override", [
    {"model_init_kwargs": {"dtype": "bfloat16"}}, {"trust_remote_code": True}, {"sync_ref_model": True}, {"ref_model_sync_steps": 64},
    {"ref_model_mixup_alpha": 0.9}, {"discopop_tau": 0.1}, {"f_alpha_divergence_coef": 0.3},
])
def test_an_override_that_cannot_act_is_refused_by_name(override):
    name = next(iter(override))
    with pytest.raises(ConfigError, match=f"trainer override {name}="):
        check_dpo_config(dpo_config(**override))


@pytest.mark.parametrize("field, value", [("precompute_ref_log_probs", True), ("precompute_ref_batch_size", 64),
                                          ("f_divergence_type", "forward_kl"), ("ld_alpha", 0.5)])
def test_a_reference_setting_with_a_reference_free_loss_is_refused_by_name(field, value):
    """simpo and orpo run no reference pass: a reference setting passed through --trainer_overrides would do nothing."""
    for loss_type in ("simpo", "orpo"):
        with pytest.raises(ConfigError, match=f"{field}={value!r} has no effect with --loss_type {loss_type}"):
            check_dpo_config(dpo_config(loss_type=[loss_type], **{field: value}))


def test_an_override_that_acts_is_accepted():
    check_dpo_config(dpo_config(loss_type=["discopop"], discopop_tau=0.1))
    check_dpo_config(dpo_config(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3))
    check_dpo_config(dpo_config(ld_alpha=0.5, use_weighting=True, router_aux_loss_coef=0.0))


def test_wpo_weighting_of_a_loss_trl_cannot_weight_is_refused_before_the_model_loads():
    """--use_weighting with the tiny preset's sigmoid,sft (or hinge) failed at the first step inside TRL's DPOTrainer,
    which scales the per-pair loss in place (found by a dpo.py audit): refused as the settings are read."""
    from alignkit.core.config import DPOSettings

    for loss_type in (["sigmoid", "sft"], ["hinge"]):
        name = ",".join(loss_type)
        with pytest.raises(ConfigError, match=f"^--use_weighting with --loss_type {name}: TRL's DPOTrainer fails"):
            DPOSettings(model_id="m", dataset_id="d", loss_type=loss_type, trainer_overrides={"use_weighting": True})
        with pytest.raises(ConfigError, match=f"^--use_weighting with --loss_type {name}"):
            check_dpo_config(dpo_config(loss_type=loss_type, use_weighting=True))
        DPOSettings(model_id="m", dataset_id="d", loss_type=loss_type)  # unweighted, it trains
    DPOSettings(model_id="m", dataset_id="d", loss_type=["sigmoid"], trainer_overrides={"use_weighting": True})


def test_what_trl_refuses_after_the_load_is_refused_as_the_settings_are_read():
    """TRL's DPOTrainer refuses these in its __init__, once the model has loaded (dpo.py audit): aot with WPO
    weighting, exo_pair without label smoothing, an f-divergence with a loss it does not apply to."""
    import re

    from alignkit.core.args import parse_config
    from alignkit.core.config import DPOSettings

    def parse(*args):
        return parse_config(DPOSettings, args=["--model_id", "m", "--dataset_id", "d", *args], env_file=None)

    for args, message in ((["--loss_type", "aot", "--use_weighting"], "--use_weighting with --loss_type aot: aot sorts"),
                          (["--loss_type", "exo_pair"], "--loss_type exo_pair: exo_pair needs --label_smoothing above 0"),
                          (["--loss_type", "bco_pair", "--f_divergence_type", "js_divergence"],
                           "--f_divergence_type js_divergence with --loss_type bco_pair: f-DPO applies to ")):
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            parse(*args)
    parse("--loss_type", "exo_pair", "--label_smoothing", "0.001")
    parse("--loss_type", "sigmoid", "--f_divergence_type", "js_divergence")
    # TRL's names through --trainer_overrides win over alignkit's (trl_config): read so here too (review).
    parse("--loss_type", "exo_pair", "--trainer_overrides", '{"label_smoothing": 0.001}')
    with pytest.raises(ConfigError, match="^--use_weighting with --loss_type aot"):
        parse("--trainer_overrides", '{"loss_type": ["aot"], "use_weighting": true}')



def test_settings_that_would_do_nothing_are_said(alignkit_log):
    """dpo.py audit: --loss_weights 0 trained nothing (loss and gradient 0 every step) and finished; a
    --precompute_ref_batch_size without --precompute_ref_log_probs was taken without a word."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import DPOSettings

    with pytest.raises(ConfigError, match=r"^--loss_weights 0.0: every weight is 0, so the loss and its gradient"):
        parse_config(DPOSettings, args=["--loss_type", "sigmoid", "--loss_weights", "0"], env_file=None)
    parse_config(DPOSettings, args=["--loss_type", "sigmoid,sft", "--loss_weights", "0,1"], env_file=None)
    parse_config(DPOSettings, args=["--trainer_overrides", '{"precompute_ref_log_probs": true, '
                                    '"precompute_ref_batch_size": 8}'], env_file=None)  # a recipe's: applied
    assert "not applied" not in alignkit_log.text
    s = parse_config(DPOSettings, args=["--precompute_ref_batch_size", "4"], env_file=None)
    assert "--precompute_ref_batch_size not applied: it sizes the up-front reference pass" in alignkit_log.text
    from alignkit.core.saved_settings import not_applied  # recorded too, for the run's config and card

    assert not_applied(s) == {"precompute_ref_batch_size": {
        "value": 4, "why": "it sizes the up-front reference pass of --precompute_ref_log_probs true"}}


def test_dpo_refuses_an_override_before_training(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="ref_model_sync_steps"):
        first_step(tmp_path, "refused", *OWN, overrides={"ref_model_sync_steps": 64})


def test_label_smoothing_set_through_an_override_is_checked_too():
    with pytest.raises(ConfigError, match="no effect with --loss_type ipo"):
        check_dpo_config(dpo_config(loss_type=["ipo"], label_smoothing=0.3))




def test_ipo_with_trl_losses_warns_that_it_becomes_trls_length_normalised_ipo(alignkit_log):
    check_dpo_config(dpo_config(loss_type=["ipo", "hinge"]))
    warnings = [r for r in alignkit_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "length-normalised" in warnings[0].getMessage()
    alignkit_log.clear()
    check_dpo_config(dpo_config(loss_type=["ipo"]))  # alone: the paper's IPO, nothing to warn about
    assert not [r for r in alignkit_log.records if r.levelno >= logging.WARNING]
