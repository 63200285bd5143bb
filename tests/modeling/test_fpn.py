"""FeaturePyramid top blocks and the FPN paper's Table 1 ablation switches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

from fpndet.modeling.fpn import FeaturePyramid

CHANNELS = [3, 4, 6, 8]


def inputs(batch: int = 1, size: int = 64) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, c, size // 2**level, size // 2**level) for c, level in zip(CHANNELS, (2, 3, 4, 5))]


def pyramid(**kwargs) -> FeaturePyramid:
    torch.manual_seed(1)
    return FeaturePyramid(in_channels=CHANNELS, in_levels=[2, 3, 4, 5], out_channels=5, min_level=2, **kwargs).eval()


def test_max_pool_top_block_is_p5_subsampled():
    fpn = pyramid(max_level=6, top_block="max_pool")
    assert fpn.levels == [2, 3, 4, 5, 6] and len(fpn.extra_convs) == 0
    with torch.no_grad():
        outputs = fpn(inputs())
    assert [tuple(o.shape[-2:]) for o in outputs] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert torch.equal(outputs[-1], outputs[-2][..., ::2, ::2])
    assert torch.equal(outputs[-1], F.max_pool2d(outputs[-2], 1, 2))


def test_conv_top_block_is_unchanged_by_default():
    fpn = pyramid(max_level=6)
    assert fpn.top_block == "conv" and len(fpn.extra_convs) == 1
    with torch.no_grad():
        outputs = fpn(inputs())
    assert torch.allclose(outputs[-1], fpn.extra_convs[0](inputs()[-1]))


def test_without_top_down_a_level_depends_only_on_its_own_input():
    fpn = pyramid(max_level=5, top_down=False)
    features = inputs()
    changed = list(features)
    changed[3] = features[3] + 1.0  # C5
    with torch.no_grad():
        a, b = fpn(features), fpn(changed)
        assert torch.equal(a[1], fpn.output_convs[1](fpn.lateral_convs[1](features[1])))
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))  # P2-P4 independent of C5
    assert not torch.equal(a[3], b[3])
    default = pyramid(max_level=5)
    with torch.no_grad():
        assert not torch.equal(default(features)[1], default(changed)[1])  # with top-down, P3 sees C5


def test_without_laterals_lower_levels_ignore_their_own_input():
    fpn = pyramid(max_level=5, lateral=False)
    assert len(fpn.lateral_convs) == 1 and len(fpn.output_convs) == 4
    features = inputs()
    changed = list(features)
    changed[1] = features[1] + 1.0  # C3
    with torch.no_grad():
        a, b = fpn(features), fpn(changed)
        top = fpn.lateral_convs[0](features[3])
        expected_p3 = fpn.output_convs[1](F.interpolate(top, scale_factor=4, mode="nearest"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # C3 is not used at all
    assert torch.allclose(a[1], expected_p3, atol=1e-6)


def test_ablation_switches_are_checked():
    with pytest.raises(ValueError, match="top_down=False and lateral=False"):
        pyramid(top_down=False, lateral=False)
    with pytest.raises(ValueError, match="top_block"):
        pyramid(top_block="pool")
    with pytest.raises(ValueError, match="norm"):
        pyramid(norm="layer")
    with pytest.raises(TypeError):
        FeaturePyramid(CHANNELS, [2, 3, 4, 5])  # keyword-only


def test_norm_wraps_lateral_and_output_convs():
    fpn = pyramid(max_level=6, top_block="max_pool", norm="frozen_batch")
    conv, norm = fpn.lateral_convs[0]
    assert conv.bias is None and isinstance(norm, FrozenBatchNorm2d)
    assert isinstance(fpn.output_convs[0][1], FrozenBatchNorm2d)
    with torch.no_grad():
        assert [o.shape[1] for o in fpn(inputs())] == [5] * 5
