"""Training-loss computation: torchvision's ``RetinaNet.compute_loss`` (per image: ``box_iou`` +
``Matcher``, then per-image focal and L1 losses) versus fpndet's batched ``RetinaNetCriterion``
(ground truth padded to ``[B, G]``, chunked IoU matching of the whole batch, one loss pass).

Both get the same head outputs (random logits and deltas for 800x1333 inputs: 201,600 anchors,
91 logits) and the same random targets (``--boxes`` ground-truth boxes per image); fpndet is set
up exactly as ``from_torchvision`` sets it (L1 box loss, per-image normalisation, low-quality
matches), so the two losses must agree. Timed: matching alone, and matching + losses (forward;
``--backward`` adds the backward pass to the head outputs).

A memory probe compares the peak extra memory of matching 500 boxes to the 201,600 anchors of
one image: torchvision materialises the full IoU matrix (and ``[G, A, 2]`` intermediates),
fpndet's ``AnchorMatcher`` works in chunks of at most 2^24 IoU values. On CUDA it reads
``torch.cuda.max_memory_allocated``; on CPU each probe runs in a fresh process and reads the
peak resident set size (``VmHWM`` after resetting it).

Run: ``python benchmarks/bench_matching.py [--device cuda] [--quick] [--backward]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torchvision.models.detection import retinanet_resnet50_fpn  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from common import (  # noqa: E402
    RESIZED_SIZE, apply_threads, base_parser, format_table, fpndet_anchors, report, resolve_device, summary,
    synchronize, synthetic_targets, time_interleaved,
)
from fpndet.modeling.build import build_model  # noqa: E402
from fpndet.modeling.config import retinanet_r50_fpn_tv  # noqa: E402
from fpndet.modeling.criterion import pad_targets  # noqa: E402

NAME = "bench_matching"
NUM_CLASSES = 91
PROBE_GT = 500


def head_outputs(batch: int, num_anchors: int, device: torch.device, seed: int, requires_grad: bool):
    """Random logits ``[B, A, 91]`` ~ N(-4.6, 1) (prior 0.01) and deltas ``[B, A, 4]`` ~ N(0, 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, num_anchors, NUM_CLASSES, generator=gen) - 4.6).to(device)
    deltas = (torch.randn(batch, num_anchors, 4, generator=gen) * 0.3).to(device)
    return logits.requires_grad_(requires_grad), deltas.requires_grad_(requires_grad)


def torchvision_matching(model, anchors_per_image, targets):
    """torchvision's matching step of ``compute_loss`` (one IoU matrix per image)."""
    return [model.proposal_matcher(box_iou(t["boxes"], a)) for a, t in zip(anchors_per_image, targets)]


def fpndet_matching(criterion, anchors, targets):
    gt = pad_targets(targets, anchors.device)
    return criterion.matcher(anchors, gt["boxes"], gt["valid"], gt["crowd"])


def backward_of(losses: dict) -> None:
    sum(losses.values()).backward()


def compare_losses(tv_losses: dict, our_losses: dict) -> dict:
    pairs = {"cls": (tv_losses["classification"], our_losses["loss_cls"]),
             "box": (tv_losses["bbox_regression"], our_losses["loss_box"])}
    return {
        name: {"torchvision": float(a), "fpndet": float(b),
               "rel_diff": abs(float(a) - float(b)) / max(abs(float(a)), 1e-12)}
        for name, (a, b) in pairs.items()
    }


# ----------------------------------------------------------------------------------------------
# memory probe
# ----------------------------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def probe_matching(impl: str, num_gt: int, device: torch.device, image_size: tuple[int, int]) -> dict:
    """Peak extra memory (MiB) and time of matching ``num_gt`` boxes to one image's anchors."""
    import time

    anchors, _ = fpndet_anchors(image_size, device)
    targets = synthetic_targets(batch=1, boxes_per_image=num_gt, num_classes=NUM_CLASSES,
                                image_size=image_size, device=device, seed=0)
    if impl == "torchvision":
        model = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        run = lambda: torchvision_matching(model, [anchors], targets)  # noqa: E731
    else:
        criterion = build_model(retinanet_r50_fpn_tv(NUM_CLASSES)).criterion
        run = lambda: fpndet_matching(criterion, anchors, targets)  # noqa: E731
    with torch.no_grad():
        if device.type == "cuda":
            run()  # warm-up (kernels, allocator)
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds = time.perf_counter() - start
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
                handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
            base = _rss_kb("VmRSS")
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            peak = (_rss_kb("VmHWM") - base) / 1024
    return {"impl": impl, "boxes": num_gt, "anchors": anchors.shape[0], "peak_extra_mib": peak,
            "ms": seconds * 1000, "method": "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS"}


def memory_probes(device: torch.device, num_gt: int, image_size: tuple[int, int]) -> list[dict]:
    """Run each probe in a fresh process on CPU (clean peak RSS), in process on CUDA."""
    results = []
    for impl in ("torchvision", "fpndet"):
        if device.type == "cuda":
            results.append(probe_matching(impl, num_gt, device, image_size))
            torch.cuda.empty_cache()
            continue
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", impl, "--probe-gt", str(num_gt), "--device", "cpu",
             "--image-size", str(image_size[0]), str(image_size[1]), "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"memory probe {impl} failed:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------------------------------
# main benchmark
# ----------------------------------------------------------------------------------------------
def run(args) -> None:
    device = resolve_device(args.device)
    apply_threads(args, device)
    # quick: smaller anchor set (384x640 input, ~46k anchors) so the smoke test stays under a minute
    image_size = tuple(args.image_size or ((384, 640) if args.quick else RESIZED_SIZE))
    if args.memory_probe:
        print(json.dumps(probe_matching(args.memory_probe, args.probe_gt, device, image_size)))
        return
    on_gpu = device.type == "cuda"
    batches = args.batches or ([2] if args.quick else [2, 8])
    box_counts = args.boxes or [20, 100]
    repeats = args.repeats or (2 if args.quick else (20 if on_gpu else 3))
    # the agreement check runs every function once before timing: extra warm-up is optional
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu and not args.quick else 0)

    tv_model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device)
    criterion = build_model(retinanet_r50_fpn_tv(NUM_CLASSES)).criterion
    anchors, _ = fpndet_anchors(image_size, device)

    rows, results = [], []
    for batch in batches:
        logits, deltas = head_outputs(batch, anchors.shape[0], device, args.seed, requires_grad=args.backward)
        tv_heads = {"cls_logits": logits, "bbox_regression": deltas}
        tv_anchors = [anchors] * batch
        for boxes in box_counts:
            targets = synthetic_targets(batch=batch, boxes_per_image=boxes, num_classes=NUM_CLASSES,
                                        image_size=image_size, device=device, seed=args.seed)
            tasks = {
                "matching": {
                    "torchvision": lambda: torchvision_matching(tv_model, tv_anchors, targets),
                    "fpndet": lambda: fpndet_matching(criterion, anchors, targets),
                },
                "matching + losses": {
                    "torchvision": lambda: tv_model.compute_loss(targets, tv_heads, tv_anchors),
                    "fpndet": lambda: criterion(logits, deltas, anchors, targets),
                },
            }
            if args.backward:
                tasks["matching + losses + backward"] = {
                    "torchvision": lambda: backward_of(tv_model.compute_loss(targets, tv_heads, tv_anchors)),
                    "fpndet": lambda: backward_of(criterion(logits, deltas, anchors, targets)),
                }
            with torch.no_grad():
                agreement = compare_losses(tv_model.compute_loss(targets, tv_heads, tv_anchors),
                                           criterion(logits, deltas, anchors, targets))
                same_matches = all(
                    torch.equal(a, b) for a, b in zip(
                        torchvision_matching(tv_model, tv_anchors, targets),
                        fpndet_matching(criterion, anchors, targets),
                    )
                )
            for task, fns in tasks.items():
                grad = torch.enable_grad() if "backward" in task else torch.no_grad()
                peak = {}
                with grad:
                    for impl, fn in fns.items():  # peak memory of one call each (CUDA only)
                        if on_gpu:
                            torch.cuda.reset_peak_memory_stats(device)
                            base = torch.cuda.memory_allocated(device)
                            fn()
                            peak[impl] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    times = time_interleaved(fns, device=device, repeats=repeats, warmup=warmup)
                tv_t, our_t = summary(times["torchvision"]), summary(times["fpndet"])
                ratio = tv_t["median_ms"] / our_t["median_ms"]
                ratio_min = tv_t["min_ms"] / our_t["min_ms"]
                rows.append([
                    device.type, batch, boxes, task, tv_t["median_ms"], our_t["median_ms"], f"{ratio:.2f}x",
                    f"{ratio_min:.2f}x", "yes" if same_matches else "NO",
                    f"{max(v['rel_diff'] for v in agreement.values()):.1e}",
                ])
                results.append({"device": device.type, "batch": batch, "boxes_per_image": boxes, "task": task,
                                "torchvision": tv_t, "fpndet": our_t, "ratio_torchvision_over_fpndet": ratio,
                                "ratio_of_minima": ratio_min, "same_matches": same_matches,
                                "losses": agreement, "peak_extra_memory_mib": peak or None})
                print(f"batch {batch} boxes {boxes} {task}: torchvision {tv_t['median_ms']:.1f} ms, "
                      f"fpndet {our_t['median_ms']:.1f} ms ({ratio:.2f}x)", flush=True)
        del logits, deltas, tv_heads

    probes = [] if args.no_memory_probe else memory_probes(device, args.probe_gt, image_size)
    title = (f"Matching and losses, {image_size[0]}x{image_size[1]} ({anchors.shape[0]} anchors, {NUM_CLASSES} "
             f"logits), median of {repeats} (ms per batch)")
    tables = {
        title: format_table(["device", "batch", "gt/img", "task", "torchvision ms", "fpndet ms", "tv/fpndet",
                             "(of mins)", "same matches", "loss rel. diff"], rows),
    }
    if probes:
        tables[f"Peak extra memory, matching {args.probe_gt} boxes x {probes[0]['anchors']} anchors (one image)"] = (
            format_table(["device", "impl", "peak extra MiB", "ms", "measured by"],
                         [[device.type, p["impl"], p["peak_extra_mib"], p["ms"], p["method"]] for p in probes])
        )
    report(NAME, args, device, tables, {"anchors": anchors.shape[0], "rows": results, "memory_probes": probes})


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 2 8; quick: 2)")
    parser.add_argument("--boxes", type=int, nargs="+", default=None, help="gt boxes per image (default 20 100)")
    parser.add_argument("--backward", action="store_true", help="also time losses + backward")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="resized image (h, w) whose anchors are used (default 800 1333; quick: 384 640)")
    parser.add_argument("--probe-gt", type=int, default=PROBE_GT, help="boxes of the memory probe")
    parser.add_argument("--no-memory-probe", action="store_true")
    parser.add_argument("--memory-probe", choices=["torchvision", "fpndet"], default=None, help=argparse.SUPPRESS)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
