"""Soak test: ``predict`` over coco128 many times in one process (500 by default) must keep its
memory flat. Records the resident set size (``VmRSS``) after every pass and writes the curve as a
PNG and the numbers as JSON.

The model is a randomly initialised ResNet-18 RetinaNet at a small input size (the point is the
pipeline's memory: decoding, batching, post-processing, JSON writing), with a score threshold
that keeps detections coming; images are decoded by the predict code path itself
(``fpndet.engine.predict.predict_images``, no background workers, so that everything stays in
this process).

Run: ``python benchmarks/soak_predict.py [--passes 500] [--images DIR] [--out benchmarks/results/soak_predict.json]``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, write_json  # noqa: E402
from fpndet.engine.predict import collect_images, predict_images  # noqa: E402
from fpndet.modeling.build import build_model  # noqa: E402
from fpndet.modeling.config import named_config  # noqa: E402

IMAGE_DIRS = (Path("/work/shared/data/coco128/images"),
              Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128" / "images")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=500)
    parser.add_argument("--images", default=None, help="folder of images (default: coco128)")
    parser.add_argument("--warmup", type=int, default=10, help="passes before the flatness is judged")
    parser.add_argument("--tolerance-mb", type=float, default=50.0, help="allowed growth after the warm-up")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "soak_predict.json"))
    args = parser.parse_args(argv)
    folder = Path(args.images) if args.images else next((d for d in IMAGE_DIRS if d.is_dir()), None)
    if folder is None:
        raise SystemExit("coco128 not found: pass --images DIR")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = named_config("retinanet_r18_fpn_cpu", num_classes=80, min_size=[32], max_size=48, fpn_channels=16,
                          backbone_weights=None, score_thresh=0.011, retinanet={"head_channels": 16, "head_depth": 1})
    model = build_model(config).eval()
    jobs = collect_images([str(folder)])
    names = [str(i) for i in range(80)]
    curve, detections = [rss_mb()], 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for index in range(args.passes):
            summary = predict_images(model, names, jobs, Path(out), batch_size=8, draw=False, workers=0)
            detections += sum(len(r["detections"]) for r in summary.predicted)
            curve.append(rss_mb())
            if index % 50 == 0:
                print(f"pass {index}: RSS {curve[-1]:.0f} MB, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    after_warmup = curve[min(args.warmup, len(curve) - 1):]
    growth = after_warmup[-1] - after_warmup[0]
    flat = growth <= args.tolerance_mb
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(range(len(curve)), curve)
    axis.set_xlabel("passes over the images")
    axis.set_ylabel("resident memory (MB)")
    axis.set_title(f"predict x {args.passes} over {len(jobs)} images: {curve[0]:.0f} -> {curve[-1]:.0f} MB")
    axis.grid(alpha=0.3)
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    row = [args.passes, len(jobs), detections, f"{curve[0]:.0f}", f"{after_warmup[0]:.0f}", f"{curve[-1]:.0f}",
           f"{max(curve):.0f}", f"{growth:+.1f}", "yes" if flat else "NO", f"{seconds:.0f}"]
    table = format_table(["passes", "images", "detections", "RSS start MB", f"after {args.warmup} MB", "end MB",
                          "max MB", "growth after warm-up MB", "flat", "wall s"], [row])
    print("\n" + table)
    write_json(args.out, {"benchmark": "soak_predict", "settings": vars(args), "rss_mb": curve, "flat": flat,
                          "growth_after_warmup_mb": growth, "seconds": seconds, "table": table, "png": str(png)})
    print(f"wrote {args.out} and {png}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
