"""The ``fpndet`` command: train, eval, predict, proposals, inspect, export, benchmark.

Every option has ``--help``. Config values are set with dotted overrides after the options,
e.g. ``fpndet train --config raccoon model.retinanet.head_depth=2 train.epochs=5``. Bad input prints one
message naming the file and exits with status 2 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .errors import FpnDetError, InputWarning

EPILOG = "Config overrides: KEY=VALUE pairs such as model.backbone=resnet18 train.batch_size=4 data.num_workers=0."


def _add_common(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    if device:
        parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpndet", description="Feature-pyramid object detection (RetinaNet, Faster R-CNN, RPN).")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a detector", epilog=EPILOG,
                           description="Train, evaluate on the validation split, and draw predictions.")
    train.add_argument("--config", default=None,
                       help="YAML config file or a named config (shapes, raccoon, coco128, coco_r50_1x); default: shapes")
    train.add_argument("--data", default=None,
                       help="dataset: 'shapes', a COCO instances JSON, a VOC root or a YOLO data YAML (sets data.train)")
    train.add_argument("--val-data", default=None, help="validation dataset if not the --data one (sets data.val)")
    train.add_argument("--format", default=None, choices=["shapes", "coco", "voc", "yolo"], help="force the dataset format")
    train.add_argument("--weights", default=None, help="initial weights: a run folder, .safetensors or torchvision .pth")
    train.add_argument("--output", default=None, help="run folder (sets train.output_dir)")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth exactly")
    train.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    _add_common(train)

    ev = sub.add_parser("eval", help="COCO metrics of a checkpoint on a dataset")
    ev.add_argument("--weights", required=True, help="run folder, .safetensors, torchvision .pth or .onnx (fpndet export)")
    ev.add_argument("--data", required=True, help="dataset spec (as for train)")
    ev.add_argument("--split", default="val", help="split for VOC/YOLO/shapes (default val)")
    ev.add_argument("--format", default=None, choices=["shapes", "coco", "voc", "yolo"])
    ev.add_argument("--output", default=None, help="where metrics.json, detections.json and plots go (default: <weights dir>/eval)")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
    ev.add_argument("--proposals", default=None,
                    help="proposals file (from `fpndet proposals`) for a model.arch=fast_rcnn model")
    ev.add_argument("--score-thresh", type=float, default=None,
                    help="override the model's score threshold (default: the model's own, 0.05 for fpndet and "
                         "torchvision models; COCO AP wants a low threshold)")
    ev.add_argument("--diagnostics-thresh", type=float, default=None, metavar="SCORE",
                    help="score threshold of the confusion matrix and of the worst false positives / misses "
                         "pictures written with the metrics (default 0.3, as predict; COCO AP uses every detection)")
    ev.add_argument("--no-diagnostics", action="store_true",
                    help="write metrics only: no confusion matrix, per-class PR curves, per-size AP table or pictures")
    _add_backend(ev, default=None)
    _add_tiling(ev)
    _add_common(ev)

    pr = sub.add_parser("predict", help="detect objects in images")
    pr.add_argument("--weights", required=True, help="run folder, .safetensors, torchvision .pth or .onnx (fpndet export)")
    pr.add_argument("sources", nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("--output", default="predictions", help="folder for <image>.json and annotated <image>.jpg")
    pr.add_argument("--score-thresh", type=float, default=0.3, help="keep detections scoring at least this (default 0.3)")
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--no-draw", action="store_true", help="write JSON only")
    pr.add_argument("--workers", type=int, default=2, help="background processes decoding images (0: none)")
    pr.add_argument("--resume", action="store_true", help="skip images whose JSON is already in --output")
    pr.add_argument("--strict", action="store_true", help="exit with status 2 when an image had to be skipped")
    _add_backend(pr, default="auto")
    _add_tiling(pr)
    _add_common(pr)

    prop = sub.add_parser("proposals", help="write an RPN's proposals for a dataset to a file (for model.arch=fast_rcnn)",
                          description="Run the RPN of a trained rpn or faster_rcnn model over a dataset split and write "
                                      "its proposals (original-image pixels, by image id) to a .safetensors file, "
                                      "then report their recall.")
    prop.add_argument("--weights", required=True, help="run folder or .safetensors of an rpn or faster_rcnn model")
    prop.add_argument("--data", required=True, help="dataset spec (as for train)")
    prop.add_argument("--split", default="train", help="split for VOC/YOLO/shapes (default train)")
    prop.add_argument("--format", default=None, choices=["shapes", "coco", "voc", "yolo"])
    prop.add_argument("--output", required=True, help="the proposals file to write (.safetensors)")
    prop.add_argument("--topk", type=int, default=None,
                      help="proposals kept per image after NMS (default: the model's model.rpn.post_nms_topk_test)")
    prop.add_argument("--pre-topk", type=int, default=None,
                      help="anchors kept per level and image before NMS (default: the model's "
                           "model.rpn.pre_nms_topk_test; the training value, e.g. 2000, gives proposals like those "
                           "a jointly trained Fast R-CNN saw)")
    prop.add_argument("--batch-size", type=int, default=4)
    _add_common(prop)

    ins = sub.add_parser("inspect", help="dataset statistics and anchor coverage per pyramid level", epilog=EPILOG)
    ins.add_argument("--data", required=True, help="dataset spec (as for train)")
    ins.add_argument("--split", default="train")
    ins.add_argument("--format", default=None, choices=["shapes", "coco", "voc", "yolo"])
    ins.add_argument("--config", default=None, help="config whose model.* anchors and sizes to check (default: the paper's)")
    ins.add_argument("--output", default="inspect", help="folder for report.json and the PNG figures")
    ins.add_argument("--samples", type=int, default=8, help="sample images drawn with their boxes and matched anchors")
    ins.add_argument("--suggest-anchors", action="store_true",
                     help="fit anchor sizes (one factor on all levels) and ratios to the boxes, maximising the boxes "
                          "with a foreground anchor, then their mean best IoU; print coverage before/after and the "
                          "override (model.anchor_sizes=auto / model.anchor_ratios=auto fit just those fields)")
    ins.add_argument("--num-ratios", type=int, default=None,
                     help="with --suggest-anchors: ratios per location (default: as many as the config's)")
    ins.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (model.anchor_sizes=[16,32,64,128,256])")
    _add_common(ins, device=False)

    ex = sub.add_parser("export", help="write a detector as one ONNX file (pre-processing to NMS)",
                        description="Export a RetinaNet, Faster R-CNN or RPN to ONNX: normalisation, padding to /32, "
                                    "backbone, FPN, heads, anchors, box decoding, score threshold, top-k and "
                                    "class-wise NMS (Faster R-CNN: proposals, RoIAlign at the FPN level of each "
                                    "RoI, box head) in one graph with dynamic batch and image size. Input 'images' [B, 3, H, W], "
                                    "resized to the model's size (fpndet.modeling.preprocess.resize_image); "
                                    "outputs boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B].")
    ex.add_argument("--weights", required=True, help="run folder, .safetensors or torchvision .pth")
    ex.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    ex.add_argument("--output", default=None, help="the file to write (default: <weights folder>/model.onnx)")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18; default 18)")
    ex.add_argument("--raw", action="store_true", help="export head outputs and anchors only (your own post-processing)")
    ex.add_argument("--input-dtype", default="float32", choices=["float32", "uint8"],
                    help="float32: RGB in [0, 1] (default); uint8: RGB in [0, 255]")
    ex.add_argument("--input-size", default=None, metavar="HxW|max",
                    help="fix the image size of the graph (batch stays dynamic): HxW, multiples of 32, or 'max' "
                         "(a square of the model's max_size): every batch is padded to it; exports in seconds "
                         "where a deep backbone's dynamic-size graph takes many minutes (default: dynamic)")
    ex.add_argument("--score-thresh", type=float, default=None, help="score threshold in the graph (default: the model's)")
    ex.add_argument("--detections", type=int, default=None, help="K, detections per image (default: the model's)")
    ex.add_argument("--check", action="store_true",
                    help="run the export on onnxruntime and compare its detections with PyTorch's (exit status 1 "
                         "when they differ)")
    ex.add_argument("--images", default=None, metavar="FOLDER",
                    help="with --check: compare on the first images of this folder (default: 2 random images)")
    _add_common(ex, device=False)

    be = sub.add_parser("benchmark", help="time every installed backend on this machine",
                        description="Time a detector on every installed backend (eager, fast, onnxruntime, "
                                    "OpenVINO, ...) after checking each one's detections against eager PyTorch; "
                                    "print ms/image, images/s and peak memory.")
    be.add_argument("--weights", required=True, help="run folder, .safetensors or torchvision .pth")
    be.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    be.add_argument("--size", type=int, default=None, help="short side in pixels (default: the model's)")
    be.add_argument("--images", default=None, help="a folder of images to time on (default: random images)")
    be.add_argument("--repeats", type=int, default=5, help="timed calls per backend (default 5)")
    be.add_argument("--backends", default=None, help="comma-separated subset (default: all installed but compile)")
    be.add_argument("--output", default=None, help="also write the table as JSON here")
    _add_common(be)
    return parser


def _add_backend(parser: argparse.ArgumentParser, *, default: Optional[str]) -> None:
    from .deploy.backends import BACKEND_CHOICES

    shown = default or "eager for checkpoints, auto for .onnx"
    parser.add_argument("--backend", default=default, choices=BACKEND_CHOICES,
                        help=f"how the model runs (default: {shown}): eager, fast (BatchNorm folded, channels_last), "
                             "compile, onnxruntime, openvino, openvino-bf16 (faster, not equal to float32), auto "
                             "(fastest float32 path needing no export: openvino/onnxruntime for .onnx, fast for "
                             "checkpoints); PyTorch weights on an ONNX backend are exported once next to them")


def _add_tiling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile", type=int, default=None, metavar="SIZE",
                        help="tiled inference for large images with small objects: run the model on overlapping "
                             "SIZE x SIZE px tiles (each resized by the model as any image: SIZE = the model's "
                             "min_size keeps the image's scale) and merge with class-wise NMS; --batch-size "
                             "tiles per model call")
    parser.add_argument("--tile-overlap", type=float, default=0.2, metavar="F",
                        help="fraction of a tile shared with its neighbour (default 0.2); objects up to about "
                             "F x SIZE are seen whole in some tile")
    parser.add_argument("--tile-full-image", action="store_true",
                        help="with --tile, also run the model on each whole image (objects larger than a tile)")


def _tiled(model, args):
    """``model`` run on tiles when ``--tile`` is given (:class:`fpndet.engine.tiling.TiledDetector`)."""
    from .errors import InputError

    if args.tile is None:
        if args.tile_full_image:
            raise InputError(None, "--tile-full-image needs --tile SIZE")
        return model
    from .engine.model_io import weights_file
    from .engine.tiling import TiledDetector

    if model.config.arch in ("rpn", "fast_rcnn"):
        raise InputError(weights_file(args.weights), f"is a {model.config.arch} model; --tile runs detectors "
                         "(retinanet, faster_rcnn)")
    return TiledDetector(model, args.tile, overlap=args.tile_overlap, full_image=args.tile_full_image,
                         batch_size=args.batch_size)


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.trainer import train

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.val_data:
        overrides.append(f"data.val={args.val_data}")
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.weights:
        overrides.append(f"train.init_weights={args.weights}")
    if args.output:
        overrides.append(f"train.output_dir={args.output}")
    if args.device != "auto":
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config or ("shapes" if not args.data or args.data == "shapes" else None), overrides)
    start = time.perf_counter()
    report = train(cfg, resume=args.resume)
    if report:
        from .engine.evaluation import format_metrics_table
        from .engine.trainer import draw_validation_predictions

        print(format_metrics_table(report["metrics"]))
        out = Path(cfg.train.output_dir)
        draw_validation_predictions(cfg, out)
        print(f"trained in {time.perf_counter() - start:.0f} s; run folder {out} "
              f"(best.safetensors, metrics.jsonl, curves.png, eval/, predictions/)")
    return 0


def cmd_eval(args) -> int:
    from .data.detect import open_dataset
    from .engine.evaluation import format_metrics_table, format_per_class_table, match_model_classes
    from .deploy.backends import open_detector
    from .engine.inference import evaluate_detections, evaluate_proposals, run_inference
    from .engine.model_io import weights_file
    from .engine.trainer import resolve_device

    if args.diagnostics_thresh is not None and not 0.0 <= args.diagnostics_thresh <= 1.0:
        from .errors import InputError

        raise InputError(None, f"--diagnostics-thresh {args.diagnostics_thresh:g}: expected a score in [0, 1]")
    device = resolve_device(args.device)
    model, class_names, backend = open_detector(args.weights, backend=args.backend, device=device,
                                                overrides={"score_thresh": args.score_thresh}, named_only=True)
    model = _tiled(model, args)
    dataset = open_dataset(args.data, split=args.split, format=args.format)
    proposals = given_proposals(args.proposals, model, weights_file(args.weights), dataset, args.max_images)
    proposals_only = model.config.arch == "rpn"
    # Refused before the (long) inference when the model's classes do not cover the dataset's.
    if not proposals_only:
        match_model_classes(class_names, dataset.class_names, num_model_classes=model.config.num_classes,
                            source=weights_file(args.weights))
    if class_names is None:
        print(f"note: {weights_file(args.weights)} names no classes: its labels are taken as the dataset's "
              f"classes in order ({', '.join(dataset.class_names)})", file=sys.stderr)
    out = Path(args.output) if args.output else weights_file(args.weights).parent / "eval"
    start = time.perf_counter()
    detections, gts = run_inference(model, dataset, batch_size=args.batch_size, device=device,
                                    max_images=args.max_images, progress=True, proposals=proposals)
    seconds = time.perf_counter() - start
    if proposals_only:  # class-agnostic proposal recall (FPN paper Table 1)
        report = evaluate_proposals(dataset, detections, out_dir=out)
        print(format_metrics_table(report["metrics"], title="RPN proposal recall (class-agnostic)"))
    else:
        report = evaluate_detections(dataset, detections, gts, out_dir=out, model_class_names=class_names,
                                     model_source=weights_file(args.weights), diagnostics=not args.no_diagnostics,
                                     diagnostics_thresh=args.diagnostics_thresh)
        print(format_metrics_table(report["metrics"]))
        print(format_per_class_table(report["per_class_ap"], report["per_class_ap50"]))
        if "diagnostics" in report:
            from .engine.diagnostics import format_confusion_matrix

            print(format_confusion_matrix(report["diagnostics"]["confusion"], dataset.class_names))
            print(f"diagnostics in {report['diagnostics']['seconds']:.1f} s: confusion_matrix.csv/.png, "
                  "pr_curves_per_class.png, per_class_size_ap.csv, worst_false_positives.png, worst_misses.png, "
                  "diagnostics.json")
    tiling = f", tiles of {args.tile} px" if args.tile else ""
    print(f"{len(detections)} images in {seconds:.1f} s ({1000 * seconds / max(1, len(detections)):.0f} ms/image, "
          f"backend {backend}{tiling}); results in {out}")
    return 0


def given_proposals(path: Optional[str], model, weights: Path, dataset, max_images: Optional[int]):
    """The ``--proposals`` file of a fast_rcnn model, checked against the dataset (None for the
    other architectures, which refuse one)."""
    from .engine.proposals import ProposalFile
    from .errors import InputError

    if model.config.arch != "fast_rcnn":
        if path:
            raise InputError(path, f"--proposals is for model.arch=fast_rcnn models; {weights} is a "
                             f"{model.config.arch} model, which makes its own")
        return None
    if not path:
        raise InputError(weights, "is a Fast R-CNN model (model.arch=fast_rcnn), which runs on fixed proposals: "
                         "give --proposals FILE (written by `fpndet proposals`)")
    proposals = ProposalFile(path)
    proposals.check_covers(dataset, max_images=max_images)
    return proposals


def cmd_proposals(args) -> int:
    from .data.detect import open_dataset
    from .engine.evaluation import format_metrics_table
    from .engine.inference import evaluate_proposals, run_inference
    from .engine.model_io import load_detector, weights_file
    from .engine.proposals import save_proposals
    from .engine.trainer import resolve_device
    from .errors import InputError

    device = resolve_device(args.device)
    source = weights_file(args.weights)
    model, _ = load_detector(args.weights, device=device)
    if getattr(model, "rpn", None) is None:
        raise InputError(source, f"has no RPN (model.arch={model.config.arch}): proposals come from an rpn or "
                         "faster_rcnn model")
    rpn_model = model.proposal_model() if model.roi_heads is not None else model
    if args.topk is not None:
        rpn_model.rpn.post_nms_topk = (rpn_model.rpn.post_nms_topk[0], args.topk)
    if args.pre_topk is not None:
        rpn_model.rpn.pre_nms_topk = (rpn_model.rpn.pre_nms_topk[0], args.pre_topk)
    dataset = open_dataset(args.data, split=args.split, format=args.format)
    start = time.perf_counter()
    proposals, _ = run_inference(rpn_model, dataset, batch_size=args.batch_size, device=device, progress=True)
    seconds = time.perf_counter() - start
    path = save_proposals(args.output, dataset, proposals, source=str(source), dataset_spec=args.data, split=args.split)
    report = evaluate_proposals(dataset, proposals)
    print(format_metrics_table(report["metrics"], title="recall of the written proposals (class-agnostic)"))
    mean = sum(len(p["boxes"]) for p in proposals) / max(1, len(proposals))
    print(f"{len(proposals)} images, {mean:.0f} proposals per image, in {seconds:.1f} s; written to {path}")
    return 0


def cmd_predict(args) -> int:
    from .deploy.backends import open_detector
    from .engine.model_io import weights_file
    from .engine.predict import collect_images, predict_images
    from .engine.trainer import resolve_device

    images = collect_images(args.sources)
    model, class_names, backend = open_detector(args.weights, backend=args.backend, device=resolve_device(args.device),
                                                overrides={"score_thresh": args.score_thresh})
    if model.config.arch == "fast_rcnn":
        from .errors import InputError

        raise InputError(weights_file(args.weights), "is a Fast R-CNN model (model.arch=fast_rcnn), which runs on "
                         "fixed proposals of a dataset: use `fpndet eval --proposals FILE`, or predict with an "
                         "rpn + Fast R-CNN model (model.arch=faster_rcnn)")
    model = _tiled(model, args)
    done = predict_images(model, class_names, images, Path(args.output), batch_size=args.batch_size,
                          draw=not args.no_draw, workers=args.workers, resume=args.resume, progress=True)
    total = sum(len(r["detections"]) for r in done.predicted)
    resumed = f", {done.resumed} done before (--resume)" if done.resumed else ""
    print(f"{len(done.predicted)} images, {total} detections (score >= {args.score_thresh}, backend {backend}){resumed}; "
          f"written to {args.output}/ (one JSON per image, {done.combined.name} for all)")
    if done.skipped:
        print(f"{len(done.skipped)} image(s) skipped, unreadable:", file=sys.stderr)
        for path, problem in done.skipped.items():
            print(f"  {path}: {problem}", file=sys.stderr)
        return 2 if args.strict else 0
    return 0


def cmd_inspect(args) -> int:
    from .config import AUTO_ANCHOR_FIELDS, auto_anchor_fields, load_config, model_config
    from .data.detect import open_dataset
    from .engine.anchor_fit import format_anchor_fit
    from .engine.inspect import inspect_dataset

    cfg = load_config(args.config, list(args.overrides))
    dataset = open_dataset(args.data, split=args.split, format=args.format)
    auto = auto_anchor_fields(cfg)  # fitted from the paper's anchors, and inspected as fitted
    fields = AUTO_ANCHOR_FIELDS if args.suggest_anchors else auto
    if args.num_ratios is not None and ("anchor_ratios" not in fields or args.num_ratios < 1):
        from .errors import InputError

        raise InputError(None, f"--num-ratios {args.num_ratios}: give a count >= 1, with --suggest-anchors "
                         "(or model.anchor_ratios=auto)")
    report = inspect_dataset(dataset, model_config(cfg, reference_anchors=True), Path(args.output),
                             samples=args.samples, suggest_anchors=fields, num_ratios=args.num_ratios,
                             apply_fit=bool(auto))
    print(json.dumps(report["summary"], indent=2))
    if "anchor_fit" in report:
        print(format_anchor_fit(report["anchor_fit"], start_label="paper" if auto else "before"))
    print(f"report and figures in {args.output}/")
    return 0


def parse_input_size(text: Optional[str], source) -> Optional[object]:
    """``--input-size``: None, "max" or "HxW" -> None, "max" or (H, W); InputError otherwise."""
    from .errors import InputError

    if text is None or text == "max":
        return text
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(source, f"--input-size must be HxW (e.g. 608x608) or 'max', got {text!r}") from None
    return height, width


def cmd_export(args) -> int:
    from .deploy.export import export_onnx
    from .engine.model_io import load_detector, weights_file

    source = weights_file(args.weights)
    model, class_names = load_detector(args.weights, overrides={"score_thresh": args.score_thresh,
                                                                "detections_per_image": args.detections})
    output = Path(args.output) if args.output else source.parent / "model.onnx"
    start = time.perf_counter()
    export_onnx(model, output, class_names=class_names, opset=args.opset, raw=args.raw, input_dtype=args.input_dtype,
                input_size=parse_input_size(args.input_size, source), source=source)
    print(f"exported {source} to {output} ({output.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, "
          f"{'raw head outputs' if args.raw else 'detections'}, input {args.input_dtype}"
          f"{', fixed size ' + args.input_size if args.input_size else ''}) in "
          f"{time.perf_counter() - start:.0f} s")
    if args.check and not args.raw:
        from .deploy.benchmark import check_export

        line, equal = check_export(model, output, image_folder=args.images)
        print(line)
        return 0 if equal else 1
    return 0


def cmd_benchmark(args) -> int:
    from .deploy.benchmark import benchmark_backends, format_benchmark
    from .engine.trainer import resolve_device

    device = resolve_device(args.device)
    backends = args.backends.split(",") if args.backends else None
    rows = benchmark_backends(args.weights, device=device, batch=args.batch, size=args.size, image_folder=args.images,
                              repeats=args.repeats, backends=backends)
    print(format_benchmark(rows))
    if args.output:
        from .engine.evaluation import save_results_json

        save_results_json(Path(args.output), {"weights": str(args.weights), "batch": args.batch, "rows": rows})
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "proposals": cmd_proposals,
            "inspect": cmd_inspect, "export": cmd_export, "benchmark": cmd_benchmark}


class InputWarningPrinter:
    """Shows :class:`~fpndet.errors.InputWarning` as ``warning: <file>: <what>`` lines on stderr:
    the first ``limit`` of each kind, then only a count, summed up by :meth:`summary`. Other
    warnings go to ``fallback`` (Python's own format)."""

    def __init__(self, fallback, *, limit: int = 5):
        self.fallback, self.limit = fallback, limit
        self.counts: dict[str, int] = {}

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        if not isinstance(message, InputWarning):
            return self.fallback(message, category, filename, lineno, file, line)
        count = self.counts[message.kind] = self.counts.get(message.kind, 0) + 1
        if count <= self.limit:
            print(f"warning: {message}", file=sys.stderr)
        elif count == self.limit + 1:
            print(f"warning: further warnings of this kind are counted, not shown: {message.kind}", file=sys.stderr)

    def summary(self) -> None:
        for kind, count in self.counts.items():
            if count > self.limit:
                print(f"warning: {count} warnings in all: {kind}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    printer = InputWarningPrinter(warnings.showwarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", InputWarning)
            warnings.showwarning = printer
            return COMMANDS[args.command](args)
    except FpnDetError as err:
        if args.debug:
            raise
        print(f"fpndet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        printer.summary()


if __name__ == "__main__":
    sys.exit(main())
