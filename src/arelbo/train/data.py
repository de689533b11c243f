"""The training data order: a function of (seed, epoch) only, sharded by rank, so resume needs no state."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from arelbo.config import ConfigError, RunConfig

__all__ = ["EpochSampler", "ShardSampler", "load_splits", "seed_for"]


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers, without collisions between nearby tuples like (seed, epoch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------------------
# Data


class EpochSampler(Sampler[int]):
    """Training order for one process: epoch e's order depends only on (seed, e), so resuming needs no state.

    The dataset is cut into global batches of ``global_batch`` samples (a permutation when shuffling); this
    process yields its contiguous 1/world slice of each one, in order, so a DataLoader with ``batch_size =
    global_batch // world`` gives every process its share of the same global batch. An incomplete last batch
    is dropped (``drop_last``) or trimmed to a multiple of ``world`` so every process sees the same batch count.
    """

    def __init__(self, n: int, global_batch: int, shuffle: bool, seed: int, drop_last: bool, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ConfigError(f"data.batch_size {global_batch} must be divisible by train.devices {world}")
        self.n, self.global_batch, self.shuffle, self.seed = int(n), int(global_batch), bool(shuffle), int(seed)
        self.drop_last, self.rank, self.world = bool(drop_last), int(rank), int(world)
        self.epoch = 0
        self.skip_batches = 0  # batches of the next epoch already trained on (mid-epoch resume); used once


    def set_epoch(self, epoch: int) -> None:  # called by Lightning before each epoch
        self.epoch = int(epoch)

    def _batch_sizes(self) -> list[int]:
        full, rest = divmod(self.n, self.global_batch)
        sizes = [self.global_batch] * full
        rest -= rest % self.world
        if rest and not self.drop_last:
            sizes.append(rest)
        return sizes

    def __len__(self) -> int:
        return sum(self._batch_sizes()) // self.world

    def __iter__(self):
        skip, self.skip_batches = self.skip_batches, 0
        if self.shuffle:
            g = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()  # host indices, read once per epoch
        else:
            order = range(self.n)
        start = 0
        for i, size in enumerate(self._batch_sizes()):
            local = size // self.world
            if i >= skip:
                yield from order[start + self.rank * local : start + (self.rank + 1) * local]
            start += size


class ShardSampler(Sampler[int]):
    """Evaluation: process r of w reads the contiguous r-th w-th of the data, in order (no padding)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.lo, self.hi = n * rank // world, n * (rank + 1) // world

    def __len__(self) -> int:
        return self.hi - self.lo

    def __iter__(self):
        return iter(range(self.lo, self.hi))


def load_splits(cfg: RunConfig):
    from arelbo.data import load_dataset

    return load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)

