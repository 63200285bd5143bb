"""Load torchvision's RetinaNet checkpoints (``retinanet_resnet50_fpn`` v1 and ``_v2``), and
rename Faster R-CNN ones (``fasterrcnn_resnet50_fpn`` v1 and ``_v2``) for fpndet's FasterRCNN.

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
from .config import (
    ModelConfig,
    faster_rcnn_r50_fpn_tv,
    faster_rcnn_r50_fpn_v2_tv,
    retinanet_r50_fpn_tv,
    retinanet_r50_fpn_v2_tv,
)
from .faster_rcnn import FasterRCNN
from .retinanet import RetinaNet
from .weights import load_matching_weights

ARCHS = {
    "retinanet_resnet50_fpn": retinanet_r50_fpn_tv,
    "retinanet_resnet50_fpn_v2": retinanet_r50_fpn_v2_tv,
    "fasterrcnn_resnet50_fpn": faster_rcnn_r50_fpn_tv,
    "fasterrcnn_resnet50_fpn_v2": faster_rcnn_r50_fpn_v2_tv,
}

# Published COCO checkpoints (torchvision's RetinaNet_ResNet50_FPN(_V2)_Weights.COCO_V1).
PUBLISHED_WEIGHTS = {
    "retinanet_resnet50_fpn": "https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth",
    "retinanet_resnet50_fpn_v2": "https://download.pytorch.org/models/retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
    "fasterrcnn_resnet50_fpn": "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
    "fasterrcnn_resnet50_fpn_v2": "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
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
        new_key = _apply_renames(key, _RENAMES)
        if new_key == key:
            raise ValueError(f"unexpected torchvision RetinaNet key {key!r}")
        converted[new_key] = value
    return converted


def _apply_renames(key: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


# torchvision fasterrcnn_resnet50_fpn (v1) and _v2 -> fpndet.modeling.faster_rcnn.FasterRCNN
# (as built by fpndet.modeling.build.build_faster_rcnn). FPN convs are plain in v1 and (conv, norm) pairs in v2.
_FASTER_RCNN_RENAMES = [
    (r"^backbone\.body\.", "backbone."),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),  # torchvision < 0.13 (one conv)
    (r"^rpn\.head\.conv\.(\d+)\.0\.", r"rpn.head.conv.\1.0."),
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.deltas."),
    (r"^roi_heads\.box_head\.(fc6|fc7)\.", r"roi_heads.box_head.\1."),
    (r"^roi_heads\.box_head\.([0-3])\.(\d+)\.", r"roi_heads.box_head.convs.\1.\2."),
    (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.", r"roi_heads.predictor.\1."),
]
_FPN_PLAIN = [
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"fpn.lateral_convs.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"fpn.output_convs.\1."),
]
_FPN_NORM = [
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.([01])\.", r"fpn.lateral_convs.\1.\2."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.([01])\.", r"fpn.output_convs.\1.\2."),
]
# v2 box head: Sequential(4 x Conv2dNormActivation, Flatten, Linear, ReLU): Linear j at 5 + 2j.
_CONV_FC_LINEAR = re.compile(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$")


def convert_torchvision_faster_rcnn_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_resnet50_fpn`` / ``_v2`` state dict to the module names of
    :class:`fpndet.modeling.faster_rcnn.FasterRCNN` built from the ``faster_rcnn_r50_fpn_tv`` config (
    "v1" / "v2"; for v2 with ``fpn_norm`` and ``box_head_norm`` "batch" or "frozen_batch").

    The predictor keeps torchvision's layout (index 0 = background), so label = logit index - 1.
    Drops ``num_batches_tracked``. Raises ``ValueError`` naming a key it does not know.
    """
    fpn_norm = any(re.match(r"^backbone\.fpn\.inner_blocks\.\d+\.1\.", key) for key in state_dict)
    renames = _FASTER_RCNN_RENAMES + (_FPN_NORM if fpn_norm else _FPN_PLAIN)
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        linear = _CONV_FC_LINEAR.match(key)
        if linear and int(linear.group(1)) >= 5:
            converted[f"roi_heads.box_head.fcs.{(int(linear.group(1)) - 5) // 2}.0.{linear.group(2)}"] = value
            continue
        if not any(re.match(pattern, key) for pattern, _ in renames):
            raise ValueError(f"unexpected torchvision Faster R-CNN key {key!r}")
        new_key = _apply_renames(key, renames)
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


def torchvision_arch_of(state_dict: Mapping[str, Tensor]) -> str:
    """Which torchvision detector a state dict holds: "retinanet_resnet50_fpn" (v1) / "_v2" (its
    GroupNorm head), or "fasterrcnn_resnet50_fpn" / "_v2" (its conv box head)."""
    if any(key.startswith("rpn.head.") for key in state_dict):
        v2 = any(key.startswith("roi_heads.box_head.0.") for key in state_dict)
        return "fasterrcnn_resnet50_fpn_v2" if v2 else "fasterrcnn_resnet50_fpn"
    return "retinanet_resnet50_fpn_v2" if any(".conv.0.1.weight" in k for k in state_dict) else "retinanet_resnet50_fpn"


def from_torchvision(
    state_dict_or_path: Union[str, os.PathLike, Mapping[str, Tensor]],
    arch: str = "retinanet_resnet50_fpn",
    *,
    num_classes: Optional[int] = None,
) -> Union[RetinaNet, FasterRCNN]:
    """A fpndet detector equivalent to torchvision's model with these weights.

    Args:
        state_dict_or_path: a state dict, a local ``.pth``/``.safetensors`` file, a URL, or
            "COCO_V1" for torchvision's published COCO weights of ``arch`` (downloaded once into
            the torch hub cache, ``~/.cache/torch/hub/checkpoints``).
        arch: "retinanet_resnet50_fpn" (v1), "retinanet_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn"
            or "fasterrcnn_resnet50_fpn_v2".
        num_classes: defaults to the checkpoint's. COCO RetinaNet: 91 (labels are COCO category
            ids); COCO Faster R-CNN: 90 object classes, label = category id - 1 (torchvision's
            background logit 0 is internal to fpndet's predictor).

    Raises:
        ValueError for an unknown arch; :class:`InputError` naming the file when it is not a
        torchvision checkpoint of that arch.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision arch {arch!r}; known: {sorted(ARCHS)}")
    raw = _read_state_dict(state_dict_or_path, arch)
    where = None if isinstance(state_dict_or_path, Mapping) else os.fspath(state_dict_or_path)
    two_stage = arch.startswith("fasterrcnn")
    converter = convert_torchvision_faster_rcnn_state_dict if two_stage else convert_torchvision_state_dict
    try:
        weights = converter(raw)
    except ValueError as err:
        raise InputError(where, f"not a torchvision {arch} checkpoint ({err})") from None
    classifier = "roi_heads.predictor.cls_score" if two_stage else "head.cls_logits"
    logits = weights.get(f"{classifier}.weight")
    if logits is None:
        raise InputError(where, f"not a torchvision {arch} checkpoint (no classification head)")
    found = logits.shape[0] - 1 if two_stage else logits.shape[0] // 9
    config: ModelConfig = ARCHS[arch](num_classes or found)
    model = build_model(config)
    report = load_matching_weights(model, weights)
    skipped = [f"{classifier}.weight", f"{classifier}.bias"] + (
        ["roi_heads.predictor.bbox_pred.weight", "roi_heads.predictor.bbox_pred.bias"] if two_stage else [])
    expected_skips = [] if num_classes is None else skipped
    # BatchNorm's step counter (v2's FPN and box head) is bookkeeping, dropped by the converters.
    missing = [key for key in report.missing if not key.endswith("num_batches_tracked")]
    if missing or report.unexpected or (set(report.skipped) - set(expected_skips)):
        raise InputError(where, f"does not fit {arch}: {report.summary()}")
    if report.skipped:
        warnings.warn(f"from_torchvision: {report.summary()}", stacklevel=2)
    return model
