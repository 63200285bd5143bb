"""The whole Faster R-CNN (or a proposals-only RPN), after the resize, as one exportable function
of a padded image batch: :class:`FasterRCNNGraph`.

It reads like :class:`~fpndet.modeling.faster_rcnn.FasterRCNN` in eval mode, written so that it
traces into one graph with dynamic batch and image size and outputs of fixed rank; inputs and
outputs are those of :class:`~fpndet.deploy.graph.RetinaNetGraph`:

1. normalise and zero the padding (:func:`~fpndet.deploy.graph.normalise_padded`); backbone, FPN;
2. RPN (FPN paper §4.1): head outputs on P2-P6, anchors from the feature-map shapes; per level
   the ``pre_nms_topk`` best anchors (:func:`~fpndet.deploy.graph.fixed_topk`), decoded and clipped; boxes under the RPN's ``min_size`` or
   objectness under its ``score_thresh`` take no part; NMS within each (image, level)
   (:mod:`fpndet.deploy.nms_op`, ONNX ``NonMaxSuppression`` with the level as the class); the
   ``post_nms_topk`` best per image, padded to ``post_nms_topk`` with a validity mask;
3. Fast R-CNN (§4.2): every RoI pooled 7x7 from its level k = ⌊k0 + log2(√(wh)/224)⌋ (FPN
   eq. 1). The level is chosen by masks, with no data-dependent branch
   (:meth:`~fpndet.modeling.poolers.MultiLevelRoIAlign.pool_by_masks`: RoIAlign over all RoIs at
   each of P2-P5, each RoI keeping its own level's result; 4x the RoIAlign work, a small part of
   the whole); box head, predictor, softmax, class-specific decoding, clipping;
   candidates with score > ``score_thresh`` and both sides ≥ ``min_size`` enter class-wise NMS;
4. the ``detections_per_image`` best per image, padded (:func:`~fpndet.deploy.graph.padded_best`).

A proposals-only model (``roi_heads=None``, ``arch="rpn"``) stops after step 2 and returns the
proposals as detections of label 0 scored by objectness, K = ``post_nms_topk`` (testing).
(``post_nms_topk_per="batch"`` applies in training only: at test time proposals are kept per image.)
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..modeling.box_ops import boxes_at_least, clip_boxes
from . import nms_op  # noqa: F401  (registers torch.ops.fpndet.multiclass_nms)
from .graph import fixed_topk, normalise_padded, padded_best, pyramid_anchors


def strict_threshold(at_least: float) -> float:
    """The float32 value t' with ``score > t'`` ⇔ ``score >= at_least`` for float32 scores in
    [0, 1] (the NMS operator drops scores ≤ its threshold; the RPN keeps scores ≥ its own)."""
    if at_least <= 0.0:
        return -0.5  # every probability passes; the -1 of excluded candidates does not
    return float(np.nextafter(np.float32(at_least), np.float32(-np.inf)))


class FasterRCNNGraph(nn.Module):
    """Args (keyword-only): model: a :class:`~fpndet.modeling.faster_rcnn.FasterRCNN` with an RPN,
    in eval mode (with RoI heads: detections; without: proposals).

    Raises:
        ValueError: a model without an RPN (Fast R-CNN on given proposals).
    """

    def __init__(self, *, model: nn.Module):
        super().__init__()
        if model.rpn is None:
            raise ValueError("a Fast R-CNN model runs on given proposals; export the Faster R-CNN that made them")
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor):
        """``images [B, 3, H, W]``, ``image_sizes [B, 2]`` -> ``boxes [B, K, 4]``, ``scores [B, K]``,
        ``labels [B, K]``, ``num_detections [B]`` (module doc)."""
        model = self.model
        x = normalise_padded(images, image_sizes, model.preprocessor)
        features = model.features(x)
        sizes = image_sizes[:, None, :].to(torch.float32)
        boxes, scores, valid = self.proposals(features, (x.shape[-2], x.shape[-1]), sizes)
        if model.roi_heads is None:
            kept = valid.nonzero()
            return padded_best(boxes, scores, torch.zeros_like(valid, dtype=torch.int64), kept, boxes.shape[1])
        return self.detections(model.pooler_features(features), boxes, valid, sizes)

    def proposals(self, features: list[Tensor], padded_size, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """RPN proposals, padded to P = ``post_nms_topk`` (testing) per image: boxes ``[B, P, 4]``
        (network-input pixels), objectness ``[B, P]`` and a validity mask ``[B, P]``; real ones
        first, by decreasing objectness."""
        rpn = self.model.rpn
        objectness, deltas = rpn.head(features)
        anchors = pyramid_anchors(rpn.anchor_generator, padded_size, features)
        boxes, logits, levels, real, start = [], [], [], [], 0
        for level, level_anchors in enumerate(anchors):
            count = level_anchors.shape[0]
            top, index, present = fixed_topk(objectness[:, start : start + count], rpn.pre_nms_topk[1])
            picked = deltas[:, start : start + count].gather(1, index[..., None].expand(-1, -1, 4))
            boxes.append(rpn.box_coder.decode(picked, level_anchors[index]))
            logits.append(top)
            levels.append(torch.full_like(index, level))
            real.append(present)
            start = start + count
        boxes = clip_boxes(torch.cat(boxes, 1), sizes)
        scores = torch.sigmoid(torch.cat(logits, 1).float())
        usable = boxes_at_least(boxes, rpn.min_size) & torch.cat(real, 1)
        candidates = torch.where(usable, scores, torch.full_like(scores, -1.0))
        kept = torch.ops.fpndet.multiclass_nms(boxes, candidates, torch.cat(levels, 1), len(anchors),
                                               rpn.nms_thresh, strict_threshold(rpn.score_thresh))
        boxes, scores, labels, _ = padded_best(boxes, scores, torch.zeros_like(levels[0][:, :1]).expand_as(scores),
                                               kept, rpn.post_nms_topk[1])
        return boxes, scores, labels >= 0

    def detections(self, features: list[Tensor], rois: Tensor, valid: Tensor, sizes: Tensor):
        """Fast R-CNN on the padded RoIs ``[B, P, 4]`` (``valid [B, P]``) -> the padded outputs."""
        heads = self.model.roi_heads
        batch, count = rois.shape[0], rois.shape[1]
        logits, deltas = heads.predictor(heads.box_head(heads.pooler.pool_by_masks(features, rois)))
        num_classes = logits.shape[-1] - 1
        scores = torch.softmax(logits.float(), dim=-1)[:, 1:].reshape(batch, count * num_classes)
        boxes = heads.box_coder.decode(deltas[:, 1:], rois.reshape(-1, 1, 4)).reshape(batch, count * num_classes, 4)
        boxes = clip_boxes(boxes, sizes)
        usable = boxes_at_least(boxes, heads.min_size) & valid.repeat_interleave(num_classes, dim=1)
        candidates = torch.where(usable, scores, torch.full_like(scores, -1.0))
        labels = torch.arange(num_classes, device=rois.device).repeat(count)[None, :].expand(batch, -1)
        kept = torch.ops.fpndet.multiclass_nms(boxes, candidates, labels, num_classes, heads.nms_thresh,
                                               heads.score_thresh)
        return padded_best(boxes, scores, labels, kept, heads.detections_per_image)
