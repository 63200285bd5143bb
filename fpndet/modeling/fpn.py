"""Feature Pyramid Network (Lin et al., "Feature Pyramid Networks", 2017, §3) with RetinaNet's
extra levels P6, P7 ("Focal Loss", §4 "Feature Pyramid Network Backbone") or the RPN's
max-pooled P6 (FPN §4.1), and the ablation switches of FPN Table 1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d


def norm_layer(norm: Optional[str], channels: int) -> nn.Module:
    """A normalisation layer for ``channels`` feature maps: "batch" (``nn.BatchNorm2d``),
    "frozen_batch" (``torchvision.ops.FrozenBatchNorm2d``) or "group" (``GroupNorm(32, C)``);
    ``ValueError`` otherwise."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "frozen_batch":
        return FrozenBatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"norm must be None, 'batch', 'frozen_batch' or 'group', got {norm!r}")


def _conv(in_channels: int, out_channels: int, kernel: int, norm: Optional[str]) -> nn.Module:
    """Conv (``kernel`` x ``kernel``, same padding); with ``norm``: Sequential(conv without bias, norm)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=norm is None)
    return conv if norm is None else nn.Sequential(conv, norm_layer(norm, out_channels))


class FeaturePyramid(nn.Module):
    """Top-down pathway with lateral connections, then a top block of extra coarser levels.

    For each backbone map C_l (l = min_level..5): lateral 1x1 conv to ``out_channels``; the coarser
    merged map is upsampled x2 (nearest neighbour, to the lateral's exact size) and merged by sum
    (paper) or by average 0.5 * top-down + 0.5 * lateral (the TensorFlow snippet in the seeds);
    a 3x3 conv on each merged map gives P_l. No non-linearities (§3).

    Top blocks (levels above the backbone's top level):

    - ``"conv"``: 3x3 stride-2 convs, P6 on C5 (RetinaNet paper) or on P5 (``p6_input="p5"``,
      torchvision RetinaNet v1), P7 = conv(ReLU(P6)).
    - ``"max_pool"``: P6 = max_pool2d(P5, kernel 1, stride 2) (FPN paper §4.1, the RPN's
      stride-64 level; detectron2's ``LastLevelMaxPool``); further levels pool again.

    Ablations of the FPN paper's Table 1:

    - ``top_down=False`` (row (d), bottom-up pyramid): P_l = 3x3(1x1(C_l)), no top-down sum.
    - ``lateral=False`` (row (e), top-down without lateral connections): only the top level has a
      1x1 lateral; each finer level is the x2-upsampled coarser merged map, then its 3x3 conv.

    Args (keyword-only):
        in_channels: channels of the backbone maps given to ``forward``, lowest level first.
        in_levels: pyramid levels of those maps (e.g. [3, 4, 5]; [2, 3, 4, 5] for an RPN on P2).
        out_channels: d (256 in both papers).
        min_level, max_level: levels returned (3..7 for RetinaNet; 2..6 for the RPN).
        merge: "sum" or "average".
        p6_input: "c5" or "p5" (``top_block="conv"`` only).
        top_block: "conv" or "max_pool".
        top_down, lateral: see the ablations above.
        norm: None (paper), "batch", "frozen_batch" or "group" after every lateral and output conv
            (convs then have no bias; torchvision's Faster R-CNN v2 uses batch norm).

    Raises ``ValueError`` for an unknown ``merge``/``p6_input``/``top_block``/``norm``, a
    ``min_level`` the backbone lacks, or ``top_down=False`` together with ``lateral=False``.

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
        top_block: str = "conv",
        top_down: bool = True,
        lateral: bool = True,
        norm: Optional[str] = None,
    ):
        super().__init__()
        if merge not in ("sum", "average"):
            raise ValueError(f"merge must be 'sum' or 'average', got {merge!r}")
        if p6_input not in ("c5", "p5"):
            raise ValueError(f"p6_input must be 'c5' or 'p5', got {p6_input!r}")
        if top_block not in ("conv", "max_pool"):
            raise ValueError(f"top_block must be 'conv' or 'max_pool', got {top_block!r}")
        if not (top_down or lateral):
            raise ValueError("top_down=False and lateral=False together leave the lower levels without input")
        top_backbone_level = max(in_levels)
        if min_level not in in_levels:
            raise ValueError(f"min_level {min_level} is not among the backbone levels {list(in_levels)}")
        self.in_levels = list(in_levels)
        self.used = [i for i, level in enumerate(in_levels) if level >= min_level and level <= max_level]
        self.merge = merge
        self.p6_input = p6_input
        self.top_block = top_block
        self.top_down = top_down
        self.lateral = lateral
        self.min_level, self.max_level = min_level, max_level
        lateral_inputs = self.used if lateral else self.used[-1:]
        self.lateral_convs = nn.ModuleList(_conv(in_channels[i], out_channels, 1, norm) for i in lateral_inputs)
        self.output_convs = nn.ModuleList(_conv(out_channels, out_channels, 3, norm) for _ in self.used)
        extra = []
        if top_block == "conv":
            for level in range(top_backbone_level + 1, max_level + 1):
                first = level == top_backbone_level + 1
                channels = in_channels[-1] if (first and p6_input == "c5") else out_channels
                extra.append(nn.Conv2d(channels, out_channels, 3, stride=2, padding=1))
        self.extra_convs = nn.ModuleList(extra)
        self.num_pooled_levels = max(0, max_level - top_backbone_level) if top_block == "max_pool" else 0
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def levels(self) -> list[int]:
        """Pyramid levels returned by ``forward``, lowest first."""
        return list(range(self.min_level, self.max_level + 1))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        inputs = [features[i] for i in self.used]
        merged = self.lateral_convs[-1](inputs[-1])
        outputs = [self.output_convs[-1](merged)]
        for idx in range(len(inputs) - 2, -1, -1):
            if not self.top_down:
                merged = self.lateral_convs[idx](inputs[idx])
            else:
                top_down = F.interpolate(merged, size=inputs[idx].shape[-2:], mode="nearest")
                if not self.lateral:
                    merged = top_down
                else:
                    lateral = self.lateral_convs[idx](inputs[idx])
                    merged = lateral + top_down if self.merge == "sum" else 0.5 * top_down + 0.5 * lateral
            outputs.insert(0, self.output_convs[idx](merged))
        if self.extra_convs:
            x = features[-1] if self.p6_input == "c5" else outputs[-1]
            for i, conv in enumerate(self.extra_convs):
                x = conv(x if i == 0 else F.relu(x))
                outputs.append(x)
        for _ in range(self.num_pooled_levels):
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2, padding=0))
        return outputs
