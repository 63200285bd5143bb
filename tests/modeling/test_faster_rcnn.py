"""Faster R-CNN modes on a small ResNet-18 model: training, eval, eval with targets, proposals only,
external proposals (FPN paper Table 2 setting), per-batch proposal cap."""
from __future__ import annotations

import pytest
import torch

from fpndet.modeling.build import build_model
from fpndet.modeling.config import named_config
from fpndet.modeling.retinanet import LossesAndDetections

NUM_CLASSES = 4


def small_model(arch: str = "faster_rcnn", **changes):
    """A ResNet-18 Faster R-CNN (random init, 64-channel FPN, 128 px) from a named config."""
    torch.manual_seed(0)
    config = named_config("faster_rcnn_r50_fpn", arch=arch, num_classes=NUM_CLASSES, backbone="resnet18",
                          fpn_channels=64, min_size=[128], max_size=256, **changes)
    return build_model(config)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    images = [torch.rand(3, 120, 160), torch.rand(3, 100, 90)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20, 80, 90], [50, 10, 150, 60]]), "labels": torch.tensor([0, 3])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    return images, targets


def test_training_losses_backpropagate(data):
    images, targets = data
    model = small_model().train()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for module in (model.rpn.head.objectness, model.roi_heads.predictor.cls_score, model.fpn.output_convs[0]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_eval_with_and_without_targets(data):
    images, targets = data
    model = small_model(rpn={"conv_depth": 2}, roi_heads={"box_head": "conv", "box_head_norm": "group", "conv_dim": 64}).eval()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias[1:] = 3.0  # objects everywhere
        detections = model(images)
        both = model(images, targets)
    assert isinstance(both, LossesAndDetections) and set(both.losses) == {
        "loss_objectness", "loss_rpn_box", "loss_cls", "loss_box"}
    for det, image in zip(detections, images):
        assert 0 < len(det["boxes"]) <= 100
        assert det["labels"].min() >= 0 and det["labels"].max() < NUM_CLASSES
        assert float(det["boxes"][:, 2].max()) <= image.shape[2] + 1e-3
        assert float(det["boxes"][:, 3].max()) <= image.shape[1] + 1e-3
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())


def test_proposals_only_model(data):
    images, targets = data
    model = small_model("rpn").eval()
    assert model.roi_heads is None
    with torch.no_grad():
        proposals = model(images)
    assert [set(p) for p in proposals] == [{"boxes", "scores", "labels"}] * 2
    assert all(int(p["labels"].abs().sum()) == 0 for p in proposals)  # class-agnostic: "object"
    assert all(0 < len(p["boxes"]) <= 1000 for p in proposals)
    assert float(proposals[1]["boxes"][:, 2].max()) <= 90 + 1e-3
    assert set(model.train()(images, targets)) == {"loss_objectness", "loss_rpn_box"}


def test_external_proposals_skip_the_rpn_and_equal_the_rpn_path(data):
    images, targets = data
    model = small_model().eval()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias[1:] = 3.0
        rpn_model = small_model("rpn").eval()
        rpn_model.load_state_dict(model.state_dict(), strict=False)
        proposals = [p["boxes"] for p in rpn_model(images)]
        given = model(images, proposals=proposals)
        normal = model(images)
    for a, b in zip(given, normal):
        assert len(a["boxes"]) == len(b["boxes"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-2) and torch.equal(a["labels"], b["labels"])
    losses = model.train()(images, targets, proposals=proposals)
    assert set(losses) == {"loss_cls", "loss_box"}


def test_post_nms_topk_per_batch_caps_the_whole_batch_in_training(data):
    """Detectron1's rule: post_nms_topk over the batch in training, per image at test time."""
    images, _ = data
    model = small_model("rpn", rpn={"post_nms_topk_train": 50, "post_nms_topk_test": 50, "post_nms_topk_per": "batch"})
    with torch.no_grad():
        batch = model.preprocessor(images)
        outputs = model.rpn.outputs(model.features(batch.tensor), tuple(batch.tensor.shape[-2:]))
        assert int(model.rpn.train().proposals(outputs, batch.image_sizes).valid.sum()) == 50
        per_image = model.rpn.eval().proposals(outputs, batch.image_sizes).valid.sum(1)
        assert per_image.tolist() == [50, 50]
        assert [len(p["boxes"]) for p in model.eval()(images)] == [50, 50]


def test_misuse_is_reported(data):
    images, targets = data
    with pytest.raises(ValueError, match="needs targets"):
        small_model().train()(images)
    with pytest.raises(ValueError, match="RoI heads"):
        small_model("rpn").eval()(images, proposals=[torch.zeros(0, 4)] * 2)
    with pytest.raises(ValueError, match="anchor_sizes"):
        named_config("faster_rcnn_r50_fpn", min_level=3)


@pytest.mark.parametrize("arch", ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2"])
def test_torchvision_checkpoint_files_are_recognised_and_named(tmp_path, arch):
    """``--weights tv.pth`` tells Faster R-CNN v1/v2 from RetinaNet by its keys; COCO labels are
    category id - 1, named with torchvision's COCO names."""
    tv = pytest.importorskip("torchvision.models.detection")
    from fpndet.engine.model_io import load_detector
    from fpndet.modeling.faster_rcnn import FasterRCNN
    from fpndet.modeling.torchvision_compat import from_torchvision

    reference = getattr(tv, arch)(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    model, names = load_detector(path)
    assert isinstance(model, FasterRCNN) and model.config.arch == "faster_rcnn"
    assert model.config.num_classes == 90 and names[0] == "person" and names[17] == "dog"  # category ids 1, 18
    assert (model.config.rpn.conv_depth, model.config.roi_heads.box_head) == (
        (1, "fc") if arch.endswith("fpn") else (2, "conv"))
    assert torch.equal(model.roi_heads.predictor.cls_score.weight, reference.roi_heads.box_predictor.cls_score.weight)
    with pytest.warns(UserWarning, match="cls_score"):
        finetune = from_torchvision(reference.state_dict(), arch=arch, num_classes=3)
    assert finetune.roi_heads.predictor.cls_score.out_features == 4
    assert torch.equal(finetune.rpn.head.objectness.weight, reference.rpn.head.cls_logits.weight)


def test_fast_rcnn_arch_has_no_rpn_and_runs_only_on_given_proposals(data):
    """model.arch=fast_rcnn (FPN Table 2): RoI heads only; without proposals it refuses, with
    proposals it trains (no RPN losses) and detects."""
    images, targets = data
    model = small_model("fast_rcnn").train()
    assert model.rpn is None and model.roi_heads is not None
    assert not any(name.startswith("rpn.") for name in model.state_dict())
    with pytest.raises(ValueError, match="needs proposals"):
        model(images, targets)
    proposals = [torch.tensor([[5.0, 15, 85, 95], [40, 5, 160, 70], [0, 0, 50, 50]]), torch.tensor([[10.0, 10, 60, 60]])]
    losses = model(images, targets, proposals=proposals)
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        assert len(model.eval()(images, proposals=proposals)) == 2
