"""RetinaNet's classification and box-regression subnets (Focal Loss paper §4, Fig. 3).

Both are shared across pyramid levels: ``depth`` x (3x3 conv, C channels, [GroupNorm(32)], ReLU),
then a 3x3 conv to K*A (classification) or 4*A (box deltas). Weights ~ N(0, 0.01), biases 0,
except the final classification bias, set so that every anchor starts out as background with
probability 1 - π (prior π = 0.01, §3.3 "Class Imbalance and Model Initialization", §4
"Initialization"):

- sigmoid classification (K logits): b = -log((1 - π) / π) on every class, so σ(b) = π;
- softmax classification (K + 1 logits, background last): object biases 0 and background bias
  b_bg = log(K (1 - π) / π), so p(background) = e^b_bg / (e^b_bg + K) = 1 - π and each class
  π / K (Detectron's softmax RetinaNet initialisation).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .config import HEAD_NORMS
from .preprocess import valid_region


def conv_tower(*, channels: int, depth: int, norm: Optional[str]) -> nn.Sequential:
    """``depth`` blocks of Sequential(conv3x3, [GroupNorm(32, C)], ReLU); conv bias only without
    norm. ``norm`` is one of :data:`HEAD_NORMS` ("group" and "group_masked" hold the same layers)."""
    blocks = []
    for _ in range(depth):
        layers = [nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None)]
        if norm is not None:
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU(inplace=True))
        blocks.append(nn.Sequential(*layers))
    return nn.Sequential(*blocks)


def level_masks(image_sizes: Tensor, shapes: Sequence[tuple[int, int]], strides: Sequence[int]) -> list[Tensor]:
    """Which cells of each level's map lie on the image rather than on the batch's padding:
    one bool ``[B, 1, H_l, W_l]`` per level (:func:`~fpndet.modeling.preprocess.valid_region`).

    Args: image_sizes int ``[B, 2]`` (h, w) pixels of each resized image in the padded batch;
    shapes: (H_l, W_l) of each level's map; strides: its stride in pixels (2^l for P_l)."""
    return [valid_region(image_sizes, height, width, stride) for (height, width), stride in zip(shapes, strides)]


def masked_group_norm(x: Tensor, mask: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``norm`` (GroupNorm, Wu & He 2018) with each image's statistics taken over the cells where
    ``mask`` is True only, so that the padding a batch adds around an image does not change its
    features (nn.GroupNorm averages over the padding too, and an image's detections then depend
    on its batch-mates' sizes).

    Args: x float ``[B, C, H, W]``; mask bool ``[B, 1, H, W]`` (:func:`level_masks`). Returns
    ``[B, C, H, W]``, equal to ``norm(x)`` where the mask is all True (within float rounding).
    """
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    grouped = x.reshape(batch, groups, channels // groups, height * width)
    weight = mask.reshape(batch, 1, 1, height * width).to(x.dtype)
    count = weight.sum(dim=3, keepdim=True).clamp_min(1.0) * (channels // groups)  # [B, 1, 1, 1]
    mean = (grouped * weight).sum(dim=(2, 3), keepdim=True) / count
    centred = grouped - mean
    var = (centred * centred * weight).sum(dim=(2, 3), keepdim=True) / count
    normalised = (centred * torch.rsqrt(var + norm.eps)).reshape(batch, channels, height, width)
    return normalised * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def run_tower(tower: nn.Sequential, x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``tower(x)``; with a ``mask`` (bool ``[B, 1, H, W]``, :func:`level_masks`) each image is
    treated as if alone: the cells off the image are set to zero before every conv (what the conv's
    own zero padding gives an unpadded map) and the GroupNorms' statistics cover the image's cells
    only, so the outputs on the image do not depend on the batch's padding. Returns the tower's
    output, zero off the image when masked."""
    if mask is None:
        return tower(x)
    keep = mask.to(x.dtype)
    for conv, norm, activation in tower:
        x = activation(masked_group_norm(conv(x * keep), mask, norm))
    return x * keep


def flatten_level(x: Tensor, per_anchor: int) -> Tensor:
    """``[B, A*per_anchor, H, W]`` -> ``[B, H*W*A, per_anchor]`` (location-major, anchor-minor)."""
    b, channels, h, w = x.shape
    anchors = channels // per_anchor  # sizes spelled out (no -1): cheap for the ONNX exporter's shape reasoning
    return x.view(b, anchors, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * anchors, per_anchor)


def prior_bias(num_anchors: int, num_classes: int, background_logit: bool, prior_prob: float) -> Tensor:
    """float32 ``[A * num_logits]`` initial classification bias giving each anchor background
    probability 1 - π (module doc), laid out anchor-major as the classification conv's channels."""
    if not background_logit:
        return torch.full((num_anchors * num_classes,), -math.log((1 - prior_prob) / prior_prob))
    bias = torch.zeros(num_anchors, num_classes + 1)
    bias[:, num_classes] = math.log(num_classes * (1 - prior_prob) / prior_prob)
    return bias.reshape(-1)


class RetinaNetHead(nn.Module):
    """Classification + box subnets applied to every pyramid level.

    Args (keyword-only):
        in_channels: FPN channels d.
        num_anchors: A per location.
        num_classes: K object classes.
        background_logit: add a (K+1)-th background logit (softmax classification).
        channels: C of the hidden convs (256 in the paper); a 1x1 projection is added when it
            differs from ``in_channels``.
        depth: hidden convs per subnet (4 in the paper).
        norm: None; "group" (GroupNorm(32) over the whole padded map, torchvision's RetinaNet v2);
            "group_masked" (the same layers; each image's statistics over its own cells only and
            the padding zeroed before every conv, :func:`run_tower`: an image's outputs no longer
            depend on its batch-mates' sizes; needs ``strides`` and the image sizes at call time).
        prior_prob: π for the classification bias.
        strides: each level's stride in pixels (2^l for P_l), for "group_masked".

    ``forward(features, image_sizes=None)`` with features ``[B, d, H_l, W_l]`` per level (and,
    for "group_masked", int ``[B, 2]`` (h, w) image sizes in the padded batch; without them the
    whole map counts) returns ``(cls_logits [B, sum_l H_l W_l A, num_logits], box_deltas
    [B, sum_l H_l W_l A, 4])`` with num_logits = K, or K + 1 with the background logit last.
    Raises ``ValueError`` for π outside (0, 1), an unknown ``norm``, or "group_masked" without
    ``strides``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        background_logit: bool = False,
        channels: int = 256,
        depth: int = 4,
        norm: Optional[str] = None,
        prior_prob: float = 0.01,
        strides: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
        if norm == "group_masked" and strides is None:
            raise ValueError("norm 'group_masked' needs the levels' strides")
        self.masked_norm = norm == "group_masked"
        self.strides = None if strides is None else [int(s) for s in strides]
        num_logits = num_classes + int(background_logit)
        self.num_logits = num_logits
        self.input_proj = nn.Identity() if channels == in_channels else nn.Conv2d(in_channels, channels, 1)
        self.cls_tower = conv_tower(channels=channels, depth=depth, norm=norm)
        self.box_tower = conv_tower(channels=channels, depth=depth, norm=norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_logits, 3, padding=1)
        self.box_deltas = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.cls_logits.bias.copy_(prior_bias(num_anchors, num_classes, background_logit, prior_prob))

    def per_level(
        self, features: Sequence[Tensor], image_sizes: Optional[Tensor] = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The outputs of each level: ``[B, H_l W_l A, num_logits]`` and ``[B, H_l W_l A, 4]``."""
        masks: Sequence[Optional[Tensor]] = [None] * len(features)
        if self.masked_norm and image_sizes is not None:
            masks = level_masks(image_sizes, [tuple(f.shape[-2:]) for f in features], self.strides)
        cls_out, box_out = [], []
        for x, mask in zip(features, masks):
            x = self.input_proj(x)
            cls_out.append(flatten_level(self.cls_logits(run_tower(self.cls_tower, x, mask)), self.num_logits))
            box_out.append(flatten_level(self.box_deltas(run_tower(self.box_tower, x, mask)), 4))
        return cls_out, box_out

    def forward(self, features: Sequence[Tensor], image_sizes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        cls_out, box_out = self.per_level(features, image_sizes)
        return torch.cat(cls_out, dim=1), torch.cat(box_out, dim=1)
