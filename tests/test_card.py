"""The model card (alignkit.core.card): huggingface_hub's own parser reads it back, license, model-index and all."""

from __future__ import annotations

import json
import types
from importlib import metadata

import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from alignkit.core.card import EVALS_FILE, model_card, record_evaluation

LLAMA_CARD = "---\nlicense: llama3.1\nlicense_link: https://llama.com/llama3_1/license\n---\n# Llama\n"


def write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


@pytest.fixture
def merged_dpo(tmp_path, monkeypatch):
    """A merged cDPO run of a QLoRA adapter on a local Llama base whose own card names its license; a secret
    from the environment that slipped into a setting."""
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtokenForTests123456")
    base = write(tmp_path / "llama", config__json={"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                 README__md=LLAMA_CARD)
    settings = {"run_type": "dpo", "model_id": str(base), "dataset_id": "me/prefs", "loss_type": ["sigmoid"],
                "label_smoothing": 0.1, "quantization": "4bit", "adapter": "lora", "dpo_beta": 0.1,
                "wandb_project": "hf_FAKEtokenForTests123456"}
    folder = write(tmp_path / "run" / "merged", alignkit_config__json=settings,
                   metrics__json={"eval_rewards/accuracies": 0.875, "global_step": 30},
                   merge__json={"base_model": str(base), "adapters": [str(tmp_path / "run")], "dtype": "bfloat16",
                                "kind": "causal language model", "max_logit_difference": 1e-6},
                   config__json={"architectures": ["LlamaForCausalLM"]})
    return folder


def test_the_card_names_the_split_the_held_out_accuracy_was_measured_on(merged_dpo):
    """A run that evaluated on a split of its own (a TRL line's dataset_test_split auto resolved to test_prefs) named
    its model-index split "held-out", and its settings table said only `auto`."""
    config = merged_dpo / "alignkit_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "dataset_test_split": "auto",
                                  "held_out": {"split": "test_prefs", "rows": 200}}))
    text = model_card(merged_dpo, "me/llama-dpo")
    _, results = model_index_to_eval_results(ModelCard(text).data.to_dict()["model-index"])
    assert [(r.dataset_split, r.metric_value) for r in results] == [("test_prefs", 0.875)]
    assert "| held-out rows | 200 (split test_prefs) |" in text
    config.write_text(json.dumps({**settings, "eval_split": 0.1, "dataset_test_split": "test_prefs",
                                  "held_out": {"split": "test_prefs", "rows": 200}}))
    assert "| eval_split |" not in model_card(merged_dpo)  # the share it did not hold out (the own-data audit)
    config.write_text(json.dumps({**settings, "eval_split": 0.1, "held_out": {"share": 0.1, "of": "train", "rows": 9}}))
    assert "| eval_split | `0.1` |" in (text := model_card(merged_dpo)) and "9 (a 0.1 share of train)" in text
    for held, said in (({"share": 200, "of": None, "rows": 200}, "200 (rows held out of the training rows)"),
                       ({"mixture": "test rows", "rows": 3, "of_rows": 8}, "3 (of the 8 dataset_mixture's test rows)"),
                       ({"split": "test", "rows": 3, "of_rows": 8}, "3 (of the 8 rows of split test)")):
        config.write_text(json.dumps({**settings, "held_out": held}))
        text = model_card(merged_dpo)
        assert f"| held-out rows | {said} |" in text, held
        _, results = model_index_to_eval_results(ModelCard(text).data.to_dict()["model-index"])
        assert [r.dataset_split for r in results] == ["held-out"]  # some rows of a split are not the split
    config.write_text(json.dumps(settings))  # a run recorded before held_out: as ever
    _, results = model_index_to_eval_results(ModelCard(model_card(merged_dpo)).data.to_dict()["model-index"])
    assert [r.dataset_split for r in results] == ["held-out"]


def test_card_parses_with_license_model_index_and_metadata(merged_dpo):
    evaluation = __import__("alignkit.evals.evaluation", fromlist=["Pairwise"])
    pairs = [{"model": "dpo", "opponent": "sft", "judge": "gpt-4",
              "overall": {"adjusted_win_rate": 0.6125}}]
    # What evaluate.py mt_bench records for a local model folder it judged.
    evaluation.Pairwise.record(types.SimpleNamespace(command="mt_bench", models={"dpo": str(merged_dpo)}), pairs)
    assert json.loads((merged_dpo / EVALS_FILE).read_text())["mt_bench vs sft"]["value"] == 0.6125

    text = model_card(merged_dpo, "me/llama-dpo")
    card = ModelCard(text)  # the Hub's parser: a bad model-index or YAML raises here
    data = card.data
    assert data.license == "llama3.1" and data.license_link == "https://llama.com/llama3_1/license"
    assert data.pipeline_tag == "text-generation" and data.library_name == "transformers"
    assert data.datasets == ["me/prefs"] and data.base_model is None  # a local base: described, never its path
    assert {"alignkit", "trl", "lora", "dpo", "cdpo", "qlora"} <= set(data.tags) and "ipo" not in data.tags
    # The model-index round trip through huggingface_hub's own converters.
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "llama-dpo"
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    assert got == {("me/prefs", "accuracy"): 0.875, ("mt_bench", "win_rate"): 0.6125}
    assert model_index_to_eval_results(eval_results_to_model_index(name, results))[1] == results
    ModelCardData(**data.to_dict())  # and the metadata builds a card data object again
    # The text: the load snippet in the saved dtype on every device, versions, citations, no secrets or paths.
    assert 'AutoModelForCausalLM.from_pretrained("me/llama-dpo", dtype=torch.bfloat16, device_map="auto")' in text
    assert f"- transformers {metadata.version('transformers')}" in text and f"- trl {metadata.version('trl')}" in text
    for key in ("rafailov2023direct", "mitchell2023note", "dettmers2023qlora", "hu2021lora", "zheng2023judging"):
        assert key in text
    assert "azar2023general" not in text and "panda2024lottery" not in text
    assert "hf_FAKEtokenForTests123456" not in text and str(merged_dpo.parent.parent) not in text
    assert "inherited from the base model's card" in text


def test_a_run_s_merge_is_named_after_its_run_not_its_folder(merged_dpo, tmp_path):
    """Found by the merge audit: the merge in a run's merged/ folder (merge.py's default) had the title and
    model-index name `merged`, every run's merge the same. Its run's name now; a pushed repo's id, and a merge
    written anywhere else, keep their own."""
    card = model_card(merged_dpo)
    assert card.split("---\n", 2)[2].lstrip().startswith("# run-merged\n")
    name, _ = model_index_to_eval_results(ModelCard(card).data.to_dict()["model-index"])
    assert name == "run-merged" and 'from_pretrained("path/to/run-merged"' in card
    assert ModelCard(model_card(merged_dpo, "me/llama-dpo")).data.to_dict()["model-index"][0]["name"] == "llama-dpo"
    import shutil

    elsewhere = shutil.copytree(merged_dpo, tmp_path / "my-model")  # --output_dir my-model: named as given
    assert model_card(elsewhere).split("---\n", 2)[2].lstrip().startswith("# my-model\n")


def test_license_from_the_hub_cache_and_unknown_without_a_card(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--me--gemma" / "snapshots" / "abc123"
    write(snapshot, README__md="---\nlicense: gemma\n---\n")
    write(cache / "models--me--gemma" / "refs", main="abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    reward = write(tmp_path / "rm", alignkit_config__json={"run_type": "reward", "model_id": "me/gemma",
                                                           "dataset_id": "prefs.jsonl"},
                   metrics__json={"held_out_accuracy": 0.9, "eval_accuracy": 0.85},
                   merge__json={"base_model": "me/gemma", "adapters": [], "dtype": "float16", "kind": "reward model"})
    data = ModelCard(model_card(reward, "me/rm")).data
    assert data.license == "gemma" and data.base_model == "me/gemma" and data.pipeline_tag == "text-classification"
    assert data.datasets is None  # a local data file is no Hub dataset
    (result,) = data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == ("text-classification", "accuracy", 0.9)

    bare = write(tmp_path / "bare", alignkit_config__json={"run_type": "sft", "model_id": "me/nocard"})
    text = model_card(bare)
    assert ModelCard(text).data.license == "unknown" and "Set `license:`" in text
    assert ModelCard(text).data.eval_results is None


def test_evaluations_are_recorded_only_in_local_model_folders(tmp_path):
    record_evaluation("me/hub-model", "x", {"value": 1.0})  # a Hub id: nothing to write, no error
    plain = tmp_path / "not-a-model"
    plain.mkdir()
    record_evaluation(plain, "x", {"value": 1.0})
    assert not (plain / EVALS_FILE).exists()
    from alignkit.modeling.identity import chain_identity

    model = write(tmp_path / "m", config__json={})
    before = chain_identity(str(model))
    record_evaluation(model, "alpaca_eval win_rate vs gpt4", {"value": 55.0})
    # Still the same model: its cached MT-Bench answers stay valid (the answers key holds the model's identity).
    assert chain_identity(str(model)) == before
    record_evaluation(model, "mt_bench vs base", {"value": 0.5})
    assert set(json.loads((model / EVALS_FILE).read_text())) == {"alpaca_eval win_rate vs gpt4", "mt_bench vs base"}


def test_evaluations_recorded_at_once_in_one_folder_are_all_kept(tmp_path, monkeypatch):
    """Two evaluate.py runs recording into one model folder at the same time each read the results, added theirs and
    wrote: the later write dropped the other's result. The read is slowed here so that the two always overlap."""
    import threading
    import time

    from alignkit.core import card

    model = write(tmp_path / "m", config__json={})
    read = card._read_json

    def slow_read(path):
        found = read(path)
        time.sleep(0.3)
        return found

    monkeypatch.setattr(card, "_read_json", slow_read)
    threads = [threading.Thread(target=record_evaluation, args=(model, f"eval {i}", {"value": float(i)}))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert json.loads((model / EVALS_FILE).read_text()) == {"eval 0": {"value": 0.0}, "eval 1": {"value": 1.0}}


def test_a_result_recorded_after_a_push_keeps_the_repo_id_in_the_folder_s_card(tmp_path):
    """The card a push writes loads the model from its Hub repo; evaluate.py recording a result rewrote it to load
    from "path/to/NAME", and the folder pushed again later would have carried that card."""
    from alignkit.core.card import model_card

    model = write(tmp_path / "m", config__json={})
    (model / "README.md").write_text(model_card(model, "someone/m-dpo"))
    record_evaluation(model, "mt-bench", {"value": 7.5})
    text = (model / "README.md").read_text()
    assert "someone/m-dpo" in text and "path/to/" not in text and "7.5" in text
    (model / "README.md").write_text(model_card(model))  # a folder never pushed keeps its own card's words
    record_evaluation(model, "alpacaeval", {"value": 0.5})
    assert "path/to/m" in (model / "README.md").read_text()


def test_eval_result_needs_what_the_hub_requires():
    # The Hub's validation refuses an EvalResult without a dataset or metric: the card never writes one.
    with pytest.raises(TypeError):
        EvalResult(task_type="text-generation", metric_type="accuracy", metric_value=1.0)


def test_a_merged_card_names_every_part_of_the_chain_and_its_datasets(tmp_path, monkeypatch):
    """Found by the merge audit: a merged card named the LoRA adapters only (a LoTA delta under them was left
    out, a delta alone was called "LoRA adapters"), and listed only the last run's dataset."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sft, dpo, merged = tmp_path / "sft-lota", tmp_path / "dpo", tmp_path / "merged"
    for folder, data, run_type in ((sft, "HuggingFaceH4/ultrachat_200k", "sft"),
                                   (dpo, "HuggingFaceH4/ultrafeedback_binarized", "dpo")):
        folder.mkdir()
        (folder / "alignkit_config.json").write_text(json.dumps({"dataset_id": data, "run_type": run_type}))
    merged.mkdir()
    (merged / "alignkit_config.json").write_text((dpo / "alignkit_config.json").read_text())
    (merged / "merge.json").write_text(json.dumps({"base_model": "org/base", "adapters": [str(dpo)],
                                                   "lota_deltas": [str(sft)], "max_logit_difference": 1e-5}))
    card = model_card(merged)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["datasets"] == ["HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized"]
    assert "with LoRA adapters over a LoTA sparse delta" in card
    assert "Merged into the base: the LoTA delta `" in card and "sft-lota` -> `" in card
    (merged / "merge.json").write_text(json.dumps({"base_model": "org/base", "adapters": [], "lota_deltas": [str(sft)],
                                                   "max_logit_difference": 1e-5}))
    (merged / "alignkit_config.json").unlink()  # a task merge of deltas: no run's settings
    assert "merged adapters of " in model_card(merged) and "with a LoTA sparse delta" in model_card(merged)


def test_a_checkpoint_card_shows_its_runs_settings_and_its_own_figures(tmp_path, monkeypatch):
    """A checkpoint-N pushed as an adapter (merge.py --push adapter) holds no run records: its card said "merged
    adapters" with no settings, and no figures. It now reads its run's settings one folder up and its own figures
    at its step from trainer_state.json (not the finished run's metrics.json)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = write(tmp_path / "run", alignkit_config__json={"run_type": "dpo", "dataset_id": "me/prefs", "dpo_beta": 0.1,
                                                          "quantization": "auto",
                                                          "loaded_as": {"quantization": "4bit", "dtype": "bfloat16"}},
                metrics__json={"train_loss": 0.1, "global_step": 40})
    log = [{"step": 5, "epoch": 0.1, "loss": 0.69, "rewards/accuracies": 0.5},
           {"step": 10, "epoch": 0.2, "loss": 0.61, "rewards/accuracies": 0.75},
           {"step": 10, "epoch": 0.2, "eval_loss": 0.65},
           {"step": 15, "epoch": 0.3, "loss": 0.4}]  # logged after the checkpoint's step: not its own
    checkpoint = write(run / "checkpoint-10", adapter_config__json={"base_model_name_or_path": "org/base"},
                       trainer_state__json={"global_step": 10, "log_history": log})
    card = model_card(checkpoint, "me/ck")
    assert "\nDPO of " in card  # the stage its run recorded (before: "merged adapters")
    assert "| dpo_beta | `0.1` |" in card
    figures = card.split("## Metrics at checkpoint-10")[1].split("##")[0]
    assert "| loss | 0.61 |" in figures and "| eval_loss | 0.65 |" in figures and "| global_step | 10 |" in figures
    assert "0.4 |" not in figures and "train_loss" not in card and "Final metrics" not in card
    # `auto` on CUDA trained QLoRA: cited by how the loader loaded the base (the setting alone said nothing).
    assert "QLoRA" in card.split("Methods used:")[1] and "qlora" in card.split("---")[1]
    # A local path inside a setting's mapping or list is shown by its last part too (the review of session 31: a
    # dataset_mixture's ids and resumed_over's changes printed /home/... whole, now in every checkpoint's card).
    write(run, alignkit_config__json={"run_type": "dpo", "dataset_mixture": {"datasets": [
        {"id": "/home/alice/secret-data/b.jsonl", "weight": 1.0}]}, "chat_template": "/home/alice/t.jinja",
        "resumed_over": [{"step": 5, "changed": {"chat_template": ["/home/alice/old.jinja", "/home/alice/t.jinja"]}}]})
    card = model_card(checkpoint, "me/ck")
    assert "/home/alice" not in card and ".../b.jsonl" in card and ".../old.jinja" in card


def test_a_run_s_cards_name_the_base_it_loaded_without_asking_the_hub(tmp_path, monkeypatch, dpo_run, sft_run):
    """Left by session 31's review: a run on a Hub adapter had an in-progress card naming the adapter as "the base"
    (and a run on a LoTA delta the delta), and each checkpoint's card walked the chain again, a Hub request per save.
    A run records the chain as the loader loaded it (`loaded_chain`); its cards read that."""
    import alignkit.modeling.chain as chain

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_hub(source, revision=None):
        raise AssertionError(f"the card asked about {source}")

    real = chain.adapter_config
    monkeypatch.setattr(chain, "adapter_config", no_hub)
    recorded = {"base": "org/base", "revision": "v1", "adapters": ["me/sft-adapter"]}
    run = write(tmp_path / "run", alignkit_config__json={"run_type": "dpo", "model_id": "me/sft-adapter",
                                                          "loaded_chain": recorded})
    checkpoint = write(run / "checkpoint-2", adapter_config__json={"base_model_name_or_path": "me/sft-adapter"})
    for card in (model_card(run, in_progress=True), model_card(checkpoint)):
        assert "\nbase_model: org/base\n" in card and "at revision `v1`, on top of the adapter `me/sft-adapter`" in card
        assert "loaded_chain" not in card  # a record beside the settings, not one of them
    # An adapter re-pointed at another base by hand (a moved base, or its Hub id before a push): the file names it.
    monkeypatch.setattr(chain, "adapter_config", real)
    write(checkpoint, adapter_config__json={"base_model_name_or_path": "org/other-base"})
    assert "\nbase_model: org/other-base\n" in model_card(checkpoint)
    base = write(tmp_path / "base", config__json={"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    write(run, alignkit_config__json={"run_type": "dpo", "model_id": str(tmp_path / "delta"), "loaded_chain": {
        "base": str(base), "revision": None, "deltas": [str(tmp_path / "delta")], "adapters": []}})
    assert "DPO of a local model (LlamaForCausalLM, llama; folder `base`), on top of the adapter `delta` with" in \
        model_card(run, in_progress=True)
    # A real run records it: the tiny DPO run over the session's SFT adapter, each local part by its absolute path.
    loaded = json.loads((dpo_run["run_folder"] / "alignkit_config.json").read_text())["loaded_chain"]
    sft = json.loads((sft_run["run_folder"] / "alignkit_config.json").read_text())["loaded_chain"]
    assert loaded == {**sft, "adapters": [str(sft_run["run_folder"].resolve())]} and sft["adapters"] == []
    # Its checkpoints (PEFT names the bare base there, the SFT adapter a frozen_N copy beside it): read alike, the
    # chain not walked again (the review of session 32: they were, and named `frozen_0` as the adapter under).
    monkeypatch.setattr(chain, "adapter_config", no_hub)
    card = model_card(sorted(dpo_run["run_folder"].glob("checkpoint-*"))[-1])
    assert f"on top of the adapter `{sft_run['run_folder'].name}` with" in card and "frozen_" not in card


def test_a_merge_saved_in_another_precision_and_a_gguf_base_are_described_as_they_are(merged_dpo, tmp_path):
    """A bf16 merge's card said its logits "match base + adapters within 1e-06", a figure measured in fp32 before the
    cast (the saved weights differ by 0.1 on the tiny model); a merge over a GGUF file called it a folder."""
    text = model_card(merged_dpo)
    assert ("match base + adapters within 1.0e-06 (checked in float32, before the weights were cast to bfloat16 to "
            "be saved: bfloat16 rounds them further).") in text
    merge = json.loads((merged_dpo / "merge.json").read_text())
    (merged_dpo / "merge.json").write_text(json.dumps({**merge, "dtype": "float32", "check_dtype": "float32"}))
    assert "within 1.0e-06." in model_card(merged_dpo)
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    (merged_dpo / "merge.json").write_text(json.dumps({**merge, "base_model": str(gguf)}))
    text = model_card(merged_dpo)
    assert "a local GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`, its quantized weights dequantized to load)" in text
    assert "folder `SmolLM2" not in text and str(tmp_path) not in text


def test_a_pairwise_result_is_kept_by_both_models_with_what_it_rests_on(tmp_path):
    """Only the first model of a pair kept its win rate: a later run that compared the pair the other way round left
    the older figure on the card, contradicted, and a --max_questions 3 run replaced a 64-question one unsaid."""
    evaluation = __import__("alignkit.evals.evaluation", fromlist=["Pairwise"])
    sft = write(tmp_path / "sft", adapter_config__json={})
    dpo = write(tmp_path / "dpo", adapter_config__json={})
    record = types.SimpleNamespace(command="pairwise", models={"sft": str(sft), "dpo": str(dpo)})
    pairs = [{"model": "dpo", "opponent": "sft", "judge": "rule",
              "overall": {"adjusted_win_rate": 0.75, "n": 64}}]
    evaluation.Pairwise.record(record, pairs)
    evaluation.Pairwise.record(record, [{**pairs[0], "model": "sft", "opponent": "dpo",  # the other way round
                                         "overall": {"adjusted_win_rate": 0.5, "n": 3}}])
    kept = {name: json.loads((folder / EVALS_FILE).read_text()) for name, folder in (("sft", sft), ("dpo", dpo))}
    assert kept["dpo"]["pairwise vs sft"]["value"] == kept["sft"]["pairwise vs dpo"]["value"] == 0.5
    assert kept["dpo"]["pairwise vs sft"]["metric_name"] == \
        "adjusted win rate vs sft over 3 judged matches (judge rule)"


def test_an_evaluation_shows_on_the_folders_card_at_once_and_a_card_of_ones_own_stays(tmp_path):
    """evaluate.py kept a win rate in the folder's alignkit_evals.json, but its README.md card showed it only after
    the next merge or push."""
    folder = write(tmp_path / "dpo", adapter_config__json={}, alignkit_config__json={"run_type": "dpo",
                                                                                      "model_id": "org/base"})
    (folder / "README.md").write_text(model_card(folder))
    record_evaluation(folder, "mt_bench vs sft", {"benchmark": "MT-Bench", "dataset": "mt_bench", "metric": "win_rate",
                                                   "value": 0.625, "metric_name": "adjusted win rate vs sft"})
    assert "| text-generation | MT-Bench | adjusted win rate vs sft | 0.625 |" in (folder / "README.md").read_text()
    (folder / "README.md").write_text("# my own notes\n")
    record_evaluation(folder, "mt_bench vs base", {"benchmark": "MT-Bench", "dataset": "mt_bench",
                                                    "metric": "win_rate", "value": 0.5, "metric_name": "vs base"})
    assert (folder / "README.md").read_text() == "# my own notes\n"


def test_a_card_names_and_cites_the_method_each_run_used(tmp_path, monkeypatch):
    """Found by the merge audit: a KTO run's card said "Fine-tuning of ...", tagged fine-tuning and cited no KTO
    paper; dpo.py --loss_type simpo or orpo said "DPO of ...", tagged and cited DPO; and a merged chain cited QLoRA
    from the top run only (an SFT run with QLoRA under a DPO run without it got no QLoRA)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def card_of(folder, **settings):
        folder.mkdir()
        (folder / "alignkit_config.json").write_text(json.dumps(settings))
        card = model_card(folder)
        meta = yaml.safe_load(card.split("---")[1])
        return card, meta["tags"]

    for name, settings, stage, cited, not_cited in (
            ("kto", {"run_type": "kto"}, "KTO", "ethayarajh2024kto", "rafailov2023direct"),
            ("simpo", {"run_type": "dpo", "loss_type": ["simpo"]}, "SimPO", "meng2024simpo", "rafailov2023direct"),
            ("orpo", {"run_type": "dpo", "loss_type": ["orpo"]}, "ORPO", "hong2024orpo", "rafailov2023direct"),
            ("dpo", {"run_type": "dpo", "loss_type": ["sigmoid", "ipo"]}, "DPO", "azar2023general", "meng2024simpo")):
        card, tags = card_of(tmp_path / name, model_id="org/base", **settings)
        assert f"\n{stage} of " in card and cited in card and not_cited not in card, name
        assert stage.lower() in tags and "fine-tuning" not in tags and ("dpo" in tags) == (stage == "DPO"), tags
    sft, dpo, merged = tmp_path / "sft", tmp_path / "dpo2", tmp_path / "merged"
    card_of(sft, run_type="sft", quantization="4bit")
    _, tags = card_of(dpo, run_type="dpo", quantization="none")
    assert "qlora" not in tags
    merged.mkdir()
    (merged / "alignkit_config.json").write_text((dpo / "alignkit_config.json").read_text())
    (merged / "merge.json").write_text(json.dumps({"base_model": "org/base", "adapters": [str(sft), str(dpo)],
                                                   "lota_deltas": [], "max_logit_difference": 1e-5}))
    card = model_card(merged)
    assert "qlora" in yaml.safe_load(card.split("---")[1])["tags"] and "dettmers2023qlora" in card



def test_a_reward_run_on_the_self_reference_loss_cites_it(tmp_path, monkeypatch):
    """reward.py --loss logexpwithlm --use_margin was carded "Methods used: LoRA, Bradley-Terry reward model, TRL.":
    its loss (margins plus the chosen answer's LM term, the self-reference code's) went uncited (the reward audit of
    session 51). bradley_terry and logexp cite no such paper."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for loss in ("logexpwithlm", "logexp", "bradley_terry"):
        write(tmp_path / loss, alignkit_config__json={"model_id": "org/base", "run_type": "reward", "loss": loss,
                                                      "use_margin": "true"})
        card = model_card(tmp_path / loss)
        cited = card.split("Methods used: ")[1].split(".")[0].split(", ")
        if loss == "logexpwithlm":
            assert cited == ["LoRA", "Bradley-Terry reward model", "self-reference reward loss", "TRL"], cited
            assert "@article{bao2024aligning" in card and "arXiv:2406.11190" in card
        else:
            assert "self-reference reward loss" not in cited and "bao2024aligning" not in card, (loss, cited)


def test_a_kto_run_on_apo_s_loss_and_a_dpo_run_with_apo_are_carded_as_apo(tmp_path, monkeypatch):
    """Found by a kto.py audit: --loss_type apo_zero_unpaired was carded "KTO of ...", tagged kto and cited the KTO
    paper alone, though the loss is APO-zero's (D'Oosterlinck et al. 2024); dpo.py's apo_zero cited no APO either."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, settings in (("kto", {"run_type": "kto", "loss_type": "apo_zero_unpaired"}),
                           ("dpo", {"run_type": "dpo", "loss_type": ["apo_zero"]})):
        write(tmp_path / name, alignkit_config__json={"model_id": "org/base", **settings})
        card = model_card(tmp_path / name)
        tags = yaml.safe_load(card.split("---")[1])["tags"]
        cited = card.split("Methods used: ")[1].split(".")[0].split(", ")
        assert "apo" in tags and len(tags) == len(set(tags)) and "doosterlinck2024anchored" in card, (name, tags)
        assert "APO" in cited and "arXiv:2408.06266" in card, cited
    kto = model_card(tmp_path / "kto")
    assert "\nAPO (zero, unpaired) of [org/base]" in kto and "ethayarajh2024kto" not in kto
    assert "kto" not in yaml.safe_load(kto.split("---")[1])["tags"]
    assert "\nDPO of " in model_card(tmp_path / "dpo")

def test_a_card_made_from_another_folder_lists_the_hub_datasets_the_run_trained_on(tmp_path, monkeypatch):
    """Left from session 27: the card took a run's --dataset_id for a Hub dataset when it looked like one from the
    folder the card was made in: `data/prefs` (a local folder, relative to where the run ran) read from another
    folder was listed as the Hub dataset `data/prefs`. The run records which datasets it names are the Hub's where
    it runs; a mixture's Hub datasets are listed too."""
    from alignkit.core.config import DPOSettings
    from alignkit.train import training

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    project = tmp_path / "project"
    (project / "data" / "prefs").mkdir(parents=True)
    (project / "data" / "prefs" / "train.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    base = write(project / "base", config__json={"architectures": ["LlamaForCausalLM"]})
    monkeypatch.chdir(project)
    s = DPOSettings(model_id=str(base), output_dir=str(project / "runs"), run_name="dpo",
                    dataset_mixture={"datasets": [{"id": "data/prefs"}, {"id": "HuggingFaceH4/ultrafeedback_binarized"}]})
    run = project / "runs" / "dpo"
    run.mkdir(parents=True)
    training.save_run_config(s, run / training.CONFIG_FILE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    card = model_card(run)
    assert yaml.safe_load(card.split("---")[1])["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    # A mixture takes --dataset_id's place: the script's default (a Hub dataset it never read) is neither listed
    # nor shown among the settings (the sft/dpo audit of session 28: a handbook recipe's local mixture was carded
    # as argilla/ultrafeedback-binarized-preferences-cleaned, published with --push_to_hub).
    assert "| dataset_id |" not in card and "| dataset_mixture |" in card
    mixed = DPOSettings(model_id=str(base), output_dir=str(project / "runs"), run_name="local",
                        dataset_mixture={"datasets": [{"id": str(project / "data" / "prefs")}]})
    (project / "runs" / "local").mkdir()
    training.save_run_config(mixed, project / "runs" / "local" / training.CONFIG_FILE)
    assert mixed.dataset_id == "argilla/ultrafeedback-binarized-preferences-cleaned"  # the default, unread
    assert "datasets" not in yaml.safe_load(model_card(project / "runs" / "local").split("---")[1])
    # A run saved before the record: its --dataset_id as it reads from here (a Hub id where no such folder is).
    config = json.loads((run / training.CONFIG_FILE).read_text())
    del config["hub_datasets"]
    (run / training.CONFIG_FILE).write_text(json.dumps({**config, "dataset_mixture": None, "dataset_id": "data/prefs"}))
    assert yaml.safe_load(model_card(run).split("---")[1])["datasets"] == ["data/prefs"]


def test_a_run_records_and_cards_the_keys_it_did_not_apply(tmp_path, monkeypatch):
    """A handbook recipe's `max_prompt_length: 32` (TRL 1.x dropped it) was named as not applied in the log only:
    alignkit_config.json and the card left it out, so a reader of the card could not tell it was dropped (the dpo.py
    audit of session 33). The run records each such key by its value and why, and the card names them."""
    from alignkit.core.args import parse_config
    from alignkit.core.config import DPOSettings
    from alignkit.train import training

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = write(tmp_path / "base", config__json={"architectures": ["LlamaForCausalLM"]})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_id: {base}\noutput_dir: {tmp_path / 'runs'}\nrun_name: dpo\nmax_prompt_length: 32\n")
    s = parse_config(DPOSettings, env_file=None, args=["--config", str(recipe)])
    run = tmp_path / "runs" / "dpo"
    run.mkdir(parents=True)
    training.save_run_config(s, run / training.CONFIG_FILE)
    config = json.loads((run / training.CONFIG_FILE).read_text())
    assert config["not_applied"] == {"max_prompt_length": {"value": 32, "why": "TRL 1.x dropped it"}}
    card = model_card(run)
    assert "Given but not applied: `max_prompt_length: 32` (TRL 1.x dropped it)" in card
    assert "| not_applied |" not in card
    # Not a setting: a rerun without the key still resumes the run (run_folder.NOT_TRAINING).
    assert "not_applied" in training.NOT_TRAINING


def test_a_run_folder_and_its_checkpoints_carry_alignkit_s_card_while_it_trains(tmp_path, monkeypatch):
    """Found by a kto.py audit: a run stopped before its end (a crash, SIGTERM, SIGKILL) kept the card TRL's trainers
    write into the run folder at each checkpoint ("a fine-tuned version of [None](https://huggingface.co/None)",
    library transformers), and each checkpoint-N kept PEFT's (`base_model:` the local base's path). The folder has
    alignkit's card from the run's start, rewritten after each checkpoint, and so has each checkpoint."""
    from alignkit.core.config import KTOSettings
    from alignkit.train import training
    from alignkit.train.resuming import EndsAtMaxSteps

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = write(tmp_path / "base", config__json={"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    run = tmp_path / "runs" / "kto"
    run.mkdir(parents=True)
    s = KTOSettings(model_id=str(base), output_dir=str(tmp_path / "runs"), run_name="kto")
    training.save_run_config(s, run / training.CONFIG_FILE)  # as the run claims its folder (start_run)
    assert "This run has not finished" in (run / "README.md").read_text()
    assert "no checkpoint is saved yet" in (run / "README.md").read_text()

    class TRLTrainer:  # what TRL's trainers do at a checkpoint (trl/trainer/kto_trainer.py, _save_checkpoint)
        def create_model_card(self, model_name=None):
            (run / "README.md").write_text("---\nlibrary_name: transformers\n---\nA fine-tuned version of "
                                           "[None](https://huggingface.co/None).\n")

        def _get_output_dir(self, trial):
            return str(run)

        def _save_checkpoint(self, model, trial):
            self.create_model_card(model_name=run.name)
            write(run / "checkpoint-5", adapter_config__json={"base_model_name_or_path": str(base)},
                  README__md=f"---\nbase_model: {base}\nlibrary_name: peft\n---\n# Model Card for Model ID\n",
                  trainer_state__json={"global_step": 5, "log_history": [{"step": 5, "loss": 0.5}]})

    class Trainer(EndsAtMaxSteps, TRLTrainer):
        args = types.SimpleNamespace(should_save=True)
        state = types.SimpleNamespace(global_step=5)

    Trainer()._save_checkpoint(None, None)
    for folder in (run, run / "checkpoint-5"):
        card = (folder / "README.md").read_text()
        meta = yaml.safe_load(card.split("---")[1])
        assert "alignkit" in meta["tags"] and "kto" in meta["tags"] and meta["library_name"] == "peft", folder
        assert "base_model" not in meta and str(tmp_path) not in card and "huggingface.co/None" not in card
        assert "KTO of a local model (LlamaForCausalLM, llama; folder `base`)" in card
    card = (run / "README.md").read_text()
    assert "its latest checkpoint is `checkpoint-5`, which the same command resumes from" in card
    assert "## Metrics at checkpoint-5" in card and "| loss | 0.5 |" in card
    assert "has not finished" not in (run / "checkpoint-5" / "README.md").read_text()
    # A finished run trained further (--resume true, a higher --max_steps): its old adapter and metrics.json are still
    # there, and its card read as finished, with the old final figures (the review of session 31).
    write(run, adapter_config__json={"base_model_name_or_path": str(base)}, metrics__json={"train_loss": 9.9})
    Trainer()._save_checkpoint(None, None)
    card = (run / "README.md").read_text()
    assert "This run has not finished" in card and "| loss | 0.5 |" in card
    assert "Final metrics" not in card and "9.9" not in card
    from alignkit.core.card import model_card as finished_card

    assert "Final metrics" in finished_card(run) and "has not finished" not in finished_card(run)  # at its end


def test_the_settings_table_shows_what_ran_and_leaves_out_what_had_no_effect(tiny_cache, tmp_path, monkeypatch):
    """The table listed settings without effect as if they had one (the sft.py audit): a recipe's revision main over a
    local model (the log said not used), hub_repo_id without a push, flash_attention_2 where sdpa ran (only the
    loaded_as row further down said so). The revision is named as not applied, the Hub's settings show only with a
    push, and each loader setting says what it loaded where that differs."""
    import torch

    from alignkit.core.args import parse_config
    from alignkit.core.config import SFTSettings
    from alignkit.core.run_records import remember_attention, remember_loaded_as
    from alignkit.modeling import presets
    from alignkit.train import training

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = parse_config(SFTSettings, env_file=None, presets={"tiny": presets.defaults("sft")}, args=[
        "--preset", "tiny", "--revision", "main", "--hub_repo_id", "me/tiny-sft", "--attn_implementation",
        "flash_attention_2", "--quantization", "none", "--output_dir", str(tmp_path)])
    training.preflight(s)
    remember_loaded_as(s.model_id, "none", torch.float32)  # as the loader records a CPU load
    remember_attention(s.model_id, "sdpa")
    run = tmp_path / "sft"
    run.mkdir()
    training.save_run_config(s, run / training.CONFIG_FILE)
    card = model_card(run)
    assert '| attn_implementation | `"flash_attention_2"` asked; `sdpa` loaded |' in card
    assert '| dtype | `"auto"` asked; `float32` loaded |' in card and '| quantization | `"none"` |' in card
    assert "| loaded_as |" not in card  # its figures are in the rows above
    assert "| revision |" not in card and 'Given but not applied: `revision: "main"` (model_id is a local folder, ' \
        "read as it is)" in card
    assert "hub_repo_id" not in card
    config = json.loads((run / training.CONFIG_FILE).read_text())
    write(run, alignkit_config__json={**config, "push_to_hub": True})
    assert '| hub_repo_id | `"me/tiny-sft"` |' in model_card(run)
