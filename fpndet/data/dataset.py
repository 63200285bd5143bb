"""Base class of the detection datasets: sample layout, transforms, COCO ground-truth export.

A sample is ``(image, target)``:

- ``image``: :class:`tv_tensors.Image` uint8 ``[3, H, W]`` RGB;
- ``target``: dict with
  ``"boxes"`` :class:`tv_tensors.BoundingBoxes` float32 ``[N, 4]`` XYXY absolute pixels,
  ``canvas_size=(H, W)``; ``"labels"`` int64 ``[N]`` in ``[0, K)`` (object classes only, no
  background); ``"iscrowd"`` bool ``[N]`` (ignore regions: never positives in training,
  ignored in evaluation); ``"image_id"`` int; ``"file_name"`` str (full path);
  ``"orig_size"`` ``(H, W)`` ints.

The optional ``transforms`` (a :mod:`torchvision.transforms.v2` callable on
``(image, target)``) is applied last.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from fpndet.data.images import load_image
from fpndet.data.records import ImageRecord
from fpndet.errors import InputError

__all__ = ["DetectionDataset", "Sample", "record_to_sample"]

Sample = tuple[tv_tensors.Image, dict[str, Any]]


class DetectionDataset(Dataset):
    """Common behaviour of the dataset formats.

    Subclasses set ``class_names``, ``label_to_category_id`` and ``image_ids`` and implement
    :meth:`__len__`, :meth:`annotation` (ground truth of one image, cheap) and optionally
    :meth:`load` (image + ground truth; the default reads ``record.file_name`` from disk).

    Attributes:
        class_names: name of each contiguous label ``0..K-1``.
        label_to_category_id: COCO category id of each label (original ids for COCO files,
            ``1..K`` otherwise).
        image_ids: the ``image_id`` of each index.
        transforms: optional callable ``(image, target) -> (image, target)``.
    """

    class_names: list[str]
    label_to_category_id: list[int]
    image_ids: list[int]
    has_image_files = True  # images are files on disk (checked by fpndet.data.checks)
    devkit_metric = False  # True: evaluation adds the VOC devkit's mAP@0.5

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        label_to_category_id: Sequence[int] | None = None,
        transforms: Callable | None = None,
        annotation_source: str | os.PathLike | None = None,
    ):
        self.class_names = list(class_names)
        if label_to_category_id is None:
            label_to_category_id = range(1, len(self.class_names) + 1)
        self.label_to_category_id = [int(c) for c in label_to_category_id]
        self.transforms = transforms
        self.annotation_source = None if annotation_source is None else os.fspath(annotation_source)

    @property
    def num_classes(self) -> int:
        """Number of object classes K (no background class)."""
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def annotation(self, index: int) -> ImageRecord:
        """Ground truth of image ``index`` (no pixels are decoded)."""
        raise NotImplementedError

    def annotation_file(self, index: int) -> str | None:
        """The file holding the ground truth of image ``index`` (named in error messages)."""
        return self.annotation_source

    def load(self, index: int) -> tuple[torch.Tensor, ImageRecord]:
        """Image uint8 ``[3, H, W]`` and ground truth of image ``index``.

        Raises:
            InputError: unreadable image, or an image whose size differs from the annotation's.
        """
        record = self.annotation(index)
        image = load_image(record.file_name)
        height, width = image.shape[-2:]
        if (height, width) != (record.height, record.width):
            raise InputError(
                record.file_name,
                f"image is {width}x{height} pixels (after EXIF rotation) but "
                f"{self.annotation_file(index) or 'its annotation'} says {record.width}x{record.height}",
            )
        return image, record

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image, record = self.load(index % len(self))
        image, target = record_to_sample(image, record)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def to_coco(self) -> dict[str, list[dict[str, Any]]]:
        """COCO-format ground truth of the whole dataset, for pycocotools evaluation.

        This default builds it from the records (boxes as checked and clipped); formats with
        their own evaluation ground truth override it (COCO files: the file's annotations with
        their mask ``area``; VOC: ``difficult`` instead of crowd).

        Returns:
            ``{"images", "annotations", "categories"}``: images carry ``id``/``file_name``/
            ``height``/``width``; annotations carry ``id`` (``1..M``; pycocotools treats id 0
            as "unmatched"), ``image_id``, ``category_id`` (see ``label_to_category_id``),
            ``bbox`` ``[x, y, w, h]`` pixels, ``area = w * h`` (the box area: these formats have
            no masks) and ``iscrowd`` (1 for ignore regions).
        """
        images, annotations = [], []
        for index in range(len(self)):
            record = self.annotation(index)
            images.append(
                {"id": record.image_id, "file_name": record.file_name, "height": record.height, "width": record.width}
            )
            for box, label, crowd in zip(record.boxes.tolist(), record.labels.tolist(), record.iscrowd.tolist()):
                x1, y1, x2, y2 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": record.image_id,
                        "category_id": self.label_to_category_id[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": int(crowd),
                    }
                )
        categories = [
            {"id": category, "name": name} for category, name in zip(self.label_to_category_id, self.class_names)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


def record_to_sample(image: torch.Tensor, record: ImageRecord) -> Sample:
    """Wrap a decoded image and its ground truth as a sample (layout in the module doc).

    Args:
        image: uint8 ``[3, H, W]`` RGB, the size given by ``record``.
        record: ground truth; its arrays are copied, never shared with the sample.
    """
    canvas_size = (record.height, record.width)
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
            format=tv_tensors.BoundingBoxFormat.XYXY,
            canvas_size=canvas_size,
        ),
        "labels": torch.tensor(record.labels, dtype=torch.int64).reshape(-1),
        "iscrowd": torch.tensor(record.iscrowd, dtype=torch.bool).reshape(-1),
        "image_id": int(record.image_id),
        "file_name": record.file_name,
        "orig_size": canvas_size,
    }
    return tv_tensors.Image(image), target
