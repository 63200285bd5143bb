"""Detections from head outputs in one batched pass (Focal Loss paper §4.1 "Inference").

Per level: sigmoid scores, score threshold (0.05), top-k (1000) candidates; decode their box
deltas; clip to the image; merge levels; class-wise NMS (0.5); keep the N best per image; scale
back to the original image size. All images and classes go through a single NMS call (boxes of
different (image, class) groups are offset apart in float64 so they never overlap), instead of
the per-image, per-level loops of torchvision.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .box_coder import BoxCoder
from .box_ops import batched_class_nms, clip_boxes


def logit_of(probability: float) -> float:
    """Inverse sigmoid, with -inf for probability <= 0 and +inf for >= 1."""
    if probability <= 0:
        return -math.inf
    if probability >= 1:
        return math.inf
    return math.log(probability / (1 - probability))


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

    def candidates(self, cls_logits: Tensor, anchors_per_level: Sequence[int]) -> tuple[Tensor, ...]:
        """Scores above the threshold, then the ``topk_candidates`` best of each (image, level).

        Only the few thousand entries above the threshold are ever sorted: they are ranked within
        their (image, level) group by one score sort and one stable group sort.

        Returns 1-D tensors over the kept candidates: image index, anchor index, label, score.
        """
        num_classes = cls_logits.shape[-1] - int(self.softmax)
        if self.softmax:
            flat = self.class_scores(cls_logits).flatten(1)
            image, flat_index = (flat > self.score_thresh).nonzero(as_tuple=True)
            scores = flat[image, flat_index]
        else:
            # sigmoid is monotonic: pre-select on the logits (with a margin), score the few left.
            logit_thresh = logit_of(self.score_thresh) - 1e-3
            flat_logits = cls_logits.flatten(1)
            image, flat_index = (flat_logits > logit_thresh).nonzero(as_tuple=True)
            scores = torch.sigmoid(flat_logits[image, flat_index].float())
            keep = scores > self.score_thresh
            image, flat_index, scores = image[keep], flat_index[keep], scores[keep]
        anchor = flat_index // num_classes
        bounds = torch.tensor(list(itertools.accumulate(anchors_per_level)), device=anchor.device)
        level = torch.bucketize(anchor, bounds, right=True)
        group = image * len(anchors_per_level) + level
        by_score = torch.sort(scores, descending=True, stable=True).indices
        order = by_score[torch.sort(group[by_score], stable=True).indices]
        sorted_group = group[order]
        rank = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_group, sorted_group)
        order = order[rank < self.topk_candidates]
        return image[order], anchor[order], flat_index[order] % num_classes, scores[order]

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
        device = cls_logits.device
        image_index, anchor_index, labels, kept_scores = self.candidates(cls_logits, anchors_per_level)
        boxes = self.box_coder.decode(box_deltas[image_index, anchor_index].float(), anchors[anchor_index])
        sizes = torch.tensor(image_sizes, device=device)[image_index]
        boxes = clip_boxes(boxes, sizes)
        num_classes = cls_logits.shape[-1] - int(self.softmax)
        batch = cls_logits.shape[0]
        keep = batched_class_nms(boxes, kept_scores, image_index * num_classes + labels, self.nms_thresh)
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
