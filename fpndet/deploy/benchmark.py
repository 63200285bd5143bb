"""``fpndet benchmark``: every installed backend timed on this machine, answers checked first.

For each backend (:mod:`fpndet.deploy.backends`) the same images are run once and the detections
compared with eager PyTorch (same count and labels, largest box and score differences), then
``repeats`` calls are timed: median ms per image, images per second, and the peak resident memory
of the process while that backend ran (CPU; on CUDA the peak allocated GPU memory).
"""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from .backends import BACKEND_CHOICES, PYTORCH_BACKENDS, installed, open_detector

DEFAULT_BACKENDS = ("eager", "fast", "winograd", "onnxruntime", "openvino", "openvino-bf16")
BOX_TOLERANCE_PX, SCORE_TOLERANCE = 0.5, 1e-4


def compare(reference: Sequence[dict[str, Tensor]], other: Sequence[dict[str, Tensor]], *,
            box_tol: float = BOX_TOLERANCE_PX, score_tol: float = SCORE_TOLERANCE) -> dict:
    """Whether two detection lists hold the same detections, whatever the order of tied scores.

    Per image the counts must agree and every reference detection must match one of ``other``'s
    (one to one, greedily in score order) with the same label, every box coordinate within
    ``box_tol`` px and the score within ``score_tol``. Returns ``{"equal", "same_counts",
    "unmatched", "max_box_diff_px", "max_score_diff"}`` (the differences over matched pairs)."""
    same_counts, unmatched, box_diff, score_diff = True, 0, 0.0, 0.0
    for ref, out in zip(reference, other):
        ref = {k: v.detach().cpu() for k, v in ref.items()}
        out = {k: v.detach().cpu() for k, v in out.items()}
        same_counts &= len(ref["boxes"]) == len(out["boxes"])
        if len(ref["boxes"]) == 0 or len(out["boxes"]) == 0:
            unmatched += len(ref["boxes"])
            continue
        boxes = (ref["boxes"].float()[:, None] - out["boxes"].float()[None]).abs().amax(-1)
        scores = (ref["scores"].float()[:, None] - out["scores"].float()[None]).abs()
        close = (boxes <= box_tol) & (scores <= score_tol) & (ref["labels"][:, None] == out["labels"][None])
        taken = torch.zeros(len(out["boxes"]), dtype=torch.bool)
        for row, candidates in enumerate(close):  # greedy one-to-one matching, at most 1000 rows
            free = (candidates & ~taken).nonzero()
            if len(free) == 0:
                unmatched += 1
                continue
            taken[free[0, 0]] = True
            box_diff = max(box_diff, float(boxes[row, free[0, 0]]))
            score_diff = max(score_diff, float(scores[row, free[0, 0]]))
    return {"equal": same_counts and unmatched == 0, "same_counts": same_counts, "unmatched": unmatched,
            "max_box_diff_px": box_diff, "max_score_diff": score_diff}


class PeakMemory:
    """Peak resident memory (MiB) of this process while the ``with`` block runs (sampled every
    5 ms from /proc/self/statm; on CUDA the peak allocated memory instead)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss_mib() -> float:
        try:
            with open("/proc/self/statm") as handle:
                pages = int(handle.read().split()[1])
        except OSError:
            return 0.0
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, self._rss_mib())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mib = self._rss_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
        return False


def benchmark_images(folder: Optional[str], count: int, seed: int = 0) -> list[Tensor]:
    """``count`` float ``[3, H, W]`` images in [0, 1]: the first of ``folder`` (repeated if
    needed), else random 480x640 ones (a trained model finds little in noise: give real images
    for a meaningful check)."""
    if folder:
        from ..data.images import load_image

        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
        if not files:
            raise InputError(folder, "no .jpg/.jpeg/.png/.bmp images in this folder")
        return [load_image(files[i % len(files)]).float().div(255) for i in range(count)]
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 480, 640, generator=generator) for _ in range(count)]


def _call(detector, images, device):
    with torch.inference_mode():
        out = detector([image.to(device) for image in images])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def benchmark_backends(weights, *, device: torch.device = torch.device("cpu"), batch: int = 1,
                       size: Optional[int] = None, image_folder: Optional[str] = None, repeats: int = 5,
                       backends: Optional[Sequence[str]] = None) -> list[dict]:
    """One row per backend: ``{"backend", "ms_per_image", "images_per_s", "peak_mib"}`` and the
    fields of :func:`compare` (or ``"skipped"`` with the
    reason). Raises InputError for an unknown backend name."""
    chosen = list(backends or [b for b in DEFAULT_BACKENDS if installed(b)])
    unknown = [b for b in chosen if b not in BACKEND_CHOICES or b == "auto"]
    if unknown:
        raise InputError(None, f"unknown backend(s) {unknown}; choose from {', '.join(BACKEND_CHOICES[1:])}")
    overrides = {"min_size": size} if size else None
    images = benchmark_images(image_folder, batch)
    reference_model, _, _ = open_detector(weights, backend="eager", device=device, overrides=overrides)
    reference = _call(reference_model, images, device)
    rows = []
    for backend in chosen:
        if not installed(backend):
            rows.append({"backend": backend, "skipped": "not installed"})
            continue
        if size and backend not in PYTORCH_BACKENDS:
            rows.append({"backend": backend, "skipped": "--size applies to PyTorch backends (an export keeps its size)"})
            continue
        try:
            detector, _, _ = open_detector(weights, backend=backend, device=device, overrides=overrides)
        except InputError as err:
            rows.append({"backend": backend, "skipped": err.problem})
            continue
        row = {"backend": backend, **compare(reference, _call(detector, images, device))}
        if backend in ("winograd", "compile"):  # compiled code settles on the second call
            _call(detector, images, device)
        times = []
        with PeakMemory(device) as memory:
            for _ in range(repeats):
                start = time.perf_counter()
                _call(detector, images, device)
                times.append(time.perf_counter() - start)
        per_image = statistics.median(times) / batch
        row.update(ms_per_image=1000 * per_image, images_per_s=1 / per_image, peak_mib=memory.peak_mib)
        rows.append(row)
    base = next((r["ms_per_image"] for r in rows if r["backend"] == "eager" and "ms_per_image" in r), None)
    for row in rows:
        if base and "ms_per_image" in row:
            row["vs_eager"] = row["ms_per_image"] / base
    return rows


def format_benchmark(rows: Sequence[dict]) -> str:
    """The rows of :func:`benchmark_backends` as a text table."""
    lines = [f"{'backend':<14} {'ms/image':>9} {'images/s':>9} {'vs eager':>9} {'peak MiB':>9}  detections vs eager"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['backend']:<14} {'-':>9} {'-':>9} {'-':>9} {'-':>9}  skipped: {row['skipped']}")
            continue
        verdict = (f"equal (boxes {row['max_box_diff_px']:.2g} px, scores {row['max_score_diff']:.2g})" if row["equal"]
                   else f"DIFFERENT ({row['unmatched']} unmatched)")
        lines.append(f"{row['backend']:<14} {row['ms_per_image']:>9.1f} {row['images_per_s']:>9.2f} "
                     f"{row.get('vs_eager', float('nan')):>8.2f}x {row['peak_mib']:>9.0f}  {verdict}")
    return "\n".join(lines)


def check_export(model, path, *, count: int = 2, image_folder: Optional[str] = None) -> tuple[str, bool]:
    """Compare an export on onnxruntime with the PyTorch model on ``count`` images (the first of
    ``image_folder``, else random ones, in which a trained model finds little).

    Returns:
        ``(line, equal)``: one line saying how many detections were compared and the largest box
        and score differences, or that there was nothing to compare (no detection above the
        score threshold in these images); ``equal`` is False only when detections differ.
    """
    from .runtime import OnnxDetector

    images = benchmark_images(image_folder, count)
    source = f"{count} images of {image_folder}" if image_folder else f"{count} random images"
    with torch.inference_mode():
        reference = model([image.to(next(model.parameters()).device) for image in images])
    result = compare(reference, OnnxDetector(path)(images))
    compared = sum(len(r["boxes"]) for r in reference)
    if compared == 0 and result["equal"]:
        return (f"check on onnxruntime ({source}): nothing compared, no detection above the score threshold in "
                "either (give real photos with --images)", True)
    return (f"check on onnxruntime ({source}, {compared} detections): "
            f"{'equal' if result['equal'] else 'NOT EQUAL'} (boxes {result['max_box_diff_px']:.2g} px, "
            f"scores {result['max_score_diff']:.2g}, {result['unmatched']} unmatched)", result["equal"])