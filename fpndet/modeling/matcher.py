"""Anchor ↔ ground-truth assignment (RetinaNet §4 "Training").

An anchor is foreground for the ground-truth box it overlaps most when that IoU is ≥ 0.5,
background when its best IoU is < 0.4, and ignored in between. As in torchvision's
``Matcher(0.5, 0.4, allow_low_quality_matches=True)``, every ground-truth box additionally
hands its best anchors (ties included) back their own best match, so no box is left without an
anchor. COCO "crowd" regions are never matched; anchors that would be background but lie mostly
inside a crowd region are ignored instead.

The IoU matrix is never materialised for the whole batch: it is computed in chunks of anchors so
that each ``[B, G, chunk]`` intermediate holds at most ``max_chunk_elements`` values.

The same matcher serves the two-stage detectors of the FPN paper (§5.1, §5.2): the RPN matches
shared anchors ``[A, 4]`` with ``foreground_iou=0.7, background_iou=0.3`` and low-quality
matches; Fast R-CNN matches per-image RoIs ``[B, N, 4]`` (padded, with a validity mask) with
``foreground_iou=0.5, background_iou=0.5`` (background [0, 0.5)) and no low-quality matches.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .box_ops import box_area, pairwise_intersection

BACKGROUND = -1
IGNORE = -2


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that switches autocast off on ``device`` (no-op for devices autocast ignores)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


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

    def __call__(
        self,
        anchors: Tensor,
        gt_boxes: Tensor,
        gt_valid: Tensor,
        gt_crowd: Tensor,
        anchor_valid: Optional[Tensor] = None,
    ) -> Tensor:
        """Match ``anchors`` (or per-image candidate boxes such as RoIs) to the padded ground truth.

        Args:
            anchors: ``[A, 4]`` xyxy anchors in pixels shared by all images, or ``[B, A, 4]``
                per-image candidates (e.g. Fast R-CNN RoIs, padded to A per image).
            gt_boxes: ``[B, G, 4]`` xyxy ground-truth boxes in pixels, padded to G per image.
            gt_valid: bool ``[B, G]``, True for real boxes (False for padding).
            gt_crowd: bool ``[B, G]``, True for crowd regions (never matched as foreground).
            anchor_valid: optional bool ``[A]`` or ``[B, A]``, False for padded candidates: they
                take part in nothing (a gt's best IoU and its low-quality matches are taken over
                valid candidates only) and come back :data:`IGNORE`.

        Returns:
            int64 ``[B, A]`` on ``anchors.device``: the matched index in ``0..G-1``,
            :data:`BACKGROUND` (-1) or :data:`IGNORE` (-2). An image without valid non-crowd
            boxes has only BACKGROUND (or IGNORE inside crowd regions).

        Raises:
            ValueError: inconsistent shapes.
        """
        self._check_shapes(anchors, gt_boxes, gt_valid, gt_crowd, anchor_valid)
        device = anchors.device
        batch, num_gt, num_anchors = gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[-2]
        if num_gt == 0 or num_anchors == 0:
            return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.int64, device=device)
        dtype = torch.float64 if torch.float64 in (anchors.dtype, gt_boxes.dtype) else torch.float32
        with _no_autocast(device):
            anchors = (anchors if anchors.ndim == 3 else anchors[None]).to(dtype)
            if anchor_valid is not None:
                anchor_valid = anchor_valid.to(device=device, dtype=torch.bool).expand(batch, num_anchors)
            gt_boxes = gt_boxes.to(device=device, dtype=dtype)
            gt_valid = gt_valid.to(device=device, dtype=torch.bool)
            gt_crowd = gt_crowd.to(device=device, dtype=torch.bool)
            matchable = gt_valid & ~gt_crowd
            crowd = gt_valid & gt_crowd
            matches = self._match(anchors, gt_boxes, matchable, crowd, anchor_valid)
            if anchor_valid is not None:
                matches = matches.masked_fill(~anchor_valid, IGNORE)
            return matches

    @staticmethod
    def _check_shapes(
        anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor, anchor_valid: Optional[Tensor]
    ) -> None:
        if anchors.ndim not in (2, 3) or anchors.shape[-1] != 4:
            raise ValueError(f"anchors must be [A, 4] or [B, A, 4], got {list(anchors.shape)}")
        if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
            raise ValueError(f"gt_boxes must be [B, G, 4], got {list(gt_boxes.shape)}")
        if anchors.ndim == 3 and anchors.shape[0] != gt_boxes.shape[0]:
            raise ValueError(f"per-image anchors {list(anchors.shape)} and gt_boxes {list(gt_boxes.shape)} differ in B")
        for name, mask in (("gt_valid", gt_valid), ("gt_crowd", gt_crowd)):
            if mask.shape != gt_boxes.shape[:2]:
                raise ValueError(f"{name} must be [B, G] = {list(gt_boxes.shape[:2])}, got {list(mask.shape)}")
        if anchor_valid is not None and anchor_valid.shape != anchors.shape[:-1]:
            raise ValueError(f"anchor_valid must be {list(anchors.shape[:-1])}, got {list(anchor_valid.shape)}")

    def _chunks(self, batch: int, num_gt: int, num_anchors: int) -> list[slice]:
        size = max(1, self.max_chunk_elements // (batch * num_gt))
        return [slice(start, min(start + size, num_anchors)) for start in range(0, num_anchors, size)]

    def _match(
        self, anchors: Tensor, gt_boxes: Tensor, matchable: Tensor, crowd: Tensor, anchor_valid: Optional[Tensor]
    ) -> Tensor:
        """anchors ``[1 or B, A, 4]``; returns int64 ``[B, A]``."""
        batch, num_gt, num_anchors = gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[1]
        device = anchors.device
        best_iou = torch.empty((batch, num_anchors), dtype=anchors.dtype, device=device)
        best_gt = torch.empty((batch, num_anchors), dtype=torch.int64, device=device)
        in_crowd = torch.empty((batch, num_anchors), dtype=torch.bool, device=device)
        best_iou_per_gt = torch.full((batch, num_gt), -1.0, dtype=anchors.dtype, device=device)
        gt_area = box_area(gt_boxes)[..., None]
        unmatchable = ~matchable[..., None]
        chunks = self._chunks(batch, num_gt, num_anchors)

        def chunk_iou(chunk: slice) -> tuple[Tensor, Tensor, Tensor]:
            iou, inter, anchor_area = self._chunk_iou(anchors[:, chunk], gt_boxes, gt_area, unmatchable)
            if anchor_valid is not None:
                iou.masked_fill_(~anchor_valid[:, None, chunk], -1.0)
            return iou, inter, anchor_area

        # Pass 1: per-anchor best gt, per-gt best IoU (running max), crowd coverage.
        for chunk in chunks:
            iou, inter, anchor_area = chunk_iou(chunk)
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
                iou, _, _ = chunk_iou(chunk)
                is_gt_best[:, chunk] = ((iou == threshold) & matchable[..., None]).any(dim=1)
                del iou
            matches = torch.where(is_gt_best, best_gt, matches)

        return torch.where((matches == BACKGROUND) & in_crowd, IGNORE, matches)

    @staticmethod
    def _chunk_iou(
        anchors: Tensor, gt_boxes: Tensor, gt_area: Tensor, unmatchable: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """anchors ``[1 or B, C, 4]`` -> IoU ``[B, G, C]`` (-1 where the gt is unmatchable),
        intersections ``[B, G, C]``, anchor areas ``[1 or B, 1, C]``."""
        inter = pairwise_intersection(gt_boxes, anchors)
        anchor_area = box_area(anchors)[:, None, :]
        union = gt_area + anchor_area
        union.sub_(inter)
        iou = torch.div(inter, union, out=union)
        return iou.masked_fill_(unmatchable, -1.0), inter, anchor_area
