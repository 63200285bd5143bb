"""Build a :class:`RetinaNet` from a :class:`RetinaNetConfig`."""
from __future__ import annotations

from torch import nn

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .config import RetinaNetConfig
from .criterion import RetinaNetCriterion
from .fpn import FeaturePyramid
from .heads import RetinaNetHead
from .matcher import AnchorMatcher
from .postprocess import DetectionPostprocessor
from .preprocess import ImagePreprocessor
from .retinanet import RetinaNet


def build_backbone(config: RetinaNetConfig) -> nn.Module:
    """The backbone named by ``config.backbone`` ("resnet18|34|50|101", "efficientnet_lite0",
    "timm:<name>"); ``ValueError`` for an unknown name."""
    from . import backbones

    name = config.backbone
    if name.startswith("resnet") and name[6:].isdigit():
        return backbones.ResNetBackbone(
            depth=int(name[6:]), trainable_stages=config.trainable_stages, weights=config.backbone_weights
        )
    weights = config.backbone_weights
    path = weights if weights not in (None, "imagenet") else None
    if name == "efficientnet_lite0":
        return backbones.efficientnet_lite0_backbone(
            pretrained=weights is not None, checkpoint_path=path, trainable_stages=config.trainable_stages
        )
    if name.startswith("timm:"):
        return backbones.TimmBackbone(
            model_name=name[5:], pretrained=weights == "imagenet", checkpoint_path=path,
            trainable_stages=config.trainable_stages,
        )
    raise ValueError(f"unknown backbone {name!r}: use resnet18/34/50/101, efficientnet_lite0 or timm:<name>")


def build_anchor_generator(config: RetinaNetConfig) -> AnchorGenerator:
    """The anchors of ``config``: its sizes, scales and ratios on levels min_level..max_level,
    placed every 2^l px (``anchor_placement="level"``) or as torchvision does ("image")."""
    strides = None
    if config.anchor_placement == "level":
        strides = [2**level for level in range(config.min_level, config.max_level + 1)]
    return AnchorGenerator(
        sizes=config.anchor_sizes, scales=config.anchor_scales, ratios=config.anchor_ratios, level_strides=strides
    )


def input_normalization(config: RetinaNetConfig, backbone: nn.Module) -> tuple[list[float], list[float]]:
    """``(pixel_mean, pixel_std)`` for images in [0, 1]: the config's when set, else the ones the
    backbone's weights were trained with (``backbone.pixel_mean`` / ``pixel_std``)."""
    if config.pixel_mean is not None:
        return list(config.pixel_mean), list(config.pixel_std)
    return list(backbone.pixel_mean), list(backbone.pixel_std)


def build_model(config: RetinaNetConfig) -> RetinaNet:
    """Assemble every piece of the detector from ``config``."""
    config.validate()
    backbone = build_backbone(config)
    pixel_mean, pixel_std = input_normalization(config, backbone)
    strides = list(backbone.strides)
    in_levels = [s.bit_length() - 1 for s in strides]
    box_coder = BoxCoder(weights=tuple(config.box_weights), scale_clamp=config.box_scale_clamp)
    softmax = config.cls_loss == "softmax_focal"
    return RetinaNet(
        config=config,
        backbone=backbone,
        preprocessor=ImagePreprocessor(
            min_size=config.min_size, max_size=config.max_size, size_divisible=config.size_divisible,
            pixel_mean=pixel_mean, pixel_std=pixel_std,
        ),
        fpn=FeaturePyramid(
            in_channels=backbone.out_channels, in_levels=in_levels, out_channels=config.fpn_channels,
            min_level=config.min_level, max_level=config.max_level, merge=config.fpn_merge,
            p6_input=config.p6_input,
        ),
        head=RetinaNetHead(
            in_channels=config.fpn_channels, num_anchors=config.num_anchors_per_location,
            num_classes=config.num_classes, background_logit=softmax, channels=config.head_channels,
            depth=config.head_depth, norm=config.head_norm, prior_prob=config.prior_prob,
        ),
        anchor_generator=build_anchor_generator(config),
        criterion=RetinaNetCriterion(
            num_classes=config.num_classes,
            matcher=AnchorMatcher(
                foreground_iou=config.foreground_iou, background_iou=config.background_iou,
                allow_low_quality_matches=config.allow_low_quality_matches, crowd_ioa=config.crowd_ioa,
            ),
            box_coder=box_coder, cls_loss=config.cls_loss, focal_alpha=config.focal_alpha,
            focal_gamma=config.focal_gamma, focal_star_gamma=config.focal_star_gamma,
            focal_star_beta=config.focal_star_beta, box_loss=config.box_loss,
            smooth_l1_beta=config.smooth_l1_beta, box_loss_weight=config.box_loss_weight,
            normalization=config.loss_normalization,
        ),
        postprocessor=DetectionPostprocessor(
            box_coder=box_coder, score_thresh=config.score_thresh, topk_candidates=config.topk_candidates,
            nms_thresh=config.nms_thresh, detections_per_image=config.detections_per_image, softmax=softmax,
        ),
    )
