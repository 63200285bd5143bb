"""Class-wise NMS over a padded batch as one operator that exports to ONNX ``NonMaxSuppression``.

``torch.ops.fpndet.multiclass_nms(boxes [B, M, 4], scores [B, M], labels [B, M], num_classes,
iou_threshold, score_threshold)`` returns int64 ``[S, 2]`` (image, candidate) pairs kept. In
PyTorch it is torchvision's ``batched_nms`` over the (image, class) groups; in an ONNX graph it is
one ``NonMaxSuppression`` node whose class axis holds each candidate's score in its own class only
(no coordinate offsets, so IoUs are computed on the boxes as given). Both suppress a box whose IoU
with a kept, higher-scoring box of its group is > ``iou_threshold`` and drop scores
<= ``score_threshold``, which is torchvision's and onnxruntime's rule.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms


@torch.library.custom_op("fpndet::multiclass_nms", mutates_args=())
def multiclass_nms(boxes: Tensor, scores: Tensor, labels: Tensor, num_classes: int,
                   iou_threshold: float, score_threshold: float) -> Tensor:
    """Args: boxes float ``[B, M, 4]`` xyxy pixels; scores float ``[B, M]``; labels int64 ``[B, M]``
    in [0, num_classes). Returns int64 ``[S, 2]`` (image index, candidate index) of the kept boxes."""
    batch, count = scores.shape
    image = torch.arange(batch, device=scores.device).repeat_interleave(count)
    flat_scores, flat_labels = scores.reshape(-1), labels.reshape(-1)
    valid = (flat_scores > score_threshold).nonzero().squeeze(1)
    groups = image[valid] * num_classes + flat_labels[valid]
    keep = valid[batched_nms(boxes.reshape(-1, 4)[valid].float(), flat_scores[valid].float(), groups, iou_threshold)]
    return torch.stack([keep // count, keep % count], dim=1)


@multiclass_nms.register_fake
def _(boxes, scores, labels, num_classes, iou_threshold, score_threshold):
    kept = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty((kept, 2), dtype=torch.int64)


def onnx_translation():
    """``{op: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    from onnxscript import opset18 as op

    def multiclass_nms_onnx(boxes, scores, labels, num_classes: int, iou_threshold: float, score_threshold: float):
        classes = op.Range(op.Constant(value_int=0), op.Constant(value_int=num_classes), op.Constant(value_int=1))
        own_class = op.Equal(op.Unsqueeze(labels, op.Constant(value_ints=[1])),
                             op.Unsqueeze(classes, op.Constant(value_ints=[0, 2])))
        minus_one = op.CastLike(op.Constant(value_float=-1.0), scores)
        class_scores = op.Where(own_class, op.Unsqueeze(scores, op.Constant(value_ints=[1])), minus_one)
        selected = op.NonMaxSuppression(
            boxes, class_scores, op.Constant(value_ints=[2**31 - 1]),
            op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[score_threshold]),
        )
        return op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)

    return {torch.ops.fpndet.multiclass_nms.default: multiclass_nms_onnx}
