"""The annotations of one image, as every dataset format parses them, and their box checks.

Boxes are ``xyxy`` in absolute pixels with pixel-edge coordinates: a box covering the pixel
columns ``c0..c1`` (inclusive, 0-based) spans ``x1 = c0`` to ``x2 = c1 + 1``; the image spans
``[0, W] x [0, H]``.

Box rules shared by all formats (:func:`clip_annotation_boxes`):

- a coordinate that is not finite, or a box with negative width or height, is malformed:
  :class:`~fpndet.errors.InputError` naming the annotation file and the object;
- a box reaching outside the image by at most 1 px is clipped silently (rounding);
- a box reaching further outside is clipped to the image, with one warning per annotation
  file naming the file, the count and the first such object;
- a box left with zero width or height (zero-size in the file, or entirely outside the image)
  is dropped, with one warning per annotation file naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence

import numpy as np

from fpndet.errors import InputError, InputWarning

__all__ = ["ImageRecord", "clip_annotation_boxes", "OUTSIDE_TOLERANCE_PX"]

OUTSIDE_TOLERANCE_PX = 1.0


@dataclasses.dataclass
class ImageRecord:
    """Ground truth of one image.

    Attributes:
        image_id: id used for evaluation (the original id for COCO, the index otherwise).
        file_name: full path of the image file (virtual for generated data).
        height, width: image size in pixels after EXIF rotation.
        boxes: float32 ``[N, 4]`` xyxy absolute pixels, inside ``[0, W] x [0, H]``.
        labels: int64 ``[N]`` contiguous class indices in ``[0, K)``.
        iscrowd: bool ``[N]``; True marks an ignore region (COCO crowd, VOC difficult).
    """

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray

    @classmethod
    def empty(cls, *, image_id: int, file_name: str, height: int, width: int) -> ImageRecord:
        """A record with no boxes."""
        return cls(
            image_id=image_id,
            file_name=file_name,
            height=height,
            width=width,
            boxes=np.zeros((0, 4), np.float32),
            labels=np.zeros((0,), np.int64),
            iscrowd=np.zeros((0,), bool),
        )


def clip_annotation_boxes(
    boxes: np.ndarray,
    image_hw: np.ndarray,
    *,
    source: str | os.PathLike,
    object_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Check, clip and filter the boxes read from one annotation file (rules in the module doc).

    Vectorised over all boxes of the file, which may belong to different images.

    Args:
        boxes: float ``[N, 4]`` xyxy absolute pixels, as read.
        image_hw: ``[N, 2]`` (or ``[2]``, broadcast) height and width in pixels of each box's image.
        source: the annotation file, named in errors and warnings.
        object_names: ``N`` short descriptions ("annotation id 7", "line 3") for the messages.

    Returns:
        ``(clipped, keep)``: float32 ``[N, 4]`` boxes clipped to their image, and bool ``[N]``
        False for boxes to drop (zero width or height after clipping).

    Raises:
        InputError(source, ...): a non-finite coordinate or negative width/height.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sizes = np.broadcast_to(np.asarray(image_hw, dtype=np.float64), (len(boxes), 2))
    _raise_on_malformed(boxes, source=source, object_names=object_names)
    limits = np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=1)
    clipped = np.clip(boxes, 0.0, limits)
    outside = (np.abs(clipped - boxes) > OUTSIDE_TOLERANCE_PX).any(axis=1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    _warn_about(outside & keep, source, object_names, "reach more than 1 px outside their image and were clipped")
    _warn_about(~keep, source, object_names, "have zero width or height inside their image and were dropped")
    return clipped.astype(np.float32), keep


def _raise_on_malformed(boxes: np.ndarray, *, source, object_names: Sequence[str]) -> None:
    not_finite = ~np.isfinite(boxes).all(axis=1)
    if not_finite.any():
        index = int(np.flatnonzero(not_finite)[0])
        raise InputError(source, f"{object_names[index]}: box {boxes[index].tolist()} has a non-finite coordinate")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        index = int(np.flatnonzero(inverted)[0])
        raise InputError(
            source, f"{object_names[index]}: box {_xyxy_text(boxes[index])} has a negative width or height"
        )


def _warn_about(mask: np.ndarray, source, object_names: Sequence[str], what: str) -> None:
    count = int(mask.sum())
    if count:
        first = object_names[int(np.flatnonzero(mask)[0])]
        warnings.warn(InputWarning(source, f"{count} box(es) {what} (first: {first})", kind=f"box(es) {what}"),
                      stacklevel=3)


def _xyxy_text(box: np.ndarray) -> str:
    x1, y1, x2, y2 = (float(v) for v in box)
    return f"x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}"
