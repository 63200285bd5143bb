"""Post-processing alone: torchvision's ``RetinaNet.postprocess_detections`` (a Python loop over
images and pyramid levels, then one ``batched_nms`` per image) versus fpndet's
``DetectionPostprocessor`` (one batched pass: per-level top-k for all images at once, a single
NMS call for every (image, class) group).

Both get the same synthetic head outputs for 800x1333 inputs (201,600 anchors, 91 logits, as
torchvision's COCO ``retinanet_resnet50_fpn``) with a few thousand candidates per image passing
the 0.05 score threshold and clusters of overlapping boxes for NMS to suppress (see
``common.synthetic_head_outputs``). Two comparisons:

- "detections": torchvision's ``postprocess_detections`` (plus the per-level split that its
  ``forward`` does) vs fpndet with no rescale (original size = resized size);
- "full": the above plus ``GeneralizedRCNNTransform.postprocess`` (boxes back to the 480x800
  input) vs fpndet with rescale.

Run: ``python benchmarks/bench_postprocess.py [--device cuda] [--quick]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torchvision.models.detection import retinanet_resnet50_fpn  # noqa: E402

from common import (  # noqa: E402
    ORIGINAL_SIZE, RESIZED_SIZE, apply_threads, base_parser, compare_detections, format_table,
    fpndet_anchors, report, resolve_device, summary, synthetic_head_outputs, time_interleaved,
)
from fpndet.modeling.box_coder import BoxCoder  # noqa: E402
from fpndet.modeling.config import retinanet_r50_fpn_tv  # noqa: E402
from fpndet.modeling.postprocess import DetectionPostprocessor  # noqa: E402

NAME = "bench_postprocess"
NUM_CLASSES = 91


def fpndet_postprocessor() -> DetectionPostprocessor:
    """fpndet's post-processor with the settings of torchvision's retinanet_resnet50_fpn."""
    config = retinanet_r50_fpn_tv(NUM_CLASSES)
    return DetectionPostprocessor(
        box_coder=BoxCoder(weights=tuple(config.retinanet.box_weights), scale_clamp=config.box_scale_clamp),
        score_thresh=config.score_thresh, topk_candidates=config.retinanet.topk_candidates,
        nms_thresh=config.nms_thresh, detections_per_image=config.detections_per_image,
    )


def torchvision_postprocess(model, cls_logits, box_deltas, anchors, counts, image_sizes, original_sizes, rescale):
    """What torchvision's ``RetinaNet.forward`` does after the heads (eval mode)."""
    split = {
        "cls_logits": list(cls_logits.split(counts, dim=1)),
        "bbox_regression": list(box_deltas.split(counts, dim=1)),
    }
    split_anchors = [list(a.split(counts)) for a in anchors]
    detections = model.postprocess_detections(split, split_anchors, image_sizes)
    if rescale:
        detections = model.transform.postprocess(detections, image_sizes, original_sizes)
    return detections


def run(args) -> None:
    device = resolve_device(args.device)
    apply_threads(args, device)
    batches = [1, 2] if args.quick else [1, 2, 8]
    repeats = args.repeats or (3 if args.quick else (20 if device.type == "cuda" else 7))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    tv_model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).eval().to(device)
    ours = fpndet_postprocessor()
    anchors, counts = fpndet_anchors(RESIZED_SIZE, device)
    cls_all, box_all = synthetic_head_outputs(
        batch=max(batches), anchors=anchors, num_classes=NUM_CLASSES, image_size=RESIZED_SIZE,
        noise_pass_per_image=args.noise_candidates, objects_per_image=args.objects, seed=args.seed,
    )
    passing = (cls_all.sigmoid() > 0.05).sum(dim=(1, 2)).float().mean().item()

    rows, results = [], []
    for batch in batches:
        cls_logits, box_deltas = cls_all[:batch].contiguous(), box_all[:batch].contiguous()
        tv_anchors = [anchors] * batch
        image_sizes = [RESIZED_SIZE] * batch
        original_sizes = [ORIGINAL_SIZE] * batch
        for variant, rescale in (("detections", False), ("full (+rescale)", True)):
            targets_sizes = original_sizes if rescale else image_sizes

            def run_tv():
                return torchvision_postprocess(
                    tv_model, cls_logits, box_deltas, tv_anchors, counts, image_sizes, original_sizes, rescale
                )

            def run_ours():
                return ours(cls_logits, box_deltas, anchors, counts, image_sizes, targets_sizes)

            with torch.inference_mode():
                agreement = compare_detections(run_tv(), run_ours())
                times = time_interleaved(
                    {"torchvision": run_tv, "fpndet": run_ours}, device=device, repeats=repeats, warmup=warmup
                )
            tv_times, our_times = summary(times["torchvision"]), summary(times["fpndet"])
            ratio = tv_times["median_ms"] / our_times["median_ms"]
            ratio_min = tv_times["min_ms"] / our_times["min_ms"]
            dets = sum(agreement["counts_reference"]) / batch
            rows.append([
                device.type, batch, variant, tv_times["median_ms"], tv_times["median_ms"] / batch,
                our_times["median_ms"], our_times["median_ms"] / batch, f"{ratio:.2f}x", f"{ratio_min:.2f}x",
                f"{dets:.0f}",
                "yes" if agreement["same_counts"] else "NO", f"{agreement['max_score_diff']:.1e}",
            ])
            results.append({
                "device": device.type, "batch": batch, "variant": variant,
                "torchvision": tv_times, "fpndet": our_times, "ratio_torchvision_over_fpndet": ratio,
                "ratio_of_minima": ratio_min,
                "agreement": agreement,
            })
            print(f"batch {batch} {variant}: torchvision {tv_times['median_ms']:.1f} ms, "
                  f"fpndet {our_times['median_ms']:.1f} ms ({ratio:.2f}x)", flush=True)

    headers = ["device", "batch", "post-process", "tv ms/batch", "tv ms/img", "fpndet ms/batch",
               "fpndet ms/img", "tv/fpndet", "(of mins)", "dets/img", "same counts", "max abs Δscore"]
    title = (f"Post-processing, 800x1333 ({anchors.shape[0]} anchors x {NUM_CLASSES} logits), "
             f"~{passing:.0f} scores/img > 0.05, median of {repeats}")
    report(NAME, args, device, {title: format_table(headers, rows)},
           {"anchors": anchors.shape[0], "anchors_per_level": counts, "passing_scores_per_image": passing,
            "rows": results})


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--noise-candidates", type=int, default=2000,
                        help="background (anchor, class) scores per image above 0.05")
    parser.add_argument("--objects", type=int, default=20, help="synthetic objects per image (NMS clusters)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
