"""Box maths against torchvision.ops."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou, remove_small_boxes

from fpndet.modeling.box_ops import (
    batched_class_nms,
    boxes_at_least,
    clip_boxes,
    paired_giou,
    pairwise_iou,
)


def random_boxes(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=generator) * 200 - 20
    return torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * 80], dim=1)


def test_pairwise_iou_shared_and_per_image_second_boxes():
    a, b = random_boxes(7, 0), random_boxes(30, 1)
    assert torch.equal(pairwise_iou(a, b), box_iou(a, b))
    batched = pairwise_iou(torch.stack([a, a]), torch.stack([b, b.flip(0)]))
    assert torch.equal(batched[0], box_iou(a, b)) and torch.equal(batched[1], box_iou(a, b.flip(0)))


def test_giou_clip_small_boxes_and_nms_equal_torchvision():
    a, b = random_boxes(50, 2), random_boxes(50, 3)
    assert torch.allclose(paired_giou(a, b, eps=0.0), generalized_box_iou(a, b).diagonal(), atol=1e-6)
    assert torch.equal(clip_boxes(a, torch.tensor([100, 150])), clip_boxes_to_image(a, (100, 150)))
    small = a.clone()
    small[::3, 2] = small[::3, 0] + 0.5
    assert torch.equal(torch.nonzero(boxes_at_least(small, 1.0)).squeeze(1), remove_small_boxes(small, 1.0))
    scores = torch.rand(50, generator=torch.Generator().manual_seed(4))
    groups = torch.arange(50) % 3
    assert torch.equal(batched_class_nms(a, scores, groups, 0.3), batched_nms(a, scores, groups, 0.3))


@pytest.mark.parametrize("count", [3000, 6000])  # the one-call path and the per-group path (> 4000 on CPU)
def test_batched_class_nms_equals_nms_per_group(count):
    from torchvision.ops import nms

    from fpndet.modeling.box_ops import batched_class_nms

    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(count, 2, generator=generator) * 300
    boxes = torch.cat([xy, xy + 10 + torch.rand(count, 2, generator=generator) * 60], 1)
    scores = torch.rand(count, generator=generator)
    groups = torch.randint(0, 12, (count,), generator=generator)
    keep = batched_class_nms(boxes, scores, groups, 0.5)
    reference = torch.cat([torch.nonzero(groups == g).flatten()[nms(boxes[groups == g], scores[groups == g], 0.5)]
                           for g in range(12)])
    assert set(keep.tolist()) == set(reference.tolist()) and len(keep) == len(reference)
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])  # by decreasing score
