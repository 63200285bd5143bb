"""Prediction over images, folders (recursive) or globs: one JSON per image, an annotated copy,
and one combined CSV. Built for large folders: images are decoded in background workers, a bad
image is skipped with a warning (the rest go on), outputs are keyed by each image's path relative
to the sources' common folder (``a/img.jpg`` and ``b/img.jpg`` both survive), every file is written
atomically, nothing is ever written over an input, and ``resume`` skips the images already done.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import load_image
from ..errors import InputError, InputWarning
from .checkpoints import atomic_write_bytes
from .model_io import model_device
from .plots import draw_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
COMBINED_CSV = "predictions.csv"
CSV_COLUMNS = ("image", "x1", "y1", "x2", "y2", "score", "label", "class_name")


@dataclass(frozen=True)
class ImageJob:
    """One image to predict: ``path`` on disk, ``key`` its path relative to the sources' common
    folder (POSIX separators), ``stem`` the output name without suffix (``key`` less its suffix;
    the whole ``key`` when two images would share a stem)."""

    path: Path
    key: str
    stem: str

    def json_path(self, out_dir: Path) -> Path:
        return out_dir / f"{self.stem}.json"

    def drawing_path(self, out_dir: Path) -> Path:
        return out_dir / f"{self.stem}.jpg"


def collect_images(sources: Sequence[str]) -> list[ImageJob]:
    """Files, folders (searched recursively for image suffixes) and glob patterns, sorted and
    de-duplicated, each keyed by its path relative to the common folder of all of them.

    Raises:
        InputError(source, "no images found"): a source that matches no image.
    """
    found: dict[Path, None] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not matches:
            raise InputError(source, "no images found")
        found.update(dict.fromkeys(p.resolve() for p in matches))
    paths = list(found)
    root = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    if root in paths:  # a single file
        root = root.parent
    keys = [p.relative_to(root).as_posix() for p in paths]
    stems = [key.rsplit(".", 1)[0] for key in keys]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    return [ImageJob(path, key, key if stem in shared else stem) for path, key, stem in zip(paths, keys, stems)]


class _DecodedImages(Dataset):
    """``(index, uint8 [3, H, W] image or None, error message or None)`` per job, so that a
    worker reports a bad image instead of stopping the loader."""

    def __init__(self, jobs: Sequence[ImageJob]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int):
        try:
            return index, load_image(self.jobs[index].path), None
        except InputError as error:
            return index, None, error.problem


def _keep_lists(batch):
    return batch


@dataclass
class PredictSummary:
    """What a prediction run did: ``predicted`` (records of this run), ``skipped`` (path ->
    reason), ``resumed`` (images already done by an earlier run), ``combined`` (the CSV)."""

    predicted: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    resumed: int = 0
    combined: Optional[Path] = None


@torch.no_grad()
def predict_images(model, class_names: Sequence[str], jobs: Sequence[ImageJob], out_dir: Path, *,
                   batch_size: int = 4, draw: bool = True, workers: int = 2, resume: bool = False,
                   progress: bool = False) -> PredictSummary:
    """Run ``model`` on the images of ``jobs``; write per image ``<stem>.json`` (and
    ``<stem>.jpg`` annotated) under ``out_dir``, then ``predictions.csv`` for all images done
    (this run's and, with ``resume``, earlier runs').

    Each JSON: ``{"file", "image", "width", "height", "detections": [{"box": [x1, y1, x2, y2]
    pixels of the image, "score", "label", "class_name"}]}`` sorted by decreasing score
    (``"image"`` is the key). An image that cannot be decoded is skipped with a warning
    naming it.

    Raises:
        InputError(path, ...): an output file would overwrite one of the input images.
    """
    out_dir = Path(out_dir)
    _refuse_overwriting_inputs(jobs, out_dir, draw)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary()
    todo = [job for job in jobs if not (resume and job.json_path(out_dir).is_file())]
    summary.resumed = len(jobs) - len(todo)
    device = model_device(model)
    loader = DataLoader(_DecodedImages(todo), batch_size=batch_size, num_workers=workers, collate_fn=_keep_lists)
    bar = _progress(len(todo), enabled=progress)
    for batch in loader:
        good = []
        for index, image, problem in batch:
            if image is None:
                summary.skipped[str(todo[index].path)] = problem
                warnings.warn(InputWarning(todo[index].path, f"{problem}; skipped", kind="unreadable images skipped"))
            else:
                good.append((todo[index], image))
        if good:
            outputs = model([image.to(device).float().div_(255) for _, image in good])
            for (job, image), det in zip(good, outputs):
                summary.predicted.append(_write_outputs(job, image, det, class_names, out_dir, draw))
        bar.update(len(batch))
    bar.close()
    summary.combined = write_combined_csv([job for job in jobs if job.json_path(out_dir).is_file()], out_dir)
    return summary


def _refuse_overwriting_inputs(jobs: Sequence[ImageJob], out_dir: Path, draw: bool) -> None:
    inputs = {job.path.resolve() for job in jobs}
    resolved = out_dir.resolve()
    for job in jobs:
        for output in (job.json_path(resolved), job.drawing_path(resolved) if draw else None):
            if output is not None and output in inputs:
                raise InputError(output, f"predict would write over this input image; choose another --output than {out_dir}")


def _write_outputs(job: ImageJob, image: torch.Tensor, det: dict, class_names, out_dir: Path, draw: bool) -> dict:
    det = {k: v.cpu() for k, v in det.items()}
    record = {
        "file": str(job.path), "image": job.key, "height": int(image.shape[-2]), "width": int(image.shape[-1]),
        "detections": [
            {"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label,
             "class_name": class_names[label] if label < len(class_names) else str(label)}
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
        ],
    }
    if draw:  # the picture first: a JSON present means the image is done (resume)
        picture = draw_detections(image, det["boxes"], det["labels"], det["scores"], class_names)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        atomic_write_bytes(job.drawing_path(out_dir), buffer.getvalue())
    atomic_write_bytes(job.json_path(out_dir), json.dumps(record, indent=1).encode())
    return record


def write_combined_csv(jobs: Iterable[ImageJob], out_dir: Path) -> Path:
    """``out_dir/predictions.csv``: one row per detection (``image`` key, box, score, label,
    class name) of every job whose JSON exists, rebuilt from those JSON files."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for job in jobs:
        record = json.loads(job.json_path(out_dir).read_text())
        for d in record["detections"]:
            writer.writerow([record.get("image", job.key), *d["box"], d["score"], d["label"], d["class_name"]])
    path = out_dir / COMBINED_CSV
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def _progress(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="predict", unit="img", dynamic_ncols=True)
