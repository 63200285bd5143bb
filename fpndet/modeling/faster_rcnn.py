"""The Faster R-CNN meta-architecture with FPN (FPN paper §4, §5): pre-processing, backbone
(C2-C5), FPN (P2-P5 + max-pooled P6), the RPN on P2-P6 (proposals), and the Fast R-CNN stage on
P2-P5 (RoIAlign at the level of FPN eq. 1, box head, predictor).

Labels: ``num_classes`` = K counts object classes only; targets and detections use labels
0..K-1. The predictor has K + 1 logits with background at index 0 (as torchvision), so logit
index i is label i - 1. A torchvision checkpoint with 91 logits (COCO: background + 90 category
ids) therefore becomes K = 90 with fpndet label = torchvision label - 1 (= COCO category id - 1).

Modes:

- ``model(images, targets)`` in training mode: ``{"loss_objectness", "loss_rpn_box",
  "loss_cls", "loss_box"}``;
- eval mode: one ``{"boxes", "scores", "labels"}`` per image (xyxy pixels of the input image);
- eval mode with targets: :class:`LossesAndDetections` (validation losses without a mode switch);
- ``model(images, targets, proposals=[...])``: the Fast R-CNN stage on given proposals (per image
  ``[N_i, 4]`` xyxy input-image pixels; the FPN paper's Table 2 setting); the RPN does not run and
  contributes no losses;
- proposals only (``roi_heads=None``): RPN losses in training, and in eval mode one
  ``{"boxes", "scores", "labels"}`` per image (proposals in input-image pixels, objectness
  probabilities, label 0 = "object").
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .criterion import pad_targets
from .fpn import FeaturePyramid
from .preprocess import ImageBatch, ImagePreprocessor, scale_boxes
from .retinanet import LossesAndDetections, check_targets
from .roi_heads import RoIHeads
from .rpn import Proposals, RegionProposalNetwork


class FasterRCNN(nn.Module):
    """Faster R-CNN with FPN; see the module docstring for the call conventions.

    Args (keyword-only):
        num_classes: K object classes.
        config: the :class:`~fpndet.modeling.config.ModelConfig` it was built from (stored in
            checkpoints so they rebuild the model); None for hand-assembled models.
        backbone: emits the levels the FPN takes (C2..C5, ``levels=(2, 3, 4, 5)``).
        preprocessor: an :class:`ImagePreprocessor` (short side 800, long side ≤ 1333, /32).
        fpn: a :class:`FeaturePyramid` giving P2..P6 (``top_block="max_pool"``).
        rpn: a :class:`RegionProposalNetwork` (uses every FPN level), or None for a Fast R-CNN
            model that only runs on given proposals.
        roi_heads: a :class:`RoIHeads` (its pooler picks its levels among the FPN's), or None for
            a proposals-only model.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        config: Optional[ModelConfig] = None,
        backbone: nn.Module,
        preprocessor: ImagePreprocessor,
        fpn: FeaturePyramid,
        rpn: Optional[RegionProposalNetwork],
        roi_heads: Optional[RoIHeads] = None,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.config = config
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads

    def proposal_model(self) -> "FasterRCNN":
        """This model's RPN alone, as a proposals-only model sharing its modules (eval mode returns
        proposals): for writing a trained Faster R-CNN's proposals to a file.

        Raises:
            ValueError: the model has no RPN (``arch="fast_rcnn"``).
        """
        if self.rpn is None:
            raise ValueError("a Fast R-CNN model has no RPN to make proposals with")
        config = self.config.replace(arch="rpn") if self.config is not None else None
        return FasterRCNN(num_classes=self.num_classes, config=config, backbone=self.backbone,
                          preprocessor=self.preprocessor, fpn=self.fpn, rpn=self.rpn, roi_heads=None)

    def features(self, batch_tensor: Tensor) -> list[Tensor]:
        """FPN maps (levels ``fpn.levels``) of a normalised, padded ``[B, 3, H, W]`` batch."""
        return self.fpn(self.backbone(batch_tensor))

    def pooler_features(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The FPN maps of the RoI pooler's levels (P2..P5)."""
        levels = self.fpn.levels
        return [features[levels.index(level)] for level in self.roi_heads.pooler.levels]

    def external_proposals(self, batch: ImageBatch, proposals: Sequence[Tensor]) -> Proposals:
        """Given per-image ``[N_i, 4]`` input-image proposals, in network-input pixels."""
        if len(proposals) != len(batch.image_sizes):
            raise ValueError(f"got proposals for {len(proposals)} images, but {len(batch.image_sizes)} images")
        device = batch.tensor.device
        scaled = [
            scale_boxes(p.to(device=device, dtype=torch.float32), original, resized)
            for p, original, resized in zip(proposals, batch.original_sizes, batch.image_sizes)
        ]
        return Proposals.from_list(scaled)

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Optional[Sequence[dict[str, Tensor]]] = None,
        proposals: Optional[Sequence[Tensor]] = None,
    ):
        if self.training and targets is None:
            raise ValueError("FasterRCNN in training mode needs targets")
        if proposals is not None and self.roi_heads is None:
            raise ValueError("external proposals need a model with RoI heads")
        if proposals is None and self.rpn is None:
            raise ValueError("a Fast R-CNN model (no RPN) needs proposals: model(images, targets, proposals=[...])")
        if targets is not None:
            check_targets(targets, self.num_classes)
        batch = self.preprocessor(images, targets)
        features = self.features(batch.tensor)
        gt = pad_targets(batch.targets, batch.tensor.device) if targets is not None else None
        losses: dict[str, Tensor] = {}
        if proposals is None:
            rpn_outputs = self.rpn.outputs(features, tuple(batch.tensor.shape[-2:]))
            rois = self.rpn.proposals(rpn_outputs, batch.image_sizes)
            if gt is not None:
                losses.update(self.rpn.losses(rpn_outputs, gt))
        else:
            rois = self.external_proposals(batch, proposals)
        if self.roi_heads is not None and gt is not None:
            losses.update(self.roi_heads.losses(self.pooler_features(features), rois, gt))
        if self.training:
            return losses
        results = self.detect(batch, features, rois)
        return results if targets is None else LossesAndDetections(losses, results)

    def detect(self, batch: ImageBatch, features: Sequence[Tensor], rois: Proposals) -> list[dict[str, Tensor]]:
        """Per image, detections (or proposals for a proposals-only model) in input-image pixels."""
        if self.roi_heads is None:
            return [
                {"boxes": scale_boxes(p["boxes"], resized, original), "scores": p["scores"],
                 "labels": torch.zeros(len(p["scores"]), dtype=torch.int64, device=p["scores"].device)}
                for p, resized, original in zip(rois.to_list(), batch.image_sizes, batch.original_sizes)
            ]
        found = self.roi_heads.detect(self.pooler_features(features), rois, batch.image_sizes)
        counts = torch.bincount(found.image, minlength=len(batch.image_sizes)).tolist()
        return [
            {"boxes": scale_boxes(boxes, resized, original), "scores": scores, "labels": labels}
            for boxes, scores, labels, resized, original in zip(
                found.boxes.split(counts), found.scores.split(counts), found.labels.split(counts),
                batch.image_sizes, batch.original_sizes,
            )
        ]
