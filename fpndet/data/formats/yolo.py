"""Ultralytics-style YOLO datasets: a data YAML, ``images/<split>`` folders, one ``.txt`` per image.

Data YAML keys: ``path`` (dataset root; relative to the YAML's folder; default that folder),
``train``, ``val``, optional ``test`` (each a folder, a ``.txt`` list of image paths, or a list
of those, relative to ``path``), and ``names`` (a list, or a ``{id: name}`` dict with ids
``0..K-1``); an optional ``nc`` must equal the number of names.

The label file of ``.../images/.../x.jpg`` is ``.../labels/.../x.txt`` (the last ``images`` path
component replaced by ``labels``; a path without one keeps its folder). Each line is
``class cx cy w h`` normalised to ``[0, 1]`` by the image width/height, or a polygon
``class x1 y1 x2 y2 ...`` (at least 3 points) whose extent becomes the box. A missing label file
means an image without objects. Boxes become absolute xyxy with the image size from its header
(EXIF rotation applied) when an image is first used; the 1-px clipping rules of
:mod:`fpndet.data.records` then apply, naming the label file and line.

``image_id`` is the index in the sorted image list.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fpndet.data.dataset import DetectionDataset
from fpndet.data.images import image_size
from fpndet.data.records import ImageRecord, clip_annotation_boxes
from fpndet.errors import InputError

__all__ = ["YOLODetection", "label_path_for", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class YOLODetection(DetectionDataset):
    """Images and boxes of one split of a YOLO dataset.

    Args:
        data_yaml: the data YAML file.
        split: key of the YAML naming the split's images ("train", "val", "test").
        transforms: optional ``(image, target) -> (image, target)`` callable.

    Raises:
        InputError: malformed YAML or missing keys (naming the YAML), a missing image folder,
            a bad label line or a class id out of range (naming the ``.txt`` file and line).
    """

    def __init__(self, data_yaml: str | os.PathLike, split: str = "train", *, transforms: Callable | None = None):
        self.data_yaml = Path(data_yaml)
        self.split = split
        config = _read_yaml(self.data_yaml)
        names = _parse_names(config, self.data_yaml)
        super().__init__(class_names=names, transforms=transforms, annotation_source=self.data_yaml)
        root = _dataset_root(config, self.data_yaml)
        if split not in config or config[split] in (None, "", []):
            raise InputError(self.data_yaml, f"no '{split}' entry naming the {split} images")
        self.image_paths = _list_images(config[split], root, self.data_yaml)
        self.label_paths = [label_path_for(path) for path in self.image_paths]
        self._normalised = [_read_label_file(path, self.num_classes) for path in self.label_paths]
        self._records: dict[int, ImageRecord] = {}
        self.image_ids = list(range(len(self.image_paths)))

    def __len__(self) -> int:
        return len(self.image_paths)

    def annotation_file(self, index: int) -> str:
        return os.fspath(self.label_paths[index])

    def annotation(self, index: int) -> ImageRecord:
        """Ground truth of image ``index``; reads the image header once for its size."""
        if index not in self._records:
            self._records[index] = self._absolute_record(index)
        return self._records[index]

    def _absolute_record(self, index: int) -> ImageRecord:
        image_path = self.image_paths[index]
        height, width = image_size(image_path)
        labels, boxes, line_numbers = self._normalised[index]
        absolute = boxes * np.array([width, height, width, height], dtype=np.float64)
        names = [f"line {n}" for n in line_numbers]
        clipped, keep = clip_annotation_boxes(
            absolute, (height, width), source=self.label_paths[index], object_names=names
        )
        return ImageRecord(
            image_id=index,
            file_name=os.fspath(image_path),
            height=height,
            width=width,
            boxes=clipped[keep],
            labels=labels[keep],
            iscrowd=np.zeros(int(keep.sum()), dtype=bool),
        )


def label_path_for(image_path: str | os.PathLike) -> Path:
    """``.../images/a/b.jpg`` -> ``.../labels/a/b.txt`` (last ``images`` component replaced)."""
    parts = list(Path(image_path).parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except FileNotFoundError as error:
        raise InputError(path, "no such file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read data YAML: {error}") from error
    except yaml.YAMLError as error:
        raise InputError(path, f"malformed YAML: {error}") from error
    if not isinstance(config, dict):
        raise InputError(path, "expected a mapping with 'train', 'val' and 'names'")
    return config


def _parse_names(config: dict[str, Any], path: Path) -> list[str]:
    names = config.get("names")
    if isinstance(names, dict):
        try:
            ids = sorted(int(key) for key in names)
        except (TypeError, ValueError) as error:
            raise InputError(path, "'names' keys must be integer class ids") from error
        if ids != list(range(len(ids))):
            raise InputError(path, f"'names' ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        by_id = {int(key): str(value) for key, value in names.items()}
        names = [by_id[i] for i in ids]
    elif isinstance(names, list):
        names = [str(name) for name in names]
    else:
        raise InputError(path, "missing 'names' (a list of class names or an {id: name} mapping)")
    if not names:
        raise InputError(path, "'names' is empty")
    if "nc" in config and config["nc"] != len(names):
        raise InputError(path, f"'nc' is {config['nc']} but 'names' lists {len(names)} classes")
    return names


def _dataset_root(config: dict[str, Any], path: Path) -> Path:
    base = path.resolve().parent
    root = config.get("path")
    if not root:
        return base
    root = Path(os.path.expanduser(str(root)))
    return root if root.is_absolute() else base / root


def _list_images(entry: Any, root: Path, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        location = Path(str(item))
        location = location if location.is_absolute() else root / location
        if location.is_dir():
            images.extend(sorted(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif location.is_file() and location.suffix == ".txt":
            images.extend(_images_from_list(location))
        else:
            raise InputError(yaml_path, f"image folder or list '{location}' does not exist")
    return images


def _images_from_list(list_file: Path) -> list[Path]:
    lines = [line.strip() for line in list_file.read_text(encoding="utf-8").splitlines()]
    return [p if p.is_absolute() else list_file.parent / p for p in map(Path, filter(None, lines))]


def _read_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Parse one label file into int64 labels ``[N]``, normalised xyxy float64 ``[N, 4]`` and the
    line number of each object; a missing file gives no objects."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read label file: {error}") from error
    labels, boxes, numbers = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, box = _parse_label_line(line, path, number, num_classes)
        labels.append(label)
        boxes.append(box)
        numbers.append(number)
    return np.array(labels, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4), numbers


def _parse_label_line(line: str, path: Path, number: int, num_classes: int) -> tuple[int, list[float]]:
    fields = line.split()
    is_polygon = len(fields) >= 7 and len(fields) % 2 == 1
    if len(fields) != 5 and not is_polygon:
        raise InputError(path, f"line {number}: expected 'class cx cy w h', got {line.strip()!r}")
    try:
        class_value = float(fields[0])
        values = [float(v) for v in fields[1:]]
    except ValueError as error:
        raise InputError(path, f"line {number}: not a number in {line.strip()!r}") from error
    if not class_value.is_integer() or not 0 <= class_value < num_classes:
        raise InputError(path, f"line {number}: class id {fields[0]} out of range 0..{num_classes - 1}")
    if not np.isfinite(values).all():
        raise InputError(path, f"line {number}: non-finite coordinate in {line.strip()!r}")
    if is_polygon:
        xs, ys = values[0::2], values[1::2]
        return int(class_value), [min(xs), min(ys), max(xs), max(ys)]
    cx, cy, w, h = values
    if w < 0 or h < 0:
        raise InputError(path, f"line {number}: negative width or height in {line.strip()!r}")
    return int(class_value), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
