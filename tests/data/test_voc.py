from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fpndet.data.formats.voc import VOCDetection
from fpndet.errors import InputError


def test_raccoon_splits_and_box_count(raccoon_dir):
    train = VOCDetection(raccoon_dir, "train")
    val = VOCDetection(raccoon_dir, "val")
    assert (len(train), len(val)) == (160, 40)
    assert train.class_names == val.class_names == ["raccoon"] and train.num_classes == 1
    assert train.label_to_category_id == [1]
    boxes = [len(d.annotation(i).boxes) for d in (train, val) for i in range(len(d))]
    assert sum(boxes) == 217
    assert train.image_ids == list(range(160))
    names = {d.annotation(i).file_name for d in (train, val) for i in range(len(d))}
    assert len(names) == 200  # the splits do not overlap


def test_raccoon_boxes_are_one_based_converted(raccoon_dir):
    train = VOCDetection(raccoon_dir, "train")
    index = next(i for i in range(len(train)) if train.annotation(i).file_name.endswith("raccoon-1.jpg"))
    # raccoon-1.xml: xmin 81, ymin 88, xmax 522, ymax 408 (1-based inclusive pixels)
    np.testing.assert_allclose(train.annotation(index).boxes, [[80, 87, 522, 408]])


def test_raccoon_grayscale_image_loads_as_rgb(raccoon_dir):
    val = VOCDetection(raccoon_dir, "val")
    train = VOCDetection(raccoon_dir, "train")
    dataset, index = next(
        (d, i) for d in (train, val) for i in range(len(d)) if d.annotation(i).file_name.endswith("raccoon-150.jpg")
    )
    assert Image.open(dataset.annotation(index).file_name).mode == "L"
    image, target = dataset[index]
    assert image.shape == (3, 183, 275) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert target["boxes"].tolist() == [[79.0, 61.0, 187.0, 169.0]]
    assert target["labels"].tolist() == [0] and target["iscrowd"].tolist() == [False]


def _object(name, box, difficult=0):
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _write_voc(root, files: dict[str, list[str]], splits: dict[str, list[str]], size=(40, 60)):
    """A tiny VOC root: one 60x40 (WxH) image per id, the given objects, the given split lists."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem, objects in files.items():
        Image.new("RGB", (60, 40), (90, 90, 90)).save(root / "JPEGImages" / f"{stem}.jpg")
        xml = (
            f"<annotation><filename>{stem}.jpg</filename>"
            f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"
            + "".join(objects)
            + "</annotation>"
        )
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
    for split, stems in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")


def test_classes_come_from_all_annotation_files(tmp_path):
    _write_voc(
        tmp_path,
        {
            "a": [_object("zebra", (1, 1, 10, 10))],
            "b": [_object("ant", (1, 1, 10, 10)), _object("zebra", (5, 5, 9, 9))],
        },
        {"train": ["a"], "val": ["b"]},
    )
    train, val = VOCDetection(tmp_path, "train"), VOCDetection(tmp_path, "val")
    assert train.class_names == val.class_names == ["ant", "zebra"]
    assert train.annotation(0).labels.tolist() == [1]
    assert val.annotation(0).labels.tolist() == [0, 1]


def test_explicit_class_list_and_unknown_class(tmp_path):
    _write_voc(tmp_path, {"a": [_object("dog", (1, 1, 10, 10)), _object("cat", (2, 2, 8, 8))]}, {"train": ["a"]})
    dataset = VOCDetection(tmp_path, "train", class_names=["cat", "dog", "bird"])
    assert dataset.annotation(0).labels.tolist() == [1, 0]
    assert dataset.label_to_category_id == [1, 2, 3]
    with pytest.raises(InputError, match=r"a\.xml: unknown class 'dog'") as caught:
        VOCDetection(tmp_path, "train", class_names=["cat"])
    assert caught.value.path == str(tmp_path / "Annotations" / "a.xml")
    (tmp_path / "classes.txt").write_text("dog\n\ncat\n")
    assert VOCDetection(tmp_path, "train", classes_file=tmp_path / "classes.txt").annotation(0).labels.tolist() == [
        0,
        1,
    ]


def test_difficult_objects_are_ignore_regions_or_dropped(tmp_path):
    _write_voc(
        tmp_path,
        {"a": [_object("dog", (1, 1, 10, 10)), _object("dog", (11, 11, 30, 30), difficult=1)]},
        {"train": ["a"]},
    )
    dataset = VOCDetection(tmp_path, "train")
    assert dataset.annotation(0).iscrowd.tolist() == [False, True]
    # Evaluation: difficult, not crowd (pycocotools' crowd rule would let one box absorb any
    # detection inside it, by intersection over the detection's area).
    exported = dataset.to_coco()["annotations"]
    assert [a["iscrowd"] for a in exported] == [0, 0] and [a["difficult"] for a in exported] == [0, 1]
    strict = VOCDetection(tmp_path, "train", keep_difficult=False)
    np.testing.assert_allclose(strict.annotation(0).boxes, [[0, 0, 10, 10]])


def test_box_outside_image_is_clipped_with_warning(tmp_path):
    _write_voc(tmp_path, {"a": [_object("dog", (0, 1, 70, 40)), _object("dog", (61, 1, 80, 20))]}, {"train": ["a"]})
    with pytest.warns(UserWarning) as caught:
        dataset = VOCDetection(tmp_path, "train")
    messages = [str(w.message) for w in caught]
    assert any("a.xml: 1 box(es) reach more than 1 px outside" in m and "object 1" in m for m in messages)
    assert any("a.xml: 1 box(es) have zero width or height" in m and "object 2" in m for m in messages)
    np.testing.assert_allclose(dataset.annotation(0).boxes, [[0, 0, 60, 40]])


def test_malformed_xml_is_an_input_error(tmp_path):
    _write_voc(tmp_path, {"a": [_object("dog", (1, 1, 10, 10))]}, {"train": ["a"]})
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation><object><name>dog</name></annotation")
    with pytest.raises(InputError, match=r"a\.xml: malformed XML"):
        VOCDetection(tmp_path, "train")


def test_non_numeric_coordinate_is_an_input_error(tmp_path):
    _write_voc(tmp_path, {"a": [_object("dog", (1, "left", 10, 10))]}, {"train": ["a"]})
    with pytest.raises(InputError, match=r"a\.xml: object 1 \('dog'\): <ymin> must be a number"):
        VOCDetection(tmp_path, "train")


def test_missing_split_names_the_available_ones(tmp_path):
    _write_voc(tmp_path, {"a": []}, {"train": ["a"]})
    with pytest.raises(InputError, match=r"test\.txt: no such split file \(available splits: train\)"):
        VOCDetection(tmp_path, "test", class_names=["dog"])
