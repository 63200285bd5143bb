"""Prediction on images, folders or globs: a JSON per image and an annotated copy."""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..data.images import load_image
from ..errors import InputError
from .plots import draw_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def collect_images(sources: Sequence[str]) -> list[Path]:
    """Expand files, folders (non-recursive, image suffixes) and glob patterns, sorted.
    Raises :class:`InputError` when a source matches nothing."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not matches:
            raise InputError(source, "no images found")
        found.extend(matches)
    return found


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def predict_images(model, class_names: Sequence[str], images: Sequence[Path], out_dir: Path, *,
                   batch_size: int = 4, draw: bool = True) -> list[dict]:
    """Run ``model`` on ``images``; write ``<stem>.json`` (and ``<stem>.jpg`` annotated) per image.

    Each JSON: ``{"file", "width", "height", "detections": [{"box": [x1, y1, x2, y2] pixels,
    "score", "label", "class_name"}]}``, sorted by decreasing score. Returns those records.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    records = []
    for chunk in _batches(list(images), batch_size):
        pixels = [load_image(p) for p in chunk]
        outputs = model([img.to(device).float().div_(255) for img in pixels])
        for path, img, det in zip(chunk, pixels, outputs):
            det = {k: v.cpu() for k, v in det.items()}
            record = {
                "file": str(path), "height": int(img.shape[-2]), "width": int(img.shape[-1]),
                "detections": [
                    {"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label,
                     "class_name": class_names[label] if label < len(class_names) else str(label)}
                    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
                ],
            }
            (out_dir / f"{path.stem}.json").write_text(json.dumps(record, indent=1))
            if draw:
                draw_detections(img, det["boxes"], det["labels"], det["scores"], class_names,
                                out_path=out_dir / f"{path.stem}.jpg")
            records.append(record)
    return records
