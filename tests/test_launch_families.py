"""Model families under real two-process launches on this CPU (gloo), beside tests/test_launch_sharded.py's (whose
`launch` and checks these reuse): each a tiny random model, so a launch costs what the tiny preset's does.

- A sliding-window model: a Qwen2 whose second layer attends within a window of 4 positions, shorter than every
  row of the tiny preset's pairs, and whose first attends to the whole past. dpo.py's prefix sharing lays out one
  packed mask per layer type; tests/launched.py counts, on each rank, the packed batches whose sliding layers'
  mask differs from the full layers' (the window in effect, not only configured). Packed and unshared log-probs
  are equal on every sliding-window family: tests/test_prefix_sharing.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_launch_sharded import QLORA, TINY, launch, whole_adapter
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


@pytest.fixture(scope="module")
def windowed(cache, runs):
    return tiny_windowed_qwen2(runs / "qwen2-windowed")


# QLoRA where the launch shards or replicates the 4-bit layers (FSDP2, ZeRO-3), plain LoRA under DDP and ZeRO-2.
WINDOWED = [pytest.param("ddp", (), id="ddp"), pytest.param("fsdp", QLORA, id="fsdp-qlora"),
            pytest.param("zero2", (), id="zero2"), pytest.param("zero3", QLORA, id="zero3-qlora")]


@pytest.mark.parametrize("mode, flags", WINDOWED)
def test_a_sliding_window_model_trains_dpo_with_packed_pairs(mode, flags, windowed, cache, runs):
    """dpo.py's defaults (prefix sharing, alignkit's own sigmoid loss) on a model with full and sliding-window
    layers: each rank packed its batches with one mask per layer type, the window cutting the past of the tokens
    more than WINDOW positions on (every row is longer), and the adapter saved whole."""
    run = runs / f"dpo-windowed-{mode}"
    done = launch(mode, "dpo.py", run, *TINY, *flags, "--model_id", str(windowed), "--loss_type", "sigmoid",
                  "--eval_split", "0", cache=cache)
    assert done["metrics"]["global_step"] == 2 and done["packed"] > 0 and done["own"] > 0, done
    assert f"one mask per layer type: full_attention window None, sliding_attention window {WINDOW}" in done["output"]
    windows = re.findall(r"^launched windows: rank (\d); packed batches with the window in effect (\d+)$",
                         done["output"], re.M)
    assert sorted(rank for rank, _ in windows) == ["0", "1"] and all(int(n) > 0 for _, n in windows), windows
    whole_adapter(run)

