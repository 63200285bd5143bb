"""Tiled inference on large images with small objects: a real case for ``fpndet eval --tile``.

Builds a COCO dataset of large images by mosaicking ``--grid`` x ``--grid`` images of the
synthetic shapes data (its ``test`` split, never trained on; each 320 x 320 with shapes of 12 to
192 px) into one ``320*grid`` px image, so that a model trained on 320 px shapes images sees the
same objects 4x smaller when it runs on the whole 1280 px image (its pre-processing resizes the
short side to 320), but at their own scale on 320 px tiles. Then, with ``--weights``, runs
``fpndet eval`` on it without and with tiling and writes a table (AP, APs, APm, APl, AR100,
inference wall time) as Markdown and JSON. Each row's AP is also recomputed by pycocotools run
directly on the mosaic's ``instances_val.json`` and the ``detections.json`` the row wrote (the
``pycocotools_AP`` column of the JSON; the script stops if it differs from fpndet's AP).

    python benchmarks/tiled_shapes.py --out-data /tmp/shapes_mosaic --images 40 \\
        --weights /tmp/runs/shapes --device cpu

Each evaluation is a plain command (printed), e.g.
``fpndet eval --weights /tmp/runs/shapes --data /tmp/shapes_mosaic --tile 320 --device cpu``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from fpndet.data.detect import open_dataset  # noqa: E402

SETTINGS = {  # name -> extra fpndet eval options (None: the whole image at full size, below)
    "whole image (no tiling)": [],
    "--tile 320": ["--tile", "320"],
    "--tile 320 --tile-full-image": ["--tile", "320", "--tile-full-image"],
    "--tile 640": ["--tile", "640"],
    "whole image at full size (min_size = max_size = 1280)": None,
}


def build_mosaic_dataset(out: Path, *, images: int, grid: int, cell: int = 320, seed: int = 0) -> Path:
    """``out/images/<k>.png`` (``grid*cell`` px squares) and ``out/annotations/instances_val.json``;
    mosaic k holds shapes test images ``k*grid*grid ..`` row by row. Returns the JSON path."""
    shapes = open_dataset(f"shapes:{images * grid * grid}", split="test", image_size=(cell, cell), seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(shapes.class_names)]
    content = {"images": [], "annotations": [], "categories": categories}
    side = grid * cell
    for k in range(images):
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        for r in range(grid):
            for c in range(grid):
                image, record = shapes.load(k * grid * grid + r * grid + c)
                canvas[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = image.permute(1, 2, 0).numpy()
                for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
                    x1, x2, y1, y2 = x1 + c * cell, x2 + c * cell, y1 + r * cell, y2 + r * cell
                    content["annotations"].append({
                        "id": len(content["annotations"]) + 1, "image_id": k + 1, "category_id": label + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        Image.fromarray(canvas).save(out / "images" / f"{k}.png")
        content["images"].append({"id": k + 1, "file_name": f"{k}.png", "height": side, "width": side})
    path = out / "annotations" / "instances_val.json"
    path.write_text(json.dumps(content))
    return path


def pycocotools_ap(annotations: Path, detections: Path) -> float:
    """COCO AP of a results file against the original annotation file, by pycocotools alone (no
    fpndet code between the JSON files and ``COCOeval``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(json.loads(detections.read_text())), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def check_ap(metrics: dict, annotations: Path, detections: Path) -> float:
    """pycocotools' AP on the files (:func:`pycocotools_ap`); stops the script when fpndet's differs."""
    direct = pycocotools_ap(annotations, detections)
    if abs(direct - metrics["AP"]) > 1e-6:
        raise SystemExit(f"AP {metrics['AP']:.6f} from fpndet but {direct:.6f} from pycocotools on {detections}")
    return direct


def run_eval(arguments: list[str]) -> tuple[dict, float, str]:
    """``fpndet eval`` in this process: (metrics, inference seconds as it prints them, its output)."""
    from fpndet.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["eval", *arguments])
    text = buffer.getvalue()
    if code != 0:
        raise SystemExit(f"fpndet eval {' '.join(arguments)} failed ({code}):\n{text}")
    seconds = float(re.search(r"images in ([0-9.]+) s", text).group(1))
    output = arguments[arguments.index("--output") + 1]
    metrics = json.loads((Path(output) / "metrics.json").read_text())["metrics"]
    return metrics, seconds, text


def run_full_size(weights: str, data: Path, out: Path, *, size: int, device: str,
                  batch_size: int) -> tuple[dict, float]:
    """The other way to see small objects: the model on the whole image without shrinking it
    (its pre-processor's ``min_size`` and ``max_size`` raised to the image size; no CLI option
    does this); ``detections.json`` goes to ``out``. Returns (metrics, inference seconds)."""
    import torch

    from fpndet.engine.inference import evaluate_detections, run_inference
    from fpndet.engine.model_io import load_detector

    model, class_names = load_detector(weights, device=torch.device(device), named_only=True)
    model.preprocessor.min_size, model.preprocessor.max_size = [size], size
    dataset = open_dataset(str(data), split="val")
    start = time.perf_counter()
    detections, truths = run_inference(model, dataset, batch_size=batch_size, device=torch.device(device))
    seconds = time.perf_counter() - start
    report = evaluate_detections(dataset, detections, truths, out_dir=out, model_class_names=class_names,
                                 model_source=weights, diagnostics=False)
    return report["metrics"], seconds


def time_settings(weights: str, data: Path, names: list[str], *, size: int, device: str, batch_size: int,
                  images: int, rounds: int) -> dict[str, list[float]]:
    """Inference seconds per image of each setting on the first ``images`` images (decoded
    beforehand), the settings run in turn (one call each to warm up, then ``rounds`` rounds) so that
    all see the same background load. Returns each setting's per-round times."""
    import torch

    from fpndet.data.images import load_image
    from fpndet.engine.model_io import load_detector
    from fpndet.engine.tiling import TiledDetector

    device = torch.device(device)
    model, _ = load_detector(weights, device=device)
    full_size, _ = load_detector(weights, device=device)
    full_size.preprocessor.min_size, full_size.preprocessor.max_size = [size], size
    detectors = {}
    for name in names:
        options = SETTINGS[name]
        if options is None:
            detectors[name] = full_size
        elif "--tile" in options:
            detectors[name] = TiledDetector(model, int(options[options.index("--tile") + 1]), batch_size=batch_size,
                                            full_image="--tile-full-image" in options)
        else:
            detectors[name] = model
    files = sorted((data / "images").glob("*.png"), key=lambda p: int(p.stem))[:images]
    pixels = [load_image(f).to(device).float().div(255) for f in files]
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            detectors[name](pixels[:1])
        for _ in range(rounds):
            for name in names:
                start = time.perf_counter()
                for first in range(0, len(pixels), batch_size):
                    detectors[name](pixels[first:first + batch_size])
                times[name].append((time.perf_counter() - start) / len(pixels))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-data", default="/tmp/shapes_mosaic", help="where the dataset is written")
    parser.add_argument("--images", type=int, default=40, help="mosaic images (default 40)")
    parser.add_argument("--grid", type=int, default=4, help="shapes images per side (default 4: 1280 px)")
    parser.add_argument("--weights", default=None, help="a shapes model (run folder) to evaluate; none: build only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--settings", default=None, help="comma-separated subset of the setting names")
    parser.add_argument("--timing-images", type=int, default=4, help="images of the interleaved timing (default 4)")
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of the interleaved timing (default 3)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "tiled_shapes.json"), help="results JSON")
    args = parser.parse_args()

    data = Path(args.out_data)
    start = time.perf_counter()
    annotations = build_mosaic_dataset(data, images=args.images, grid=args.grid)
    content = json.loads(annotations.read_text())
    areas = np.array([a["area"] for a in content["annotations"]])
    medium = ((areas >= 32 ** 2) & (areas < 96 ** 2)).mean()
    print(f"built {annotations}: {len(content['images'])} images of {320 * args.grid} px, {len(areas)} objects "
          f"({(areas < 32 ** 2).mean():.0%} small, {medium:.0%} medium, {(areas >= 96 ** 2).mean():.0%} large) "
          f"in {time.perf_counter() - start:.0f} s")
    if not args.weights:
        return
    chosen = args.settings.split(",") if args.settings else list(SETTINGS)
    rows = []
    for name in chosen:
        if SETTINGS[name] is None:
            print(f"\n{name} (library: load_detector, preprocessor.min_size/max_size, run_inference)", flush=True)
            output = Path("/tmp/tiled_shapes_eval/full_size")
            metrics, seconds = run_full_size(args.weights, data, output, size=320 * args.grid, device=args.device,
                                             batch_size=args.batch_size)
            rows.append({"setting": name, "command": None, "seconds": seconds,
                         "ms_per_image": 1000 * seconds / len(content["images"]), "metrics": metrics,
                         "pycocotools_AP": check_ap(metrics, annotations, output / "detections.json")})
            print(f"AP {metrics['AP']:.3f}  APs {metrics['APs']:.3f}  {seconds:.1f} s", flush=True)
            continue
        arguments = ["--weights", args.weights, "--data", str(data), "--device", args.device,
                     "--batch-size", str(args.batch_size), "--no-diagnostics", *SETTINGS[name],
                     "--output", f"/tmp/tiled_shapes_eval/{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}"]
        command = "fpndet eval " + " ".join(shlex.quote(a) for a in arguments if a)
        print(f"\n$ {command}", flush=True)
        metrics, seconds, _ = run_eval(arguments)
        rows.append({"setting": name, "command": command, "seconds": seconds,
                     "ms_per_image": 1000 * seconds / len(content["images"]), "metrics": metrics,
                     "pycocotools_AP": check_ap(metrics, annotations, Path(arguments[-1]) / "detections.json")})
        print(f"AP {metrics['AP']:.3f}  APs {metrics['APs']:.3f}  APm {metrics['APm']:.3f}  APl {metrics['APl']:.3f}  "
              f"AR100 {metrics['AR100']:.3f}  {seconds:.1f} s", flush=True)
    print(f"\ntiming: {args.timing_images} images, {args.timing_rounds} rounds, the settings in turn", flush=True)
    times = time_settings(args.weights, data, chosen, size=320 * args.grid, device=args.device,
                          batch_size=args.batch_size, images=args.timing_images, rounds=args.timing_rounds)
    table = ["| setting | AP | AP50 | APs | APm | APl | AR100 | eval wall s | ms/image (interleaved, median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["metrics"]
        row["timing_s_per_image"] = times[row["setting"]]
        median = sorted(times[row["setting"]])[len(times[row["setting"]]) // 2]
        row["timing_ms_per_image_median"] = 1000 * median
        table.append(f"| {row['setting']} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['APs']:.3f} | {m['APm']:.3f} | "
                     f"{m['APl']:.3f} | {m['AR100']:.3f} | {row['seconds']:.0f} | {1000 * median:.0f} |")
    print("\n" + "\n".join(table))
    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "dataset": {"images": len(content["images"]), "size": 320 * args.grid, "objects": len(areas),
                    "small_fraction": float((areas < 32 ** 2).mean())},
        "weights": args.weights, "device": args.device, "torch_threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d"), "rows": rows, "table": table}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
