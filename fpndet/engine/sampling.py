"""Deterministic, resumable sampling: the image order and every augmentation depend only on
(seed, epoch, index), so an interrupted run resumed from a checkpoint sees exactly the batches
and augmentations of an uninterrupted one, in one process or several."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation from ``seed + epoch``, split across ``world_size`` ranks (padded by
    wrapping so every rank gets the same count), optionally starting ``start_batch`` batches in.

    Args (keyword-only): num_items, batch_size (per process), seed, shuffle, rank, world_size.
    """

    def __init__(self, *, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def per_rank(self) -> int:
        return -(-self.num_items // self.world_size)

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size  # incomplete last batches are dropped

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        total = self.per_rank * self.world_size
        order = torch.cat([order, order[: total - self.num_items]]) if total > self.num_items else order
        mine = order[self.rank : total : self.world_size][: self.batches_per_epoch() * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


class SeededAugmentation(Dataset):
    """Applies ``transforms`` to ``dataset[i]`` under a torch RNG seeded from (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, transforms: Optional[Callable], *, seed: int = 0):
        self.dataset, self.transforms, self.seed = dataset, transforms, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        if self.transforms is None:
            return image, target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**63))
            return self.transforms(image, target)
