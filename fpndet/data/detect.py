"""Opening a dataset from one user-given string, guessing its format.

Recognised specs (``format`` forces one of "shapes", "coco", "voc", "yolo"):

- ``shapes`` or ``shapes:N``: the synthetic :class:`ShapesDataset` (``N`` images);
- a ``.json`` file: COCO instances (``split`` is ignored: one file is one split);
- a ``.yaml``/``.yml`` file: YOLO data YAML (``split`` picks its train/val/test entry);
- a folder with ``Annotations/`` and ``ImageSets/``: Pascal VOC (``split`` picks
  ``ImageSets/Main/<split>.txt``: train, val, trainval, test...);
- a folder with ``data.yaml`` (or ``dataset.yaml``): YOLO;
- a folder with ``annotations/*.json``: COCO, taking ``instances_<split>.json``,
  ``instances_<split>2017.json``, or the only JSON file there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpndet.data.dataset import DetectionDataset
from fpndet.data.formats.coco import CocoDetection
from fpndet.data.formats.shapes import ShapesDataset
from fpndet.data.formats.voc import VOCDetection
from fpndet.data.formats.yolo import YOLODetection
from fpndet.errors import InputError

__all__ = ["open_dataset", "FORMATS"]

FORMATS = ("shapes", "coco", "voc", "yolo")
_YAML_SUFFIXES = (".yaml", ".yml")
_YOLO_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml")


def open_dataset(
    spec: str | os.PathLike,
    *,
    split: str,
    format: str | None = None,
    transforms: Callable | None = None,
    **kw: Any,
) -> DetectionDataset:
    """Open the dataset ``spec`` names (rules in the module doc).

    Args:
        spec: "shapes", "shapes:N", or a file/folder path.
        split: "train", "val", ... (ignored for a COCO JSON file).
        format: force "shapes", "coco", "voc" or "yolo" instead of guessing.
        transforms: optional ``(image, target) -> (image, target)`` callable.
        **kw: extra keyword arguments of the dataset class (e.g. ``class_names`` for VOC,
            ``image_size``/``seed`` for shapes).

    Returns:
        a :class:`~fpndet.data.dataset.DetectionDataset`.

    Raises:
        InputError(spec, ...): missing path, unrecognised format, or a bad ``shapes:N``; the
            dataset classes raise their own InputErrors for bad content; ``class_names`` given
            for a dataset that is not VOC (COCO and YOLO name their classes in their own files).
    """
    text = os.fspath(spec)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if is_shapes_spec(text, format):
        _refuse_class_names(kw, text, "shapes")
        return _open_shapes(text, split=split, transforms=transforms, **kw)
    path = Path(text)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    format = format or _guess_format(path)
    if format != "voc":
        _refuse_class_names(kw, path, format)
    if format == "coco":
        return CocoDetection(_coco_json(path, split), transforms=transforms, **kw)
    if format == "voc":
        return VOCDetection(path, split, transforms=transforms, **kw)
    return YOLODetection(_yolo_yaml(path), split, transforms=transforms, **kw)


def is_shapes_spec(spec: str, format: str | None = None) -> bool:
    """Whether ``spec`` (with an optional forced ``format``) opens the synthetic shapes dataset."""
    return format == "shapes" or (format is None and (spec == "shapes" or spec.startswith("shapes:")))


def _refuse_class_names(kw: dict, source, format: str) -> None:
    if kw.get("class_names"):
        raise InputError(source, f"data.class_names is for VOC datasets (whose XML files name classes but do not "
                         f"list them); a {format} dataset names its own classes")


def _open_shapes(text: str, *, split: str, transforms: Callable | None, **kw: Any) -> ShapesDataset:
    _, _, count = text.partition(":")
    if count:
        if not count.isdigit() or int(count) < 1:
            raise InputError(text, "expected 'shapes' or 'shapes:N' with N a positive number of images")
        kw["num_images"] = int(count)
    if split not in ("train", "val", "test"):
        raise InputError(text, f"the shapes dataset has splits train, val and test, not '{split}'")
    return ShapesDataset(split=split, transforms=transforms, **kw)


def _guess_format(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        if path.suffix.lower() in _YAML_SUFFIXES:
            return "yolo"
        raise InputError(path, "cannot tell the dataset format: expected a COCO .json or a YOLO .yaml file")
    if (path / "Annotations").is_dir() and (path / "ImageSets").is_dir():
        return "voc"
    if any((path / name).is_file() for name in _YOLO_YAML_NAMES):
        return "yolo"
    if any((path / "annotations").glob("*.json")):
        return "coco"
    raise InputError(
        path,
        "cannot tell the dataset format: expected Annotations/ and ImageSets/ (VOC), "
        "data.yaml (YOLO) or annotations/*.json (COCO)",
    )


def _coco_json(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    folder = path / "annotations"
    for name in (f"instances_{split}.json", f"instances_{split}2017.json"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.json"))
    if len(found) == 1:
        return found[0]
    raise InputError(
        folder, f"expected instances_{split}.json or a single JSON file, found {[p.name for p in found] or 'none'}"
    )


def _yolo_yaml(path: Path) -> Path:
    if path.is_file():
        return path
    for name in _YOLO_YAML_NAMES:
        if (path / name).is_file():
            return path / name
    raise InputError(path, f"no YOLO data YAML ({', '.join(_YOLO_YAML_NAMES)}) in this folder")
