"""Detections from head outputs in one batched pass (Focal Loss paper §4.1 "Inference").

Per level: sigmoid scores, score threshold (0.05), top-k (1000) candidates; decode their box
deltas; clip to the image; merge levels; class-wise NMS (0.5); keep the N best per image; scale
back to the original image size. All images and classes go through a single NMS call (boxes of
different (image, class) groups are offset apart in float64 so they never overlap), instead of
the per-image, per-level loops of torchvision.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from .box_coder import BoxCoder


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip ``[B, M, 4]`` xyxy boxes to ``image_sizes`` ``[B, 2]`` (h, w) pixels."""
    h = image_sizes[:, 0].to(boxes.dtype).view(-1, 1)
    w = image_sizes[:, 1].to(boxes.dtype).view(-1, 1)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), w).maximum(zero)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), h).maximum(zero)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), w).maximum(zero)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), h).maximum(zero)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def batched_class_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group, all groups in one call.

    Args: boxes float ``[M, 4]`` xyxy; scores ``[M]``; groups int64 ``[M]`` (e.g. image * K + class).
    Returns: int64 indices of kept boxes, sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes64 = boxes.double()
    offset = boxes64.max() - boxes64.min() + 1.0
    shifted = boxes64 + (groups.double() * offset)[:, None]
    return nms(shifted, scores.double(), iou_threshold)


def first_n_per_image(image_index: Tensor, n: int) -> Tensor:
    """Boolean mask keeping, for score-sorted entries, the first ``n`` of each image."""
    order = torch.sort(image_index, stable=True).indices
    sorted_images = image_index[order]
    first = torch.searchsorted(sorted_images, sorted_images, right=False)
    rank_sorted = torch.arange(len(order), device=image_index.device) - first
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank < n


class DetectionPostprocessor(nn.Module):
    """Args (keyword-only): box_coder, score_thresh, topk_candidates (per level), nms_thresh,
    detections_per_image, softmax (scores from a softmax over K+1 logits, background last)."""

    def __init__(
        self,
        *,
        box_coder: BoxCoder,
        score_thresh: float = 0.05,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        softmax: bool = False,
    ):
        super().__init__()
        self.box_coder = box_coder
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.softmax = softmax

    def class_scores(self, cls_logits: Tensor) -> Tensor:
        """``[B, A, K(+1)]`` logits -> ``[B, A, K]`` float32 object-class probabilities."""
        if self.softmax:
            return torch.softmax(cls_logits.float(), dim=-1)[..., :-1]
        return torch.sigmoid(cls_logits.float())

    def level_candidates(self, scores: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k over one level's ``[B, A_l, K]`` scores: (scores, anchor index, label), each ``[B, k]``."""
        num_classes = scores.shape[-1]
        flat = scores.flatten(1)
        flat = torch.where(flat > self.score_thresh, flat, torch.full_like(flat, -1.0))
        k = min(self.topk_candidates, flat.shape[1])
        top_scores, top_idx = flat.topk(k, dim=1)
        return top_scores, top_idx // num_classes + start, top_idx % num_classes

    def forward(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        anchors: Tensor,
        anchors_per_level: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Args:
            cls_logits: ``[B, A, K]`` (or K+1 with softmax); box_deltas ``[B, A, 4]``;
            anchors: float32 ``[A, 4]`` xyxy pixels of the padded batch; anchors_per_level: counts;
            image_sizes: (h, w) of the resized images; original_sizes: (h, w) of the inputs.
        Returns: per image ``{"boxes": float32 [N, 4] xyxy in original pixels, "scores": [N],
            "labels": int64 [N]}``, sorted by decreasing score, N <= detections_per_image.
        """
        scores = self.class_scores(cls_logits)
        device = scores.device
        parts, start = [], 0
        for count in anchors_per_level:
            parts.append(self.level_candidates(scores[:, start : start + count], start))
            start += count
        cand_scores = torch.cat([p[0] for p in parts], dim=1)
        cand_anchor = torch.cat([p[1] for p in parts], dim=1)
        cand_labels = torch.cat([p[2] for p in parts], dim=1)
        batch = cand_scores.shape[0]
        deltas = torch.gather(box_deltas.float(), 1, cand_anchor[..., None].expand(-1, -1, 4))
        boxes = self.box_coder.decode(deltas, anchors[cand_anchor])
        sizes = torch.tensor(image_sizes, device=device)
        boxes = clip_boxes(boxes, sizes)

        valid = cand_scores > self.score_thresh
        image_index = torch.arange(batch, device=device)[:, None].expand_as(cand_scores)[valid]
        boxes, kept_scores, labels = boxes[valid], cand_scores[valid], cand_labels[valid]
        keep = batched_class_nms(boxes, kept_scores, image_index * scores.shape[-1] + labels, self.nms_thresh)
        keep = keep[first_n_per_image(image_index[keep], self.detections_per_image)]
        keep = keep[torch.sort(image_index[keep], stable=True).indices]

        ratios = torch.tensor(
            [[o[1] / s[1], o[0] / s[0]] for o, s in zip(original_sizes, image_sizes)], dtype=torch.float32
        ).to(device)
        final_images = image_index[keep]
        final_boxes = boxes[keep] * ratios[final_images].repeat(1, 2)
        counts = torch.bincount(final_images, minlength=batch).tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(
                final_boxes.split(counts), kept_scores[keep].split(counts), labels[keep].split(counts)
            )
        ]
