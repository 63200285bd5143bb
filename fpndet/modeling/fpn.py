"""Feature Pyramid Network (Lin et al., "Feature Pyramid Networks", 2017, §3) with RetinaNet's
extra levels P6, P7 ("Focal Loss", §4 "Feature Pyramid Network Backbone").
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FeaturePyramid(nn.Module):
    """Top-down pathway with lateral connections, then optional strided extra levels.

    For each backbone map C_l (l = min_level..5): lateral 1x1 conv to ``out_channels``; the coarser
    merged map is upsampled x2 (nearest neighbour, to the lateral's exact size) and merged by sum
    (paper) or by average 0.5 * top-down + 0.5 * lateral (the TensorFlow snippet in the seeds);
    a 3x3 conv on each merged map gives P_l. No non-linearities (§3). Levels above 5 are 3x3
    stride-2 convs: P6 on C5 (RetinaNet paper) or on P5 (torchvision v1), P7 = conv(ReLU(P6)).

    Args (keyword-only):
        in_channels: channels of the backbone maps given to ``forward``, lowest level first.
        in_levels: pyramid levels of those maps (e.g. [3, 4, 5]; [2, 3, 4, 5] for an RPN on P2).
        out_channels: d (256 in both papers).
        min_level, max_level: levels returned (3..7 for RetinaNet; 2..6 for the RPN).
        merge: "sum" or "average".
        p6_input: "c5" or "p5".

    Raises ``ValueError`` for an unknown ``merge``/``p6_input`` or a ``min_level`` the backbone lacks.

    Shapes: ``forward([C_l ...])`` with C_l ``[B, in_channels[i], H/2^l, W/2^l]`` returns a list of
    ``[B, out_channels, H_l, W_l]`` for levels min_level..max_level.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        in_levels: Sequence[int],
        out_channels: int = 256,
        min_level: int = 3,
        max_level: int = 7,
        merge: str = "sum",
        p6_input: str = "c5",
    ):
        super().__init__()
        if merge not in ("sum", "average"):
            raise ValueError(f"merge must be 'sum' or 'average', got {merge!r}")
        if p6_input not in ("c5", "p5"):
            raise ValueError(f"p6_input must be 'c5' or 'p5', got {p6_input!r}")
        top_backbone_level = max(in_levels)
        if min_level not in in_levels:
            raise ValueError(f"min_level {min_level} is not among the backbone levels {list(in_levels)}")
        self.in_levels = list(in_levels)
        self.used = [i for i, level in enumerate(in_levels) if level >= min_level and level <= max_level]
        self.merge = merge
        self.p6_input = p6_input
        self.min_level, self.max_level = min_level, max_level
        self.lateral_convs = nn.ModuleList(nn.Conv2d(in_channels[i], out_channels, 1) for i in self.used)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.used)
        extra = []
        for level in range(top_backbone_level + 1, max_level + 1):
            first = level == top_backbone_level + 1
            channels = in_channels[-1] if (first and p6_input == "c5") else out_channels
            extra.append(nn.Conv2d(channels, out_channels, 3, stride=2, padding=1))
        self.extra_convs = nn.ModuleList(extra)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        inputs = [features[i] for i in self.used]
        merged = self.lateral_convs[-1](inputs[-1])
        outputs = [self.output_convs[-1](merged)]
        for idx in range(len(inputs) - 2, -1, -1):
            lateral = self.lateral_convs[idx](inputs[idx])
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = lateral + top_down if self.merge == "sum" else 0.5 * top_down + 0.5 * lateral
            outputs.insert(0, self.output_convs[idx](merged))
        if self.extra_convs:
            x = features[-1] if self.p6_input == "c5" else outputs[-1]
            for i, conv in enumerate(self.extra_convs):
                x = conv(x if i == 0 else F.relu(x))
                outputs.append(x)
        return outputs
