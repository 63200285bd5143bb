"""CPU inference backends side by side: torchvision's ``retinanet_resnet50_fpn`` (eager) versus
fpndet's conversion of the same weights on every fpndet backend (eager, fast = BatchNorm folded +
channels_last, winograd = fast with Winograd F(4x4, 3x3) convolutions, onnxruntime and OpenVINO on
the ONNX export, OpenVINO bf16; torch.compile with
``--compile``), on the same coco128 photos, in one process.

Answers first: each backend's detections are compared with torchvision's before anything is
timed: "same detections" when every image has as many, each matched one to one to a torchvision
detection of the same label with every box coordinate within 0.5 px and the score within 1e-4
(so tied scores listed in another order still count as equal); then all run interleaved (a, b, c, a, b, c,
...) so they share the machine's background load. Weights are random with the classification
bias calibrated as in bench_inference.py (about 2000 scores per image pass 0.05, like a trained
COCO model). The ONNX export's own wall time is reported too.

Run: ``python benchmarks/bench_backends.py`` (800x1333, batches 1 and 4; about 15 min on 2 cores)
or ``--quick`` (320 px, batch 1, 3 repeats).
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

NAME = "bench_backends"


def build_backends(ours, args, onnx_path: Path) -> tuple[dict, dict]:
    """name -> callable(images) for every backend asked for and installed; and the export's facts."""
    from fpndet.deploy.tuning import tune_for_cpu
    from fpndet.deploy.winograd import use_winograd

    winograd = tune_for_cpu(ours)
    use_winograd(winograd)
    runners = {"fpndet eager": ours, "fpndet fast": tune_for_cpu(ours), "fpndet winograd": winograd}
    facts = {}
    if args.compile:
        compiled = tune_for_cpu(ours)
        for name in ("backbone", "fpn", "head"):
            setattr(compiled, name, torch.compile(getattr(compiled, name), dynamic=False))
        runners["fpndet fast+compile"] = compiled
    onnx_backends = [b for b in ("onnxruntime", "openvino", "openvino-bf16") if installed(b)]
    if onnx_backends and installed("onnx"):
        from fpndet.deploy.export import export_onnx
        from fpndet.deploy.runtime import OnnxDetector

        start = time.perf_counter()
        export_onnx(ours, onnx_path, class_names=[str(i) for i in range(ours.config.num_classes)])
        facts["export_s"] = time.perf_counter() - start
        facts["onnx_mib"] = onnx_path.stat().st_size / 2**20
        for backend in onnx_backends:
            runners[f"fpndet {backend}"] = OnnxDetector(onnx_path, backend=backend)
    return runners, facts


def run(args) -> None:
    device = resolve_device("cpu")
    apply_threads(args, device)
    min_size, max_size = (320, 533) if args.quick else (args.size, round(args.size * 1333 / 800))
    batches = [1] if args.quick else args.batches
    repeats = args.repeats or (3 if args.quick else 5)
    images, source = load_images(max(batches), args.seed)
    tv_model, ours, shift = build_models(device, min_size, max_size, images, args.candidates)
    with tempfile.TemporaryDirectory() as tmp:
        runners, facts = build_backends(ours, args, Path(tmp) / "retinanet.onnx")
        rows, results = [], {"export": facts, "images": source, "class_bias_shift": shift, "batches": {}}
        for batch in batches:
            chunk = images[:batch]
            with torch.inference_mode():
                reference = tv_model(chunk)
                checks = {name: compare_detections(reference, runner(chunk)) for name, runner in runners.items()}
                fns = {"torchvision eager": lambda: tv_model(chunk)}
                fns.update({name: (lambda r=runner: r(chunk)) for name, runner in runners.items()})
                times = time_interleaved(fns, device=device, repeats=repeats, warmup=1)
            batch_rows, per_backend = backend_rows(times, checks, batch=batch, reference="torchvision eager",
                                                   ratio_key="vs_torchvision", prefix=[f"{min_size}x{max_size}", batch])
            rows += batch_rows
            results["batches"][str(batch)] = per_backend
    table = format_table(["size", "batch", "backend", "ms/image", "images/s", "vs torchvision", "answers vs torchvision"],
                         rows)
    export_line = (f"ONNX export: {facts['export_s']:.0f} s, {facts['onnx_mib']:.0f} MiB" if facts else "no ONNX runtime")
    report(NAME, args, device, {f"RetinaNet R50-FPN inference backends, CPU ({export_line})": table}, results)


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800, help="short side (long side 1333/800 of it)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--candidates", type=int, default=2000, help="scores per image above 0.05 after calibration")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    run_quietly(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
