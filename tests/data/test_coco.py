from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from fpndet.data.formats.coco import CocoDetection
from fpndet.data.images import image_size
from fpndet.errors import InputError


@pytest.fixture
def coco128(coco128_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return CocoDetection(coco128_dir / "annotations" / "instances.json")


def test_coco128_counts_and_crowd(coco128, coco128_dir):
    assert len(coco128) == 128 and coco128.num_classes == 80
    assert coco128.images_dir.resolve() == (coco128_dir / "images").resolve()
    records = [coco128.annotation(i) for i in range(len(coco128))]
    assert sum(len(r.boxes) for r in records) == 939
    assert sum(int(r.iscrowd.sum()) for r in records) == 10
    assert sum(len(r.boxes) == 0 for r in records) == 2  # images without boxes are kept
    assert all(r.labels.min(initial=0) >= 0 and r.labels.max(initial=0) < 80 for r in records)


def test_coco128_labels_round_trip_to_category_ids(coco128, coco128_dir):
    raw = json.loads((coco128_dir / "annotations" / "instances.json").read_text())
    assert coco128.label_to_category_id == sorted(c["id"] for c in raw["categories"])
    assert coco128.label_to_category_id[0] == 1 and coco128.label_to_category_id[-1] == 90
    assert coco128.class_names[0] == "person" and coco128.class_names[-1] == "toothbrush"
    # The first annotation of image 9 (a bowl, category 51) comes back with its box in xyxy.
    first = next(a for a in raw["annotations"] if a["image_id"] == 9)
    index = coco128.image_ids.index(9)
    record = coco128.annotation(index)
    assert coco128.label_to_category_id[int(record.labels[0])] == first["category_id"] == 51
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose(record.boxes[0], [x, y, x + w, y + h], rtol=1e-6)


def test_coco128_sample_layout(coco128, coco128_dir):
    index = coco128.image_ids.index(9)
    image, target = coco128[index]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 480, 640)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (480, 640)
    assert target["labels"].dtype == torch.int64 and target["iscrowd"].dtype == torch.bool
    assert len(boxes) == len(target["labels"]) == len(target["iscrowd"]) == 8
    assert target["image_id"] == 9 and target["orig_size"] == (480, 640)
    assert Path(target["file_name"]).resolve() == (coco128_dir / "images" / "000000000009.jpg").resolve()


def test_coco128_json_sizes_match_images(coco128):
    mismatched = [
        coco128.annotation(i).file_name
        for i in range(len(coco128))
        if image_size(coco128.annotation(i).file_name) != (coco128.annotation(i).height, coco128.annotation(i).width)
    ]
    assert mismatched == []


def test_coco128_to_coco_reproduces_annotations(coco128, coco128_dir):
    raw = json.loads((coco128_dir / "annotations" / "instances.json").read_text())
    gt = coco128.to_coco()
    assert len(gt["images"]) == 128 and len(gt["annotations"]) == 939 and len(gt["categories"]) == 80
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 10
    original = sorted((a["image_id"], a["category_id"], *np.round(a["bbox"], 2)) for a in raw["annotations"])
    exported = sorted((a["image_id"], a["category_id"], *np.round(a["bbox"], 2)) for a in gt["annotations"])
    assert original == exported


def _write_coco(tmp_path, annotations, *, categories=None, size=(48, 64)):
    """A one-image COCO file (image 48x64 px) in tmp_path/annotations, image in tmp_path/images."""
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "images" / "a.png")
    content = {
        "images": [{"id": 5, "file_name": "a.png", "height": size[0], "width": size[1]}],
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = tmp_path / "annotations" / "instances.json"
    path.write_text(json.dumps(content))
    return path


def _annotation(annotation_id, bbox, category_id=3, iscrowd=0):
    return {"id": annotation_id, "image_id": 5, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


def test_box_partly_outside_is_clipped_with_a_warning_naming_the_file(tmp_path):
    path = _write_coco(tmp_path, [_annotation(1, [50, 40, 30, 20], 7), _annotation(2, [-0.5, 0, 10, 48.8])])
    with pytest.warns(UserWarning, match=r"instances\.json: 1 box\(es\) reach more than 1 px outside") as caught:
        dataset = CocoDetection(path)
    assert len(caught) == 1 and "annotation id 1" in str(caught[0].message)
    record = dataset.annotation(0)
    np.testing.assert_allclose(record.boxes, [[50, 40, 64, 48], [0, 0, 9.5, 48]])
    assert record.labels.tolist() == [1, 0]
    assert dataset.label_to_category_id == [3, 7]


def test_box_entirely_outside_or_empty_is_dropped_with_a_warning(tmp_path):
    path = _write_coco(
        tmp_path, [_annotation(1, [70, 10, 5, 5]), _annotation(2, [5, 5, 0, 4]), _annotation(3, [1, 1, 2, 2])]
    )
    with pytest.warns(UserWarning, match=r"instances\.json: 2 box\(es\) have zero width or height.*annotation id 1"):
        dataset = CocoDetection(path)
    np.testing.assert_allclose(dataset.annotation(0).boxes, [[1, 1, 3, 3]])
    # Evaluation keeps the file's annotations, as pycocotools' COCO(file) does.
    assert len(dataset.to_coco()["annotations"]) == 3


def test_negative_width_is_an_input_error(tmp_path):
    path = _write_coco(tmp_path, [_annotation(4, [10, 10, -3, 5])])
    with pytest.raises(InputError, match=r"instances\.json: annotation id 4: .*negative width or height"):
        CocoDetection(path)


def test_unknown_category_is_an_input_error_naming_file_and_annotation(tmp_path):
    path = _write_coco(tmp_path, [_annotation(1, [1, 1, 5, 5]), _annotation(12, [1, 1, 5, 5], category_id=99)])
    with pytest.raises(InputError, match=r"instances\.json: annotation id 12: unknown class") as caught:
        CocoDetection(path)
    assert caught.value.path == str(path)


def test_crowd_annotation_is_kept_as_ignore_region(tmp_path):
    path = _write_coco(tmp_path, [_annotation(1, [1, 1, 5, 5]), _annotation(2, [10, 10, 20, 20], 7, iscrowd=1)])
    dataset = CocoDetection(path)
    _, target = dataset[0]
    assert target["iscrowd"].tolist() == [False, True]
    assert [a["iscrowd"] for a in dataset.to_coco()["annotations"]] == [0, 1]
    assert [a["category_id"] for a in dataset.to_coco()["annotations"]] == [3, 7]


def test_malformed_json_is_an_input_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [}')
    with pytest.raises(InputError, match=r"broken\.json: malformed JSON"):
        CocoDetection(path)


@pytest.mark.parametrize("missing", ["images", "annotations", "categories"])
def test_missing_top_level_key_is_an_input_error(tmp_path, missing):
    path = _write_coco(tmp_path, [])
    content = json.loads(path.read_text())
    del content[missing]
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=rf"instances\.json: missing key '{missing}'"):
        CocoDetection(path)


def test_annotation_without_bbox_is_an_input_error(tmp_path):
    path = _write_coco(tmp_path, [{"id": 8, "image_id": 5, "category_id": 3}])
    with pytest.raises(InputError, match=r"instances\.json: annotation id 8: missing key 'bbox'"):
        CocoDetection(path)


def test_image_size_differing_from_json_is_an_input_error(tmp_path):
    path = _write_coco(tmp_path, [], size=(64, 48))  # JSON says 48 wide, 64 high; file is 64x48
    dataset = CocoDetection(path)
    with pytest.raises(InputError, match=r"a\.png: image is 64x48 pixels .* says 48x64"):
        dataset[0]


def test_corrupt_image_is_an_input_error_naming_the_image(tmp_path):
    path = _write_coco(tmp_path, [_annotation(1, [1, 1, 5, 5])])
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    dataset = CocoDetection(path)
    with pytest.raises(InputError, match=r"a\.png: cannot read image"):
        dataset[0]


EVAL_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")


def test_coco128_to_coco_is_the_json_content(coco128, coco128_dir):
    """Evaluation ground truth = the file's own annotations: ids, unclipped boxes and the
    annotation's ``area`` (the mask area, which pycocotools' size ranges use), not the box area."""
    raw = json.loads((coco128_dir / "annotations" / "instances.json").read_text())
    gt = coco128.to_coco()
    assert gt["annotations"] == [{key: a[key] for key in EVAL_KEYS} for a in raw["annotations"]]
    assert [image["id"] for image in gt["images"]] == [image["id"] for image in raw["images"]]
    assert gt["categories"] == [{"id": c["id"], "name": c["name"]} for c in raw["categories"]]


def test_to_coco_keeps_boxes_outside_the_image_and_fills_missing_areas(tmp_path):
    path = _write_coco(
        tmp_path,
        [
            {**_annotation(11, [50.0, 10.0, 30.0, 8.0]), "area": 123.5},  # reaches 16 px outside: clipped for training
            _annotation(12, [1.0, 2.0, 0.0, 5.0]),  # zero width: dropped for training, kept for evaluation
            _annotation(13, [4.0, 4.0, 10.0, 20.0], iscrowd=1),  # no "area": w * h
        ],
    )
    with pytest.warns(UserWarning):
        dataset = CocoDetection(path)
    np.testing.assert_allclose(dataset.annotation(0).boxes, [[50, 10, 64, 18], [4, 4, 14, 24]])
    assert dataset.to_coco()["annotations"] == [
        {"id": 11, "image_id": 5, "category_id": 3, "bbox": [50.0, 10.0, 30.0, 8.0], "area": 123.5, "iscrowd": 0},
        {"id": 12, "image_id": 5, "category_id": 3, "bbox": [1.0, 2.0, 0.0, 5.0], "area": 0.0, "iscrowd": 0},
        {"id": 13, "image_id": 5, "category_id": 3, "bbox": [4.0, 4.0, 10.0, 20.0], "area": 200.0, "iscrowd": 1},
    ]


def test_class_names_are_for_voc_only(coco128_dir):
    """data.class_names given with a COCO (or shapes) dataset: one message naming the dataset,
    not a TypeError from the dataset class."""
    from fpndet.data.detect import open_dataset

    annotations = coco128_dir / "annotations" / "instances.json"
    with pytest.raises(InputError, match="data.class_names is for VOC") as err:
        open_dataset(annotations, split="train", class_names=["a"])
    assert str(annotations) in str(err.value)
    with pytest.raises(InputError, match="data.class_names is for VOC"):
        open_dataset("shapes:2", split="train", class_names=["a"])
