"""--revision down the chain: an adapter trained on a Hub model at a revision records it (PEFT's adapter_config.json
`revision` field) and loads on that revision again; the identity of the model as loaded says the same commit.

The Hub is a Hugging Face cache made here, offline: one repo, org/base, whose `main` and `v1` are two snapshots
of the tiny model with different weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignkit.core.config import DPOSettings, ModelSettings
from alignkit.modeling import chain, identity, models, presets

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub(tiny_cache, tmp_path, monkeypatch):
    """org/base in an offline Hugging Face cache: main and v1 differ in the weights of the last norm."""
    import huggingface_hub.constants as constants
    from transformers import AutoModelForCausalLM

    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    repo = root / "models--org--base"
    shutil.copytree(presets.paths()["model"], repo / "snapshots" / MAIN)
    model = AutoModelForCausalLM.from_pretrained(repo / "snapshots" / MAIN)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(repo / "snapshots" / V1)
    for name in (repo / "snapshots" / MAIN).iterdir():  # the tokenizer files too
        if not (repo / "snapshots" / V1 / name.name).exists():
            shutil.copy(name, repo / "snapshots" / V1 / name.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    return repo


def norm(loaded) -> torch.Tensor:
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    return base.model.norm.weight.detach().clone()


def test_an_adapter_trained_on_a_revision_loads_on_that_revision_and_counts_by_its_commit(hub, tmp_path):
    s = DPOSettings(model_id="org/base", revision="v1", quantization="none", lora_r=4)
    loaded = models.load_model(s, for_training=True)
    on_v1 = norm(loaded)
    assert not torch.equal(on_v1, norm(models.load_model(ModelSettings(model_id="org/base", quantization="none"))))
    model = models.add_trainable_adapter(loaded, s)
    assert model.peft_config[models.TRAINABLE].revision == "v1"  # a checkpoint's adapter_config.json says it too
    first = tmp_path / "first"
    models.save_adapter(model, loaded.tokenizer, first, "org/base", revision="v1")
    assert json.loads((first / "adapter_config.json").read_text())["revision"] == "v1"

    # A second adapter over the first records its local base, no revision; the chain still ends at v1.
    s2 = DPOSettings(model_id=str(first), quantization="none", lora_r=4)
    loaded2 = models.load_model(s2, for_training=True)
    assert loaded2.base_revision == "v1" and torch.equal(norm(loaded2), on_v1)  # before: main's weights
    second = tmp_path / "second"
    models.save_adapter(models.add_trainable_adapter(loaded2, s2), loaded2.tokenizer, second, str(first), revision=None)
    assert json.loads((second / "adapter_config.json").read_text())["revision"] is None
    resolved = chain.resolve(str(second))
    assert (resolved.base, resolved.revision, resolved.adapters) == ("org/base", "v1", [str(first), str(second)])
    assert torch.equal(norm(models.load_model(ModelSettings(model_id=str(second), quantization="none"))), on_v1)
    from alignkit.modeling.merge import merge_adapters

    merged = merge_adapters(second, tmp_path / "merged", dtype="fp32")  # on v1's weights, as trained
    assert json.loads((merged / "merge.json").read_text())["base_revision"] == "v1"
    assert torch.equal(norm(models.load_model(ModelSettings(model_id=str(merged), quantization="none"))), on_v1)

    # The identity of the model as loaded names v1's commit, as the base on its own at --revision v1 does.
    assert identity.chain_identity(str(second))[-1]["commit"] == V1
    assert identity.chain_identity("org/base", "v1")[-1] == identity.chain_identity(str(second))[-1]
    assert identity.chain_identity("org/base")[-1]["commit"] == MAIN


def test_a_lota_delta_records_its_base_revision_and_an_old_adapter_without_one_loads_main(tmp_path):
    delta = tmp_path / "lota"
    delta.mkdir()
    (delta / chain.LOTA_CONFIG_FILE).write_text(json.dumps({"base_model_name_or_path": "org/base", "revision": "v2"}))
    (delta / chain.LOTA_DELTA_FILE).write_bytes(b"delta")
    over = tmp_path / "over"
    over.mkdir()
    (over / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(delta)}))
    resolved = chain.resolve(str(over))
    assert (resolved.base, resolved.revision, resolved.deltas, resolved.adapters) == ("org/base", "v2", [str(delta)],
                                                                                        [str(over)])
    # An adapter saved before revisions were recorded (or by PEFT without one) loads its base's default branch;
    # --revision is the revision of --model_id itself, a local folder here, so it does not reach the base.
    (over / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert chain.resolve(str(over), "v9").revision is None
    assert chain.resolve("org/other", "v9") == ("org/other", "v9", [], [], {"org/other": "v9"})


def test_evaluate_models_take_a_hub_revision_as_id_at_revision(hub):
    """evaluate.py mt_bench, pairwise and lm_eval name each model in --models, so a revision goes with its model
    (NAME=ID@REVISION); --revision and --gguf_file, which could name no model there, are not their flags."""
    from alignkit.core.args import ConfigError
    from alignkit.evals.evaluation import parse_command
    from alignkit.core.groups import loader_settings
    from alignkit.evals.named_models import parse_models

    _, s = parse_command(["pairwise", "--models", "main=org/base", "v1=org/base@v1", "--prompts_file", "p.jsonl",
                          "--judge_model", "rule", "--quantization", "none"])
    named = parse_models(s.models)
    on_v1, on_main = loader_settings(s, named["v1"]), loader_settings(s, named["main"])
    assert (on_v1.model_id, on_v1.revision, on_main.revision) == ("org/base", "v1", None)
    assert identity.chain_identity(on_v1.model_id, on_v1.revision)[-1]["commit"] == V1
    assert identity.identity_key(on_v1) != identity.identity_key(on_main)  # their answers are kept apart
    assert not torch.equal(norm(models.load_model(on_v1)), norm(models.load_model(on_main)))
    for flag, where in (("--gguf_file", "NAME=FOLDER/FILE.gguf"), ("--revision", "NAME=ID@REVISION")):
        for command in (["lm_eval", "--tasks", "t"], ["mt_bench", "--judge_model", "j"]):
            with pytest.raises(ConfigError, match=f"unknown setting: {flag} .*; .*in --models, as {where}"):
                parse_command([*command, "--models", "a=org/base", "b=org/base@v1", flag, "x"])


def test_offline_a_base_pinned_to_a_revision_needs_that_revision_cached_not_main(hub):
    """The offline check before loading asked the cache for main's files: a base pinned at v1, with only v1 in the
    cache, was refused as missing (and one with only main cached passed the check, then failed in transformers)."""
    from alignkit.core.errors import UserError

    shutil.rmtree(hub / "snapshots" / MAIN)
    (hub / "refs" / "main").unlink()
    models.check_model_source("org/base", revision="v1")
    with pytest.raises(UserError, match="holds no copy of it at revision main"):
        models.check_model_source("org/base", revision="main")
    with pytest.raises(UserError, match="holds no copy of it;"):
        models.check_model_source("org/base")


def test_the_check_before_evaluating_applies_revision_to_the_model_id_only(hub):
    """evaluate.py's check of every model before the first answers applied --revision to the reference model too
    (found by a review): offline, with the reference's main cached and the model's v1, a run that loads was refused."""
    from types import SimpleNamespace

    from alignkit.core.errors import UserError
    from alignkit.modeling.model_folders import check_model_sources

    shutil.copytree(hub, hub.parent / "models--org--ref")
    shutil.rmtree(hub.parent / "models--org--ref" / "snapshots" / V1)
    (hub.parent / "models--org--ref" / "refs" / "v1").unlink()
    s = SimpleNamespace(model_id="org/base", revision="v1", gguf_file=None)
    check_model_sources(s, ["org/base", "org/ref"])  # org/base at v1, org/ref at main: both cached
    with pytest.raises(UserError, match="org/ref is no local folder.* holds no copy of it at revision v1"):
        check_model_sources(s, ["org/ref@v1"])  # a revision named with the model is its own


def test_the_second_model_of_vibes_and_alpaca_eval_takes_a_revision_too(hub):
    from alignkit.evals.alpacaeval_outputs import outputs_key
    from alignkit.evals.evaluation import parse_command
    from alignkit.core.groups import loader_settings

    _, vibes = parse_command(["vibes", "--model_id", "org/base", "--compare_to", "org/base@v1", "--prompts", "hi"])
    assert (loader_settings(vibes, vibes.compare_to).revision, loader_settings(vibes, vibes.model_id).revision) == ("v1", None)
    _, alpaca = parse_command(["alpaca_eval", "--model_id", "org/base", "--revision", "v1",
                               "--reference_model", "org/base@main", "--judge_model", "rule"])
    assert loader_settings(alpaca, alpaca.model_id).revision == "v1"  # --revision stays the model_id's
    assert outputs_key(alpaca, alpaca.model_id, "transformers") != outputs_key(alpaca, "org/base@main", "transformers")
    assert outputs_key(alpaca, "org/base@v1", "transformers") == outputs_key(alpaca, alpaca.model_id, "transformers")


def test_the_card_and_merge_record_name_the_base_revision(tmp_path):
    from huggingface_hub import ModelCard

    from alignkit.core.card import model_card

    adapter = tmp_path / "dpo"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "revision": "v1"}))
    (adapter / "alignkit_config.json").write_text(json.dumps({"run_type": "dpo", "model_id": "org/base",
                                                              "revision": "v1"}))
    text = model_card(adapter)
    assert "[org/base](https://huggingface.co/org/base/tree/v1) at revision `v1`" in text
    assert ModelCard(text).data.base_model == "org/base"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "merge.json").write_text(json.dumps({"base_model": "org/base", "base_revision": "v1", "adapters": []}))
    assert "at revision `v1`" in model_card(merged)


V2 = "c" * 40
V2_TEMPLATE = "{% for m in messages %}v2 says {{ m['content'] }}{% endfor %}"


@pytest.fixture
def hub_adapter(hub):
    """org/adapter in the same cache: a LoRA adapter on org/base whose lora_B is 0 at main and 0.5 at v2, saved with
    its tokenizer, whose chat template at v2 is its own."""
    repo = hub.parent / "models--org--adapter"
    s = DPOSettings(model_id="org/base", quantization="none", lora_r=4)
    loaded = models.load_model(s, for_training=True)
    model = models.add_trainable_adapter(loaded, s)
    for commit, value in ((MAIN, 0.0), (V2, 0.5)):
        if commit == V2:
            loaded.tokenizer.chat_template = V2_TEMPLATE
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(value)
        models.save_adapter(model, loaded.tokenizer, repo / "snapshots" / commit, "org/base")
        # An adapter repo has no config.json: the Hub's 404, as huggingface_hub records it in the cache.
        (repo / ".no_exist" / commit).mkdir(parents=True)
        (repo / ".no_exist" / commit / "config.json").touch()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    return repo


def test_a_hub_adapter_at_a_revision_loads_that_revision_s_weights(hub_adapter):
    """--model_id org/adapter --revision v2: the adapter's config was read at v2, and its weights now are too (PEFT
    was asked for main's)."""
    def lora_b(settings) -> set[float]:
        peft = models.load_model(settings).model
        return {round(p.float().mean().item(), 4) for n, p in peft.named_parameters() if "lora_B" in n}

    assert lora_b(ModelSettings(model_id="org/adapter", revision="v2", quantization="none")) == {0.5}
    assert lora_b(ModelSettings(model_id="org/adapter", quantization="none")) == {0.0}
    assert identity.chain_identity("org/adapter", "v2")[0]["commit"] == V2
    # The tokenizer saved with a Hub adapter is the one it loads with (before: the base's, its template lost).
    template = models.load_model(ModelSettings(model_id="org/adapter", revision="v2", quantization="none")).tokenizer
    assert template.chat_template == V2_TEMPLATE
    assert models.load_tokenizer(presets.paths()["model"]).chat_template != V2_TEMPLATE


def test_offline_a_hub_adapter_whose_tokenizer_is_not_cached_says_so_once(hub_adapter, alignkit_log):
    """Offline, a Hub adapter whose tokenizer files are not in the cache loads with the tokenizer below it: one
    line says so (before: silently, so a custom chat template was lost without a word). A file the cache records
    as missing on the Hub (its .no_exist entry) is no surprise and says nothing."""
    v2 = ModelSettings(model_id="org/adapter", revision="v2", quantization="none")
    (hub_adapter / "snapshots" / V2 / "tokenizer_config.json").unlink()
    chain._say_unknown.cache_clear()
    for _ in range(2):
        assert chain.tokenizer_source(chain.resolve("org/adapter", "v2"), "org/base", None) == ("org/base", None)
    assert models.load_model(v2).tokenizer.chat_template != V2_TEMPLATE
    said = [r.getMessage() for r in alignkit_log.records if "does not say whether" in r.getMessage()]
    assert said == ["org/adapter at v2: offline (HF_HUB_OFFLINE=1), and the Hugging Face cache does not say whether "
                    "this adapter has its own tokenizer: the one below it in the chain is used, chat template "
                    "included; run once without HF_HUB_OFFLINE to fetch it"]
    alignkit_log.clear()
    chain._say_unknown.cache_clear()
    (hub_adapter / ".no_exist" / V2 / "tokenizer_config.json").touch()
    assert chain.tokenizer_source(chain.resolve("org/adapter", "v2"), "org/base", None) == ("org/base", None)
    assert not [r for r in alignkit_log.records if "does not say whether" in r.getMessage()]


def test_vllm_serves_a_hub_adapter_at_its_revision_on_the_base_at_its_own(hub_adapter, monkeypatch):
    """vLLM's LoRARequest takes a path and no revision: a Hub adapter at v2 goes as v2's snapshot folder; the base
    and its tokenizer at the revision the adapter records."""
    from fake_vllm import install

    from alignkit.modeling import generation

    fake = install(monkeypatch, cuda=True)
    config = hub_adapter / "snapshots" / V2 / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "revision": "v1"}))
    with generation.load_generator(ModelSettings(model_id="org/adapter", revision="v2"), "vllm") as generator:
        assert generator.lora.lora_path == str(hub_adapter / "snapshots" / V2)  # before: "org/adapter", main's
    (llm,) = fake.llms
    assert (llm.kwargs["model"], llm.kwargs["revision"]) == ("org/base", "v1")
    assert (llm.kwargs["tokenizer"], llm.kwargs["tokenizer_revision"]) == ("org/adapter", "v2")  # saved with it
    assert generator.template == V2_TEMPLATE
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8  # r=4, read from v2's config


def test_the_lota_merge_check_computes_its_expectation_on_the_base_at_its_revision(hub):
    """merge.py checks a LoTA merge against the base with the deltas unmerged: that base at the revision the delta
    records (before: the default branch, so the check compared against another model)."""
    from types import SimpleNamespace

    from alignkit.modeling.merge import lota_expected_logits

    s = ModelSettings(model_id="org/base", quantization="none")
    tok = models.load_tokenizer("org/base")
    batch = tok(["hello there"], return_tensors="pt")
    on = {rev: models.load_model(ModelSettings(model_id="org/base", revision=rev, quantization="none")).model(**batch)
          .logits.float() for rev in ("v1", None)}
    expected = lota_expected_logits(SimpleNamespace(base_id="org/base", base_revision="v1", deltas=[]), batch, s)
    assert torch.allclose(expected, on["v1"]) and not torch.allclose(expected, on[None])


def test_label_generators_take_a_revision_too(monkeypatch):
    """label.py's --model_a / --model_b: a generator named ID@REVISION loads, and keys its answers, at that
    revision; one named plainly takes --revision only when it is --model_id."""
    from types import SimpleNamespace

    from alignkit.core.config import LabelSettings
    from alignkit.feedback import labeling
    from alignkit.modeling import generation

    run = SimpleNamespace(settings=LabelSettings(model_id="org/base", revision="v3", dtype="fp32"), backend="transformers")
    monkeypatch.setattr(generation, "load_generator", lambda settings, backend: settings)
    monkeypatch.setattr(identity, "model_identity", lambda settings, backend: (settings.model_id, settings.revision))
    a, b = labeling._load_generator(run, "org/base@v1"), labeling._load_generator(run, "org/base")
    assert (a.model_id, a.revision, a.dtype) == ("org/base", "v1", "fp32") and b.revision == "v3"  # --revision: model_id's
    assert labeling._load_generator(run, "org/other").revision is None
    keyed = labeling._generator_identities(run, SimpleNamespace(kind="local", spec="org/base@v1", index=0))[0]
    assert keyed["loaded"] == ("org/base", "v1")


def test_every_loader_reads_id_at_revision_and_a_path_stays_a_path():
    """alignkit.core.groups.loader_settings is the one reading of ID@REVISION (evaluate.py's --models, vibes'
    --compare_to, alpaca_eval's --reference_model, label.py's generators, a judge model): the revision after the @
    wins over --revision, a second revision for the same model is refused, and a local path keeps its @."""
    from alignkit.core.args import ConfigError
    from alignkit.core.groups import loader_settings
    from alignkit.core.sources import split_revision

    s = ModelSettings(model_id="org/base", revision="v0", quantization="none")
    assert (loader_settings(s, "org/base@v1").revision, loader_settings(s, "org/base").revision) == ("v1", "v0")
    assert loader_settings(s, "org/judge@v2", revision=None).revision == "v2"  # a judge with no --judge_revision
    with pytest.raises(ConfigError, match="org/judge@v2 names revision v2, and revision v3 is set too"):
        loader_settings(s, "org/judge@v2", revision="v3")
    assert split_revision("./runs/dpo@v1") == ("./runs/dpo@v1", None)  # a path is a path
    # --model_id has its own --revision: the other form is refused with the two flags to write (it was passed to
    # the loader as a repo name, which failed far from the flag).
    with pytest.raises(ConfigError, match=r"^--model_id org/base@v1: write --model_id org/base --revision v1 "):
        DPOSettings(model_id="org/base@v1")
