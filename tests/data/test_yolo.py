from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from fpndet.data.formats.coco import CocoDetection
from fpndet.data.formats.voc import VOCDetection
from fpndet.data.formats.yolo import YOLODetection, label_path_for
from fpndet.errors import InputError


def _export_yolo(records, root, split, class_offset=0):
    """Write records (absolute xyxy) as YOLO images/<split> + labels/<split>; return image names."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    names = []
    for record in records:
        source = record.file_name
        name = f"{len(names):03d}_{source.rsplit('/', 1)[-1]}"
        shutil.copy(source, root / "images" / split / name)
        lines = []
        for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
            cx, cy = (x1 + x2) / 2 / record.width, (y1 + y2) / 2 / record.height
            w, h = (x2 - x1) / record.width, (y2 - y1) / record.height
            lines.append(f"{label + class_offset} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (root / "labels" / split / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
        names.append(name)
    return names


def test_raccoon_and_coco_boxes_round_trip_through_yolo(tmp_path, raccoon_dir, coco128_dir):
    voc = VOCDetection(raccoon_dir, "val")
    coco = CocoDetection(coco128_dir / "annotations" / "instances.json")
    voc_records = [voc.annotation(i) for i in range(4)]
    coco_records = [coco.annotation(i) for i in range(4)]
    root = tmp_path / "ds"
    _export_yolo(voc_records, root, "train")
    _export_yolo(coco_records, root, "val", class_offset=0)
    names = ["raccoon"] + [f"class{i}" for i in range(1, 80)]
    (root / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names})
    )

    for split, records in (("train", voc_records), ("val", coco_records)):
        dataset = YOLODetection(root / "data.yaml", split)
        assert len(dataset) == 4 and dataset.num_classes == 80 and dataset.class_names[0] == "raccoon"
        for index, expected in enumerate(records):
            got = dataset.annotation(index)
            assert (got.height, got.width) == (expected.height, expected.width)
            assert got.labels.tolist() == expected.labels.tolist()
            assert np.abs(got.boxes - expected.boxes).max(initial=0) <= 0.5
    image, target = YOLODetection(root / "data.yaml", "train")[0]
    assert image.shape[0] == 3 and target["image_id"] == 0 and len(target["boxes"]) == len(voc_records[0].boxes)


def _tiny_yolo(tmp_path, label_text, *, names=("a", "b"), image_name="x.png"):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "train" / image_name)
    if label_text is not None:
        (tmp_path / "labels" / "train" / image_name).with_suffix(".txt").write_text(label_text)
    (tmp_path / "data.yaml").write_text(
        yaml.safe_dump({"train": "images/train", "val": "images/train", "names": list(names)})
    )
    return tmp_path / "data.yaml"


def test_label_conversion_to_absolute_xyxy(tmp_path):
    data = _tiny_yolo(tmp_path, "1 0.5 0.5 0.2 0.4\n\n0 0.1 0.2 0.2 0.2\n")
    record = YOLODetection(data, "train").annotation(0)
    np.testing.assert_allclose(record.boxes, [[40, 15, 60, 35], [0, 5, 20, 15]], atol=1e-4)
    assert record.labels.tolist() == [1, 0] and record.iscrowd.tolist() == [False, False]


def test_polygon_line_becomes_its_extent(tmp_path):
    data = _tiny_yolo(tmp_path, "0 0.1 0.2 0.5 0.2 0.3 0.8\n")
    np.testing.assert_allclose(YOLODetection(data, "train").annotation(0).boxes, [[10, 10, 50, 40]], atol=1e-4)


def test_missing_label_file_means_no_boxes(tmp_path):
    data = _tiny_yolo(tmp_path, None)
    dataset = YOLODetection(data, "val")
    assert len(dataset) == 1 and dataset.annotation(0).boxes.shape == (0, 4)
    assert dataset.to_coco()["annotations"] == []


def test_names_as_mapping(tmp_path):
    data = _tiny_yolo(tmp_path, "0 0.5 0.5 0.1 0.1\n")
    content = yaml.safe_load(data.read_text())
    content["names"] = {1: "dog", 0: "cat"}
    data.write_text(yaml.safe_dump(content))
    assert YOLODetection(data, "train").class_names == ["cat", "dog"]


def test_bad_line_names_file_and_line(tmp_path):
    data = _tiny_yolo(tmp_path, "0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n")
    with pytest.raises(InputError, match=r"labels/train/x\.txt: line 2: expected 'class cx cy w h'"):
        YOLODetection(data, "train")


def test_class_out_of_range_names_file_and_line(tmp_path):
    data = _tiny_yolo(tmp_path, "\n2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(InputError, match=r"x\.txt: line 2: class id 2 out of range 0\.\.1"):
        YOLODetection(data, "train")


def test_box_outside_image_is_clipped_with_warning_naming_the_label_file(tmp_path):
    data = _tiny_yolo(tmp_path, "0 0.95 0.5 0.2 0.2\n")
    dataset = YOLODetection(data, "train")
    with pytest.warns(UserWarning, match=r"x\.txt: 1 box\(es\) reach more than 1 px outside .*line 1"):
        record = dataset.annotation(0)
    np.testing.assert_allclose(record.boxes, [[85, 20, 100, 30]], atol=1e-4)


def test_missing_split_or_names_is_an_input_error(tmp_path):
    data = _tiny_yolo(tmp_path, "")
    with pytest.raises(InputError, match=r"data\.yaml: no 'test' entry"):
        YOLODetection(data, "test")
    data.write_text("train: images/train\n")
    with pytest.raises(InputError, match=r"data\.yaml: missing 'names'"):
        YOLODetection(data, "train")
    data.write_text("train: [images/train\n")
    with pytest.raises(InputError, match=r"data\.yaml: malformed YAML"):
        YOLODetection(data, "train")


def test_label_path_replaces_last_images_component(tmp_path):
    assert label_path_for("/d/images/x/images/train/a.b.jpg").as_posix() == "/d/images/x/labels/train/a.b.txt"
    assert label_path_for("/d/pics/a.png").as_posix() == "/d/pics/a.txt"
