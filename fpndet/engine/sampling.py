"""Deterministic, resumable sampling: the image order and every augmentation depend only on
(seed, epoch, index), so an interrupted run resumed from a checkpoint sees exactly the batches
and augmentations of an uninterrupted one, in one process or several."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation from ``seed + epoch``, split across ``world_size`` ranks (padded by
    wrapping so every rank gets the same count), optionally starting ``start_batch`` batches in.

    With ``groups`` (one group id per item, e.g. :func:`aspect_ratio_groups`), each batch is
    drawn from one group where it can: every rank's shuffled share is cut into full batches
    group by group, the few items left over in each group fill the remaining (mixed) batches,
    and the batches are shuffled. The number of batches per epoch is unchanged, so schedules and
    resumption do not depend on the grouping (as torchvision's ``GroupedBatchSampler`` and
    detectron2's ``AspectRatioGroupedDataset``, but with a fixed epoch length).

    Args (keyword-only): num_items, batch_size (per process), seed, shuffle, rank, world_size,
    groups (int sequence of length num_items, or None).

    Raises:
        ValueError: ``groups`` of another length than ``num_items``.
    """

    def __init__(self, *, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, groups: Optional[Sequence[int]] = None):
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        if groups is not None and len(groups) != num_items:
            raise ValueError(f"groups has {len(groups)} entries for {num_items} items")
        self.groups = None if groups is None else torch.as_tensor(list(groups), dtype=torch.int64)

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
        if self.groups is not None:
            mine = self._grouped(mine, torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919))
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def _grouped(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``items`` (a whole number of batches) reordered so that consecutive runs of
        ``batch_size`` come from one group where possible; batch order shuffled."""
        size = self.batch_size
        groups = self.groups[items]
        by_group = items[torch.argsort(groups, stable=True)]  # the shuffled order kept within a group
        counts = torch.bincount(groups)
        if int((counts > 0).sum()) <= 1:  # one group: the plain order
            return items
        full, leftovers, start = [], [], 0
        for count in counts.tolist():  # one iteration per group (two for landscape/portrait)
            members = by_group[start : start + count]
            cut = count - count % size
            full.append(members[:cut])
            leftovers.append(members[cut:])
            start += count
        ordered = torch.cat(full + leftovers)  # leftovers make the last (mixed) batches
        batches = ordered.reshape(-1, size)
        if self.shuffle:
            batches = batches[torch.randperm(len(batches), generator=generator)]
        return batches.reshape(-1)

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


def aspect_ratio_groups(dataset) -> list[int]:
    """Group id of every image of ``dataset`` from its annotation (no pixels decoded): 0 for
    landscape or square (width >= height), 1 for portrait.

    Images resized to the same short side pad to the largest in their batch; mixing a portrait
    image into a batch of landscape ones pads the batch to a square (a third more pixels at
    448x597). Raises ``TypeError`` for a dataset without ``annotation(i)``.
    """
    if not hasattr(dataset, "annotation"):
        raise TypeError(f"{type(dataset).__name__} has no annotation(i) to read image sizes from")
    return [int(record.height > record.width) for record in map(dataset.annotation, range(len(dataset)))]


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
