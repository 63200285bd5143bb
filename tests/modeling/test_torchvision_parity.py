"""Live parity with torchvision's RetinaNet (v1 and v2) on real images.

torchvision's model is built with random weights made to look trained: BatchNorm statistics are
collected from real images and frozen (FrozenBatchNorm2d, as in published checkpoints), and the
classification conv is scaled and biased so each image keeps 50-250 distinct-score detections
before the 300 cap. It is converted with ``fpndet.from_torchvision`` and both run side by side.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

tv_detection = pytest.importorskip("torchvision.models.detection")

from fpndet.data.images import load_image  # noqa: E402
from fpndet.modeling.torchvision_compat import from_torchvision  # noqa: E402

IMAGES = ["000000000009.jpg", "000000000034.jpg", "000000000025.jpg"]
MAX_ERRORS: dict[str, float] = {}
CLS_SCALE = {"retinanet_resnet50_fpn": 20.0, "retinanet_resnet50_fpn_v2": 2.0}
GROW = 1.8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


def detections_per_image(model, images) -> list[int]:
    """Detections before the 300 cap (the cap lifted temporarily)."""
    cap = model.detections_per_img
    model.detections_per_img = 10_000
    with torch.no_grad():
        counts = [len(d["boxes"]) for d in model(images)]
    model.detections_per_img = cap
    return counts


def make_trained_looking(arch: str, images) -> nn.Module:
    torch.manual_seed(0)
    builder = getattr(tv_detection, arch)
    model = builder(weights=None, weights_backbone=None, num_classes=91)
    # BatchNorm statistics from real images (cumulative average), then frozen.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    model.transform.min_size = (512,)
    with torch.no_grad():
        batch, _ = model.transform([img for img in images])
        model.backbone(batch.tensors)
    freeze_batchnorm(model)
    model.eval()
    # Distinct scores: scale the classification conv; three classes fire (others never), with
    # larger boxes (dw = dh = GROW) so NMS leaves 50-250 detections per image.
    head = model.head
    with torch.no_grad():
        head.classification_head.cls_logits.weight.mul_(CLS_SCALE[arch])
        head.classification_head.cls_logits.bias.copy_(torch.full((91,), -15.0).repeat(9))
        bias = head.classification_head.cls_logits.bias.view(9, 91)
        bias[:, 1], bias[:, 18], bias[:, 62] = 0.0, -1.0, -2.0
        head.regression_head.bbox_reg.bias.view(9, 4)[:, 2:] = GROW
    counts = detections_per_image(model, images)
    assert all(50 <= c <= 250 for c in counts), counts
    return model


@pytest.fixture(scope="module", autouse=True)
def report_max_errors():
    """Print the largest errors seen by this module's comparisons (visible with ``pytest -s``)."""
    yield
    for key, value in sorted(MAX_ERRORS.items()):
        print(f"parity {key}: {value:.3g}")


@pytest.fixture(scope="module", params=["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"])
def pair(request):
    from tests.conftest import COCO128

    if not COCO128.exists():
        pytest.skip(f"shared data not found at {COCO128}")
    images = [load_image(COCO128 / "images" / name).float() / 255 for name in IMAGES]
    tv_model = make_trained_looking(request.param, images)  # at 512 px: keeps the CPU suite fast
    ours = from_torchvision(tv_model.state_dict(), arch=request.param).eval()
    ours.preprocessor.min_size = [512]
    return request.param, tv_model, ours, images


def compare_detections(tv_dets, our_dets, tag):
    for t, o in zip(tv_dets, our_dets):
        assert len(t["boxes"]) == len(o["boxes"]), tag
        assert torch.equal(t["labels"], o["labels"]), tag
        box_err = float((t["boxes"] - o["boxes"]).abs().max()) if len(t["boxes"]) else 0.0
        score_err = float((t["scores"] - o["scores"]).abs().max()) if len(t["boxes"]) else 0.0
        MAX_ERRORS[f"{tag} box px"] = max(MAX_ERRORS.get(f"{tag} box px", 0.0), box_err)
        MAX_ERRORS[f"{tag} score"] = max(MAX_ERRORS.get(f"{tag} score", 0.0), score_err)
        assert box_err < 1e-3, (tag, box_err)
        assert score_err < 1e-5, (tag, score_err)


def test_features_heads_and_anchors(pair):
    arch, tv_model, ours, images = pair
    with torch.no_grad():
        batch, _ = tv_model.transform(images)
        tv_feats = list(tv_model.backbone(batch.tensors).values())
        tv_head = tv_model.head(tv_feats)
        tv_anchors = tv_model.anchor_generator(batch, tv_feats)[0]
        ours_batch = ours.preprocessor(images)
        assert torch.allclose(ours_batch.tensor, batch.tensors, atol=1e-5)
        out = ours.head_outputs(ours_batch.tensor)
    assert torch.equal(out.anchors, tv_anchors)
    for level, (a, b) in enumerate(zip(out.features, tv_feats)):
        err = rel_err(a, b)
        MAX_ERRORS[f"{arch} P{level + 3}"] = err
        assert err < 1e-4, (level, err)
    for name, a, b in [("cls", out.cls_logits, tv_head["cls_logits"]), ("box", out.box_deltas, tv_head["bbox_regression"])]:
        err = rel_err(a, b)
        MAX_ERRORS[f"{arch} head {name}"] = err
        assert err < 1e-4, (name, err)


def test_detections_single_images_and_mixed_batch(pair):
    arch, tv_model, ours, images = pair
    with torch.no_grad():
        for img in images[:2]:  # two image sizes (640x480 and 500x375 pictures)
            compare_detections(tv_model([img]), ours([img]), f"{arch} single")
        compare_detections(tv_model(images), ours(images), f"{arch} batch")


def test_detections_at_default_800px(pair):
    arch, tv_model, ours, images = pair
    tv_model.transform.min_size = (800,)
    ours.preprocessor.min_size = [800]
    try:
        with torch.no_grad():
            compare_detections(tv_model(images[:1]), ours(images[:1]), f"{arch} 800px")
    finally:
        tv_model.transform.min_size = (512,)
        ours.preprocessor.min_size = [512]


def test_training_losses(pair):
    arch, tv_model, ours, images = pair
    from tests.conftest import COCO128
    import json

    coco = json.loads((COCO128 / "annotations" / "instances.json").read_text())
    targets = []
    for name in IMAGES[:2]:
        image_id = int(name.split(".")[0])
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        targets.append({"boxes": boxes, "labels": labels})
    # an image without boxes
    targets.append({"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)})
    tv_model.train()
    ours.train()
    try:
        torch.manual_seed(0)
        tv_losses = tv_model(images, [dict(t) for t in targets])
        our_losses = ours(images, [dict(t) for t in targets])
    finally:
        tv_model.eval()
        ours.eval()
    for ours_key, tv_key in [("loss_cls", "classification"), ("loss_box", "bbox_regression")]:
        err = rel_err(our_losses[ours_key].detach(), tv_losses[tv_key].detach())
        MAX_ERRORS[f"{arch} {ours_key}"] = err
        assert err < 1e-4, (ours_key, float(our_losses[ours_key]), float(tv_losses[tv_key]))
