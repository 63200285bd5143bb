from __future__ import annotations

import pytest
import yaml
from PIL import Image

from fpndet.data.detect import open_dataset
from fpndet.data.formats.coco import CocoDetection
from fpndet.data.formats.shapes import ShapesDataset
from fpndet.data.formats.voc import VOCDetection
from fpndet.data.formats.yolo import YOLODetection
from fpndet.data.transforms import build_eval_transforms
from fpndet.errors import InputError


def test_shapes_specs():
    dataset = open_dataset("shapes:7", split="val", image_size=(64, 64))
    assert isinstance(dataset, ShapesDataset) and len(dataset) == 7 and dataset.split == "val"
    assert dataset.image_size == (64, 64)
    assert len(open_dataset("shapes", split="test")) == 200
    transforms = build_eval_transforms()
    assert open_dataset("shapes:2", split="train", transforms=transforms).transforms is transforms
    with pytest.raises(InputError, match="shapes:x: expected 'shapes' or 'shapes:N'"):
        open_dataset("shapes:x", split="train")
    with pytest.raises(InputError, match="not 'trainval'"):
        open_dataset("shapes", split="trainval")


def test_coco_file_and_folder(coco128_dir):
    by_file = open_dataset(coco128_dir / "annotations" / "instances.json", split="anything")
    by_folder = open_dataset(coco128_dir, split="train")
    assert isinstance(by_file, CocoDetection) and isinstance(by_folder, CocoDetection)
    assert len(by_file) == len(by_folder) == 128


def test_voc_folder_split(raccoon_dir):
    val = open_dataset(str(raccoon_dir), split="val", class_names=["raccoon"])
    assert isinstance(val, VOCDetection) and len(val) == 40
    with pytest.raises(InputError, match="no such split file"):
        open_dataset(raccoon_dir, split="test")


def test_yolo_yaml_and_folder(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "val" / "a.jpg")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": "images/val", "val": "images/val", "names": ["x"]}))
    assert isinstance(open_dataset(tmp_path / "data.yaml", split="val"), YOLODetection)
    assert len(open_dataset(tmp_path, split="val")) == 1
    assert isinstance(open_dataset(tmp_path / "data.yaml", split="val", format="yolo"), YOLODetection)


def test_unknown_inputs_name_the_path(tmp_path):
    with pytest.raises(InputError, match="nowhere: no such file or folder"):
        open_dataset(tmp_path / "nowhere", split="train")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: cannot tell the dataset format"):
        open_dataset(tmp_path / "notes.txt", split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: cannot tell the dataset format"):
        open_dataset(tmp_path / "empty", split="train")
    with pytest.raises(ValueError, match="format"):
        open_dataset(tmp_path, split="train", format="pascal")
