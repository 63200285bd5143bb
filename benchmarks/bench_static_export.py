"""Batch-1 CPU inference with a fixed-size ONNX export: torchvision's ``retinanet_resnet50_fpn``
eager versus fpndet's export of the same weights with ``input_size`` equal to the padded size of
the image (``fpndet export --input-size HxW``): the graph then pads exactly as eager does, so the
detections must be torchvision's, and the runtimes compile for one static shape.

Run: ``python benchmarks/bench_static_export.py`` (800 px, the first coco128 photo, batch 1).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_inference import build_models, load_images  # noqa: E402
from common import (  # noqa: E402
    apply_threads, backend_rows, base_parser, compare_detections, format_table, report, resolve_device,
    run_quietly, time_interleaved,
)
from fpndet.deploy.backends import installed  # noqa: E402

NAME = "bench_static_export"


def run(args) -> None:
    from fpndet.deploy.export import export_onnx
    from fpndet.deploy.graph import pad_batch
    from fpndet.deploy.runtime import OnnxDetector

    device = resolve_device("cpu")
    apply_threads(args, device)
    max_size = round(args.size * 1333 / 800)
    images, source = load_images(1, args.seed)
    tv_model, ours, _ = build_models(device, args.size, max_size, images, args.candidates)
    canvas = tuple(pad_batch(images, min_size=args.size, max_size=max_size)[0].shape[-2:])
    runners, facts = {}, {"canvas": list(canvas)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, size in (("dynamic", None), (f"fixed {canvas[0]}x{canvas[1]}", canvas)):
            path = Path(tmp) / f"{kind.split()[0]}.onnx"
            start = time.perf_counter()
            export_onnx(ours, path, class_names=[str(i) for i in range(ours.config.num_classes)], input_size=size)
            facts[f"export_s_{kind.split()[0]}"] = time.perf_counter() - start
            for backend in ("onnxruntime", "openvino"):
                if installed(backend):
                    runners[f"fpndet {backend} ({kind})"] = OnnxDetector(path, backend=backend)
        with torch.inference_mode():
            reference = tv_model(images)
            checks = {name: compare_detections(reference, runner(images)) for name, runner in runners.items()}
            fns = {"torchvision eager": lambda: tv_model(images)}
            fns.update({name: (lambda r=runner: r(images)) for name, runner in runners.items()})
            times = time_interleaved(fns, device=device, repeats=args.repeats or 3, warmup=1)
    rows, entries = backend_rows(times, checks, batch=1, reference="torchvision eager", ratio_key="vs_torchvision",
                                 prefix=[f"{canvas[0]}x{canvas[1]}"])
    table = format_table(["padded size", "backend", "ms/image", "images/s", "vs torchvision", "answers vs torchvision"],
                         rows)
    report(NAME, args, device, {f"RetinaNet R50-FPN, batch 1, static vs dynamic ONNX ({source})": table},
           {"export": facts, "images": source, "backends": entries})


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800, help="short side (long side 1333/800 of it)")
    parser.add_argument("--candidates", type=int, default=2000, help="scores per image above 0.05 after calibration")
    run_quietly(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
