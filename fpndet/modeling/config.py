"""The model configuration: one dataclass, read by :func:`fpndet.modeling.build.build_model`.

The same dataclass is the ``model`` section of the YAML experiment configs (OmegaConf structured
config), and it is stored as JSON beside every checkpoint, so a checkpoint rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

# Input normalisation (RGB, pixels in [0, 1]) of the backbones' ImageNet weights: torchvision's
# ResNets, and the EfficientNet-Lite0 TF checkpoint, trained on (x - 127) / 128 of 8-bit pixels
# (the best of the variants compared in fpndet.modeling.backbones).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)

CLS_LOSSES = ("sigmoid_focal", "softmax_focal", "bce", "balanced_bce", "focal_star")
BOX_LOSSES = ("smooth_l1", "l1", "giou")
LOSS_NORMALIZATIONS = ("batch", "per_image")
ANCHOR_PLACEMENTS = ("level", "image")


@dataclass
class RetinaNetConfig:
    """Every hyper-parameter of a RetinaNet (Lin et al. 2017, "Focal Loss", §4).

    ``num_classes`` counts object classes only: there is no background logit (sigmoid
    classification, §4 "Classification Subnet"); labels are 0..num_classes-1. With
    ``cls_loss="softmax_focal"`` the head adds one background logit (index ``num_classes``).
    """

    num_classes: int = 80

    # Backbone giving C3..C5: "resnet18|34|50|101", "efficientnet_lite0", or "timm:<model name>".
    backbone: str = "resnet50"
    # None (random), "imagenet" (torchvision/timm download, or the local Lite0 package),
    # or the path of a state dict file.
    backbone_weights: Optional[str] = None
    # Trainable stages counted from the top (torchvision's trainable_backbone_layers):
    # 3 = stem and res2 frozen.
    trainable_stages: int = 3

    # FPN (FPN paper §3): d channels, levels P3..P7, merge "sum" (paper) or "average"
    # (0.5 top-down + 0.5 lateral, TF snippet); P6 from "c5" (RetinaNet paper) or "p5" (torchvision v1).
    fpn_channels: int = 256
    min_level: int = 3
    max_level: int = 7
    fpn_merge: str = "sum"
    p6_input: str = "c5"

    # Anchors (§4 "Anchors"): one size per level (P3..P7), A = len(scales) * len(ratios).
    # anchor_placement: "level" puts P_l's cells every 2^l px (paper, detectron2); "image" every
    # padded_size // grid px (torchvision; differs from 2^l when the padded size is not a
    # multiple of 2^l). See fpndet.modeling.anchors.
    anchor_placement: str = "level"
    anchor_sizes: List[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_scales: List[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    anchor_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])

    # Heads (§4 "Classification Subnet", "Box Regression Subnet").
    head_channels: int = 256
    head_depth: int = 4
    head_norm: Optional[str] = None  # None or "group" (GroupNorm(32), torchvision v2)
    prior_prob: float = 0.01

    # Matching (§4 "Training"): IoU >= 0.5 foreground, < 0.4 background, between ignored.
    foreground_iou: float = 0.5
    background_iou: float = 0.4
    allow_low_quality_matches: bool = True
    crowd_ioa: float = 0.5
    box_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    box_scale_clamp: float = math.log(1000.0 / 16)

    # Losses (§3, appendix A/B) and their normalisation.
    cls_loss: str = "sigmoid_focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    focal_star_gamma: float = 2.0
    focal_star_beta: float = 1.0
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 0.11
    box_loss_weight: float = 1.0
    loss_normalization: str = "batch"  # "batch" (paper) or "per_image" (torchvision)

    # Pre-processing (as torchvision's GeneralizedRCNNTransform): resize so the short side is
    # min_size (one chosen at random per image in training when several), long side <= max_size,
    # normalise with mean/std (RGB, images in [0, 1]), pad to a multiple of size_divisible.
    # Several min_size values are multi-scale training: the model draws one per image where it
    # resizes (torchvision's convention); evaluation uses the last one.
    # pixel_mean/std None: the normalisation the backbone's weights were trained with (ImageNet
    # for torchvision ResNets, [-1, 1] for EfficientNet-Lite0, timm's pretrained_cfg for timm).
    min_size: List[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    size_divisible: int = 32
    pixel_mean: Optional[List[float]] = None
    pixel_std: Optional[List[float]] = None

    # Inference (§4.1): per level score threshold and top-k, class-wise NMS, detections kept.
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    detections_per_image: int = 100

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        checks = [
            (self.num_classes >= 1, "num_classes must be >= 1"),
            (self.cls_loss in CLS_LOSSES, f"cls_loss must be one of {CLS_LOSSES}"),
            (self.box_loss in BOX_LOSSES, f"box_loss must be one of {BOX_LOSSES}"),
            (self.loss_normalization in LOSS_NORMALIZATIONS,
             f"loss_normalization must be one of {LOSS_NORMALIZATIONS}"),
            (self.fpn_merge in ("sum", "average"), "fpn_merge must be 'sum' or 'average'"),
            (self.p6_input in ("c5", "p5"), "p6_input must be 'c5' or 'p5'"),
            (self.head_norm in (None, "group"), "head_norm must be null or 'group'"),
            (2 <= self.min_level <= 5 < self.max_level or 2 <= self.min_level <= self.max_level <= 5,
             "levels must satisfy 2 <= min_level <= 5 and min_level <= max_level"),
            (len(self.anchor_sizes) == self.max_level - self.min_level + 1,
             "anchor_sizes needs one size per pyramid level"),
            (0.0 < self.prior_prob < 1.0, "prior_prob must be in (0, 1)"),
            (self.background_iou <= self.foreground_iou, "background_iou must be <= foreground_iou"),
            (self.anchor_placement in ANCHOR_PLACEMENTS, f"anchor_placement must be one of {ANCHOR_PLACEMENTS}"),
            ((self.pixel_mean is None) == (self.pixel_std is None), "set both pixel_mean and pixel_std, or neither"),
            (self.pixel_mean is None or self.pixel_std is None or (len(self.pixel_mean) == 3 and len(self.pixel_std) == 3),
             "pixel_mean/std need 3 values"),
            (len(self.min_size) >= 1, "min_size needs at least one value"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"RetinaNetConfig: {message}")

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RetinaNetConfig":
        """Build from a plain dict, rejecting unknown keys (``ValueError`` names them).

        A dict without ``anchor_placement`` was written before that field existed, when anchors
        were always placed as torchvision places them: it gets ``"image"``, so older checkpoints
        rebuild the model they were trained as.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"RetinaNetConfig: unknown fields {unknown}")
        values = {"anchor_placement": "image", **values}
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})

    def replace(self, **changes: Any) -> "RetinaNetConfig":
        return dataclasses.replace(self, **changes)


def retinanet_r50_fpn(num_classes: int = 80) -> RetinaNetConfig:
    """The paper's RetinaNet R50-FPN (§4-5): P6 from C5, smooth-L1 (β=0.11), batch normalisation."""
    return RetinaNetConfig(num_classes=num_classes)


def retinanet_r50_fpn_tv(num_classes: int = 91) -> RetinaNetConfig:
    """torchvision's ``retinanet_resnet50_fpn``: P6 from P5, L1 box loss, per-image normalisation,
    300 detections, anchors placed as torchvision places them, ImageNet normalisation whatever
    the backbone, labels are COCO category ids (91 logits)."""
    return RetinaNetConfig(
        num_classes=num_classes, p6_input="p5", box_loss="l1", loss_normalization="per_image",
        detections_per_image=300, anchor_placement="image",
        pixel_mean=list(IMAGENET_MEAN), pixel_std=list(IMAGENET_STD),
    )


def retinanet_r50_fpn_v2_tv(num_classes: int = 91) -> RetinaNetConfig:
    """torchvision's ``retinanet_resnet50_fpn_v2``: GroupNorm heads, P6 from C5, GIoU box loss."""
    return retinanet_r50_fpn_tv(num_classes).replace(p6_input="c5", head_norm="group", box_loss="giou")


def retinanet_r18_fpn_cpu(num_classes: int = 80) -> RetinaNetConfig:
    """A CPU-sized ResNet-18 RetinaNet: 384 px images, narrow (128) FPN and 2-conv heads."""
    return RetinaNetConfig(
        num_classes=num_classes, backbone="resnet18", fpn_channels=128, head_channels=128,
        head_depth=2, min_size=[384], max_size=640, detections_per_image=100,
    )


def retinanet_lite0_fpn_cpu(num_classes: int = 80) -> RetinaNetConfig:
    """A CPU-sized EfficientNet-Lite0 RetinaNet, initialised from the local ImageNet checkpoint
    (inputs normalised to [-1, 1], the backbone's own normalisation)."""
    return retinanet_r18_fpn_cpu(num_classes).replace(
        backbone="efficientnet_lite0", backbone_weights="imagenet", trainable_stages=3,
    )


NAMED_CONFIGS = {
    "retinanet_r50_fpn": retinanet_r50_fpn,
    "retinanet_r50_fpn_tv": retinanet_r50_fpn_tv,
    "retinanet_r50_fpn_v2_tv": retinanet_r50_fpn_v2_tv,
    "retinanet_r18_fpn_cpu": retinanet_r18_fpn_cpu,
    "retinanet_lite0_fpn_cpu": retinanet_lite0_fpn_cpu,
}


def named_config(name: str, **overrides: Any) -> RetinaNetConfig:
    """Return the named config with field overrides; ``KeyError`` lists the known names."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]().replace(**overrides)
