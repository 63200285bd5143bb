"""The CPU-sized raccoon model (EfficientNet-Lite0 RetinaNet, 448 px) on every CPU backend:
images per second on raccoon validation photos, detections checked against eager PyTorch first.

Backends: fpndet eager, fast (BatchNorm folded + channels_last), and the ONNX export of a fixed
input size (``fpndet export --input-size max``: 608x608 for this model; the dynamic-size export of
this backbone takes many minutes) on onnxruntime and OpenVINO. The fixed-size graph pads every
batch to 608x608 where eager pads to the batch's own size (a multiple of 32), so detections near
the padded border may differ slightly: the table says how many are unmatched (boxes within
0.5 px, scores within 1e-4, same label). All backends run interleaved (a, b, c, a, b, c, ...).

Run: ``python benchmarks/bench_raccoon_cpu.py --weights runs/raccoon`` (a run folder trained with
the ``raccoon`` config), ``--batches 1 8``, ``--dynamic-export runs/raccoon/model.onnx`` to time a
dynamic-size export as well.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    apply_threads, backend_rows, base_parser, compare_detections, format_table, report, resolve_device,
    run_quietly, time_interleaved,
)
from fpndet.data.images import load_image  # noqa: E402
from fpndet.deploy.backends import installed  # noqa: E402

NAME = "bench_raccoon_cpu"
RACCOON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon"


def val_images(folder: Path, count: int) -> list[torch.Tensor]:
    names = (folder / "ImageSets" / "Main" / "val.txt").read_text().split()[:count]
    return [load_image(folder / "JPEGImages" / f"{name}.jpg").float().div(255) for name in names]


def build_backends(weights: str, onnx_path: Path, dynamic_export: str | None) -> tuple[dict, dict]:
    """name -> callable(images); the fixed-size export's wall time and size. ``dynamic_export``: an
    existing dynamic-size export of the same weights (``fpndet export``), run too."""
    from fpndet.deploy.tuning import tune_for_cpu
    from fpndet.engine.model_io import load_detector

    model, names = load_detector(weights)
    runners = {"eager": model, "fast": tune_for_cpu(load_detector(weights)[0])}
    facts = {}
    onnx_backends = [b for b in ("onnxruntime", "openvino") if installed(b)]
    if onnx_backends and installed("onnx"):
        from fpndet.deploy.export import export_onnx
        from fpndet.deploy.runtime import OnnxDetector

        start = time.perf_counter()
        export_onnx(model, onnx_path, class_names=names or ["0"], input_size="max")
        facts = {"export_s": time.perf_counter() - start, "onnx_mib": onnx_path.stat().st_size / 2**20}
        for backend in onnx_backends:
            runners[f"{backend} (fixed 608x608)"] = OnnxDetector(onnx_path, backend=backend)
            if dynamic_export:
                runners[f"{backend} (dynamic)"] = OnnxDetector(dynamic_export, backend=backend)
    return runners, facts


def run(args) -> None:
    device = resolve_device("cpu")
    apply_threads(args, device)
    images = val_images(Path(args.data), max(args.batches))
    repeats = args.repeats or 5
    with tempfile.TemporaryDirectory() as tmp:
        runners, facts = build_backends(args.weights, Path(tmp) / "raccoon.onnx", args.dynamic_export)
        rows, results = [], {"export": facts, "weights": args.weights, "batches": {}}
        for batch in args.batches:
            chunk = images[:batch]
            with torch.inference_mode():
                reference = runners["eager"](chunk)
                checks = {name: compare_detections(reference, runner(chunk)) for name, runner in runners.items()
                          if name != "eager"}
                fns = {name: (lambda r=runner: r(chunk)) for name, runner in runners.items()}
                times = time_interleaved(fns, device=device, repeats=repeats, warmup=1)
            batch_rows, per_backend = backend_rows(times, checks, batch=batch, reference="eager", ratio_key="vs_eager",
                                                   prefix=[batch])
            rows += batch_rows
            results["batches"][str(batch)] = per_backend
    table = format_table(["batch", "backend", "ms/image", "images/s", "vs eager", "detections vs eager"], rows)
    export_line = (f"fixed-size ONNX export: {facts['export_s']:.0f} s, {facts['onnx_mib']:.0f} MiB" if facts
                   else "no ONNX runtime")
    report(NAME, args, device, {f"raccoon CPU model, 448 px, raccoon val photos ({export_line})": table}, results)


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="run folder of a raccoon-config model")
    parser.add_argument("--data", default=str(RACCOON), help="raccoon dataset folder (VOC layout)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dynamic-export", default=None,
                        help="a dynamic-size export of the same weights (`fpndet export`; ~20 min for this backbone) to time too")
    run_quietly(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
