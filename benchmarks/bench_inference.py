"""End-to-end eval-mode inference: torchvision's ``retinanet_resnet50_fpn`` versus fpndet's
``from_torchvision`` conversion of the same weights, on the same images (coco128 photos when
/work/shared/data is present, else random images of COCO size).

The weights are random (no download); the classification bias is shifted once so that about
``--candidates`` (anchor, class) scores per image pass the 0.05 threshold, as with a trained
COCO model (random heads otherwise give no detection and the post-processing would be idle).

Besides the end-to-end time of ``model(images)`` the run is split into stages by forward hooks
(and wrappers on torchvision's ``postprocess_detections`` / ``transform.postprocess``):
preprocess (normalise, resize, pad), backbone+FPN, heads, anchors, post-process. On CUDA the
end-to-end numbers come from separate runs without synchronisation at stage boundaries.

Run: ``python benchmarks/bench_inference.py [--device cuda] [--quick] [--no-bf16]``.
CPU defaults: short side 512 (long <= 853), batches 1 and 8 (--quick: short side 256, batches
1 and 2); CUDA: 800x1333, batches 1 and 8, fp32 and bf16 autocast (skip it with --no-bf16).
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.detection import retinanet_resnet50_fpn  # noqa: E402

from common import (  # noqa: E402
    apply_threads, base_parser, compare_detections, format_table, report, resolve_device,
    summary, synchronize, time_interleaved,
)
from fpndet.modeling.torchvision_compat import from_torchvision  # noqa: E402

NAME = "bench_inference"
IMAGE_DIRS = (  # coco128 photos when present (the repo's shared/ copy on a device machine), else random images
    Path("/work/shared/data/coco128/images"),
    Path(__file__).resolve().parents[1] / "shared" / "data" / "coco128" / "images",
)
STAGES = ("preprocess", "backbone+FPN", "heads", "anchors", "post-process")


def load_images(count: int, seed: int, folder: str | None = None) -> tuple[list[torch.Tensor], str]:
    """``count`` float32 ``[3, H, W]`` RGB images in [0, 1] and a description of their source:
    the first JPEGs of ``folder`` (or of coco128 when found), else random 480x640 images."""
    folders = [Path(folder)] if folder else [d for d in IMAGE_DIRS if d.is_dir()]
    files = sorted(folders[0].glob("*.jpg"))[:count] if folders else []
    if len(files) == count:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        images = [pil_to_tensor(Image.open(f).convert("RGB")).float().div_(255) for f in files]
        return images, f"coco128 ({', '.join(f.name for f in files[:3])}{', ...' if count > 3 else ''})"
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 480, 640, generator=gen) for _ in range(count)], "random 480x640"


class StageRecorder:
    """Per-stage wall-clock time inside one ``model(images)`` call, via hooks.

    ``enabled`` False makes every hook a no-op (clean end-to-end runs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = False
        self._open: dict[str, float] = {}
        self._run: dict[str, float] = {}

    def begin_run(self) -> None:
        self._run = {}

    def end_run(self) -> dict[str, float]:
        return dict(self._run)

    def _begin(self, stage: str) -> None:
        if self.enabled:
            synchronize(self.device)
            self._open[stage] = _now()

    def _end(self, stage: str) -> None:
        if self.enabled:
            synchronize(self.device)
            self._run[stage] = self._run.get(stage, 0.0) + (_now() - self._open.pop(stage)) * 1000.0

    def module(self, module: nn.Module, stage: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._begin(stage))
        module.register_forward_hook(lambda *_: self._end(stage))

    def method(self, owner: Any, name: str, stage: str) -> None:
        original: Callable = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self._begin(stage)
            out = original(*args, **kwargs)
            self._end(stage)
            return out

        setattr(owner, name, wrapped)


def _now() -> float:
    import time

    return time.perf_counter()


def instrument_torchvision(model: nn.Module, recorder: StageRecorder) -> None:
    recorder.module(model.transform, "preprocess")
    recorder.module(model.backbone, "backbone+FPN")
    recorder.module(model.head, "heads")
    recorder.module(model.anchor_generator, "anchors")
    recorder.method(model, "postprocess_detections", "post-process")
    recorder.method(model.transform, "postprocess", "post-process")


def instrument_fpndet(model: nn.Module, recorder: StageRecorder) -> None:
    recorder.module(model.preprocessor, "preprocess")
    recorder.module(model.backbone, "backbone+FPN")
    recorder.module(model.fpn, "backbone+FPN")
    recorder.module(model.head, "heads")
    recorder.module(model.anchor_generator, "anchors")
    recorder.module(model.postprocessor, "post-process")


@torch.inference_mode()
def calibrate_class_bias(model: nn.Module, images: list[torch.Tensor], candidates: int) -> float:
    """Shift torchvision's classification bias so ~``candidates`` scores per image pass 0.05.

    Returns the shift added to every logit."""
    batch, _ = model.transform(images)
    features = list(model.backbone(batch.tensors).values())
    logits = model.head(features)["cls_logits"].float()
    k = max(1, min(candidates * len(images), logits.numel()))
    kth = logits.flatten().topk(k).values[-1].item()
    shift = math.log(0.05 / 0.95) - kth + 1e-3
    model.head.classification_head.cls_logits.bias.add_(shift)
    return shift


def freeze_batch_norms(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` by ``FrozenBatchNorm2d`` with the same statistics, as
    torchvision builds ``retinanet_resnet50_fpn`` whenever (backbone) weights are given; with
    ``weights=None`` it would keep trainable BatchNorm, which is not how the model is used."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(
                {k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"}
            )
            setattr(module, name, frozen)
        else:
            freeze_batch_norms(child)


def build_models(device: torch.device, min_size: int, max_size: int, images, candidates: int):
    """torchvision's model with random weights (calibrated bias) and fpndet's conversion of it."""
    torch.manual_seed(0)
    tv_model = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=min_size, max_size=max_size
    ).eval()
    freeze_batch_norms(tv_model.backbone)
    shift = calibrate_class_bias(tv_model, images[:1], candidates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = from_torchvision(tv_model.state_dict(), arch="retinanet_resnet50_fpn").eval()
    ours.preprocessor.min_size = [min_size]
    ours.preprocessor.max_size = max_size
    return tv_model.to(device), ours.to(device), shift


def measure(models: dict[str, nn.Module], recorders: dict[str, StageRecorder], images, *, device,
            repeats: int, warmup: int, autocast) -> dict[str, dict]:
    """End-to-end and per-stage times (ms per batch) of ``model(images)`` for each model; the
    models run in turn (a, b, a, b, ...) so that both see the same load on a shared machine."""
    def call(name):
        with torch.inference_mode(), autocast():
            return models[name](images)

    calls = {name: (lambda name=name: call(name)) for name in models}
    for recorder in recorders.values():
        recorder.enabled = False
    clean = {}
    if device.type == "cuda":  # stage syncs would perturb a GPU pipeline: time end-to-end apart
        clean = time_interleaved(calls, device=device, repeats=repeats, warmup=warmup)
    elif warmup:
        time_interleaved(calls, device=device, repeats=0, warmup=warmup)
    results = {}
    for name in models:
        results[name] = {"stages": {}, "totals": [], "peak_memory_mb": None}
        recorders[name].enabled = True
    for _ in range(repeats):
        for name in models:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            recorders[name].begin_run()
            synchronize(device)
            start = _now()
            results[name]["detections"] = call(name)
            synchronize(device)
            results[name]["totals"].append((_now() - start) * 1000.0)
            for stage, ms in recorders[name].end_run().items():
                results[name]["stages"].setdefault(stage, []).append(ms)
            if device.type == "cuda":
                results[name]["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    for name in models:
        recorders[name].enabled = False
        entry = results[name]
        entry["end_to_end"] = summary(clean.get(name) or entry["totals"])
        entry["instrumented_total"] = summary(entry.pop("totals"))
        entry["stages_median_ms"] = {s: summary(v)["median_ms"] for s, v in entry.pop("stages").items()}
    return results


def run(args) -> None:
    device = resolve_device(args.device)
    apply_threads(args, device)
    on_gpu = device.type == "cuda"
    if args.quick:
        min_size, max_size, batches = 256, 427, [1, 2]
    elif on_gpu:
        min_size, max_size, batches = 800, 1333, [1, 8]
    else:
        min_size, max_size, batches = 512, 853, [1, 8]
    min_size = args.min_size or min_size
    max_size = args.max_size or max_size
    batches = args.batches or batches
    repeats = args.repeats or (2 if args.quick else (20 if on_gpu else 3))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or not on_gpu else 5)
    precisions = ["fp32"] + (["bf16"] if on_gpu and not args.no_bf16 else [])

    images_cpu, source = load_images(max(batches), args.seed, args.images)
    tv_model, ours, shift = build_models(device, min_size, max_size, images_cpu, args.candidates)
    images_all = [img.to(device) for img in images_cpu]
    recorders = {"torchvision": StageRecorder(device), "fpndet": StageRecorder(device)}
    instrument_torchvision(tv_model, recorders["torchvision"])
    instrument_fpndet(ours, recorders["fpndet"])

    e2e_rows, split_rows, results = [], [], []
    for precision in precisions:
        def autocast():
            if precision == "bf16":
                return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        for batch in batches:
            images = images_all[:batch]
            measured = measure(
                {"torchvision": tv_model, "fpndet": ours}, recorders, images, device=device, repeats=repeats,
                warmup=warmup, autocast=autocast,
            )
            for impl in measured:
                print(f"{precision} batch {batch} {impl}: {measured[impl]['end_to_end']['median_ms']:.1f} ms",
                      flush=True)
            agreement = compare_detections(measured["torchvision"]["detections"], measured["fpndet"]["detections"])
            tv_ms = measured["torchvision"]["end_to_end"]["median_ms"]
            our_ms = measured["fpndet"]["end_to_end"]["median_ms"]
            dets = sum(agreement["counts_reference"]) / batch
            e2e_rows.append([
                device.type, precision, batch, tv_ms / batch, our_ms / batch, f"{tv_ms / our_ms:.2f}x",
                f"{dets:.0f}", "yes" if agreement["same_counts"] else "NO", f"{agreement['max_score_diff']:.1e}",
            ])
            for impl in ("torchvision", "fpndet"):
                stages = measured[impl]["stages_median_ms"]
                total = measured[impl]["instrumented_total"]["median_ms"]
                network = sum(stages.get(s, 0.0) for s in ("backbone+FPN", "heads", "anchors"))
                post = stages.get("post-process", 0.0)
                split_rows.append(
                    [device.type, precision, batch, impl]
                    + [stages.get(s, 0.0) / batch for s in STAGES]
                    + [network / batch, f"{100 * post / total:.0f}%"]
                )
                measured[impl].pop("detections")
            results.append({"device": device.type, "precision": precision, "batch": batch,
                            "ratio_torchvision_over_fpndet": tv_ms / our_ms, "agreement": agreement, **measured})

    size = f"short side {min_size}, long <= {max_size}"
    tables = {
        f"End-to-end inference, {size}, median of {repeats} (ms per image)": format_table(
            ["device", "precision", "batch", "torchvision ms/img", "fpndet ms/img", "tv/fpndet", "dets/img",
             "same counts", "max abs Δscore"], e2e_rows),
        f"Stage split (ms per image; network = backbone+FPN+heads+anchors), {size}": format_table(
            ["device", "precision", "batch", "impl", *STAGES, "network", "post share"], split_rows),
    }
    report(NAME, args, device, tables, {"images": source, "min_size": min_size, "max_size": max_size,
                                        "class_bias_shift": shift, "rows": results})


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--min-size", type=int, default=None, help="short side (default 512 CPU, 800 CUDA)")
    parser.add_argument("--max-size", type=int, default=None, help="long side limit (default 853 CPU, 1333 CUDA)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8; quick: 1 2)")
    parser.add_argument("--candidates", type=int, default=2000, help="scores per image above 0.05 after calibration")
    parser.add_argument("--images", default=None, help="folder of JPEGs (default: coco128 when present)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast runs on CUDA")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
