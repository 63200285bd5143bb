"""The RetinaNet meta-architecture (Focal Loss paper §4, Fig. 3): an image goes through
pre-processing, backbone (C3-C5), FPN (P3-P7), the shared heads, and then either the
criterion (losses) or the post-processor (detections).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .config import ModelConfig
from .criterion import RetinaNetCriterion
from .fpn import FeaturePyramid
from .heads import RetinaNetHead
from .postprocess import DetectionPostprocessor
from .preprocess import ImageBatch, ImagePreprocessor


class LossesAndDetections(NamedTuple):
    """What ``RetinaNet.forward`` returns in eval mode when targets are given."""

    losses: dict[str, Tensor]
    detections: list[dict[str, Tensor]]


class HeadOutputs(NamedTuple):
    """Raw network outputs for a padded batch.

    cls_logits ``[B, A, K(+1)]``, box_deltas ``[B, A, 4]`` (dx, dy, dw, dh), anchors float32
    ``[A, 4]`` xyxy pixels of the padded batch, anchors_per_level: counts per level P3..P7,
    features: the FPN maps.
    """

    cls_logits: Tensor
    box_deltas: Tensor
    anchors: Tensor
    anchors_per_level: list[int]
    features: list[Tensor]


class RetinaNet(nn.Module):
    """RetinaNet built from a :class:`ModelConfig` (see :func:`fpndet.modeling.build.build_model`).

    Call it as ``model(images, targets=None)``:

    - ``images``: list of float ``[3, H, W]`` RGB tensors in [0, 1], any sizes.
    - ``targets``: list of dicts with "boxes" float ``[N, 4]`` xyxy in input-image pixels,
      "labels" int64 ``[N]`` in [0, num_classes) (``num_classes`` counts object classes only;
      there is no background label) and optional "iscrowd" bool ``[N]`` (ignore regions).

    Returns, in training mode, ``{"loss_cls", "loss_box"}`` (scalars; needs targets); in eval mode,
    one ``{"boxes" [N, 4] xyxy pixels of the input image, "scores" [N], "labels" int64 [N]}`` per
    image; in eval mode with targets, :class:`LossesAndDetections` (validation loss without a
    mode switch). ``losses()``, ``detect()`` and ``head_outputs()`` are the mode-free pieces.
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        backbone: nn.Module,
        preprocessor: ImagePreprocessor,
        fpn: FeaturePyramid,
        head: RetinaNetHead,
        anchor_generator: AnchorGenerator,
        criterion: RetinaNetCriterion,
        postprocessor: DetectionPostprocessor,
    ):
        super().__init__()
        self.config = config
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_generator = anchor_generator
        self.criterion = criterion
        self.postprocessor = postprocessor

    def head_outputs(
        self, batch_tensor: Tensor, image_sizes: Optional[Sequence[tuple[int, int]]] = None
    ) -> HeadOutputs:
        """Backbone, FPN, heads and anchors for a normalised, padded ``[B, 3, H, W]`` batch whose
        images have the (h, w) ``image_sizes`` (needed by "group_masked" heads; None: no padding)."""
        features = self.fpn(self.backbone(batch_tensor))
        sizes = None
        if self.head.masked_norm and image_sizes is not None:
            sizes = torch.tensor(image_sizes, dtype=torch.int64, device=batch_tensor.device).reshape(-1, 2)
        cls_logits, box_deltas = self.head(features, sizes)
        anchors, counts = self.anchor_generator(
            tuple(batch_tensor.shape[-2:]), [tuple(f.shape[-2:]) for f in features]
        )
        return HeadOutputs(cls_logits, box_deltas, anchors, counts, features)

    def losses(self, batch: ImageBatch, outputs: HeadOutputs) -> dict[str, Tensor]:
        if batch.targets is None:
            raise ValueError("losses need targets")
        return self.criterion(outputs.cls_logits, outputs.box_deltas, outputs.anchors, batch.targets)

    def detect(self, batch: ImageBatch, outputs: HeadOutputs) -> list[dict[str, Tensor]]:
        return self.postprocessor(
            outputs.cls_logits, outputs.box_deltas, outputs.anchors, outputs.anchors_per_level,
            batch.image_sizes, batch.original_sizes,
        )

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict[str, Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("RetinaNet in training mode needs targets")
        if targets is not None:
            check_targets(targets, self.config.num_classes)
        batch = self.preprocessor(images, targets)
        outputs = self.head_outputs(batch.tensor, batch.image_sizes)
        if self.training:
            return self.losses(batch, outputs)
        detections = self.detect(batch, outputs)
        if targets is None:
            return detections
        return LossesAndDetections(self.losses(batch, outputs), detections)


def check_targets(targets: Sequence[dict[str, Tensor]], num_classes: int) -> None:
    """Raise ``ValueError`` naming the image index for malformed boxes or labels."""
    for i, target in enumerate(targets):
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(labels) != len(boxes):
            raise ValueError(f"target {i}: boxes must be [N, 4] with N labels, got {tuple(boxes.shape)}")
        if len(boxes) and bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise ValueError(f"target {i}: boxes need x2 > x1 and y2 > y1 (xyxy pixels)")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"target {i}: labels must be in [0, {num_classes}), got {labels.tolist()}")
