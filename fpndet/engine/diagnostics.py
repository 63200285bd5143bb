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

Matching (per image, two greedy passes): detections scoring at least ``score_thresh`` are taken
in descending score order (ties keep their order). First pass, pycocotools' matching within each
class: each detection takes, among the still unmatched regular objects of its own class with IoU
>= ``iou_thresh`` (the formula of :func:`torchvision.ops.box_iou`), the one with the highest IoU
(correct), else sits on an ignored object of its own class (not counted). Second pass, over the
detections the first left unmatched: each takes the still unmatched regular object of another
class with the highest IoU (a confusion), else sits on an ignored object of another class (not
counted), else is a false positive: a *duplicate* when it overlaps an object already taken,
*background* otherwise. So the diagonal is exactly COCO's true positives at IoU ``iou_thresh``
(among the detections above the threshold), and a confusion never takes an object from a
detection of the right class. One detection matches at most one object and one object at most
one detection. (This is not the VOC devkit's matching of
:func:`~fpndet.engine.evaluation.voc_map50`, where a detection whose best object is taken is a
false positive even if another free object overlaps it enough.) Ignored objects are COCO crowd
regions and VOC ``difficult`` objects (``iscrowd`` in the ground truth): never misses, and
detections on them are neither correct nor false positives. As in the COCO metrics, a detection
is on a crowd region when the intersection covers at least ``iou_thresh`` of the *detection*
(pycocotools' crowd overlap) and on a VOC difficult object when their IoU is at least
``iou_thresh`` (the devkit's rule).

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

from fpndet.engine.checkpoints import atomic_write_bytes
from fpndet.engine.evaluation import _check_labels, _mean_defined, _voc_ground_truth
from fpndet.errors import InputError
from fpndet.modeling.box_ops import box_area, pairwise_intersection

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
    k, count = int(num_classes), len(detections)
    image, boxes, scores, labels = _stack_detections(detections, score_thresh, k)
    gt_image, gt_boxes, gt_labels, gt_ignored = _stack_ground_truth(ground_truths, k)
    # Rows of image i: [starts[i], starts[i + 1]) (both stacks are ordered by image).
    starts, gt_starts = np.searchsorted(image, np.arange(count + 1)), np.searchsorted(gt_image, np.arange(count + 1))
    kinds = np.full(len(labels), BACKGROUND, np.int8)
    matched = np.full(len(labels), -1, np.int64)  # index into the stacked objects
    for i in np.flatnonzero((np.diff(starts) > 0) & (np.diff(gt_starts) > 0)).tolist():
        d, g = slice(starts[i], starts[i + 1]), slice(gt_starts[i], gt_starts[i + 1])
        kinds[d], local = _match_image(boxes[d], labels[d], gt_boxes[g], gt_labels[g], gt_ignored[g], iou_thresh, crowd_ioa)
        matched[d] = np.where(local >= 0, local + g.start, -1)
    found = matched >= 0
    true = np.full(len(labels), -1, np.int64)
    true[found] = gt_labels[matched[found]]
    taken = np.zeros(len(gt_labels), bool)
    taken[matched[found]] = True

    counted = (kinds == CORRECT) | (kinds == CONFUSED)
    false = (kinds == BACKGROUND) | (kinds == DUPLICATE)
    missed = ~taken & ~gt_ignored
    rows = np.concatenate([true[counted], np.full(int(false.sum()), k), gt_labels[missed]])
    cols = np.concatenate([labels[counted], labels[false], np.full(int(missed.sum()), k)])
    matrix = np.bincount(rows * (k + 1) + cols, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
    wrong = false | (kinds == CONFUSED)
    return ConfusionResult(
        matrix=matrix, score_thresh=float(score_thresh), iou_thresh=float(iou_thresh),
        fp_image=image[wrong], fp_boxes=boxes.numpy()[wrong], fp_scores=scores[wrong], fp_labels=labels[wrong],
        fp_kinds=kinds[wrong], fp_true=np.where(kinds[wrong] == CONFUSED, true[wrong], -1),
        miss_image=gt_image[missed], miss_boxes=gt_boxes.numpy()[missed], miss_labels=gt_labels[missed],
    )  # fmt: skip


def _stacked(tensors, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """The tensors (CPU, ``dtype``) flattened to ``[-1]`` or ``[-1, width]`` and concatenated."""
    shape = (-1,) if width is None else (-1, width)
    parts = [torch.as_tensor(t).detach().to("cpu", dtype).reshape(shape) for t in tensors]
    return torch.cat(parts) if parts else torch.zeros((0, *shape[1:]), dtype=dtype)


def _stack_detections(detections: Sequence[Mapping], score_thresh: float, k: int):
    """Every image's detections scoring >= the threshold, stacked by image and, within an image,
    by descending score (stable): (image int64 ndarray [N], boxes float64 Tensor [N, 4],
    scores float64 ndarray [N], labels int64 ndarray [N]); labels checked."""
    labels = _stacked([d["labels"] for d in detections], torch.int64)
    _check_labels(labels, k, "detection")
    scores = _stacked([d["scores"] for d in detections], torch.float64).numpy()
    image = np.repeat(np.arange(len(detections)), [torch.as_tensor(d["labels"]).numel() for d in detections])
    keep = np.flatnonzero(scores >= score_thresh)
    keep = keep[np.lexsort((-scores[keep], image[keep]))]
    boxes = _stacked([d["boxes"] for d in detections], torch.float64, 4)
    return image[keep], boxes[torch.from_numpy(keep)], scores[keep], labels.numpy()[keep]


def _stack_ground_truth(ground_truths: Sequence[Mapping], k: int):
    """Every image's objects, stacked by image: (image int64 ndarray [G], boxes float64 Tensor
    [G, 4], labels int64 ndarray [G], ignored bool ndarray [G] (``iscrowd``, optional));
    labels checked."""
    labels = _stacked([t["labels"] for t in ground_truths], torch.int64)
    _check_labels(labels, k, "ground truth")
    counts = [torch.as_tensor(t["labels"]).numel() for t in ground_truths]
    ignored = _stacked([torch.zeros(n, dtype=torch.bool) if t.get("iscrowd") is None else t["iscrowd"]
                        for t, n in zip(ground_truths, counts)], torch.bool)
    image = np.repeat(np.arange(len(ground_truths)), counts)
    return image, _stacked([t["boxes"] for t in ground_truths], torch.float64, 4), labels.numpy(), ignored.numpy()


def _match_image(boxes, labels, gt_boxes, gt_labels, gt_ignored, iou_thresh, crowd_ioa):
    """Greedy matching of one image's detections (sorted by descending score) to its objects
    (module doc): first every detection against the objects of its own class (pycocotools'
    matching), then the detections left unmatched against the other classes' objects.

    The overlapping (detection, object) pairs are listed once, each detection's candidates best
    first, so the two greedy passes are plain loops over those pairs.

    Args:
        boxes: float64 Tensor [N, 4]; labels: int64 ndarray [N]; gt_boxes: float64 Tensor
            [G, 4]; gt_labels: int64 ndarray [G]; gt_ignored: bool ndarray [G].

    Returns:
        (kinds int8 [N] (CORRECT ... IGNORED), matched int64 [N]: the object a detection took,
        or -1).
    """
    n, g = len(boxes), len(gt_boxes)
    kinds = np.full(n, BACKGROUND, np.int8)
    matched = np.full(n, -1, np.int64)
    if n == 0 or g == 0:
        return kinds, matched
    inter = pairwise_intersection(boxes, gt_boxes)  # [N, G]; IoU by torchvision.ops.box_iou's formula
    area = box_area(boxes)
    iou = (inter / (area[:, None] + box_area(gt_boxes)[None, :] - inter)).numpy()
    overlap = iou
    if crowd_ioa and gt_ignored.any():  # crowd regions: intersection over the detection's area
        ioa = torch.where(area[:, None] > 0, inter / area[:, None], 0.0).numpy()
        overlap = np.where(gt_ignored[None, :], ioa, iou)
    det, obj = np.nonzero(overlap >= iou_thresh)
    if det.size == 0:
        return kinds, matched
    other = labels[det] != gt_labels[obj]
    ignored = gt_ignored[obj]
    # Each detection's candidates (detections in score order): regular objects before ignored
    # ones, by descending IoU (ties: the first object); own class in the first pass, others in
    # the second.
    order = np.lexsort((-iou[det, obj], ignored, other, det))
    pairs = list(zip(det[order].tolist(), obj[order].tolist(), ignored[order].tolist(), other[order].tolist()))
    decided, taken = [False] * n, [False] * g
    for second_pass in (False, True):
        for d, o, on_ignored, is_other in pairs:
            if is_other != second_pass or decided[d]:
                continue
            if on_ignored:
                decided[d], kinds[d] = True, IGNORED
            elif not taken[o]:
                decided[d], taken[o], matched[d] = True, True, o
                kinds[d] = CONFUSED if is_other else CORRECT
    # Still undecided with a candidate: every object it overlaps is taken.
    for d in set(det.tolist()):
        if not decided[d]:
            kinds[d] = DUPLICATE
    return kinds, matched


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
                                 iou_thresh=iou_thresh, crowd_ioa=not dataset.devkit_metric)
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
            gt_boxes, gt_labels, _ = _voc_ground_truth(ground_truths[index], len(names))
            fp_cells.append(_crop_picture(
                images[index], confusion.fp_boxes[i], label, float(confusion.fp_scores[i]), names, gt_boxes, gt_labels,
                [f"{name(label)} {float(confusion.fp_scores[i]):.2f}: {what}", record["file"], "white: ground truth"]))
    miss_records, miss_cells = [], []
    for i in miss_chosen:
        index, label, box = int(confusion.miss_image[i]), int(confusion.miss_labels[i]), confusion.miss_boxes[i]
        record = _picture_record(dataset, index, box, name(label))
        miss_records.append(record)
        if index in images:
            _, boxes, _, labels = _stack_detections([detections[index]], thresh, len(names))
            width, height = box[2] - box[0], box[3] - box[1]
            miss_cells.append(_crop_picture(
                images[index], box, label, None, names, boxes, torch.from_numpy(labels),
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
                images[index] = torch.as_tensor(dataset[index][0])
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
    context = context_boxes.to(torch.float64).reshape(-1, 4)
    inside = (context[:, 2] > left) & (context[:, 0] < right) & (context[:, 3] > top) & (context[:, 1] < bottom)
    shifted = (torch.as_tensor(np.asarray(box, np.float64)).reshape(1, 4) - offset) * scale
    drawn = draw_detections(
        crop, shifted, torch.tensor([label]), None if score is None else torch.tensor([score]), class_names,
        extra_boxes={"boxes": (context[inside] - offset) * scale, "labels": context_labels.reshape(-1)[inside]},
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
