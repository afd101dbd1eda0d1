"""--group_by_length (alignkit.train.sampling.LengthGroupedSampler): batches of similar length pad less, still come in
random order, hold every row once, and are drawn alike by every process; SFT and DPO train with it by default."""

from __future__ import annotations

import random

import torch

from alignkit.train.sampling import LengthGroupedSampler


def _batches(sampler, size):
    order = list(sampler)
    return order, [order[i : i + size] for i in range(0, len(order), size)]


def _padded(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_batches_pad_less_hold_every_row_once_and_keep_a_random_order():
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(2000)]
    size = 8
    order, batches = _batches(LengthGroupedSampler(lengths, size, seed=42), size)
    assert sorted(order) == list(range(len(lengths)))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    assert _padded(batches, lengths) < 0.6 * _padded(random_batches, lengths)  # measured 0.57
    # The longest row is in the first batch (a batch too large for memory fails at once) ...
    assert max(lengths) in [lengths[i] for i in batches[0]]
    # ... and the rest is not sorted: each batch's longest row goes up as often as down from batch to batch.
    tops = [max(lengths[i] for i in b) for b in batches[1:]]
    ups = sum(b > a for a, b in zip(tops, tops[1:]))
    assert 0.3 < ups / (len(tops) - 1) < 0.7


def test_every_process_draws_the_same_order_and_each_epoch_another():
    lengths = [random.Random(1).randint(1, 500) for _ in range(300)]
    rank0, rank1 = LengthGroupedSampler(lengths, 4, seed=7), LengthGroupedSampler(lengths, 4, seed=7)
    torch.manual_seed(0)  # the global RNG differs between processes; the order must not depend on it
    first = list(rank0)
    torch.manual_seed(1)
    assert list(rank1) == first
    rank0.set_epoch(1)
    assert list(rank0) != first and sorted(rank0) == sorted(first)
    rank1.set_epoch(1)
    assert list(rank1) == list(rank0)


def test_dpo_and_sft_train_on_length_grouped_batches(tiny_cache, tmp_path):
    from conftest import run_script

    dpo = run_script("dpo.py", "--preset", "tiny", "--max_steps", "1", "--loss_type", "sigmoid",
                     "--output_dir", str(tmp_path), "--run_name", "dpo")["trainer"]
    sampler = dpo._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert isinstance(dpo._get_eval_sampler(dpo.eval_dataset), LengthGroupedSampler)  # the held-out pass too
    data = dpo.train_dataset
    assert sampler.lengths == [len(p) + len(c) + len(r) for p, c, r in
                               zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    grouped = sum(int(b["attention_mask"].numel()) for b in dpo.get_train_dataloader())
    off = run_script("dpo.py", "--preset", "tiny", "--max_steps", "1", "--eval_split", "0", "--loss_type", "sigmoid",
                     "--group_by_length", "false", "--output_dir", str(tmp_path), "--run_name", "off")["trainer"]
    assert not isinstance(off._get_train_sampler(), LengthGroupedSampler)
    assert grouped < sum(int(b["attention_mask"].numel()) for b in off.get_train_dataloader())  # less padding
    sft = run_script("sft.py", "--preset", "tiny", "--max_steps", "1", "--eval_split", "0",
                     "--output_dir", str(tmp_path), "--run_name", "sft")["trainer"]
    assert isinstance(sft._get_train_sampler(), LengthGroupedSampler)
