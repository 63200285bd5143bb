"""Batching detection samples. (Sampling and seeding for training live in
:mod:`fpndet.engine.sampling`, which makes resumed runs exact.)"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["collate_detection"]


def collate_detection(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep a batch of detection samples as lists (images differ in size).

    Args:
        batch: ``(image [3, H, W], target)`` samples as the datasets return them (after
            transforms).

    Returns:
        ``(images, targets)``: images as plain float32 tensors ``[3, H, W]`` in [0, 1] (uint8
        images are scaled by 1/255); targets with plain tensors: "boxes" float32 ``[N, 4]`` xyxy
        pixels of the returned image, "labels" int64 ``[N]``, "iscrowd" bool ``[N]`` (all False
        when absent), "proposals" float32 ``[P, 4]`` xyxy pixels (when the sample has them),
        "image_id" int, "file_name" str, "orig_size" ``(H0, W0)`` of the original
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
    if "proposals" in target:
        plain["proposals"] = torch.as_tensor(target["proposals"]).as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
    if "image_id" in target:
        plain["image_id"] = int(target["image_id"])
    if "orig_size" in target:
        plain["orig_size"] = tuple(int(v) for v in target["orig_size"])
    plain["size"] = (int(size[0]), int(size[1]))
    return plain
