"""The model configuration: one dataclass for every architecture, read by
:func:`fpndet.modeling.build.build_model`.

:class:`ModelConfig` chooses the architecture (``arch``) and holds the parts every architecture
shares — backbone, FPN, anchors, pre-processing, final inference — at its top level, and one
section per architecture stage: ``retinanet`` (:class:`RetinaNetConfig`), ``rpn``
(:class:`RPNConfig`) and ``roi_heads`` (:class:`RoIHeadsConfig`). A section is read only by the
architectures that use it. The same dataclass is the ``model`` section of the YAML experiment
configs (OmegaConf structured config: ``model.arch=faster_rcnn model.rpn.nms_thresh=0.6``; switching
``arch`` between RetinaNet and the two-stage family also switches the pyramid and anchors to the
family's, see :func:`fpndet.config.load_config`), and it
is stored as JSON beside every checkpoint, so a checkpoint rebuilds its model; checkpoints
written before the sections existed (flat RetinaNet fields) are read by :meth:`ModelConfig.from_dict`.
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

ARCHS = ("retinanet", "faster_rcnn", "rpn", "fast_rcnn")
CLS_LOSSES = ("sigmoid_focal", "softmax_focal", "bce", "balanced_bce", "focal_star")
BOX_LOSSES = ("smooth_l1", "l1", "giou")
LOSS_NORMALIZATIONS = ("batch", "per_image")
ANCHOR_PLACEMENTS = ("level", "image")
FPN_TOP_BLOCKS = ("conv", "max_pool")
FPN_NORMS = (None, "batch", "frozen_batch", "group")
HEAD_NORMS = (None, "group", "group_masked")
BOX_HEADS = ("fc", "conv")
PROPOSAL_TOPK_MODES = ("image", "batch")


def _check(section: str, checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{section}: {message}")


@dataclass
class RetinaNetConfig:
    """The RetinaNet stage (Lin et al. 2017, "Focal Loss", §4): heads, matching, losses and the
    per-level candidate selection of inference. Section ``model.retinanet``."""

    # Heads (§4 "Classification Subnet", "Box Regression Subnet").
    head_channels: int = 256
    head_depth: int = 4
    # None, "group" (GroupNorm(32) over the padded map, torchvision v2) or "group_masked" (statistics
    # over each image's own cells, so detections do not depend on the batch's padding).
    head_norm: Optional[str] = None
    prior_prob: float = 0.01

    # Matching (§4 "Training"): IoU >= 0.5 foreground, < 0.4 background, between ignored.
    foreground_iou: float = 0.5
    background_iou: float = 0.4
    allow_low_quality_matches: bool = True
    crowd_ioa: float = 0.5
    box_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])

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

    # Inference (§4.1): the top-k candidates per level above the score threshold.
    topk_candidates: int = 1000

    def validate(self) -> None:
        _check("retinanet", [
            (self.cls_loss in CLS_LOSSES, f"cls_loss must be one of {CLS_LOSSES}"),
            (self.box_loss in BOX_LOSSES, f"box_loss must be one of {BOX_LOSSES}"),
            (self.loss_normalization in LOSS_NORMALIZATIONS,
             f"loss_normalization must be one of {LOSS_NORMALIZATIONS}"),
            (self.head_norm in HEAD_NORMS, f"head_norm must be one of {HEAD_NORMS}"),
            (0.0 < self.prior_prob < 1.0, "prior_prob must be in (0, 1)"),
            (self.background_iou <= self.foreground_iou, "background_iou must be <= foreground_iou"),
        ])


@dataclass
class RPNConfig:
    """The Region Proposal Network on the pyramid (FPN paper §4.1; Faster R-CNN §3.1): head,
    anchor matching and sampling, loss and proposal selection. Section ``model.rpn``.

    Defaults are torchvision's ``fasterrcnn_resnet50_fpn`` (the paper's values)."""

    conv_depth: int = 1  # 3x3 convs before the sibling 1x1 convs (torchvision v2: 2)
    foreground_iou: float = 0.7
    background_iou: float = 0.3
    allow_low_quality_matches: bool = True
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    box_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    box_loss: str = "smooth_l1"  # "smooth_l1" or "l1"
    smooth_l1_beta: float = 1.0 / 9
    # Proposals: top-k per level before NMS, NMS within each level, best post_nms_topk kept.
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000
    post_nms_topk_test: int = 1000
    # "image": post_nms_topk per image (torchvision, detectron2); "batch": per batch in
    # training (the original Detectron FPN behaviour), per image at test time.
    post_nms_topk_per: str = "image"
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_box_size: float = 1e-3

    def validate(self) -> None:
        _check("rpn", [
            (self.box_loss in ("smooth_l1", "l1"), "box_loss must be 'smooth_l1' or 'l1'"),
            (self.post_nms_topk_per in PROPOSAL_TOPK_MODES, f"post_nms_topk_per must be one of {PROPOSAL_TOPK_MODES}"),
            (self.background_iou <= self.foreground_iou, "background_iou must be <= foreground_iou"),
            (0.0 < self.positive_fraction <= 1.0, "positive_fraction must be in (0, 1]"),
            (self.conv_depth >= 1, "conv_depth must be >= 1"),
        ])


@dataclass
class RoIHeadsConfig:
    """The Fast R-CNN stage on the pyramid (FPN paper §4.2): RoI sampling, RoI-to-level
    assignment and RoIAlign, box head, predictor, loss. Section ``model.roi_heads``.

    Defaults are torchvision's ``fasterrcnn_resnet50_fpn`` (the paper's values)."""

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    foreground_iou: float = 0.5  # foreground IoU >= 0.5, background [0, 0.5)
    background_iou: float = 0.5
    # RoIAlign 7x7 from level k = floor(k0 + log2(sqrt(wh) / canonical_size)), k0 = canonical_level.
    pooler_resolution: int = 7
    sampling_ratio: int = 2
    aligned: bool = False
    canonical_size: int = 224
    canonical_level: int = 4
    # Box head: "fc" = 2 x fc (paper, torchvision v1); "conv" = num_convs 3x3 convs, each followed by
    # box_head_norm, + 1 fc (torchvision v2 with box_head_norm "batch").
    box_head: str = "fc"
    fc_dim: int = 1024
    conv_dim: int = 256
    num_convs: int = 4
    box_head_norm: Optional[str] = None  # "conv" head: None, "batch" (torchvision v2), "frozen_batch", "group"
    box_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    smooth_l1_beta: float = 1.0 / 9

    def validate(self) -> None:
        _check("roi_heads", [
            (self.box_head in BOX_HEADS, f"box_head must be one of {BOX_HEADS}"),
            (self.box_head_norm in FPN_NORMS, f"box_head_norm must be one of {FPN_NORMS}"),
            (self.background_iou <= self.foreground_iou, "background_iou must be <= foreground_iou"),
            (0.0 < self.positive_fraction <= 1.0, "positive_fraction must be in (0, 1]"),
            (self.pooler_resolution >= 1 and self.sampling_ratio >= 0, "bad pooler_resolution/sampling_ratio"),
        ])


SECTIONS = {"retinanet": RetinaNetConfig, "rpn": RPNConfig, "roi_heads": RoIHeadsConfig}


@dataclass
class ModelConfig:
    """Every hyper-parameter of a detector.

    ``arch``: "retinanet" (one stage, Focal Loss paper), "faster_rcnn" (RPN + Fast R-CNN trained
    jointly), "rpn" (proposals only, evaluated by recall) or "fast_rcnn" (the Fast R-CNN stage on
    proposals given with the images: FPN paper Table 2).

    ``num_classes`` counts object classes only; labels are 0..num_classes-1 (a background logit,
    where a head has one, is internal to it). ``fpndet train`` sets it to the training dataset's
    number of classes (a config's value is a default for building models outside training).
    """

    arch: str = "retinanet"
    num_classes: int = 80

    # Backbone giving C_min..C5: "resnet18|34|50|101", "efficientnet_lite0", or "timm:<model name>".
    backbone: str = "resnet50"
    # None (random), "imagenet" (torchvision/timm download, or the local Lite0 package),
    # or the path of a state dict file.
    backbone_weights: Optional[str] = None
    # Trainable stages counted from the top (torchvision's trainable_backbone_layers):
    # 3 = stem and res2 frozen.
    trainable_stages: int = 3

    # FPN (FPN paper §3): d channels, levels P_min..P_max, merge "sum" (paper) or "average"
    # (0.5 top-down + 0.5 lateral, TF snippet). Levels above 5 come from the top block: "conv"
    # (RetinaNet: P6 = 3x3/2 conv on C5 or P5 (p6_input), P7 = conv(ReLU(P6))) or "max_pool" (RPN:
    # P6 = P5 subsampled by 2). fpn_top_down / fpn_lateral: the ablations of FPN Table 1 (d)-(e).
    # fpn_norm: None (paper) or a norm after each FPN conv ("batch": torchvision Faster R-CNN v2).
    fpn_channels: int = 256
    min_level: int = 3
    max_level: int = 7
    fpn_merge: str = "sum"
    fpn_top_block: str = "conv"
    p6_input: str = "c5"
    fpn_top_down: bool = True
    fpn_lateral: bool = True
    fpn_norm: Optional[str] = None

    # Anchors: one base size per level (P_min..P_max), A = len(scales) * len(ratios) per location.
    # anchor_placement: "level" puts P_l's cells every 2^l px (paper, detectron2); "image" every
    # padded_size // grid px (torchvision; differs from 2^l when the padded size is not a
    # multiple of 2^l). See fpndet.modeling.anchors.
    anchor_placement: str = "level"
    anchor_sizes: List[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_scales: List[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    anchor_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    box_scale_clamp: float = math.log(1000.0 / 16)  # dw, dh clamp when decoding

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

    # Final detections (RetinaNet §4.1, Fast R-CNN): score threshold, class-wise NMS, kept per image.
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100

    retinanet: RetinaNetConfig = field(default_factory=RetinaNetConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)

    def __post_init__(self) -> None:
        for name, section_type in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section_from_dict(section_type, value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        _check("ModelConfig", [
            (self.arch in ARCHS, f"arch must be one of {ARCHS}"),
            (self.num_classes >= 1, "num_classes must be >= 1"),
            (self.fpn_merge in ("sum", "average"), "fpn_merge must be 'sum' or 'average'"),
            (self.fpn_top_block in FPN_TOP_BLOCKS, f"fpn_top_block must be one of {FPN_TOP_BLOCKS}"),
            (self.p6_input in ("c5", "p5"), "p6_input must be 'c5' or 'p5'"),
            (self.fpn_norm in FPN_NORMS, f"fpn_norm must be one of {FPN_NORMS}"),
            (self.fpn_top_down or self.fpn_lateral, "fpn_top_down and fpn_lateral cannot both be false"),
            (2 <= self.min_level <= 5 and self.min_level <= self.max_level,
             "levels must satisfy 2 <= min_level <= 5 and min_level <= max_level"),
            (len(self.anchor_sizes) == self.max_level - self.min_level + 1,
             "anchor_sizes needs one size per pyramid level"),
            (self.anchor_placement in ANCHOR_PLACEMENTS, f"anchor_placement must be one of {ANCHOR_PLACEMENTS}"),
            ((self.pixel_mean is None) == (self.pixel_std is None), "set both pixel_mean and pixel_std, or neither"),
            (self.pixel_mean is None or self.pixel_std is None or (len(self.pixel_mean) == 3 and len(self.pixel_std) == 3),
             "pixel_mean/std need 3 values"),
            (len(self.min_size) >= 1, "min_size needs at least one value"),
        ])
        for name in SECTIONS:
            getattr(self, name).validate()

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    @property
    def anchor_stage(self) -> "RetinaNetConfig | RPNConfig":
        """The section whose matcher assigns anchors (its foreground_iou / background_iou):
        ``retinanet`` for RetinaNet, ``rpn`` for the two-stage architectures."""
        return self.retinanet if self.arch == "retinanet" else self.rpn

    @property
    def uses_rpn(self) -> bool:
        return self.arch in ("faster_rcnn", "rpn")

    @property
    def uses_roi_heads(self) -> bool:
        return self.arch in ("faster_rcnn", "fast_rcnn")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (sections as nested dicts), rejecting unknown keys
        (``ValueError`` names them).

        Dicts written before the sections existed (fpndet checkpoints of RetinaNet with flat
        fields such as ``head_depth``) are read too: their RetinaNet fields move into the
        ``retinanet`` section, and a missing ``anchor_placement`` means "image" (anchors were
        always placed as torchvision places them then), so older checkpoints rebuild the model
        they were trained as.
        """
        values = dict(values)
        legacy = {k: values.pop(k) for k in list(values) if k in _RETINANET_FIELDS}
        if legacy:
            values["retinanet"] = {**legacy, **dict(values.get("retinanet") or {})}
        values.setdefault("anchor_placement", "image")
        unknown = sorted(set(values) - _FIELDS)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}")
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes``; a section given as a dict is merged into the current one
        (``config.replace(retinanet={"head_depth": 2})`` keeps the other RetinaNet fields)."""
        for name in SECTIONS:
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)


def _section_from_dict(section_type: type, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(section_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{section_type.__name__}: unknown fields {unknown}")
    return section_type(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})


_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_RETINANET_FIELDS = {f.name for f in dataclasses.fields(RetinaNetConfig)}


# --------------------------------------------------------------------------------------------
# Named configs
# --------------------------------------------------------------------------------------------


def retinanet_r50_fpn(num_classes: int = 80) -> ModelConfig:
    """The paper's RetinaNet R50-FPN (§4-5): P6 from C5, smooth-L1 (β=0.11), batch normalisation."""
    return ModelConfig(num_classes=num_classes)


def retinanet_r50_fpn_tv(num_classes: int = 91) -> ModelConfig:
    """torchvision's ``retinanet_resnet50_fpn``: P6 from P5, L1 box loss, per-image normalisation,
    300 detections, anchors placed as torchvision places them, ImageNet normalisation whatever
    the backbone, labels are COCO category ids (91 logits)."""
    return ModelConfig(
        num_classes=num_classes, p6_input="p5", detections_per_image=300, anchor_placement="image",
        pixel_mean=list(IMAGENET_MEAN), pixel_std=list(IMAGENET_STD),
        retinanet=RetinaNetConfig(box_loss="l1", loss_normalization="per_image"),
    )


def retinanet_r50_fpn_v2_tv(num_classes: int = 91) -> ModelConfig:
    """torchvision's ``retinanet_resnet50_fpn_v2``: GroupNorm heads, P6 from C5, GIoU box loss."""
    return retinanet_r50_fpn_tv(num_classes).replace(p6_input="c5", retinanet={"head_norm": "group", "box_loss": "giou"})


def retinanet_r18_fpn_cpu(num_classes: int = 80) -> ModelConfig:
    """A CPU-sized ResNet-18 RetinaNet: 384 px images, narrow (128) FPN and 2-conv heads."""
    return ModelConfig(
        num_classes=num_classes, backbone="resnet18", fpn_channels=128, min_size=[384], max_size=640,
        detections_per_image=100, retinanet=RetinaNetConfig(head_channels=128, head_depth=2),
    )


def retinanet_lite0_fpn_cpu(num_classes: int = 80) -> ModelConfig:
    """A CPU-sized EfficientNet-Lite0 RetinaNet, initialised from the local ImageNet checkpoint
    (inputs normalised to [-1, 1], the backbone's own normalisation)."""
    return retinanet_r18_fpn_cpu(num_classes).replace(
        backbone="efficientnet_lite0", backbone_weights="imagenet", trainable_stages=3,
    )


def _two_stage(arch: str, num_classes: int, **changes: Any) -> ModelConfig:
    """FPN paper §4: P2-P6 (P6 = P5 subsampled), one anchor size per level (32^2..512^2) x 3 ratios."""
    base = dict(
        arch=arch, num_classes=num_classes, min_level=2, max_level=6, fpn_top_block="max_pool",
        anchor_sizes=[32.0, 64.0, 128.0, 256.0, 512.0], anchor_scales=[1.0],
    )
    return ModelConfig(**{**base, **changes})


def faster_rcnn_r50_fpn(num_classes: int = 80) -> ModelConfig:
    """The FPN paper's Faster R-CNN R50-FPN (§4.2, §5.2): RPN on P2-P6 + Fast R-CNN with 2 x fc-1024."""
    return _two_stage("faster_rcnn", num_classes)


def faster_rcnn_r50_fpn_tv(num_classes: int = 90) -> ModelConfig:
    """torchvision's ``fasterrcnn_resnet50_fpn``: anchors placed as torchvision places them,
    ImageNet normalisation; 90 object classes whose label + 1 is the COCO category id."""
    return _two_stage("faster_rcnn", num_classes, anchor_placement="image",
                      pixel_mean=list(IMAGENET_MEAN), pixel_std=list(IMAGENET_STD))


def faster_rcnn_r50_fpn_v2_tv(num_classes: int = 90) -> ModelConfig:
    """torchvision's ``fasterrcnn_resnet50_fpn_v2``: batch-normalised FPN convs, 2-conv RPN head,
    box head of 4 convs with batch norm + 1 fc."""
    return faster_rcnn_r50_fpn_tv(num_classes).replace(
        fpn_norm="batch", rpn={"conv_depth": 2}, roi_heads={"box_head": "conv", "box_head_norm": "batch"}
    )


def rpn_r50_fpn(num_classes: int = 80) -> ModelConfig:
    """The FPN paper's RPN alone (§5.1, Table 1): proposals on P2-P6, evaluated by recall."""
    return _two_stage("rpn", num_classes)


def faster_rcnn_r18_fpn_cpu(num_classes: int = 80) -> ModelConfig:
    """A CPU-sized ResNet-18 Faster R-CNN: 448 px, 128-channel FPN, fewer proposals."""
    return _two_stage(
        "faster_rcnn", num_classes, backbone="resnet18", fpn_channels=128, min_size=[448], max_size=640,
        rpn=RPNConfig(pre_nms_topk_train=1000, post_nms_topk_train=1000, pre_nms_topk_test=500,
                      post_nms_topk_test=500),
        roi_heads=RoIHeadsConfig(batch_size_per_image=256, fc_dim=512),
    )


def faster_rcnn_lite0_fpn_cpu(num_classes: int = 80) -> ModelConfig:
    """The same on EfficientNet-Lite0 with its ImageNet weights (inputs in [-1, 1])."""
    return faster_rcnn_r18_fpn_cpu(num_classes).replace(backbone="efficientnet_lite0", backbone_weights="imagenet")


NAMED_CONFIGS = {
    "retinanet_r50_fpn": retinanet_r50_fpn,
    "retinanet_r50_fpn_tv": retinanet_r50_fpn_tv,
    "retinanet_r50_fpn_v2_tv": retinanet_r50_fpn_v2_tv,
    "retinanet_r18_fpn_cpu": retinanet_r18_fpn_cpu,
    "retinanet_lite0_fpn_cpu": retinanet_lite0_fpn_cpu,
    "faster_rcnn_r50_fpn": faster_rcnn_r50_fpn,
    "faster_rcnn_r50_fpn_tv": faster_rcnn_r50_fpn_tv,
    "faster_rcnn_r50_fpn_v2_tv": faster_rcnn_r50_fpn_v2_tv,
    "rpn_r50_fpn": rpn_r50_fpn,
    "faster_rcnn_r18_fpn_cpu": faster_rcnn_r18_fpn_cpu,
    "faster_rcnn_lite0_fpn_cpu": faster_rcnn_lite0_fpn_cpu,
}


def named_config(name: str, **overrides: Any) -> ModelConfig:
    """Return the named config with field overrides (sections as dicts are merged); ``KeyError``
    lists the known names."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]().replace(**overrides)
