"""Pascal VOC layout (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``).

- VOC pixel coordinates are 1-based and inclusive: ``xmin=1`` is the first pixel column and
  ``xmax=W`` the last. In fpndet's pixel-edge xyxy convention (:mod:`fpndet.data.records`)
  that box is ``[xmin - 1, ymin - 1, xmax, ymax]``.
- ``<difficult>1</difficult>`` objects become ignore regions in the samples (``iscrowd=True``:
  never positives in training), or are left out with ``keep_difficult=False``. In evaluation
  (:meth:`VOCDetection.to_coco`) they are ``difficult``, not crowd, and ignored as the VOC
  devkit ignores them (see :class:`fpndet.engine.evaluation.CocoEvaluator`).
- Classes: an explicit list (``class_names`` or ``classes_file``, one name per line), else the
  sorted unique object names over *all* XML files of ``Annotations/`` (not only the split's),
  so that every split of a root gets the same labels.
- The image of ``<id>`` is ``JPEGImages/<filename from the XML>`` if it exists, else
  ``JPEGImages/<id>.jpg`` (or ``.jpeg``/``.png``). Its size is the XML ``<size>`` when that is
  positive, else read from the image header.
- ``image_id`` is the 0-based line index of the id in the split file.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fpndet.data.dataset import DetectionDataset
from fpndet.data.images import image_size
from fpndet.data.records import ImageRecord, clip_annotation_boxes
from fpndet.errors import InputError

__all__ = ["VOCDetection", "read_class_names_file"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


class VOCDetection(DetectionDataset):
    """Images and boxes of one split of a Pascal VOC root.

    Args:
        root: folder holding ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.
        split: name of the id list ``ImageSets/Main/<split>.txt`` (train, val, trainval, test...).
        class_names: explicit class list (label = position). Exclusive with ``classes_file``.
        classes_file: text file with one class name per line.
        transforms: optional ``(image, target) -> (image, target)`` callable.
        keep_difficult: keep difficult objects as ignore regions (True) or drop them.

    Raises:
        InputError: missing folder or split file, malformed XML (naming the XML file), an
            object whose name is not in an explicit class list ("unknown class 'x'", naming the
            XML file), a missing image, or a box with negative width/height.
    """

    devkit_metric = True  # evaluation reports the VOC devkit's mAP@0.5 too

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        class_names: Sequence[str] | None = None,
        classes_file: str | os.PathLike | None = None,
        transforms: Callable | None = None,
        keep_difficult: bool = True,
    ):
        self.root = Path(root)
        self.split = split
        self.keep_difficult = keep_difficult
        annotations_dir = self.root / "Annotations"
        if not annotations_dir.is_dir():
            raise InputError(self.root, "not a Pascal VOC folder: no 'Annotations' folder")
        ids = _read_split(self.root, split)
        parsed = {image_id: _parse_xml(annotations_dir / f"{image_id}.xml") for image_id in ids}
        names = _choose_classes(class_names, classes_file, annotations_dir, parsed)
        super().__init__(class_names=names, transforms=transforms, annotation_source=annotations_dir)
        self._label_of = {name: label for label, name in enumerate(self.class_names)}
        self._records = [self._to_record(index, image_id, parsed[image_id]) for index, image_id in enumerate(ids)]
        self._xml_paths = [os.fspath(parsed[image_id].path) for image_id in ids]
        self.image_ids = [record.image_id for record in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def annotation(self, index: int) -> ImageRecord:
        return self._records[index]

    def annotation_file(self, index: int) -> str:
        return self._xml_paths[index]

    def to_coco(self) -> dict[str, list[dict[str, Any]]]:
        """COCO-format ground truth (see :meth:`DetectionDataset.to_coco`) where difficult
        objects carry ``"difficult": 1`` and ``"iscrowd": 0`` (every annotation has both keys).

        A crowd region would absorb any detection mostly inside it (pycocotools' crowd IoU is the
        intersection over the detection's area); the devkit instead matches difficult objects by
        IoU and only ignores the detections so matched. :class:`~fpndet.engine.evaluation.
        CocoEvaluator` implements that for ``difficult`` annotations.
        """
        coco = super().to_coco()
        for annotation in coco["annotations"]:
            annotation["difficult"] = annotation["iscrowd"]
            annotation["iscrowd"] = 0
        return coco

    def _to_record(self, index: int, image_id: str, parsed: _ParsedXml) -> ImageRecord:
        xml_path = parsed.path
        unknown = [name for name in parsed.names if name not in self._label_of]
        if unknown:
            raise InputError(xml_path, f"unknown class '{unknown[0]}' (classes: {', '.join(self.class_names)})")
        image_path = _find_image(self.root, image_id, parsed.filename, xml_path)
        height, width = parsed.size if min(parsed.size) > 0 else image_size(image_path)
        object_names = [f"object {i + 1} ('{name}')" for i, name in enumerate(parsed.names)]
        boxes, keep = clip_annotation_boxes(parsed.boxes, (height, width), source=xml_path, object_names=object_names)
        if not self.keep_difficult:
            keep &= ~parsed.difficult
        labels = np.array([self._label_of[name] for name in parsed.names], dtype=np.int64)
        return ImageRecord(
            image_id=index,
            file_name=os.fspath(image_path),
            height=int(height),
            width=int(width),
            boxes=boxes[keep],
            labels=labels[keep],
            iscrowd=parsed.difficult[keep],
        )


def read_class_names_file(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines and surrounding spaces ignored).

    Raises:
        InputError(path, ...): unreadable file, no names, or a repeated name.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise InputError(path, "no such file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read class names: {error}") from error
    names = [line.strip() for line in lines if line.strip()]
    _check_class_list(names, path)
    return names


@dataclasses.dataclass
class _ParsedXml:
    """What fpndet needs from one VOC XML file (boxes float64 ``[N, 4]`` pixel-edge xyxy)."""

    path: Path
    filename: str | None
    size: tuple[int, int]
    names: list[str]
    boxes: np.ndarray
    difficult: np.ndarray


def _parse_xml(path: Path) -> _ParsedXml:
    """Read one VOC XML: ``<filename>``, ``<size>`` and each ``<object>``'s name, box, difficult.

    Boxes come back as float64 ``[N, 4]`` pixel-edge xyxy (``xmin - 1, ymin - 1, xmax, ymax``).
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError as error:
        raise InputError(path, "no such annotation file") from error
    except (ET.ParseError, OSError) as error:
        raise InputError(path, f"malformed XML: {error}") from error
    names, boxes, difficult = [], [], []
    for number, element in enumerate(root.findall("object"), start=1):
        name = (element.findtext("name") or "").strip()
        if not name:
            raise InputError(path, f"object {number} has no <name>")
        names.append(name)
        boxes.append(_read_box(element, path, f"object {number} ('{name}')"))
        difficult.append(_read_int(element.findtext("difficult"), 0, path, f"object {number} <difficult>") == 1)
    size = root.find("size")
    height = _read_int(size.findtext("height") if size is not None else None, 0, path, "<size><height>")
    width = _read_int(size.findtext("width") if size is not None else None, 0, path, "<size><width>")
    filename = (root.findtext("filename") or "").strip() or None
    return _ParsedXml(
        path,
        filename,
        (height, width),
        names,
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.array(difficult, dtype=bool),
    )


def _read_box(element: ET.Element, path: Path, where: str) -> list[float]:
    box = element.find("bndbox")
    if box is None:
        raise InputError(path, f"{where} has no <bndbox>")
    values = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        text = box.findtext(key)
        try:
            values.append(float(text))
        except (TypeError, ValueError) as error:
            raise InputError(path, f"{where}: <{key}> must be a number, got {text!r}") from error
    xmin, ymin, xmax, ymax = values
    return [xmin - 1.0, ymin - 1.0, xmax, ymax]


def _read_int(text: str | None, default: int, path: Path, where: str) -> int:
    if text is None or not text.strip():
        return default
    try:
        return int(float(text))
    except (ValueError, OverflowError) as error:  # OverflowError: "inf"
        raise InputError(path, f"{where} must be a finite number, got {text!r}") from error


def _read_split(root: Path, split: str) -> list[str]:
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise InputError(split_file, f"no such split file (available splits: {', '.join(available) or 'none'})")
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(split_file, f"cannot read split file: {error}") from error
    ids = [line.split()[0] for line in lines if line.strip()]
    if len(set(ids)) != len(ids):
        raise InputError(split_file, "an image id is listed twice")
    return ids


def _choose_classes(
    class_names: Sequence[str] | None,
    classes_file: str | os.PathLike | None,
    annotations_dir: Path,
    parsed: dict[str, _ParsedXml],
) -> list[str]:
    if class_names is not None and classes_file is not None:
        raise ValueError("give class_names or classes_file, not both")
    if classes_file is not None:
        return read_class_names_file(classes_file)
    if class_names is not None:
        names = [str(name) for name in class_names]
        _check_class_list(names, annotations_dir)
        return names
    found = set()
    for xml_path in sorted(annotations_dir.glob("*.xml")):
        known = parsed.get(xml_path.stem)
        found.update((known if known is not None and known.path == xml_path else _parse_xml(xml_path)).names)
    if not found:
        raise InputError(annotations_dir, "no objects in any annotation file: cannot infer the class names")
    return sorted(found)


def _check_class_list(names: list[str], source) -> None:
    if not names:
        raise InputError(source, "the class list is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(source, f"class '{repeated[0]}' is listed twice")


def _find_image(root: Path, image_id: str, filename: str | None, xml_path: Path) -> Path:
    images_dir = root / "JPEGImages"
    candidates = ([images_dir / filename] if filename else []) + [
        images_dir / f"{image_id}{s}" for s in _IMAGE_SUFFIXES
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(xml_path, f"no image for '{image_id}' in {images_dir}")
