"""Prefix sharing for DPO (alignkit.train.prefix): the packed pass gives the unshared pass's log-probs, loss and
gradients (to 1e-5 in fp32, on the tiny model), in the policy and the reference pass, with sdpa and eager
attention; the packed batch is shorter; it is off, with one log line, where no custom mask can be passed.

The batches mix prompt lengths and answer lengths, and one pair is cut by max_length inside its answer, so
every branch of the layout (shared prefix, each answer's copy of the last prompt token, padding) is used.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from alignkit.train import prefix


def _trainer(tmp_path, attn="sdpa", sharing=True, loss_type="sigmoid", **overrides):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from alignkit.modeling import presets
    from alignkit.modeling.models import TRAINABLE
    from alignkit.train.trainers import AlignDPOTrainer

    path = presets.paths()["model"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    # Random (not zero) LoRA weights: the policy differs from the reference and every LoRA matrix gets a gradient.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, adapter_name=TRAINABLE)
    rows = [json.loads(line) for line in open(presets.paths()["preferences"])][:6]
    for i, row in enumerate(rows):  # prompts of different lengths; one long chosen answer that max_length cuts
        row["prompt"][-1]["content"] = row["prompt"][-1]["content"] + " again" * i
    rows[2]["chosen"][0]["content"] = rows[2]["chosen"][0]["content"] * 6
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_length=48, report_to="none",
                     loss_type=loss_type, use_cpu=True, **overrides)
    trainer = AlignDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, prefix_sharing=sharing)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def _run(trainer, batch, sharing):
    """Reference log-probs, policy log-probs, loss and the LoRA gradients with sharing on or off."""
    trainer.prefix_sharing = sharing
    trainer.model.zero_grad()
    trainer.model.train()
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    _, logps = trainer.answer_forward(trainer.model, batch)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return ref, logps.detach(), loss.detach(), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_pass_gives_the_unshared_logps_loss_and_gradients(tiny_cache, tmp_path, attn):
    trainer, batch = _trainer(tmp_path, attn)
    assert trainer.prefix_sharing and prefix.can_pack(batch)
    completion = batch["completion_mask"].sum(dim=1)
    assert (completion > 0).all() and batch["attention_mask"].sum(dim=1).max() == 48  # one pair was truncated
    ref_on, logps_on, loss_on, grads_on = _run(trainer, batch, True)
    ref_off, logps_off, loss_off, grads_off = _run(trainer, batch, False)
    assert not torch.equal(ref_off, logps_off)  # the policy is not the reference: the test can tell them apart
    torch.testing.assert_close(ref_on, ref_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps_on, logps_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=1e-5)
    assert len(grads_on) > 0 and all(g.abs().sum() > 0 for g in grads_off.values())
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_ld_alpha_and_wpo_read_the_unpacked_outputs(tiny_cache, tmp_path):
    trainer, batch = _trainer(tmp_path, ld_alpha=0.5, use_weighting=True)
    _, _, loss_on, grads_on = _run(trainer, batch, True)
    _, _, loss_off, grads_off = _run(trainer, batch, False)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=1e-5)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_packed_batch_holds_each_prompt_once(tiny_cache, tmp_path):
    _, batch = _trainer(tmp_path)
    packed = prefix.pack_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    pairs = batch["input_ids"].size(0) // 2
    prompts = (batch["completion_mask"].cumsum(dim=1) == 0).sum(dim=1)[:pairs]
    # Each pair saves its prompt but the last token, which both answers' first prediction needs.
    assert packed.tokens == int(batch["attention_mask"].sum()) - int((prompts - 1).sum())
    assert packed.input_ids.size(0) == pairs and packed.input_ids.size(1) < 2 * batch["input_ids"].size(1)
    # The rejected answer sees the prompt and itself, never the chosen answer, and continues the prompt's positions.
    mask, i = packed.attention_mask[0, 0], 0
    len_c = int(batch["attention_mask"][i].sum())
    first_rejected = len_c  # the copy of the last prompt token that opens the rejected segment
    assert not mask[first_rejected, int(prompts[i]) - 1 : len_c].any()
    assert mask[first_rejected, : int(prompts[i]) - 1].all() and mask[first_rejected, first_rejected]
    assert int(packed.position_ids[i, first_rejected]) == int(prompts[i]) - 1


def test_off_with_one_log_line_where_no_custom_mask_is_taken(tiny_cache, tmp_path, caplog, monkeypatch):
    from types import SimpleNamespace

    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert "flash_attention_2" in prefix.unavailable_reason(flash)
    monkeypatch.setattr(prefix, "unavailable_reason", lambda model: "attention implementation flash_attention_2 ...")
    with caplog.at_level(logging.INFO, logger="alignkit"):
        trainer, batch = _trainer(tmp_path)
    assert not trainer.prefix_sharing
    assert sum("prefix sharing off" in r.getMessage() for r in caplog.records) == 1
    off, _ = _trainer(tmp_path, sharing=False)
    assert not off.prefix_sharing


def test_trls_loss_path_shares_too_with_the_same_loss_and_gradients(tiny_cache, tmp_path):
    """`sigmoid,sft` (the tiny preset's loss) is TRL's: its forward runs on the packed pairs as well."""
    trainer, batch = _trainer(tmp_path, loss_type=["sigmoid", "sft"])
    assert trainer.prefix_sharing and not trainer.own_loss
    calls = []
    forward = trainer._shared_forward
    trainer._shared_forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    ref_on, _, loss_on, grads_on = _run(trainer, batch, True)
    assert len(calls) == 4  # the reference twice (alone, and inside compute_loss), answer_forward, TRL's policy pass
    ref_off, _, loss_off, grads_off = _run(trainer, batch, False)
    torch.testing.assert_close(ref_on, ref_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=1e-5)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dpo_py_flag_turns_it_off_and_the_step_is_the_same(tiny_cache, tmp_path):
    from conftest import run_script

    def first_step(name, *flags):
        run = run_script("dpo.py", "--preset", "tiny", "--max_steps", "1", "--logging_steps", "1", "--eval_split", "0",
                         "--loss_type", "sigmoid", "--output_dir", str(tmp_path), "--run_name", name, *flags)
        return run["trainer"].state.log_history[0], run["trainer"]

    on, shared = first_step("on")
    off, unshared = first_step("off", "--prefix_sharing", "false")
    assert shared.prefix_sharing and not unshared.prefix_sharing
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert on[key] == pytest.approx(off[key], rel=1e-5, abs=1e-5), key


def test_batches_it_cannot_lay_out_run_unshared():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "completion_mask": torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]])}
    assert prefix.can_pack(batch)
    assert not prefix.can_pack({**batch, "token_type_ids": torch.zeros_like(ids)})  # Gemma's token types
    assert not prefix.can_pack({**batch, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])})  # left-padded
    assert not prefix.can_pack({k: v[:1] for k, v in batch.items()})  # not [chosen..., rejected...]
