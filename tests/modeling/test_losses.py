from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops

from fpndet.modeling.losses import (
    alpha_balanced_cross_entropy,
    binary_cross_entropy,
    focal_loss_star,
    giou_loss,
    l1_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
    softmax_focal_loss,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_boxes(n: int, *, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 100
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 60 + 1
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def binary_inputs(n: int, *, seed: int, scale: float = 1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = (torch.rand(n, generator=g) < 0.3).to(dtype)
    return logits, targets


# ---------------------------------------------------------------- hand-computed values


def test_sigmoid_focal_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    targets = torch.tensor([1.0, 0.0, 0.3, 1.0])
    got = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    expected = []
    for x, y in zip(logits.tolist(), targets.tolist()):
        p = sigmoid(x)
        ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        p_t = p * y + (1 - p) * (1 - y)
        alpha_t = 0.25 * y + 0.75 * (1 - y)
        expected.append(alpha_t * (1 - p_t) ** 2 * ce)
    # e.g. x=2, y=1: 0.25 * (1 - 0.8808)^2 * 0.1269 = 4.51e-4
    assert expected[0] == pytest.approx(0.25 * (1 - sigmoid(2.0)) ** 2 * math.log(1 + math.exp(-2.0)))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)


def test_cross_entropy_variants_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.0])
    targets = torch.tensor([1.0, 1.0, 0.0])
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    torch.testing.assert_close(binary_cross_entropy(logits, targets), torch.tensor(ce))
    balanced = alpha_balanced_cross_entropy(logits, targets, alpha=0.25)
    torch.testing.assert_close(balanced, torch.tensor([0.25 * ce[0], 0.25 * ce[1], 0.75 * ce[2]]))


def test_focal_loss_star_hand_computed():
    logits = torch.tensor([1.0, 1.0, -2.0, 0.5])
    targets = torch.tensor([1.0, 0.0, 0.0, 0.25])
    got = focal_loss_star(logits, targets, gamma_star=2.0, beta_star=1.0)

    def fl_star(x_t: float) -> float:
        return -math.log(sigmoid(2.0 * x_t + 1.0)) / 2.0

    expected = [fl_star(1.0), fl_star(-1.0), fl_star(2.0), 0.25 * fl_star(0.5) + 0.75 * fl_star(-0.5)]
    assert expected[0] == pytest.approx(math.log(1 + math.exp(-3.0)) / 2)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)
    other = focal_loss_star(torch.tensor([1.0]), torch.tensor([1.0]), gamma_star=4.0, beta_star=0.0)
    assert other.item() == pytest.approx(-math.log(sigmoid(4.0)) / 4.0, rel=1e-6)


def test_softmax_focal_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]])
    targets = torch.tensor([1, 2])  # class 1, then background (last index)
    got = softmax_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    denom = math.exp(1.0) + math.exp(2.0) + math.exp(0.5)
    p1, p_bg = math.exp(2.0) / denom, math.exp(0.5) / denom
    expected = [-0.25 * (1 - p1) ** 2 * math.log(p1), -0.75 * (1 - p_bg) ** 2 * math.log(p_bg)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)


def test_smooth_l1_and_l1_hand_computed():
    pred = torch.tensor([0.05, -0.5, 2.0])
    target = torch.tensor([0.0, 0.0, 1.0])
    got = smooth_l1_loss(pred, target, beta=0.11)
    expected = torch.tensor([0.5 * 0.05**2 / 0.11, 0.5 - 0.055, 1.0 - 0.055])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta=0.0), torch.tensor([0.05, 0.5, 1.0]))
    torch.testing.assert_close(l1_loss(pred, target), torch.tensor([0.05, 0.5, 1.0]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g)
    torch.testing.assert_close(smooth_l1_loss(a, b, beta=0.11), F.smooth_l1_loss(a, b, beta=0.11, reduction="none"))


def test_giou_hand_computed():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    # overlap 1, union 7, hull 9: GIoU = 1/7 - 2/9; identical: 0; disjoint: 0 - (3 - 2)/3.
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 0.0, 1 + 1 / 3])
    torch.testing.assert_close(giou_loss(pred, target), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- relations between the losses


def test_focal_at_gamma_zero_is_cross_entropy():
    logits, targets = binary_inputs(1000, seed=1, scale=3.0)
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=0.0),
        alpha_balanced_cross_entropy(logits, targets, alpha=0.25),
    )
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha=None, gamma=0.0), binary_cross_entropy(logits, targets)
    )
    torch.testing.assert_close(
        binary_cross_entropy(logits, targets),
        F.binary_cross_entropy_with_logits(logits, targets, reduction="none"),
    )


def test_focal_loss_down_weights_easy_examples():
    # Paper §3.2: with γ=2 an example with p_t = 0.9 gets 100x less loss than CE.
    logit = torch.tensor([math.log(9.0)])  # p = 0.9
    ratio = sigmoid_focal_loss(logit, torch.ones(1), alpha=None) / binary_cross_entropy(logit, torch.ones(1))
    assert ratio.item() == pytest.approx(0.01, rel=1e-5)


def test_softmax_focal_at_gamma_zero_is_weighted_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 6, generator=g) * 3
    targets = torch.randint(0, 6, (64,), generator=g)
    weights = torch.where(targets == 5, 0.75, 0.25)
    expected = F.cross_entropy(logits, targets, reduction="none") * weights
    torch.testing.assert_close(softmax_focal_loss(logits, targets, alpha=0.25, gamma=0.0), expected)
    unweighted = softmax_focal_loss(logits, targets, alpha=None, gamma=0.0)
    torch.testing.assert_close(unweighted, F.cross_entropy(logits, targets, reduction="none"))


def test_two_class_softmax_focal_equals_sigmoid_focal():
    # softmax over [x, 0] gives p(object) = σ(x); object class 0, background class 1.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, generator=g, dtype=torch.float64) * 4
    object_target = torch.rand(200, generator=g) < 0.5
    softmax = softmax_focal_loss(torch.stack([x, torch.zeros_like(x)], -1), (~object_target).long())
    sigmoid_ = sigmoid_focal_loss(x, object_target.double())
    torch.testing.assert_close(softmax, sigmoid_, rtol=1e-10, atol=1e-12)


def test_softmax_focal_leading_dims():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 7, 4, generator=g)
    targets = torch.randint(0, 4, (2, 7), generator=g)
    loss = softmax_focal_loss(logits, targets)
    assert loss.shape == (2, 7)
    torch.testing.assert_close(loss.flatten(), softmax_focal_loss(logits.view(14, 4), targets.view(14)))


# ---------------------------------------------------------------- parity with torchvision


@pytest.mark.parametrize("alpha", [0.25, None])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_sigmoid_focal_parity_with_torchvision(alpha, gamma):
    logits, hard = binary_inputs(5000, seed=5, scale=3.0, dtype=torch.float64)
    soft = torch.rand(5000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tv_alpha = -1 if alpha is None else alpha
    for targets in (hard, soft):
        ours = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
        theirs = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=tv_alpha, gamma=gamma)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # float32 on normal inputs: within 1e-6 relative of torchvision's formula evaluated exactly.
    logits32, hard32 = binary_inputs(5000, seed=7, scale=1.0)
    ours32 = sigmoid_focal_loss(logits32, hard32, alpha=alpha, gamma=gamma)
    exact = torchvision.ops.sigmoid_focal_loss(logits32.double(), hard32.double(), alpha=tv_alpha, gamma=gamma)
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double(), exact, rtol=1e-6, atol=0)


def test_sigmoid_focal_float32_more_accurate_than_naive_form():
    # torchvision's float32 (1 - p_t) cancels for confident logits; ours stays accurate.
    logits, targets = binary_inputs(5000, seed=8, scale=4.0)
    exact = torchvision.ops.sigmoid_focal_loss(logits.double(), targets.double())

    def worst_relative_error(values: torch.Tensor) -> float:
        return ((values.double() - exact).abs() / exact).max().item()

    ours = worst_relative_error(sigmoid_focal_loss(logits, targets))
    naive = worst_relative_error(torchvision.ops.sigmoid_focal_loss(logits, targets))
    assert ours < 1e-5
    assert naive > 10 * ours


def test_giou_parity_with_torchvision():
    g = torch.Generator().manual_seed(9)
    pred, target = random_boxes(2000, generator=g), random_boxes(2000, generator=g)  # overlapping and disjoint
    ours = giou_loss(pred, target)
    theirs = torchvision.ops.generalized_box_iou_loss(pred, target)
    assert (ours > 1).any() and (ours < 1).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for reduction in ("sum", "mean"):
        torch.testing.assert_close(
            giou_loss(pred, target, reduction=reduction),
            torchvision.ops.generalized_box_iou_loss(pred, target, reduction=reduction),
            rtol=1e-5,
            atol=1e-4,
        )


# ---------------------------------------------------------------- stability and precision

EXTREME_LOGITS = [100.0, -100.0, 100.0, -100.0, 1e4, -1e4]
EXTREME_TARGETS = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "loss_fn",
    [
        sigmoid_focal_loss,
        lambda x, y: sigmoid_focal_loss(x, y, gamma=0.5, alpha=None),
        lambda x, y: sigmoid_focal_loss(x, y, gamma=0.0),
        binary_cross_entropy,
        alpha_balanced_cross_entropy,
        focal_loss_star,
    ],
    ids=["focal", "focal_gamma_half", "focal_gamma_zero", "bce", "alpha_ce", "fl_star"],
)
def test_binary_losses_finite_at_extreme_logits(loss_fn, dtype):
    logits = torch.tensor(EXTREME_LOGITS, dtype=dtype, requires_grad=True)
    targets = torch.tensor(EXTREME_TARGETS, dtype=dtype)
    loss = loss_fn(logits, targets)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    # Confidently wrong examples cost ~|x|: x=100 with y=0 (not ~0, not inf).
    assert loss[0].item() > 1.0


def test_extreme_values_are_exact():
    logits = torch.tensor([100.0, -100.0], requires_grad=True)
    targets = torch.tensor([0.0, 1.0])
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(loss, torch.tensor([0.75 * 100.0, 0.25 * 100.0]))
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([0.75, -0.25]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
def test_softmax_focal_finite_at_extreme_logits(dtype, gamma):
    logits = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, -100.0], [100.0, 100.0, -100.0]], dtype=dtype)
    logits.requires_grad_(True)
    targets = torch.tensor([0, 0, 2])
    loss = softmax_focal_loss(logits, targets, gamma=gamma)
    loss.sum().backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert loss[1].item() == pytest.approx(0.25 * 200.0, rel=1e-3)  # confidently wrong: -log p_t = 200


def test_autocast_inputs_computed_in_float32():
    logits, targets = binary_inputs(100, seed=10, scale=3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_logits = torch.mm(logits[None], torch.eye(100))[0]  # autocast makes this bfloat16
        assert half_logits.dtype == torch.bfloat16
        loss = sigmoid_focal_loss(half_logits, targets)
        box = giou_loss(random_boxes(5, generator=torch.Generator()).bfloat16(), random_boxes(5, generator=torch.Generator()))
    assert loss.dtype == torch.float32 and box.dtype == torch.float32
    torch.testing.assert_close(loss, sigmoid_focal_loss(half_logits.float(), targets))


# ---------------------------------------------------------------- gradients


def test_gradcheck_sigmoid_focal():
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(20, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    hard = (torch.rand(20, generator=g) < 0.5).double()
    soft = torch.rand(20, generator=g, dtype=torch.float64)
    for targets in (hard, soft):
        for gamma in (2.0, 0.5):
            assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, targets, gamma=gamma), (logits,))


def test_gradcheck_softmax_focal():
    g = torch.Generator().manual_seed(12)
    logits = (torch.randn(10, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, 5, (10,), generator=g)
    for gamma in (2.0, 0.5):
        assert torch.autograd.gradcheck(lambda x: softmax_focal_loss(x, targets, gamma=gamma), (logits,))


def test_gradcheck_focal_loss_star():
    g = torch.Generator().manual_seed(13)
    logits = (torch.randn(20, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.rand(20, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: focal_loss_star(x, targets, gamma_star=3.0, beta_star=0.5), (logits,))


def test_gradcheck_smooth_l1():
    # Distances 0.01..0.05 (quadratic) and 0.3..1 (linear), away from the kink at beta=0.11.
    distances = torch.tensor([0.01, -0.03, 0.05, 0.3, -0.6, 1.0], dtype=torch.float64)
    target = torch.linspace(-1, 1, 6, dtype=torch.float64)
    pred = (target + distances).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: smooth_l1_loss(p, target, beta=0.11), (pred,))


def test_gradcheck_giou():
    g = torch.Generator().manual_seed(14)
    pred = random_boxes(10, generator=g, dtype=torch.float64).requires_grad_(True)
    target = random_boxes(10, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: giou_loss(p, target), (pred,))


# ---------------------------------------------------------------- reductions and errors


@pytest.mark.parametrize(
    "loss_fn",
    [sigmoid_focal_loss, binary_cross_entropy, alpha_balanced_cross_entropy, focal_loss_star, smooth_l1_loss, l1_loss],
)
def test_reductions(loss_fn):
    logits, targets = binary_inputs(50, seed=15, scale=2.0)
    elementwise = loss_fn(logits, targets)
    assert elementwise.shape == (50,)
    torch.testing.assert_close(loss_fn(logits, targets, reduction="sum"), elementwise.sum())
    torch.testing.assert_close(loss_fn(logits, targets, reduction="mean"), elementwise.mean())
    empty = loss_fn(torch.zeros(0), torch.zeros(0), reduction="mean")
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(logits, targets, reduction="average")


def test_invalid_parameters_raise():
    x, y = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(x, y, alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma_star"):
        focal_loss_star(x, y, gamma_star=0.0)
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(x, y, beta=-0.1)
    with pytest.raises(ValueError, match="K\\+1"):
        softmax_focal_loss(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target_classes"):
        softmax_focal_loss(torch.zeros(3, 4), torch.zeros(4, dtype=torch.long))
