"""`--group_by_length`: batches of rows of similar length, in a random order every process draws alike.

The SFT and DPO trainers (alignkit.train.trainers) use it for their training and held-out passes; each says what a
row's length is (a DPO pair's packed or two-row cost).
"""

from __future__ import annotations

import torch


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar length (less padding), in random order, the same order on every process.

    Per epoch, with a generator seeded by (seed, epoch) only: a random permutation, cut into megabatches of up
    to 50 batches (at least 4 megabatches, as transformers' own sampler), each sorted by length and cut into
    batches; then the batches are shuffled, and the one holding the longest example goes first, so that a
    batch too large for memory fails at step 1, not hours in. Under accelerate every process draws the same
    order and takes its own batches; a resumed run draws the same order again (set_epoch, from the Trainer).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), max(1, batch_size), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n, size = len(self.lengths), self.batch_size
        mega = max(1, min(n // (size * 4), 50)) * size
        order = torch.randperm(n, generator=generator).tolist()
        batches = []
        for start in range(0, n, mega):
            group = sorted(order[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches += [group[i : i + size] for i in range(0, len(group), size)]
        # Megabatches are whole batches, so only the last one can end short; the DataLoader re-cuts the index stream
        # into batches of `size`, so that short one stays last.
        full = [b for b in batches if len(b) == size]
        short = [i for b in batches if len(b) < size for i in b]
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda k: max(self.lengths[i] for i in full[k]))
            full[0], full[longest] = full[longest], full[0]
        return iter([i for b in full for i in b] + short)


def length_grouped_sampler(lengths: list[int], batch_size: int, args) -> LengthGroupedSampler:
    """The sampler for `--group_by_length`, grouping by the micro-batch (`batch_size`): the rows padded together."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    return LengthGroupedSampler(lengths, batch_size, seed)
