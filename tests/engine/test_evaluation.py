from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpndet.engine.evaluation import (
    COCO_METRIC_NAMES,
    CocoEvaluator,
    detections_to_coco_results,
    format_metrics_table,
    format_per_class_table,
    save_results_json,
    voc_map50,
)


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": float(bbox[2] * bbox[3]),
        "iscrowd": iscrowd,
    }


def _hand_made_gt() -> dict:
    """2 classes (COCO ids 1 "cat" and 3 "dog"), 3 images; small, medium and large objects."""
    return {
        "images": [
            {"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"},
            {"id": 2, "width": 200, "height": 200, "file_name": "2.jpg"},
            {"id": 3, "width": 100, "height": 100, "file_name": "3.jpg"},
        ],
        "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}],
        "annotations": [
            _ann(1, 1, 1, [10, 10, 40, 40]),  # cat, medium (1600 px^2)
            _ann(2, 1, 3, [50, 50, 30, 30]),  # dog, small (900)
            _ann(3, 2, 1, [0, 0, 100, 100]),  # cat, large (10000)
            _ann(4, 2, 3, [120, 120, 60, 60]),  # dog, medium (3600)
            _ann(5, 2, 1, [100, 0, 100, 100], iscrowd=1),  # crowd of cats
            _ann(6, 3, 3, [20, 20, 20, 20]),  # dog, small (400)
        ],
    }


def _hand_made_results() -> list[dict]:
    r = lambda image_id, category_id, bbox, score: {  # noqa: E731
        "image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score,
    }  # fmt: skip
    return [
        r(1, 1, [10, 10, 40, 40], 0.9),  # cat TP, IoU 1
        r(1, 3, [55, 50, 30, 30], 0.8),  # dog, IoU 750/1050 = 0.714: TP at 0.50..0.70, FP above
        r(1, 1, [60, 0, 20, 20], 0.3),  # cat FP (no overlap)
        r(2, 1, [0, 0, 100, 90], 0.95),  # cat, IoU 0.9
        r(2, 1, [110, 10, 80, 80], 0.6),  # cat inside the crowd box: ignored
        r(2, 3, [0, 150, 30, 30], 0.7),  # dog FP; the dog at (120, 120) is missed
        r(3, 3, [20, 20, 20, 20], 0.4),  # dog TP
        r(3, 3, [21, 21, 20, 20], 0.35),  # dog duplicate: FP
    ]


def _pycocotools_reference(tmp_path, gt: dict, results: list[dict]):
    """Official pycocotools path: COCO(json file), loadRes(json file), COCOeval."""
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        evaluator = COCOeval(coco, coco.loadRes(str(results_file)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_hand_made_case_matches_pycocotools_and_hand_computed_ap50(tmp_path):
    gt = _hand_made_gt()
    results = _hand_made_results()
    results_before = copy.deepcopy(results)
    gt_before = copy.deepcopy(gt)

    out = CocoEvaluator(gt).evaluate(results)

    reference = _pycocotools_reference(tmp_path, gt, results)
    for name, value in zip(COCO_METRIC_NAMES, reference.stats):
        assert out["metrics"][name] == pytest.approx(float(value), abs=1e-12), name
    np.testing.assert_array_equal(out["precision"], reference.eval["precision"])

    # By hand, at IoU 0.5 (101 recall points r = 0, 0.01, ..., 1):
    # cat: 2 gts; detections by score: TP (0.95), TP (0.9), crowd-ignored (0.6), FP (0.3)
    #   -> precision 1 up to recall 1 -> AP50 = 1.
    # dog: 3 gts; TP (0.8), FP (0.7), TP (0.4), FP (0.35): recall 1/3, 1/3, 2/3, 2/3 and
    #   precision 1, 1/2, 2/3, 1/2. Interpolated precision is 1 for r <= 0.33 (34 points),
    #   2/3 for 0.34 <= r <= 0.66 (33 points), 0 above (recall never exceeds 2/3)
    #   -> AP50 = (34 + 33 * 2/3) / 101 = 56/101.
    assert out["per_class_ap50"]["cat"] == pytest.approx(1.0)
    assert out["per_class_ap50"]["dog"] == pytest.approx(56 / 101)
    assert out["metrics"]["AP50"] == pytest.approx((1 + 56 / 101) / 2)
    # Per-class keys follow ascending category id (cat=1 before dog=3), not the file order.
    assert list(out["per_class_ap"]) == ["cat", "dog"]
    # Per-class AP@[.5:.95] averages to the overall AP.
    assert np.mean(list(out["per_class_ap"].values())) == pytest.approx(out["metrics"]["AP"])
    # Dog AP drops above IoU 0.7 (the 0.714 match fails from 0.75), so AP75 < AP50.
    assert out["metrics"]["AP75"] < out["metrics"]["AP50"]
    assert out["precision"].shape == (10, 101, 2, 4, 3)
    # Inputs are not modified (pycocotools' loadRes adds keys to the dicts it is given).
    assert results == results_before
    assert gt == gt_before


def test_perfect_detections_on_hand_made_gt_give_ap_one():
    gt = _hand_made_gt()
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    metrics = CocoEvaluator(gt).evaluate(results)["metrics"]
    # pycocotools computes precision as tp / (tp + fp + 2.2e-16): a category with a single object
    # in a range gets 1 - 2.2e-16 rather than exactly 1.
    for name in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"]:
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name


def test_perfect_detections_on_coco128_give_ap_one(coco128_dir):
    gt = json.loads((coco128_dir / "annotations" / "instances.json").read_text())
    category_ids = sorted(c["id"] for c in gt["categories"])
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    per_image: dict[int, list[dict]] = {image["id"]: [] for image in gt["images"]}
    for annotation in gt["annotations"]:
        if not annotation["iscrowd"]:
            per_image[annotation["image_id"]].append(annotation)
    image_ids = list(per_image)
    detections = []
    for image_id in image_ids:
        annotations = per_image[image_id]
        xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        detections.append(
            {
                "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                "scores": torch.ones(len(annotations)),
                "labels": torch.tensor([label_of[a["category_id"]] for a in annotations], dtype=torch.int64),
            }
        )
    results = detections_to_coco_results(detections, image_ids, category_ids)
    assert len(results) == 929  # 939 objects, 10 of them crowds

    out = CocoEvaluator(gt).evaluate(results)

    metrics = out["metrics"]
    for name in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]:
        # every size range has objects in coco128; 1 up to pycocotools' eps in tp / (tp + fp + eps)
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name
    assert metrics["AR1"] < 0.9  # many images hold several objects of one class
    # 80 categories, 71 with objects: the other 9 are undefined (-1), as in pycocotools.
    assert len(out["per_class_ap"]) == 80
    assert sum(abs(v - 1.0) < 1e-12 for v in out["per_class_ap"].values()) == 71
    assert sum(v == -1.0 for v in out["per_class_ap"].values()) == 9


def test_size_range_without_objects_is_minus_one():
    gt = _hand_made_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 32**2]  # small dogs only
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    out = CocoEvaluator(gt).evaluate(results)
    assert out["metrics"]["AP"] == 1.0
    assert out["metrics"]["APs"] == 1.0
    assert out["metrics"]["APm"] == -1.0
    assert out["metrics"]["APl"] == -1.0
    assert out["per_class_ap"] == {"cat": -1.0, "dog": 1.0}


def test_empty_results_give_zeros():
    out = CocoEvaluator(_hand_made_gt()).evaluate([])
    assert out["metrics"] == {name: 0.0 for name in COCO_METRIC_NAMES}
    assert out["per_class_ap"] == {"cat": 0.0, "dog": 0.0}
    assert out["precision"].shape == (10, 101, 2, 4, 3)
    assert (out["precision"][:, :, :, 0, -1] == 0).all()


def test_results_on_unknown_image_raise():
    results = [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}]
    with pytest.raises(ValueError, match="99"):
        CocoEvaluator(_hand_made_gt()).evaluate(results)


def test_class_names_override_and_length_check():
    evaluator = CocoEvaluator(_hand_made_gt(), class_names=["Cat", "Dog"])
    assert evaluator.category_ids == [1, 3]
    assert list(evaluator.evaluate([])["per_class_ap50"]) == ["Cat", "Dog"]
    with pytest.raises(ValueError):
        CocoEvaluator(_hand_made_gt(), class_names=["only one"])


def test_detections_to_coco_results_converts_boxes_labels_and_rounds():
    detections = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [1.234567, 2.0, 3.5, 4.0]]),
            "scores": torch.tensor([0.123456789, 0.9]),
            "labels": torch.tensor([1, 0]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    results = detections_to_coco_results(detections, [7, 8], [1, 3])
    assert results == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.12346},
        {"image_id": 7, "category_id": 1, "bbox": [1.23, 2.0, 2.27, 2.0], "score": 0.9},
    ]
    with pytest.raises(ValueError):
        detections_to_coco_results(detections, [7, 8], [1])  # label 1 has no category
    with pytest.raises(ValueError):
        detections_to_coco_results(detections, [7], [1, 3])


def test_tables_are_aligned_and_show_values():
    metrics = {name: 0.5 for name in COCO_METRIC_NAMES} | {"APs": -1.0}
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert len(lines) == 2 + len(COCO_METRIC_NAMES)
    assert len({len(line) for line in lines[2:]}) == 1  # aligned
    assert "0.5000" in lines[2] and "IoU=0.50:0.95" in lines[2]
    assert "n/a" in [line for line in lines if "small" in line and "AP  " in line][0]

    per_class = format_per_class_table({"cat": 0.374, "dog": -1.0, "person": 0.5}, columns=2)
    assert "37.4" in per_class and "n/a" in per_class and "50.0" in per_class
    assert len(per_class.splitlines()) == 4  # header, rule, 2 rows of 2 columns
    with_ap50 = format_per_class_table({"cat": 0.374, "dog": 0.1}, {"cat": 0.6, "dog": 0.25}, columns=1)
    assert with_ap50.splitlines()[0].split() == ["class", "AP", "AP50"]
    assert with_ap50.splitlines()[2].split() == ["cat", "37.4", "60.0"]
    assert with_ap50.splitlines()[3].split() == ["dog", "10.0", "25.0"]


def test_save_results_json_round_trip(tmp_path):
    path = tmp_path / "out" / "results.json"
    results = [{"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": np.float32(0.5)}]
    save_results_json(path, results)
    assert json.loads(path.read_text()) == [{"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


# -------------------------------------------------------------------------------- VOC
def _voc_case():
    """One class; image A has 2 objects, image B 1 object + 1 difficult object.

    Detections by score: 0.9 TP (A obj 1), 0.8 FP (A, background), 0.7 on B's difficult object
    (ignored), 0.6 TP (B obj), 0.5 duplicate of A obj 1 (FP), 0.4 TP (A obj 2).
    With the ignored one removed: TP FP TP FP TP over 3 positives:
      recall    1/3 1/3 2/3 2/3 1
      precision 1   1/2 2/3 1/2 3/5
    All-point AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45 = 0.7556.
    11-point AP: levels 0..0.3 -> 1 (4 levels), 0.4..0.6 -> 2/3 (3), 0.7..1.0 -> 3/5 (4)
      = (4 + 2 + 2.4) / 11 = 8.4/11 = 0.7636.
    """
    ground_truths = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 70.0]]),
            "labels": torch.tensor([0, 0]),
            "iscrowd": torch.tensor([0, 0]),
        },
        {
            "boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 40.0, 40.0]]),
            "labels": torch.tensor([0, 0]),
            "iscrowd": torch.tensor([0, 1]),
        },
    ]
    detections = [
        {
            "boxes": torch.tensor(
                [[0.0, 0.0, 10.0, 10.0], [80.0, 80.0, 90.0, 90.0], [0.0, 0.0, 10.0, 10.0], [51.0, 51.0, 70.0, 70.0]]
            ),
            "scores": torch.tensor([0.9, 0.8, 0.5, 0.4]),
            "labels": torch.tensor([0, 0, 0, 0]),
        },
        {
            "boxes": torch.tensor([[30.0, 30.0, 40.0, 40.0], [1.0, 0.0, 20.0, 20.0]]),
            "scores": torch.tensor([0.7, 0.6]),
            "labels": torch.tensor([0, 0]),
        },
    ]
    return detections, ground_truths


def test_voc_perfect_detections_give_one():
    _, ground_truths = _voc_case()
    ground_truths = [dict(g, labels=torch.tensor([0, 1])) for g in ground_truths]
    detections = [
        {"boxes": g["boxes"], "scores": torch.ones(2), "labels": g["labels"]} for g in ground_truths
    ]
    out = voc_map50(detections, ground_truths, 2)
    assert out["mAP50"] == 1.0
    assert out["per_class_ap50"] == [1.0, 1.0]


def test_voc_hand_computed_all_point_and_eleven_point():
    detections, ground_truths = _voc_case()
    all_point = voc_map50(detections, ground_truths, 1)
    eleven_point = voc_map50(detections, ground_truths, 1, use_07_metric=True)
    assert all_point["mAP50"] == pytest.approx(34 / 45)
    assert eleven_point["mAP50"] == pytest.approx(8.4 / 11)
    assert all_point["per_class_ap50"] == [pytest.approx(34 / 45)]


def _ranked_voc_case(outcomes: str, positives: int):
    """One image with ``positives`` class-0 boxes and detections in descending score order:
    ``T`` hits the next unmatched box (IoU 1), ``F`` lands on empty space (IoU 0)."""
    gt_boxes = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10.0, 10.0] for i in range(positives)])
    boxes, hits = [], 0
    for outcome in outcomes:
        if outcome == "T":
            boxes.append(gt_boxes[hits].tolist())
            hits += 1
        else:
            boxes.append([0.0, 500.0, 10.0, 510.0])
    detections = [{
        "boxes": torch.tensor(boxes).reshape(-1, 4),
        "scores": torch.linspace(0.9, 0.1, len(outcomes)),
        "labels": torch.zeros(len(outcomes), dtype=torch.int64),
    }]
    ground_truths = [{"boxes": gt_boxes, "labels": torch.zeros(positives, dtype=torch.int64)}]
    return detections, ground_truths


def _py_faster_rcnn_voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """The 11-point loop of py-faster-rcnn's voc_ap(use_07_metric=True), written out here."""
    ap = 0.0
    for level in np.arange(0.0, 1.1, 0.1):
        reached = recall >= level
        ap += (precision[reached].max() if reached.any() else 0.0) / 11.0
    return ap


# VOC2007 devkit: ``for t=0:0.1:1, p=max(prec(rec>=t)) ...``. Level 0.3 is 0.30000000000000004
# however MATLAB builds the range (the first case is the devkit's own value); levels 0.6 and 0.7
# follow the k*0.1 reading of its for loop, shared with py-faster-rcnn (see _eleven_point_ap).
@pytest.mark.parametrize(
    "outcomes, positives, expected, exact_tenths",
    [
        # recall 1/10, 2/10, 3/10 at precision 1: 3/10 is the double 0.3 < 3*0.1, so level 0.3 is
        # not reached -> 3 levels of 11 (exact tenths would count 4).
        ("TTTFF", 10, 3 / 11, 4 / 11),
        # recall 7/10 = 0.7 reaches level 6 (0.6000000000000001) but not level 7
        # (0.7000000000000001) -> levels 0..6 = 7/11.
        ("TTTTTTT", 10, 7 / 11, 8 / 11),
        # recall 3/5 = 0.6 < 0.6000000000000001: levels 0..5 -> 6/11.
        ("TTTFF", 5, 6 / 11, 7 / 11),
    ],
)
def test_voc07_recall_levels_are_k_times_0_1_not_exact_tenths(outcomes, positives, expected, exact_tenths):
    detections, ground_truths = _ranked_voc_case(outcomes, positives)
    eleven_point = voc_map50(detections, ground_truths, 1, use_07_metric=True)["mAP50"]
    assert eleven_point == pytest.approx(expected, abs=1e-12)
    assert abs(eleven_point - exact_tenths) > 0.09  # the old np.arange(11) / 10 levels
    # All-point AP is unaffected: precision 1 up to the last recall.
    hits = outcomes.count("T")
    assert voc_map50(detections, ground_truths, 1)["mAP50"] == pytest.approx(hits / positives)


def test_metrics_table_says_voc_map50_is_the_all_point_devkit_ap():
    table = format_metrics_table({"AP": 0.25, "VOC_mAP50": 0.5})
    row = next(line for line in table.splitlines() if line.startswith("VOC_mAP50"))
    assert "all-point interpolated AP at IoU >= 0.5 (VOC2010+ devkit rule)" in row
    assert row.endswith("0.5000")


def test_voc07_ap_equals_py_faster_rcnn_on_random_rankings():
    rng = np.random.default_rng(7)
    for _ in range(200):
        positives = int(rng.choice([3, 5, 10, 20]))
        length = int(rng.integers(1, 2 * positives + 1))
        outcomes = "".join(rng.choice(["T", "F"], size=length))
        while outcomes.count("T") > positives:  # no more hits than objects
            outcomes = outcomes.replace("T", "F", 1)
        is_tp = np.array([outcome == "T" for outcome in outcomes])
        recall = np.cumsum(is_tp) / positives
        precision = np.cumsum(is_tp) / np.arange(1, length + 1)
        detections, ground_truths = _ranked_voc_case(outcomes, positives)
        got = voc_map50(detections, ground_truths, 1, use_07_metric=True)["mAP50"]
        assert got == pytest.approx(_py_faster_rcnn_voc07_ap(recall, precision), abs=1e-12), outcomes


def test_voc_difficult_objects_are_neither_positives_nor_false_positives():
    detections, ground_truths = _voc_case()
    # Without the difficult flag the 0.7 detection is a TP on a 4th positive:
    # TP FP TP TP FP TP, recall 1/4 1/4 2/4 3/4 3/4 1, precision 1 1/2 2/3 3/4 3/5 2/3;
    # precision envelope over the recall steps 1/4, 2/4, 3/4, 1 is 1, 3/4, 3/4, 2/3
    # -> AP = (1 + 3/4 + 3/4 + 2/3) / 4.
    not_difficult = [dict(g, iscrowd=torch.zeros(2, dtype=torch.int64)) for g in ground_truths]
    assert voc_map50(detections, not_difficult, 1)["mAP50"] == pytest.approx((1 + 0.75 + 0.75 + 2 / 3) / 4)
    # A class whose only objects are difficult is undefined and left out of the mean.
    only_difficult = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]), "iscrowd": torch.tensor([1])},
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0]), "iscrowd": torch.tensor([0])},
    ]
    dets = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
    ]
    out = voc_map50(dets, only_difficult, 2)
    assert out["per_class_ap50"] == [1.0, -1.0]
    assert out["mAP50"] == 1.0


def test_voc_no_detections_and_iou_threshold():
    detections, ground_truths = _voc_case()
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    assert voc_map50(empty, ground_truths, 1) == {"mAP50": 0.0, "per_class_ap50": [0.0]}
    # At IoU 0.95 the shifted detections (IoU 0.9025 and 0.95) fail: 0.4 -> FP, 0.6 stays TP
    # (IoU 380/400 = 0.95 >= 0.95). TP FP TP FP FP: recall 1/3 1/3 2/3 2/3 2/3 -> AP = 1/3 + 1/3 * 2/3.
    strict = voc_map50(detections, ground_truths, 1, iou_threshold=0.95)
    assert strict["mAP50"] == pytest.approx(1 / 3 + 2 / 9)


def test_voc_detections_only_match_their_own_class():
    ground_truths = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]), "labels": torch.tensor([0, 1])}
    ]
    detections = [
        {
            # class 1 on the class-0 box (FP, scored highest), then class 1 on its own box (TP)
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 1]),
        }
    ]
    out = voc_map50(detections, ground_truths, 3)
    # class 0: missed -> 0; class 1: FP then TP -> precision 1/2 at recall 1 -> 0.5; class 2: no objects.
    assert out["per_class_ap50"] == [0.0, 0.5, -1.0]
    assert out["mAP50"] == 0.25
    with pytest.raises(ValueError, match="label 3"):
        voc_map50(detections, [dict(ground_truths[0], labels=torch.tensor([0, 3]))], 3)


# -------------------------------------------------------------------------------- issue 7
# COCO data is evaluated against its own JSON; VOC difficult objects are ignored as the devkit
# ignores them; model labels are mapped to dataset labels by class name.
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

from fpndet.data.formats.coco import CocoDetection  # noqa: E402
from fpndet.data.formats.voc import VOCDetection  # noqa: E402
from fpndet.engine.inference import evaluate_detections  # noqa: E402
from fpndet.errors import InputError  # noqa: E402


def _official_cocoeval(gt_path, results_path) -> COCOeval:
    """pycocotools run directly: COCO(file), loadRes(file), evaluate/accumulate/summarize."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        evaluator = COCOeval(coco, coco.loadRes(str(results_path)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _detections_from_ground_truth(content: dict, label_of: dict[int, int], image_ids: list[int], seed: int = 0):
    """Deterministic detections (xyxy, contiguous labels) derived from a COCO JSON's objects.

    Per object: missed (15 %), else a detection with jitter (std 8 % of the box size) and a
    random score; sometimes a looser duplicate (10 %) or a second detection of the wrong class
    (5 %). Per image: 3 false positives of random size (8 to 300 px) and class, some small
    boxes inside crowd regions. Scores are distinct random values in (0.01, 1).
    """
    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {image_id: [] for image_id in image_ids}
    for annotation in content["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    sizes = {image["id"]: (image["width"], image["height"]) for image in content["images"]}
    labels_all = sorted(label_of.values())
    detections = []
    for image_id in image_ids:
        boxes, scores, labels = [], [], []

        def add(xywh, label):
            x, y, w, h = xywh
            boxes.append([x, y, x + max(w, 0.5), y + max(h, 0.5)])
            scores.append(float(rng.uniform(0.01, 1.0)))
            labels.append(label)

        for annotation in by_image[image_id]:
            x, y, w, h = annotation["bbox"]
            label = label_of[annotation["category_id"]]
            if annotation["iscrowd"]:
                add([x + w / 4, y + h / 4, w / 4, h / 4], label)  # inside the crowd region
                continue
            if rng.random() < 0.15:
                continue
            jitter = rng.normal(0.0, 0.08, 4) * [w, h, w, h]
            add([x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]], label)
            if rng.random() < 0.10:
                jitter = rng.normal(0.0, 0.25, 4) * [w, h, w, h]
                add([x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]], label)
            if rng.random() < 0.05:
                add([x, y, w, h], int(rng.choice(labels_all)))
        width, height = sizes[image_id]
        for _ in range(3):
            w, h = rng.uniform(8, 300, 2)
            add([rng.uniform(0, width - 8), rng.uniform(0, height - 8), w, h], int(rng.choice(labels_all)))
        detections.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
    return detections


def _ground_truths(dataset) -> list[dict]:
    return [
        {
            "boxes": torch.as_tensor(r.boxes).reshape(-1, 4),
            "labels": torch.as_tensor(r.labels),
            "iscrowd": torch.as_tensor(r.iscrowd),
        }
        for r in (dataset.annotation(i) for i in range(len(dataset)))
    ]


def test_coco128_evaluation_equals_pycocotools_on_the_original_json(coco128_dir, tmp_path):
    """Every metric of fpndet's evaluation equals COCOeval run on the original JSON, exactly."""
    path = coco128_dir / "annotations" / "instances.json"
    content = json.loads(path.read_text())
    dataset = CocoDetection(path)
    detections = _detections_from_ground_truth(content, dataset.category_id_to_label, dataset.image_ids)

    report = evaluate_detections(dataset, detections, _ground_truths(dataset), out_dir=tmp_path)

    official = _official_cocoeval(path, tmp_path / "detections.json")
    assert [report["metrics"][name] for name in COCO_METRIC_NAMES] == [float(v) for v in official.stats]
    np.testing.assert_array_equal(report["precision"], official.eval["precision"])
    # The detections exercise every size range, with neither perfect nor empty scores.
    for name in ("APs", "APm", "APl", "ARs", "ARm", "ARl"):
        assert 0.05 < report["metrics"][name] < 0.95, (name, report["metrics"][name])


def _write_voc_root(root: Path, objects: dict[str, list[tuple]], size=(100, 100)) -> Path:
    """VOC root with one grey image per id; objects ``(name, (xmin, ymin, xmax, ymax), difficult)``
    in VOC's 1-based inclusive pixels; split "val" lists every id."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem, items in objects.items():
        Image.new("RGB", (size[1], size[0]), (90, 90, 90)).save(root / "JPEGImages" / f"{stem}.jpg")
        xml = "".join(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for name, b, difficult in items
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size[1]}</width>"
            f"<height>{size[0]}</height><depth>3</depth></size>{xml}</annotation>"
        )
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(objects) + "\n")
    return root


def test_voc_difficult_toy_case_coco_ap50_equals_the_devkit(tmp_path):
    """One dog [0, 0, 20, 20] and one difficult dog [40, 40, 100, 100] (pixel-edge xyxy).

    Detections by score: two exact copies of the difficult box (0.95, 0.93), a small box inside
    it (0.9, IoU 100/3600), the dog (0.8). Devkit: ignored, ignored (a difficult box absorbs any
    number of detections: its "detected" flag is never set), FP (IoU < 0.5), TP -> AP50 = 1/2.
    COCO's crowd rule (intersection over the detection's area) would also ignore the small box
    -> 1.0; one-to-one ignore matching would make the second copy an FP -> 1/3.
    """
    root = _write_voc_root(tmp_path / "voc", {"a": [("dog", (1, 1, 20, 20), 0), ("dog", (41, 41, 100, 100), 1)]})
    dataset = VOCDetection(root, "val")
    detections = [
        {
            "boxes": torch.tensor(
                [[40.0, 40.0, 100.0, 100.0], [40.0, 40.0, 100.0, 100.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]]
            ),
            "scores": torch.tensor([0.95, 0.93, 0.9, 0.8]),
            "labels": torch.zeros(4, dtype=torch.int64),
        }
    ]
    report = evaluate_detections(dataset, detections, _ground_truths(dataset))
    assert report["metrics"]["VOC_mAP50"] == 0.5
    assert report["metrics"]["AP50"] == pytest.approx(0.5, abs=1e-12)
    # AP75 and beyond: the copies (IoU 1) stay ignored, the dog stays a TP.
    assert report["metrics"]["AP"] == pytest.approx(0.5, abs=1e-12)
    # The difficult box is no miss: recall 1.
    assert report["metrics"]["AR100"] == pytest.approx(1.0)


def test_voc_difficult_boxes_use_true_iou_and_absorb_any_number_of_detections():
    """CocoEvaluator: a ``difficult`` annotation is matched by IoU (not crowd IoA), and any number
    of detections matched to it are ignored; a detection prefers a free regular box."""
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [40, 40, 60, 60], "area": 3600, "iscrowd": 0,
             "difficult": 1},
        ],
    }
    r = lambda bbox, score: {"image_id": 1, "category_id": 1, "bbox": bbox, "score": score}  # noqa: E731
    copies = [r([40, 40, 60, 60], 0.99 - 0.01 * i) for i in range(5)]
    # Five copies of the difficult box, then the dog: every copy ignored -> AP 1.
    assert CocoEvaluator(gt).evaluate([*copies, r([0, 0, 20, 20], 0.5)])["metrics"]["AP"] == pytest.approx(1.0)
    # A small box inside the difficult box is a false positive (IoU 1/36): FP then TP -> 1/2.
    out = CocoEvaluator(gt).evaluate([r([50, 50, 10, 10], 0.9), r([0, 0, 20, 20], 0.5)])["metrics"]
    assert out["AP50"] == pytest.approx(0.5, abs=1e-12)
    # No detection on the difficult box: it is not a miss.
    assert CocoEvaluator(gt).evaluate([r([0, 0, 20, 20], 0.5)])["metrics"]["AR100"] == pytest.approx(1.0)


def test_raccoon_with_difficult_objects_equals_evaluation_without_them(raccoon_dir, tmp_path):
    """Real raccoon boxes (it has no difficult objects: some are marked difficult in a copy).

    Detections: jittered regular objects, two exact copies of each difficult box and a small box
    inside it. Evaluating that must equal stock pycocotools on the same data with the difficult
    boxes and their copies removed, the small boxes kept as the false positives they are.
    """
    import xml.etree.ElementTree as ET

    root = tmp_path / "raccoon"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").symlink_to(raccoon_dir / "JPEGImages")
    (root / "ImageSets").symlink_to(raccoon_dir / "ImageSets")
    ids = (raccoon_dir / "ImageSets" / "Main" / "val.txt").read_text().split()
    for index, stem in enumerate(ids):
        tree = ET.parse(raccoon_dir / "Annotations" / f"{stem}.xml")
        for number, element in enumerate(tree.getroot().findall("object")):
            flag = element.find("difficult")
            if flag is None:
                flag = ET.SubElement(element, "difficult")
            flag.text = "1" if index % 3 == 0 and number == 0 else "0"
        tree.write(root / "Annotations" / f"{stem}.xml")
    dataset = VOCDetection(root, "val")
    truths = _ground_truths(dataset)
    assert sum(int(t["iscrowd"].sum()) for t in truths) == 14

    rng = np.random.default_rng(1)
    detections, plain_results, plain_annotations = [], [], []
    for image_id, truth in zip(dataset.image_ids, truths):
        boxes = []
        for box, difficult in zip(truth["boxes"].tolist(), truth["iscrowd"].tolist()):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            if difficult:
                boxes += [(box, False), (box, False), ([x1 + w / 4, y1 + h / 4, x1 + w / 2, y1 + h / 2], True)]
            else:
                jitter = (rng.normal(0.0, 0.06, 4) * [w, h, w, h]).tolist()
                boxes.append(([x1 + jitter[0], y1 + jitter[1], x2 + jitter[2], y2 + jitter[3]], True))
                plain_annotations.append(
                    {"id": len(plain_annotations) + 1, "image_id": image_id, "category_id": 1,
                     "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}
                )
        # Copies of difficult boxes score lowest so that they never take the single slot of AR1
        # (an ignored detection still counts against maxDets, as in pycocotools).
        ranked = rng.permutation(np.linspace(0.2, 0.99, sum(keep for _, keep in boxes))).tolist()
        scores = [ranked.pop() if keep else 0.1 for _, keep in boxes]
        detections.append(
            {
                "boxes": torch.tensor([b for b, _ in boxes], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.zeros(len(boxes), dtype=torch.int64),
            }
        )
        single = detections_to_coco_results([detections[-1]], [image_id], [1])
        plain_results += [result for result, (_, keep) in zip(single, boxes) if keep]

    report = evaluate_detections(dataset, detections, truths)

    plain_gt = {**dataset.to_coco(), "annotations": plain_annotations}
    plain = CocoEvaluator(plain_gt).evaluate(plain_results)
    assert report["metrics"] == {**plain["metrics"], "VOC_mAP50": report["metrics"]["VOC_mAP50"]}
    assert 0.3 < report["metrics"]["AP50"] < 0.99


from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights  # noqa: E402

# torchvision's own list of the names of its COCO labels (an independent reference for fpndet's copy).
COCO91 = list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def test_labels_that_are_coco_category_ids_are_evaluated_as_such(coco128_dir, tmp_path):
    """A torchvision COCO model's labels are category ids: label 1 is "person" (category 1),
    not the dataset's label 1 (bicycle); label 90 (toothbrush) is valid."""
    path = coco128_dir / "annotations" / "instances.json"
    content = json.loads(path.read_text())
    dataset = CocoDetection(path)
    identity = {c["id"]: c["id"] for c in content["categories"]}
    detections = _detections_from_ground_truth(content, identity, dataset.image_ids)

    report = evaluate_detections(dataset, detections, _ground_truths(dataset), out_dir=tmp_path,
                                 model_class_names=COCO91)

    written = json.loads((tmp_path / "detections.json").read_text())
    assert {d["category_id"] for d in written} == set(identity)
    contiguous = _detections_from_ground_truth(content, dataset.category_id_to_label, dataset.image_ids)
    same = evaluate_detections(dataset, contiguous, _ground_truths(dataset))
    assert report["metrics"] == same["metrics"]


def test_model_classes_missing_from_the_dataset_are_refused_naming_both_lists(coco128_dir):
    dataset = CocoDetection(coco128_dir / "annotations" / "instances.json")
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    with pytest.raises(InputError) as error:
        evaluate_detections(dataset, empty, _ground_truths(dataset)[:1], model_class_names=["cat", "dog"])
    assert "cat, dog" in str(error.value) and "person, bicycle" in str(error.value)


def test_model_labels_map_to_dataset_labels_by_name():
    from fpndet.engine.evaluation import match_model_classes, remap_detection_labels

    assert match_model_classes(["cat", "dog"], ["cat", "dog"]) is None  # the trainer's model: identity
    mapping = match_model_classes(["dog", "N/A", "cat", "bird"], ["cat", "dog"])
    assert mapping == [1, -1, 0, -1]  # classes the dataset lacks are dropped
    detection = {"boxes": torch.arange(16.0).reshape(4, 4), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
                 "labels": torch.tensor([0, 1, 2, 3])}
    (out,) = remap_detection_labels([detection], mapping)
    assert out["labels"].tolist() == [1, 0] and out["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert torch.equal(out["boxes"], detection["boxes"][[0, 2]])
    # A model without names: its labels are the dataset's when the counts agree, else refused.
    assert match_model_classes(None, ["cat", "dog"], num_model_classes=2) is None
    with pytest.raises(InputError, match="names no classes and has 3 outputs.*cat, dog"):
        match_model_classes(None, ["cat", "dog"], num_model_classes=3, source="m.safetensors")
    with pytest.raises(InputError, match="more than once"):
        match_model_classes(["cat", "cat", "dog"], ["cat", "dog"])


# --------------------------------------------------------------------------------------------
# RPN proposal recall (FPN paper Table 1), by pycocotools run directly
# --------------------------------------------------------------------------------------------
def test_proposal_recall_counts_boxes_found_at_each_iou_and_size():
    from fpndet.engine.evaluation import proposal_recall, proposals_to_coco_results

    gt = {
        "images": [{"id": 1, "height": 600, "width": 600}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 100, 200, 200], "area": 40000, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [400, 400, 60, 60], "area": 3600, "iscrowd": 0},
        ],
    }
    # the small box found exactly (recall 1 at every IoU), the large one at IoU 200*180/(200*200) = 0.9
    # (found at thresholds 0.5..0.9: 9 of 10), the medium one only as the 150th proposal
    boxes = [[0, 0, 20, 20], [100, 100, 300, 280]] + [[500, 0, 510, 10]] * 147 + [[400, 400, 460, 460]]
    proposals = [{"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.linspace(1, 0.01, len(boxes))}]
    recall = proposal_recall(gt, proposals_to_coco_results(proposals, [1], 1), max_proposals=(100, 1000))
    assert recall["AR100"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert recall["AR1000"] == pytest.approx((1.0 + 0.9 + 1.0) / 3)
    assert recall["ARs1000"] == pytest.approx(1.0)
    assert recall["ARm1000"] == pytest.approx(1.0)
    assert recall["ARl1000"] == pytest.approx(0.9)


def test_proposal_recall_equals_cocoeval_on_the_original_coco128_json(coco128_dir):
    """Class-agnostic AR from fpndet's evaluation path equals pycocotools' COCOeval run directly on
    the original instances.json (useCats=0, maxDets [100, 1000])."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from fpndet.data.formats.coco import CocoDetection
    from fpndet.engine.inference import evaluate_proposals

    path = coco128_dir / "annotations" / "instances.json"
    dataset = CocoDetection(path)
    generator = torch.Generator().manual_seed(0)
    proposals, results = [], []
    for index in range(len(dataset)):
        record = dataset.annotation(index)
        gt = torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
        jitter = (torch.rand(len(gt), 4, generator=generator) - 0.5) * 0.3 * (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        noise = torch.rand(300, 4, generator=generator) * torch.tensor([record.width, record.height] * 2)
        noise = torch.cat([noise[:, :2].minimum(noise[:, 2:]), noise[:, :2].maximum(noise[:, 2:]) + 1], 1)
        boxes = torch.cat([gt + jitter, noise])
        scores = torch.rand(len(boxes), generator=generator)
        proposals.append({"boxes": boxes, "scores": scores})
        for (x1, y1, x2, y2), s in zip(boxes.double().tolist(), scores.double().tolist()):
            results.append({"image_id": record.image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": s})
    ours = evaluate_proposals(dataset, proposals)["metrics"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
        official = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        official.params.useCats = 0
        official.params.maxDets = [100, 1000]
        official.evaluate()
        official.accumulate()
    recall = official.eval["recall"]
    expected = {"AR100": recall[:, 0, 0, 0], "AR1000": recall[:, 0, 0, 1], "ARs1000": recall[:, 0, 1, 1],
                "ARm1000": recall[:, 0, 2, 1], "ARl1000": recall[:, 0, 3, 1]}
    for name, values in expected.items():
        assert ours[name] == float(values[values > -1].mean()), name
    assert 0.2 < ours["AR100"] < ours["AR1000"] < 1.0
