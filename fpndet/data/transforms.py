"""Training augmentation and evaluation preprocessing on ``(image, target)`` samples.

Built from :mod:`torchvision.transforms.v2` acting on :mod:`torchvision.tv_tensors`, so boxes
follow every geometric change without hand-written box arithmetic. Both pipelines end with

1. ``v2.ClampBoundingBoxes``: boxes clipped to the (new) image;
2. :class:`SanitizeDetectionBoxes`: ``v2.SanitizeBoundingBoxes`` dropping boxes smaller than
   1 px (e.g. cropped away), with every per-box field (``labels``, ``iscrowd``, ``area``)
   filtered alike;
3. ``v2.ToDtype(torch.float32, scale=True)``: image uint8 [0, 255] -> float32 [0, 1].

Resizing is not done here: the model's pre-processor resizes every image to its short side
``model.min_size`` (drawing one of several per image in training: multi-scale training, as
torchvision and detectron2 do), so a resize here would be undone there.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["build_train_transforms", "build_eval_transforms", "SanitizeDetectionBoxes", "PER_BOX_KEYS"]

PER_BOX_KEYS = ("labels", "iscrowd", "area")
_ROW_KEY = "_fpndet_box_rows"
_ZOOM_OUT_FILL = (124, 116, 104)  # ImageNet mean colour, uint8


class SanitizeDetectionBoxes:
    """``v2.SanitizeBoundingBoxes`` that keeps all per-box target fields aligned.

    torchvision < 0.18 lets ``labels_getter`` return one tensor only, so instead of the labels
    the sanitizer filters a row index ``arange(N)``, and the surviving rows then select
    ``labels``, ``iscrowd`` and ``area`` (whichever are present) identically on every version.

    Args:
        min_size: boxes with a side below this many pixels are removed (>= 1).

    Call: ``(image, target)`` or ``((image, target),)`` -> ``(image, target)``; target needs
    "boxes" (BoundingBoxes ``[N, 4]``) and per-box tensors of length ``N`` under
    :data:`PER_BOX_KEYS`.
    """

    def __init__(self, *, min_size: float = 1.0):
        self.min_size = min_size
        self._sanitize = v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=_row_index)

    def __call__(self, *inputs: Any) -> tuple[Any, dict[str, Any]]:
        image, target = inputs if len(inputs) == 2 else inputs[0]
        rows = torch.arange(target["boxes"].shape[0])
        image, filtered = self._sanitize(image, {"boxes": target["boxes"], _ROW_KEY: rows})
        kept = filtered[_ROW_KEY]
        target = dict(target, boxes=filtered["boxes"])
        for key in PER_BOX_KEYS:
            if key in target:
                target[key] = target[key][kept]
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size})"


def _row_index(inputs: tuple[Any, dict[str, Any]]) -> torch.Tensor:
    return inputs[1][_ROW_KEY]


def build_train_transforms(
    *,
    hflip_prob: float = 0.5,
    color_jitter: bool = False,
    zoom_out: bool = False,
    iou_crop: bool = False,
) -> v2.Compose:
    """Training augmentation for ``(image uint8 [3, H, W], target)`` samples.

    Order: photometric distortion (``color_jitter``), zoom-out onto a mean-colour canvas up to
    4x (``zoom_out``), SSD-style minimum-IoU crop (``iou_crop``), horizontal flip with
    probability ``hflip_prob`` (``x1' = W - x2``, ``x2' = W - x1``), then the common tail (module
    doc).

    Returns:
        callable ``(image, target) -> (image float32 [3, H', W'] in [0, 1], target)`` with boxes
        still :class:`tv_tensors.BoundingBoxes` xyxy pixels in the new image.
    """
    steps: list[Any] = []
    if color_jitter:
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    if zoom_out:
        steps.append(
            v2.RandomZoomOut(fill={tv_tensors.Image: _ZOOM_OUT_FILL, "others": 0}, side_range=(1.0, 4.0), p=0.5)
        )
    if iou_crop:
        steps.append(v2.RandomIoUCrop())
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    return v2.Compose(steps + _common_tail())


def build_eval_transforms() -> v2.Compose:
    """Evaluation preprocessing: no geometric change, only the common tail (module doc)."""
    return v2.Compose(_common_tail())


def _common_tail() -> list[Any]:
    return [v2.ClampBoundingBoxes(), SanitizeDetectionBoxes(), v2.ToDtype(torch.float32, scale=True)]
