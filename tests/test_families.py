"""Model families beyond the tiny Llama-style preset, where a script broke: Gemma-2 (no sdpa attention in
transformers), a mixture of experts that returns its router logits (generation), and LoTA on a mixture of experts.
Each model is a random two-layer model with the tiny preset's tokenizer, built in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alignkit.core.config import ModelSettings
from alignkit.core.errors import UserError
from alignkit.modeling import presets
from alignkit.modeling.generation import generate
from alignkit.modeling.models import load_model

from conftest import run_script

SHAPE = dict(vocab_size=561, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=4, eos_token_id=3,
             bos_token_id=None)


def build(folder, model_type: str, **config):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SHAPE, **config)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if Path(presets.paths()["model"], name).is_file():
            shutil.copy(Path(presets.paths()["model"], name), folder)
    return str(folder)


@pytest.fixture(scope="module")
def gemma2(tiny_cache, tmp_path_factory):
    return build(tmp_path_factory.mktemp("gemma2"), "gemma2", sliding_window=4, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def mixtral(tiny_cache, tmp_path_factory):
    return build(tmp_path_factory.mktemp("mixtral"), "mixtral", num_local_experts=4, num_experts_per_tok=2,
                 output_router_logits=True)


def test_auto_attention_loads_eager_where_the_model_class_has_no_sdpa(gemma2, alignkit_log):
    """auto picked sdpa on a CPU (and on a GPU without flash-attn), and transformers refused to build Gemma-2 with
    it: a traceback in every script. An explicit sdpa is refused in one line before the weights load."""
    loaded = load_model(ModelSettings(model_id=gemma2, quantization="none"))
    assert loaded.model.config._attn_implementation == "eager"
    assert "attention: eager (no CUDA device, so no flash attention; Gemma2ForCausalLM has no sdpa" in alignkit_log.text
    with pytest.raises(UserError, match="--attn_implementation sdpa: Gemma2ForCausalLM has no sdpa attention"):
        load_model(ModelSettings(model_id=gemma2, quantization="none", attn_implementation="sdpa"))
    assert load_model(ModelSettings(model_id=presets.paths()["model"], quantization="none")).model.config \
        ._attn_implementation == "sdpa"  # a model with sdpa keeps it


def test_a_mixture_of_experts_with_router_logits_generates_padded_batches(mixtral):
    """Mixtral configured with output_router_logits (for its training loss) computed that loss at every decoding
    step from the 2D padding mask, which the cached step's inputs do not fit: a crash on any padded batch (vibes,
    label.py, kto.py's rule check)."""
    loaded = load_model(ModelSettings(model_id=mixtral, quantization="none"))
    prompts = [[{"role": "user", "content": "name three fruits."}],
               [{"role": "user", "content": "which three instruments come to mind? please answer"}]]
    answers = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=4)
    assert len(answers) == 2 and loaded.model.config.output_router_logits is True  # restored for training


def test_rl_rollouts_on_a_mixture_of_experts_with_router_logits(mixtral, tmp_path):
    """rl.py's rollouts go through TRL's generate, not alignkit's: the same crash at the first step (found by an
    audit), while the MoE's router loss stays on for the training forward."""
    run = run_script("rl.py", "--preset", "tiny", "--model_id", mixtral, "--max_steps", "1", "--output_dir",
                     str(tmp_path))
    model = run["trainer"].accelerator.unwrap_model(run["trainer"].model)
    assert run["trainer"].state.global_step == 1 and model.config.output_router_logits is True


def test_lota_on_a_mixture_of_experts_is_refused_before_the_weights_load(mixtral, tmp_path, monkeypatch):
    """LoTA's deltas go on linear layers; transformers 5 keeps experts in 3D tensors, so all-linear adapted the
    attention alone (7.7% of a tiny Mixtral's weights) without a word."""
    import transformers

    def loading(*a, **k):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loading)
    with pytest.raises(UserError, match="--adapter lota on .*, a mixture of experts: .*Use LoRA"):
        run_script("dpo.py", "--preset", "tiny", "--model_id", mixtral, "--adapter", "lota", "--max_steps", "1",
                   "--output_dir", str(tmp_path))


def test_a_4bit_mixture_of_experts_says_its_fused_experts_stay_in_full_precision(mixtral, alignkit_log):
    """bitsandbytes quantizes linear layers; transformers keeps a mixture of experts' experts as fused 3-D tensors,
    which a 4-bit load left in full precision without a word (an audit: 72% of OLMoE's weights)."""
    loaded = load_model(ModelSettings(model_id=mixtral, quantization="4bit"))
    fused = [p for p in loaded.model.parameters() if p.dim() >= 3]
    assert fused and all(p.dtype == torch.float32 for p in fused)
    assert "4-bit: the experts' fused weights, " in alignkit_log.text
    assert "bitsandbytes quantizes linear layers only" in alignkit_log.text
    alignkit_log.clear()
    load_model(ModelSettings(model_id=presets.paths()["model"], quantization="4bit"))  # a dense model: nothing said
    from alignkit.modeling.experts import say_unquantized

    vision = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 8))  # 4-D, but no experts (a review)
    say_unquantized(vision)
    assert "experts' fused weights" not in alignkit_log.text


def test_reward_py_on_a_family_without_a_classification_head_is_refused_in_one_line(tiny_cache, tmp_path):
    """OLMoE has no AutoModelForSequenceClassification class in transformers 5: reward.py ended in a ValueError
    listing ~150 classes. One line names the family and what to use instead, before the weights load."""
    from alignkit.core.errors import ConfigError

    olmoe = build(tmp_path / "olmoe", "olmoe", num_experts=4, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match=r"^a reward model needs a sequence-classification head, and transformers "
                                          r"\S+ has none for olmoe models .*: train the reward model on another "
                                          r"family, or reward with a judge instead"):
        run_script("reward.py", "--preset", "tiny", "--model_id", olmoe, "--max_steps", "1", "--output_dir",
                   str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_reward_py_on_a_mixture_of_experts_adds_its_load_balancing_loss(mixtral, tmp_path):
    """transformers' sequence-classification head drops the router logits: reward.py trained a mixture of experts'
    router (LoRA targets it) with no load-balancing term, as sft/dpo/kto add it (an audit). The term is the one the
    family's causal LM computes, weighted by its router_aux_loss_coef, and logged as aux_loss."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.train.reward import _router_balance

    run = run_script("reward.py", "--preset", "tiny", "--model_id", mixtral, "--max_steps", "2", "--logging_steps",
                     "1", "--output_dir", str(tmp_path))
    logged = [entry for entry in run["trainer"].state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(entry["aux_loss"] > 0 for entry in logged)
    # The training loss holds the term: with it less without it is the coefficient times the term on that batch.
    trainer = run["trainer"]
    model, batch = trainer.model.eval(), next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        with_term = trainer.compute_loss(model, dict(batch))
        balance, trainer._balance = trainer._balance, None
        without = trainer.compute_loss(model, dict(batch))
        trainer._balance = balance
        term = balance(balance.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        output_router_logits=True).router_logits, batch["attention_mask"])
    assert (with_term - without).item() == pytest.approx(balance.coef * term.item(), rel=1e-4) and term.item() > 0
    torch.manual_seed(0)
    seq = AutoModelForSequenceClassification.from_pretrained(mixtral, num_labels=1)
    lm = AutoModelForCausalLM.from_pretrained(mixtral)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 4, 4, 4]])
    mask = (ids != 4).long()
    balance = _router_balance(seq)
    with torch.no_grad():
        ours = balance(balance.backbone(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits,
                       mask)
        theirs = lm(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6) and balance.coef == lm.config.router_aux_loss_coef
    seq.config.output_router_logits = False  # as public Mixtral configs say: the term is added all the same (as TRL's
    assert _router_balance(seq) is not None  # DPOTrainer decides it), not only where the config asks for the logits


def test_lora_says_where_it_leaves_a_mixture_of_experts_routed_experts(mixtral, tmp_path, alignkit_log):
    """PEFT targets the fused 3-D expert weights (target_parameters) for the families it knows: Mixtral's experts
    train, Qwen2-MoE's did not, without a word (the reward audit of session 30: the attention and the shared expert
    alone were adapted). One line says so where it happens, and only there."""
    from alignkit.core.config import DPOSettings
    from alignkit.modeling.models import add_trainable_adapter

    qwen_moe = build(tmp_path / "qwen2moe", "qwen2_moe", num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16, shared_expert_intermediate_size=16)
    # alignkit's default --lora_dropout 0.05 on a family whose experts PEFT adapts ended in PEFT's ValueError after
    # the weights loaded ("ParamWrapper does not work with lora_dropout != 0"): refused before, with the fix.
    olmoe = build(tmp_path / "olmoe", "olmoe", num_experts=4, num_experts_per_tok=2)
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained
    transformers.AutoModelForCausalLM.from_pretrained = None  # refused before the weights load: never reached
    try:
        for model_id, family in ((mixtral, "mixtral"), (olmoe, "olmoe")):
            for given, said in (({}, "--lora_dropout 0.05"), ({"lora_dropout": 0.0, "use_dora": True}, "--use_dora true"),
                                ({"lora_target_modules": ["mlp.gate"]}, "--lora_dropout 0.05")):
                with pytest.raises(UserError, match=rf"^{said} on \S+ \({family}, a mixture of experts\): PEFT adapts "
                                                    r"its fused experts and its router as parameters, which take no "
                                                    r"LoRA dropout nor DoRA; (pass --lora_dropout 0|drop --use_dora)"):
                    load_model(DPOSettings(model_id=model_id, quantization="none", **given), for_training=True)
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = real
    s = DPOSettings(model_id=mixtral, quantization="none", lora_target_modules=["q_proj", "v_proj"])
    add_trainable_adapter(load_model(s, for_training=True), s)  # the experts left out: dropout is fine
    assert "LoRA adapts none of the routed experts (" in alignkit_log.text  # ... and said, as the user's choice
    assert "--lora_target_modules names none of their layers" in alignkit_log.text
    import warnings

    for model_id, said in ((mixtral, False), (qwen_moe, True)):
        alignkit_log.clear()
        s = DPOSettings(model_id=model_id, quantization="none", lora_dropout=0.0)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")  # the loader's own filters go in front of this one
            model = add_trainable_adapter(load_model(s, for_training=True), s)
        # PEFT said its own fused gate_up_proj patterns "did not match ... and were ignored", twice a load, though
        # they apply (the reward audit of session 30): kept out of the log.
        assert not [w for w in warned if "pattern keys did not match" in str(w.message)]
        trained = model.peft_config["default"] if "default" in model.peft_config else next(iter(model.peft_config.values()))
        # PEFT's own choice, as the line reports it. Qwen2-MoE's experts are not adapted in a fresh process, but
        # PEFT's conversion table can learn the family from a load earlier in the same process (an xdist worker
        # that ran other files first: CI of session 38): the line follows PEFT's choice either way.
        said = said and not trained.target_parameters
        assert bool(trained.target_parameters) != said
        assert ("LoRA adapts none of the routed experts" in alignkit_log.text) == said
        if said:
            assert "PEFT does not adapt this family's fused 3-D expert weights" in alignkit_log.text
        assert trained.target_parameters is None or isinstance(trained.target_parameters, list)  # saved in one order
