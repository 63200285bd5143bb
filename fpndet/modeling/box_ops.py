"""Box maths shared by every stage: areas, pairwise intersections and IoU, paired GIoU, clipping,
small-box filtering and batched class-wise NMS.

Conventions: boxes are xyxy in absolute pixels (``x1 <= x2``, ``y1 <= y2``; width ``x2 - x1``,
no "+1"), float32 unless stated otherwise. Formulas and rounding are those of
``torchvision.ops.boxes`` so results agree bitwise where torchvision has the same operation.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``[...]`` of xyxy ``boxes[..., 4]`` in pixels² (``(x2 - x1) * (y2 - y1)``)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection areas of every box of ``boxes1`` with every box of ``boxes2``.

    Args:
        boxes1: ``[..., N, 4]`` xyxy boxes (e.g. ground truth ``[B, G, 4]``).
        boxes2: ``[M, 4]`` boxes shared by all leading indices (e.g. anchors), or ``[..., M, 4]``
            with leading dims broadcasting against ``boxes1``'s (e.g. per-image RoIs
            ``[B, M, 4]``); same dtype and device.

    Returns:
        ``[..., N, M]`` intersection areas in pixels² (0 for disjoint boxes).
    """
    b1 = boxes1[..., :, None, :]
    b2 = boxes2[..., None, :, :]
    overlap_w = torch.minimum(b1[..., 2], b2[..., 2])
    overlap_w.sub_(torch.maximum(b1[..., 0], b2[..., 0])).clamp_(min=0)
    overlap_h = torch.minimum(b1[..., 3], b2[..., 3])
    overlap_h.sub_(torch.maximum(b1[..., 1], b2[..., 1])).clamp_(min=0)
    return overlap_w.mul_(overlap_h)


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union, ``[..., N, M]``, of ``boxes1 [..., N, 4]`` and ``boxes2``
    (``[M, 4]`` or ``[..., M, 4]``, see :func:`pairwise_intersection`).

    Same formula and rounding as ``torchvision.ops.box_iou`` (areas ``(x2-x1)*(y2-y1)``, union
    ``area1 + area2 - inter``); two zero-area boxes give NaN.
    """
    inter = pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., None] + box_area(boxes2)[..., None, :] - inter
    return inter.div_(union)


def paired_giou(boxes1: Tensor, boxes2: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of corresponding boxes, elementwise.

    GIoU = IoU - (|C| - |A ∪ B|) / |C| with C the smallest box enclosing both, in [-1, 1];
    ``eps`` is added to the union and the enclosing area before dividing (as
    ``torchvision.ops.generalized_box_iou_loss``).

    Args:
        boxes1, boxes2: ``[..., 4]`` xyxy boxes in pixels, same shape and float dtype.

    Returns:
        ``[...]`` GIoU values in the inputs' dtype.
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    u1, v1, u2, v2 = boxes2.unbind(-1)
    inter_w = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0)
    inter_h = (torch.minimum(y2, v2) - torch.maximum(y1, v1)).clamp(min=0)
    inter = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
    iou = inter / (union + eps)
    enclosing = (torch.maximum(x2, u2) - torch.minimum(x1, u1)) * (torch.maximum(y2, v2) - torch.minimum(y1, v1))
    return iou - (enclosing - union) / (enclosing + eps)


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip xyxy boxes ``[..., 4]`` to their image's (h, w) in ``image_sizes`` ``[..., 2]`` (pixels).

    ``image_sizes`` broadcasts against ``boxes[..., :2]`` (e.g. ``[B, 1, 2]`` for boxes
    ``[B, N, 4]``). Same values as ``torchvision.ops.clip_boxes_to_image``.
    """
    h, w = image_sizes[..., 0:1].to(boxes.dtype), image_sizes[..., 1:2].to(boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), torch.cat([w, h, w, h], dim=-1))


def boxes_at_least(boxes: Tensor, min_size: float) -> Tensor:
    """bool ``[...]``: width and height of ``boxes[..., 4]`` both ≥ ``min_size`` pixels
    (``torchvision.ops.remove_small_boxes`` as a mask)."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def batched_class_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group, all groups in one call.

    Boxes of different groups are shifted apart (in float64, by the coordinate span plus one
    pixel per group index) so they never overlap, then one ``torchvision.ops.nms`` runs. On the CPU
    with more than 4000 boxes (the RPN's thousands of proposals per image and level), whose NMS
    kernel compares every kept box with all later boxes, ``torchvision.ops.batched_nms`` runs one
    NMS per group instead (cost sum_g n_g^2 instead of M^2; 1.4 s -> 0.1 s for 8 images x 5
    levels x 1000 proposals); both keep the same boxes.

    Args:
        boxes: float ``[M, 4]`` xyxy pixels.
        scores: ``[M]``.
        groups: int64 ``[M]`` (e.g. image * K + class, or image * L + level).
        iou_threshold: boxes with IoU > this with a better box of their group are dropped.

    Returns:
        int64 indices of the kept boxes, sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.device.type == "cpu" and len(boxes) > 4000:
        return batched_nms(boxes, scores, groups, iou_threshold)
    boxes64 = boxes.double()
    offset = boxes64.max() - boxes64.min() + 1.0
    shifted = boxes64 + (groups.double() * offset)[:, None]
    return nms(shifted, scores.double(), iou_threshold)
