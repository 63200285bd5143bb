"""Batching detection samples: collate function, deterministic (distributed) data loaders."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["collate_detection", "build_loader", "set_loader_epoch"]


def collate_detection(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep a batch of detection samples as lists (images differ in size).

    Args:
        batch: ``(image [3, H, W], target)`` samples as the datasets return them (after
            transforms).

    Returns:
        ``(images, targets)``: images as plain float32 tensors ``[3, H, W]`` in [0, 1] (uint8
        images are scaled by 1/255); targets with plain tensors: "boxes" float32 ``[N, 4]`` xyxy
        pixels of the returned image, "labels" int64 ``[N]``, "iscrowd" bool ``[N]`` (all False
        when absent), "image_id" int, "file_name" str, "orig_size" ``(H0, W0)`` of the original
        image and "size" ``(H, W)`` of the returned one; other keys pass through.
    """
    images, targets = [], []
    for image, target in batch:
        image = image.as_subclass(torch.Tensor)
        image = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
        images.append(image)
        targets.append(_plain_target(target, image.shape[-2:]))
    return images, targets


def _plain_target(target: dict[str, Any], size: torch.Size) -> dict[str, Any]:
    plain = dict(target)
    boxes = torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
    plain["boxes"] = boxes
    plain["labels"] = torch.as_tensor(target["labels"]).as_subclass(torch.Tensor).to(torch.int64)
    crowd = target.get("iscrowd")
    plain["iscrowd"] = (
        torch.zeros(len(boxes), dtype=torch.bool)
        if crowd is None
        else torch.as_tensor(crowd).as_subclass(torch.Tensor).to(torch.bool)
    )
    if "image_id" in target:
        plain["image_id"] = int(target["image_id"])
    if "orig_size" in target:
        plain["orig_size"] = tuple(int(v) for v in target["orig_size"])
    plain["size"] = (int(size[0]), int(size[1]))
    return plain


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of detection batches (:func:`collate_detection`), reproducible from ``seed``.

    The order comes from a :class:`DistributedSampler` in every case (one replica when not
    distributed): the permutation of epoch ``e`` depends only on ``(seed, e)``, so a resumed run
    sees the same order; call :func:`set_loader_epoch` before each epoch. Distributed, each
    rank reads its own 1/world_size share; when ``drop_last`` is False the last share is padded
    with repeated images, which evaluation must de-duplicate by ``image_id``.

    Worker seeds are fixed too: torch draws each worker's seed from a generator seeded with
    ``seed + 1000 * rank``, and Python's ``random`` and NumPy are seeded from that torch seed,
    so augmentations repeat exactly for a given ``num_workers``. With
    ``num_workers == 0`` augmentations draw from the main process's global torch generator.

    Args:
        dataset: a map-style dataset of ``(image, target)`` samples.
        batch_size: images per batch (per rank when distributed).
        shuffle: random order (training) or dataset order (evaluation).
        num_workers: loader processes; workers persist across epochs when > 0.
        distributed: split the data over the ranks of the initialised default process group.
        seed: base seed of the order and of the worker generators.
        drop_last: drop the last incomplete batch (and distributed padding).
        pin_memory: page-locked batches for faster host-to-GPU copies.

    Raises:
        RuntimeError: ``distributed=True`` without an initialised ``torch.distributed``.
    """
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed to be initialised first")
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    sampler = DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last and distributed
    )
    generator = torch.Generator()
    generator.manual_seed(seed + 1000 * rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the shuffling permutation of ``epoch`` (no-op for samplers without epochs)."""
    set_epoch = getattr(loader.sampler, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


def _seed_worker(worker_id: int) -> None:
    """Seed Python's ``random`` and NumPy in a worker from its torch seed."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
