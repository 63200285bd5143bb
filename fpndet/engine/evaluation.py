"""Detection metrics: COCO AP/AR through pycocotools, and Pascal VOC mAP@0.5.

COCO metrics follow the COCO detection evaluation protocol (as in the RetinaNet paper, Lin et al.
2017, Sec. 5: "AP" is the mean over IoU thresholds 0.50:0.05:0.95 of the 101-point interpolated
precision, averaged over categories). They are computed by pycocotools itself so the numbers match
the official implementation exactly; this module only converts tensors into its formats and reads
its arrays.

VOC mAP@0.5 follows the Pascal VOC development kit (Everingham et al., "The PASCAL Visual Object
Classes Challenge", IJCV 2010, Sec. 4.2): greedy matching in descending score order at IoU >= 0.5,
"difficult" objects ignored, all-point interpolated AP (VOC2010 and later) or the 11-point
interpolated AP of VOC2007.

VOC "difficult" objects in the COCO metrics: a ground-truth annotation with ``"difficult": 1``
is treated as the devkit treats it, not as a COCO crowd region (see :class:`CocoEvaluator`).

Model labels and dataset labels: a model's label ``i`` means its class ``model_class_names[i]``;
:func:`match_model_classes` maps it by name to the dataset's label (e.g. torchvision's COCO
models predict category ids, named with :data:`fpndet.engine.model_io.TORCHVISION_COCO_CATEGORIES`).

All boxes are ``(x1, y1, x2, y2)`` in absolute pixels unless a docstring says otherwise
(pycocotools' own formats use ``[x, y, width, height]``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from fpndet.engine.checkpoints import atomic_write_bytes
from fpndet.errors import InputError

COCO_METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]

_METRIC_DESCRIPTIONS = {
    "AP": "AP  @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AP50": "AP  @[IoU=0.50      | area=   all | maxDets=100]",
    "AP75": "AP  @[IoU=0.75      | area=   all | maxDets=100]",
    "APs": "AP  @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "APm": "AP  @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "APl": "AP  @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "AR1": "AR  @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
    "AR10": "AR  @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
    "AR100": "AR  @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "ARs": "AR  @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "ARm": "AR  @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "ARl": "AR  @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "AR1000": "AR  @[IoU=0.50:0.95 | area=   all | proposals=1000]",
    "ARs1000": "AR  @[IoU=0.50:0.95 | area= small | proposals=1000]",
    "ARm1000": "AR  @[IoU=0.50:0.95 | area=medium | proposals=1000]",
    "ARl1000": "AR  @[IoU=0.50:0.95 | area= large | proposals=1000]",
    # fpndet's own devkit metric (voc_map50 with use_07_metric=False), not a pycocotools one.
    "VOC_mAP50": "all-point interpolated AP at IoU >= 0.5 (VOC2010+ devkit rule)",
}

# pycocotools marks "undefined" (no ground truth in that category / area range) with -1.
UNDEFINED = -1.0


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def detections_to_coco_results(
    detections: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int],
) -> list[dict]:
    """Convert per-image detections into the COCO results format.

    Args:
        detections: one dict per image with ``"boxes"`` float Tensor[N, 4] (xyxy, absolute
            pixels), ``"scores"`` float Tensor[N] and ``"labels"`` int64 Tensor[N] holding
            contiguous class indices in ``[0, len(label_to_category_id))``.
        image_ids: the COCO image id of each entry of ``detections``.
        label_to_category_id: COCO category id of each contiguous label.

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...]``
        with the box rounded to 2 decimals (1/100 pixel) and the score to 5 decimals.

    Raises:
        ValueError: lengths differ, or a label has no category id.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detection entries but {len(image_ids)} image ids")
    category_lookup = np.asarray(list(label_to_category_id), dtype=np.int64)
    results: list[dict] = []
    for image_id, detection in zip(image_ids, detections):
        # Per-image arrays are small: NumPy avoids torch's per-op overhead here.
        boxes = detection["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4).numpy()
        scores = detection["scores"].detach().to("cpu", torch.float64).reshape(-1).numpy()
        labels = detection["labels"].detach().to("cpu", torch.int64).reshape(-1).numpy()
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(
                f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
            )
        if len(labels) == 0:
            continue
        outside = labels[(labels < 0) | (labels >= len(category_lookup))]
        if outside.size:
            raise ValueError(f"image {image_id}: label {int(outside[0])} outside [0, {len(category_lookup)})")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        xywh_list = np.round(xywh, 2).tolist()
        score_list = np.round(scores, 5).tolist()
        category_list = category_lookup[labels].tolist()
        results.extend(
            {"image_id": int(image_id), "category_id": category, "bbox": bbox, "score": score}
            for bbox, score, category in zip(xywh_list, score_list, category_list)
        )
    return results


# Placeholder names of unused label ids (torchvision's COCO list): never matched to a dataset class.
PLACEHOLDER_CLASS_NAMES = frozenset({"__background__", "N/A"})


def match_model_classes(
    model_class_names: Sequence[str] | None,
    dataset_class_names: Sequence[str],
    *,
    num_model_classes: int | None = None,
    source: str | os.PathLike | None = None,
) -> list[int] | None:
    """How a model's labels become a dataset's contiguous labels, by class name.

    Args:
        model_class_names: name of each model label ``0..K_model-1``; None for a model that
            names no classes: its labels are then taken as the dataset's labels, which requires
            ``num_model_classes == len(dataset_class_names)``.
        dataset_class_names: name of each dataset label ``0..K-1``.
        num_model_classes: the model's number of outputs (checked for unnamed models).
        source: the model's file, named in errors.

    Returns:
        None when the labels are the same (identical name lists, or an unnamed model of the
        dataset's size); else a list of length ``K_model`` giving the dataset label of each model
        label, or -1 for model classes the dataset does not have (their detections are dropped:
        they cannot be scored). Names ``"__background__"`` and ``"N/A"`` are never matched.

    Raises:
        InputError(source, ...): a dataset class is not among the model's classes, a dataset
            class is named by several model labels, or an unnamed model's size differs from the
            dataset's; the message lists both classes lists.
    """
    dataset_class_names = [str(name) for name in dataset_class_names]
    if model_class_names is None:
        if num_model_classes is not None and num_model_classes != len(dataset_class_names):
            raise InputError(
                source,
                f"the model names no classes and has {num_model_classes} outputs, but the dataset has "
                f"{len(dataset_class_names)} classes ({', '.join(dataset_class_names)}): cannot tell which "
                "output is which class",
            )
        return None
    model_class_names = [str(name) for name in model_class_names]
    if model_class_names == dataset_class_names:
        return None
    wanted = set(dataset_class_names)
    labels_of: dict[str, list[int]] = {}
    for label, name in enumerate(model_class_names):
        if name in wanted and name not in PLACEHOLDER_CLASS_NAMES:
            labels_of.setdefault(name, []).append(label)
    missing = [name for name in dataset_class_names if name not in labels_of]
    repeated = [name for name in dataset_class_names if len(labels_of.get(name, [])) > 1]
    if missing or repeated:
        problem = (
            f"the model does not know the dataset's class(es) {', '.join(missing)}"
            if missing
            else f"the model names the class(es) {', '.join(repeated)} more than once"
        )
        shown_model = [name for name in model_class_names if name not in PLACEHOLDER_CLASS_NAMES]
        raise InputError(
            source,
            f"{problem}: model classes ({len(shown_model)}): {', '.join(shown_model)}; "
            f"dataset classes ({len(dataset_class_names)}): {', '.join(dataset_class_names)}",
        )
    mapping = [-1] * len(model_class_names)
    for dataset_label, name in enumerate(dataset_class_names):
        mapping[labels_of[name][0]] = dataset_label
    return mapping


def remap_detection_labels(
    detections: Sequence[Mapping[str, torch.Tensor]], mapping: Sequence[int] | None
) -> list[dict[str, torch.Tensor]]:
    """Detections with model labels turned into dataset labels (see :func:`match_model_classes`).

    Args:
        detections: per image ``{"boxes": Tensor[N, 4], "scores": Tensor[N], "labels": int64
            Tensor[N]}`` with model labels (other keys are dropped from the copies).
        mapping: dataset label (or -1) of each model label; None: unchanged (the same dicts).

    Returns:
        Per image the detections whose class the dataset has, labels replaced, order kept.

    Raises:
        ValueError: a label outside ``[0, len(mapping))``.
    """
    if mapping is None:
        return list(detections)
    lookup = torch.as_tensor(list(mapping), dtype=torch.int64)
    remapped = []
    for detection in detections:
        labels = detection["labels"].detach().to("cpu", torch.int64).reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(lookup)):
            raise ValueError(f"model label outside [0, {len(lookup)})")
        new_labels = lookup[labels]
        keep = new_labels >= 0
        remapped.append(
            {
                "boxes": detection["boxes"].detach().cpu().reshape(-1, 4)[keep],
                "scores": detection["scores"].detach().cpu().reshape(-1)[keep],
                "labels": new_labels[keep],
            }
        )
    return remapped


def _build_coco(dataset: dict):
    """A ``pycocotools.coco.COCO`` built from an in-memory dict (no temp file, no prints)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _normalised_ground_truth(coco_gt: Mapping) -> dict:
    """Shallow copy of a COCO dict with ``area``/``iscrowd``/``id`` filled in where missing.

    A ``difficult`` (non-crowd) annotation gets ``iscrowd = 1`` here, pycocotools' flag for "an
    ignored box that any number of detections may match"; :class:`_DevkitDifficultCOCOeval`
    then scores it by plain IoU instead of crowd IoU.
    """
    annotations = []
    for index, annotation in enumerate(coco_gt.get("annotations", [])):
        annotation = dict(annotation)
        x, y, w, h = annotation["bbox"]
        annotation.setdefault("area", float(w) * float(h))
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("id", index + 1)
        if annotation.get("difficult") and not annotation["iscrowd"]:
            annotation["difficult"], annotation["iscrowd"] = 1, 1
        else:
            annotation["difficult"] = 0
        annotations.append(annotation)
    return {
        "info": dict(coco_gt.get("info", {})),
        "images": [dict(image) for image in coco_gt.get("images", [])],
        "categories": [dict(category) for category in coco_gt.get("categories", [])],
        "annotations": annotations,
    }


def _devkit_difficult_cocoeval():
    """``COCOeval`` whose ``difficult`` ground truth is matched by IoU (built lazily: pycocotools
    is imported only when evaluating)."""
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    class _DevkitDifficultCOCOeval(COCOeval):
        """pycocotools' ``COCOeval`` (bbox) with VOC devkit "difficult" objects.

        A ground truth marked ``difficult`` (and ``iscrowd`` 1 by :func:`_normalised_ground_truth`)
        keeps pycocotools' crowd handling in ``evaluateImg``: it is ignored (``gtIgnore``: an
        unmatched one is no miss), a detection matched to it is ignored (``dtIgnore``: neither TP
        nor FP), and it can be matched by any number of detections, like the devkit, which never
        sets the "detected" flag of a difficult object. Only its overlap differs: plain IoU
        (``computeIoU`` below) instead of crowd IoU (intersection over the detection's area), so
        that, as in the devkit, a detection needs IoU >= threshold with it to be ignored.
        Assignment stays COCO's: a detection takes the best still-free regular box with IoU >=
        threshold first and falls back to an ignored (crowd or difficult) box.
        """

        def computeIoU(self, imgId, catId):  # noqa: N802, N803 (pycocotools' names)
            p = self.params
            if p.iouType != "bbox" or not p.useCats:
                return super().computeIoU(imgId, catId)
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
            if len(gt) == 0 and len(dt) == 0:
                return []
            # As pycocotools: detections by descending score (stable), at most maxDets[-1].
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][: p.maxDets[-1]]
            crowd_iou = [int(g["iscrowd"]) and not g.get("difficult", 0) for g in gt]
            return mask_utils.iou([d["bbox"] for d in dt], [g["bbox"] for g in gt], crowd_iou)

    return _DevkitDifficultCOCOeval


class CocoEvaluator:
    """COCO bounding-box evaluation of results against an in-memory COCO ground truth.

    pycocotools' ``COCOeval`` itself computes every number, so ground truth without
    ``difficult`` objects gives exactly what ``COCOeval(COCO(file), ...)`` gives on that file.

    Args:
        coco_gt: COCO-format dict with ``images``, ``annotations`` (each with ``bbox`` as
            ``[x, y, w, h]`` pixels, ``category_id``, ``image_id``; ``area`` and ``iscrowd``
            default to ``w * h`` and 0; pycocotools' size ranges use ``area``) and
            ``categories``. It is not modified. An annotation with ``"difficult": 1`` (VOC) is
            evaluated by the devkit rule (Everingham et al. 2010, Sec. 4.2; devkit
            ``VOCevaldet.m``): matched by IoU, a detection matched to it is neither a true nor a
            false positive, any number of detections may match it, and it is no miss when
            unmatched. Crowd annotations keep pycocotools' crowd rule.
        class_names: display names of the categories in ascending category-id order (the order of
            :attr:`category_ids`); defaults to the categories' ``name`` fields.

    Attributes:
        category_ids: COCO category ids, ascending (index k of pycocotools' arrays).
        class_names: one name per entry of ``category_ids``.
    """

    def __init__(self, coco_gt: Mapping, *, class_names: Sequence[str] | None = None):
        self._coco_gt = _build_coco(_normalised_ground_truth(coco_gt))
        self.category_ids: list[int] = sorted(self._coco_gt.getCatIds())
        if class_names is None:
            names = {c["id"]: str(c.get("name", c["id"])) for c in self._coco_gt.dataset["categories"]}
            class_names = [names[category_id] for category_id in self.category_ids]
        if len(class_names) != len(self.category_ids):
            raise ValueError(f"{len(class_names)} class names for {len(self.category_ids)} categories")
        self.class_names: list[str] = list(class_names)

    def evaluate(self, results: Sequence[Mapping]) -> dict:
        """Run pycocotools' COCOeval (``iouType="bbox"``) on results.

        Args:
            results: COCO results (see :func:`detections_to_coco_results`); not modified. May be
                empty: then every metric is 0.0 where ground truth exists.

        Returns:
            ``{"metrics": {name: float} for name in COCO_METRIC_NAMES,
            "per_class_ap": {class_name: AP@[.5:.95]}, "per_class_ap50": {class_name: AP@.5},
            "precision": np.ndarray[T=10, R=101, K, A=4, M=3]}`` (``COCOeval.eval["precision"]``:
            IoU thresholds x recall thresholds x categories x area ranges x maxDets).
            As in pycocotools, -1.0 marks a value without ground truth (e.g. ``APs`` when no
            object is small, or a category that has no objects).

        Raises:
            ValueError: a result names an image that is not in the ground truth.
        """
        coco_dt = self._load_results(results)
        evaluator = _devkit_difficult_cocoeval()(self._coco_gt, coco_dt, iouType="bbox")
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics = {name: float(value) for name, value in zip(COCO_METRIC_NAMES, evaluator.stats)}
        precision = evaluator.eval["precision"]
        iou_50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
        per_class_ap = {}
        per_class_ap50 = {}
        for k, name in enumerate(self.class_names):
            per_class_ap[name] = _mean_defined(precision[:, :, k, 0, -1])
            per_class_ap50[name] = _mean_defined(precision[iou_50, :, k, 0, -1])
        return {
            "metrics": metrics,
            "per_class_ap": per_class_ap,
            "per_class_ap50": per_class_ap50,
            "precision": precision,
        }

    def _load_results(self, results: Sequence[Mapping]):
        known_images = set(self._coco_gt.getImgIds())
        unknown = {int(r["image_id"]) for r in results} - known_images
        if unknown:
            raise ValueError(f"results name images not in the ground truth: {sorted(unknown)[:10]}")
        if len(results) == 0:
            # pycocotools' loadRes indexes results[0]; an empty result set is built directly.
            return _build_coco(
                {
                    "images": self._coco_gt.dataset["images"],
                    "categories": copy.deepcopy(self._coco_gt.dataset["categories"]),
                    "annotations": [],
                }
            )
        # loadRes adds keys to each result dict: hand it copies.
        with contextlib.redirect_stdout(io.StringIO()):
            return self._coco_gt.loadRes([dict(r) for r in results])


PROPOSAL_METRIC_NAMES = ["AR100", "AR1000", "ARs1000", "ARm1000", "ARl1000"]


def proposals_to_coco_results(proposals: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                              category_id: int) -> list[dict]:
    """COCO results of class-agnostic proposals: per image ``{"boxes" [N, 4] xyxy pixels,
    "scores" [N]}`` -> ``{"image_id", "category_id" (the same for all), "bbox" [x, y, w, h],
    "score"}`` (pycocotools ignores the category when ``useCats=0``)."""
    results = []
    for proposal, image_id in zip(proposals, image_ids):
        boxes = proposal["boxes"].detach().cpu().double().reshape(-1, 4)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for bbox, score in zip(xywh, proposal["scores"].detach().cpu().double().reshape(-1).tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_id), "bbox": bbox,
                            "score": float(score)})
    return results


def proposal_recall(coco_gt: Mapping, results: Sequence[Mapping], *,
                    max_proposals: tuple[int, int] = (100, 1000)) -> dict[str, float]:
    """Class-agnostic average recall of proposals, the RPN metric of the FPN paper's Table 1
    (AR@100, AR@1k, and AR_s, AR_m, AR_l at 1k proposals; AR averaged over IoU 0.50:0.05:0.95).

    Computed by pycocotools' ``COCOeval`` itself (``iouType="bbox"``, ``params.useCats = 0``,
    ``params.maxDets = max_proposals``), read from ``eval["recall"]`` ``[T, 1, A, M]``: crowd
    regions are ignored as in COCO detection evaluation, small/medium/large by the annotation's
    ``area``.

    Args:
        coco_gt: COCO-format ground truth (see :class:`CocoEvaluator`).
        results: COCO results of the proposals (see :func:`proposals_to_coco_results`).
        max_proposals: the two proposal counts (100, 1000).

    Returns:
        ``{"AR100", "AR1000", "ARs1000", "ARm1000", "ARl1000"}`` (with other counts, the names
        carry those numbers); -1 where no ground truth falls in the size range.
    """
    evaluator = CocoEvaluator(coco_gt)
    coco_dt = evaluator._load_results(results)
    from pycocotools.cocoeval import COCOeval

    cocoeval = COCOeval(evaluator._coco_gt, coco_dt, iouType="bbox")
    cocoeval.params.useCats = 0
    cocoeval.params.maxDets = list(max_proposals)
    with contextlib.redirect_stdout(io.StringIO()):
        cocoeval.evaluate()
        cocoeval.accumulate()
    recall = cocoeval.eval["recall"]  # [T, K=1, A=(all, small, medium, large), M]
    few, many = max_proposals
    return {
        f"AR{few}": _mean_defined(recall[:, 0, 0, 0]),
        f"AR{many}": _mean_defined(recall[:, 0, 0, 1]),
        f"ARs{many}": _mean_defined(recall[:, 0, 1, 1]),
        f"ARm{many}": _mean_defined(recall[:, 0, 2, 1]),
        f"ARl{many}": _mean_defined(recall[:, 0, 3, 1]),
    }


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else UNDEFINED


def format_metrics_table(metrics: Mapping[str, float], *, title: str = "COCO bbox metrics") -> str:
    """Aligned two-column text table of metrics.

    Each row holds the metric name, for COCO names pycocotools' description (IoU range, area,
    maxDets) and for ``VOC_mAP50`` the devkit rule it follows, and the value.
    Values are shown with 4 decimals; -1 (undefined) is shown as ``n/a``.
    """
    name_width = max([0] + [len(name) for name in metrics])
    rows = [
        (f"{name:<{name_width}}  {_METRIC_DESCRIPTIONS.get(name, '')}".rstrip(), value)
        for name, value in metrics.items()
    ]
    key_width = max([len(title)] + [len(key) for key, _ in rows])
    lines = [title, "-" * (key_width + 10)]
    for key, value in rows:
        lines.append(f"{key:<{key_width}}  {_format_value(value):>8}")
    return "\n".join(lines)


def format_per_class_table(
    per_class: Mapping[str, float],
    per_class_ap50: Mapping[str, float] | None = None,
    *,
    value_name: str = "AP",
    columns: int = 3,
) -> str:
    """Per-class values side by side in ``columns`` groups of ``class | value [| AP50]``.

    Args:
        per_class: class name -> value (e.g. ``per_class_ap`` from :meth:`CocoEvaluator.evaluate`).
        per_class_ap50: optional second value per class, shown in an ``AP50`` column.
        value_name: heading of the first value column.
        columns: class groups per line.

    Values are shown in percent with 1 decimal (e.g. ``37.4``); -1 (undefined) as ``n/a``.
    """
    items = list(per_class.items())
    if not items:
        return "(no classes)"
    columns = max(1, min(columns, len(items)))
    name_width = max(len("class"), *(len(name) for name, _ in items))

    def cell(name: str, first: object, second: object) -> str:
        text = f"{name:<{name_width}}  {first:>6}"
        return text if per_class_ap50 is None else f"{text}  {second:>6}"

    cells = [
        cell(name, _format_percent(value), _format_percent((per_class_ap50 or {}).get(name, -1.0)))
        for name, value in items
    ]
    separator = " | "
    lines = [separator.join([cell("class", value_name, "AP50")] * columns)]
    lines.append("-" * len(lines[0]))
    for start in range(0, len(cells), columns):
        lines.append(separator.join(cells[start : start + columns]))
    return "\n".join(lines)


def _format_value(value: float) -> str:
    return "n/a" if value is None or value < 0 or math.isnan(value) else f"{value:.4f}"


def _format_percent(value: float) -> str:
    return "n/a" if value is None or value < 0 or math.isnan(value) else f"{100 * value:.1f}"


def save_results_json(path: str | os.PathLike, results: object) -> None:
    """Write ``results`` (COCO results list or a metrics dict) as JSON, atomically.

    The file is written to a temporary file in the same folder, fsync'ed, then renamed over
    ``path``, so a crash never leaves a half-written file at ``path``.
    """
    data = json.dumps(results, default=_json_default).encode("utf-8")
    atomic_write_bytes(path, data)


def _json_default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------
def voc_map50(
    detections: Sequence[Mapping[str, torch.Tensor]],
    ground_truths: Sequence[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
) -> dict:
    """Pascal VOC mean average precision at one IoU threshold.

    Matching follows the VOC devkit (Everingham et al. 2010, Sec. 4.2): per class, detections in
    descending score order are assigned to the ground truth box of highest IoU in their image; if
    that IoU >= ``iou_threshold`` the detection is a true positive when the box is not yet taken,
    a false positive when it is, and ignored (neither) when the box is "difficult". Otherwise it
    is a false positive. Boxes use continuous pixel coordinates (no "+1" width convention).

    Args:
        detections: per image ``{"boxes": float Tensor[N, 4] xyxy pixels, "scores": Tensor[N],
            "labels": int64 Tensor[N] in [0, num_classes)}``.
        ground_truths: per image (same order) ``{"boxes": Tensor[G, 4], "labels": Tensor[G],
            "iscrowd": Tensor[G]}``, where a non-zero ``iscrowd`` means "difficult" (optional key).
        num_classes: number of contiguous classes.
        iou_threshold: minimum IoU of a true positive.
        use_07_metric: 11-point interpolated AP (VOC2007 devkit, recall levels ``k * 0.1`` as
            IEEE doubles, so a recall of exactly 3/10 does not reach level 0.3; see
            :func:`_eleven_point_ap`) instead of all-point AP (VOC2010+).

    Returns:
        ``{"mAP50": float, "per_class_ap50": list[float]}``; a class without non-difficult ground
        truth gets -1.0 and is left out of the mean (mAP50 is -1.0 when no class has any).

    Raises:
        ValueError: ``detections`` and ``ground_truths`` differ in length.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection entries but {len(ground_truths)} ground truths")
    positives = np.zeros(num_classes, dtype=np.int64)
    labels, scores, outcomes = [], [], []
    for detection, truth in zip(detections, ground_truths):
        gt_boxes, gt_labels, gt_difficult = _voc_ground_truth(truth, num_classes)
        positives += np.bincount(gt_labels[~gt_difficult].numpy(), minlength=num_classes)
        dt_boxes, dt_scores, dt_labels = _voc_detections(detection, num_classes)
        order = torch.argsort(dt_scores, descending=True, stable=True)
        dt_boxes, dt_scores, dt_labels = dt_boxes[order], dt_scores[order], dt_labels[order]
        outcomes.append(_match_image(dt_boxes, dt_labels, gt_boxes, gt_labels, gt_difficult, iou_threshold))
        labels.append(dt_labels.numpy())
        scores.append(dt_scores.numpy())
    labels_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    scores_all = np.concatenate(scores) if scores else np.zeros(0)
    outcomes_all = np.concatenate(outcomes) if outcomes else np.zeros(0, dtype=np.int8)

    per_class = []
    for class_index in range(num_classes):
        if positives[class_index] == 0:
            per_class.append(UNDEFINED)
            continue
        # Detections of this class, difficult-matched ones (-1) dropped.
        kept = (labels_all == class_index) & (outcomes_all >= 0)
        order = np.argsort(-scores_all[kept], kind="stable")
        is_tp = outcomes_all[kept][order] == 1
        per_class.append(_average_precision(is_tp, int(positives[class_index]), use_07_metric))
    defined = [ap for ap in per_class if ap >= 0]
    mean_ap = float(np.mean(defined)) if defined else UNDEFINED
    return {"mAP50": mean_ap, "per_class_ap50": per_class}


def _voc_ground_truth(truth: Mapping, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes float64[G, 4], labels int64[G], difficult bool[G]) on the CPU, labels checked."""
    boxes = truth["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
    labels = truth["labels"].detach().to("cpu", torch.int64).reshape(-1)
    difficult = truth.get("iscrowd")
    if difficult is None:
        difficult = torch.zeros(len(labels), dtype=torch.bool)
    else:
        difficult = difficult.detach().to("cpu").reshape(-1).bool()
    _check_labels(labels, num_classes, "ground truth")
    return boxes, labels, difficult


def _voc_detections(detection: Mapping, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes float64[N, 4], scores float64[N], labels int64[N]) on the CPU, labels checked."""
    boxes = detection["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
    scores = detection["scores"].detach().to("cpu", torch.float64).reshape(-1)
    labels = detection["labels"].detach().to("cpu", torch.int64).reshape(-1)
    _check_labels(labels, num_classes, "detection")
    return boxes, scores, labels


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    values = labels.numpy()
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        raise ValueError(f"{what} label {int(outside[0])} outside [0, {num_classes})")


def _match_image(
    dt_boxes: torch.Tensor,
    dt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_difficult: torch.Tensor,
    iou_threshold: float,
) -> np.ndarray:
    """Greedy VOC matching in one image, all classes at once (a detection only sees boxes of its
    own class), for detections sorted by descending score.

    Returns int8 array[N]: 1 true positive, 0 false positive, -1 ignored (hit a difficult box).
    """
    outcome = np.zeros(len(dt_boxes), dtype=np.int8)
    if len(dt_boxes) == 0 or len(gt_boxes) == 0:
        return outcome
    # Small per-image arrays: reductions in NumPy (torch's intra-op threads cost more than the
    # work here).
    ious = box_iou(dt_boxes, gt_boxes).numpy()  # [N, G]
    ious = np.where(dt_labels.numpy()[:, None] == gt_labels.numpy()[None, :], ious, -1.0)
    best_gt = ious.argmax(axis=1)
    above = (ious[np.arange(len(best_gt)), best_gt] >= iou_threshold).tolist()
    best_gt_list = best_gt.tolist()
    difficult = gt_difficult.tolist()
    taken = [False] * len(gt_boxes)
    for index, (hit, gt_index) in enumerate(zip(above, best_gt_list)):
        if not hit:
            continue
        if difficult[gt_index]:
            outcome[index] = -1
        elif not taken[gt_index]:
            taken[gt_index] = True
            outcome[index] = 1
    return outcome


def _average_precision(is_tp: np.ndarray, positives: int, use_07_metric: bool) -> float:
    """AP of detections sorted by descending score (bool array: true positive or not)."""
    if is_tp.size == 0:
        return 0.0
    true_positives = np.cumsum(is_tp)
    recall = true_positives / positives
    precision = true_positives / np.arange(1, is_tp.size + 1)
    if use_07_metric:
        return _eleven_point_ap(recall, precision)
    return _all_point_ap(recall, precision)


def _all_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (precision made non-increasing in recall), VOC2010+."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


# The recall levels of the VOC2007 devkit's ``for t=0:0.1:1`` (VOCevaldet.m) as the doubles
# k * 0.1, as py-faster-rcnn, Detectron and mmdet compute them (``np.arange(0., 1.1, 0.1)``).
_VOC07_RECALL_LEVELS = np.arange(11) * 0.1


def _eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: the mean over 11 recall levels t of the max precision at recall >= t
    (VOCevaldet.m: ``for t=0:0.1:1, p=max(prec(rec>=t)); ... ap=ap+p/11``).

    The levels are the doubles ``k * 0.1`` (:data:`_VOC07_RECALL_LEVELS`), not exact tenths: 0.1
    is not a double, and MATLAB's ``0:0.1:1`` gives 0.30000000000000004 as its fourth level, so
    a recall of exactly 3/10 does not reach level 0.3 (10 objects, 3 true positives then 2 false
    positives: AP 3/11, not 4/11). Levels 0.6 and 0.7 are taken as ``6 * 0.1`` and ``7 * 0.1``
    like the Python ports (not checked against a MATLAB run; they matter only when a recall is
    exactly 6/10 or 7/10).

    Args:
        recall: float array[N], non-decreasing, true positives so far / positives.
        precision: float array[N], true positives so far / detections so far.

    Returns:
        AP in [0, 1].
    """
    levels = _VOC07_RECALL_LEVELS
    reached = recall[None, :] >= levels[:, None]
    best = np.where(reached, precision[None, :], 0.0).max(axis=1)
    return float(best.mean())
