"""reward.py's own pieces under FSDP, on two CPU processes over gloo (accelerate 1.15 does not shard on a CPU, so
torch's FSDP2 `fully_shard` stands in for the Trainer's wrapping). Run by tests/test_launch_real.py as

    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 FSDP_CPU_RAM_EFFICIENT_LOADING=true \
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... tests/fsdp_reward_worker.py OUT_DIR

with the environment `accelerate launch --use_fsdp` gives its processes. Each process:
1. establishes the launch as reward.py does (the process group exists before loading), then loads the reward
   model: with FSDP's RAM-efficient loading only rank 0 reads the weights, the others hold meta tensors;
2. loads it whole (RAM-efficient loading off), zeroes the fresh score head and adds the LoRA adapter as reward.py
   does, scores the held-out pairs unsharded, shards every decoder layer and the model with `fully_shard`;
3. takes part in the held-out report where `scores_held_out` says so (under FSDP: every rank), the main process
   alone writing it;
4. runs dpo.py's prefix-sharing forward (packed pairs, a 4D mask) on the causal LM with a LoRA adapter, unsharded
   and sharded.
Each process writes OUT_DIR/rank<N>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from datasets import Dataset

    from alignkit.core.config import RewardSettings
    from alignkit.core.launch import establish_launch
    from alignkit.feedback.rewards import score
    from alignkit.modeling import presets
    from alignkit.modeling.models import add_trainable_adapter, load_model
    from alignkit.train.reward import held_out_report, scores_held_out, zero_fresh_score_head

    s = RewardSettings(model_id=presets.paths()["model"], quantization="none", dtype="fp32", lora_r=4,
                       report_to="none")
    launch = establish_launch(s, "reward.py")
    rank = int(os.environ["RANK"])
    found: dict = {"mode": launch.mode, "world": launch.world_size,
                   "process_group_at_load": torch.distributed.is_initialized()}
    from transformers.distributed.fsdp import is_fsdp_enabled

    found["ram_efficient_loading"] = is_fsdp_enabled()
    first = load_model(s, for_training=True, reward=True).model
    found["meta_params"] = sum(p.is_meta for p in first.parameters())
    del first

    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    loaded = load_model(s, for_training=True, reward=True)
    zero_fresh_score_head(loaded.model, s.model_id)
    model = add_trainable_adapter(loaded, s, task_type="SEQ_CLS")
    head = model.get_base_model().score.modules_to_save["default"]  # the score head PEFT trains and saves
    found["head_zeroed"] = bool(torch.count_nonzero(head.weight) == 0)
    with torch.no_grad():  # as if trained: a head of the same values on every rank (the report must not be all 0)
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    pairs = Dataset.from_list([json.loads(line) for line in open(presets.paths()["preferences"])][:12])
    model.eval()
    found["whole"] = score(model, loaded.tokenizer, [p + c for p, c in zip(pairs["prompt"], pairs["chosen"])], 4)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (launch.world_size,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    found["sharded"] = sum(p.to_local().numel() for p in model.parameters()) < sum(p.numel() for p in model.parameters())
    if scores_held_out(rank == 0):
        report = held_out_report(model, loaded.tokenizer, pairs, out, batch_size=4, write=rank == 0)
        found["report"] = {k: v for k, v in report.items() if k != "histogram"}
    found["packed"] = packed_forward(launch.world_size)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def packed_forward(world: int) -> dict:
    """dpo.py's prefix-sharing forward (alignkit.train.prefix: one packed row per pair, a 4D mask) on the causal
    LM with its LoRA adapter, unsharded and then sharded by fully_shard: the largest logit difference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from alignkit.core.config import DPOSettings
    from alignkit.modeling import presets
    from alignkit.modeling.models import add_trainable_adapter, load_model
    from alignkit.train import prefix

    s = DPOSettings(model_id=presets.paths()["model"], quantization="none", dtype="fp32", lora_r=4, report_to="none")
    loaded = load_model(s, for_training=True)
    model = add_trainable_adapter(loaded, s)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as if trained: the adapter changes the logits
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    # Two pairs, [chosen..., rejected...]: a shared prompt, then different answers; right-padded.
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 10, 11, 0, 0], [5, 6, 7, 12, 13, 14], [5, 6, 10, 15, 16, 0]])
    attention = (ids != 0).long()
    completion = attention.clone()
    completion[:, :3] = 0
    packed = prefix.pack_pairs(ids, attention, completion, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        whole = model(**packed.model_inputs()).logits
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        share = sum(p.to_local().numel() for p in model.parameters()) / sum(p.numel() for p in model.parameters())
        sharded = model(**packed.model_inputs()).logits
    return {"rows": list(packed.input_ids.shape), "local_share": share,
            "max_logit_difference": float((whole - sharded).abs().max())}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
