"""RoI level assignment (FPN eq. 1) and multi-level RoIAlign against torchvision."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

from fpndet.modeling.poolers import MultiLevelRoIAlign, assign_levels


def square(side: float, x: float = 10.0, y: float = 20.0) -> list[float]:
    return [x, y, x + side, y + side]


def test_level_assignment_of_hand_made_boxes_equals_torchvision():
    boxes = torch.tensor([square(224), square(112), square(448), square(8), square(2000), square(223.9),
                          [0, 0, 112, 448], [0, 0, 1e-3, 1e-3]])
    ours = assign_levels(boxes)
    assert ours.tolist() == [4, 3, 5, 2, 5, 3, 4, 2]
    assert torch.equal(ours, LevelMapper(2, 5)([boxes[:3], boxes[3:]]) + 2)


def test_level_assignment_of_random_boxes_equals_torchvision():
    torch.manual_seed(0)
    xy = torch.rand(5000, 2) * 800
    wh = torch.exp(torch.rand(5000, 2) * 7)
    boxes = torch.cat([xy, xy + wh], dim=1)
    assert torch.equal(assign_levels(boxes), LevelMapper(2, 5)([boxes]) + 2)
    assert torch.equal(assign_levels(boxes.view(50, 100, 4)), assign_levels(boxes).view(50, 100))


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_equals_multiscale_roi_align(aligned):
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 160 // 2**level, 192 // 2**level) for level in (2, 3, 4, 5)]
    per_image = []
    for n in (40, 7):
        xy = torch.rand(n, 2) * 150
        per_image.append(torch.cat([xy, xy + 1 + torch.rand(n, 2) * 400], dim=1))
    reference = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = reference(dict(zip("0123", features)), per_image, [(160, 192), (150, 170)])
    pooler = MultiLevelRoIAlign(aligned=aligned)
    if not aligned:
        assert torch.equal(pooler(features, per_image), expected)
    # batched [B, N, 4] + mask gives the same rows as the per-image lists
    padded = torch.zeros(2, 40, 4)
    padded[0], padded[1, :7] = per_image[0], per_image[1]
    valid = torch.zeros(2, 40, dtype=torch.bool)
    valid[0], valid[1, :7] = True, True
    assert torch.equal(pooler(features, padded, valid), pooler(features, per_image))


def test_pooler_checks_its_inputs():
    with pytest.raises(ValueError, match="consecutive"):
        MultiLevelRoIAlign(levels=(2, 4))
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        MultiLevelRoIAlign()([torch.zeros(1, 1, 8, 8)], [torch.zeros(0, 4)])


def test_pool_by_masks_equals_the_pooler_on_every_real_roi():
    """The export's mask-selected pooling gives ``forward``'s features for each real RoI of a padded batch."""
    torch.manual_seed(0)
    pooler = MultiLevelRoIAlign(levels=(2, 3, 4, 5))
    features = [torch.rand(2, 8, 128 // 2**k, 160 // 2**k) for k in range(4)]
    xy = torch.rand(2, 30, 2) * torch.tensor([400.0, 300.0])
    wh = torch.rand(2, 30, 2) * 500 + 2  # 2..502 px: every level from P2 to P5
    boxes = torch.cat([xy, xy + wh], dim=-1)
    valid = torch.rand(2, 30) > 0.3
    assert pooler.roi_levels(boxes[valid]).unique().tolist() == [2, 3, 4, 5]
    dense = pooler.pool_by_masks(features, boxes)
    assert dense.shape == (60, 8, 7, 7)
    assert torch.equal(dense[valid.reshape(-1)], pooler(features, boxes, valid))
