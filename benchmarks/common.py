"""Shared helpers of the fpndet benchmarks: argument parsing, timing, environment report, tables,
JSON output, torchvision-sized anchors and synthetic RetinaNet head outputs.

The benchmarks compare fpndet with torchvision's RetinaNet; they may import
``torchvision.models.detection`` (the library itself never does).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Optional, Sequence

import torch
import torchvision
from torch import Tensor

import fpndet
from fpndet.modeling.build import build_anchor_generator
from fpndet.modeling.box_coder import BoxCoder
from fpndet.modeling.config import ModelConfig, retinanet_r50_fpn_tv

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_DIR = BENCH_DIR.parent

# COCO-sized input: a 480x800 photo resized to 800x1333 (short side 800, long side <= 1333),
# padded to 800x1344 -> 201,600 anchors on P3-P7, as torchvision's retinanet_resnet50_fpn.
ORIGINAL_SIZE = (480, 800)
RESIZED_SIZE = (800, 1333)
SCORE_THRESH = 0.05


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with the options every benchmark shares (--device, --quick, --repeats, --warmup,
    --threads, --seed, --out)."""
    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 60 s on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"), help="JSON result path")
    return parser


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; raises ``SystemExit`` for cuda without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def apply_threads(args: argparse.Namespace, device: torch.device) -> None:
    """``torch.set_num_threads(args.threads)``; a CPU ``--quick`` run defaults to 1 thread: on a
    shared machine two threads slow down by up to 40x when a neighbour takes a core (OpenMP
    waits for the slowest thread), one thread by at most ~2x, which keeps the smoke test short."""
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, device: torch.device, repeats: int,
                     warmup: int) -> dict[str, list[float]]:
    """Wall-clock milliseconds of ``repeats`` calls of each function after ``warmup`` untimed
    rounds. The functions run in turn (a, b, a, b, ...) so that each sees the same background
    load on a shared machine. On CUDA the device is synchronised before and after every call, so
    each number is the full latency of one call. Returns the list of times per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def summary(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of a list of milliseconds."""
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "runs": len(times_ms),
    }


# ----------------------------------------------------------------------------------------------
# environment, tables, JSON
# ----------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device, threads and date for the JSON report."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fpndet": fpndet.__version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": cpu_name(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into the README as is)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in text_rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return out


def report(name: str, args: argparse.Namespace, device: torch.device, tables: dict[str, str],
           results: dict[str, Any]) -> None:
    """Print the tables and write ``{"benchmark", "environment", "settings", "results", "tables"}``."""
    for title, table in tables.items():
        print(f"\n## {title}\n\n{table}")
    payload = {
        "benchmark": name,
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items()},
        "results": results,
        "tables": tables,
    }
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")


# ----------------------------------------------------------------------------------------------
# anchors and synthetic head outputs
# ----------------------------------------------------------------------------------------------
def padded_size(size: tuple[int, int], divisible: int = 32) -> tuple[int, int]:
    return (math.ceil(size[0] / divisible) * divisible, math.ceil(size[1] / divisible) * divisible)


def feature_grids(padded: tuple[int, int], min_level: int = 3, max_level: int = 7) -> list[tuple[int, int]]:
    """(H_l, W_l) of P3..P7 for a ResNet-FPN on a padded batch: ceil(H / 2^l) (stride-2 convs
    with padding 1 round up)."""
    grids = []
    h, w = padded
    for level in range(1, max_level + 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if level >= min_level:
            grids.append((h, w))
    return grids


def fpndet_anchors(image_size: tuple[int, int], device: torch.device,
                   config: Optional[ModelConfig] = None) -> tuple[Tensor, list[int]]:
    """fpndet's anchors (equal to torchvision's) for a padded batch of ``image_size`` (h, w):
    float32 ``[A, 4]`` xyxy pixels and the per-level counts."""
    config = config or retinanet_r50_fpn_tv()
    generator = build_anchor_generator(config)
    padded = padded_size(image_size)
    anchors, counts = generator(padded, feature_grids(padded))
    return anchors.to(device), list(counts)


def random_boxes(count: int, image_size: tuple[int, int], generator: torch.Generator,
                 min_side: float = 16.0, max_side: float = 400.0) -> Tensor:
    """``count`` float32 xyxy boxes inside ``image_size`` (h, w), sides log-uniform in
    [min_side, max_side] pixels (COCO-like mix of small and large objects)."""
    h, w = image_size
    log_lo, log_hi = math.log(min_side), math.log(max_side)
    sides = torch.exp(torch.rand(count, 2, generator=generator) * (log_hi - log_lo) + log_lo)
    sides = torch.minimum(sides, torch.tensor([w - 2.0, h - 2.0]))
    corner = torch.rand(count, 2, generator=generator) * (torch.tensor([w, h]) - sides)
    return torch.cat([corner, corner + sides], dim=1)


def noise_mean_for(pass_count: float, total: int, sigma: float, thresh: float = SCORE_THRESH) -> float:
    """Mean μ of N(μ, σ) logits such that ``pass_count`` of ``total`` sigmoid scores exceed ``thresh``."""
    p = min(max(pass_count / total, 1e-12), 0.5)
    return math.log(thresh / (1 - thresh)) - NormalDist().inv_cdf(1 - p) * sigma


def synthetic_head_outputs(
    *,
    batch: int,
    anchors: Tensor,
    num_classes: int,
    image_size: tuple[int, int],
    noise_pass_per_image: int = 2000,
    objects_per_image: int = 20,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Realistic RetinaNet head outputs for a trained-looking model, on ``anchors.device``.

    Background logits ~ N(μ, 1) with μ chosen so that about ``noise_pass_per_image`` (anchor,
    class) scores per image pass the 0.05 threshold; plus ``objects_per_image`` random objects:
    every anchor with IoU > 0.3 to an object scores its class with logit 6·IoU - 2 (+ noise) and
    regresses to the object (deltas = exact encoding + N(0, 0.05)), so NMS has clusters to
    suppress as with a trained detector.

    Returns ``cls_logits`` float32 ``[batch, A, num_classes]`` and ``box_deltas`` ``[batch, A, 4]``.
    """
    from torchvision.ops import box_iou

    gen = torch.Generator().manual_seed(seed)
    cpu_anchors = anchors.cpu()
    num_anchors = cpu_anchors.shape[0]
    mu = noise_mean_for(noise_pass_per_image, num_anchors * num_classes, sigma=1.0)
    logits = torch.randn(batch, num_anchors, num_classes, generator=gen).add_(mu)
    deltas = torch.randn(batch, num_anchors, 4, generator=gen).mul_(0.1)
    coder = BoxCoder()
    for b in range(batch):  # benchmark input synthesis, not a hot path
        objects = random_boxes(objects_per_image, image_size, gen)
        classes = torch.randint(num_classes, (objects_per_image,), generator=gen)
        best_iou, best_object = box_iou(objects, cpu_anchors).max(dim=0)
        near = (best_iou > 0.3).nonzero().squeeze(1)
        obj = best_object[near]
        noise = torch.randn(len(near), generator=gen) * 0.3
        logits[b, near, classes[obj]] = 6.0 * best_iou[near] - 2.0 + noise
        jitter = torch.randn(len(near), 4, generator=gen) * 0.05
        deltas[b, near] = coder.encode(objects[obj], cpu_anchors[near]) + jitter
    return logits.to(anchors.device), deltas.to(anchors.device)


def synthetic_targets(*, batch: int, boxes_per_image: int, num_classes: int, image_size: tuple[int, int],
                      device: torch.device, seed: int = 0) -> list[dict[str, Tensor]]:
    """Per image ``{"boxes" float32 [N, 4] xyxy pixels, "labels" int64 [N] in [1, K)}``."""
    gen = torch.Generator().manual_seed(seed + 1)
    targets = []
    for _ in range(batch):
        boxes = random_boxes(boxes_per_image, image_size, gen)
        labels = torch.randint(1, num_classes, (boxes_per_image,), generator=gen)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return targets


# ----------------------------------------------------------------------------------------------
# comparing detections
# ----------------------------------------------------------------------------------------------
def matched_sets(reference: Sequence[dict[str, Tensor]], other: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """``{"set_equal", "unmatched"}`` from fpndet's one-to-one matching
    (:func:`fpndet.deploy.benchmark.compare`: same label, box within 0.5 px, score within 1e-4)."""
    from fpndet.deploy.benchmark import compare

    result = compare(reference, other)
    return {"set_equal": result["equal"], "unmatched": result["unmatched"]}


def compare_detections(reference: Sequence[dict[str, Tensor]], other: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """Agreement of two per-image detection lists (both sorted by decreasing score).

    Returns counts per image of each, whether they are equal, and over images whose counts
    agree the largest |score| and |box| differences and the fraction of equal labels."""
    counts_ref = [len(d["scores"]) for d in reference]
    counts_other = [len(d["scores"]) for d in other]
    score_diff, box_diff, same_labels, total = 0.0, 0.0, 0, 0
    for ref, oth in zip(reference, other):
        if len(ref["scores"]) != len(oth["scores"]) or len(ref["scores"]) == 0:
            continue
        score_diff = max(score_diff, float((ref["scores"].float() - oth["scores"].float()).abs().max()))
        box_diff = max(box_diff, float((ref["boxes"].float() - oth["boxes"].float()).abs().max()))
        same_labels += int((ref["labels"] == oth["labels"]).sum())
        total += len(ref["labels"])
    return {
        "counts_reference": counts_ref,
        "counts_other": counts_other,
        "same_counts": counts_ref == counts_other,
        "max_score_diff": score_diff,
        "max_box_diff_px": box_diff,
        "label_agreement": same_labels / total if total else 1.0,
        **matched_sets(reference, other),
    }


def backend_rows(times: dict[str, Sequence[float]], checks: dict[str, dict], *, batch: int, reference: str,
                 ratio_key: str, prefix: Sequence[Any] = ()) -> tuple[list[list[Any]], dict[str, dict]]:
    """Table rows and JSON entries of backends timed together (``times``: name -> call times in
    ms for ``batch`` images; ``checks``: name -> :func:`compare_detections` against the
    ``reference`` backend, absent for the reference itself). A row: ``[*prefix, name, ms/image,
    images/s, ratio to the reference, verdict]``; an entry: ms_per_image, images_per_s,
    ``ratio_key``, times_ms and check."""
    base = summary(times[reference])["median_ms"] / batch
    rows, entries = [], {}
    for name, values in times.items():
        ms = summary(values)["median_ms"] / batch
        check = checks.get(name)
        verdict = "reference" if check is None else (
            "same detections" if check["set_equal"] else
            f"DIFFERENT: {check['unmatched']} of {sum(check['counts_reference'])} unmatched, counts "
            f"{check['counts_other']} vs {check['counts_reference']}")
        rows.append([*prefix, name, f"{ms:.0f}", f"{1000 / ms:.2f}", f"{ms / base:.2f}x", verdict])
        entries[name] = {"ms_per_image": ms, "images_per_s": 1000 / ms, ratio_key: ms / base, "times_ms": values,
                         "check": check}
    return rows, entries


def run_quietly(run: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """``run(args)`` with warnings silenced (the exporters' and torchvision's notices would bury
    the tables)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(args)

