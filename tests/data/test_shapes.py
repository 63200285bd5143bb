from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from fpndet.data.formats.shapes import SHAPE_CLASSES, ShapesDataset

SHAPE_SATURATION = 100  # shapes have max(rgb) - min(rgb) >= 125, backgrounds <= 24


def _saturated(image: torch.Tensor) -> np.ndarray:
    """bool [H, W]: pixels painted by a shape."""
    pixels = image.numpy().astype(np.int16)
    return (pixels.max(axis=0) - pixels.min(axis=0)) > SHAPE_SATURATION


def test_same_seed_gives_identical_samples_and_splits_differ():
    first, second = ShapesDataset(split="train", num_images=6, seed=3), ShapesDataset(
        split="train", num_images=6, seed=3
    )
    val = ShapesDataset(split="val", num_images=6, seed=3)
    other_seed = ShapesDataset(split="train", num_images=6, seed=4)
    for index in range(6):
        image, target = first[index]
        again, target_again = second[index]
        assert torch.equal(image, again)
        assert torch.equal(target["boxes"], target_again["boxes"])
        assert torch.equal(target["labels"], target_again["labels"])
        assert not torch.equal(image, val[index][0])
        assert not torch.equal(image, other_seed[index][0])
    # Reading out of order gives the same sample (nothing depends on call order).
    assert torch.equal(first[2][0], ShapesDataset(split="train", num_images=6, seed=3)[2][0])


def test_sample_layout_and_statistics():
    dataset = ShapesDataset(split="val", num_images=60, image_size=(320, 256))
    assert dataset.class_names == list(SHAPE_CLASSES) and dataset.num_classes == 4
    image, target = dataset[7]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 320, 256)
    assert target["file_name"] == "shapes/val/7.png" and target["image_id"] == 7
    assert tuple(target["boxes"].canvas_size) == (320, 256)
    counts, labels, sides = [], [], []
    for index in range(len(dataset)):
        record = dataset.annotation(index)
        counts.append(len(record.boxes))
        labels.extend(record.labels.tolist())
        sides.extend((record.boxes[:, 2:] - record.boxes[:, :2]).max(axis=1).tolist())
    assert 1 <= min(counts) and max(counts) <= 6 and np.mean(counts) > 2
    assert set(labels) == {0, 1, 2, 3}
    assert min(sides) >= 8 and max(sides) <= 0.6 * 256 + 1
    assert np.mean(np.array(sides) < 32) > 0.2  # plenty of small objects
    assert len(dataset.to_coco()["annotations"]) == sum(counts)


def test_boxes_are_tight_and_cover_every_shape_pixel():
    dataset = ShapesDataset(split="train", num_images=25, seed=1)
    checked_isolated = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        painted = _saturated(image)
        boxes = target["boxes"].round().int().tolist()
        covered = np.zeros_like(painted)
        for x1, y1, x2, y2 in boxes:
            covered[y1:y2, x1:x2] = True
        assert not (painted & ~covered).any(), f"shape pixels outside every box in image {index}"
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            others = [b for j, b in enumerate(boxes) if j != i]
            near = [b for b in others if b[0] <= x2 and x1 <= b[2] and b[1] <= y2 and y1 <= b[3]]
            if near:
                continue
            checked_isolated += 1
            inside = painted[y1:y2, x1:x2]
            # Each edge row/column of the box holds shape pixels ...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # ... and the one-pixel ring just outside holds none.
            ring = painted[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1].sum() - inside.sum()
            assert ring == 0
    assert checked_isolated > 40


def test_generation_is_fast():
    dataset = ShapesDataset(split="train", num_images=40)
    dataset[0]
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    per_image_ms = (time.perf_counter() - start) / len(dataset) * 1000
    assert per_image_ms < 20, f"{per_image_ms:.1f} ms per image"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="trainval")
    with pytest.raises(ValueError, match="min_object_size"):
        ShapesDataset(image_size=(32, 32), min_object_size=30)
    with pytest.raises(IndexError):
        ShapesDataset(num_images=3)[3]


def test_to_coco_evaluates_with_pycocotools():
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = ShapesDataset(split="val", num_images=8)
    ground_truth = COCO()
    ground_truth.dataset = dataset.to_coco()
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
    assert 0 in ground_truth.getImgIds()  # image_id 0 (index 0) is a valid COCO id
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in ground_truth.dataset["annotations"]
    ]
    shifted = [dict(d, bbox=[d["bbox"][0] + d["bbox"][2], *d["bbox"][1:]]) for d in perfect]  # IoU 0
    stats = []
    for results in (perfect, shifted):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        stats.append(evaluation.stats)
    assert stats[0][1] == pytest.approx(1.0)  # AP50
    assert stats[1][1] == pytest.approx(0.0)


def test_shapes_options_reach_a_shapes_n_spec():
    """data.shapes_image_size applies to "shapes:N" as to "shapes" (N images in each split,
    instead of data.shapes_*_images)."""
    from fpndet.config import load_config
    from fpndet.engine.trainer import open_datasets

    cfg = load_config(None, ["data.train=shapes:6", "data.shapes_image_size=96", "data.shapes_val_images=3"])
    train, val = open_datasets(cfg)
    assert len(train) == len(val) == 6
    image, _ = train[0]
    assert tuple(image.shape[-2:]) == (96, 96)
    cfg = load_config(None, ["data.train=shapes", "data.shapes_image_size=96", "data.shapes_train_images=5",
                             "data.shapes_val_images=3"])
    train, val = open_datasets(cfg)
    assert (len(train), len(val)) == (5, 3) and tuple(train[0][0].shape[-2:]) == (96, 96)
