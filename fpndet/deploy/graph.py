"""The whole RetinaNet, after the resize, as one exportable function of a ``[B, 3, H, W]`` batch.

:class:`RetinaNetGraph` wraps a trained :class:`~fpndet.modeling.retinanet.RetinaNet` and reads
like its eager inference, with every step written so that it traces into a graph with dynamic
batch and image size and outputs of fixed rank (``torch.onnx.export``):

1. the input: images already resized to the model's size by
   :func:`fpndet.modeling.preprocess.resize_image` (the eager pre-processor's resize, which
   :mod:`fpndet.deploy.runtime` applies too), float RGB in [0, 1] or uint8 in [0, 255];
2. normalise with the backbone's mean/std, zero-pad bottom/right to a multiple of 32;
3. backbone, FPN, heads; anchors computed from the feature-map shapes;
4. per level: scores (sigmoid, or softmax without the background), the ``topk_candidates`` best
   (image, anchor, class) entries, their boxes decoded and clipped to the input;
5. class-wise NMS (:mod:`fpndet.deploy.nms_op`, ONNX ``NonMaxSuppression``) and the
   ``detections_per_image`` best, padded: ``boxes [B, K, 4]`` xyxy pixels of the input,
   ``scores [B, K]`` (0 for padding), ``labels [B, K]`` int64 (-1 for padding) and
   ``num_detections [B]`` int64, K = ``detections_per_image``.

The eager post-processor thresholds scores before its top-k; here the top-k comes first and the
threshold is applied by the NMS. The kept detections are the same whenever a level has fewer
than ``topk_candidates`` entries above the threshold (the case for trained models: the eager
top-k then keeps all of them too). All images of a batch share the input size, so each is
clipped to ``(H, W)``: run images of different sizes in separate batches (the runner does).

``raw=True`` returns the head outputs instead: ``cls_logits [B, A, K(+1)]``, ``box_deltas
[B, A, 4]`` (dx, dy, dw, dh) and ``anchors [A, 4]`` xyxy pixels of the padded input, for users
with their own post-processing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.box_ops import clip_boxes
from . import nms_op  # noqa: F401  (registers torch.ops.fpndet.multiclass_nms)

PAD_TO = 32


class RetinaNetGraph(nn.Module):
    """Args (keyword-only): model: a RetinaNet in eval mode; raw: export head outputs only."""

    def __init__(self, *, model: nn.Module, raw: bool = False):
        super().__init__()
        self.model = model
        self.raw = raw
        post = model.postprocessor
        self.softmax = post.softmax
        self.score_thresh = float(post.score_thresh)
        self.topk_candidates = int(post.topk_candidates)
        self.nms_thresh = float(post.nms_thresh)
        self.detections_per_image = int(post.detections_per_image)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 or float ``[B, 3, H, W]`` -> normalised float ``[B, 3, H', W']`` padded to /32."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        pre = self.model.preprocessor
        x = (x - pre.pixel_mean) / pre.pixel_std
        height, width = x.shape[-2], x.shape[-1]
        return F.pad(x, (0, (PAD_TO - width % PAD_TO) % PAD_TO, 0, (PAD_TO - height % PAD_TO) % PAD_TO))

    def anchors(self, padded_size, features) -> list[Tensor]:
        gen = self.model.anchor_generator
        out = []
        for level, feature in enumerate(features):
            grid = (feature.shape[-2], feature.shape[-1])
            out.append(gen.level_anchors(level, grid, gen.level_stride(level, padded_size, grid)))
        return out

    def forward(self, images: Tensor):
        """``images`` ``[B, 3, H, W]`` (module doc) -> the four padded outputs, or the raw three."""
        x = self.prepare(images)
        model = self.model
        features = model.fpn(model.backbone(x))
        cls_logits, box_deltas = model.head(features)
        anchors = self.anchors((x.shape[-2], x.shape[-1]), features)
        if self.raw:
            return cls_logits, box_deltas, torch.cat(anchors)
        return self.detections(cls_logits, box_deltas, anchors, (images.shape[-2], images.shape[-1]))

    def detections(self, cls_logits, box_deltas, anchors, image_size):
        batch, num_logits = cls_logits.shape[0], cls_logits.shape[-1]
        num_classes = num_logits - int(self.softmax)
        scores = torch.softmax(cls_logits.float(), -1)[..., :num_classes] if self.softmax else torch.sigmoid(cls_logits.float())
        coder = self.model.postprocessor.box_coder
        level_boxes, level_scores, level_labels = [], [], []
        start = 0
        for level_anchors in anchors:
            count = level_anchors.shape[0]
            flat = scores[:, start:start + count].reshape(batch, -1)
            top_scores, top_index = flat.topk(torch.sym_min(self.topk_candidates, count * num_classes), dim=1)
            anchor = top_index // num_classes
            deltas = box_deltas[:, start:start + count].gather(1, anchor[..., None].expand(-1, -1, 4))
            boxes = coder.decode(deltas.float(), level_anchors[anchor])
            level_boxes.append(boxes)
            level_scores.append(top_scores)
            level_labels.append(top_index % num_classes)
            start += count
        size = torch.tensor([image_size[0], image_size[1]], device=cls_logits.device)
        boxes = clip_boxes(torch.cat(level_boxes, 1), size.view(1, 1, 2))
        scores, labels = torch.cat(level_scores, 1), torch.cat(level_labels, 1)
        kept = torch.ops.fpndet.multiclass_nms(boxes, scores, labels, num_classes, self.nms_thresh, self.score_thresh)
        return self.padded_best(boxes, scores, labels, kept)

    def padded_best(self, boxes: Tensor, scores: Tensor, labels: Tensor, kept: Tensor):
        """The ``detections_per_image`` best kept candidates of each image, padded (module doc)."""
        batch, k = scores.shape[0], self.detections_per_image
        keep = torch.zeros_like(scores, dtype=torch.bool).index_put((kept[:, 0], kept[:, 1]), torch.tensor(True))
        ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
        ranked = torch.cat([ranked, ranked.new_full((batch, k), -1.0)], dim=1)
        best_scores, best = ranked.topk(k, dim=1)
        valid = best_scores > -1.0
        best = best.clamp(max=scores.shape[1] - 1)
        best_boxes = boxes.gather(1, best[..., None].expand(-1, -1, 4))
        return (
            torch.where(valid[..., None], best_boxes, torch.zeros_like(best_boxes)),
            torch.where(valid, best_scores, torch.zeros_like(best_scores)),
            torch.where(valid, labels.gather(1, best), torch.full_like(best, -1)),
            valid.sum(1),
        )
