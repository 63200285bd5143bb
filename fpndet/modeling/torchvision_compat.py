"""Load torchvision's RetinaNet checkpoints (``retinanet_resnet50_fpn`` v1 and ``_v2``).

The converted model behaves like torchvision's: same pre-processing (short side 800, long side
<= 1333, ImageNet mean/std), post-processing (score 0.05, 1000 per level, NMS 0.5, 300 per
image), torchvision's label ids (91 logits indexed by COCO category id) and, in training mode,
the same losses (L1 resp. GIoU box loss, per-image normalisation, low-quality matches).
The library never imports ``torchvision.models.detection``: the key mapping below is ours.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from ..errors import InputError
from .build import build_model
from .config import RetinaNetConfig, retinanet_r50_fpn_tv, retinanet_r50_fpn_v2_tv
from .retinanet import RetinaNet
from .weights import load_matching_weights

ARCHS = {
    "retinanet_resnet50_fpn": retinanet_r50_fpn_tv,
    "retinanet_resnet50_fpn_v2": retinanet_r50_fpn_v2_tv,
}

# Published COCO checkpoints (torchvision's RetinaNet_ResNet50_FPN(_V2)_Weights.COCO_V1).
PUBLISHED_WEIGHTS = {
    "retinanet_resnet50_fpn": "https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth",
    "retinanet_resnet50_fpn_v2": "https://download.pytorch.org/models/retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
}

_RENAMES = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"fpn.lateral_convs.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"fpn.output_convs.\1."),
    (r"^backbone\.fpn\.extra_blocks\.p6\.", "fpn.extra_convs.0."),
    (r"^backbone\.fpn\.extra_blocks\.p7\.", "fpn.extra_convs.1."),
    (r"^head\.classification_head\.conv\.(\d+)\.(\d+)\.", r"head.cls_tower.\1.\2."),
    (r"^head\.regression_head\.conv\.(\d+)\.(\d+)\.", r"head.box_tower.\1.\2."),
    (r"^head\.classification_head\.cls_logits\.", "head.cls_logits."),
    (r"^head\.regression_head\.bbox_reg\.", "head.box_deltas."),
]
# torchvision < 0.13 ("version 1") heads: conv.{2i} are the convs, conv.{2i+1} the ReLUs.
_OLD_HEAD = re.compile(r"^head\.(classification|regression)_head\.conv\.(\d+)\.(weight|bias)$")


def convert_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision RetinaNet state dict to fpndet's module names.

    Drops ``num_batches_tracked`` (BatchNorm bookkeeping). Raises ``ValueError`` naming a key it
    does not know.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        old = _OLD_HEAD.match(key)
        if old:
            tower = "cls_tower" if old.group(1) == "classification" else "box_tower"
            converted[f"head.{tower}.{int(old.group(2)) // 2}.0.{old.group(3)}"] = value
            continue
        new_key = key
        for pattern, replacement in _RENAMES:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key == key:
            raise ValueError(f"unexpected torchvision RetinaNet key {key!r}")
        converted[new_key] = value
    return converted


def _read_state_dict(source: Union[str, os.PathLike, Mapping[str, Tensor]], arch: str) -> Mapping[str, Tensor]:
    if isinstance(source, Mapping):
        return source
    text = os.fspath(source)
    if text in ("COCO_V1", "coco", "DEFAULT") or text.startswith(("http://", "https://")):
        url = PUBLISHED_WEIGHTS[arch] if not text.startswith("http") else text
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=True)
    from ..engine.checkpoints import load_state_dict_file

    return load_state_dict_file(text)


def from_torchvision(
    state_dict_or_path: Union[str, os.PathLike, Mapping[str, Tensor]],
    arch: str = "retinanet_resnet50_fpn",
    *,
    num_classes: Optional[int] = None,
) -> RetinaNet:
    """A fpndet :class:`RetinaNet` equivalent to torchvision's model with these weights.

    Args:
        state_dict_or_path: a state dict, a local ``.pth``/``.safetensors`` file, a URL, or
            "COCO_V1" for torchvision's published COCO weights of ``arch`` (downloaded once into
            the torch hub cache, ``~/.cache/torch/hub/checkpoints``).
        arch: "retinanet_resnet50_fpn" (v1) or "retinanet_resnet50_fpn_v2".
        num_classes: defaults to the checkpoint's (91 for COCO: labels are COCO category ids).

    Raises:
        ValueError for an unknown arch; :class:`InputError` naming the file when it is not a
        torchvision RetinaNet checkpoint of that arch.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision arch {arch!r}; known: {sorted(ARCHS)}")
    raw = _read_state_dict(state_dict_or_path, arch)
    where = None if isinstance(state_dict_or_path, Mapping) else os.fspath(state_dict_or_path)
    try:
        weights = convert_torchvision_state_dict(raw)
    except ValueError as err:
        raise InputError(where, f"not a torchvision {arch} checkpoint ({err})") from None
    logits = weights.get("head.cls_logits.weight")
    if logits is None:
        raise InputError(where, f"not a torchvision {arch} checkpoint (no classification head)")
    config: RetinaNetConfig = ARCHS[arch](num_classes or logits.shape[0] // 9)
    model = build_model(config)
    report = load_matching_weights(model, weights)
    expected_skips = [] if num_classes is None else ["head.cls_logits.weight", "head.cls_logits.bias"]
    if report.missing or report.unexpected or (
        set(report.skipped) - set(expected_skips)
    ):
        raise InputError(where, f"does not fit {arch}: {report.summary()}")
    if report.skipped:
        warnings.warn(f"from_torchvision: {report.summary()}", stacklevel=2)
    return model
