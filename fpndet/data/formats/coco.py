"""COCO instances JSON (``{"images", "annotations", "categories"}``) as a detection dataset.

- Category ids (any positive ints, with gaps) map to contiguous labels ``0..K-1`` sorted by id;
  ``label_to_category_id`` maps back.
- ``bbox`` ``[x, y, w, h]`` pixels becomes xyxy ``[x, y, x + w, y + h]``.
- ``iscrowd=1`` annotations stay, with ``iscrowd=True`` (ignore regions).
- Images without annotations stay (they contribute false positives at evaluation).
- Box checks follow :mod:`fpndet.data.records`: negative width/height or a non-finite number
  is an error; boxes more than 1 px outside their image are clipped with a warning; boxes left
  empty (zero-size, or entirely outside the image) are dropped with a warning. Warnings and
  errors name the JSON file and the annotation id.
- Clipping and dropping concern the samples (training, pictures) only. Evaluation uses the
  file's own annotations (:meth:`CocoDetection.to_coco`): ids, unclipped ``bbox`` and the
  annotation's ``area`` as given, because pycocotools splits small/medium/large by that ``area``
  (the mask area in COCO, not the box area).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fpndet.data.dataset import DetectionDataset
from fpndet.data.records import ImageRecord, clip_annotation_boxes
from fpndet.errors import InputError

__all__ = ["CocoDetection"]


class CocoDetection(DetectionDataset):
    """Images and boxes of a COCO instances file.

    Args:
        instances_json: the COCO instances JSON file.
        images_dir: folder the images' ``file_name`` are relative to. Default: the first of
            ``<json dir>/../images``, ``<json dir>/../<name>`` (``instances_val2017.json`` ->
            ``val2017``), ``<json dir>`` that holds the first image; else the first that exists.
        transforms: optional ``(image, target) -> (image, target)`` callable.

    Raises:
        InputError(instances_json, ...): unreadable or malformed JSON, missing keys, duplicate
            ids, an annotation of an unknown image or category ("unknown class"), or a box with
            negative width/height.
    """

    def __init__(
        self,
        instances_json: str | os.PathLike,
        images_dir: str | os.PathLike | None = None,
        *,
        transforms: Callable | None = None,
    ):
        self.instances_json = Path(instances_json)
        content = _read_json(self.instances_json)
        categories = sorted(_parse_categories(content, self.instances_json), key=lambda c: c[0])
        super().__init__(
            class_names=[name for _, name in categories],
            label_to_category_id=[category_id for category_id, _ in categories],
            transforms=transforms,
            annotation_source=self.instances_json,
        )
        self.category_id_to_label = {category_id: label for label, category_id in enumerate(self.label_to_category_id)}
        images = _parse_images(content, self.instances_json)
        self.images_dir = (
            Path(images_dir) if images_dir is not None else _default_images_dir(self.instances_json, images)
        )
        self._images = images
        self._categories = [{"id": i, "name": name} for i, name in _parse_categories(content, self.instances_json)]
        self._records = self._build_records(images, _required_list(content, "annotations", self.instances_json))
        self.image_ids = [record.image_id for record in self._records]

    def to_coco(self) -> dict[str, list[dict[str, Any]]]:
        """The file's own ground truth, for pycocotools evaluation (what ``COCO(instances_json)``
        evaluates, keeping only the keys box evaluation reads).

        Returns:
            ``{"images", "annotations", "categories"}`` in the file's order. Images carry ``id``,
            ``file_name`` (as in the file), ``height``, ``width``; categories ``id`` and ``name``;
            annotations ``id``, ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` pixels
            exactly as given (not clipped; zero-size boxes kept), ``area`` as given (the mask
            area in COCO, which decides small/medium/large; ``w * h`` when the key is absent) and
            ``iscrowd`` (0 when absent). Annotation ids are the file's when every annotation has
            a distinct positive integer id, else ``1..M`` in file order (pycocotools reserves 0
            for "unmatched").
        """
        e = self._eval_annotations
        annotations = [
            {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": area, "iscrowd": crowd}
            for i, image_id, category_id, bbox, area, crowd in zip(
                e["id"].tolist(), e["image_id"].tolist(), e["category_id"].tolist(), e["bbox"].tolist(),
                e["area"].tolist(), e["iscrowd"].tolist(),
            )
        ]
        return {
            "images": [dict(image) for image in self._images],
            "annotations": annotations,
            "categories": [dict(category) for category in self._categories],
        }

    def __len__(self) -> int:
        return len(self._records)

    def annotation(self, index: int) -> ImageRecord:
        return self._records[index]

    def _build_records(self, images: list[dict[str, Any]], annotations: list[Any]) -> list[ImageRecord]:
        """Group the checked annotations by image, in the JSON's image order."""
        position = {image["id"]: i for i, image in enumerate(images)}
        rows = [self._parse_annotation(a, i, position) for i, a in enumerate(annotations)]
        image_index = np.array([r[0] for r in rows], dtype=np.int64)
        labels = np.array([r[1] for r in rows], dtype=np.int64)
        iscrowd = np.array([r[2] for r in rows], dtype=bool)
        xywh = np.array([r[3] for r in rows], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        sizes = np.array([[images[i]["height"], images[i]["width"]] for i in image_index], np.float64).reshape(-1, 2)
        names = [r[4] for r in rows]
        self._eval_annotations = _evaluation_arrays(rows, xywh, [images[i]["id"] for i in image_index])
        boxes, keep = clip_annotation_boxes(xyxy, sizes, source=self.instances_json, object_names=names)
        records = [
            ImageRecord.empty(
                image_id=image["id"],
                file_name=os.fspath(self.images_dir / image["file_name"]),
                height=image["height"],
                width=image["width"],
            )
            for image in images
        ]
        order = np.argsort(image_index[keep], kind="stable")
        kept_images, kept_boxes = image_index[keep][order], boxes[keep][order]
        kept_labels, kept_crowd = labels[keep][order], iscrowd[keep][order]
        starts = np.searchsorted(kept_images, np.arange(len(images) + 1))
        for i, record in enumerate(records):
            span = slice(starts[i], starts[i + 1])
            record.boxes, record.labels, record.iscrowd = kept_boxes[span], kept_labels[span], kept_crowd[span]
        return records

    def _parse_annotation(self, annotation: Any, index: int, position: dict[int, int]) -> tuple:
        """One annotation -> ``(image position, label, iscrowd, [x, y, w, h], description, id,
        category_id, area)``.

        The ``id`` key is optional (the description then says ``annotations[i]``); ``iscrowd``
        defaults to 0; ``area`` is optional (None) but must be a finite number >= 0 when given.
        """
        where = f"annotations[{index}]"
        annotation_id = _field(annotation, "id", where, self.instances_json) if _has(annotation, "id") else None
        if annotation_id is not None:
            where = f"annotation id {annotation_id}"
        image_id = _field(annotation, "image_id", where, self.instances_json)
        category_id = _field(annotation, "category_id", where, self.instances_json)
        bbox = _field(annotation, "bbox", where, self.instances_json)
        if not _is_hashable(image_id) or image_id not in position:
            raise InputError(self.instances_json, f"{where}: image_id {image_id!r} is not in 'images'")
        if not _is_hashable(category_id) or category_id not in self.category_id_to_label:
            raise InputError(
                self.instances_json, f"{where}: unknown class (category_id {category_id!r} is not in 'categories')"
            )
        if not _is_number_list(bbox, 4):
            raise InputError(self.instances_json, f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        crowd = bool(annotation.get("iscrowd", 0))
        area = annotation.get("area")
        if area is not None and not (_is_number_list([area], 1) and np.isfinite(area) and area >= 0):
            raise InputError(self.instances_json, f"{where}: 'area' must be a number >= 0, got {area!r}")
        return position[image_id], self.category_id_to_label[category_id], crowd, bbox, where, annotation_id, \
            category_id, area


def _evaluation_arrays(rows: list[tuple], xywh: np.ndarray, image_ids: list[int]) -> dict[str, np.ndarray]:
    """The annotations as pycocotools reads them, compactly (no Python dict per object kept):
    ``id`` int64[M], ``image_id`` int64[M], ``category_id`` int64[M], ``bbox`` float64[M, 4]
    ``[x, y, w, h]`` as given, ``area`` float64[M] (given, else ``w * h``), ``iscrowd`` int64[M]."""
    given_ids = [r[5] for r in rows]
    ids_usable = all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in given_ids) and len(
        set(given_ids)
    ) == len(given_ids)
    areas = np.array([np.nan if r[7] is None else float(r[7]) for r in rows], dtype=np.float64)
    missing = np.isnan(areas)
    areas[missing] = xywh[missing, 2] * xywh[missing, 3]
    return {
        "id": np.array(given_ids if ids_usable else range(1, len(rows) + 1), dtype=np.int64),
        "image_id": np.array(image_ids, dtype=np.int64),
        "category_id": np.array([r[6] for r in rows], dtype=np.int64),
        "bbox": xywh.astype(np.float64).reshape(-1, 4),
        "area": areas,
        "iscrowd": np.array([int(r[2]) for r in rows], dtype=np.int64),
    }


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as error:
        raise InputError(path, "no such file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read annotation file: {error}") from error
    except json.JSONDecodeError as error:
        raise InputError(path, f"malformed JSON: {error}") from error


def _required_list(content: Any, key: str, path: Path) -> list[Any]:
    if not isinstance(content, dict):
        raise InputError(path, f"expected a COCO JSON object with '{key}', got {type(content).__name__}")
    if key not in content:
        raise InputError(path, f"missing key '{key}' (not a COCO instances file?)")
    if not isinstance(content[key], list):
        raise InputError(path, f"'{key}' must be a list, got {type(content[key]).__name__}")
    return content[key]


def _field(entry: Any, key: str, where: str, path: Path) -> Any:
    if not isinstance(entry, dict):
        raise InputError(path, f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise InputError(path, f"{where}: missing key '{key}'")
    return entry[key]


def _parse_categories(content: Any, path: Path) -> list[tuple[int, str]]:
    categories, seen = [], set()
    for index, category in enumerate(_required_list(content, "categories", path)):
        where = f"categories[{index}]"
        category_id = _field(category, "id", where, path)
        name = _field(category, "name", where, path)
        if not isinstance(category_id, int) or isinstance(category_id, bool):
            raise InputError(path, f"{where}: 'id' must be an integer, got {category_id!r}")
        if category_id in seen:
            raise InputError(path, f"{where}: duplicate category id {category_id}")
        seen.add(category_id)
        categories.append((category_id, str(name)))
    if not categories:
        raise InputError(path, "'categories' is empty: there are no classes to detect")
    return categories


def _parse_images(content: Any, path: Path) -> list[dict[str, Any]]:
    images, seen = [], set()
    for index, image in enumerate(_required_list(content, "images", path)):
        where = f"images[{index}]"
        entry = {key: _field(image, key, where, path) for key in ("id", "file_name", "height", "width")}
        if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
            raise InputError(path, f"{where}: 'id' must be an integer, got {entry['id']!r}")
        if entry["id"] in seen:
            raise InputError(path, f"{where}: duplicate image id {entry['id']!r}")
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            raise InputError(path, f"{where}: 'file_name' must be a non-empty string, got {entry['file_name']!r}")
        if not all(isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] > 0
                   for k in ("height", "width")):
            raise InputError(path, f"{where}: 'height' and 'width' must be positive integers")
        seen.add(entry["id"])
        images.append(entry)
    return images


def _has(entry: Any, key: str) -> bool:
    return isinstance(entry, dict) and key in entry


def _is_hashable(value: Any) -> bool:
    return isinstance(value, (int, str, float)) and not isinstance(value, bool)


def _is_number_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _default_images_dir(instances_json: Path, images: list[dict[str, Any]]) -> Path:
    json_dir = instances_json.resolve().parent
    candidates = [json_dir.parent / "images", json_dir / "images", json_dir]
    stem = instances_json.stem
    if stem.startswith("instances_"):
        candidates.insert(1, json_dir.parent / stem[len("instances_") :])
    if images:
        for candidate in candidates:
            if (candidate / images[0]["file_name"]).is_file():
                return candidate
    return next((c for c in candidates if c.is_dir()), json_dir)
