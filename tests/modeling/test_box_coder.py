from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from fpndet.modeling.box_coder import BoxCoder


def random_boxes(n: int, *, generator: torch.Generator, size: float = 800.0) -> torch.Tensor:
    """xyxy boxes with sides in [4, 204) px, so box/anchor size ratios stay below the clamp (62.5)."""
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * 200.0 + 4.0
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_matches_torchvision(weights):
    g = torch.Generator().manual_seed(0)
    boxes, anchors = random_boxes(1000, generator=g), random_boxes(1000, generator=g)
    ours = BoxCoder(weights=weights).encode(boxes, anchors)
    theirs = TorchvisionBoxCoder(weights).encode_single(boxes, anchors)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_matches_torchvision(weights):
    g = torch.Generator().manual_seed(1)
    anchors = random_boxes(1000, generator=g)
    deltas = torch.randn(1000, 4, generator=g) * 2.0  # dw up to ~8 (some beyond the clamp at ~4.1)
    ours = BoxCoder(weights=weights).decode(deltas, anchors)
    theirs = TorchvisionBoxCoder(weights).decode_single(deltas, anchors)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)


def test_encode_hand_computed_values():
    anchor = torch.tensor([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), size 10 x 20
    box = torch.tensor([5.0, 5.0, 25.0, 45.0])  # centre (15, 25), size 20 x 40
    deltas = BoxCoder().encode(box, anchor)
    expected = torch.tensor([1.0, 0.75, math.log(2.0), math.log(2.0)])
    torch.testing.assert_close(deltas, expected)
    weighted = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(box, anchor)
    torch.testing.assert_close(weighted, expected * torch.tensor([10.0, 10.0, 5.0, 5.0]))


def test_round_trip_recovers_boxes():
    g = torch.Generator().manual_seed(2)
    boxes, anchors = random_boxes(2000, generator=g), random_boxes(2000, generator=g)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    recovered = coder.decode(coder.encode(boxes, anchors), anchors)
    torch.testing.assert_close(recovered, boxes, rtol=0, atol=1e-3)


def test_decode_clamps_scale_before_exp():
    anchor = torch.tensor([[100.0, 100.0, 116.0, 132.0]])  # 16 x 32, centre (108, 116)
    coder = BoxCoder(weights=(1.0, 1.0, 2.0, 2.0), scale_clamp=math.log(1000.0 / 16))
    boxes = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 1e6]]), anchor)  # dw/ww = 50, dh/wh = 5e5
    assert torch.isfinite(boxes).all()
    width, height = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    assert width.item() == pytest.approx(16 * 1000.0 / 16, rel=1e-5)
    assert height.item() == pytest.approx(32 * 1000.0 / 16, rel=1e-5)
    assert (boxes[0, 0] + boxes[0, 2]).item() / 2 == pytest.approx(108.0)
    # Below the clamp the scale passes through: dw/ww = 1 -> width * e.
    unclamped = coder.decode(torch.tensor([[0.0, 0.0, 2.0, 0.0]]), anchor)
    assert (unclamped[0, 2] - unclamped[0, 0]).item() == pytest.approx(16 * math.e, rel=1e-6)


def test_leading_dims_broadcast():
    g = torch.Generator().manual_seed(3)
    batch, num_anchors = 3, 50
    anchors = random_boxes(num_anchors, generator=g)
    boxes = random_boxes(batch * num_anchors, generator=g).view(batch, num_anchors, 4)
    coder = BoxCoder()
    deltas = coder.encode(boxes, anchors)
    assert deltas.shape == (batch, num_anchors, 4)
    reference = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0))
    for b in range(batch):
        torch.testing.assert_close(deltas[b], reference.encode_single(boxes[b], anchors), rtol=1e-5, atol=1e-6)
    decoded = coder.decode(deltas, anchors)
    assert decoded.shape == (batch, num_anchors, 4)
    torch.testing.assert_close(decoded, boxes, rtol=0, atol=1e-3)


def test_half_inputs_and_autocast_compute_in_float32():
    g = torch.Generator().manual_seed(4)
    boxes, anchors = random_boxes(200, generator=g), random_boxes(200, generator=g)
    deltas = torch.randn(200, 4, generator=g)
    coder = BoxCoder()
    half = coder.encode(boxes.half(), anchors.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, coder.encode(boxes.half().float(), anchors.half().float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = coder.decode(deltas.bfloat16(), anchors)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, coder.decode(deltas.bfloat16().float(), anchors))


def test_float64_stays_float64():
    g = torch.Generator().manual_seed(5)
    boxes, anchors = random_boxes(10, generator=g).double(), random_boxes(10, generator=g).double()
    assert BoxCoder().encode(boxes, anchors).dtype == torch.float64


def test_rejects_wrong_number_of_weights():
    with pytest.raises(ValueError, match="4 entries"):
        BoxCoder(weights=(1.0, 1.0))
