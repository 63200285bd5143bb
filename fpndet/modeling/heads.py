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


def conv_tower(*, channels: int, depth: int, norm: Optional[str]) -> nn.Sequential:
    """``depth`` blocks of Sequential(conv3x3, [GroupNorm(32, C)], ReLU); conv bias only without norm."""
    blocks = []
    for _ in range(depth):
        layers = [nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None)]
        if norm == "group":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU(inplace=True))
        blocks.append(nn.Sequential(*layers))
    return nn.Sequential(*blocks)


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
        norm: None or "group".
        prior_prob: π for the classification bias.

    ``forward(features)`` with features ``[B, d, H_l, W_l]`` per level returns
    ``(cls_logits [B, sum_l H_l W_l A, num_logits], box_deltas [B, sum_l H_l W_l A, 4])`` with
    num_logits = K, or K + 1 with the background logit last. Raises ``ValueError`` for π outside (0, 1).
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
    ):
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
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

    def per_level(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The outputs of each level: ``[B, H_l W_l A, num_logits]`` and ``[B, H_l W_l A, 4]``."""
        cls_out, box_out = [], []
        for x in features:
            x = self.input_proj(x)
            cls_out.append(flatten_level(self.cls_logits(self.cls_tower(x)), self.num_logits))
            box_out.append(flatten_level(self.box_deltas(self.box_tower(x)), 4))
        return cls_out, box_out

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        cls_out, box_out = self.per_level(features)
        return torch.cat(cls_out, dim=1), torch.cat(box_out, dim=1)
