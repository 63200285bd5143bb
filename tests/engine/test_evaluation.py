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
