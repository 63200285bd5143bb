"""The whole RetinaNet, after the resize, as one exportable function of a padded image batch.

:class:`RetinaNetGraph` wraps a trained :class:`~fpndet.modeling.retinanet.RetinaNet` and reads
like its eager inference, with every step written so that it traces into a graph with dynamic
batch and image size and outputs of fixed rank (``torch.onnx.export``):

1. the inputs: ``images [B, 3, H, W]``, each resized to the model's size by
   :func:`fpndet.modeling.preprocess.resize_image` (the eager pre-processor's resize) and padded
   bottom/right to the batch's common ``H, W``, multiples of 32 (:func:`pad_batch` does both,
   as :mod:`fpndet.deploy.runtime` does), float RGB in [0, 1] or uint8 in [0, 255]; and
   ``image_sizes [B, 2]`` int64, the (h, w) of each image before padding;
2. normalise with the backbone's mean/std and zero the padding (the eager pre-processor pads
   the normalised image with zeros);
3. backbone, FPN, heads; anchors computed from the feature-map shapes;
4. per level: scores (sigmoid, or softmax without the background), the ``topk_candidates`` best
   (image, anchor, class) entries, their boxes decoded and clipped to their image's (h, w);
5. class-wise NMS (:mod:`fpndet.deploy.nms_op`, ONNX ``NonMaxSuppression``) and the
   ``detections_per_image`` best, padded: ``boxes [B, K, 4]`` xyxy pixels of the input images,
   ``scores [B, K]`` (0 for padding), ``labels [B, K]`` int64 (-1 for padding) and
   ``num_detections [B]`` int64, K = ``detections_per_image``.

The eager post-processor thresholds scores before its top-k; here the top-k comes first and the
threshold is applied by the NMS. The kept detections are the same whenever a level has fewer
than ``topk_candidates`` entries above the threshold (the case for trained models: the eager
top-k then keeps all of them too). A batch of images of different sizes is padded together as
the eager model pads it, so the two give the same detections for the same batch.

Padding to a multiple of 32 happens before the graph, and every top-k has a constant k
(:func:`fixed_topk`), so that the traced sizes stay simple expressions of the input's: exporting a
ResNet takes under a minute. A deep backbone (EfficientNet-Lite0) still takes many minutes with a
dynamic image size; a fixed input size (``fpndet export --input-size``) takes seconds.

``raw=True`` returns the head outputs instead: ``cls_logits [B, A, K(+1)]``, ``box_deltas
[B, A, 4]`` (dx, dy, dw, dh) and ``anchors [A, 4]`` xyxy pixels of the padded batch, for users
with their own post-processing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..modeling.box_ops import clip_boxes
from ..modeling.preprocess import valid_region
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

    def forward(self, images: Tensor, image_sizes: Tensor):
        """``images [B, 3, H, W]``, ``image_sizes [B, 2]`` (module doc) -> the four padded outputs,
        or the raw three."""
        model = self.model
        x = normalise_padded(images, image_sizes, model.preprocessor)
        features = model.fpn(model.backbone(x))
        cls_logits, box_deltas = model.head.per_level(features, image_sizes)
        anchors = pyramid_anchors(model.anchor_generator, (x.shape[-2], x.shape[-1]), features)
        if self.raw:
            return torch.cat(cls_logits, 1), torch.cat(box_deltas, 1), torch.cat(anchors)
        return self.detections(cls_logits, box_deltas, anchors, image_sizes)

    def level_candidates(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor):
        """The ``topk_candidates`` best (anchor, class) entries of one level: their decoded boxes
        ``[B, k, 4]``, scores ``[B, k]`` and labels ``[B, k]`` (k = ``topk_candidates`` always; a
        level with fewer entries fills the rest with score 0, which no threshold keeps)."""
        batch, count, num_logits = cls_logits.shape
        num_classes = num_logits - int(self.softmax)
        if self.softmax:
            ranked = torch.softmax(cls_logits.float(), -1)[..., :num_classes].reshape(batch, count * num_classes)
        else:  # sigmoid is monotonic: rank the logits, score only the k kept
            ranked = cls_logits.reshape(batch, count * num_classes)
        top, top_index, real = fixed_topk(ranked, self.topk_candidates)
        top_scores = top.float() if self.softmax else torch.sigmoid(top.float())
        top_scores = torch.where(real, top_scores, torch.zeros_like(top_scores))  # fillers: under any threshold
        anchor = top_index // num_classes
        deltas = box_deltas.gather(1, anchor[..., None].expand(-1, -1, 4))
        boxes = self.model.postprocessor.box_coder.decode(deltas.float(), anchors[anchor])
        return boxes, top_scores, top_index % num_classes

    def detections(self, cls_logits: list[Tensor], box_deltas: list[Tensor], anchors: list[Tensor], image_sizes: Tensor):
        """Per-level head outputs -> the four padded outputs (module doc, steps 4-5)."""
        num_classes = cls_logits[0].shape[-1] - int(self.softmax)
        boxes, scores, labels = zip(*(self.level_candidates(c, d, a) for c, d, a in zip(cls_logits, box_deltas, anchors)))
        boxes = clip_boxes(torch.cat(boxes, 1), image_sizes[:, None, :].to(torch.float32))
        scores, labels = torch.cat(scores, 1), torch.cat(labels, 1)
        kept = torch.ops.fpndet.multiclass_nms(boxes, scores, labels, num_classes, self.nms_thresh, self.score_thresh)
        return padded_best(boxes, scores, labels, kept, self.detections_per_image)

def fixed_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``values [B, N]`` for any N, also N < k:
    ``(top [B, k], index [B, k] int64 in [0, N), real [B, k] bool)``; where N < k the missing
    entries are fillers (``top`` = -inf, ``index`` clamped, ``real`` False).

    A top-k of a constant k keeps every later shape a constant: with ``min(k, N)`` the traced
    sizes become nested expressions of the image size (one per pyramid level) that made exporting
    a deep backbone take tens of minutes."""
    filler = values.new_full((values.shape[0], k), float("-inf"))
    top, index = torch.cat([values, filler], dim=1).topk(k, dim=1)
    count = values.shape[1]
    return top, index.clamp(max=count - 1), index < count


def normalise_padded(images: Tensor, image_sizes: Tensor, preprocessor: nn.Module) -> Tensor:
    """uint8 or float ``[B, 3, H, W]`` padded images -> normalised float32 with the
    pre-processor's ``pixel_mean`` / ``pixel_std``, zero outside each image's (h, w) of
    ``image_sizes [B, 2]`` (the eager pre-processor pads the normalised image with zeros)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = (x - preprocessor.pixel_mean) / preprocessor.pixel_std
    return x * valid_region(image_sizes, x.shape[-2], x.shape[-1]).to(x.dtype)


def pyramid_anchors(generator: nn.Module, padded_size, features) -> list[Tensor]:
    """float32 ``[H_l*W_l*A, 4]`` anchors (xyxy pixels of the padded batch) of each level of
    ``features``, from their traced shapes (an :class:`~fpndet.modeling.anchors.AnchorGenerator`)."""
    out = []
    for level, feature in enumerate(features):
        grid = (feature.shape[-2], feature.shape[-1])
        out.append(generator.level_anchors(level, grid, generator.level_stride(level, padded_size, grid)))
    return out


def padded_best(boxes: Tensor, scores: Tensor, labels: Tensor, kept: Tensor, k: int):
    """The ``k`` best candidates of each image among those NMS ``kept`` (int64 ``[S, 2]``
    (image, candidate) pairs), padded: ``boxes [B, k, 4]`` (0 for padding), ``scores [B, k]``
    (0), ``labels [B, k]`` (-1) and ``num_detections [B]``, from candidates ``boxes [B, M, 4]``,
    ``scores [B, M]``, ``labels [B, M]``."""
    batch = scores.shape[0]
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


def pad_batch(images: list[Tensor], *, min_size: int, max_size: int,
              canvas: Optional[tuple[int, int]] = None, size_divisible: int = PAD_TO) -> tuple[Tensor, Tensor]:
    """Inputs of an exported graph: each float ``[3, h, w]`` image in [0, 1] resized with
    :func:`~fpndet.modeling.preprocess.resize_image` and zero-padded bottom/right to the batch's
    largest (h, w) rounded up to a multiple of ``size_divisible`` (the model's
    ``model.size_divisible``, as the eager pre-processor pads), or to ``canvas`` (H, W) for an
    export of a fixed input size. Returns ``(images [B, 3, H, W] float32, image_sizes [B, 2] int64)``, the
    (h, w) of each resized image.

    Raises:
        ValueError: a resized image larger than ``canvas``.
    """
    from ..modeling.preprocess import resize_image

    resized = [resize_image(image.float(), min_size, max_size) for image in images]
    height = -(-max(r.shape[-2] for r in resized) // size_divisible) * size_divisible
    width = -(-max(r.shape[-1] for r in resized) // size_divisible) * size_divisible
    if canvas is not None:
        if height > canvas[0] or width > canvas[1]:
            raise ValueError(f"images resized to up to {height}x{width} (padded) do not fit the fixed input "
                             f"{canvas[0]}x{canvas[1]}")
        height, width = canvas
    batch = resized[0].new_zeros((len(resized), 3, height, width))
    for i, r in enumerate(resized):
        batch[i, :, : r.shape[-2], : r.shape[-1]] = r
    return batch, torch.tensor([list(r.shape[-2:]) for r in resized], dtype=torch.int64)
