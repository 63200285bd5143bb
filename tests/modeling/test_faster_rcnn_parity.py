"""Live parity with torchvision's Faster R-CNN (``fasterrcnn_resnet50_fpn`` v1 and ``_v2``) on real
coco128 images.

torchvision's model is built with random weights made to look trained: BatchNorm statistics
from real images (backbone, FPN and the v2 box head), then frozen; the RPN objectness conv is
scaled so objectness logits spread over a few units (distinct proposal scores), and the box
classifier makes three classes fire with distinct scores. fpndet's model is built by
the named configs ``faster_rcnn_r50_fpn_tv`` / ``_v2_tv`` (torchvision's settings) and loads the converted state dict strictly.
Both run side by side at 512 px on two single images (two sizes) and a mixed-size batch (v2
with 300 test-time proposals per image in both models, to keep the CPU suite fast).

fpndet's labels are torchvision's minus one (background logit at index 0 in both).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

tv_detection = pytest.importorskip("torchvision.models.detection")

from torchvision.models.detection import _utils as tv_det_utils  # noqa: E402
from torchvision.models.detection.rpn import concat_box_prediction_layers  # noqa: E402

from fpndet.data.images import load_image  # noqa: E402
from fpndet.modeling.build import build_model  # noqa: E402
from fpndet.modeling.config import named_config  # noqa: E402
from fpndet.modeling.sampling import PADDING, POSITIVE, NEGATIVE  # noqa: E402
from fpndet.modeling.torchvision_compat import convert_torchvision_faster_rcnn_state_dict  # noqa: E402
from tests.modeling.test_torchvision_parity import IMAGES, freeze_batchnorm, rel_err  # noqa: E402

MAX_ERRORS: dict[str, float] = {}
SIZE = 512
OBJECTNESS_STD = 2.0
ARCHS = {"fasterrcnn_resnet50_fpn": "v1", "fasterrcnn_resnet50_fpn_v2": "v2"}
# Proposals per image at test time: torchvision's 1000 for v1; 300 for v2 in both models, whose
# 4-conv box head on 1000 RoIs per image would dominate the CPU suite's time.
TEST_PROPOSALS = {"fasterrcnn_resnet50_fpn": 1000, "fasterrcnn_resnet50_fpn_v2": 300}


def note(key: str, value: float) -> None:
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), value)


@pytest.fixture(scope="module", autouse=True)
def report_max_errors():
    """Print the largest errors seen by this module's comparisons (visible with ``pytest -s``)."""
    yield
    for key, value in sorted(MAX_ERRORS.items()):
        print(f"parity {key}: {value:.3g}")


def collect_batchnorm_statistics(module: nn.Module, run) -> None:
    """Cumulative-average BatchNorm statistics of ``module`` over what ``run()`` feeds it."""
    batch_norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in batch_norms:
        m.momentum = None
        m.reset_running_stats()
    module.train()
    with torch.no_grad():
        run()
    module.eval()


def make_trained_looking(arch: str, images) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(tv_detection, arch)(weights=None, weights_backbone=None, num_classes=91).eval()
    model.transform.min_size = (SIZE,)
    with torch.no_grad():
        batch, _ = model.transform(list(images))
    collect_batchnorm_statistics(model.backbone, lambda: model.backbone(batch.tensors))
    freeze_batchnorm(model.backbone)
    with torch.no_grad():
        features = model.backbone(batch.tensors)
        objectness, _ = model.rpn.head(list(features.values()))
        spread = torch.cat([o.flatten() for o in objectness]).std()
        model.rpn.head.cls_logits.weight.mul_(OBJECTNESS_STD / spread)
        model.rpn.head.cls_logits.bias.fill_(-1.0)
        proposals, _ = model.rpn(batch, features)
        proposals = [p[:300] for p in proposals]  # enough for statistics, and faster
        pooled = model.roi_heads.box_roi_pool(features, proposals, batch.image_sizes)
    collect_batchnorm_statistics(model.roi_heads.box_head, lambda: model.roi_heads.box_head(pooled))
    freeze_batchnorm(model.roi_heads.box_head)
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        box_features = model.roi_heads.box_head(pooled)
        predictor.cls_score.weight.mul_(1.5 / predictor.cls_score(box_features).std())
        predictor.cls_score.bias.zero_()
        mean_logits = predictor.cls_score(box_features).mean(dim=0)
        target = torch.full((91,), -8.0)
        target[[0, 1, 18, 62]] = torch.tensor([1.0, 0.2, 0.1, 0.0])
        predictor.cls_score.bias.copy_(target - mean_logits)
    model.rpn._post_nms_top_n["testing"] = TEST_PROPOSALS[arch]
    return model.eval()


def build_ours(arch: str, tv_model: nn.Module) -> nn.Module:
    variant = ARCHS[arch]
    norms = {"fpn_norm": "frozen_batch", "roi_heads": {"box_head_norm": "frozen_batch"}} if variant == "v2" else {}
    preset = "faster_rcnn_r50_fpn_tv" if variant == "v1" else "faster_rcnn_r50_fpn_v2_tv"
    model = build_model(named_config(preset, min_size=[SIZE], **norms))
    model.load_state_dict(convert_torchvision_faster_rcnn_state_dict(tv_model.state_dict()))
    model.rpn.post_nms_topk = (model.rpn.post_nms_topk[0], TEST_PROPOSALS[arch])
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request):
    from tests.conftest import COCO128

    if not COCO128.exists():
        pytest.skip(f"shared data not found at {COCO128}")
    images = [load_image(COCO128 / "images" / name).float() / 255 for name in IMAGES]
    tv_model = make_trained_looking(request.param, images)
    return request.param, tv_model, build_ours(request.param, tv_model), images


def sorted_rows(boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows by decreasing score, ties by coordinates (orders of tied scores may differ)."""
    order = torch.argsort(boxes[:, 0], stable=True)
    order = order[torch.argsort(scores[order], descending=True, stable=True)]
    return boxes[order], scores[order]


def compare_boxes(tv_boxes, tv_scores, our_boxes, our_scores, tag) -> None:
    assert len(tv_boxes) == len(our_boxes), (tag, len(tv_boxes), len(our_boxes))
    if len(tv_boxes) == 0:
        return
    tv_boxes, tv_scores = sorted_rows(tv_boxes, tv_scores)
    our_boxes, our_scores = sorted_rows(our_boxes, our_scores)
    box_err = float((tv_boxes - our_boxes).abs().max())
    score_err = float((tv_scores - our_scores).abs().max())
    note(f"{tag} box px", box_err)
    note(f"{tag} score", score_err)
    assert box_err < 1e-3, (tag, box_err)
    assert score_err < 1e-5, (tag, score_err)


def compare_detections(tv_dets, our_dets, tag) -> None:
    for t, o in zip(tv_dets, our_dets, strict=True):
        assert len(t["boxes"]) == len(o["boxes"]), (tag, len(t["boxes"]), len(o["boxes"]))
        assert torch.equal(t["labels"], o["labels"] + 1), tag
        compare_boxes(t["boxes"], t["scores"], o["boxes"], o["scores"], tag)


def test_anchors_rpn_outputs_proposals_and_roi_features(pair):
    arch, tv_model, ours, images = pair
    with torch.no_grad():
        batch, _ = tv_model.transform(images)
        tv_features = tv_model.backbone(batch.tensors)
        tv_objectness, tv_deltas = concat_box_prediction_layers(*tv_model.rpn.head(list(tv_features.values())))
        tv_anchors = tv_model.rpn.anchor_generator(batch, list(tv_features.values()))[0]
        tv_proposals, _ = tv_model.rpn(batch, tv_features)
        our_batch = ours.preprocessor(images)
        assert torch.allclose(our_batch.tensor, batch.tensors, atol=1e-5)
        features = ours.features(our_batch.tensor)
        outputs = ours.rpn.outputs(features, tuple(our_batch.tensor.shape[-2:]))
        proposals = ours.rpn.proposals(outputs, our_batch.image_sizes)
    assert torch.equal(outputs.anchors, tv_anchors)
    for level, (a, b) in enumerate(zip(features, tv_features.values(), strict=True)):
        note(f"{arch} P{level + 2}", rel_err(a, b))
        assert rel_err(a, b) < 1e-4, level
    for name, a, b in [("objectness", outputs.objectness.reshape(-1, 1), tv_objectness),
                       ("rpn deltas", outputs.deltas.reshape(-1, 4), tv_deltas)]:
        note(f"{arch} {name}", rel_err(a, b))
        assert rel_err(a, b) < 1e-4, name
    for i, p in enumerate(proposals.to_list()):
        tv_scores = torch.sigmoid(torch.zeros(len(tv_proposals[i])))  # torchvision returns no scores here
        compare_boxes(tv_proposals[i], tv_scores, p["boxes"], tv_scores, f"{arch} proposals")
    # RoI features for the same boxes (torchvision's proposals) and the same feature maps.
    with torch.no_grad():
        tv_pooled = tv_model.roi_heads.box_roi_pool(tv_features, tv_proposals, batch.image_sizes)
        our_pooled = ours.roi_heads.pooler(list(tv_features.values())[:4], list(tv_proposals))
    assert torch.equal(our_pooled, tv_pooled)


def test_detections_single_images_and_mixed_batch(pair):
    arch, tv_model, ours, images = pair
    with torch.no_grad():
        for img in images[:2]:  # two image sizes
            compare_detections(tv_model([img]), ours([img]), f"{arch} single")
        tv_batch = tv_model(images)
        compare_detections(tv_batch, ours(images), f"{arch} batch")
    counts = [len(d["labels"]) for d in tv_batch]
    assert all(c >= 20 for c in counts) and len(torch.cat([d["labels"] for d in tv_batch]).unique()) == 3, counts


def coco_targets(names):
    from tests.conftest import COCO128

    coco = json.loads((COCO128 / "annotations" / "instances.json").read_text())
    targets = []
    for name in names:
        image_id = int(name.split(".")[0])
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        targets.append({"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns])})
    return targets


def lexsort_rows(boxes: torch.Tensor) -> torch.Tensor:
    """Row order sorting boxes by (x1, y1, x2, y2), coordinates rounded to 0.01 px."""
    keys = (boxes * 100).round()
    order = torch.arange(len(boxes))
    for column in range(3, -1, -1):
        order = order[torch.argsort(keys[order, column], stable=True)]
    return order


def same_rows(tv_boxes: torch.Tensor, our_boxes: torch.Tensor) -> torch.Tensor:
    """For each torchvision candidate, the index of the same box among ours (orders of proposals
    with tied scores may differ between the two implementations)."""
    assert tv_boxes.shape == our_boxes.shape, (tv_boxes.shape, our_boxes.shape)
    index = torch.empty(len(tv_boxes), dtype=torch.int64)
    index[lexsort_rows(tv_boxes)] = lexsort_rows(our_boxes)
    assert float((tv_boxes - our_boxes[index]).abs().max()) < 1e-3
    return index


class Recorder:
    """Wraps a callable and keeps the arguments of each call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.fn(*args)


def replay(tv_choices: list, tv_candidates: list | None = None, our_candidates: Recorder | None = None):
    """A ``BalancedSampler.choose`` returning torchvision's recorded choices, in call order.

    Anchors are in the same order in both models; RoI candidates (proposals + gt) are mapped box
    by box (``tv_candidates``: torchvision's per-image lists; ``our_candidates``: our matcher's
    calls, whose first argument is the ``[B, N, 4]`` candidates).
    """

    def choose(labels: torch.Tensor):
        tv_positive, tv_negative = tv_choices.pop(0)
        present = labels != PADDING
        positive, negative = torch.zeros_like(present), torch.zeros_like(present)
        for image, (tv_pos, tv_neg) in enumerate(zip(tv_positive, tv_negative, strict=True)):
            index = torch.nonzero(present[image]).squeeze(1)
            if tv_candidates is not None:
                index = index[same_rows(tv_candidates[image], our_candidates.calls[-1][0][image, index])]
            positive[image, index] = tv_pos.bool()
            negative[image, index] = tv_neg.bool()
        assert bool((labels[positive] == POSITIVE).all()) and bool((labels[negative] == NEGATIVE).all())
        return positive, negative

    return choose


def test_training_losses_with_the_same_samples(pair, monkeypatch):
    arch, tv_model, ours, images = pair
    targets = coco_targets(IMAGES[:2])
    targets.append({"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)})
    tv_choices, tv_candidates = [], []
    original = tv_det_utils.BalancedPositiveNegativeSampler.__call__

    def recording(self, matched_idxs):
        result = original(self, matched_idxs)
        tv_choices.append(result)
        return result

    assign = tv_model.roi_heads.assign_targets_to_proposals

    def recording_candidates(proposals, gt_boxes, gt_labels):
        tv_candidates.extend(proposals)
        return assign(proposals, gt_boxes, gt_labels)

    monkeypatch.setattr(tv_det_utils.BalancedPositiveNegativeSampler, "__call__", recording)
    monkeypatch.setattr(tv_model.roi_heads, "assign_targets_to_proposals", recording_candidates)
    our_candidates = Recorder(ours.roi_heads.matcher)
    monkeypatch.setattr(ours.roi_heads, "matcher", our_candidates)
    monkeypatch.setattr(ours.rpn.sampler, "choose", replay(tv_choices))
    monkeypatch.setattr(ours.roi_heads.sampler, "choose", replay(tv_choices, tv_candidates, our_candidates))
    tv_model.train()
    ours.train()
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            tv_losses = tv_model(images, [dict(t) for t in targets])
            our_losses = ours(images, [{"boxes": t["boxes"], "labels": t["labels"] - 1} for t in targets])
    finally:
        tv_model.eval()
        ours.eval()
    assert not tv_choices
    for ours_key, tv_key in [("loss_objectness", "loss_objectness"), ("loss_rpn_box", "loss_rpn_box_reg"),
                             ("loss_cls", "loss_classifier"), ("loss_box", "loss_box_reg")]:
        err = rel_err(our_losses[ours_key], tv_losses[tv_key])
        note(f"{arch} {ours_key}", err)
        assert err < 1e-5, (ours_key, float(our_losses[ours_key]), float(tv_losses[tv_key]))
