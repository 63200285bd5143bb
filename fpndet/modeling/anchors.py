"""Dense anchors over the pyramid levels (RetinaNet §4 "Anchors").

Each level P_l carries A = len(scales) * len(ratios) anchors per location, of area
(size_l * scale)^2 and aspect ratio h/w = ratio, centred on the top-left corner of each feature
cell (x = j * stride, y = i * stride), as torchvision does.

Two placements of the cells (the stride of a level):

- ``level_strides`` given (fpndet's paper configs): stride 2^l on P_l, as the paper and
  detectron2 place anchors. A P7 cell covers 128 px whatever the padded size.
- ``level_strides=None`` (the torchvision presets): stride ``padded_size // grid``, torchvision's
  ``AnchorGenerator``. Equal to 2^l when the padded size is a multiple of 2^l; otherwise smaller
  (an 800x1216 input gives P7 strides (114, 121) instead of 128, and the last row of P7 anchors
  sits 84 px above the paper's). Kept so torchvision's trained heads line up exactly.

Sizes are truncated to integers and
the half-extents rounded exactly like torchvision's ``AnchorGenerator`` so torchvision's trained
heads line up with our anchors (order: location-major, then ratio, then scale).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


def cell_anchors(size: float, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """Anchors of one location centred at (0, 0).

    Args:
        size: the level's base size in pixels (32 for P3 in the paper).
        scales: multipliers of ``size`` (paper: 2^0, 2^(1/3), 2^(2/3)); ``int(size * scale)``
            is taken, as torchvision does (32, 40, 50 for P3).
        ratios: aspect ratios h / w (paper: 0.5, 1, 2).

    Returns:
        float32 ``[len(ratios) * len(scales), 4]`` xyxy offsets in pixels, ratio-major.
    """
    sizes = torch.tensor([float(int(size * s)) for s in scales], dtype=torch.float32)
    ratios_t = torch.as_tensor(list(ratios), dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1.0 / h_ratios
    widths = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for a padded image batch; all images of a batch share them.

    Args (keyword-only):
        sizes: one base size per level, lowest level first (pixels).
        scales, ratios: see :func:`cell_anchors`.
        level_strides: the stride in pixels of each level (2^l for P_l), lowest level first; None
            places cells at ``padded_size // grid`` as torchvision does (module doc).

    Raises ``ValueError`` when ``level_strides`` does not give one stride per size.
    """

    def __init__(
        self,
        *,
        sizes: Sequence[float],
        scales: Sequence[float],
        ratios: Sequence[float],
        level_strides: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.sizes = list(sizes)
        if level_strides is not None and len(level_strides) != len(self.sizes):
            raise ValueError(f"level_strides needs one stride per level ({len(self.sizes)}), got {list(level_strides)}")
        self.level_strides = None if level_strides is None else [int(s) for s in level_strides]
        self.num_anchors_per_location = len(scales) * len(ratios)
        for level, size in enumerate(self.sizes):
            self.register_buffer(f"cell_{level}", cell_anchors(size, scales, ratios), persistent=False)
        self._cache: dict[tuple, tuple[Tensor, list[int]]] = {}

    def level_anchors(self, level: int, grid: tuple[int, int], stride: tuple[int, int]) -> Tensor:
        """float32 ``[H*W*A, 4]`` anchors of one level for a ``grid`` of (H, W) cells."""
        base = getattr(self, f"cell_{level}")
        ys = torch.arange(grid[0], dtype=torch.int32, device=base.device) * stride[0]
        xs = torch.arange(grid[1], dtype=torch.int32, device=base.device) * stride[1]
        shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
        return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)

    def forward(self, image_size: tuple[int, int], grids: Sequence[tuple[int, int]]) -> tuple[Tensor, list[int]]:
        """Anchors of all levels.

        Args:
            image_size: (H, W) of the padded batch tensor in pixels.
            grids: (H_l, W_l) of each level's feature map, lowest level first.

        Returns:
            ``(anchors, counts)``: float32 ``[sum_l H_l*W_l*A, 4]`` xyxy pixels, and the number
            of anchors of each level. Strides are ``level_strides`` when set, else
            ``image_size // grid`` (integer division; module doc).
        """
        if len(grids) != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} feature maps, got {len(grids)}")
        device = getattr(self, "cell_0").device
        key = (tuple(image_size), tuple(map(tuple, grids)), str(device))
        if key not in self._cache:
            per_level = [
                self.level_anchors(level, tuple(grid), self.level_stride(level, image_size, grid))
                for level, grid in enumerate(grids)
            ]
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = (torch.cat(per_level), [len(a) for a in per_level])
        return self._cache[key]

    def level_stride(self, level: int, image_size: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
        """(stride_y, stride_x) in pixels of ``level`` for a padded ``image_size`` and its ``grid`` (module doc)."""
        if self.level_strides is not None:
            return self.level_strides[level], self.level_strides[level]
        return image_size[0] // grid[0], image_size[1] // grid[1]


def default_anchor_sizes(min_level: int, max_level: int, *, base_level: int = 3) -> list[float]:
    """The papers' sizes 32 * 2^(l - base_level) px for levels l = min_level..max_level: 32 on P3
    ... 512 on P7 for RetinaNet (``base_level=3``, Focal Loss paper §4), 32 on P2 ... 512 on P6
    for the FPN paper's RPN (``base_level=2``, §4.1)."""
    return [32.0 * math.pow(2, level - base_level) for level in range(min_level, max_level + 1)]
