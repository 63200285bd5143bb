"""Evaluation diagnostics: the confusion matrix on hand-made cases, the files written with the
metrics, the per-class AP by size against pycocotools, and ``fpndet eval``'s options."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpndet.data.checks import KeptImages
from fpndet.data.formats.coco import CocoDetection
from fpndet.engine.diagnostics import (
    BACKGROUND,
    CONFUSED,
    DIAGNOSTIC_FILES,
    DUPLICATE,
    confusion_matrix,
    format_confusion_matrix,
    per_class_size_ap,
    write_diagnostics,
)
from fpndet.engine.evaluation import CocoEvaluator
from fpndet.engine.inference import evaluate_detections
from fpndet.engine.plots import plot_confusion_matrix, plot_precision_recall_per_class

CAT, DOG = 0, 1


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _detections(rows):
    """``[(label, score, [x1, y1, x2, y2]), ...]`` -> a detections dict."""
    return {
        "boxes": _t([box for _, _, box in rows]).reshape(-1, 4),
        "scores": _t([score for _, score, _ in rows]),
        "labels": _t([label for label, _, _ in rows], torch.int64),
    }


def _truth(rows):
    """``[(label, [x1, y1, x2, y2], crowd), ...]`` -> a ground-truth dict."""
    return {
        "boxes": _t([box for _, box, _ in rows]).reshape(-1, 4),
        "labels": _t([label for label, _, _ in rows], torch.int64),
        "iscrowd": _t([crowd for _, _, crowd in rows], torch.bool),
    }


# The hand-made case (classes cat, dog). Image 0:
#   objects: cat A [0,0,20,20], dog B [40,40,80,80], cat C [60,0,90,30], a crowd region of cats
#            [0,50,30,100], dog E [100,100,140,140]
#   detections by score: cat 0.90 on A (correct); cat 0.85 on B (a dog: confusion); cat 0.80 on A
#   shifted by 1 px (IoU 0.82 with A, already taken: duplicate); dog 0.70 far from everything
#   (background); cat 0.60, a 10x10 box inside the crowd region (IoU 0.07 but all of it inside:
#   ignored by COCO's crowd rule); dog 0.50 on E (correct); dog 0.10 on C (below the threshold 0.3,
#   so C is missed).
# Image 1: no object, a dog 0.95 (background). Image 2: one dog [10,10,50,50] and a crowd region,
# no detection: the dog is missed, the crowd region is not.
IMAGE_0 = (
    [(CAT, [0, 0, 20, 20], 0), (DOG, [40, 40, 80, 80], 0), (CAT, [60, 0, 90, 30], 0), (CAT, [0, 50, 30, 100], 1),
     (DOG, [100, 100, 140, 140], 0)],
    [(CAT, 0.9, [0, 0, 20, 20]), (CAT, 0.85, [40, 40, 80, 80]), (CAT, 0.8, [1, 1, 21, 21]),
     (DOG, 0.7, [200, 200, 240, 240]), (CAT, 0.6, [5, 60, 15, 70]), (DOG, 0.5, [100, 100, 140, 140]),
     (DOG, 0.1, [60, 0, 90, 30])],
)  # fmt: skip
IMAGE_1 = ([], [(DOG, 0.95, [10, 10, 50, 50])])
IMAGE_2 = ([(DOG, [10, 10, 50, 50], 0), (CAT, [100, 100, 200, 200], 1)], [])
CASE = [IMAGE_0, IMAGE_1, IMAGE_2]

# Rows: true cat, dog, background; columns: predicted cat, dog, background (misses).
EXPECTED = [
    [1, 0, 1],  # cat A found; cat C missed (its only detection scores 0.1)
    [1, 1, 1],  # dog B taken by a cat detection; dog E found; the dog of image 2 missed
    [1, 2, 0],  # the duplicate cat; the two background dogs
]


def _case():
    return [_detections(d) for _, d in CASE], [_truth(g) for g, _ in CASE]


def test_confusion_matrix_on_a_hand_made_case():
    detections, truths = _case()
    result = confusion_matrix(detections, truths, 2, score_thresh=0.3)
    assert result.matrix.tolist() == EXPECTED
    assert result.summary() == {"objects": 5, "correct": 2, "confused": 1, "duplicate": 1, "background": 2,
                                "missed": 2}
    # False positives in dataset, then score order: what each is, and the true class of the confusion.
    assert result.fp_image.tolist() == [0, 0, 0, 1]
    assert result.fp_scores.tolist() == pytest.approx([0.85, 0.8, 0.7, 0.95])
    assert result.fp_kinds.tolist() == [CONFUSED, DUPLICATE, BACKGROUND, BACKGROUND]
    assert result.fp_true.tolist() == [DOG, -1, -1, -1]
    assert result.miss_image.tolist() == [0, 2]
    assert result.miss_boxes.tolist() == [[60, 0, 90, 30], [10, 10, 50, 50]]
    assert result.miss_labels.tolist() == [CAT, DOG]
    per_class = result.per_class(["cat", "dog"])
    assert per_class["cat"] == {"objects": 2, "detections": 3, "correct": 1, "confused_as_other": 0, "missed": 1,
                                "false_positives": 2, "precision": 1 / 3, "recall": 0.5}
    assert per_class["dog"]["precision"] == 1 / 3 and per_class["dog"]["recall"] == 1 / 3

    text = format_confusion_matrix(result, ["cat", "dog"])
    assert "2 correct, 1 confused, 3 false positives (1 duplicates), 2 missed of 5 objects" in text
    assert text.splitlines()[-1].split() == ["background", "1", "2", "0"]


def test_the_threshold_and_the_crowd_rule_change_the_matrix():
    detections, truths = _case()
    # Threshold 0.05: the dog 0.1 on cat C counts, as a confusion instead of a miss.
    low = confusion_matrix(detections, truths, 2, score_thresh=0.05).matrix.tolist()
    assert low == [[1, 1, 0], [1, 1, 1], [1, 2, 0]]
    # Threshold 0.88: only the cat 0.9 and the background dog 0.95 count.
    high = confusion_matrix(detections, truths, 2, score_thresh=0.88).matrix.tolist()
    assert high == [[1, 0, 1], [0, 0, 3], [0, 1, 0]]
    # VOC difficult objects are overlapped by IoU: the small cat box inside the region (IoU 0.07)
    # becomes a background false positive.
    voc = confusion_matrix(detections, truths, 2, score_thresh=0.3, crowd_ioa=False).matrix.tolist()
    assert voc == [[1, 0, 1], [1, 1, 1], [2, 2, 0]]


def test_matching_prefers_the_own_class_and_takes_each_object_once():
    # A dog detection overlapping a cat (IoU 1) and a dog (IoU 0.9): it takes the dog; the cat is
    # then missed.
    truths = [_truth([(CAT, [0, 0, 40, 40], 0), (DOG, [0, 0, 40, 36], 0)])]
    detections = [_detections([(DOG, 0.9, [0, 0, 40, 40])])]
    assert confusion_matrix(detections, truths, 2).matrix.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]
    # A second dog detection there takes the free cat (a confusion); a third finds both taken: a
    # duplicate, not a second match.
    detections = [_detections([(DOG, 0.9, [0, 0, 40, 40]), (DOG, 0.8, [0, 0, 40, 37]), (DOG, 0.7, [0, 0, 40, 38])])]
    result = confusion_matrix(detections, truths, 2)
    assert result.matrix.tolist() == [[0, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert result.fp_kinds.tolist() == [CONFUSED, DUPLICATE]
    # A confusion never takes an object from a detection of the right class, even one scoring
    # lower: the dog 0.8 finds the dog (as pycocotools' dog matching); the cat 0.9 on it, with no
    # free object left, is a duplicate.
    truths = [_truth([(DOG, [0, 0, 40, 40], 0)])]
    result = confusion_matrix([_detections([(CAT, 0.9, [0, 0, 40, 40]), (DOG, 0.8, [0, 0, 40, 38])])], truths, 2)
    assert result.matrix.tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert result.fp_kinds.tolist() == [DUPLICATE] and result.fp_scores.tolist() == pytest.approx([0.9])
    # Without a free object of its class a detection takes the best other one (a confusion).
    truths = [_truth([(CAT, [0, 0, 40, 40], 0), (CAT, [0, 0, 40, 30], 0)])]
    result = confusion_matrix([_detections([(DOG, 0.9, [0, 0, 40, 32])])], truths, 2)
    assert result.matrix.tolist() == [[0, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert result.fp_true.tolist() == [CAT]
    # A detection on a crowd region of its own class is not counted, even next to a free object
    # of another class.
    truths = [_truth([(CAT, [0, 0, 100, 100], 1), (DOG, [0, 0, 60, 60], 0)])]
    result = confusion_matrix([_detections([(CAT, 0.9, [0, 0, 60, 60])])], truths, 2)
    assert result.matrix.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    # Nothing at all, and labels outside the classes.
    empty = confusion_matrix([_detections([])], [_truth([])], 2)
    assert empty.matrix.tolist() == [[0] * 3] * 3 and empty.fp_boxes.shape == (0, 4)
    no_objects = confusion_matrix([_detections([(DOG, 0.9, [0, 0, 10, 10])]), _detections([])], [_truth([])] * 2, 2)
    assert no_objects.matrix.tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0]] and no_objects.fp_true.tolist() == [-1]
    assert confusion_matrix([], [], 2).matrix.tolist() == [[0] * 3] * 3
    with pytest.raises(ValueError, match="detection label 2 outside"):
        confusion_matrix([_detections([(2, 0.9, [0, 0, 1, 1])])], [_truth([])], 2)


# --------------------------------------------------------------------------------------------
# The files written by evaluate_detections
# --------------------------------------------------------------------------------------------
def _write_case_as_coco(root: Path) -> Path:
    """The hand-made case as a COCO dataset: three 300x300 images, cats (id 3) and dogs (id 7)."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    content = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    for index, (objects, _) in enumerate(CASE):
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(root / "images" / f"{index}.png")
        content["images"].append({"id": 10 + index, "file_name": f"{index}.png", "height": 300, "width": 300})
        for label, (x1, y1, x2, y2), crowd in objects:
            content["annotations"].append({
                "id": len(content["annotations"]) + 1, "image_id": 10 + index, "category_id": [3, 7][label],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd,
            })  # fmt: skip
    path = root / "annotations" / "instances.json"
    path.write_text(json.dumps(content))
    return path


def _ground_truths(dataset) -> list[dict]:
    return [{"boxes": torch.as_tensor(r.boxes).reshape(-1, 4), "labels": torch.as_tensor(r.labels),
             "iscrowd": torch.as_tensor(r.iscrowd)} for r in (dataset.annotation(i) for i in range(len(dataset)))]


def _open_png(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    assert image.format == "PNG" and len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    return image


def _read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text().splitlines()))


def test_evaluation_writes_the_diagnostics_with_the_right_numbers(tmp_path):
    dataset = CocoDetection(_write_case_as_coco(tmp_path / "coco"))
    detections, _ = _case()
    out = tmp_path / "eval"
    report = evaluate_detections(dataset, detections, _ground_truths(dataset), out_dir=out)

    assert {p.name for p in out.iterdir()} >= set(DIAGNOSTIC_FILES)
    assert _read_csv(out / "confusion_matrix.csv") == [
        ["true \\ predicted", "cat", "dog", "background"],
        ["cat", "1", "0", "1"],
        ["dog", "1", "1", "1"],
        ["background", "1", "2", "0"],
    ]
    written = json.loads((out / "diagnostics.json").read_text())
    assert written["confusion_matrix"] == EXPECTED == report["diagnostics"]["confusion"].matrix.tolist()
    assert written["score_thresh"] == 0.3 and written["iou_thresh"] == 0.5
    assert written["class_names"] == ["cat", "dog"]
    # The worst false positives: highest score first, at most 2 per image (the dog 0.70 of image 0
    # is left out for the image's 0.85 and 0.80).
    worst = [(fp["file"], fp["class"], round(fp["score"], 2), fp["kind"], fp["true_class"])
             for fp in written["worst_false_positives"]]
    assert worst == [("1.png", "dog", 0.95, "background", None), ("0.png", "cat", 0.85, "confused", "dog"),
                     ("0.png", "cat", 0.8, "duplicate", None)]
    # The misses, largest first: the 40x40 dog of image 2, then the 30x30 cat of image 0.
    assert [(m["image_id"], m["class"], m["box"]) for m in written["worst_misses"]] == [
        (12, "dog", [10.0, 10.0, 50.0, 50.0]), (10, "cat", [60.0, 0.0, 90.0, 30.0])]
    # Picture grids: one 4-column row of 228 px wide cells (224 + a 2 px frame).
    assert _open_png(out / "worst_false_positives.png").width == 3 * 228
    assert _open_png(out / "worst_misses.png").width == 2 * 228
    _open_png(out / "confusion_matrix.png")
    _open_png(out / "pr_curves_per_class.png")
    # The size table: the cats (20x20, 30x30; the crowd regions left out) are small, the dogs
    # (40x40) medium.
    table = {row[0]: row[1:] for row in _read_csv(out / "per_class_size_ap.csv")}
    assert table["class"] == ["AP", "AP50", "AP_small", "AP_medium", "AP_large", "objects", "objects_small",
                              "objects_medium", "objects_large"]
    assert table["cat"][-4:] == ["2", "2", "0", "0"] and table["dog"][-4:] == ["3", "0", "3", "0"]
    assert table["cat"][3:5] == ["", ""] and table["dog"][2] == "" and table["dog"][4] == ""  # undefined: empty
    assert written["per_class_size_ap"]["cat"]["AP_large"] == -1.0
    assert float(table["dog"][0]) == pytest.approx(written["per_class_size_ap"]["dog"]["AP"], abs=1e-6)
    assert written["per_class_size_ap"]["dog"]["AP"] == pytest.approx(report["per_class_ap"]["dog"])


def test_diagnostics_can_be_switched_off_and_follow_kept_images(tmp_path):
    dataset = CocoDetection(_write_case_as_coco(tmp_path / "coco"))
    detections, _ = _case()
    out = tmp_path / "eval"
    evaluate_detections(dataset, detections, _ground_truths(dataset), out_dir=out)
    report = evaluate_detections(dataset, detections, _ground_truths(dataset), out_dir=out, diagnostics=False)
    assert "diagnostics" not in report
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "metrics.json", "per_class_ap.txt",
                                                     "pr_curve.png"]
    # Without image 1 (as after an unreadable image): indices map to the kept images' files. The
    # dataset's own transforms are not applied to the pictures (and are restored).

    def augment(image, target):
        raise AssertionError("the pictures must not be augmented")

    dataset.transforms = augment
    kept = KeptImages(dataset, [0, 2])
    report = evaluate_detections(kept, [detections[0], detections[2]], [_ground_truths(dataset)[i] for i in (0, 2)],
                                 out_dir=out, diagnostics_thresh=0.05)
    assert report["diagnostics"]["confusion_matrix"] == [[1, 1, 0], [1, 1, 1], [1, 1, 0]]
    assert [m["file"] for m in report["diagnostics"]["worst_misses"]] == ["2.png"]
    assert dataset.transforms is augment


def test_a_devkit_dataset_overlaps_its_ignored_objects_by_iou(tmp_path):
    """write_diagnostics follows the dataset's metric: on a VOC-style dataset (devkit_metric)
    the small cat box inside the ignored region is a false positive, as with crowd_ioa=False."""
    dataset = CocoDetection(_write_case_as_coco(tmp_path / "coco"))
    detections, _ = _case()
    coco = write_diagnostics(dataset, detections, _ground_truths(dataset), tmp_path / "coco_rule", pictures=0)
    assert coco["confusion_matrix"] == EXPECTED
    dataset.devkit_metric = True
    voc = write_diagnostics(dataset, detections, _ground_truths(dataset), tmp_path / "voc_rule", pictures=0)
    assert voc["confusion_matrix"] == [[1, 0, 1], [1, 1, 1], [2, 2, 0]]
    assert not (tmp_path / "voc_rule" / "worst_misses.png").exists() and voc["worst_misses"] == []


# --------------------------------------------------------------------------------------------
# Per-class AP by size: pycocotools run directly, one category at a time
# --------------------------------------------------------------------------------------------
def _official_per_category(gt_path: Path, results: list[dict], category_id: int) -> list[float]:
    """COCOeval run directly on the file for one category: stats AP, AP50, APs, APm, APl."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType="bbox")
        evaluator.params.catIds = [category_id]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(evaluator.stats[i]) for i in (0, 1, 3, 4, 5)]


def test_per_class_size_ap_equals_pycocotools_per_category(tmp_path):
    """Two categories (ids 3, 7) with small, medium and large objects (7 has no small one; one
    object of exactly 32x32 px counts as small and medium, as in pycocotools), jittered detections
    and false positives."""
    rng = np.random.default_rng(3)
    images, annotations, results = [], [], []
    for image_id in range(1, 7):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for category, sides in ((3, (12, 32, 60, 150)), (7, (40, 70, 200))):
            for side in sides:
                x, y = rng.uniform(0, 640 - side), rng.uniform(0, 480 - side)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "bbox": [x, y, side, side], "area": float(side * side), "iscrowd": 0})
                if rng.random() < 0.8:
                    jitter = rng.normal(0, 0.1 * side, 4)
                    results.append({"image_id": image_id, "category_id": category, "score": float(rng.random()),
                                    "bbox": [x + jitter[0], y + jitter[1], side + jitter[2], side + jitter[3]]})
            for _ in range(2):
                side = rng.uniform(10, 200)
                results.append({"image_id": image_id, "category_id": category, "score": float(rng.random()),
                                "bbox": [rng.uniform(0, 400), rng.uniform(0, 260), side, side]})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))

    precision = CocoEvaluator(gt).evaluate(results)["precision"]
    table = per_class_size_ap(precision, ["cat", "dog"], gt)

    for name, category in (("cat", 3), ("dog", 7)):
        official = _official_per_category(gt_path, results, category)
        ours = [table[name][key] for key in ("AP", "AP50", "AP_small", "AP_medium", "AP_large")]
        assert ours == pytest.approx(official, abs=1e-12), name
    assert table["dog"]["AP_small"] == -1.0
    assert 0.05 < table["cat"]["AP_small"] < 0.95 and 0.05 < table["dog"]["AP_large"] < 0.95
    assert {k: table["cat"][k] for k in ("objects", "objects_small", "objects_medium", "objects_large")} == {
        "objects": 24, "objects_small": 12, "objects_medium": 12, "objects_large": 6}
    assert {k: table["dog"][k] for k in ("objects", "objects_small", "objects_medium", "objects_large")} == {
        "objects": 18, "objects_small": 0, "objects_medium": 12, "objects_large": 6}


def test_coco128_diagnostics_end_to_end(coco128_dir, tmp_path):
    """Real COCO annotations (80 classes, crowd regions), detections derived from them: the
    matrix accounts for every object, the size table equals COCOeval per category on the
    original JSON."""
    path = coco128_dir / "annotations" / "instances.json"
    dataset = CocoDetection(path)
    truths = _ground_truths(dataset)
    rng = np.random.default_rng(0)
    detections = []
    for truth in truths:
        boxes, labels = truth["boxes"].double(), truth["labels"]
        size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        jittered = boxes + torch.as_tensor(rng.normal(0, 0.1, boxes.shape)) * size
        swapped = torch.where(torch.as_tensor(rng.random(len(labels)) < 0.1),
                              torch.as_tensor(rng.integers(0, 80, len(labels))), labels)
        corner = torch.as_tensor(rng.uniform(0, 400, (4, 2)))
        detections.append({"boxes": torch.cat([jittered, torch.cat([corner, corner + 60], 1)]).float(),
                           "scores": torch.as_tensor(rng.uniform(0.05, 1.0, len(labels) + 4)).float(),
                           "labels": torch.cat([swapped, torch.as_tensor(rng.integers(0, 80, 4))])})
    out = tmp_path / "eval"
    report = evaluate_detections(dataset, detections, truths, out_dir=out)

    matrix = np.asarray(report["diagnostics"]["confusion_matrix"])
    objects = np.bincount(torch.cat([t["labels"][~t["iscrowd"]] for t in truths]).numpy(), minlength=80)
    assert matrix[:80].sum(axis=1).tolist() == objects.tolist()  # every object found, confused or missed
    assert matrix[80, 80] == 0 and np.trace(matrix) > 0.5 * objects.sum() and matrix[:80, :80].sum() > np.trace(matrix)
    above = sum(int((d["scores"] >= 0.3).sum()) for d in detections)
    ignored = above - int(matrix[:, :80].sum())
    assert 0 < ignored < 20  # detections inside the 10 crowd regions
    written = json.loads((out / "diagnostics.json").read_text())
    results = json.loads((out / "detections.json").read_text())
    for name in ("person", "car", "bowl"):
        category = dataset.label_to_category_id[dataset.class_names.index(name)]
        row = written["per_class_size_ap"][name]
        ours = [row[key] for key in ("AP", "AP50", "AP_small", "AP_medium", "AP_large")]
        assert ours == pytest.approx(_official_per_category(path, results, category), abs=1e-12), name
    assert len(written["worst_false_positives"]) == 8 and len(written["worst_misses"]) == 8
    scores = [fp["score"] for fp in written["worst_false_positives"]]
    assert scores == sorted(scores, reverse=True)
    assert _open_png(out / "worst_misses.png").size[0] == 4 * 228
    assert written["seconds"] > 0  # the cost is recorded (timed in the README, not asserted here)


def test_plots_check_their_input(tmp_path):
    with pytest.raises(ValueError, match="for 2 classes"):
        plot_confusion_matrix(np.zeros((2, 2), int), ["cat", "dog"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="does not match"):
        plot_precision_recall_per_class(np.zeros((10, 101, 3, 4, 3)), ["cat", "dog"], tmp_path / "pr.png")
    # A class without ground truth (-1 everywhere) gets an empty panel.
    precision = np.full((10, 101, 2, 4, 3), -1.0)
    precision[:, :, 0] = np.linspace(1.0, 0.0, 101)[None, :, None, None]
    plot_precision_recall_per_class(precision, ["cat", "dog"], tmp_path / "pr.png",
                                    operating_points={"cat": (0.5, 0.5), "dog": (-1.0, -1.0)})
    _open_png(tmp_path / "pr.png")


# --------------------------------------------------------------------------------------------
# fpndet eval --diagnostics-thresh / --no-diagnostics
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-class (cat, dog) ResNet-18 RetinaNet at 128 px."""
    from fpndet.engine.checkpoints import save_model_weights
    from fpndet.modeling.build import build_model
    from fpndet.modeling.config import named_config

    torch.manual_seed(0)
    cfg = named_config("retinanet_r18_fpn_cpu", num_classes=2, min_size=[128], max_size=160,
                       fpn_channels=32, retinanet={"head_channels": 32, "head_depth": 1})
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model_weights(path, build_model(cfg).state_dict(), config=cfg.to_dict(), metadata={"class_names": ["cat", "dog"]})
    return path


def test_eval_diagnostics_thresh_changes_the_matrix(checkpoint, tmp_path, capsys):
    from fpndet.cli import main

    data = _write_case_as_coco(tmp_path / "coco")
    common = ["eval", "--weights", str(checkpoint), "--data", str(data), "--score-thresh", "0.0", "--device", "cpu"]
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--diagnostics-thresh" in capsys.readouterr().out

    assert main([*common, "--output", str(tmp_path / "none"), "--diagnostics-thresh", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "score >= 1;" in text and "0 correct, 0 confused, 0 false positives" in text
    # Nothing scores 1: every object is missed, no detection counts.
    assert _read_csv(tmp_path / "none" / "confusion_matrix.csv")[1:] == [
        ["cat", "0", "0", "2"], ["dog", "0", "0", "3"], ["background", "0", "0", "0"]]

    assert main([*common, "--output", str(tmp_path / "all"), "--diagnostics-thresh", "0"]) == 0
    assert "score >= 0;" in capsys.readouterr().out
    written = json.loads((tmp_path / "all" / "diagnostics.json").read_text())
    matrix = np.asarray(written["confusion_matrix"])
    assert written["score_thresh"] == 0.0
    assert matrix[2].sum() > 100  # threshold 0: the (random) model's 100 detections per image count
    counted = json.loads((tmp_path / "all" / "detections.json").read_text())
    assert matrix[:, :2].sum() <= len(counted) == 300
    assert matrix[:2].sum() == 5  # each object counted once: found, confused or missed

    # --no-diagnostics: metrics only, and earlier diagnostics in that folder removed.
    assert main([*common, "--output", str(tmp_path / "all"), "--no-diagnostics"]) == 0
    assert "confusion matrix" not in capsys.readouterr().out
    assert not any((tmp_path / "all" / name).exists() for name in DIAGNOSTIC_FILES)
    assert (tmp_path / "all" / "metrics.json").exists()

    assert main([*common, "--output", str(tmp_path / "bad"), "--diagnostics-thresh", "1.5"]) == 2
    assert "--diagnostics-thresh 1.5: expected a score in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_one_class_matrix_equals_pycocotools_matches_at_iou_half(coco128_dir, tmp_path):
    """With one class the matching is COCO's: on coco128's persons (crowd regions included, with
    detections inside them) the correct / false positive / missed counts at score >= 0.3 equal
    those of pycocotools' own IoU-0.5 matches (``evalImgs`` dtMatches, dtIgnore, gtIgnore)."""
    content = json.loads((coco128_dir / "annotations" / "instances.json").read_text())
    persons = [a for a in content["annotations"] if a["category_id"] == 1]
    assert sum(a["iscrowd"] for a in persons) >= 5
    gt = {"images": content["images"], "annotations": persons, "categories": [{"id": 1, "name": "person"}]}
    rng = np.random.default_rng(5)
    detections, truths, results = [], [], []
    for image in content["images"]:
        objects = [a for a in persons if a["image_id"] == image["id"]]
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)]).reshape(-1, 4)
        size = np.tile(xyxy[:, 2:] - xyxy[:, :2], 2)
        boxes = [xyxy + rng.normal(0, 0.12, xyxy.shape) * size, xyxy[: len(xyxy) // 3] + 2.0]  # jitter, duplicates
        for a, box in zip(objects, xyxy):
            if a["iscrowd"]:  # small boxes inside the crowd region
                cx, cy = rng.uniform(box[:2], box[2:], (3, 2)).T
                boxes.append(np.stack([cx - 10, cy - 20, cx + 10, cy + 20], 1))
        corner = rng.uniform(0, 300, (3, 2))
        boxes = np.concatenate([*boxes, np.concatenate([corner, corner + 80], 1)])
        boxes = np.round(boxes, 2)  # as written to detections.json
        scores = np.round(rng.uniform(0.05, 1.0, len(boxes)), 5)
        detections.append({"boxes": torch.as_tensor(boxes), "scores": torch.as_tensor(scores),
                           "labels": torch.zeros(len(boxes), dtype=torch.int64)})
        truths.append({"boxes": torch.as_tensor(xyxy), "labels": torch.zeros(len(xyxy), dtype=torch.int64),
                       "iscrowd": torch.as_tensor([bool(a["iscrowd"]) for a in objects], dtype=torch.bool)})
        results += [{"image_id": image["id"], "category_id": 1, "score": float(s),
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b, s in zip(boxes.tolist(), scores)]
    ours = confusion_matrix(detections, truths, 1, score_thresh=0.3).matrix

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluator.params.maxDets = [1000]
        evaluator.evaluate()
    correct = false = missed = 0
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != [0, 1e10]:
            continue
        counted = (np.asarray(entry["dtScores"]) >= 0.3) & ~np.asarray(entry["dtIgnore"][0], bool).reshape(-1)
        matched = np.asarray(entry["dtMatches"][0]).reshape(-1) > 0
        correct += int((counted & matched).sum())
        false += int((counted & ~matched).sum())
        regular = ~np.asarray(entry["gtIgnore"], bool)
        # An object is missed when no detection at the threshold matched it.
        taken = {int(d) for d, s in zip(entry["dtMatches"][0], entry["dtScores"]) if d > 0 and s >= 0.3}
        missed += sum(1 for g, r in zip(entry["gtIds"], regular) if r and g not in taken)
    assert ours.tolist() == [[correct, missed], [false, 0]]
    assert correct > 100 and false > 50 and missed > 20


def test_diagonal_equals_pycocotools_true_positives_per_class(coco128_dir):
    """With every class at once (labels swapped, so confusions compete with the right class for
    the same objects; detections on crowd regions of their own and of another class): the
    diagonal equals pycocotools' IoU-0.5 matches per category at score >= 0.3, and every regular
    object is counted once in its row."""
    content = json.loads((coco128_dir / "annotations" / "instances.json").read_text())
    category_ids = sorted(c["id"] for c in content["categories"])
    label_of = {c: i for i, c in enumerate(category_ids)}
    k = len(category_ids)
    rng = np.random.default_rng(11)
    detections, truths, results = [], [], []
    for image in content["images"]:
        objects = [a for a in content["annotations"] if a["image_id"] == image["id"]]
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)]).reshape(-1, 4)
        labels = np.array([label_of[a["category_id"]] for a in objects], dtype=np.int64)
        size = np.tile(xyxy[:, 2:] - xyxy[:, :2], 2)
        # Each object: a jittered detection of its class and one of a random class (either may
        # score higher); some duplicates; small boxes inside crowd regions, of the region's class or not.
        boxes = [xyxy + rng.normal(0, 0.1, xyxy.shape) * size, xyxy + rng.normal(0, 0.1, xyxy.shape) * size,
                 xyxy[: len(xyxy) // 3] + 2.0]
        box_labels = [labels, rng.integers(0, k, len(labels)), labels[: len(xyxy) // 3]]
        for a, box, label in zip(objects, xyxy, labels):
            if a["iscrowd"]:
                cx, cy = rng.uniform(box[:2], box[2:], (4, 2)).T
                boxes.append(np.stack([cx - 10, cy - 20, cx + 10, cy + 20], 1))
                box_labels.append(np.array([label, label, (label + 1) % k, (label + 1) % k]))
        corner = rng.uniform(0, 300, (3, 2))
        boxes = np.round(np.concatenate([*boxes, np.concatenate([corner, corner + 80], 1)]), 2)
        box_labels = np.concatenate([*box_labels, rng.integers(0, k, 3)])
        scores = np.round(rng.uniform(0.05, 1.0, len(boxes)), 5)
        detections.append({"boxes": torch.as_tensor(boxes), "scores": torch.as_tensor(scores),
                           "labels": torch.as_tensor(box_labels)})
        truths.append({"boxes": torch.as_tensor(xyxy), "labels": torch.as_tensor(labels),
                       "iscrowd": torch.as_tensor([bool(a["iscrowd"]) for a in objects], dtype=torch.bool)})
        results += [{"image_id": image["id"], "category_id": category_ids[label], "score": float(s),
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                    for b, s, label in zip(boxes.tolist(), scores, box_labels.tolist())]
    result = confusion_matrix(detections, truths, k, score_thresh=0.3)

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": content["images"], "annotations": content["annotations"],
                        "categories": content["categories"]}
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluator.params.maxDets = [1000]
        evaluator.evaluate()
    correct = np.zeros(k, np.int64)
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != [0, 1e10]:
            continue
        counted = (np.asarray(entry["dtScores"]) >= 0.3) & ~np.asarray(entry["dtIgnore"][0], bool).reshape(-1)
        matched = np.asarray(entry["dtMatches"][0]).reshape(-1) > 0
        correct[label_of[entry["category_id"]]] += int((counted & matched).sum())
    assert np.diag(result.matrix)[:k].tolist() == correct.tolist()
    objects = np.bincount([label_of[a["category_id"]] for a in content["annotations"] if not a["iscrowd"]], minlength=k)
    assert result.matrix[:k].sum(axis=1).tolist() == objects.tolist()
    totals = result.summary()
    assert totals["confused"] > 30 and totals["duplicate"] > 30 and correct.sum() > 300
