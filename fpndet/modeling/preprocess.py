"""Image pre-processing equal to torchvision's ``GeneralizedRCNNTransform``.

Normalise with the backbone's mean/std, resize so the short side is ``min_size`` (one picked at
random per image in training when several are given) unless the long side would exceed
``max_size``, then zero-pad the batch to a multiple of ``size_divisible`` (bottom/right). Target
boxes are scaled by the same factors.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ImageBatch:
    """A padded, normalised batch.

    tensor: float ``[B, 3, H_pad, W_pad]``; image_sizes: (h, w) of each resized image before
    padding; original_sizes: (h, w) of each input image; targets: the targets with boxes in the
    resized frame (None when no targets were given).
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    targets: Optional[list[dict[str, Tensor]]]


def valid_region(image_sizes: Tensor, height: int, width: int, stride: int = 1) -> Tensor:
    """bool ``[B, 1, height, width]``: the cells of a padded batch's map of this ``stride`` (pixels
    per cell; 1 for the image itself) that lie on each image rather than on the padding.

    ``image_sizes``: int ``[B, 2]`` (h, w) in pixels of each top-left-aligned image. Cell (i, j) is
    on the image when i < ceil(h / stride) and j < ceil(w / stride): a stride-2 conv of padding 1
    maps n valid rows to ceil(n / 2). Traceable (no data-dependent control flow)."""
    valid = torch.div(image_sizes + (stride - 1), stride, rounding_mode="floor")  # ceil, [B, 2]
    rows = torch.arange(height, device=image_sizes.device)[None, :] < valid[:, :1]  # [B, H]
    cols = torch.arange(width, device=image_sizes.device)[None, :] < valid[:, 1:]  # [B, W]
    return rows[:, None, :, None] & cols[:, None, None, :]


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor making the short side ``min_size`` unless the long side would pass ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def scale_boxes(boxes: Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> Tensor:
    """Scale xyxy pixel boxes ``[N, 4]`` from an (h, w) frame to another (float32 ratios, as torchvision)."""
    ratio_h = torch.tensor(float(to_size[0]), device=boxes.device) / float(from_size[0])
    ratio_w = torch.tensor(float(to_size[1]), device=boxes.device) / float(from_size[1])
    return boxes * torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(boxes.dtype)


def resize_image(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """Bilinear resize of a float ``[C, h, w]`` image (no corner alignment, no antialiasing, as
    torchvision) by :func:`resize_scale`; a side that would shrink below 1 px (an image 1000x
    narrower than long) is kept at 1 px. The one resize of the eager pre-processor and of the
    exported ONNX models' runner (:mod:`fpndet.deploy.runtime`)."""
    height, width = image.shape[-2:]
    scale = resize_scale(height, width, min_size, max_size)
    if min(math.floor(height * scale), math.floor(width * scale)) < 1:
        size = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


class ImagePreprocessor(nn.Module):
    """Args (keyword-only): min_size (one or several short sides, pixels), max_size, size_divisible,
    pixel_mean / pixel_std (RGB, for images in [0, 1])."""

    def __init__(
        self,
        *,
        min_size: Sequence[int],
        max_size: int,
        size_divisible: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ):
        super().__init__()
        self.min_size = [int(s) for s in min_size]
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean)).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std)).view(3, 1, 1), persistent=False)

    def _short_side(self) -> int:
        return random.choice(self.min_size) if self.training else self.min_size[-1]

    def resize(self, image: Tensor, min_size: int) -> Tensor:
        """:func:`resize_image` with this pre-processor's ``max_size``."""
        return resize_image(image, min_size, self.max_size)

    @staticmethod
    def check_image(index: int, image: Tensor) -> None:
        """Raise ``ValueError`` for an image the network cannot take: not ``[3, H, W]`` with H, W
        >= 1, not floating point (uint8 must be divided by 255 first), or with NaN/inf pixels."""
        if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image {index}: expected a [3, H, W] tensor with H, W >= 1, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image {index}: expected float pixels in [0, 1], got {image.dtype} (divide uint8 by 255)")
        finite = torch.isfinite(image)
        if not bool(finite.all()):
            raise ValueError(f"image {index}: {int((~finite).sum())} pixel values are NaN or infinite")

    def pad(self, images: Sequence[Tensor]) -> Tensor:
        height = max(img.shape[-2] for img in images)
        width = max(img.shape[-1] for img in images)
        div = self.size_divisible
        height, width = int(math.ceil(height / div) * div), int(math.ceil(width / div) * div)
        batch = images[0].new_zeros((len(images), 3, height, width))
        for i, img in enumerate(images):
            batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None) -> ImageBatch:
        """Args: images: float ``[3, h, w]`` RGB in [0, 1] (any sizes); targets: dicts with "boxes"
        ``[N, 4]`` xyxy pixels of the input image. Raises ``ValueError`` for an image that
        :meth:`check_image` refuses, or an empty list."""
        if len(images) == 0:
            raise ValueError("no images: expected a list of [3, H, W] tensors")
        resized, original_sizes, new_targets = [], [], [] if targets is not None else None
        for i, image in enumerate(images):
            self.check_image(i, image)
            original_sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            image = (image - self.pixel_mean) / self.pixel_std
            image = self.resize(image, self._short_side())
            resized.append(image)
            if targets is not None:
                target = dict(targets[i])
                target["boxes"] = scale_boxes(target["boxes"], original_sizes[-1], image.shape[-2:])
                new_targets.append(target)
        image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
        return ImageBatch(self.pad(resized), image_sizes, original_sizes, new_targets)
