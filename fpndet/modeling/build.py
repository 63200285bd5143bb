"""Build a detector (:class:`RetinaNet` or :class:`FasterRCNN`) from a :class:`ModelConfig`:
one builder per stage, the shared parts (backbone, FPN, anchors, pre-processing) built once here."""
from __future__ import annotations

from torch import nn

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .faster_rcnn import FasterRCNN
from .poolers import MultiLevelRoIAlign
from .roi_heads import ConvFCHead, FastRCNNPredictor, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead
from .sampling import BalancedSampler
from .config import ModelConfig
from .criterion import RetinaNetCriterion
from .fpn import FeaturePyramid
from .heads import RetinaNetHead
from .matcher import AnchorMatcher
from .postprocess import DetectionPostprocessor
from .preprocess import ImagePreprocessor
from .retinanet import RetinaNet


def build_backbone(config: ModelConfig) -> nn.Module:
    """The backbone named by ``config.backbone`` ("resnet18|34|50|101", "efficientnet_lite0",
    "timm:<name>") giving C_min_level..C5; ``ValueError`` for an unknown name."""
    from . import backbones

    name = config.backbone
    levels = tuple(range(config.min_level, 6))  # C_min..C5: the FPN's inputs
    if name.startswith("resnet") and name[6:].isdigit():
        return backbones.ResNetBackbone(
            depth=int(name[6:]), trainable_stages=config.trainable_stages, weights=config.backbone_weights,
            levels=levels,
        )
    weights = config.backbone_weights
    path = weights if weights not in (None, "imagenet") else None
    if name == "efficientnet_lite0":
        return backbones.efficientnet_lite0_backbone(
            pretrained=weights is not None, checkpoint_path=path, trainable_stages=config.trainable_stages,
            levels=levels,
        )
    if name.startswith("timm:"):
        return backbones.TimmBackbone(
            model_name=name[5:], pretrained=weights == "imagenet", checkpoint_path=path,
            trainable_stages=config.trainable_stages, levels=levels,
        )
    raise ValueError(f"unknown backbone {name!r}: use resnet18/34/50/101, efficientnet_lite0 or timm:<name>")


def level_strides(config: ModelConfig) -> list[int]:
    """The stride in pixels of each pyramid level P_min..P_max: 2^l."""
    return [2**level for level in range(config.min_level, config.max_level + 1)]


def build_anchor_generator(config: ModelConfig) -> AnchorGenerator:
    """The anchors of ``config``: its sizes, scales and ratios on levels min_level..max_level,
    placed every 2^l px (``anchor_placement="level"``) or as torchvision does ("image")."""
    strides = level_strides(config) if config.anchor_placement == "level" else None
    return AnchorGenerator(
        sizes=config.anchor_sizes, scales=config.anchor_scales, ratios=config.anchor_ratios, level_strides=strides
    )


def input_normalization(config: ModelConfig, backbone: nn.Module) -> tuple[list[float], list[float]]:
    """``(pixel_mean, pixel_std)`` for images in [0, 1]: the config's when set, else the ones the
    backbone's weights were trained with (``backbone.pixel_mean`` / ``pixel_std``)."""
    if config.pixel_mean is not None:
        return list(config.pixel_mean), list(config.pixel_std)
    return list(backbone.pixel_mean), list(backbone.pixel_std)


def build_pyramid(config: ModelConfig, backbone: nn.Module) -> FeaturePyramid:
    """The FPN of ``config`` on ``backbone``'s levels: P_min..P_max, its top block and ablations."""
    return FeaturePyramid(
        in_channels=backbone.out_channels, in_levels=backbone.levels, out_channels=config.fpn_channels,
        min_level=config.min_level, max_level=config.max_level, merge=config.fpn_merge,
        p6_input=config.p6_input, top_block=config.fpn_top_block, top_down=config.fpn_top_down,
        lateral=config.fpn_lateral, norm=config.fpn_norm,
    )


def build_preprocessor(config: ModelConfig, backbone: nn.Module) -> ImagePreprocessor:
    pixel_mean, pixel_std = input_normalization(config, backbone)
    return ImagePreprocessor(
        min_size=config.min_size, max_size=config.max_size, size_divisible=config.size_divisible,
        pixel_mean=pixel_mean, pixel_std=pixel_std,
    )


def build_model(config: ModelConfig) -> nn.Module:
    """Assemble every piece of the detector that ``config.arch`` names: a :class:`RetinaNet`, or a
    :class:`FasterRCNN` (also for "rpn": proposals only, and "fast_rcnn": RoI heads on given
    proposals). Raises ``ValueError`` for an inconsistent config."""
    config.validate()
    if config.arch == "retinanet":
        return build_retinanet(config)
    return build_faster_rcnn(config)


def build_rpn(config: ModelConfig) -> RegionProposalNetwork:
    """The RPN of FPN §4.1 on levels P_min..P_max (one shared head; config section ``rpn``)."""
    rpn = config.rpn
    return RegionProposalNetwork(
        head=RPNHead(in_channels=config.fpn_channels, num_anchors=config.num_anchors_per_location,
                     conv_depth=rpn.conv_depth),
        anchor_generator=build_anchor_generator(config),
        matcher=AnchorMatcher(foreground_iou=rpn.foreground_iou, background_iou=rpn.background_iou,
                              allow_low_quality_matches=rpn.allow_low_quality_matches),
        sampler=BalancedSampler(batch_size_per_image=rpn.batch_size_per_image, positive_fraction=rpn.positive_fraction),
        box_coder=BoxCoder(weights=tuple(rpn.box_weights), scale_clamp=config.box_scale_clamp),
        pre_nms_topk=(rpn.pre_nms_topk_train, rpn.pre_nms_topk_test),
        post_nms_topk=(rpn.post_nms_topk_train, rpn.post_nms_topk_test),
        post_nms_topk_per=rpn.post_nms_topk_per, nms_thresh=rpn.nms_thresh, min_size=rpn.min_box_size,
        score_thresh=rpn.score_thresh, box_loss=rpn.box_loss, smooth_l1_beta=rpn.smooth_l1_beta,
    )


def build_roi_heads(config: ModelConfig) -> RoIHeads:
    """The Fast R-CNN stage of FPN §4.2 pooling from P_min..P5 (config section ``roi_heads``)."""
    roi = config.roi_heads
    levels = tuple(range(config.min_level, min(config.max_level, 5) + 1))
    if roi.box_head == "fc":
        box_head: nn.Module = TwoMLPHead(in_channels=config.fpn_channels, resolution=roi.pooler_resolution,
                                         representation_size=roi.fc_dim)
    else:
        box_head = ConvFCHead(in_channels=config.fpn_channels, resolution=roi.pooler_resolution,
                              conv_dims=(roi.conv_dim,) * roi.num_convs, fc_dims=(roi.fc_dim,), norm=roi.box_head_norm)
    return RoIHeads(
        num_classes=config.num_classes,
        pooler=MultiLevelRoIAlign(levels=levels, output_size=roi.pooler_resolution, sampling_ratio=roi.sampling_ratio,
                                  aligned=roi.aligned, canonical_scale=roi.canonical_size,
                                  canonical_level=roi.canonical_level),
        box_head=box_head,
        predictor=FastRCNNPredictor(in_features=box_head.out_features, num_classes=config.num_classes),
        matcher=AnchorMatcher(foreground_iou=roi.foreground_iou, background_iou=roi.background_iou,
                              allow_low_quality_matches=False),
        sampler=BalancedSampler(batch_size_per_image=roi.batch_size_per_image, positive_fraction=roi.positive_fraction),
        box_coder=BoxCoder(weights=tuple(roi.box_weights), scale_clamp=config.box_scale_clamp),
        score_thresh=config.score_thresh, nms_thresh=config.nms_thresh,
        detections_per_image=config.detections_per_image, smooth_l1_beta=roi.smooth_l1_beta,
    )


def build_faster_rcnn(config: ModelConfig) -> FasterRCNN:
    """Faster R-CNN with FPN (arch "faster_rcnn"), the RPN alone ("rpn") or the RoI heads alone
    on given proposals ("fast_rcnn": no RPN; the model refuses to run without proposals)."""
    backbone = build_backbone(config)
    return FasterRCNN(
        num_classes=config.num_classes,
        config=config,
        backbone=backbone,
        preprocessor=build_preprocessor(config, backbone),
        fpn=build_pyramid(config, backbone),
        rpn=build_rpn(config) if config.uses_rpn else None,
        roi_heads=build_roi_heads(config) if config.uses_roi_heads else None,
    )


def build_retinanet(config: ModelConfig) -> RetinaNet:
    """RetinaNet (Focal Loss paper §4) from the shared parts and the ``retinanet`` section."""
    backbone = build_backbone(config)
    box_coder = BoxCoder(weights=tuple(config.retinanet.box_weights), scale_clamp=config.box_scale_clamp)
    head_cfg = config.retinanet
    softmax = head_cfg.cls_loss == "softmax_focal"
    return RetinaNet(
        config=config,
        backbone=backbone,
        preprocessor=build_preprocessor(config, backbone),
        fpn=build_pyramid(config, backbone),
        head=RetinaNetHead(
            in_channels=config.fpn_channels, num_anchors=config.num_anchors_per_location,
            num_classes=config.num_classes, background_logit=softmax, channels=head_cfg.head_channels,
            depth=head_cfg.head_depth, norm=head_cfg.head_norm, prior_prob=head_cfg.prior_prob,
            strides=level_strides(config),
        ),
        anchor_generator=build_anchor_generator(config),
        criterion=RetinaNetCriterion(
            num_classes=config.num_classes,
            matcher=AnchorMatcher(
                foreground_iou=head_cfg.foreground_iou, background_iou=head_cfg.background_iou,
                allow_low_quality_matches=head_cfg.allow_low_quality_matches, crowd_ioa=head_cfg.crowd_ioa,
            ),
            box_coder=box_coder, cls_loss=head_cfg.cls_loss, focal_alpha=head_cfg.focal_alpha,
            focal_gamma=head_cfg.focal_gamma, focal_star_gamma=head_cfg.focal_star_gamma,
            focal_star_beta=head_cfg.focal_star_beta, box_loss=head_cfg.box_loss,
            smooth_l1_beta=head_cfg.smooth_l1_beta, box_loss_weight=head_cfg.box_loss_weight,
            normalization=head_cfg.loss_normalization,
        ),
        postprocessor=DetectionPostprocessor(
            box_coder=box_coder, score_thresh=config.score_thresh, topk_candidates=head_cfg.topk_candidates,
            nms_thresh=config.nms_thresh, detections_per_image=config.detections_per_image, softmax=softmax,
        ),
    )
