"""How fast can RetinaNet R50-FPN run on this CPU in float32? The network's FLOPs (counted by
``torch.utils.flop_counter`` on torchvision's model, 800x1333, batch 1) divided by the best
float32 rate this CPU reaches on the network's own dominant operation (a 3x3 convolution of 256
channels on the P3 grid) and on a large matrix product: a floor on the time per image of any
float32 path that computes the same network, set against torchvision's and fpndet's measured
times in the same run.

The float32 route to fewer FLOPs with the same answers, a Winograd convolution (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016: F(4x4, 3x3) needs 4x fewer
multiplications than a direct 3x3 convolution; ``fpndet.deploy.winograd``, ``--backend
winograd``), is timed on the same P3 convolution, its tile transforms compiled and as plain
PyTorch operations, and the winograd backend on the whole network.

Run: ``python benchmarks/bench_cpu_roofline.py`` (the first coco128 photo, batch 1, CPU).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench_inference import build_models, load_images  # noqa: E402
from common import (  # noqa: E402
    apply_threads, base_parser, format_table, report, resolve_device, run_quietly, summary, time_interleaved,
)
from fpndet.deploy.backends import installed  # noqa: E402

NAME = "bench_cpu_roofline"


def count_flops(model: nn.Module, images) -> int:
    """Floating-point operations of one forward (a multiply-add counts 2)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def compile_openvino(module: nn.Module, example: torch.Tensor):
    """``module`` exported to ONNX and compiled by OpenVINO for the CPU in float32; returns a call
    on a numpy array."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.onnx"
        torch.onnx.export(module, (example,), str(path), dynamo=False)
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda array: request.infer({0: array})


def kernel_rates(device: torch.device, grid: tuple[int, int], repeats: int) -> tuple[list[dict], list[dict]]:
    """GFLOP/s of the network's largest kernels at their real shapes, best memory format first,
    and the stages of a Winograd F(4x4, 3x3) version of the P3 convolution (``winograd_rows``)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1).eval().to(device)
    features = torch.randn(1, 256, *grid, device=device)
    features_last = features.contiguous(memory_format=torch.channels_last)
    conv_flops = 2 * 256 * 256 * 9 * grid[0] * grid[1]
    size = 2048
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    cases = {
        f"conv3x3 256->256 on P3 {grid[0]}x{grid[1]} (channels_last)":
            (lambda: conv(features_last), conv_flops, conv, True),
        f"conv3x3 256->256 on P3 {grid[0]}x{grid[1]} (contiguous)": (lambda: conv(features), conv_flops, None, False),
        f"matmul {size}x{size} fp32": (lambda: a @ b, 2 * size ** 3, None, False),
    }
    openvino_conv = compile_openvino(conv, features) if installed("openvino") else None
    if openvino_conv is not None:
        array = features.numpy()
        cases[f"conv3x3 256->256 on P3 {grid[0]}x{grid[1]} (OpenVINO f32)"] = (
            lambda: openvino_conv(array), conv_flops, None, False)
    rows, winograd = [], []
    for name, (fn, flops, module, channels_last) in cases.items():
        if module is not None and channels_last:
            module.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            times = time_interleaved({name: fn}, device=device, repeats=repeats, warmup=2)[name]
        ms = summary(times)["median_ms"]
        if module is not None:
            winograd = winograd_rows(module, features_last, ms, flops, device, repeats)
            module.to(memory_format=torch.contiguous_format)
        rows.append({"kernel": name, "gflop": flops / 1e9, "ms": ms, "gflop_per_s": flops / ms / 1e6})
    return rows, winograd


def winograd_rows(conv: nn.Conv2d, features_last: torch.Tensor, direct_ms: float, conv_flops: int,
                  device: torch.device, repeats: int) -> list[dict]:
    """Median ms of ``conv`` computed by Winograd F(4x4, 3x3) (:mod:`fpndet.deploy.winograd`) with
    its tile transforms compiled and as plain PyTorch operations, against the direct convolution's
    time; the largest error relative to the direct convolution's largest output."""
    from fpndet.deploy.winograd import WinogradConv2d

    rows = []
    with torch.inference_mode():
        direct = conv(features_last)
        for name, compiled in (("Winograd F(4x4, 3x3), transforms compiled", True),
                               ("Winograd F(4x4, 3x3), transforms as PyTorch ops", False)):
            winograd = WinogradConv2d(conv, compiled=compiled)
            error = float((winograd(features_last) - direct).abs().max() / direct.abs().max())
            winograd(features_last)  # compiled code settles on the second call
            ms = summary(time_interleaved({name: lambda: winograd(features_last)}, device=device, repeats=repeats,
                                          warmup=1)[name])["median_ms"]
            multiply_flops = 2 * winograd.filters.numel() * features_last.shape[0] * \
                -(-features_last.shape[-2] // 4) * -(-features_last.shape[-1] // 4)
            rows.append({"method": name, "ms": ms, "vs_direct": ms / direct_ms, "relative_error": error,
                         "multiply_gflop": multiply_flops / 1e9})
    rows.append({"method": "direct convolution", "ms": direct_ms, "vs_direct": 1.0, "multiply_gflop": conv_flops / 1e9})
    return rows


def run(args) -> None:
    from fpndet.deploy.graph import pad_batch

    device = resolve_device("cpu")
    apply_threads(args, device)
    images, source = load_images(1, args.seed)
    max_size = round(args.size * 1333 / 800)
    tv_model, ours, _ = build_models(device, args.size, max_size, images, args.candidates)
    flops = count_flops(tv_model, images)
    canvas = tuple(pad_batch(images, min_size=args.size, max_size=max_size)[0].shape[-2:])
    grid = (canvas[0] // 8, canvas[1] // 8)
    kernels, winograd = kernel_rates(device, grid, args.repeats or 5)
    best_rate = max(k["gflop_per_s"] for k in kernels)

    from fpndet.deploy.tuning import tune_for_cpu
    from fpndet.deploy.winograd import use_winograd

    winograd_model = tune_for_cpu(ours)
    use_winograd(winograd_model)
    with torch.inference_mode():
        winograd_model(images), winograd_model(images)  # compile the transforms before timing
    runners = {"torchvision eager": lambda: tv_model(images), "fpndet eager": lambda: ours(images),
               "fpndet winograd": lambda: winograd_model(images)}
    with tempfile.TemporaryDirectory() as tmp:
        if installed("openvino") or installed("onnxruntime"):
            from fpndet.deploy.export import export_onnx
            from fpndet.deploy.runtime import OnnxDetector

            path = Path(tmp) / "retinanet.onnx"
            export_onnx(ours, path, class_names=[str(i) for i in range(ours.config.num_classes)])
            for backend in ("onnxruntime", "openvino"):
                if installed(backend):
                    runners[f"fpndet {backend}"] = (lambda r=OnnxDetector(path, backend=backend): r(images))
        with torch.inference_mode():
            times = time_interleaved(runners, device=device, repeats=args.repeats or 3, warmup=1)
    floor_ms = flops / best_rate / 1e6
    tv_ms = summary(times["torchvision eager"])["median_ms"]
    kernel_rows = [[k["kernel"], f"{k['gflop']:.2f}", f"{k['ms']:.1f}", f"{k['gflop_per_s']:.0f}"] for k in kernels]
    model_rows = [["float32 floor (network FLOPs / best kernel rate)", f"{floor_ms:.0f}", f"{floor_ms / tv_ms:.2f}x",
                   f"{best_rate:.0f}"]]
    entries = {}
    for name, values in times.items():
        ms = summary(values)["median_ms"]
        model_rows.append([name, f"{ms:.0f}", f"{ms / tv_ms:.2f}x", f"{flops / ms / 1e6:.0f}"])
        entries[name] = {"ms": ms, "vs_torchvision": ms / tv_ms, "gflop_per_s": flops / ms / 1e6, "times_ms": values}
    goal_ms = 0.5 * tv_ms
    model_rows.append(["goal of issue 9 (0.5x torchvision)", f"{goal_ms:.0f}", "0.50x", f"{flops / goal_ms / 1e6:.0f}"])
    winograd_table = [[w["method"], f"{w['ms']:.1f}", f"{w['vs_direct']:.2f}x", f"{w['multiply_gflop']:.2f}",
                       f"{w['relative_error']:.1e}" if "relative_error" in w else ""] for w in winograd]
    tables = {
        "float32 kernel rates on this CPU": format_table(["kernel", "GFLOP", "ms", "GFLOP/s"], kernel_rows),
        f"Winograd F(4x4, 3x3), conv3x3 256->256 on P3 {grid[0]}x{grid[1]}": format_table(
            ["method", "ms", "vs direct", "multiply GFLOP", "max error / max |output|"], winograd_table),
        f"RetinaNet R50-FPN, batch 1, {flops / 1e9:.0f} GFLOP per image ({source})":
            format_table(["path", "ms/image", "vs torchvision", "GFLOP/s"], model_rows),
    }
    report(NAME, args, device, tables, {"network_gflop": flops / 1e9, "padded": list(canvas), "kernels": kernels,
                                        "winograd_p3": winograd,
                                        "floor_ms": floor_ms, "paths": entries, "goal_ms": goal_ms})


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800, help="short side (long side 1333/800 of it)")
    parser.add_argument("--candidates", type=int, default=2000, help="scores per image above 0.05 after calibration")
    run_quietly(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
