"""Anchor ↔ ground-truth assignment (RetinaNet §4 "Training").

An anchor is foreground for the ground-truth box it overlaps most when that IoU is ≥ 0.5,
background when its best IoU is < 0.4, and ignored in between. As in torchvision's
``Matcher(0.5, 0.4, allow_low_quality_matches=True)``, every ground-truth box additionally
hands its best anchors (ties included) back their own best match, so no box is left without an
anchor. COCO "crowd" regions are never matched; anchors that would be background but lie mostly
inside a crowd region are ignored instead.

The IoU matrix is never materialised for the whole batch: it is computed in chunks of anchors so
that each ``[B, G, chunk]`` intermediate holds at most ``max_chunk_elements`` values.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

BACKGROUND = -1
IGNORE = -2


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that switches autocast off on ``device`` (no-op for devices autocast ignores)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``[...]`` of xyxy ``boxes[..., 4]`` in pixels² (``(x2 - x1) * (y2 - y1)``)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection areas of every box of ``boxes1`` with every box of ``boxes2``.

    Args:
        boxes1: ``[..., N, 4]`` xyxy boxes (e.g. ground truth ``[B, G, 4]``).
        boxes2: ``[M, 4]`` xyxy boxes (e.g. anchors), same dtype and device.

    Returns:
        ``[..., N, M]`` intersection areas in pixels² (0 for disjoint boxes).
    """
    b1 = boxes1[..., :, None, :]
    overlap_w = torch.minimum(b1[..., 2], boxes2[:, 2])
    overlap_w.sub_(torch.maximum(b1[..., 0], boxes2[:, 0])).clamp_(min=0)
    overlap_h = torch.minimum(b1[..., 3], boxes2[:, 3])
    overlap_h.sub_(torch.maximum(b1[..., 1], boxes2[:, 1])).clamp_(min=0)
    return overlap_w.mul_(overlap_h)


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union, ``[..., N, M]``, of ``boxes1 [..., N, 4]`` and ``boxes2 [M, 4]``.

    Same formula and rounding as ``torchvision.ops.box_iou`` (areas ``(x2-x1)*(y2-y1)``, union
    ``area1 + area2 - inter``); two zero-area boxes give NaN.
    """
    inter = pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., None] + box_area(boxes2) - inter
    return inter.div_(union)


class AnchorMatcher:
    """Assigns each anchor of each image a ground-truth index, :data:`BACKGROUND` or :data:`IGNORE`.

    Args (keyword-only):
        foreground_iou: best IoU ≥ this → matched (paper: 0.5).
        background_iou: best IoU < this → :data:`BACKGROUND` (paper: 0.4); in between → :data:`IGNORE`.
        allow_low_quality_matches: for each ground-truth box, the anchors with its highest IoU
            (ties included; even when that IoU is 0, exactly as torchvision) get their own best
            match back, whatever its IoU.
        crowd_ioa: an anchor that ends up :data:`BACKGROUND` becomes :data:`IGNORE` when
            intersection / anchor area with a crowd box is ≥ this.
        max_chunk_elements: upper bound on ``B * G * chunk`` for each IoU intermediate.

    Raises:
        ValueError: thresholds out of order or a non-positive ``max_chunk_elements``.
    """

    def __init__(
        self,
        *,
        foreground_iou: float = 0.5,
        background_iou: float = 0.4,
        allow_low_quality_matches: bool = True,
        crowd_ioa: float = 0.5,
        max_chunk_elements: int = 2**24,
    ):
        if background_iou > foreground_iou:
            raise ValueError(f"background_iou ({background_iou}) must be <= foreground_iou ({foreground_iou})")
        if max_chunk_elements < 1:
            raise ValueError(f"max_chunk_elements must be positive, got {max_chunk_elements}")
        self.foreground_iou = float(foreground_iou)
        self.background_iou = float(background_iou)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)
        self.crowd_ioa = float(crowd_ioa)
        self.max_chunk_elements = int(max_chunk_elements)

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor) -> Tensor:
        """Match ``anchors`` to the padded ground truth of a batch.

        Args:
            anchors: ``[A, 4]`` xyxy anchors in pixels, shared by all images.
            gt_boxes: ``[B, G, 4]`` xyxy ground-truth boxes in pixels, padded to G per image.
            gt_valid: bool ``[B, G]``, True for real boxes (False for padding).
            gt_crowd: bool ``[B, G]``, True for crowd regions (never matched as foreground).

        Returns:
            int64 ``[B, A]`` on ``anchors.device``: the matched index in ``0..G-1``,
            :data:`BACKGROUND` (-1) or :data:`IGNORE` (-2). An image without valid non-crowd
            boxes has only BACKGROUND (or IGNORE inside crowd regions).

        Raises:
            ValueError: inconsistent shapes.
        """
        self._check_shapes(anchors, gt_boxes, gt_valid, gt_crowd)
        device = anchors.device
        batch, num_gt, num_anchors = gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[0]
        if num_gt == 0 or num_anchors == 0:
            return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.int64, device=device)
        dtype = torch.float64 if torch.float64 in (anchors.dtype, gt_boxes.dtype) else torch.float32
        with _no_autocast(device):
            anchors = anchors.to(dtype)
            gt_boxes = gt_boxes.to(device=device, dtype=dtype)
            gt_valid = gt_valid.to(device=device, dtype=torch.bool)
            gt_crowd = gt_crowd.to(device=device, dtype=torch.bool)
            matchable = gt_valid & ~gt_crowd
            crowd = gt_valid & gt_crowd
            return self._match(anchors, gt_boxes, matchable, crowd)

    @staticmethod
    def _check_shapes(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor) -> None:
        if anchors.ndim != 2 or anchors.shape[-1] != 4:
            raise ValueError(f"anchors must be [A, 4], got {list(anchors.shape)}")
        if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
            raise ValueError(f"gt_boxes must be [B, G, 4], got {list(gt_boxes.shape)}")
        for name, mask in (("gt_valid", gt_valid), ("gt_crowd", gt_crowd)):
            if mask.shape != gt_boxes.shape[:2]:
                raise ValueError(f"{name} must be [B, G] = {list(gt_boxes.shape[:2])}, got {list(mask.shape)}")

    def _chunks(self, batch: int, num_gt: int, num_anchors: int) -> list[slice]:
        size = max(1, self.max_chunk_elements // (batch * num_gt))
        return [slice(start, min(start + size, num_anchors)) for start in range(0, num_anchors, size)]

    def _match(self, anchors: Tensor, gt_boxes: Tensor, matchable: Tensor, crowd: Tensor) -> Tensor:
        batch, num_gt, num_anchors = gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[0]
        device = anchors.device
        best_iou = torch.empty((batch, num_anchors), dtype=anchors.dtype, device=device)
        best_gt = torch.empty((batch, num_anchors), dtype=torch.int64, device=device)
        in_crowd = torch.empty((batch, num_anchors), dtype=torch.bool, device=device)
        best_iou_per_gt = torch.full((batch, num_gt), -1.0, dtype=anchors.dtype, device=device)
        gt_area = box_area(gt_boxes)[..., None]
        unmatchable = ~matchable[..., None]
        chunks = self._chunks(batch, num_gt, num_anchors)

        # Pass 1: per-anchor best gt, per-gt best IoU (running max), crowd coverage.
        for chunk in chunks:
            iou, inter, anchor_area = self._chunk_iou(anchors[chunk], gt_boxes, gt_area, unmatchable)
            values, indices = iou.max(dim=1)
            best_iou[:, chunk] = values
            best_gt[:, chunk] = indices
            if self.allow_low_quality_matches:
                torch.maximum(best_iou_per_gt, iou.amax(dim=2), out=best_iou_per_gt)
            del iou
            ioa = inter.div_(anchor_area)
            in_crowd[:, chunk] = ((ioa >= self.crowd_ioa) & crowd[..., None]).any(dim=1)
            del inter, ioa

        matches = torch.where(best_iou < self.background_iou, BACKGROUND, best_gt)
        matches = torch.where(
            (best_iou >= self.background_iou) & (best_iou < self.foreground_iou), IGNORE, matches
        )

        if self.allow_low_quality_matches:
            # Pass 2: anchors holding some gt's highest IoU (ties included) get their best gt back.
            is_gt_best = torch.empty((batch, num_anchors), dtype=torch.bool, device=device)
            threshold = best_iou_per_gt[..., None]
            for chunk in chunks:
                iou, _, _ = self._chunk_iou(anchors[chunk], gt_boxes, gt_area, unmatchable)
                is_gt_best[:, chunk] = ((iou == threshold) & matchable[..., None]).any(dim=1)
                del iou
            matches = torch.where(is_gt_best, best_gt, matches)

        return torch.where((matches == BACKGROUND) & in_crowd, IGNORE, matches)

    @staticmethod
    def _chunk_iou(
        anchors: Tensor, gt_boxes: Tensor, gt_area: Tensor, unmatchable: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """IoU ``[B, G, C]`` (-1 where the gt is unmatchable), intersections ``[B, G, C]``, anchor areas ``[C]``."""
        inter = pairwise_intersection(gt_boxes, anchors)
        anchor_area = box_area(anchors)
        union = gt_area + anchor_area
        union.sub_(inter)
        iou = torch.div(inter, union, out=union)
        return iou.masked_fill_(unmatchable, -1.0), inter, anchor_area
