"""Imperfect data: every image's header checked once before training, and images that fail to
decode later skipped instead of ending the run.

- :func:`check_images` reads each image's header (size and format, no pixel decoding) and
  compares the size with the annotation's: a missing or unreadable file, and a declared size the
  file contradicts (its boxes would land in the wrong place), are reported together, file by
  file. Results are cached by (path, modification time, byte size), so a second run re-reads only
  what changed.
- :class:`KeptImages` is the dataset without the images that failed (``data.bad_images=skip``).
- :class:`SkipUnreadable` serves the next readable image in place of one that fails to decode
  during training (a truncated JPEG passes the header check), and names what it skipped in the
  sample's ``target["skipped"]`` so that the trainer warns and counts in the main process.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from torch.utils.data import Dataset

from fpndet.data.images import image_size
from fpndet.errors import InputError

__all__ = ["ImageProblem", "check_images", "format_problems", "KeptImages", "SkipUnreadable"]

CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageProblem:
    """One image that failed the check: its dataset ``index``, ``file`` and the ``problem``."""

    index: int
    file: str
    problem: str


def check_images(dataset, *, cache_file: Optional[Path] = None) -> list[ImageProblem]:
    """The images of ``dataset`` whose header cannot be read or whose size differs from the
    annotation's (after EXIF rotation), in dataset order. Datasets without files (the
    synthetic shapes) have none.

    Args:
        dataset: a :class:`~fpndet.data.dataset.DetectionDataset`.
        cache_file: JSON file of earlier results (read if present, then rewritten); None: no cache.
    """
    if not getattr(dataset, "has_image_files", True):
        return []
    cache = _read_cache(cache_file)
    problems, fresh = [], {}
    for index in range(len(dataset)):
        try:
            record = dataset.annotation(index)
        except InputError as error:  # YOLO reads the header to make the record
            problems.append(ImageProblem(index, error.path or "", error.problem))
            continue
        path = record.file_name
        try:
            stat = os.stat(path)
        except OSError:
            problems.append(ImageProblem(index, path, "image file does not exist"))
            continue
        stamp = [stat.st_mtime_ns, stat.st_size]
        entry = cache.get(path)
        if entry is None or entry.get("stamp") != stamp:
            entry = _header_entry(path, stamp)
        fresh[path] = entry
        if entry["problem"]:
            problems.append(ImageProblem(index, path, entry["problem"]))
        elif tuple(entry["size"]) != (record.height, record.width):
            height, width = entry["size"]
            where = dataset.annotation_file(index) or "its annotation"
            problems.append(ImageProblem(index, path, f"image is {width}x{height} pixels but {where} says "
                                                      f"{record.width}x{record.height} (its boxes would be misplaced)"))
    _write_cache(cache_file, fresh)
    return problems


def _header_entry(path: str, stamp: list[int]) -> dict[str, Any]:
    try:
        return {"stamp": stamp, "size": list(image_size(path)), "problem": ""}
    except InputError as error:
        return {"stamp": stamp, "size": None, "problem": error.problem}


def _read_cache(cache_file: Optional[Path]) -> dict[str, dict]:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        content = json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is only a slower check
    return content.get("images", {}) if content.get("version") == CACHE_VERSION else {}


def _write_cache(cache_file: Optional[Path], entries: dict[str, dict]) -> None:
    if cache_file is None:
        return
    cache_file = Path(cache_file)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"version": CACHE_VERSION, "images": entries}))
    os.replace(temporary, cache_file)  # readers never see half a file


def format_problems(problems: Sequence[ImageProblem], total: int, *, limit: int = 20) -> str:
    """``"N of M images failed the check:"`` and one indented ``file: problem`` line per image
    (the first ``limit``, then a count)."""
    lines = [f"{len(problems)} of {total} images failed the check:"]
    lines += [f"  {p.file}: {p.problem}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


class KeptImages(Dataset):
    """``dataset`` restricted to the indices ``keep`` (in that order). Samples, records,
    ``image_ids`` and the COCO ground truth (:meth:`to_coco`) cover the kept images only; other
    attributes (class names, category ids, ``transforms``) are the dataset's own."""

    def __init__(self, dataset, keep: Sequence[int]):
        self.__dict__["dataset"] = dataset
        self.__dict__["keep"] = list(keep)
        self.__dict__["image_ids"] = [dataset.image_ids[i] for i in self.keep]

    def __getattr__(self, name: str):
        return getattr(self.__dict__["dataset"], name)

    def __setattr__(self, name: str, value) -> None:  # e.g. ``transforms``: set on the dataset
        setattr(self.dataset, name, value)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int):
        return self.dataset[self.keep[index]]

    def annotation(self, index: int):
        return self.dataset.annotation(self.keep[index])

    def load(self, index: int):
        return self.dataset.load(self.keep[index])

    def annotation_file(self, index: int):
        return self.dataset.annotation_file(self.keep[index])

    def to_coco(self) -> dict[str, list[dict[str, Any]]]:
        coco = self.dataset.to_coco()
        kept = set(self.image_ids)
        return {**coco, "images": [im for im in coco["images"] if im["id"] in kept],
                "annotations": [a for a in coco["annotations"] if a["image_id"] in kept]}


class SkipUnreadable(Dataset):
    """``dataset[i]``, or, when that image fails to decode (:class:`InputError`), the next
    readable one (``i + 1``, ``i + 2``, ... wrapping), with ``target["skipped"]`` listing
    ``"file: problem"`` for each image passed over. Deterministic, so resumed runs stay exact.

    Raises:
        InputError: no image of the dataset can be read.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        skipped = []
        for offset in range(len(self.dataset)):
            try:
                image, target = self.dataset[(index + offset) % len(self.dataset)]
            except InputError as error:
                skipped.append(str(error))
                continue
            if skipped:
                target = dict(target, skipped=skipped)
            return image, target
        raise InputError(None, f"none of the {len(self.dataset)} images can be read (first: {skipped[0]})")
