"""Every model option does what it says: for each option a test that fails if the option were
ignored, checked against an independent reference where that is cheap (losses recomputed here
from their formulas, NMS by ``torchvision.ops.nms``, RoIAlign by ``torchvision.ops.roi_align``,
level assignment from FPN eq. 1).

Options: ``model.box_scale_clamp``; ``model.retinanet.{box_weights, focal_alpha, focal_gamma,
focal_star_gamma, focal_star_beta, smooth_l1_beta, box_loss_weight, cls_loss}``;
``model.rpn.{box_weights, smooth_l1_beta, box_loss, pre_nms_topk_train, pre_nms_topk_test,
min_box_size, score_thresh, nms_thresh}``; ``model.roi_heads.{pooler_resolution, sampling_ratio,
canonical_size, canonical_level, num_convs, box_weights, smooth_l1_beta}``.

Every model is built from a :class:`ModelConfig` by ``build_model``, so a builder that dropped an
option fails here too. Models are small (ResNet-18, 32-channel FPN, 128 px images, 3 classes).
"""
from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

from fpndet.modeling.build import build_model
from fpndet.modeling.config import ModelConfig, named_config
from fpndet.modeling.criterion import pad_targets
from fpndet.modeling.rpn import Proposals, RPNOutputs

NUM_CLASSES = 3
SIZE = 128  # square test images: the pre-processor keeps them as they are (no resize, no padding)


# ============================================================================ helpers
def retinanet_config(*, top: dict | None = None, **retinanet) -> ModelConfig:
    """A small ResNet-18 RetinaNet; ``retinanet`` holds ``model.retinanet`` fields."""
    section = {"head_channels": 32, "head_depth": 1, **retinanet}
    return ModelConfig(num_classes=NUM_CLASSES, backbone="resnet18", fpn_channels=32, min_size=[SIZE],
                       max_size=SIZE, retinanet=section, **(top or {}))


def two_stage_config(arch: str = "faster_rcnn", *, rpn: dict | None = None, roi_heads: dict | None = None,
                     **top) -> ModelConfig:
    """The FPN paper's Faster R-CNN (P2-P6, RoI heads on P2-P5), ResNet-18 sized for 128 px."""
    roi = {"fc_dim": 64, "conv_dim": 16, **(roi_heads or {})}
    return named_config("faster_rcnn_r50_fpn", arch=arch, num_classes=NUM_CLASSES, backbone="resnet18",
                        fpn_channels=32, min_size=[SIZE], max_size=SIZE, rpn=rpn or {}, roi_heads=roi, **top)


def build(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config)


def unit_encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(dx, dy, dw, dh) of ``boxes`` relative to ``anchors`` with weights 1 (float64, written
    here from the R-CNN parameterisation, independently of the library's BoxCoder)."""
    boxes, anchors = boxes.double(), anchors.double()
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    gx, gy = boxes[:, 0] + gw / 2, boxes[:, 1] + gh / 2
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], dim=1)


def unit_decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    deltas, anchors = deltas.double(), anchors.double()
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + aw / 2 + deltas[:, 0] * aw, anchors[:, 1] + ah / 2 + deltas[:, 1] * ah
    w, h = aw * torch.exp(deltas[:, 2]), ah * torch.exp(deltas[:, 3])
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise smooth-L1 of ``diff`` (plain L1 for beta = 0)."""
    return F.smooth_l1_loss(diff.double(), torch.zeros_like(diff, dtype=torch.float64), beta=beta, reduction="none")


# ============================================================================ RetinaNet losses
# A 4-anchor problem whose matching is known: anchors 0 and 2 are foreground (IoU 0.63 with
# gt 0, class 1; IoU 0.83 with gt 1, class 2), anchors 1 and 3 background (IoU 0).
ANCHORS = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]])
GT_BOXES = torch.tensor([[1.0, 1, 11, 12], [41, 0, 50, 11]])
TARGETS = [{"boxes": GT_BOXES, "labels": torch.tensor([1, 2])}]
FOREGROUND, FG_GT = [0, 2], [0, 1]
ONE_HOT = torch.zeros(1, 4, NUM_CLASSES, dtype=torch.float64)
ONE_HOT[0, 0, 1] = ONE_HOT[0, 2, 2] = 1.0


def head_outputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(1, 4, NUM_CLASSES, generator=g) * 6 - 3  # probabilities 0.05 .. 0.95
    deltas = torch.randn(1, 4, 4, generator=g) * 0.3
    return logits, deltas


def criterion_losses(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The losses of the criterion that ``build_model(config)`` assembled, on the 4-anchor problem."""
    logits, deltas = head_outputs(seed)
    return build(config).criterion(logits, deltas, ANCHORS, TARGETS)


def reference_cls(kind: str, *, alpha: float = 0.25, gamma: float = 2.0, gamma_star: float = 2.0,
                  beta_star: float = 1.0, seed: int = 0) -> float:
    """The classification loss of the paper's formulas, summed over anchors and classes and
    divided by the 2 foreground anchors."""
    x = head_outputs(seed)[0].double()
    y = ONE_HOT
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    if kind == "bce":
        loss = ce
    elif kind == "balanced_bce":
        loss = alpha_t * ce
    elif kind == "sigmoid_focal":
        loss = alpha_t * (1 - p_t) ** gamma * ce
    elif kind == "focal_star":  # appendix A: -log(sigmoid(gamma* x_t + beta*)) / gamma*
        x_t = x * (2 * y - 1)
        loss = -F.logsigmoid(gamma_star * x_t + beta_star) / gamma_star
    else:
        raise AssertionError(kind)
    return float(loss.sum() / len(FOREGROUND))


def reference_box(*, beta: float, weights=(1.0, 1.0, 1.0, 1.0), seed: int = 0) -> float:
    deltas = head_outputs(seed)[1][0, FOREGROUND].double()
    target = unit_encode(GT_BOXES[FG_GT], ANCHORS[FOREGROUND]) * torch.tensor(weights, dtype=torch.float64)
    return float(smooth_l1(deltas - target, beta).sum() / len(FOREGROUND))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_retinanet_focal_gamma_is_the_focusing_exponent(gamma):
    got = criterion_losses(retinanet_config(focal_gamma=gamma))["loss_cls"]
    assert float(got) == pytest.approx(reference_cls("sigmoid_focal", gamma=gamma), rel=1e-5)


def test_retinanet_larger_focal_gamma_gives_a_smaller_loss():
    values = [float(criterion_losses(retinanet_config(focal_gamma=g))["loss_cls"]) for g in (0.0, 0.5, 2.0, 5.0)]
    assert all(a > b for a, b in pairwise(values)), values


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.75])
def test_retinanet_focal_alpha_weights_positives_against_negatives(alpha):
    got = criterion_losses(retinanet_config(focal_alpha=alpha))["loss_cls"]
    assert float(got) == pytest.approx(reference_cls("sigmoid_focal", alpha=alpha), rel=1e-5)


def test_retinanet_focal_gamma_zero_is_the_balanced_cross_entropy_of_the_whole_model():
    """On a real forward pass: γ = 0 turns the focal loss into α-balanced BCE, and with α = 0.5
    into half the plain BCE; the box loss is untouched."""
    images = [torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(1))]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 80], [70, 20, 140, 110]]), "labels": torch.tensor([0, 2])}]

    def losses(**retinanet):
        with torch.no_grad():
            return build(retinanet_config(**retinanet)).train()(images, targets)

    focal0 = losses(focal_gamma=0.0)
    balanced = losses(cls_loss="balanced_bce")
    assert float(focal0["loss_cls"]) == pytest.approx(float(balanced["loss_cls"]), rel=1e-5)
    assert torch.equal(focal0["loss_box"], balanced["loss_box"])
    half = losses(focal_gamma=0.0, focal_alpha=0.5)
    plain = losses(cls_loss="bce")
    assert float(half["loss_cls"]) == pytest.approx(0.5 * float(plain["loss_cls"]), rel=1e-5)
    default = losses()
    assert float(default["loss_cls"]) < 0.6 * float(focal0["loss_cls"])  # γ = 2 down-weights the easy negatives


@pytest.mark.parametrize("cls_loss, alpha", [("bce", 0.25), ("bce", 0.6), ("balanced_bce", 0.25),
                                             ("balanced_bce", 0.6), ("focal_star", 0.25)])
def test_retinanet_cls_loss_selects_the_loss(cls_loss, alpha):
    got = criterion_losses(retinanet_config(cls_loss=cls_loss, focal_alpha=alpha))["loss_cls"]
    assert float(got) == pytest.approx(reference_cls(cls_loss, alpha=alpha), rel=1e-5)
    # ...and not the default focal loss
    assert float(got) != pytest.approx(reference_cls("sigmoid_focal", alpha=alpha), rel=1e-2)


@pytest.mark.parametrize("gamma_star, beta_star", [(2.0, 1.0), (1.0, 0.0), (4.0, 2.0), (3.0, -1.0)])
def test_retinanet_focal_star_gamma_and_beta(gamma_star, beta_star):
    config = retinanet_config(cls_loss="focal_star", focal_star_gamma=gamma_star, focal_star_beta=beta_star)
    got = criterion_losses(config)["loss_cls"]
    assert float(got) == pytest.approx(
        reference_cls("focal_star", gamma_star=gamma_star, beta_star=beta_star), rel=1e-5)


def test_retinanet_focal_star_options_change_the_loss():
    def value(**options):
        return float(criterion_losses(retinanet_config(cls_loss="focal_star", **options))["loss_cls"])

    default = value()
    assert value(focal_star_gamma=4.0) != pytest.approx(default, rel=1e-3)
    assert value(focal_star_beta=0.0) != pytest.approx(default, rel=1e-3)


@pytest.mark.parametrize("beta", [0.0, 0.05, 0.11, 0.5])
def test_retinanet_smooth_l1_beta_sets_the_box_loss(beta):
    got = criterion_losses(retinanet_config(smooth_l1_beta=beta))["loss_box"]
    assert float(got) == pytest.approx(reference_box(beta=beta), rel=1e-5)


def test_retinanet_smooth_l1_beta_zero_is_l1_and_larger_beta_gives_less_loss():
    values = [float(criterion_losses(retinanet_config(smooth_l1_beta=b))["loss_box"]) for b in (0.0, 0.05, 0.11, 0.5)]
    assert all(a > b for a, b in pairwise(values)), values
    l1 = float(criterion_losses(retinanet_config(box_loss="l1"))["loss_box"])
    assert values[0] == pytest.approx(l1, rel=1e-6)


@pytest.mark.parametrize("weight", [0.5, 2.0, 3.0])
def test_retinanet_box_loss_weight_multiplies_the_box_loss_exactly(weight):
    images = [torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(2)), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 80], [70, 20, 140, 110]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[5.0, 5, 40, 40]]), "labels": torch.tensor([1])}]
    with torch.no_grad():
        base = build(retinanet_config()).train()(images, targets)
        weighted = build(retinanet_config(box_loss_weight=weight)).train()(images, targets)
    assert float(base["loss_box"]) > 0
    if weight in (0.5, 2.0):  # a power of two: exact in floating point
        assert torch.equal(weighted["loss_box"], base["loss_box"] * weight)
    else:
        assert float(weighted["loss_box"]) == pytest.approx(weight * float(base["loss_box"]), rel=1e-6)
    assert torch.equal(weighted["loss_cls"], base["loss_cls"])


WEIGHTS = (2.0, 3.0, 4.0, 5.0)


def test_retinanet_box_weights_scale_the_targets_and_the_decoding():
    model = build(retinanet_config(box_weights=list(WEIGHTS)))
    unit = unit_encode(GT_BOXES[FG_GT], ANCHORS[FOREGROUND])
    scaled = unit * torch.tensor(WEIGHTS, dtype=torch.float64)
    encoded = model.criterion.box_coder.encode(GT_BOXES[FG_GT], ANCHORS[FOREGROUND])
    torch.testing.assert_close(encoded.double(), scaled, rtol=1e-5, atol=1e-6)
    # the weighted deltas are the exact targets: zero box loss, while unit-weight targets miss them
    logits = head_outputs()[0]
    deltas = torch.zeros(1, 4, 4)
    deltas[0, FOREGROUND] = scaled.float()
    assert float(model.criterion(logits, deltas, ANCHORS, TARGETS)["loss_box"]) < 1e-5
    default = build(retinanet_config())
    assert float(default.criterion(logits, deltas, ANCHORS, TARGETS)["loss_box"]) > 0.1
    # inference decodes with the same weights: the weighted deltas give back the ground truth
    decoded = model.postprocessor.box_coder.decode(scaled.float(), ANCHORS[FOREGROUND])
    torch.testing.assert_close(decoded, GT_BOXES[FG_GT], rtol=0, atol=1e-4)


# ============================================================================ box_scale_clamp
def stage_coders(clamp: float) -> dict:
    """The box coder of every stage of the models built with ``box_scale_clamp=clamp``."""
    retina = build(retinanet_config(top={"box_scale_clamp": clamp}))
    two = build(two_stage_config(box_scale_clamp=clamp))
    return {"retinanet.criterion": retina.criterion.box_coder,
            "retinanet.postprocessor": retina.postprocessor.box_coder,
            "rpn": two.rpn.box_coder, "roi_heads": two.roi_heads.box_coder}


@pytest.mark.parametrize("clamp", [0.0, 0.5, 2.0])
def test_box_scale_clamp_caps_decoded_width_and_height_in_every_stage(clamp):
    anchor = torch.tensor([[10.0, 20, 26, 28]])  # 16 x 8, centre (18, 24)
    for stage, coder in stage_coders(clamp).items():
        _, _, ww, wh = coder.weights
        wild = torch.tensor([[0.0, 0.0, 10.0 * ww, 10.0 * wh]])  # exp(10): far beyond any clamp here
        box = coder.decode(wild, anchor)[0]
        scale = math.exp(clamp)
        assert float(box[2] - box[0]) == pytest.approx(16 * scale, rel=1e-5), stage
        assert float(box[3] - box[1]) == pytest.approx(8 * scale, rel=1e-5), stage
        assert float(box[0] + box[2]) / 2 == pytest.approx(18.0, abs=1e-4), stage
        tame = torch.tensor([[0.0, 0.0, (clamp - 0.3) * ww, (clamp - 0.7) * wh]])  # below the clamp: exact
        box = coder.decode(tame, anchor)[0]
        assert float(box[2] - box[0]) == pytest.approx(16 * math.exp(clamp - 0.3), rel=1e-5), stage
        assert float(box[3] - box[1]) == pytest.approx(8 * math.exp(clamp - 0.7), rel=1e-5), stage


# ============================================================================ RPN proposals
GRIDS = [(SIZE // 2**level, SIZE // 2**level) for level in range(2, 7)]  # P2..P6 of a 128 px image


def rpn_inputs(rpn, seed: int = 0) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """The RPN's anchors for a 128 px image and distinct random objectness logits."""
    anchors, counts = rpn.anchor_generator((SIZE, SIZE), GRIDS)
    objectness = torch.randn(1, len(anchors), generator=torch.Generator().manual_seed(seed)) * 2
    return anchors, counts, objectness


def proposals_of(rpn, objectness, deltas=None, *, training: bool = False) -> Proposals:
    """The RPN's proposals for given head outputs (zero deltas when none: the anchors themselves)."""
    anchors, counts = rpn.anchor_generator((SIZE, SIZE), GRIDS)
    deltas = torch.zeros(1, len(anchors), 4) if deltas is None else deltas
    rpn.train(training)
    return rpn.proposals(RPNOutputs(objectness, deltas, anchors, counts), [(SIZE, SIZE)])


def clipped(boxes: torch.Tensor) -> torch.Tensor:
    return boxes.clamp(min=0, max=SIZE)


# Every proposal kept: NMS at IoU 1 suppresses nothing (it drops IoU > threshold), caps above
# the anchor count (4092 at 128 px).
KEEP_ALL = {"nms_thresh": 1.0, "pre_nms_topk_train": 5000, "pre_nms_topk_test": 5000,
            "post_nms_topk_train": 10000, "post_nms_topk_test": 10000}


def rpn_of(**options):
    return build(two_stage_config("rpn", rpn={**KEEP_ALL, **options})).rpn


def test_rpn_keep_all_settings_keep_every_anchor():
    """The baseline of the tests below: with no cap, threshold or suppression, every anchor
    (zero deltas: the anchor itself, clipped) becomes a proposal."""
    rpn = rpn_of()
    anchors, counts, objectness = rpn_inputs(rpn)
    found = proposals_of(rpn, objectness)
    assert int(found.valid.sum()) == len(anchors) == sum(counts) == 4092


@pytest.mark.parametrize("k", [5, 50])
def test_rpn_pre_nms_topk_test_caps_candidates_per_level(k):
    rpn = rpn_of(pre_nms_topk_test=k)
    anchors, counts, objectness = rpn_inputs(rpn)
    found = proposals_of(rpn, objectness)
    assert int(found.valid.sum()) == sum(min(k, c) for c in counts)  # 5 x 5 levels, or 50+50+50+48+12
    # they are the k best of each level
    best, start = [], 0
    for count in counts:
        best.append(objectness[0, start:start + count].topk(min(k, count)).values)
        start += count
    expected = torch.sigmoid(torch.cat(best)).sort(descending=True).values
    torch.testing.assert_close(found.scores[found.valid].sort(descending=True).values, expected)


def test_rpn_pre_nms_topk_train_applies_in_training_and_test_at_test_time():
    rpn = rpn_of(pre_nms_topk_train=7, pre_nms_topk_test=3)
    anchors, counts, objectness = rpn_inputs(rpn)
    deltas = torch.zeros(1, len(anchors), 4)
    assert int(proposals_of(rpn, objectness, deltas, training=True).valid.sum()) == 7 * len(counts)
    assert int(proposals_of(rpn, objectness, deltas, training=False).valid.sum()) == 3 * len(counts)


@pytest.mark.parametrize("min_size", [12.0, 20.0, 40.0])
def test_rpn_min_box_size_removes_the_small_proposals(min_size):
    rpn = rpn_of(min_box_size=min_size)
    anchors, _, objectness = rpn_inputs(rpn)
    found = proposals_of(rpn, objectness)
    boxes = found.boxes[found.valid]
    assert bool(((boxes[:, 2] - boxes[:, 0]) >= min_size).all() and ((boxes[:, 3] - boxes[:, 1]) >= min_size).all())
    reference = clipped(anchors)  # zero deltas: the proposals are the clipped anchors
    large = ((reference[:, 2] - reference[:, 0]) >= min_size) & ((reference[:, 3] - reference[:, 1]) >= min_size)
    assert int(found.valid.sum()) == int(large.sum()) < len(anchors)


@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.8])
def test_rpn_score_thresh_removes_proposals_below_it(thresh):
    rpn = rpn_of(score_thresh=thresh)
    anchors, _, objectness = rpn_inputs(rpn)
    found = proposals_of(rpn, objectness)
    scores = found.scores[found.valid]
    assert bool((scores >= thresh).all())
    assert int(found.valid.sum()) == int((torch.sigmoid(objectness) >= thresh).sum()) < len(anchors)


def rpn_nms_reference(anchors, counts, objectness, thresh: float) -> int:
    """Proposals left by torchvision's NMS within each level (zero deltas, nothing else dropped)."""
    kept, start = 0, 0
    for count in counts:
        boxes = clipped(anchors[start:start + count])
        kept += len(nms(boxes, torch.sigmoid(objectness[0, start:start + count]), thresh))
        start += count
    return kept


@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7, 0.9])
def test_rpn_nms_thresh_equals_torchvision_nms_within_each_level(thresh):
    rpn = rpn_of(nms_thresh=thresh)
    anchors, counts, objectness = rpn_inputs(rpn)
    found = proposals_of(rpn, objectness)
    assert int(found.valid.sum()) == rpn_nms_reference(anchors, counts, objectness, thresh)


def test_rpn_lower_nms_thresh_keeps_fewer_proposals():
    counts = []
    for thresh in (0.3, 0.5, 0.7, 0.9):
        rpn = rpn_of(nms_thresh=thresh)
        anchors, _, objectness = rpn_inputs(rpn)
        counts.append(int(proposals_of(rpn, objectness).valid.sum()))
    assert all(a < b for a, b in pairwise(counts)), counts


@pytest.mark.parametrize("clamp", [0.0, math.log(2.0)])
def test_box_scale_clamp_limits_the_size_of_rpn_proposals(clamp):
    """Deltas asking for boxes e^10 times their anchor give anchors grown by exactly
    e^clamp about their centres (then clipped), not boxes covering the image."""
    rpn = build(two_stage_config("rpn", box_scale_clamp=clamp, rpn={"pre_nms_topk_test": 5000})).rpn
    anchors, _, objectness = rpn_inputs(rpn)
    deltas = torch.tensor([0.0, 0.0, 10.0, 10.0]).expand(1, len(anchors), 4)
    found = proposals_of(rpn, objectness, deltas)
    boxes = found.boxes[found.valid]
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    half = (anchors[:, 2:] - anchors[:, :2]) / 2 * math.exp(clamp)
    expected = clipped(torch.cat([centre - half, centre + half], dim=1))
    nearest = torch.cdist(boxes.double(), expected.double(), p=float("inf")).min(dim=1).values
    assert float(nearest.max()) < 1e-3  # every proposal is a grown, clipped anchor
    assert len(boxes) > 200  # NMS 0.7 within levels leaves many (a full-image box per level would leave ~5)


# ============================================================================ RPN losses
GT_BOX = torch.tensor([[30.0, 40, 90, 100]])


def rpn_losses(rpn, deltas: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """RPN losses for one 128 px image with one box; the anchor sample is drawn from ``seed``."""
    anchors, counts = rpn.anchor_generator((SIZE, SIZE), GRIDS)
    objectness = torch.zeros(1, len(anchors))
    gt = pad_targets([{"boxes": GT_BOX, "labels": torch.tensor([0])}], torch.device("cpu"))
    torch.manual_seed(seed)
    with torch.no_grad():
        return rpn.train().losses(RPNOutputs(objectness, deltas, anchors, counts), gt)


def test_rpn_box_weights_scale_the_targets_and_the_decoding():
    rpn = build(two_stage_config("rpn", rpn={"box_weights": list(WEIGHTS), **KEEP_ALL, "nms_thresh": 0.7})).rpn
    anchors, _, objectness = rpn_inputs(rpn)
    unit = unit_encode(GT_BOX.expand(len(anchors), 4), anchors)
    scaled = unit * torch.tensor(WEIGHTS, dtype=torch.float64)
    torch.testing.assert_close(rpn.box_coder.encode(GT_BOX, anchors).double(), scaled, rtol=1e-5, atol=1e-5)
    deltas = scaled.float()[None]  # every anchor regressed exactly onto the box
    assert float(rpn_losses(rpn, deltas)["loss_rpn_box"]) < 1e-6
    default = build(two_stage_config("rpn")).rpn  # weights 1: the same deltas miss, the unit ones hit
    assert float(rpn_losses(default, deltas)["loss_rpn_box"]) > 1e-3
    assert float(rpn_losses(default, unit.float()[None])["loss_rpn_box"]) < 1e-6
    # proposals decode with the same weights: every level's proposals collapse onto the box
    found = proposals_of(rpn, objectness, deltas)
    boxes = found.boxes[found.valid]
    assert len(boxes) == 5  # one per level after NMS
    torch.testing.assert_close(boxes, GT_BOX.expand(5, 4), rtol=0, atol=1e-3)


OFFSET = 0.05  # every positive anchor's four deltas miss their target by exactly this


@pytest.mark.parametrize("rpn_options, per_value", [
    ({"box_loss": "smooth_l1"}, 0.5 * OFFSET**2 * 9),  # default beta 1/9: quadratic part
    ({"box_loss": "smooth_l1", "smooth_l1_beta": 1.0}, 0.5 * OFFSET**2),
    ({"box_loss": "smooth_l1", "smooth_l1_beta": 0.01}, OFFSET - 0.005),  # linear part
    ({"box_loss": "smooth_l1", "smooth_l1_beta": 0.0}, OFFSET),
    ({"box_loss": "l1", "smooth_l1_beta": 1.0}, OFFSET),  # l1 ignores beta
])
def test_rpn_smooth_l1_beta_and_box_loss_set_the_box_loss(rpn_options, per_value):
    """Same anchors sampled (same seed), every positive off by OFFSET in each delta: the box
    loss is n_pos * 4 * loss(OFFSET) / n_sampled, so its ratio to the L1 loss is loss(OFFSET) / OFFSET."""
    rpn = build(two_stage_config("rpn", rpn=rpn_options)).rpn
    l1 = build(two_stage_config("rpn", rpn={"box_loss": "l1"})).rpn
    anchors, _ = rpn.anchor_generator((SIZE, SIZE), GRIDS)
    deltas = (unit_encode(GT_BOX.expand(len(anchors), 4), anchors) + OFFSET).float()[None]
    got = float(rpn_losses(rpn, deltas)["loss_rpn_box"])
    reference = float(rpn_losses(l1, deltas)["loss_rpn_box"])
    assert reference > 0
    assert got / reference == pytest.approx(per_value / OFFSET, rel=1e-3)


# ============================================================================ RoI heads
POOL_LEVELS = (2, 3, 4, 5)


def pyramid(channels: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, channels, SIZE >> level, SIZE >> level, generator=g) for level in POOL_LEVELS]


ROIS = torch.tensor([[4.0, 6, 40, 50], [30, 20, 110, 90], [10, 10, 120, 126], [60, 64, 76, 72]])


@pytest.mark.parametrize("resolution", [3, 5, 7])
@pytest.mark.parametrize("box_head", ["fc", "conv"])
def test_roi_pooler_resolution_sets_the_pooled_size(resolution, box_head):
    model = build(two_stage_config(roi_heads={"pooler_resolution": resolution, "box_head": box_head,
                                              "num_convs": 1}))
    pooled = model.roi_heads.pooler(pyramid(), [ROIS])
    assert pooled.shape == (len(ROIS), 32, resolution, resolution)
    first_linear = next(m for m in model.roi_heads.box_head.modules() if isinstance(m, torch.nn.Linear))
    expected_in = (32 if box_head == "fc" else 16) * resolution * resolution
    assert first_linear.in_features == expected_in
    logits, deltas = model.roi_heads.predict(pyramid(), ROIS[None], torch.ones(1, len(ROIS), dtype=torch.bool))
    assert logits.shape == (len(ROIS), NUM_CLASSES + 1) and deltas.shape == (len(ROIS), NUM_CLASSES + 1, 4)


def reference_pool(features, boxes, levels, *, resolution=7, sampling_ratio=2) -> torch.Tensor:
    """``torchvision.ops.roi_align`` of each box on the map of its given level."""
    out = []
    for box, level in zip(boxes, levels):
        feature = features[POOL_LEVELS.index(int(level))]
        rois = torch.cat([torch.zeros(1), box])[None]
        out.append(roi_align(feature, rois, output_size=resolution, spatial_scale=2.0**-int(level),
                             sampling_ratio=sampling_ratio, aligned=False))
    return torch.cat(out)


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_roi_sampling_ratio_is_roialigns_sampling_ratio(ratio):
    pooler = build(two_stage_config(roi_heads={"sampling_ratio": ratio})).roi_heads.pooler
    features = pyramid()
    levels = pooler.roi_levels(ROIS)
    got = pooler(features, [ROIS])
    torch.testing.assert_close(got, reference_pool(features, ROIS, levels, sampling_ratio=ratio))
    other = reference_pool(features, ROIS, levels, sampling_ratio=3)
    assert (got - other).abs().max() > 1e-3  # the samples taken do change the pooled values


SIDES = [16.0, 40.0, 64.0, 100.0, 150.0, 224.0, 300.0, 448.0]
SQUARES = torch.tensor([[0.0, 0.0, s, s] for s in SIDES])


def eq1_levels(canonical_size: float, canonical_level: int) -> list[int]:
    """FPN eq. 1: k = floor(k0 + log2(sqrt(wh) / canonical_size)), clamped to P2..P5."""
    return [min(5, max(2, math.floor(canonical_level + math.log2(s / canonical_size) + 1e-6))) for s in SIDES]


@pytest.mark.parametrize("canonical_size, canonical_level", [(224, 4), (112, 4), (448, 4), (224, 3), (224, 5)])
def test_roi_canonical_size_and_level_set_the_level_of_each_roi(canonical_size, canonical_level):
    pooler = build(two_stage_config(roi_heads={"canonical_size": canonical_size,
                                               "canonical_level": canonical_level})).roi_heads.pooler
    expected = eq1_levels(canonical_size, canonical_level)
    assert pooler.roi_levels(SQUARES).tolist() == expected
    if (canonical_size, canonical_level) != (224, 4):
        assert expected != eq1_levels(224, 4)  # the setting makes a difference on these boxes
    # each RoI is pooled from the map of its level (boxes kept inside the 128 px maps)
    boxes = torch.tensor([[2.0, 2, 2 + s, 2 + s] for s in (16.0, 40.0, 64.0, 100.0)])
    levels = pooler.roi_levels(boxes)
    features = pyramid()
    torch.testing.assert_close(pooler(features, [boxes]), reference_pool(features, boxes, levels))


def test_roi_canonical_size_moves_a_roi_to_another_map():
    """A 64 px RoI: P2 at the default 224 (floor(4 + log2(64/224)) = 2), P4 at 64; the pooled
    values are those of that map."""
    box = torch.tensor([[20.0, 30, 84, 94]])
    features = pyramid()
    default = build(two_stage_config()).roi_heads.pooler
    moved = build(two_stage_config(roi_heads={"canonical_size": 64})).roi_heads.pooler
    assert default.roi_levels(box).tolist() == [2] and moved.roi_levels(box).tolist() == [4]
    torch.testing.assert_close(default(features, [box]), reference_pool(features, box, [2]))
    torch.testing.assert_close(moved(features, [box]), reference_pool(features, box, [4]))
    assert (default(features, [box]) - moved(features, [box])).abs().max() > 1e-2


@pytest.mark.parametrize("num_convs", [1, 2, 4])
def test_roi_num_convs_sets_the_depth_of_the_conv_box_head(num_convs):
    model = build(two_stage_config(roi_heads={"box_head": "conv", "num_convs": num_convs}))
    head = model.roi_heads.box_head
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == num_convs
    assert [c.in_channels for c in convs] == [32] + [16] * (num_convs - 1)
    one = build(two_stage_config(roi_heads={"box_head": "conv", "num_convs": 1})).roi_heads.box_head
    extra = sum(p.numel() for p in head.parameters()) - sum(p.numel() for p in one.parameters())
    assert extra == (num_convs - 1) * (16 * 16 * 9 + 16)  # each added 3x3 conv 16 -> 16 with bias
    assert head(torch.randn(2, 32, 7, 7)).shape == (2, 64)


ROI_WEIGHT_CASES = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), WEIGHTS]


@pytest.mark.parametrize("weights", ROI_WEIGHT_CASES)
def test_roi_box_weights_scale_the_targets_and_the_decoding_of_detections(weights):
    model = build(two_stage_config(roi_heads={"box_weights": list(weights)})).eval()
    heads = model.roi_heads
    scaled = unit_encode(GT_BOXES, ROIS[:2]) * torch.tensor(weights, dtype=torch.float64)
    torch.testing.assert_close(heads.box_coder.encode(GT_BOXES, ROIS[:2]).double(), scaled, rtol=1e-5, atol=1e-5)
    # a predictor giving the same weighted deltas d * weights for every RoI and class
    d = torch.tensor([0.1, -0.05, math.log(1.2), math.log(0.9)])
    with torch.no_grad():
        heads.predictor.bbox_pred.weight.zero_()
        heads.predictor.bbox_pred.bias.copy_((d * torch.tensor(weights)).repeat(NUM_CLASSES + 1))
        heads.predictor.cls_score.weight.zero_()
        heads.predictor.cls_score.bias.copy_(torch.tensor([0.0, 2.0, 1.0, 0.5]))
        found = heads.detect(pyramid(), Proposals.from_list([ROIS]), [(SIZE, SIZE)])
    expected = clipped(unit_decode(d.expand(len(ROIS), 4), ROIS)).float()
    assert len(found.boxes) == len(ROIS) * NUM_CLASSES  # nothing suppressed: different classes
    nearest = torch.cdist(found.boxes, expected, p=float("inf")).min(dim=1).values
    assert float(nearest.max()) < 1e-3  # each detection is its proposal moved by d


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9, 0.5, 2.0])
def test_roi_smooth_l1_beta_sets_the_box_loss(beta):
    """Proposals near two boxes (all foreground, all sampled); the predictor outputs zero
    deltas, so the box loss is the smooth-L1 of the weighted targets over all sampled RoIs."""
    heads = build(two_stage_config(roi_heads={"smooth_l1_beta": beta})).roi_heads.train()
    gt_boxes = torch.tensor([[10.0, 10, 60, 70], [70, 60, 120, 110]])
    proposals = torch.tensor([[12.0, 8, 63, 66], [8, 13, 58, 72], [72, 57, 118, 112], [66, 64, 123, 106]])
    matched = gt_boxes[[0, 0, 1, 1]]
    with torch.no_grad():
        heads.predictor.bbox_pred.weight.zero_()
        heads.predictor.bbox_pred.bias.zero_()
    gt = pad_targets([{"boxes": gt_boxes, "labels": torch.tensor([0, 2])}], torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        got = float(heads.losses(pyramid(), Proposals.from_list([proposals]), gt)["loss_box"])
    targets = unit_encode(matched, proposals) * torch.tensor([10.0, 10, 5, 5], dtype=torch.float64)
    sampled = len(proposals) + len(gt_boxes)  # the gt boxes join the RoIs (zero targets, zero loss)
    assert float(smooth_l1(targets, beta).sum()) / sampled == pytest.approx(got, rel=1e-5)


def test_roi_larger_smooth_l1_beta_gives_a_smaller_box_loss():
    gt = pad_targets([{"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([1])}], torch.device("cpu"))
    proposals = Proposals.from_list([torch.tensor([[12.0, 8, 63, 66], [8, 13, 58, 72], [11, 11, 61, 69]])])
    values = []
    for beta in (0.0, 1.0 / 9, 0.5, 2.0):
        heads = build(two_stage_config(roi_heads={"smooth_l1_beta": beta})).roi_heads.train()
        torch.manual_seed(0)
        with torch.no_grad():
            values.append(float(heads.losses(pyramid(), proposals, gt)["loss_box"]))
    assert all(a > b for a, b in pairwise(values)), values
