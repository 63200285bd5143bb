"""Diagnostics of a detector's evaluation: confusion matrix, per-class precision-recall curves,
per-class AP by object size, and pictures of the worst false positives and misses.

:func:`write_diagnostics` writes them next to ``metrics.json`` (``fpndet eval`` and the trainer's
evaluations call it through :func:`fpndet.engine.inference.evaluate_detections`).

Confusion matrix convention (:func:`confusion_matrix`): a ``(K + 1) x (K + 1)`` integer matrix
``M`` for K classes. **Rows are the true class** (ground truth), with a last *background* row;
**columns are the predicted class**, with a last *background* column:

* ``M[t, p]`` (``t, p < K``): detections of class ``p`` matched to a ground-truth object of
  class ``t``: correct on the diagonal, class confusions off it;
* ``M[K, p]``: false positives of class ``p`` matched to no object (background, or a duplicate
  of an object another detection already took);
* ``M[t, K]``: objects of class ``t`` that no detection matched (misses);
* ``M[K, K]`` is always 0.

So row ``t`` sums to the number of (non-ignored) objects of class ``t``, column ``p`` to the
number of detections of class ``p`` that count, ``M[t, t] / row sum`` is the recall of class
``t`` and ``M[t, t] / column sum`` its precision, at IoU 0.5 and the score threshold. (ultralytics
draws the transpose: predicted rows, true columns.) The normalised picture divides each row by its
sum (the colours of ``confusion_matrix.png``): how the objects of a class end up, and for the
background row which classes the false positives claim to be.

Matching (per image, all classes at once): detections scoring at least ``score_thresh`` are taken
in descending score order (ties keep their order); each takes, among the still unmatched regular
objects with IoU >= ``iou_thresh`` (:func:`torchvision.ops.box_iou`), the one of its own class
with the highest IoU, else sits on an ignored object of its own class (not counted), else takes
the object of another class with the highest IoU (a confusion), else sits on an ignored object of
another class (not counted), else is a false positive: a *duplicate* when it overlaps an object
already taken, *background* otherwise. One detection matches at most one object and one object
at most one detection. Ignored objects are COCO crowd regions and VOC ``difficult`` objects
(``iscrowd`` in the ground truth): never misses, and detections on them are neither correct nor
false positives. As in the COCO metrics, a detection is on a crowd region when the intersection
covers at least ``iou_thresh`` of the *detection* (pycocotools' crowd overlap) and on a VOC
difficult object when their IoU is at least ``iou_thresh`` (the devkit's rule).

The score threshold defaults to 0.3 (:data:`DEFAULT_SCORE_THRESH`), the score threshold of
``fpndet predict``: the matrix describes the detections a user of the model sees; COCO AP itself
is computed from every detection (the model's own threshold, 0.05 by default).

Boxes are ``(x1, y1, x2, y2)`` in absolute pixels.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from fpndet.engine.checkpoints import atomic_write_bytes
from fpndet.errors import InputError

DEFAULT_SCORE_THRESH = 0.3
MATCH_IOU = 0.5
MAX_PICTURES = 8
PICTURES_PER_IMAGE = 2
PICTURE_SIZE = 224

# What a detection above the threshold turned out to be.
CORRECT, CONFUSED, DUPLICATE, BACKGROUND, IGNORED = range(5)
OUTCOME_NAMES = ("correct", "confused", "duplicate", "background", "ignored")

# pycocotools' area ranges (Params.areaRng): both ends inclusive, so an object of exactly 32^2 or
# 96^2 pixels counts in the two ranges it borders, as in COCOeval.
AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e5**2)}

# Files written by write_diagnostics (removed by remove_diagnostics).
DIAGNOSTIC_FILES = (
    "diagnostics.json",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "pr_curves_per_class.png",
    "per_class_size_ap.csv",
    "worst_false_positives.png",
    "worst_misses.png",
)


@dataclass
class ConfusionResult:
    """What :func:`confusion_matrix` found.

    Attributes:
        matrix: int64 ``[K + 1, K + 1]``, rows true class + background, columns predicted class +
            background (module doc).
        score_thresh, iou_thresh: the thresholds used.
        fp_image: int64 ``[F]`` dataset index of each false positive (confusions, duplicates and
            background detections, in dataset then descending-score order);
        fp_boxes: float64 ``[F, 4]``; fp_scores: ``[F]``; fp_labels: int64 ``[F]`` predicted class;
        fp_kinds: int8 ``[F]`` (:data:`CONFUSED`, :data:`DUPLICATE` or :data:`BACKGROUND`);
        fp_true: int64 ``[F]`` true class of a confusion, -1 otherwise.
        miss_image: int64 ``[M]`` dataset index of each missed object; miss_boxes: float64
            ``[M, 4]``; miss_labels: int64 ``[M]``.
    """

    matrix: np.ndarray
    score_thresh: float
    iou_thresh: float
    fp_image: np.ndarray
    fp_boxes: np.ndarray
    fp_scores: np.ndarray
    fp_labels: np.ndarray
    fp_kinds: np.ndarray
    fp_true: np.ndarray
    miss_image: np.ndarray
    miss_boxes: np.ndarray
    miss_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.matrix.shape[0] - 1

    def per_class(self, class_names: Sequence[str]) -> dict[str, dict]:
        """Per class ``{"objects", "detections", "correct", "confused_as_other", "missed",
        "false_positives", "precision", "recall"}`` at the thresholds (counts from the matrix;
        precision/recall -1 when the class has no counted detection/object)."""
        k = self.num_classes
        out = {}
        for c, name in enumerate(class_names):
            objects, detections, correct = int(self.matrix[c, :].sum()), int(self.matrix[:, c].sum()), int(self.matrix[c, c])
            out[name] = {
                "objects": objects,
                "detections": detections,
                "correct": correct,
                "confused_as_other": int(self.matrix[c, :k].sum() - correct),
                "missed": int(self.matrix[c, k]),
                "false_positives": int(detections - correct),
                "precision": correct / detections if detections else -1.0,
                "recall": correct / objects if objects else -1.0,
            }
        return out

    def summary(self) -> dict[str, int]:
        """Totals: correct, confused, duplicate, background, missed, objects."""
        k = self.num_classes
        correct = int(np.trace(self.matrix[:k, :k]))
        kinds = np.bincount(self.fp_kinds.astype(np.int64), minlength=len(OUTCOME_NAMES))
        return {
            "objects": int(self.matrix[:k, :].sum()),
            "correct": correct,
            "confused": int(self.matrix[:k, :k].sum() - correct),
            "duplicate": int(kinds[DUPLICATE]),
            "background": int(kinds[BACKGROUND]),
            "missed": int(self.matrix[:k, k].sum()),
        }


# --------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------
def confusion_matrix(
    detections: Sequence[Mapping[str, torch.Tensor]],
    ground_truths: Sequence[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    score_thresh: float = DEFAULT_SCORE_THRESH,
    iou_thresh: float = MATCH_IOU,
    crowd_ioa: bool = True,
) -> ConfusionResult:
    """Confusion matrix of detections against ground truth (convention and matching: module doc).

    Args:
        detections: per image ``{"boxes" [N, 4], "scores" [N], "labels" int64 [N] in [0, K)}``.
        ground_truths: per image (same order) ``{"boxes" [G, 4], "labels" [G], "iscrowd" [G]
            (optional; non-zero: an ignored object, COCO crowd or VOC difficult)}``.
        num_classes: K.
        score_thresh: detections scoring below it are left out.
        iou_thresh: the overlap a match needs.
        crowd_ioa: ignored objects are COCO crowd regions, overlapped by intersection over the
            detection's area; False: VOC difficult objects, overlapped by IoU.

    Raises:
        ValueError: lengths differ, or a label outside ``[0, K)``.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection entries but {len(ground_truths)} ground truths")
    k = int(num_classes)
    cells, fps, misses = [], [], []
    for index, (detection, truth) in enumerate(zip(detections, ground_truths)):
        boxes, scores, labels = _detections_above(detection, score_thresh, k)
        gt_boxes, gt_labels, gt_ignored = _ground_truth(truth, k)
        kinds, true, taken = _match_image(boxes, labels, gt_boxes, gt_labels, gt_ignored, iou_thresh, crowd_ioa)
        counted = (kinds == CORRECT) | (kinds == CONFUSED)
        false = (kinds == BACKGROUND) | (kinds == DUPLICATE)
        missed = ~taken & ~gt_ignored
        labels_np, gt_labels_np = labels.numpy(), gt_labels.numpy()
        rows = np.concatenate([true[counted], np.full(int(false.sum()), k), gt_labels_np[missed]])
        cols = np.concatenate([labels_np[counted], labels_np[false], np.full(int(missed.sum()), k)])
        cells.append(rows * (k + 1) + cols)
        wrong = false | (kinds == CONFUSED)
        if wrong.any():
            fps.append((np.full(int(wrong.sum()), index), boxes.numpy()[wrong], scores.numpy()[wrong],
                        labels_np[wrong], kinds[wrong], np.where(kinds[wrong] == CONFUSED, true[wrong], -1)))
        if missed.any():
            misses.append((np.full(int(missed.sum()), index), gt_boxes.numpy()[missed], gt_labels_np[missed]))
    flat = np.concatenate(cells).astype(np.int64) if cells else np.zeros(0, np.int64)
    matrix = np.bincount(flat, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

    def joined(parts, position, dtype, shape=(0,)):
        return np.concatenate([p[position] for p in parts]).astype(dtype) if parts else np.zeros(shape, dtype)

    return ConfusionResult(
        matrix=matrix, score_thresh=float(score_thresh), iou_thresh=float(iou_thresh),
        fp_image=joined(fps, 0, np.int64), fp_boxes=joined(fps, 1, np.float64, (0, 4)),
        fp_scores=joined(fps, 2, np.float64), fp_labels=joined(fps, 3, np.int64), fp_kinds=joined(fps, 4, np.int8),
        fp_true=joined(fps, 5, np.int64),
        miss_image=joined(misses, 0, np.int64), miss_boxes=joined(misses, 1, np.float64, (0, 4)),
        miss_labels=joined(misses, 2, np.int64),
    )  # fmt: skip


def _plain(tensor) -> torch.Tensor:
    return torch.as_tensor(tensor).detach().as_subclass(torch.Tensor).cpu()


def _detections_above(detection: Mapping, score_thresh: float, k: int):
    """(boxes float64 [N, 4], scores float64 [N], labels int64 [N]) scoring >= the threshold, by
    descending score (stable)."""
    boxes = _plain(detection["boxes"]).to(torch.float64).reshape(-1, 4)
    scores = _plain(detection["scores"]).to(torch.float64).reshape(-1)
    labels = _plain(detection["labels"]).to(torch.int64).reshape(-1)
    _check_labels(labels, k, "detection")
    keep = scores >= score_thresh
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = torch.argsort(scores, descending=True, stable=True)
    return boxes[order], scores[order], labels[order]


def _ground_truth(truth: Mapping, k: int):
    """(boxes float64 [G, 4], labels int64 [G], ignored bool ndarray [G])."""
    boxes = _plain(truth["boxes"]).to(torch.float64).reshape(-1, 4)
    labels = _plain(truth["labels"]).to(torch.int64).reshape(-1)
    _check_labels(labels, k, "ground truth")
    ignored = truth.get("iscrowd")
    ignored = np.zeros(len(labels), bool) if ignored is None else _plain(ignored).reshape(-1).bool().numpy()
    return boxes, labels, ignored


def _check_labels(labels: torch.Tensor, k: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        bad = labels[(labels < 0) | (labels >= k)][0]
        raise ValueError(f"{what} label {int(bad)} outside [0, {k})")


def _match_image(boxes, labels, gt_boxes, gt_labels, gt_ignored, iou_thresh, crowd_ioa):
    """Greedy matching of one image's detections (sorted by descending score) to its objects.

    Returns:
        (kinds int8 [N] (CORRECT ... IGNORED), true int64 [N] the matched object's class or -1,
        taken bool [G] objects matched).
    """
    n, g = len(boxes), len(gt_boxes)
    kinds = np.full(n, BACKGROUND, np.int8)
    true = np.full(n, -1, np.int64)
    taken = np.zeros(g, bool)
    if n == 0 or g == 0:
        return kinds, true, taken
    iou = box_iou(boxes, gt_boxes).numpy()  # [N, G]
    overlap = iou
    if crowd_ioa and gt_ignored.any():  # crowd regions: intersection over the detection's area
        overlap = iou.copy()
        overlap[:, gt_ignored] = _intersection_over_first(boxes.numpy(), gt_boxes.numpy()[gt_ignored])
    hit = overlap >= iou_thresh
    regular_hit = hit & ~gt_ignored[None, :]
    ignored_hit = hit & gt_ignored[None, :]
    same = labels.numpy()[:, None] == gt_labels.numpy()[None, :]
    gt_label_list = gt_labels.tolist()
    # Detections overlapping nothing stay background; the others are matched in score order.
    for d in np.flatnonzero(hit.any(axis=1)).tolist():
        free = regular_hit[d] & ~taken
        own = free & same[d]
        if own.any():
            choice, kinds[d] = int(np.argmax(np.where(own, iou[d], -1.0))), CORRECT
        elif (ignored_hit[d] & same[d]).any():
            kinds[d] = IGNORED
            continue
        elif free.any():
            choice, kinds[d] = int(np.argmax(np.where(free, iou[d], -1.0))), CONFUSED
        elif ignored_hit[d].any():
            kinds[d] = IGNORED
            continue
        else:
            kinds[d] = DUPLICATE if regular_hit[d].any() else BACKGROUND
            continue
        taken[choice] = True
        true[d] = gt_label_list[choice]
    return kinds, true, taken


def _intersection_over_first(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] intersection area over the area of each box of ``a`` (pycocotools' crowd overlap)."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(high - low, 0.0, None).prod(axis=2)
    area = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    return np.where(area > 0, inter / np.where(area > 0, area, 1.0), 0.0)


def format_confusion_matrix(result: ConfusionResult, class_names: Sequence[str], *, max_classes: int = 10) -> str:
    """The matrix as aligned text (rows true, columns predicted) when K <= ``max_classes``,
    else one line of totals; both start with a line naming the thresholds."""
    totals = result.summary()
    head = (f"confusion matrix (IoU >= {result.iou_thresh:g}, score >= {result.score_thresh:g}; rows: true class, "
            f"columns: predicted): {totals['correct']} correct, {totals['confused']} confused, "
            f"{totals['background'] + totals['duplicate']} false positives ({totals['duplicate']} duplicates), "
            f"{totals['missed']} missed of {totals['objects']} objects")
    if len(class_names) > max_classes:
        return head
    names = [*map(str, class_names), "background"]
    width = max(max(len(n) for n in names), len(str(int(result.matrix.max(initial=0)))))
    lines = [head, " " * width + "".join(f"  {n:>{width}}" for n in names)]
    for name, row in zip(names, result.matrix.tolist()):
        lines.append(f"{name:<{width}}" + "".join(f"  {v:>{width}}" for v in row))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Per-class AP by object size (from pycocotools' arrays)
# --------------------------------------------------------------------------------------------
def per_class_size_ap(precision: np.ndarray, class_names: Sequence[str], coco_gt: Mapping | None = None) -> dict:
    """Per class COCO AP overall and per object size, read from ``COCOeval.eval["precision"]``.

    Args:
        precision: float ``[T, R, K, A, M]`` as :meth:`~fpndet.engine.evaluation.CocoEvaluator.
            evaluate` returns it (area index 0 all, 1 small, 2 medium, 3 large; the last maxDets,
            100, is read).
        class_names: K names, in the order of the array (ascending category id).
        coco_gt: the COCO ground truth, to count the objects of each class and size (the
            annotations' ``area``, default ``w * h``; crowd and difficult objects left out).

    Returns:
        ``{class: {"AP", "AP50", "AP_small", "AP_medium", "AP_large"[, "objects",
        "objects_small", "objects_medium", "objects_large"]}}``: AP is the mean of the defined
        entries over IoU 0.50:0.95 and the 101 recall points, exactly what
        ``COCOeval.summarize()`` reports with ``params.catIds = [that class]``; -1 where the class
        has no object of that size.
    """
    precision = np.asarray(precision, dtype=np.float64)
    if precision.ndim != 5 or precision.shape[2] != len(class_names) or precision.shape[3] < 4:
        raise ValueError(f"precision of shape {precision.shape} does not match {len(class_names)} class names")
    iou_50 = 0  # COCO's thresholds start at 0.50
    counts = _object_counts(coco_gt) if coco_gt is not None else None
    table = {}
    for k, name in enumerate(class_names):
        row = {
            "AP": _mean_defined(precision[:, :, k, 0, -1]),
            "AP50": _mean_defined(precision[iou_50, :, k, 0, -1]),
            **{f"AP_{size}": _mean_defined(precision[:, :, k, area, -1]) for area, size in enumerate(AREA_RANGES, 1)},
        }
        if counts is not None:
            row.update({key: int(values[k]) for key, values in counts.items()})
        table[str(name)] = row
    return table


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def _object_counts(coco_gt: Mapping) -> dict[str, np.ndarray]:
    """Objects per class (ascending category id) overall and per COCO area range."""
    category_ids = sorted(int(c["id"]) for c in coco_gt.get("categories", []))
    position = {c: i for i, c in enumerate(category_ids)}
    counts = {key: np.zeros(len(category_ids), np.int64) for key in ("objects", *(f"objects_{s}" for s in AREA_RANGES))}
    for annotation in coco_gt.get("annotations", []):
        if annotation.get("iscrowd", 0) or annotation.get("difficult", 0):
            continue
        k = position.get(int(annotation["category_id"]))
        if k is None:
            continue
        area = annotation.get("area")
        if area is None:
            area = float(annotation["bbox"][2]) * float(annotation["bbox"][3])
        counts["objects"][k] += 1
        for size, (low, high) in AREA_RANGES.items():
            if low <= area <= high:
                counts[f"objects_{size}"][k] += 1
    return counts


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_diagnostics(
    dataset,
    detections: Sequence[Mapping[str, torch.Tensor]],
    ground_truths: Sequence[Mapping[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    precision: np.ndarray | None = None,
    coco_gt: Mapping | None = None,
    score_thresh: float = DEFAULT_SCORE_THRESH,
    iou_thresh: float = MATCH_IOU,
    pictures: int = MAX_PICTURES,
) -> dict:
    """Write the diagnostics of an evaluation into ``out_dir``.

    Files: ``confusion_matrix.csv`` (counts; header ``true \\ predicted``, then one row per true
    class and ``background``), ``confusion_matrix.png`` (cells coloured by their share of the
    row, labelled with the counts up to 29 classes); ``pr_curves_per_class.png``
    (one panel per class: precision-recall at IoU 0.5, 0.75 and the mean over 0.50:0.95, with the
    confusion matrix's operating point); ``per_class_size_ap.csv`` (:func:`per_class_size_ap`;
    undefined values empty); ``worst_false_positives.png`` and ``worst_misses.png`` (at most
    ``pictures`` crops each, the highest-scoring false positives and the largest missed objects, at
    most 2 per image; a file is removed when there is nothing to show); ``diagnostics.json`` with
    all the numbers.

    Args:
        dataset: the evaluated dataset (labels, class names; images are decoded only for the
            pictures, through ``dataset[i]`` with its transforms switched off).
        detections: per image, with the dataset's labels (see :func:`confusion_matrix`).
        ground_truths: per image targets (``boxes``, ``labels``, ``iscrowd``).
        out_dir: folder to write into (created).
        precision: ``COCOeval.eval["precision"]`` for the PR curves and the size table (skipped
            when None).
        coco_gt: the COCO ground truth, for the object counts of the size table.
        score_thresh, iou_thresh: of the confusion matrix and the pictures.
        pictures: crops per picture grid (0: no pictures).

    Returns:
        The content of ``diagnostics.json`` plus ``"confusion"`` (the :class:`ConfusionResult`)
        and ``"seconds"``.
    """
    from .evaluation import save_results_json
    from .plots import plot_confusion_matrix, plot_precision_recall_per_class

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dataset.class_names)
    confusion = confusion_matrix(detections, ground_truths, len(names), score_thresh=score_thresh,
                                 iou_thresh=iou_thresh, crowd_ioa=not getattr(dataset, "devkit_metric", False))
    _write_confusion_csv(confusion.matrix, names, out_dir / "confusion_matrix.csv")
    plot_confusion_matrix(confusion.matrix, names, out_dir / "confusion_matrix.png",
                          title=f"confusion matrix (IoU >= {iou_thresh:g}, score >= {score_thresh:g})")
    per_class = confusion.per_class(names)
    content = {
        "score_thresh": float(score_thresh),
        "iou_thresh": float(iou_thresh),
        "convention": "rows: true class then background (false positives); columns: predicted class then "
                      "background (misses); crowd/difficult objects and detections on them not counted",
        "class_names": names,
        "confusion_matrix": confusion.matrix.tolist(),
        "totals": confusion.summary(),
        "per_class": per_class,
    }
    if precision is not None:
        table = per_class_size_ap(precision, names, coco_gt)
        content["per_class_size_ap"] = table
        _write_size_csv(table, out_dir / "per_class_size_ap.csv")
        operating = {name: (row["recall"], row["precision"]) for name, row in per_class.items()}
        plot_precision_recall_per_class(precision, names, out_dir / "pr_curves_per_class.png", operating_points=operating,
                                        operating_label=f"score >= {score_thresh:g} (confusion matrix)")
    else:
        for name in ("per_class_size_ap.csv", "pr_curves_per_class.png"):
            (out_dir / name).unlink(missing_ok=True)
    content["worst_false_positives"], content["worst_misses"] = _write_pictures(
        dataset, detections, ground_truths, confusion, out_dir, pictures)
    content["seconds"] = time.perf_counter() - start
    save_results_json(out_dir / "diagnostics.json", content)
    return {**content, "confusion": confusion}


def remove_diagnostics(out_dir: str | os.PathLike) -> None:
    """Remove the files :func:`write_diagnostics` writes (left from an earlier evaluation)."""
    for name in DIAGNOSTIC_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)


def _write_confusion_csv(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    names = [*map(str, class_names), "background"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *names])
    for name, row in zip(names, matrix.tolist()):
        writer.writerow([name, *row])
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def _write_size_csv(table: Mapping[str, Mapping[str, float]], path: Path) -> None:
    columns = list(next(iter(table.values()), {}))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", *columns])
    for name, row in table.items():
        cells = []
        for key in columns:
            value = row[key]
            if isinstance(value, int):
                cells.append(value)
            else:
                cells.append("" if value < 0 or math.isnan(value) else f"{value:.6f}")
        writer.writerow([name, *cells])
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Pictures of the worst false positives and misses
# --------------------------------------------------------------------------------------------
def _pick(order: np.ndarray, images: np.ndarray, limit: int) -> list[int]:
    """The first ``limit`` entries of ``order``, at most PICTURES_PER_IMAGE from one image."""
    chosen, per_image = [], {}
    for i in order.tolist():
        image = int(images[i])
        if per_image.get(image, 0) >= PICTURES_PER_IMAGE:
            continue
        per_image[image] = per_image.get(image, 0) + 1
        chosen.append(i)
        if len(chosen) == limit:
            break
    return chosen


def _write_pictures(dataset, detections, ground_truths, confusion: ConfusionResult, out_dir: Path,
                    limit: int) -> tuple[list[dict], list[dict]]:
    """Crops of the highest-scoring false positives and the largest misses, as two grids."""
    names = list(dataset.class_names)
    fp_order = np.argsort(-confusion.fp_scores, kind="stable")
    areas = (confusion.miss_boxes[:, 2] - confusion.miss_boxes[:, 0]) * (confusion.miss_boxes[:, 3] - confusion.miss_boxes[:, 1])
    miss_order = np.argsort(-areas, kind="stable")
    fp_chosen = _pick(fp_order, confusion.fp_image, limit) if limit > 0 else []
    miss_chosen = _pick(miss_order, confusion.miss_image, limit) if limit > 0 else []
    needed = sorted({int(confusion.fp_image[i]) for i in fp_chosen} | {int(confusion.miss_image[i]) for i in miss_chosen})
    images = _load_images(dataset, needed)
    thresh = confusion.score_thresh

    def name(label: int) -> str:
        return names[label] if 0 <= label < len(names) else str(label)

    fp_records, fp_cells = [], []
    for i in fp_chosen:
        index, label, kind = int(confusion.fp_image[i]), int(confusion.fp_labels[i]), int(confusion.fp_kinds[i])
        what = f"is a {name(int(confusion.fp_true[i]))}" if kind == CONFUSED else OUTCOME_NAMES[kind]
        record = _picture_record(dataset, index, confusion.fp_boxes[i], name(label))
        record.update(score=float(confusion.fp_scores[i]), kind=OUTCOME_NAMES[kind],
                      true_class=name(int(confusion.fp_true[i])) if kind == CONFUSED else None)
        fp_records.append(record)
        if index in images:
            truth = ground_truths[index]
            fp_cells.append(_crop_picture(
                images[index], confusion.fp_boxes[i], label, float(confusion.fp_scores[i]), names,
                _plain(truth["boxes"]).reshape(-1, 4), _plain(truth["labels"]).reshape(-1),
                [f"{name(label)} {float(confusion.fp_scores[i]):.2f}: {what}", record["file"], "white: ground truth"]))
    miss_records, miss_cells = [], []
    for i in miss_chosen:
        index, label, box = int(confusion.miss_image[i]), int(confusion.miss_labels[i]), confusion.miss_boxes[i]
        record = _picture_record(dataset, index, box, name(label))
        miss_records.append(record)
        if index in images:
            boxes, _, labels = _detections_above(detections[index], thresh, len(names))
            width, height = box[2] - box[0], box[3] - box[1]
            miss_cells.append(_crop_picture(
                images[index], box, label, None, names, boxes, labels,
                [f"missed {name(label)} ({width:.0f}x{height:.0f} px)", record["file"],
                 f"white: detections >= {thresh:g}"]))
    _save_grid(fp_cells, out_dir / "worst_false_positives.png")
    _save_grid(miss_cells, out_dir / "worst_misses.png")
    return fp_records, miss_records


def _picture_record(dataset, index: int, box: np.ndarray, class_name: str) -> dict:
    record = dataset.annotation(index)
    return {"image_id": int(record.image_id), "file": os.path.basename(str(record.file_name)),
            "box": [round(float(v), 2) for v in box], "class": class_name}


def _load_images(dataset, indices: Sequence[int]) -> dict[int, torch.Tensor]:
    """uint8 [3, H, W] images of the dataset at ``indices`` (its transforms switched off for the
    while); an image that fails to decode is left out."""
    images: dict[int, torch.Tensor] = {}
    if not indices:
        return images
    previous = getattr(dataset, "transforms", None)
    dataset.transforms = None
    try:
        for index in indices:
            try:
                images[index] = _plain(dataset[index][0])
            except InputError:
                continue
    finally:
        dataset.transforms = previous
    return images


def _crop_picture(image: torch.Tensor, box, label: int, score: float | None, class_names: Sequence[str],
                  context_boxes: torch.Tensor, context_labels: torch.Tensor, caption: Sequence[str]):
    """A ``PICTURE_SIZE`` square cell: the box with some surroundings, scaled to fit; the box
    drawn in its class colour, ``context_boxes`` in white; ``caption`` below."""
    from PIL import Image, ImageOps

    from .plots import caption_image, draw_detections

    height, width = image.shape[-2:]
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * 1.6 + 32.0
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(0.0, math.floor(cx - side / 2))), int(max(0.0, math.floor(cy - side / 2)))
    right, bottom = int(min(float(width), math.ceil(cx + side / 2))), int(min(float(height), math.ceil(cy + side / 2)))
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    crop = Image.fromarray(np.ascontiguousarray(image[:, top:bottom, left:right].expand(3, -1, -1).numpy().transpose(1, 2, 0)))
    scale = PICTURE_SIZE / max(crop.width, crop.height)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BILINEAR)
    offset = torch.tensor([left, top, left, top], dtype=torch.float64)
    context = _plain(context_boxes).to(torch.float64).reshape(-1, 4)
    inside = (context[:, 2] > left) & (context[:, 0] < right) & (context[:, 3] > top) & (context[:, 1] < bottom)
    shifted = (torch.as_tensor(np.asarray(box, np.float64)).reshape(1, 4) - offset) * scale
    drawn = draw_detections(
        crop, shifted, torch.tensor([label]), None if score is None else torch.tensor([score]), class_names,
        extra_boxes={"boxes": (context[inside] - offset) * scale, "labels": _plain(context_labels).reshape(-1)[inside]},
        line_width=3, font_size=11,
    )
    cell = Image.new("RGB", (PICTURE_SIZE, PICTURE_SIZE), (40, 40, 40))
    cell.paste(drawn, (0, 0))
    return ImageOps.expand(caption_image(cell, caption), border=2, fill=(255, 255, 255))


def _save_grid(cells: list, path: Path) -> None:
    from .plots import save_image_grid

    if cells:
        save_image_grid(cells, path, columns=4, background=(255, 255, 255))
    else:
        path.unlink(missing_ok=True)
