"""Faster R-CNN R50-FPN, torchvision ``fasterrcnn_resnet50_fpn`` versus fpndet's
``from_torchvision`` conversion of the same weights: eval-mode inference and a training step
(forward, backward, SGD step), on the same images and targets, answers checked before timing.

Weights are random (no download), BatchNorm frozen as torchvision builds the model with weights,
and the classification bias is drawn once (background -2, classes N(0, 2²)) so that every RoI
has a few classes above the 0.05 threshold, as with a trained COCO model: the post-processing
(per-class boxes, score filter, class-wise NMS, top 100) then works as hard as in real use.

Inputs: coco128 photos resized to exactly ``--min-size`` x ``--max-size`` (800x1333 by default;
the models' own resize is then the identity), or random images when coco128 is absent.

Checks before timing:

- inference: same detections per image (counts, labels with fpndet's label = torchvision's - 1,
  largest |Δscore| and |Δbox|);
- training: the four losses with both samplers taking every candidate (RPN: all positive and
  negative anchors; RoI heads: all proposals + ground truth), which makes the sampled sets equal
  without replaying random draws; the timed steps then use the normal 256 / 512 sampling.

With ``--onnx`` (CPU) fpndet's model is also exported (``fpndet.deploy.export``, dynamic size) and
run on onnxruntime and OpenVINO in the same interleaved inference timing, each checked against
torchvision first (one-to-one matching: same label, box within 0.5 px, score within 1e-4).

Run: ``python benchmarks/bench_faster_rcnn.py [--device cuda] [--quick] [--onnx]``. CPU defaults:
800x1333, inference batches 1 and 8, training batch 2, 3 runs after 1 warm-up (--quick: 320x533,
batches 1 and 2, training batch 1, 2 runs). CUDA: batches 1 and 8, training batch 8, 20 runs.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.detection import fasterrcnn_resnet50_fpn  # noqa: E402

from bench_inference import freeze_batch_norms, load_images  # noqa: E402
from common import (  # noqa: E402
    apply_threads, base_parser, compare_detections, format_table, matched_sets, report, resolve_device, summary,
    synthetic_targets, time_interleaved,
)
from fpndet.modeling.torchvision_compat import from_torchvision  # noqa: E402

NAME = "bench_faster_rcnn"
LOSS_NAMES = {  # torchvision's loss name -> fpndet's
    "loss_objectness": "loss_objectness", "loss_rpn_box_reg": "loss_rpn_box",
    "loss_classifier": "loss_cls", "loss_box_reg": "loss_box",
}


def build_models(device: torch.device, min_size: int, max_size: int, seed: int):
    """torchvision's Faster R-CNN with random weights (frozen BatchNorm, drawn class bias) and
    fpndet's conversion of it, both resizing to ``min_size`` / ``max_size``."""
    torch.manual_seed(seed)
    tv_model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size)
    freeze_batch_norms(tv_model.backbone)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias = tv_model.roi_heads.box_predictor.cls_score.bias
        bias.copy_(torch.randn(bias.shape, generator=generator) * 2.0)
        bias[0] = -2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = from_torchvision(tv_model.state_dict(), arch="fasterrcnn_resnet50_fpn")
    ours.preprocessor.min_size = [min_size]
    ours.preprocessor.max_size = max_size
    return tv_model.to(device).eval(), ours.to(device).eval()


def exact_size_images(images: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    return [F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].clamp_(0, 1) for img in images]


def by_score(detections: list[dict], label_offset: int = 0) -> list[dict]:
    """Each image's detections sorted by decreasing score (labels shifted by ``label_offset``)."""
    out = []
    for d in detections:
        order = torch.argsort(d["scores"].float(), descending=True, stable=True)
        out.append({"boxes": d["boxes"][order].float().cpu(), "scores": d["scores"][order].float().cpu(),
                    "labels": d["labels"][order].cpu() + label_offset})
    return out


class TakeEverything:
    """Context: both models' samplers take every candidate (no random subset), restored after."""

    def __init__(self, tv_model: nn.Module, ours: nn.Module):
        self.samplers = [tv_model.rpn.fg_bg_sampler, tv_model.roi_heads.fg_bg_sampler,
                         ours.rpn.sampler, ours.roi_heads.sampler]

    def __enter__(self):
        self.saved = [(s.batch_size_per_image, s.positive_fraction) for s in self.samplers]
        for sampler in self.samplers:
            sampler.batch_size_per_image, sampler.positive_fraction = 10**8, 1.0
        return self

    def __exit__(self, *exc):
        for sampler, (size, fraction) in zip(self.samplers, self.saved):
            sampler.batch_size_per_image, sampler.positive_fraction = size, fraction


def compare_losses(tv_model: nn.Module, ours: nn.Module, images, tv_targets, our_targets) -> dict[str, float]:
    """Relative difference of each of the four training losses, every candidate sampled."""
    tv_model.train(), ours.train()
    with TakeEverything(tv_model, ours), torch.no_grad():
        tv_losses = tv_model(images, tv_targets)
        our_losses = ours(images, our_targets)
    tv_model.eval(), ours.eval()
    return {name: abs(float(tv_losses[name]) - float(our_losses[ours_name])) / max(abs(float(tv_losses[name])), 1e-12)
            for name, ours_name in LOSS_NAMES.items()}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> None:
    losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


def peak_memory_mb(device: torch.device, fn) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def run(args) -> None:
    device = resolve_device(args.device)
    apply_threads(args, device)
    on_gpu = device.type == "cuda"
    min_size, max_size = (320, 533) if args.quick else (800, 1333)
    min_size, max_size = args.min_size or min_size, args.max_size or max_size
    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    train_batch = args.train_batch or (1 if args.quick else (8 if on_gpu else 2))
    repeats = args.repeats or (2 if args.quick else (20 if on_gpu else 3))
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)

    photos, source = load_images(max(max(batches), train_batch), args.seed, args.images)
    images_all = [img.to(device) for img in exact_size_images(photos, (min_size, max_size))]
    tv_model, ours = build_models(device, min_size, max_size, args.seed)

    exported, export_facts = onnx_runners(ours, args) if args.onnx and not on_gpu else ({}, {})
    inference_rows, onnx_rows, results = [], [], {"inference": [], "training": None, "export": export_facts}
    for batch in batches:
        images = images_all[:batch]
        with torch.inference_mode():
            tv_detections = by_score(tv_model(images))
            agreement = compare_detections(tv_detections, by_score(ours(images), label_offset=1))
            onnx_checks = {name: matched_sets(tv_detections, by_score(runner(images), label_offset=1))
                           for name, runner in exported.items()}
        calls = {"torchvision": lambda: tv_model(images), "fpndet": lambda: ours(images)}
        calls.update({name: (lambda r=runner: r(images)) for name, runner in exported.items()})
        with torch.inference_mode():
            times = time_interleaved(calls, device=device, repeats=repeats, warmup=warmup)
            memory = {name: peak_memory_mb(device, fn) for name, fn in calls.items()}
        tv_ms, our_ms = (summary(times[n])["median_ms"] for n in ("torchvision", "fpndet"))
        print(f"inference batch {batch}: torchvision {tv_ms:.0f} ms, fpndet {our_ms:.0f} ms", flush=True)
        inference_rows.append([
            device.type, batch, tv_ms / batch, our_ms / batch, f"{tv_ms / our_ms:.2f}x",
            f"{sum(agreement['counts_reference']) / batch:.0f}", "yes" if agreement["same_counts"] else "NO",
            f"{agreement['label_agreement']:.3f}", f"{agreement['max_box_diff_px']:.1e}", f"{agreement['max_score_diff']:.1e}",
            _mb(memory["torchvision"]), _mb(memory["fpndet"]),
        ])
        results["inference"].append({"batch": batch, "agreement": agreement, "peak_memory_mb": memory,
                                     "onnx_checks": onnx_checks, **{n: summary(t) for n, t in times.items()}})
        for name, check in onnx_checks.items():
            ms = summary(times[name])["median_ms"]
            onnx_rows.append([batch, name, f"{tv_ms / batch:.0f}", f"{ms / batch:.0f}", f"{ms / tv_ms:.2f}x",
                              "same detections" if check["set_equal"] else f"DIFFERENT: {check['unmatched']} unmatched"])

    images = images_all[:train_batch]
    tv_targets = synthetic_targets(batch=train_batch, boxes_per_image=10, num_classes=91,
                                   image_size=(min_size, max_size), device=device, seed=args.seed)
    our_targets = [{"boxes": t["boxes"], "labels": t["labels"] - 1} for t in tv_targets]
    loss_diffs = compare_losses(tv_model, ours, images, tv_targets, our_targets)
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-8, momentum=0.9)
                  for name, model in (("torchvision", tv_model), ("fpndet", ours))}
    tv_model.train(), ours.train()
    calls = {"torchvision": lambda: training_step(tv_model, optimizers["torchvision"], images, tv_targets),
             "fpndet": lambda: training_step(ours, optimizers["fpndet"], images, our_targets)}
    times = time_interleaved(calls, device=device, repeats=repeats, warmup=warmup)
    memory = {name: peak_memory_mb(device, fn) for name, fn in calls.items()}
    tv_model.eval(), ours.eval()
    tv_ms, our_ms = (summary(times[n])["median_ms"] for n in ("torchvision", "fpndet"))
    print(f"training step batch {train_batch}: torchvision {tv_ms:.0f} ms, fpndet {our_ms:.0f} ms", flush=True)
    training_rows = [[device.type, train_batch, tv_ms, our_ms, f"{tv_ms / our_ms:.2f}x",
                      f"{max(loss_diffs.values()):.1e}", _mb(memory["torchvision"]), _mb(memory["fpndet"])]]
    results["training"] = {"batch": train_batch, "loss_relative_diff": loss_diffs, "peak_memory_mb": memory,
                           **{n: summary(t) for n, t in times.items()}}

    size = f"{min_size}x{max_size}"
    tables = {
        f"Faster R-CNN R50-FPN inference, {size}, median of {repeats} (ms per image)": format_table(
            ["device", "batch", "torchvision ms/img", "fpndet ms/img", "tv/fpndet", "dets/img", "same counts",
             "same labels", "max abs Δbox px", "max abs Δscore", "tv peak MB", "fpndet peak MB"], inference_rows),
        f"Faster R-CNN R50-FPN training step (forward, backward, SGD), {size}, median of {repeats} (ms per step)":
            format_table(["device", "batch", "torchvision ms", "fpndet ms", "tv/fpndet", "max rel Δloss (4 losses)",
                          "tv peak MB", "fpndet peak MB"], training_rows),
    }
    if onnx_rows:
        tables[f"Faster R-CNN R50-FPN ONNX export ({export_facts['export_s']:.0f} s, {export_facts['onnx_mib']:.0f} MiB), "
               f"{size}, median of {repeats}"] = format_table(
            ["batch", "backend", "torchvision ms/img", "ms/img", "vs torchvision", "answers vs torchvision"], onnx_rows)
    report(NAME, args, device, tables, {"images": source, "min_size": min_size, "max_size": max_size, **results})


def onnx_runners(ours: nn.Module, args) -> tuple[dict, dict]:
    """fpndet's model exported to ONNX (dynamic size) on each installed runtime; the export's facts."""
    import tempfile
    import time

    from fpndet.deploy.backends import installed
    from fpndet.deploy.export import export_onnx
    from fpndet.deploy.runtime import OnnxDetector

    backends = [b for b in ("onnxruntime", "openvino") if installed(b)]
    if not backends or not installed("onnx"):
        return {}, {}
    path = Path(tempfile.mkdtemp()) / "faster_rcnn.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(ours.cpu(), path, class_names=[str(i) for i in range(ours.num_classes)])
    facts = {"export_s": time.perf_counter() - start, "onnx_mib": path.stat().st_size / 2**20}
    print(f"exported in {facts['export_s']:.0f} s", flush=True)
    return {f"fpndet {b}": OnnxDetector(path, backend=b) for b in backends}, facts


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--min-size", type=int, default=None, help="image height (default 800; quick 320)")
    parser.add_argument("--max-size", type=int, default=None, help="image width (default 1333; quick 533)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="inference batch sizes (default 1 8)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 2 CPU, 8 CUDA)")
    parser.add_argument("--images", default=None, help="folder of JPEGs (default: coco128 when present)")
    parser.add_argument("--onnx", action="store_true", help="also time the ONNX export on onnxruntime / OpenVINO (CPU)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
