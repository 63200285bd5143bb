from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from fpndet.data.dataset import DetectionDataset
from fpndet.data.detect import open_dataset
from fpndet.data.formats import ShapesDataset
from fpndet.data.records import ImageRecord
from fpndet.engine import inspect as inspect_module
from fpndet.engine.plots import PALETTE
from fpndet.engine.inspect import box_coverage, image_anchors, input_geometry, inspect_dataset, pyramid_grids
from fpndet.modeling.build import build_anchor_generator, build_model
from fpndet.modeling.config import ModelConfig, named_config
from fpndet.modeling.matcher import AnchorMatcher


class InMemoryDataset(DetectionDataset):
    """Hand-made records; images are flat gray."""

    def __init__(self, records: list[ImageRecord], class_names=("a", "b")):
        super().__init__(class_names=class_names)
        self.records = records
        self.image_ids = [r.image_id for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def annotation(self, index: int) -> ImageRecord:
        return self.records[index]

    def load(self, index: int):
        record = self.records[index]
        return torch.full((3, record.height, record.width), 128, dtype=torch.uint8), record


def _record(image_id, boxes, labels, crowd=None, size=(256, 256)) -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return ImageRecord(
        image_id=image_id, file_name=f"img{image_id}.png", height=size[0], width=size[1], boxes=boxes,
        labels=np.asarray(labels, dtype=np.int64),
        iscrowd=np.zeros(len(boxes), bool) if crowd is None else np.asarray(crowd, bool),
    )


def _config(**changes) -> ModelConfig:
    """Images of 256 px stay 256 px (scale 1), so anchors are in image pixels."""
    return ModelConfig(num_classes=2, min_size=[256], max_size=256, **changes)


def _valid_png(path) -> Image.Image:
    assert path.stat().st_size > 1000
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


# Boxes that are exactly one anchor of the default config (sizes 32..512, stride 2^l):
BOX_P4 = [0, 0, 64, 64]  # P4 size 64, ratio 1, at cell (2, 2) of stride 16
BOX_P5 = [64, 64, 192, 192]  # P5 size 128, ratio 1, at cell (4, 4) of stride 32
BOX_P3_TALL = [69, 57, 91, 103]  # P3 size 32, ratio h/w 2 (half extents 11, 23), at cell (10, 10)
BOX_4PX = [6, 6, 10, 10]  # 4x4 px: no default anchor reaches IoU 0.5


def test_input_geometry_follows_the_model_resize():
    cfg = ModelConfig(min_size=[416], max_size=640)
    geometry = input_geometry(300, 500, cfg)  # long side limits: scale 640/500 = 1.28
    assert geometry.resized == (384, 640) and geometry.padded == (384, 640)
    assert geometry.box_scale == pytest.approx((1.28, 1.28))
    geometry = input_geometry(375, 500, ModelConfig(min_size=[320, 416], max_size=1333))
    assert geometry.resized == (416, 554)  # short side min_size[-1]; floor(500 * 416/375) = 554
    assert geometry.padded == (416, 576)
    assert pyramid_grids((416, 576), 3, 7) == [(52, 72), (26, 36), (13, 18), (7, 9), (4, 5)]


def test_image_anchors_are_the_models_anchors():
    cfg = ModelConfig(num_classes=2, backbone="resnet18", fpn_channels=16,
                      retinanet={"head_channels": 16, "head_depth": 1})
    model = build_model(cfg).eval()
    padded = (224, 352)  # 352 / 64 = 5.5: P6 and P7 grids are rounded up
    with torch.no_grad():
        outputs = model.head_outputs(torch.zeros(1, 3, *padded))
    generator = build_anchor_generator(cfg)
    anchors = image_anchors(generator, padded, cfg)
    assert torch.equal(anchors.boxes, outputs.anchors)
    counts = torch.bincount(anchors.level).tolist()
    assert counts == outputs.anchors_per_level
    assert counts == [9 * 28 * 44, 9 * 14 * 22, 9 * 7 * 11, 9 * 4 * 6, 9 * 2 * 3]


def test_box_equal_to_an_anchor_is_covered_at_its_level():
    cfg = _config()
    generator = build_anchor_generator(cfg)
    anchors = image_anchors(generator, (256, 256), cfg)
    coverage = box_coverage(torch.tensor([BOX_P4, BOX_P5, BOX_P3_TALL, BOX_4PX], dtype=torch.float32), anchors,
                            foreground_iou=0.5)
    assert coverage.best_iou[:3].tolist() == [1.0, 1.0, 1.0]
    assert coverage.best_level.tolist()[:3] == [1, 2, 0]  # P4, P5, P3
    assert anchors.boxes[coverage.best_anchor[0]].tolist() == BOX_P4
    # The 4 px box lies inside the smallest P3 anchor (22 x 46 = 1012 px²): IoU 16 / 1012.
    assert float(coverage.best_iou[3]) == pytest.approx(16 / 1012, abs=1e-6)
    assert int(coverage.best_level[3]) == 0 and int(coverage.fg_anchors[3]) == 0


def test_small_anchor_sizes_cover_a_4px_box():
    cfg = _config(anchor_sizes=[4.0, 8.0, 16.0, 32.0, 64.0])
    generator = build_anchor_generator(cfg)
    anchors = image_anchors(generator, (256, 256), cfg)
    coverage = box_coverage(torch.tensor([BOX_4PX], dtype=torch.float32), anchors, foreground_iou=0.5)
    assert float(coverage.best_iou[0]) == 1.0 and int(coverage.best_level[0]) == 0
    # Sizes int(4 * 2^(k/3)) = 4, 5, 6 round to half-extents 2, 2, 3: two ratio-1 anchors equal the box.
    assert int(coverage.fg_anchors[0]) >= 2


def _brute_force_fg_counts(boxes: torch.Tensor, anchors: torch.Tensor, threshold: float) -> torch.Tensor:
    """Strict matcher positives per box, from the full IoU matrix (torchvision) and AnchorMatcher."""
    iou = box_iou(boxes, anchors)
    best, owner = iou.max(dim=0)
    by_iou = torch.bincount(owner[best >= threshold], minlength=len(boxes))
    matcher = AnchorMatcher(foreground_iou=threshold, background_iou=0.4, allow_low_quality_matches=False)
    valid = torch.ones(1, len(boxes), dtype=torch.bool)
    matches = matcher(anchors, boxes[None], valid, ~valid)[0]
    by_matcher = torch.bincount(matches[matches >= 0], minlength=len(boxes))
    assert torch.equal(by_iou, by_matcher)
    return by_matcher


def test_inspect_dataset_summary_on_hand_made_boxes(tmp_path):
    records = [
        _record(0, [BOX_P4, BOX_P5, [100, 100, 200, 220]], [0, 1, 0], crowd=[False, False, True]),
        _record(1, [BOX_P3_TALL, BOX_4PX], [1, 1]),
        _record(2, [], []),
    ]
    dataset = InMemoryDataset(records)
    cfg = _config()
    report = inspect_dataset(dataset, cfg, tmp_path / "out", samples=3)
    summary = report["summary"]
    assert summary["images"] == 3 and summary["boxes"] == 4 and summary["crowd"] == 1
    assert summary["classes"] == {"a": 1, "b": 3}
    assert report["crowd_per_class"] == {"a": 1}
    assert summary["images_without_boxes"] == 1
    assert summary["coverage"] == 0.75
    assert summary["coverage_low_quality"] == 1.0
    assert summary["uncovered"] == 1
    levels = summary["coverage_per_level"]
    assert [levels[name]["boxes"] for name in ("P3", "P4", "P5", "P6", "P7")] == [2, 1, 1, 0, 0]
    assert levels["P3"]["share"] == 0.5 and levels["P3"]["covered"] == 0.5
    assert levels["P4"]["covered"] == 1.0 and levels["P6"]["covered"] == 0.0
    worst = report["uncovered_boxes"]
    assert len(worst) == 1 and worst[0]["file"] == "img1.png" and worst[0]["box"] == BOX_4PX
    assert worst[0]["size"] == 4.0 and worst[0]["best_level"] == "P3"
    assert worst[0]["best_iou"] == pytest.approx(16 / 1012, abs=1e-4)
    assert report["size_buckets"] == {"small": 2, "medium": 1, "large": 1}  # 4, 31.8 | 64 | 128 px

    # Mean foreground anchors per box equals the strict matcher's positives, image by image.
    generator = build_anchor_generator(cfg)
    anchors = image_anchors(generator, (256, 256), cfg).boxes
    counts = torch.cat([
        _brute_force_fg_counts(torch.tensor([BOX_P4, BOX_P5], dtype=torch.float32), anchors, 0.5),
        _brute_force_fg_counts(torch.tensor([BOX_P3_TALL, BOX_4PX], dtype=torch.float32), anchors, 0.5),
    ])
    assert counts[3] == 0 and bool((counts[:3] >= 1).all())
    assert summary["mean_fg_anchors_per_box"] == pytest.approx(counts.double().mean().item(), abs=1e-3)

    out = tmp_path / "out"
    written = json.loads((out / "report.json").read_text())
    assert written["summary"] == summary
    assert _valid_png(out / "box_sizes.png").size == (1500, 450)
    grid = _valid_png(out / "samples.png")
    assert grid.size == (3 * 256, 256)  # three 256 px images in one row
    # Image 1 comes first (it holds the uncovered box): the left edge of BOX_P3_TALL in class b's
    # colour, its matched anchors in white; image 2 (no boxes) stays plain gray.
    pixels = np.asarray(grid.convert("RGB")).astype(int)
    assert pixels[80, 69].tolist() == list(PALETTE[1])
    white = (pixels == 255).all(axis=2)
    assert white[:, :256].sum() > 100 and white[:, 512:].sum() == 0
    assert (pixels[:, 512:] == 128).all()


def test_small_anchor_sizes_fix_coverage_of_the_4px_box(tmp_path):
    box_8px = [44, 44, 52, 52]  # the P4 anchor of size 8 at cell (3, 3) of stride 16
    dataset = InMemoryDataset([_record(0, [BOX_4PX, box_8px], [0, 0])])
    default = inspect_dataset(dataset, _config(), tmp_path / "default", samples=0)["summary"]
    small = inspect_dataset(dataset, _config(anchor_sizes=[4.0, 8.0, 16.0, 32.0, 64.0]), tmp_path / "small",
                            samples=0)["summary"]
    assert default["coverage"] == 0.0 and default["uncovered"] == 2
    assert small["coverage"] == 1.0 and small["uncovered"] == 0
    assert small["coverage_per_level"]["P3"]["boxes"] == 1 and small["coverage_per_level"]["P4"]["boxes"] == 1
    assert default["coverage_low_quality"] == 1.0  # each still has an anchor with IoU > 0
    assert not (tmp_path / "small" / "samples.png").exists()


def test_iou_blocks_give_the_same_answer(monkeypatch):
    cfg = _config()
    generator = build_anchor_generator(cfg)
    anchors = image_anchors(generator, (256, 256), cfg)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, size=(30, 2))
    wh = rng.uniform(4, 120, size=(30, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + wh], axis=1), dtype=torch.float32)
    whole = box_coverage(boxes, anchors, foreground_iou=0.5)
    monkeypatch.setattr(inspect_module, "_MAX_IOU_ELEMENTS", 3 * len(anchors.boxes))  # blocks of 3 boxes
    blocked = box_coverage(boxes, anchors, foreground_iou=0.5)
    for name in ("best_iou", "best_anchor", "best_level", "fg_anchors", "fg_anchor_mask"):
        assert torch.equal(getattr(whole, name), getattr(blocked, name)), name
    assert torch.equal(whole.fg_anchors, _brute_force_fg_counts(boxes, anchors.boxes, 0.5))


def _voc_object_count(root, split: str) -> int:
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    return sum(len(ET.parse(root / "Annotations" / f"{i}.xml").findall("object")) for i in ids)


def test_inspect_raccoon(raccoon_dir, tmp_path):
    dataset = open_dataset(raccoon_dir, split="train")
    cfg = ModelConfig(num_classes=1, min_size=[416], max_size=640)
    report = inspect_dataset(dataset, cfg, tmp_path, samples=4)
    summary = report["summary"]
    assert summary["images"] == 160
    assert summary["boxes"] == _voc_object_count(raccoon_dir, "train")
    assert summary["classes"] == {"raccoon": summary["boxes"]} and summary["crowd"] == 0
    assert summary["images_without_boxes"] == 0
    assert summary["coverage"] > 0.9
    assert summary["coverage_low_quality"] >= summary["coverage"]
    levels = summary["coverage_per_level"]
    assert sum(level["boxes"] for level in levels.values()) == summary["boxes"]
    # Raccoons fill most of the picture: the large levels take most boxes.
    assert levels["P6"]["boxes"] + levels["P7"]["boxes"] + levels["P5"]["boxes"] > 0.8 * summary["boxes"]
    assert 5 < summary["mean_fg_anchors_per_box"] < 100
    assert report["box_size_quantiles"]["max"] <= 640 and report["box_size_quantiles"]["min"] > 16
    assert summary["uncovered"] == round((1 - summary["coverage"]) * summary["boxes"])
    _valid_png(tmp_path / "box_sizes.png")
    grid = _valid_png(tmp_path / "samples.png")
    # Four pictures at network scale (short side 416) shrunk to a long side of at most 512 px.
    assert 4 * 320 <= grid.width <= 4 * 512 and 320 <= grid.height <= 512
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["images"] == 160


def test_inspect_shapes(tmp_path):
    dataset = ShapesDataset(split="val", num_images=24, image_size=(128, 128))
    boxes = sum(len(dataset.annotation(i).boxes) for i in range(len(dataset)))
    base = ModelConfig(num_classes=4, min_size=[128], max_size=128)
    small = base.replace(anchor_sizes=[16.0, 32.0, 64.0, 128.0, 256.0])
    default = inspect_dataset(dataset, base, tmp_path / "default", samples=0)
    tuned = inspect_dataset(dataset, small, tmp_path / "small", samples=4)
    for report in (default, tuned):
        assert report["summary"]["images"] == 24 and report["summary"]["boxes"] == boxes
        assert sum(report["summary"]["classes"].values()) == boxes
        assert set(report["summary"]["classes"]) <= {"circle", "square", "triangle", "cross"}
        # Shapes are 12..76 px squares at most; visible parts can be thinner but never larger.
        assert report["box_size_quantiles"]["max"] <= 0.6 * 128 + 1
    # Objects of 12-76 px in 128 px images: the paper's 32 px smallest anchor misses many of them.
    assert tuned["summary"]["coverage"] > default["summary"]["coverage"]
    assert tuned["summary"]["coverage"] > 0.9
    assert default["summary"]["uncovered"] > tuned["summary"]["uncovered"]
    grid = _valid_png(tmp_path / "small" / "samples.png")
    assert grid.size == (4 * 128, 128)


def test_datasets_without_annotation_are_read_through_getitem(tmp_path):
    """A torch ``Subset`` has no ``annotation()``: its samples are decoded instead, same numbers."""
    shapes = ShapesDataset(split="val", num_images=6, image_size=(96, 96))
    cfg = ModelConfig(num_classes=4, min_size=[96], max_size=96, anchor_sizes=[16.0, 32.0, 64.0, 128.0, 256.0])
    direct = inspect_dataset(shapes, cfg, tmp_path / "direct", samples=0)
    subset = inspect_dataset(torch.utils.data.Subset(shapes, range(6)), cfg, tmp_path / "subset", samples=2)
    for key in ("images", "boxes", "coverage", "coverage_per_level", "mean_fg_anchors_per_box", "uncovered"):
        assert subset["summary"][key] == direct["summary"][key], key
    labels = [int(label) for i in range(6) for label in shapes.annotation(i).labels]
    assert subset["summary"]["classes"] == {str(k): labels.count(k) for k in sorted(set(labels))}
    assert _valid_png(tmp_path / "subset" / "samples.png").size == (2 * 96, 96)


def test_two_stage_inspection_uses_rpn_anchors_and_counts_roi_levels(tmp_path):
    """Faster R-CNN: coverage by the RPN's anchors (one size per level P2..P6, IoU 0.7), and the
    ground-truth boxes per RoI level by FPN eq. (1)."""
    cfg = named_config("faster_rcnn_r50_fpn", num_classes=1, min_size=[448], max_size=448, backbone="resnet18")
    boxes = np.array([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [10, 10, 18, 18], [0, 0, 64, 64]],
                     dtype=np.float32)
    record = ImageRecord(image_id=1, file_name="x.jpg", height=448, width=448, boxes=boxes,
                         labels=np.zeros(5, np.int64), iscrowd=np.zeros(5, bool))

    class OneImage:
        class_names = ["thing"]

        def __len__(self):
            return 1

        def annotation(self, index):
            return record

    report = inspect_dataset(OneImage(), cfg, tmp_path, samples=0)
    assert report["summary"]["roi_levels"] == {"P2": 2, "P3": 1, "P4": 1, "P5": 1}
    assert report["model"]["foreground_iou"] == 0.7 and report["model"]["min_level"] == 2
    # the 64 px square equals the ratio-1 anchor of P3 (size 64) placed at the origin: covered there
    assert set(report["summary"]["coverage_per_level"]) >= {"P2", "P3"}
    assert report["summary"]["coverage"] >= 0.8
