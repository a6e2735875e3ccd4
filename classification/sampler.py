"""Samplers: a resumable, seeded, sharded training order and an exact evaluation split.

``TrainSampler`` yields ``(index, sample seed)`` items. Order and seeds depend only on
(seed, epoch), so a run resumed at batch ``b`` of an epoch sees exactly the samples, in the
same order and with the same augmentation, that the uninterrupted run saw from batch ``b`` on.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))


class TrainSampler(Sampler):
    """Shuffle ``indices`` per epoch and give rank ``r`` every ``world``-th item.

    As with ``DistributedSampler``, the epoch's order is padded with its own first items so
    every rank gets the same number of samples (a few images are seen twice per epoch).
    """

    def __init__(self, indices, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        if len(self.indices) == 0:
            raise ValueError("the training set is empty")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.per_rank = math.ceil(len(self.indices) / world)
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per rank and epoch (the incomplete last batch is dropped)."""
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start_batch": self.start_batch}

    def __iter__(self):
        g = _epoch_generator(self.seed, self.epoch)
        n = len(self.indices)
        order = torch.randperm(n, generator=g)
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        total = self.per_rank * self.world
        if total > n:
            order = torch.cat([order, order[: total - n]])
        mine = order[self.rank : total : self.world]
        mine = mine[: self.batches_per_epoch * self.batch_size]
        for pos in mine[self.start_batch * self.batch_size :].tolist():
            yield int(self.indices[pos]), int(seeds[pos])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class EvalSampler(Sampler):
    """Rank ``r`` gets indices ``r, r + world, ...``: every image exactly once, no padding."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def subset_indices(n: int, size: int | None, seed: int) -> list[int]:
    """A fixed random subset of ``size`` of ``range(n)`` (sorted), or all of it."""
    if size is None or size >= n:
        return list(range(n))
    if size < 1:
        raise ValueError(f"data.train_subset={size} must be a positive number of images")
    g = torch.Generator().manual_seed(int(seed) + 7919)
    return sorted(torch.randperm(n, generator=g)[:size].tolist())
