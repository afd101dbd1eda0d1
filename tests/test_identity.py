"""The one identity of a model as loaded (alignkit.modeling.identity) and the caches keyed on it: a change to any
loader setting, to any file down the adapter chain, or to the GGUF file is another model, so no cache returns an
old answer for it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from alignkit.core.args import ConfigError
from alignkit.core.config import GenerationSettings, LabelSettings, ModelSettings, loader_settings
from alignkit.modeling import identity, presets

from conftest import run_script


def chain(tmp_path: Path) -> dict[str, Path]:
    """base (a full model's files) <- sft (an adapter recording it by absolute path) <- dpo (recording ../sft)."""
    base, sft, dpo = (tmp_path / name for name in ("base", "sft", "dpo"))
    for folder in (base, sft, dpo):
        folder.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (base / "model.safetensors").write_bytes(b"base weights")
    (sft / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (sft / "adapter_model.safetensors").write_bytes(b"sft weights")
    (dpo / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../sft"}))
    (dpo / "adapter_model.safetensors").write_bytes(b"dpo weights")
    return {"base": base, "sft": sft, "dpo": dpo}


def retrain(file: Path, content: bytes) -> None:
    """Rewrite a file in place with new content of the same size and an old mtime: only its content says it changed."""
    stat = file.stat()
    file.write_bytes(content)
    import os

    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))


def keys(s, backend="transformers") -> dict:
    """The keys the caches derive from a model's loader settings: MT-Bench answers, the HF judge's verdicts,
    label.py's responses (its generator identity holds model_identity), AlpacaEval outputs."""
    from alignkit.evals import alpacaeval_outputs, mtbench
    from alignkit.feedback.judge import HFJudge
    from alignkit.feedback.judge_templates import DEFAULT

    from types import SimpleNamespace

    sampling = SimpleNamespace(temperature=0.0, top_p=1.0, num_beams=1, max_new_tokens=8, seed=0)
    return {"mt_bench": mtbench.answers_key(s, sampling, backend),
            "hf_judge": json.dumps(HFJudge(s, DEFAULT).identity(), sort_keys=True, default=str),
            "alpaca_eval": alpacaeval_outputs.outputs_key(s, s.model_id, backend),
            "identity": identity.identity_key(s, backend)}


def differ(a: dict, b: dict) -> list[str]:
    return [name for name in a if a[name] == b[name]]


def test_every_loader_field_changes_the_identity_unless_declared_inert(tiny_cache, tmp_path, monkeypatch):
    """Walks every field of the loader groups: a field added tomorrow counts unless it is declared in INERT."""
    model = presets.paths()["model"]
    other = tmp_path / "other"
    shutil.copytree(model, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("}", ', "x": 1}', 1))
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    (tmp_path / "a.gguf").write_bytes(b"gguf a")
    changed_values = {"model_id": str(other), "revision": "v2", "gguf_file": "a.gguf", "trust_remote_code": True,
                      "chat_template": str(template), "quantization": "4bit", "dtype": "fp16",
                      "attn_implementation": "eager", "use_liger": "false", "num_threads": "3", "backend": "vllm",
                      "max_model_len": 128, "gpu_memory_utilization": 0.5,
                      "chat_template_kwargs": {"enable_thinking": False}, "bnb_4bit_quant_type": "fp4",
                      "use_bnb_nested_quant": False}
    base = GenerationSettings(model_id=model)
    liger_runs = identity._liger_runs()
    monkeypatch.setattr(identity, "_liger_runs", lambda: True)  # where it runs, turning it off is another model
    in_four_bit = dataclasses.replace(base, quantization="4bit")  # where the 4-bit format counts
    names = [f.name for f in dataclasses.fields(GenerationSettings)]
    assert set(names) <= set(changed_values), f"give the new loader field a changed value here: {set(names) - set(changed_values)}"
    for name in names:
        settings = dataclasses.replace(base, **{name: changed_values[name]})
        if name == "gguf_file":
            settings = dataclasses.replace(settings, model_id=str(tmp_path))
            base_for = dataclasses.replace(base, model_id=str(tmp_path))
        elif name in identity.FOUR_BIT:
            settings, base_for = dataclasses.replace(in_four_bit, **{name: changed_values[name]}), in_four_bit
        else:
            base_for = base
        engine = "vllm" if name == "max_model_len" else None  # it sizes vLLM's context: it counts there
        same = identity.model_identity(settings, engine) == identity.model_identity(base_for, engine)
        assert same == (name in identity.INERT or name == "backend"), f"{name}: {'inert' if same else 'counts'}"
    # What loads auto's model on this hardware is auto: on a CPU every attention but eager (sdpa), and Liger on or off
    # where it cannot run (label.py generated everything again for --attn_implementation sdpa).
    monkeypatch.setattr(identity, "_liger_runs", lambda: liger_runs)
    monkeypatch.setattr(identity, "_cuda", lambda: False)
    for name, value, counts in (("attn_implementation", "sdpa", False), ("attn_implementation", "flash_attention_2",
                                False), ("attn_implementation", "eager", True), ("use_liger", "true", False)):
        other = identity.model_identity(dataclasses.replace(base, **{name: value}))
        assert (other != identity.model_identity(base)) == counts, (name, value)
    # On a GPU, what auto picks: flash_attention_2 where flash-attn runs (half precision, compute capability >= 8.0),
    # and sdpa elsewhere; an asked flash_attention_2 loads auto's either way (sdpa without flash-attn: the cache
    # missed against an sdpa run, session 37's dpo audit), or is refused before it loads.
    from alignkit.core import kernels, launch

    monkeypatch.setattr(identity, "_cuda", lambda: True)
    monkeypatch.setattr(launch, "dtype_choice", lambda requested: (requested.replace("auto", "bf16"), ""))
    for flash, ampere, dtype, same in ((True, True, "auto", {"flash_attention_2"}),
                                       (False, True, "auto", {"flash_attention_2", "sdpa"}),
                                       (True, False, "auto", {"flash_attention_2", "sdpa"}),
                                       (True, True, "fp32", {"flash_attention_2", "sdpa"})):
        monkeypatch.setattr(kernels, "flash_attn_installed", lambda: flash)
        monkeypatch.setattr(launch, "_ampere_or_newer", lambda: ampere)
        auto = identity.model_identity(dataclasses.replace(base, dtype=dtype))
        for attention in ("sdpa", "flash_attention_2", "flex_attention", "eager"):
            other = identity.model_identity(dataclasses.replace(base, dtype=dtype, attn_implementation=attention))
            assert (other == auto) == (attention in same), (flash, ampere, dtype, attention)
    monkeypatch.undo()
    # The engine settings count only through the engine that runs: --backend auto and the engine it resolved to are
    # one model, and vLLM's context size does not touch a transformers run.
    for name, value in (("backend", "transformers"), ("max_model_len", 128)):
        assert identity.model_identity(dataclasses.replace(base, **{name: value}), "transformers") == \
            identity.model_identity(base, "transformers"), name
    assert set(identity.ENGINE_ONLY) == {"backend", "max_model_len"}
    # --dtype naming what auto resolves to on this hardware (part of the identity) loads the same model: the same
    # answers (evaluate.py answered again, and label.py generated again, for `--dtype fp32` on a CPU).
    from alignkit.core.launch import dtype_choice

    same_as_auto = dataclasses.replace(base, dtype=dtype_choice("auto")[0])
    assert identity.model_identity(same_as_auto) == identity.model_identity(dataclasses.replace(base, dtype="auto"))
    assert identity.model_identity(same_as_auto, "vllm") != identity.model_identity(  # vLLM's auto: the checkpoint's
        dataclasses.replace(base, dtype="auto"), "vllm")
    # The 4-bit format counts where the model loads in 4-bit, not where it loads as saved (auto: every load keyed
    # here is for inference) or in 8-bit; and --quantization none is auto's model (label.py generated all again).
    assert identity.model_identity(dataclasses.replace(base, quantization="none")) == identity.model_identity(base)
    for quantization, counts in (("4bit", True), ("auto", False), ("none", False), ("8bit", False)):
        nf4 = dataclasses.replace(base, quantization=quantization)
        for change in ({"bnb_4bit_quant_type": "fp4"}, {"use_bnb_nested_quant": False}):
            fp4 = dataclasses.replace(nf4, **change)
            assert (identity.model_identity(fp4) != identity.model_identity(nf4)) == counts, (quantization, change)
    # A chat template counts by its text: the same file rewritten is another model.
    with_template = dataclasses.replace(base, chat_template=str(template))
    before = identity.model_identity(with_template)
    template.write_text("{{ other }}")
    assert identity.model_identity(with_template) != before


def test_num_threads_is_declared_inert_because_the_outputs_are_the_same_bits_at_any_thread_count(tiny_cache):
    """--num_threads is left out of every cache key (INERT): that holds only while torch's CPU kernels give the same
    bits however many threads split the work (they split rows, not sums). Checked on the model itself, in fp32 and
    bf16: logits and a greedy answer at 1 and at 2 threads."""
    import torch
    from transformers import AutoModelForCausalLM

    assert "num_threads" in identity.INERT
    model = AutoModelForCausalLM.from_pretrained(presets.paths()["model"]).eval()
    ids = torch.randint(5, 200, (3, 48), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            outputs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with torch.no_grad():
                    outputs.append((model(input_ids=ids).logits,
                                    model.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)))
            assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1]), dtype
    finally:
        torch.set_num_threads(before)


def test_an_upgrade_of_a_library_that_computes_the_outputs_is_another_model_in_every_cache(tiny_cache, monkeypatch):
    """Answers made under transformers X were reused under transformers Y (a fixed attention mask, another sampling
    default change an answer): the versions of the libraries that compute the outputs count, the engine's own where
    it runs, and a library that computes nothing here (vLLM under transformers) does not."""
    base = GenerationSettings(model_id=presets.paths()["model"])
    installed = dict(identity._installed())
    assert {"torch", "transformers", "peft", "tokenizers", "jinja2"} <= set(installed)
    before, under_vllm = keys(base), identity.model_identity(base, "vllm")
    # tokenizers and jinja2 make the prompt (the cache audit of session 28: an upgrade of either kept the answers).
    for name in ("torch", "transformers", "peft", "tokenizers", "jinja2"):
        monkeypatch.setattr(identity, "_installed", lambda: {**installed, name: "99.0"})
        assert differ(before, keys(base)) == [], name  # every cache answers again
    monkeypatch.setattr(identity, "_installed", lambda: {**installed, "vllm": "99.0"})
    assert keys(base) == before  # vLLM computes nothing under transformers
    assert identity.model_identity(base, "vllm") != under_vllm


def test_an_optional_library_counts_only_where_it_computes_this_models_outputs(tiny_cache, tmp_path, monkeypatch):
    """`pip install gguf` (or bitsandbytes, flash-attn, Liger) for another model made every answers file of a plain
    model another model's, and evaluate.py refused them all: each counts where this model runs through it."""
    model = presets.paths()["model"]
    (tmp_path / "a.gguf").write_bytes(b"gguf a")
    saved_4bit = tmp_path / "saved-4bit"
    shutil.copytree(model, saved_4bit)
    config = json.loads((saved_4bit / "config.json").read_text())
    (saved_4bit / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    plain, four_bit = GenerationSettings(model_id=model), GenerationSettings(model_id=model, quantization="4bit")
    eight_bit, gguf = dataclasses.replace(four_bit, quantization="8bit"), GenerationSettings(
        model_id=str(tmp_path), gguf_file="a.gguf")
    gguf_named = GenerationSettings(model_id=str(tmp_path / "a.gguf"))
    as_saved = GenerationSettings(model_id=str(saved_4bit))
    qlora = tmp_path / "qlora-adapter"  # an adapter trained over the base in 4-bit: a reward model judges over it so
    qlora.mkdir()
    (qlora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": model, "peft_type": "LORA"}))
    (qlora / "alignkit_config.json").write_text(json.dumps({"model_id": model, "loaded_as": {"quantization": "4bit"}}))
    over_4bit = GenerationSettings(model_id=str(qlora))
    cases = {"bitsandbytes": (four_bit, eight_bit, as_saved, over_4bit), "gguf": (gguf, gguf_named),
             "flash-attn": (), "liger-kernel": ()}  # no CUDA here: their kernels never run
    installed = dict(identity._installed())
    every = (plain, four_bit, eight_bit, gguf, gguf_named, as_saved, over_4bit)
    for cuda in (False, True):
        monkeypatch.setattr(identity, "_cuda", lambda: cuda)
        monkeypatch.setattr(identity, "_installed", lambda: installed)
        before = [identity.identity_key(s) for s in every]
        for name, counting in cases.items():
            monkeypatch.setattr(identity, "_installed", lambda: {**installed, name: "99.0"})
            after = [identity.identity_key(s) for s in every]
            changed = [s for s, b, a in zip(every, before, after) if a != b]
            assert changed == (list(every) if cuda and name in ("flash-attn", "liger-kernel") else list(counting)), \
                (name, cuda)
    # Nor is a kernel installed where it cannot run another machine (the hardware class names it on CUDA only).
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in (
        "flash_attn", "liger_kernel") else find_spec(name, *a))
    import platform

    import torch

    assert identity.hardware() == f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"
    # A CPU whose kernels round otherwise (another vector unit: AVX2 here, AVX512 there) is another machine; every
    # CPU was "cpu", and answers made on one were reused on another.
    on_this_cpu = identity.identity_key(plain)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    assert identity.hardware().endswith(":OTHER") and identity.identity_key(plain) != on_this_cpu


def test_a_hub_base_counts_bitsandbytes_alike_before_and_after_its_config_is_downloaded(tmp_path, monkeypatch):
    """A Hub base whose config.json was not cached yet counted bitsandbytes (not known: counted), and not once the
    first load had downloaded it: every later run keyed the model otherwise, and AlpacaEval refused its own outputs.
    The config is read from the cache, else fetched as the load fetches it; not at hand at all, not quantized."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / ("a" * 40)
    (tmp_path / "hub" / "models--org--model" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--model" / "refs" / "main").write_text("a" * 40)
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    s = GenerationSettings(model_id="org/model")
    assert identity._saved_quantized(s) is False  # offline and not cached: the load fails anyway
    fetched = tmp_path / "fetched.json"
    fetched.write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, name, revision=None: str(fetched))
    from types import SimpleNamespace

    monkeypatch.setattr("alignkit.modeling.chain.resolve", lambda source, revision=None: SimpleNamespace(
        base=source, revision=revision, adapters=[], deltas=[]))  # a base (no Hub here to ask for adapter files)
    assert identity._saved_quantized(s) is True  # online: fetched before the load, as the load would
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert identity._saved_quantized(s) is False  # the cached config, plain


def test_two_gguf_files_of_one_folder_are_two_models_in_every_cache(tiny_cache, tmp_path):
    (tmp_path / "model-Q2_K.gguf").write_bytes(b"q2 weights")
    (tmp_path / "model-Q8_0.gguf").write_bytes(b"q8 weights")
    q2 = keys(ModelSettings(model_id=str(tmp_path), gguf_file="model-Q2_K.gguf"))
    q8 = keys(ModelSettings(model_id=str(tmp_path), gguf_file="model-Q8_0.gguf"))
    assert differ(q2, q8) == []
    # And a .gguf file named directly counts by its content.
    file = tmp_path / "model-Q2_K.gguf"
    before = identity.model_identity(ModelSettings(model_id=str(file)))
    retrain(file, b"q2 weighs2")
    assert identity.model_identity(ModelSettings(model_id=str(file))) != before


def test_a_model_retrained_in_place_anywhere_down_the_chain_is_another_model(tiny_cache, tmp_path):
    models = chain(tmp_path)
    dpo = ModelSettings(model_id=str(models["dpo"]))
    first = keys(dpo)
    retrain(models["sft"] / "adapter_model.safetensors", b"sft weighs2")  # the SFT adapter retrained in place
    second = keys(dpo)
    assert differ(first, second) == []
    retrain(models["base"] / "model.safetensors", b"base weighs2")  # the (merged) base retrained in place
    assert differ(second, keys(dpo)) == []
    # Files no loader reads do not count: a picture or a model card written later is not a new model.
    (models["sft"] / "training.png").write_bytes(b"png")
    (models["dpo"] / "README.md").write_text("card")
    (models["dpo"] / "alignkit_evals.json").write_text("{}")  # evaluate.py records results for the card
    third = keys(dpo)
    assert third == keys(dpo)
    # A named chat template transformers' tokenizer reads from the subfolder (tool_use, rendered for prompts with
    # tools) is part of the model, in the base and in an adapter: an edit in place is another model.
    for folder in (models["base"], models["sft"]):
        (folder / "additional_chat_templates").mkdir()
        (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
        added = keys(dpo)
        assert differ(third, added) == []
        (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0] }}")
        assert differ(added, keys(dpo)) == []
        third = keys(dpo)
    # The file hashes are remembered: a second look reads no file.
    calls = []
    real = identity.hashlib.sha256
    identity.hashlib.sha256 = lambda *a: calls.append(1) or real(*a)
    try:
        identity.chain_identity(str(models["dpo"]))
    finally:
        identity.hashlib.sha256 = real
    assert calls == []


def test_the_parts_of_a_model_as_loaded_name_what_changed(tiny_cache, tmp_path, monkeypatch):
    """A kept answer refused for another model as loaded named two digests ("model as loaded 24811e97 then, 90f6f08d
    now": the merge/evaluate audit of session 32). The parts recorded beside it name the one that changed: an
    adapter of the chain retrained in place by its path from here, the loader settings, the hardware."""
    models = chain(tmp_path)
    monkeypatch.chdir(tmp_path)
    dpo = ModelSettings(model_id=str(models["dpo"]))
    then = identity.identity_parts(dpo, identity.model_identity(dpo))
    assert list(then) == ["loader settings", *(str(models[m]) for m in ("dpo", "sft", "base")), "hardware", "backend",
                          "loader fields"]
    retrain(models["sft"] / "adapter_model.safetensors", b"sft weighs2")
    now = identity.identity_parts(dpo, identity.model_identity(dpo))
    assert identity.changed_parts(then, now) == "sft: its files changed since"
    bf16 = dataclasses.replace(dpo, dtype="bf16")
    # The loader setting that changed by its flag (it said "its loader settings (--dtype, --quantization, the chat
    # template, ...)" of a rerun with --attn_implementation eager: the evaluate audit of session 67).
    assert identity.changed_parts(now, identity.identity_parts(bf16, identity.model_identity(bf16))) == \
        f"its loader settings (--dtype {now['loader fields']['dtype']} then, bf16 now)"
    eager = dataclasses.replace(dpo, attn_implementation="eager", chat_template="{{ messages[0]['content'] }}")
    assert identity.changed_parts(now, identity.identity_parts(eager, identity.model_identity(eager))) == \
        "its loader settings (--chat_template (the template's text) changed, --attn_implementation " \
        f"{now['loader fields']['attn_implementation']} then, eager now)"
    # A setting added since (ADDED) is left out at its default: its value then, not "unrecorded" (the evaluate.py
    # audit of session 98: "--chat_template_kwargs unrecorded then, {'x': 1} now" of answers made with the default).
    assert "chat_template_kwargs" not in now["loader fields"]  # evaluate.py's loader settings hold it, these not
    kwargs = {**now, "loader settings": "other",
              "loader fields": {**now["loader fields"], "chat_template_kwargs": {"x": 1}}}
    assert identity.changed_parts(now, kwargs) == "its loader settings (--chat_template_kwargs {} then, {'x': 1} now)"
    assert identity.changed_parts(kwargs, now) == "its loader settings (--chat_template_kwargs {'x': 1} then, {} now)"
    # Answers kept before the loader settings were recorded: the generic words.
    old = {k: v for k, v in now.items() if k != "loader fields"}
    assert identity.changed_parts(old, identity.identity_parts(bf16, identity.model_identity(bf16))) == \
        "its loader settings (--dtype, --quantization, the chat template, ...)"
    assert identity.changed_parts({**now, "hardware": "cuda:H100"}, now) == \
        f"hardware cuda:H100 then, {now['hardware']} now"
    assert identity.changed_parts(None, now) is None  # answers kept before the parts were recorded


def test_processes_hashing_at_once_keep_each_others_remembered_hashes(tmp_path, monkeypatch):
    """The ranks of a launch hash their files at once: each reads the memo, hashes, then writes. A write merges
    into the memo as it is by then, so a process that wrote meanwhile keeps its entries (before, the last writer's
    view won and the other's files were read again next time)."""
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    mine, theirs = tmp_path / "mine.bin", tmp_path / "theirs.bin"
    mine.write_bytes(b"a" * 100)
    theirs.write_bytes(b"b" * 10)
    real = identity._sha256

    def another_process_writes_meanwhile(path):
        if path == mine:
            identity.file_hashes([theirs])  # the other rank's whole read-hash-write, between our read and write
        return real(path)

    monkeypatch.setattr(identity, "_sha256", another_process_writes_meanwhile)
    identity.file_hashes([mine])
    memo = json.loads((tmp_path / "cache" / "file_hashes.json").read_text())
    assert sorted(value.split("-")[0] for value in memo.values()) == ["10", "100"]
    assert identity.file_hashes([theirs, mine]) == {theirs: f"10-{real(theirs)}", mine: f"100-{real(mine)}"}


def test_the_base_under_a_lota_delta_and_a_file_whose_mtime_was_put_back_count_by_content(tmp_path):
    """A LoTA delta folder (lota_config.json, not adapter_config.json) names its base as the loader follows it: the
    base retrained in place is another model. And a file rewritten with its old size and mtime put back (rsync -a,
    cp -p, touch -r) is read again: its ctime moved."""
    import os

    from alignkit.modeling.lota_delta import CONFIG_FILE, DELTA_FILE

    models = chain(tmp_path)
    delta = tmp_path / "lota"
    delta.mkdir()
    (delta / CONFIG_FILE).write_text(json.dumps({"base_model_name_or_path": str(models["sft"])}))
    (delta / DELTA_FILE).write_bytes(b"delta")
    first = identity.chain_identity(str(delta))
    assert len(first) == 3  # the delta, the SFT adapter under it, the base
    retrain(models["base"] / "model.safetensors", b"base weighs2")
    second = identity.chain_identity(str(delta))
    assert [a == b for a, b in zip(first, second)] == [True, True, False]  # the base's entry, last, changed
    weights = models["sft"] / "adapter_model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"sft weighs2")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime, exactly
    third = identity.chain_identity(str(delta))
    assert sum(a != b for a, b in zip(second, third)) == 1  # the SFT adapter's entry


def test_one_folder_is_one_model_however_its_path_is_spelled_or_wherever_it_moved(tmp_path, monkeypatch):
    """The chain names a local model by content, so `runs/dpo`, `./runs/dpo`, its absolute path and the folder
    after a move share their answers (before, each spelling was another model, and MT-Bench stopped on it)."""
    models = chain(tmp_path)
    monkeypatch.chdir(tmp_path)
    spelled = [ModelSettings(model_id=m) for m in ("dpo", "./dpo", str(models["dpo"]), str(models["dpo"]) + "/")]
    assert len({identity.identity_key(s) for s in spelled}) == 1
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(models["dpo"], moved / "dpo")
    (moved / "dpo" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(models["sft"])}))
    (models["dpo"] / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(models["sft"])}))
    assert identity.identity_key(ModelSettings(model_id=str(moved / "dpo"))) == identity.identity_key(spelled[2])


def test_online_a_hub_model_counts_by_the_commit_that_will_load_not_the_cached_snapshot(tmp_path, monkeypatch):
    """The local cache holds commit a; upstream main moved to b, which from_pretrained downloads when online."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--owner--model"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    asked = []

    class Hub:
        def model_info(self, name, revision=None, timeout=None):
            asked.append((name, revision))
            return type("Info", (), {"sha": "b" * 40})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert identity.chain_identity("owner/model")[0]["commit"] == "b" * 40 and asked == [("owner/model", None)]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline the cached snapshot is what loads
    assert identity.chain_identity("owner/model")[0]["commit"] == "a" * 40


def test_a_hub_model_counts_by_its_resolved_commit(tiny_cache, tmp_path, monkeypatch):
    """Offline, the commit comes from the Hugging Face cache's snapshot the revision points at."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--owner--model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = identity.chain_identity("owner/model")
    assert first[0]["commit"] == "a" * 40
    (repo / "refs" / "main").write_text("b" * 40)  # the Hub's main moved on and the cache followed
    assert identity.chain_identity("owner/model")[0]["commit"] == "b" * 40
    assert identity.chain_identity("owner/model", "c" * 40)[0]["commit"] == "c" * 40


def test_the_reward_model_judge_keys_on_how_the_reward_model_is_loaded(tiny_cache, tmp_path):
    from alignkit.feedback.judge import RMJudge

    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"], "num_labels": 1}))
    import torch
    from safetensors.torch import save

    (folder / "model.safetensors").write_bytes(save({"score.weight": torch.zeros(1)}))  # whole: the judge checks it
    spec = f"rm:{folder}"
    fp32 = RMJudge(spec, LabelSettings(dtype="fp32", quantization="none")).identity()
    assert RMJudge(spec, LabelSettings(dtype="fp32", quantization="none")).identity() == fp32
    assert RMJudge(spec, LabelSettings(dtype="bf16", quantization="4bit")).identity() != fp32
    retrain(folder / "model.safetensors", save({"score.weight": torch.ones(1)}))  # same size, other weights
    assert RMJudge(spec, LabelSettings(dtype="fp32", quantization="none")).identity() != fp32


def test_the_reward_model_judge_scores_real_turns_and_keeps_conversations_apart(tiny_cache):
    """Two conversations whose flattened text is the same are two prompts: each is scored turn by turn, as
    reward.py trained and rl.py's rm: reward scores it."""
    from alignkit.feedback.judge import Request, RMJudge, question_text

    one = [{"role": "user", "content": "User: hi"}]
    two = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
           {"role": "user", "content": "bye"}]
    flat_two = question_text(two)
    one = [{"role": "user", "content": flat_two}]  # a single turn whose text is the other's transcript
    seen = []

    def reward(prompts, answers):
        seen.extend(zip((json.dumps(p) for p in prompts), answers))
        return [float(len(p)) + (0.5 if a == "x" else 0.0) for p, a in zip(prompts, answers)]

    judge = RMJudge.__new__(RMJudge)
    judge.tie_margin, judge.reward = 0.0, reward
    requests = [Request("k1", question_text(one), "x", "y", one), Request("k2", question_text(two), "x", "y", two)]
    assert requests[0].question == requests[1].question
    judge.judge_batch(requests)
    assert sorted(seen) == sorted((json.dumps(p), a) for p in (one, two) for a in ("x", "y"))


def test_readme_alpaca_eval_command_runs_as_written_and_a_retrained_model_is_never_scored_from_old_outputs(
        sft_run, dpo_run, tmp_path, capsys):
    """`python evaluate.py alpaca_eval --preset tiny` from a project root holding runs/tiny-sft and runs/tiny-dpo:
    the default output_dir is relative (alpaca_eval resolved it against its own package folder and crashed)."""
    root = tmp_path / "project"
    shutil.copytree(sft_run["run_folder"], root / "runs" / "tiny-sft", ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.copytree(dpo_run["run_folder"], root / "runs" / "tiny-dpo", ignore=shutil.ignore_patterns("checkpoint-*"))
    config = root / "runs" / "tiny-dpo" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "../tiny-sft"}))
    run_script("evaluate.py", "alpaca_eval", "--preset", "tiny", cwd=root)
    summary = json.loads((root / "outputs" / "alpaca_eval-tiny" / "weighted_alpaca_eval_gpt4_turbo" / "tiny-sft"
                          / "summary.json").read_text())
    assert summary["model"] == "tiny-dpo" and summary["reference"] == "tiny-sft" and summary["instances"] == 29
    capsys.readouterr()
    run_script("evaluate.py", "alpaca_eval", "--preset", "tiny", cwd=root)  # nothing changed: all reused
    assert "all 29 outputs generated before" in capsys.readouterr().out
    # tiny-dpo retrained in place (here: its adapter replaced by another one): its old outputs are not its outputs.
    shutil.copy(Path(sft_run["run_folder"]) / "adapter_model.safetensors", root / "runs" / "tiny-dpo")
    with pytest.raises(ConfigError, match="another model as loaded"):
        run_script("evaluate.py", "alpaca_eval", "--preset", "tiny", cwd=root)
    # Nor under another loader setting.
    from alignkit.evals import alpacaeval_outputs

    s = loader_settings(GenerationSettings(), str(root / "runs" / "tiny-sft"))
    assert alpacaeval_outputs.outputs_key(s, s.model_id, "transformers") != \
        alpacaeval_outputs.outputs_key(dataclasses.replace(s, dtype="fp16"), s.model_id, "transformers")

