"""Prefix sharing for DPO (alignkit.train.prefix): the packed pass gives the unshared pass's log-probs, loss and
gradients (to 1e-5 in fp32, on the tiny model), in the policy and the reference pass, with sdpa and eager
attention; the packed batch is shorter; it is off, with one log line, where no custom mask can be passed.
Every architecture family transformers ships with a sliding window (tiny random configs, window 4, shorter than
the sequences) gives the unshared log-probs packed, through the sdpa/eager mask and through FlexAttention; the
reference cache keys on packed vs unshared.

The batches mix prompt lengths and answer lengths, and one pair is cut by max_length inside its answer, so
every branch of the layout (shared prefix, each answer's copy of the last prompt token, padding) is used.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from alignkit.train import prefix


def _trainer(tmp_path, attn="sdpa", sharing=True, loss_type="sigmoid", family=None, **overrides):
    """The tiny preset's model (or a tiny random model of `family`, FAMILIES below, on the preset's vocabulary)
    with a random LoRA adapter, in AlignDPOTrainer, and its first batch."""
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
    if family is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    else:
        model = _tiny_model(family, attn, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
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
    off_path = prefix.SharingPath(prefix.OFF, "attention implementation flash_attention_2 ...")
    monkeypatch.setattr(prefix, "sharing_path", lambda *a, **k: off_path)
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


# --- Sliding windows and per-layer-type masks, over the architecture families (tiny random configs) ---------------

WINDOW = 4  # shorter than every sequence below (prompts of 11 and 3 tokens, answers up to 9)
MIXED = ["sliding_attention", "full_attention"]  # two layers: one of each type
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
# model_type -> (config overrides, attention implementation). Every family in transformers whose decoder takes a
# sliding window and builds on a CPU in eval mode; eager where the family has no sdpa (softcapping, sinks).
FAMILIES = {
    "llama": ({}, "sdpa"),  # no window: the plain causal layout
    "mistral": (dict(sliding_window=WINDOW), "sdpa"),  # one windowed mask for every layer (Mistral-v0.1)
    "ministral3": (dict(sliding_window=WINDOW), "sdpa"),
    "phi3": (dict(sliding_window=WINDOW), "sdpa"),  # Phi-3-mini-4k
    "starcoder2": (dict(sliding_window=WINDOW), "sdpa"),
    "mixtral": (dict(sliding_window=WINDOW, **MOE), "sdpa"),  # MoE
    "qwen2": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), "sdpa"),
    "qwen3": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), "sdpa"),
    "qwen2_moe": (dict(use_sliding_window=True, sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32), "sdpa"),  # MoE
    "gemma2": (dict(sliding_window=WINDOW, layer_types=MIXED), "eager"),
    "gemma3_text": (dict(sliding_window=WINDOW, layer_types=MIXED), "sdpa"),
    "vaultgemma": (dict(sliding_window=WINDOW, layer_types=MIXED), "eager"),
    "cohere2": (dict(sliding_window=WINDOW, layer_types=MIXED), "sdpa"),
    "ministral": (dict(sliding_window=WINDOW, layer_types=MIXED), "sdpa"),
    "olmo3": (dict(sliding_window=WINDOW, layer_types=MIXED), "sdpa"),
    "exaone4": (dict(sliding_window=WINDOW, layer_types=MIXED), "sdpa"),
    "smollm3": (dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=MIXED), "sdpa"),
    "cwm": (dict(sliding_window=WINDOW, layer_types=MIXED), "sdpa"),
    "gpt_oss": (dict(sliding_window=WINDOW, layer_types=MIXED, **MOE), "eager"),  # MoE, attention sinks
}


def _tiny_model(model_type, attn=None, **shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides, default_attn = FAMILIES[model_type]
    config = AutoConfig.for_model(model_type, **{**TINY, **shape}, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn or default_attn, dtype=torch.float32)
    return model.eval()


def _pairs():
    """Two pairs in TRL's layout: prompts of 11 and 3 tokens, answers of 2 to 9, right-padded."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for p, c, r in ((11, 5, 8), (3, 9, 2)):
        prompt, chosen, rejected = (torch.randint(3, 64, (n,), generator=g) for n in (p, c, r))
        rejected[0] = 3 + (chosen[0] - 3 + 1) % 61  # the answers part at their first token
        rows.append((prompt, chosen, rejected))
    seqs = [(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows]
    T = max(len(p) + len(a) for p, a in seqs)
    ids, mask, completion = (torch.zeros(len(seqs), T, dtype=torch.long) for _ in range(3))
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.cat([p, a])
        mask[i, : len(p) + len(a)] = 1
        completion[i, len(p) : len(p) + len(a)] = 1
    return ids, mask, completion


def _token_logps(logits, labels):
    logps = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(labels == prefix.IGNORE, 0)


@torch.no_grad()
def _unshared_and_packed(model, attn, config):
    """Per-token answer log-probs (2B, T - 1) of the unshared batch, and of the packed one built with `config`'s
    windows (None: none), run under `attn`."""
    ids, mask, completion = _pairs()
    labels = ids[:, 1:].masked_fill(completion[:, 1:] == 0, prefix.IGNORE)
    unshared = _token_logps(model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels)
    if attn != model.config._attn_implementation:
        model.set_attn_implementation(attn)
    packed = prefix.pack_pairs(ids, mask, completion, attn_implementation=attn, config=config)
    logits = model(**packed.model_inputs()).logits
    return unshared, packed.unpack(_token_logps(logits, packed.shift_labels)), packed


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_packed_logps_equal_unshared_in_every_sliding_window_family(model_type):
    model = _tiny_model(model_type)
    attn = model.config._attn_implementation
    unshared, packed, layout = _unshared_and_packed(model, attn, model.config)
    torch.testing.assert_close(packed, unshared, atol=1e-5, rtol=1e-5)
    windows = prefix.layer_windows(model.config)
    if any(windows.values()):
        # The test can tell: without the window in the mask (the code before), the log-probs differ.
        _, windowless, _ = _unshared_and_packed(model, attn, None)
        assert (windowless - unshared).abs().max() > 1e-3
    if len(set(windows.values())) > 1:  # full and sliding layers: one mask each, which the forward took
        assert set(layout.attention_mask) == {"full_attention", "sliding_attention"}
        path = prefix.sharing_path(model.config, model_class=type(model))  # MoE families are off for their aux loss
        assert path.kind == prefix.SDPA_MASK or "mixture-of-experts" in path.reason


def test_the_window_counts_original_positions_not_packed_indices():
    ids, mask, completion = _pairs()
    config = _tiny_model("mistral").config
    packed = prefix.pack_pairs(ids, mask, completion, config=config)
    allowed, positions, segment = packed.attention_mask[0, 0], packed.position_ids[0], packed.segment[0]
    first_rejected = int((segment == 2).nonzero()[0])
    # The rejected answer's first token (position 10) sees prompt positions 7..10 (its copy of the last prompt
    # token and the three before it), though the packed distance to them is larger.
    seen = allowed[first_rejected].nonzero().flatten()
    assert sorted(positions[seen].tolist()) == [7, 8, 9, 10]
    assert all(int(segment[k]) != 1 for k in seen)


def test_sharing_path_names_the_kernel_or_says_why_not():
    from types import SimpleNamespace

    from transformers import AutoConfig, LlamaForCausalLM

    mistral = _tiny_model("mistral").config
    assert prefix.sharing_path(mistral, "sdpa").kind == prefix.SDPA_MASK
    assert "sliding window 4" in prefix.sharing_path(mistral, "sdpa").reason
    assert prefix.sharing_path(mistral, "eager").kind == prefix.SDPA_MASK
    assert prefix.sharing_path(mistral, "flex_attention").kind == prefix.FLEX
    flash = prefix.sharing_path(mistral, "flash_attention_2")
    assert flash.kind == prefix.OFF and "flash_attention_2" in flash.reason
    assert "mixture-of-experts" in prefix.sharing_path(_tiny_model("mixtral").config, "sdpa").reason
    # DBRX keeps its experts per token in ffn_config (moe_top_k), and its router logits off by default: it was
    # shared, and TRL's --router_aux_loss_coef then read a 2D mask beside the packed 4D one.
    assert "mixture-of-experts" in prefix.sharing_path(AutoConfig.for_model("dbrx"), "sdpa").reason
    assert prefix._experts(SimpleNamespace(ffn_config={"moe_top_k": 2}))  # as a dict, read from JSON
    assert not prefix._experts(SimpleNamespace(num_experts=1, ffn_config=None))  # one expert: dense
    # Layer types the layout does not know (MiniMax's linear attention) are off, not guessed at.
    minimax = AutoConfig.for_model("minimax", **TINY, sliding_window=WINDOW)
    assert "linear_attention" in prefix.layer_windows(minimax)
    dense_minimax = SimpleNamespace(layer_types=minimax.layer_types, sliding_window=WINDOW)  # past the MoE rule
    assert "linear_attention" in prefix.sharing_path(dense_minimax, "sdpa").reason
    # Mixed full and sliding layers need a forward that takes a mask per layer type; Llama's does not.
    qwen2 = _tiny_model("qwen2").config
    assert prefix.sharing_path(qwen2, "sdpa").kind == prefix.SDPA_MASK  # found from the config's model type
    off = prefix.sharing_path(qwen2, "sdpa", model_class=LlamaForCausalLM)
    assert off.kind == prefix.OFF and "per layer type" in off.reason


def test_the_trainer_logs_the_path_it_chose(tiny_cache, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="alignkit"):
        trainer, _ = _trainer(tmp_path)
    lines = [r.getMessage() for r in caplog.records if "prefix sharing" in r.getMessage()]
    assert trainer.prefix_sharing and lines == ["prefix sharing: sdpa-mask (sdpa with a custom 4D mask (exact; sdpa "
                                                "cannot use its flash kernel with it))"]


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # plain causal; full + sliding layers (a dict of masks)
def test_flex_attention_block_mask_gives_the_unshared_logps(model_type, static_flex):
    """FlexAttention's forward runs on a CPU (compiled by transformers; its backward does not): the packed pass
    with the BlockMask equals the unshared sdpa/eager pass."""
    from torch.nn.attention.flex_attention import BlockMask

    model = _tiny_model(model_type)
    assert prefix.sharing_path(model.config, "flex_attention", model_class=type(model)).kind == prefix.FLEX
    unshared, packed, layout = _unshared_and_packed(model, "flex_attention", model.config)
    masks = layout.attention_mask.values() if isinstance(layout.attention_mask, dict) else [layout.attention_mask]
    assert all(isinstance(m, BlockMask) for m in masks)
    # Padded to a whole FlexAttention block (the pairs pack into 25 tokens), and the log-probs are the same.
    assert layout.input_ids.shape[1] == prefix.FLEX_BLOCK and int((layout.segment >= 0).sum(dim=1).max()) == 25
    torch.testing.assert_close(packed, unshared, atol=1e-5, rtol=1e-5)


@pytest.fixture
def flex_check(static_flex):
    """alignkit.train.flex_check with its per-process memo cleared before and after (tests swap the kernel)."""
    from alignkit.train import flex_check

    flex_check._check.cache_clear()
    yield flex_check
    flex_check._check.cache_clear()


def test_the_flex_check_compares_the_kernel_with_plain_attention(flex_check, monkeypatch):
    """The check auto makes before it loads flex_attention (forward only here: a CPU has no FlexAttention
    backward). The real kernel passes: a sliding window shorter than the packed pairs, grouped key-value heads,
    an odd head count (transformers repeats the key-value heads), Gemma-2's logit softcap. A kernel that ignores
    the mask fails it, and so does one that does not compile, with the error in the reason."""
    import transformers.integrations.flex_attention as integration
    from transformers import Gemma2Config, MistralConfig

    mistral = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=50)
    gemma2 = Gemma2Config(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                          sliding_window=50, attn_logit_softcapping=30.0)
    assert flex_check._packed_layout(50, "cpu").segment.shape[1] == 256 > 2 * 50  # the window matters here
    for config, dtype, within in ((mistral, torch.float32, 1e-5), (mistral, torch.bfloat16, 2e-2),
                                  (gemma2, torch.float32, 1e-5)):
        ok, why = flex_check.check(config, dtype, "cpu", backward=False)
        assert ok and why.startswith("its kernel passed a forward check on this device"), why
        assert float(why.rsplit(" ", 1)[1].rstrip(")")) < within
    assert "head size 16, 3 query / 1 key-value heads, float32" in why

    real = integration.flex_attention_forward
    flex_check._check.cache_clear()
    monkeypatch.setattr(integration, "flex_attention_forward", lambda m, q, k, v, mask, **kw: real(m, q, k, v, None,
                                                                                                   **kw))
    ok, why = flex_check.check(mistral, torch.float32, "cpu", backward=False)
    assert not ok and why.startswith("FlexAttention disagrees with plain attention (head size 16, 4 query / 2 "
                                     "key-value heads, float32): output off by"), why

    def does_not_compile(*args, **kwargs):
        raise RuntimeError("No valid triton configs. OutOfMemoryError: out of resource: triton_flex_attention_"
                           "backward Required: 114688 Hardware limit:101376\nReducing block sizes may help.")

    flex_check._check.cache_clear()
    monkeypatch.setattr(integration, "flex_attention_forward", does_not_compile)
    assert flex_check.check(mistral, torch.bfloat16, "cpu", backward=False) == (
        False, "FlexAttention failed its check (head size 16, 4 query / 2 key-value heads, bfloat16): RuntimeError: "
               "No valid triton configs. OutOfMemoryError: out of resource: triton_flex_attention_backward Required: "
               "114688 Hardware limit:101376")


def test_flex_lengths_are_whole_blocks_in_few_buckets():
    lengths = {n: prefix.flex_length(n) for n in range(1, 4097)}
    assert all(b % prefix.FLEX_BLOCK == 0 and b >= n for n, b in lengths.items())
    assert all(b - n < prefix.FLEX_BLOCK for n, b in lengths.items() if n <= 1024)  # whole blocks up to 1024
    assert all(b - n < n / 4 for n, b in lengths.items() if n > 1024)  # then under 25% padding
    assert len({b for n, b in lengths.items() if n <= 2048}) == 12 and len(set(lengths.values())) == 16
    assert [prefix.flex_length(n) for n in (1025, 1281, 2049, 2561)] == [1280, 1536, 2560, 3072]


def test_the_flex_path_packs_many_batches_into_few_shapes():
    """Random batches of TRL's layout (prompts up to 600 tokens, answers up to 500, so packed rows up to ~1600):
    the flex path's packed lengths are at most the buckets' count (11 up to 1792 tokens), where the exact lengths
    the sdpa path keeps are nearly all different; and what a pair packs into is the same either way."""
    g = torch.Generator().manual_seed(0)
    flex_shapes, exact_shapes = set(), set()
    for _ in range(40):
        B = 2
        prompt = torch.randint(1, 600, (B,), generator=g).repeat(2)
        answer = torch.randint(1, 500, (2 * B,), generator=g)
        lengths = prompt + answer
        T = int(lengths.max())
        t = torch.arange(T).unsqueeze(0)
        mask = (t < lengths.unsqueeze(1)).long()
        completion = ((t >= prompt.unsqueeze(1)) & (t < lengths.unsqueeze(1))).long()
        shared = torch.randint(3, 64, (1, T), generator=g).expand(2 * B, T)  # the prompt tokens, the same in every row
        ids = torch.where(completion.bool(), torch.randint(3, 64, (2 * B, T), generator=g), shared) * mask
        exact = prefix.pack_pairs(ids, mask, completion, attn_implementation="sdpa")
        flex = prefix.pack_pairs(ids, mask, completion, attn_implementation="flex_attention")
        flex_shapes.add(tuple(flex.input_ids.shape))
        exact_shapes.add(tuple(exact.input_ids.shape))
        L = exact.input_ids.shape[1]
        assert flex.input_ids.shape[1] == prefix.flex_length(L)
        assert torch.equal(flex.input_ids[:, :L], exact.input_ids) and (flex.segment[:, L:] == -1).all()
        assert (flex.shift_labels[:, L:] == prefix.IGNORE).all() and torch.equal(flex.index, exact.index)
    assert len(flex_shapes) <= len({prefix.flex_length(n) for n in range(1, 1793)}) == 11
    assert len(exact_shapes) > 30


def test_the_reference_cache_keys_on_packed_or_unshared(tiny_cache, tmp_path):
    from alignkit.train import refcache

    trainer, _ = _trainer(tmp_path)
    assert refcache.computed_as(trainer) == "packed:sdpa-mask"
    packed_key = refcache.cache_key(trainer, trainer.train_dataset)
    trainer.prefix_sharing = False
    assert refcache.computed_as(trainer) == "unshared"
    assert refcache.cache_key(trainer, trainer.train_dataset) != packed_key


def test_auto_prefers_flex_only_where_it_trains_and_sharing_applies(monkeypatch):
    import transformers.utils
    from transformers import AutoModelForCausalLM

    mistral = _tiny_model("mistral")
    assert prefix.flex_preferred(mistral.config, "cuda", type(mistral))[0]
    assert prefix.flex_preferred(mistral.config, "cuda")[0]  # the class found from the config
    cpu = prefix.flex_preferred(mistral.config, "cpu", type(mistral))
    assert not cpu[0] and "no backward" in cpu[1]
    moe = prefix.flex_preferred(_tiny_model("mixtral").config, "cuda")
    assert not moe[0] and "mixture-of-experts" in moe[1]
    no_flex = type("NoFlex", (AutoModelForCausalLM,), {"_supports_flex_attn": False})
    assert not prefix.flex_preferred(mistral.config, "cuda", no_flex)[0]
    with monkeypatch.context() as m:  # torch < 2.5: transformers has no flex_attention to run
        m.setattr(transformers.utils, "is_torch_flex_attn_available", lambda: False)
        old_torch = prefix.flex_preferred(mistral.config, "cuda", type(mistral))
        assert not old_torch[0] and "torch >= 2.5" in old_torch[1]
    mistral.config.attention_dropout = 0.1
    assert "dropout" in prefix.flex_preferred(mistral.config, "cuda", type(mistral))[1]


def test_the_trainer_packs_with_a_block_mask_under_flex_attention(tiny_cache, tmp_path, static_flex):
    """The trainer's own reference pass (no gradient, so it runs on a CPU) under flex_attention: packed with the
    BlockMask, the same log-probs as unshared."""
    from torch.nn.attention.flex_attention import BlockMask

    trainer, batch = _trainer(tmp_path, attn="flex_attention")
    assert trainer.prefix_sharing
    masks = []
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **k: masks.append(k.get("attention_mask")) or forward(*a, **k)
    trainer.model.eval()
    on = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    trainer.prefix_sharing = False
    off = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    assert isinstance(masks[0], BlockMask) and masks[1].dim() == 2
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])  # one windowed mask; full + sliding layers (a dict)
def test_the_trainer_keeps_the_window_in_logps_loss_and_gradients(tiny_cache, tmp_path, family):
    """Through AlignDPOTrainer (the reference pass, the policy pass and its backward) on a model whose window
    (4) is shorter than the pairs (up to 48 tokens): the same reference log-probs, loss and LoRA gradients packed
    and unshared."""
    trainer, batch = _trainer(tmp_path, family=family)
    assert trainer.prefix_sharing and prefix.can_pack(batch) and batch["attention_mask"].sum(dim=1).max() > WINDOW
    ref_on, logps_on, loss_on, grads_on = _run(trainer, batch, True)
    ref_off, logps_off, loss_off, grads_off = _run(trainer, batch, False)
    torch.testing.assert_close(ref_on, ref_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps_on, logps_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=1e-5)
    assert len(grads_off) > 0 and all(g.abs().sum() > 0 for g in grads_off.values())
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-4, msg=name)
