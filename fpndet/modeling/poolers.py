"""RoI feature extraction on a feature pyramid (FPN paper §4.2 "Feature Pyramid Networks for
Fast R-CNN", eq. 1).

A RoI of width w and height h (pixels of the network input) is pooled from level

    k = floor(k0 + log2(sqrt(w h) / 224)),   k0 = 4,

clamped to the pyramid's levels (P2..P5), by RoIAlign (Mask R-CNN) to a fixed 7x7 grid. The
level assignment reproduces ``torchvision.ops.poolers.LevelMapper`` exactly (float32, an
``eps = 1e-6`` added before the floor) and RoIAlign is ``torchvision.ops.roi_align`` with the
level's spatial scale 1 / 2^k, so the result equals torchvision's ``MultiScaleRoIAlign``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from .box_ops import box_area


def assign_levels(
    boxes: Tensor,
    *,
    min_level: int = 2,
    max_level: int = 5,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Tensor:
    """Pyramid level of each RoI by FPN eq. 1.

    Args:
        boxes: float ``[..., 4]`` xyxy RoIs in input-image pixels.
        min_level, max_level: the pyramid's levels (P2..P5 for Fast R-CNN).
        canonical_scale, canonical_level: 224 and k0 = 4 (a 224² RoI maps to P4).
        eps: added before the floor, as torchvision's ``LevelMapper``, so sqrt(wh) = 224 * 2^j
            maps to level 4 + j despite rounding.

    Returns:
        int64 ``[...]`` levels in ``min_level..max_level`` (absolute level numbers, not indices).
    """
    scale = torch.sqrt(box_area(boxes))
    level = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + torch.tensor(eps, dtype=scale.dtype))
    return level.clamp(min=min_level, max=max_level).to(torch.int64)


def flatten_rois(boxes: Union[Tensor, Sequence[Tensor]], valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """RoIs of a batch as one list: ``(image_index int64 [M], boxes [M, 4])``.

    Args:
        boxes: a batched ``[B, N, 4]`` tensor (with ``valid`` bool ``[B, N]`` marking real RoIs;
            all real when None) or a list of per-image ``[N_i, 4]`` tensors.

    Returns:
        the RoIs image by image, in their order within each image (row-major over ``[B, N]``).
    """
    if isinstance(boxes, Tensor):
        image_index = torch.arange(boxes.shape[0], device=boxes.device)[:, None].expand(boxes.shape[:2])
        if valid is None:
            return image_index.reshape(-1), boxes.reshape(-1, 4)
        return image_index[valid], boxes[valid]
    counts = torch.tensor([len(b) for b in boxes])
    flat = torch.cat(list(boxes))
    return torch.repeat_interleave(torch.arange(len(boxes)), counts).to(flat.device), flat


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign from the pyramid level each RoI is assigned to.

    Args (keyword-only):
        levels: pyramid levels of the feature maps given to ``forward`` (2..5), lowest first;
            level l has stride 2^l.
        output_size: pooled height and width (7).
        sampling_ratio: RoIAlign samples per bin side (2; 0 = adaptive).
        aligned: RoIAlign's half-pixel correction (False as torchvision's Faster R-CNN;
            detectron2 uses True).
        canonical_scale, canonical_level: of :func:`assign_levels`.

    ``forward(features, boxes, valid=None)``: features ``[B, C, H_l, W_l]`` per level in
    ``levels``; boxes batched ``[B, N, 4]`` (+ ``valid`` ``[B, N]``) or a list of ``[N_i, 4]``,
    xyxy input pixels. Returns ``[M, C, output_size, output_size]`` in the features' dtype, one
    per real RoI in :func:`flatten_rois` order.
    """

    def __init__(
        self,
        *,
        levels: Sequence[int] = (2, 3, 4, 5),
        output_size: int = 7,
        sampling_ratio: int = 2,
        aligned: bool = False,
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.levels = [int(level) for level in levels]
        if self.levels != list(range(self.levels[0], self.levels[-1] + 1)):
            raise ValueError(f"levels must be consecutive, lowest first, got {list(levels)}")
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)

    def roi_levels(self, boxes: Tensor) -> Tensor:
        """int64 level of each box ``[..., 4]`` (see :func:`assign_levels`)."""
        return assign_levels(
            boxes, min_level=self.levels[0], max_level=self.levels[-1],
            canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
        )

    def forward(
        self, features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]], valid: Optional[Tensor] = None
    ) -> Tensor:
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps (levels {self.levels}), got {len(features)}")
        image_index, flat = flatten_rois(boxes, valid)
        rois = torch.cat([image_index.to(flat.dtype)[:, None], flat], dim=1)
        levels = self.roi_levels(flat)
        first = features[0]
        result = first.new_zeros((len(rois), first.shape[1], self.output_size, self.output_size))
        for level, feature in zip(self.levels, features):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel() == 0:
                continue
            result[index] = self.align(feature, rois[index], level).to(result.dtype)
        return result

    def align(self, feature: Tensor, rois: Tensor, level: int) -> Tensor:
        """RoIAlign of ``rois [M, 5]`` (image index, x1, y1, x2, y2) on the map of ``level``."""
        size = (self.output_size, self.output_size)
        return roi_align(feature, rois, output_size=size, spatial_scale=2.0**-level,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)

    def pool_by_masks(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """The same pooling as ``forward`` for every RoI of a padded ``boxes [B, N, 4]``, written
        without data-dependent sizes (for ONNX export): RoIAlign runs on all B*N RoIs at every
        level and each keeps the result of its own level. Returns ``[B * N, C, S, S]``, row-major
        over ``[B, N]``; 4x the RoIAlign work of ``forward`` on P2-P5."""
        batch, count = boxes.shape[0], boxes.shape[1]
        flat = boxes.reshape(-1, 4)
        image = torch.arange(batch, device=boxes.device).repeat_interleave(count).to(flat.dtype)
        rois = torch.cat([image[:, None], flat], dim=1)
        levels = self.roi_levels(flat)[:, None, None, None]
        pooled = None
        for level, feature in zip(self.levels, features):
            at_level = self.align(feature, rois, level)
            pooled = at_level if pooled is None else torch.where(levels == level, at_level, pooled)
        return pooled
