"""The Fast R-CNN stage on a feature pyramid (FPN paper §4.2 and §5.2; Fast R-CNN §2).

Training: the RPN's proposals plus the ground-truth boxes are matched to the ground truth
(IoU ≥ 0.5 foreground, [0, 0.5) background, no low-quality matches); 512 RoIs per image are
sampled, at most 25 % foreground. Each RoI is pooled (RoIAlign 7x7 from the level of FPN eq. 1),
goes through the box head (2 x fc-1024, "2fc" as the paper and torchvision v1; or 4 x conv3x3 +
fc-1024 with normalisation, torchvision v2) and the predictor: K + 1 softmax logits (index 0 =
background, index k + 1 = object class k) and class-specific box deltas encoded with weights
(10, 10, 5, 5). Loss: cross-entropy over the sampled RoIs (mean) + smooth-L1 (β = 1/9) of the
foreground RoIs' deltas for their class, summed and divided by the number of sampled RoIs
(torchvision).

Inference: softmax, per-class decoding, clip, drop boxes under ``min_size``, score > 0.05,
class-wise NMS 0.5, the best 100 per image — all images and classes in one NMS call.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses as L
from .box_coder import BoxCoder
from .box_ops import batched_class_nms, boxes_at_least, clip_boxes
from .fpn import norm_layer
from .matcher import AnchorMatcher
from .poolers import MultiLevelRoIAlign, flatten_rois
from .postprocess import first_n_per_image
from .rpn import Proposals
from .sampling import BalancedSampler, labels_from_matches


class TwoMLPHead(nn.Module):
    """Box head "2fc" (FPN §4.2): flatten, fc-``representation_size`` + ReLU, twice.

    Args (keyword-only): in_channels (d), resolution (pooled size, 7), representation_size (1024).
    ``forward([M, d, R, R])`` -> ``[M, representation_size]``. Module names ``fc6``, ``fc7`` as
    torchvision's ``TwoMLPHead``.
    """

    def __init__(self, *, in_channels: int, resolution: int = 7, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class ConvFCHead(nn.Module):
    """Box head "4conv1fc": 3x3 convs (+ norm) + ReLU, flatten, fc + ReLU layers (torchvision's
    ``FastRCNNConvFCHead`` of ``fasterrcnn_resnet50_fpn_v2``, detectron2's ``FastRCNNConvFCHead``).

    Args (keyword-only):
        in_channels: d; resolution: pooled size (7).
        conv_dims: channels of each conv (4 x 256); fc_dims: widths of the fc layers (1024).
        norm: None, "batch", "frozen_batch" or "group" after each conv (convs then have no bias;
            torchvision v2 uses batch norm, detectron2 GroupNorm).

    ``forward([M, d, R, R])`` -> ``[M, fc_dims[-1]]``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int = 7,
        conv_dims: Sequence[int] = (256, 256, 256, 256),
        fc_dims: Sequence[int] = (1024,),
        norm: Optional[str] = None,
    ):
        super().__init__()
        convs, previous = [], in_channels
        for channels in conv_dims:
            layers = [nn.Conv2d(previous, channels, 3, padding=1, bias=norm is None)]
            if norm is not None:
                layers.append(norm_layer(norm, channels))
            layers.append(nn.ReLU(inplace=True))
            convs.append(nn.Sequential(*layers))
            previous = channels
        self.convs = nn.Sequential(*convs)
        fcs, previous = [], previous * resolution * resolution
        for width in fc_dims:
            fcs.append(nn.Sequential(nn.Linear(previous, width), nn.ReLU(inplace=True)))
            previous = width
        self.fcs = nn.Sequential(*fcs)
        self.out_features = previous
        for module in self.convs.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fcs(self.convs(x).flatten(1))


class FastRCNNPredictor(nn.Module):
    """K + 1 classification logits (index 0 = background, k + 1 = object class k) and
    class-specific box deltas ``4 (K + 1)``; weights N(0, 0.01) resp. N(0, 0.001), biases 0.

    Args (keyword-only): in_features (1024), num_classes (K, object classes only).
    ``forward([M, in_features])`` -> ``(logits [M, K + 1], deltas [M, K + 1, 4])``.
    """

    def __init__(self, *, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x).unflatten(-1, (-1, 4))


class SampledRoIs(NamedTuple):
    """Training RoIs of a batch, padded to S per image (each image's RoIs in candidate order).

    boxes float32 ``[B, S, 4]`` (network-input pixels); valid bool ``[B, S]``; classes int64
    ``[B, S]`` (0 background, k + 1 object class k); matched_boxes ``[B, S, 4]`` (the matched
    gt box, meaningful where classes > 0).
    """

    boxes: Tensor
    valid: Tensor
    classes: Tensor
    matched_boxes: Tensor


class Detections(NamedTuple):
    """Detections of a batch, image by image, each image's by decreasing score: image int64
    ``[D]``, boxes float32 ``[D, 4]`` (network-input pixels), scores ``[D]``, labels int64 ``[D]``
    (0..K-1)."""

    image: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor


class RoIHeads(nn.Module):
    """The Fast R-CNN stage: RoI sampling, pooling, box head, predictor, losses and detections.

    Args (keyword-only):
        num_classes: K object classes (the predictor has K + 1 logits, background at 0).
        pooler: a :class:`MultiLevelRoIAlign` (P2..P5, 7x7, sampling ratio 2).
        box_head: :class:`TwoMLPHead` or :class:`ConvFCHead`.
        predictor: a :class:`FastRCNNPredictor`.
        matcher: an :class:`AnchorMatcher` (0.5 / 0.5, no low-quality matches).
        sampler: a :class:`BalancedSampler` (512 per image, positive fraction 0.25).
        box_coder: a :class:`BoxCoder` with weights (10, 10, 5, 5).
        score_thresh, nms_thresh, detections_per_image: inference (0.05, 0.5, 100).
        min_size: detections narrower or lower than this (pixels) are dropped (1e-2, torchvision).
        box_loss: "smooth_l1" (β = ``smooth_l1_beta``, 1/9) or "l1".
        add_gt_as_proposals: training RoIs include the (non-crowd) ground-truth boxes.

    Raises:
        ValueError: unknown ``box_loss``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        pooler: MultiLevelRoIAlign,
        box_head: nn.Module,
        predictor: FastRCNNPredictor,
        matcher: AnchorMatcher,
        sampler: BalancedSampler,
        box_coder: BoxCoder,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        min_size: float = 1e-2,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
        add_gt_as_proposals: bool = True,
    ):
        super().__init__()
        if box_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")
        self.num_classes = int(num_classes)
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_image = int(detections_per_image)
        self.min_size = float(min_size)
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.add_gt_as_proposals = bool(add_gt_as_proposals)

    def predict(self, features: Sequence[Tensor], boxes: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``[M, K + 1]`` and deltas ``[M, K + 1, 4]`` of the real RoIs of ``boxes``
        ``[B, N, 4]`` (``valid`` ``[B, N]``), pooled from ``features`` (the pooler's levels)."""
        return self.predictor(self.box_head(self.pooler(features, boxes, valid)))

    @torch.no_grad()
    def sample(self, proposals: Proposals, gt: dict[str, Tensor]) -> SampledRoIs:
        """Training RoIs: proposals (+ gt boxes) matched to ``gt`` (padded, see
        ``criterion.pad_targets``) and sampled, the sampled ones in candidate order per image."""
        candidates, present = proposals.boxes, proposals.valid
        if self.add_gt_as_proposals:
            candidates = torch.cat([candidates, gt["boxes"].to(candidates.dtype)], dim=1)
            present = torch.cat([present, gt["valid"] & ~gt["crowd"]], dim=1)
        matches = self.matcher(candidates, gt["boxes"], gt["valid"], gt["crowd"], present)
        positive, negative = self.sampler(labels_from_matches(matches, present))
        sampled = positive | negative
        count = sampled.sum(dim=1)
        most = max(int(count.max()), 1)
        order = torch.sort((~sampled).to(torch.uint8), dim=1, stable=True).indices[:, :most]
        valid = torch.arange(most, device=order.device)[None, :] < count[:, None]
        matched = matches.clamp(min=0).gather(1, order)
        foreground = positive.gather(1, order) & valid
        classes = torch.where(foreground, gt["labels"].gather(1, matched) + 1, 0)
        return SampledRoIs(
            candidates.gather(1, order[..., None].expand(-1, -1, 4)),
            valid,
            classes,
            gt["boxes"].gather(1, matched[..., None].expand(-1, -1, 4)),
        )

    def losses(self, features: Sequence[Tensor], proposals: Proposals, gt: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss_cls", "loss_box"}`` on RoIs sampled from ``proposals`` for the padded ``gt``."""
        rois = self.sample(proposals, gt)
        logits, deltas = self.predict(features, rois.boxes, rois.valid)
        classes = rois.classes[rois.valid]
        loss_cls = F.cross_entropy(logits.float(), classes)
        foreground = torch.nonzero(classes > 0).squeeze(1)
        target = self.box_coder.encode(rois.matched_boxes[rois.valid][foreground], rois.boxes[rois.valid][foreground])
        beta = self.smooth_l1_beta if self.box_loss == "smooth_l1" else 0.0
        predicted = deltas[foreground, classes[foreground]]
        loss_box = L.smooth_l1_loss(predicted, target, beta=beta, reduction="sum") / max(len(classes), 1)
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def detect(
        self, features: Sequence[Tensor], proposals: Proposals, image_sizes: Sequence[tuple[int, int]]
    ) -> Detections:
        """Detections of the batch in network-input pixels (see :class:`Detections`).

        Args:
            features: the pooler's pyramid levels.
            proposals: RoIs per image (network-input pixels).
            image_sizes: (h, w) of each resized image before padding (boxes are clipped to it).
        """
        logits, deltas = self.predict(features, proposals.boxes, proposals.valid)
        image, rois = flatten_rois(proposals.boxes, proposals.valid)
        scores = torch.softmax(logits.float(), dim=-1)[:, 1:]
        boxes = self.box_coder.decode(deltas[:, 1:], rois[:, None, :])
        sizes = torch.tensor(image_sizes, device=boxes.device)[image]
        boxes = clip_boxes(boxes, sizes[:, None, :])
        keep = (scores > self.score_thresh) & boxes_at_least(boxes, self.min_size)
        roi, label = keep.nonzero(as_tuple=True)
        image, boxes, scores = image[roi], boxes[roi, label], scores[roi, label]
        kept = batched_class_nms(boxes, scores, image * self.num_classes + label, self.nms_thresh)
        kept = kept[first_n_per_image(image[kept], self.detections_per_image)]
        kept = kept[torch.sort(image[kept], stable=True).indices]
        return Detections(image[kept], boxes[kept], scores[kept], label[kept])
