"""Winograd F(4x4, 3x3) convolutions (``--backend winograd``): equal to the direct convolution
within float rounding at any size, only the convolutions it computes are replaced, and a detector
gives its eager detections."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fpndet.deploy.backends import open_detector
from fpndet.deploy.benchmark import compare
from fpndet.deploy.winograd import MIN_CHANNELS, WinogradConv2d, eligible, transform_filters, use_winograd
from fpndet.engine.checkpoints import save_model_weights
from fpndet.errors import InputError
from tests.deploy.test_backends import model_with_real_statistics


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("size", [(4, 4), (7, 9), (13, 5), (1, 1), (24, 36)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_direct_convolution_at_any_size(size, bias):
    """Any H, W (not only multiples of the 4x4 output tile), a batch of 2, with and without bias:
    within 5e-5 of the largest output (the transforms' rounding; Lavin & Gray 2016)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 7, 3, padding=1, bias=bias).eval()
    x = torch.randn(2, 12, *size)
    with torch.no_grad():
        expected = conv(x)
        found = WinogradConv2d(conv, compiled=False, max_positions=10**9)(x)
    assert found.shape == expected.shape
    assert found.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(found, expected) < 5e-5


def test_large_inputs_take_the_direct_convolution():
    """Above max_positions output positions (B * H * W) the module runs the direct convolution
    (bit-equal to it); at or below, the Winograd form (rounding differs from the direct one)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    winograd = WinogradConv2d(conv, compiled=False, max_positions=2 * 9 * 10)
    with torch.no_grad():
        small, large = torch.randn(2, 8, 9, 10), torch.randn(2, 8, 9, 11)
        assert torch.equal(winograd(large), conv(large))
        assert not torch.equal(winograd(small), conv(small))
        assert relative_error(winograd(small), conv(small)) < 5e-5


def test_transformed_filter_of_a_centred_impulse():
    """U = G g G^T of the identity filter (1 at the centre): G's middle column times its
    transpose, position by position (the transform itself, checked by hand-computed entries)."""
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0
    u = transform_filters(weight).reshape(6, 6)
    middle = torch.tensor([0, -1 / 6, 1 / 6, 1 / 12, -1 / 12, 0], dtype=torch.float64)
    assert torch.allclose(u.double(), middle[:, None] * middle[None, :], atol=1e-7)


def test_only_3x3_stride_1_convolutions_are_replaced():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), nn.Conv2d(4, 8, 3, padding=1),
    )
    assert [eligible(m) for m in model] == [True, False, False, False, False, False, True]
    assert use_winograd(model, min_channels=8) == 2  # 4 input channels: below min_channels
    assert [type(m).__name__ for m in model][:3] == ["WinogradConv2d", "Conv2d", "Conv2d"]
    assert isinstance(model[5][0], WinogradConv2d) and type(model[6]) is nn.Conv2d
    with pytest.raises(ValueError, match="3x3 stride-1"):
        WinogradConv2d(nn.Conv2d(8, 8, 3, padding=1, stride=2))


def test_winograd_backend_gives_the_eager_detections(tmp_path):
    """`--backend winograd` on a ResNet-18 RetinaNet: the 3x3 stride-1 convolutions of 128 or more
    input channels replaced (ResNet-18 stages 2-4: 9), their transforms compiled (dynamic shapes:
    two images of different sizes, a batch of both), the same detections as eager (boxes 0.05 px,
    scores 1e-4), and the compiled layers equal to the plain-operation ones."""
    model = model_with_real_statistics()
    save_model_weights(tmp_path / "best.safetensors", model.state_dict(), config=model.config.to_dict(),
                       metadata={"class_names": ["a", "b", "c"]})
    detector, names, backend = open_detector(tmp_path, backend="winograd")
    assert backend == "winograd" and names == ["a", "b", "c"]
    replaced = [m for m in detector.modules() if isinstance(m, WinogradConv2d)]
    assert len(replaced) == len([m for m in model.modules() if eligible(m) and m.in_channels >= MIN_CHANNELS]) == 9
    images = [torch.rand(3, 180, 240), torch.rand(3, 200, 150)]
    with torch.no_grad():
        reference, found = model(images), detector(images)
    assert all(len(r["boxes"]) > 0 for r in reference)
    assert compare(reference, found, box_tol=0.05, score_tol=1e-4)["equal"]
    layer = replaced[0]
    x = torch.randn(1, layer.in_channels, 11, 9)
    with torch.no_grad():
        plain = WinogradConv2d(nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1), compiled=False)
        plain.load_state_dict(layer.state_dict())
        assert layer.compiled and torch.allclose(layer(x), plain(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="runs on the CPU"):
        open_detector(tmp_path, backend="winograd", device=torch.device("cuda"))
