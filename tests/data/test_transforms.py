from __future__ import annotations

import torch
from torchvision import tv_tensors

from fpndet.data.formats.shapes import ShapesDataset
from fpndet.data.transforms import SanitizeDetectionBoxes, build_eval_transforms, build_train_transforms


def _sample(boxes, labels, iscrowd, height=60, width=100):
    image = tv_tensors.Image(
        torch.arange(3 * height * width, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, height, width)
    )
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.tensor(iscrowd, dtype=torch.bool),
        "image_id": 4,
        "file_name": "x.png",
        "orig_size": (height, width),
    }
    return image, target


def test_horizontal_flip_mirrors_image_and_boxes():
    image, target = _sample([[10, 20, 30, 40], [0, 0, 100, 60]], [1, 2], [False, True])
    flipped_image, flipped = build_train_transforms(hflip_prob=1.0)(image, target)
    assert flipped["boxes"].tolist() == [[70, 20, 90, 40], [0, 0, 100, 60]]  # x1' = W - x2, x2' = W - x1
    assert flipped["labels"].tolist() == [1, 2] and flipped["iscrowd"].tolist() == [False, True]
    assert flipped_image.dtype == torch.float32
    torch.testing.assert_close(flipped_image, image.flip(-1).float() / 255)
    assert flipped["image_id"] == 4 and flipped["orig_size"] == (60, 100)


def test_sanitize_drops_degenerate_boxes_and_keeps_iscrowd_aligned():
    image, target = _sample(
        [[10, 10, 10, 30], [5, 5, 20, 20], [30, 30, 30.5, 50], [40, 10, 60, 30], [150, 10, 170, 30]],
        [0, 1, 2, 3, 4],
        [True, False, True, True, False],
    )
    target["area"] = torch.tensor([0.0, 225.0, 10.0, 400.0, 400.0])
    _, out = build_eval_transforms()(image, target)
    assert out["boxes"].tolist() == [[5, 5, 20, 20], [40, 10, 60, 30]]
    assert out["labels"].tolist() == [1, 3]
    assert out["iscrowd"].tolist() == [False, True]
    assert out["area"].tolist() == [225.0, 400.0]
    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes)


def test_boxes_crossing_the_border_are_clamped_not_dropped():
    image, target = _sample([[-10, 5, 20, 70], [90, 50, 130, 80]], [0, 1], [False, True])
    _, out = SanitizeDetectionBoxes()(*build_train_transforms(hflip_prob=0.0)(image, target))
    assert out["boxes"].tolist() == [[0, 5, 20, 60], [90, 50, 100, 60]]
    assert out["iscrowd"].tolist() == [False, True]


def test_eval_transforms_only_convert_the_image():
    image, target = _sample([[1.5, 2.5, 30.25, 40]], [2], [False])
    out_image, out = build_eval_transforms()(image, target)
    assert out_image.shape == (3, 60, 100) and out_image.dtype == torch.float32
    assert float(out_image.max()) <= 1.0
    torch.testing.assert_close(out_image.as_subclass(torch.Tensor), image.as_subclass(torch.Tensor).float() / 255)
    assert out["boxes"].tolist() == [[1.5, 2.5, 30.25, 40]]


def test_train_transforms_keep_the_image_size():
    """No resize in the data pipeline: the model resizes (and draws multi-scale sizes) itself."""
    torch.manual_seed(0)
    transform = build_train_transforms(hflip_prob=0.5, color_jitter=True)
    for _ in range(6):
        image, target = _sample([[10, 20, 30, 40]], [0], [False])
        out_image, _ = transform(image, target)
        assert tuple(out_image.shape[-2:]) == (60, 100)


def test_full_augmentation_keeps_fields_aligned_on_shapes():
    torch.manual_seed(1)
    dataset = ShapesDataset(
        split="train",
        num_images=12,
        image_size=(128, 128),
        transforms=build_train_transforms(color_jitter=True, zoom_out=True, iou_crop=True),
    )
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) == len(target["iscrowd"])
        height, width = image.shape[-2:]
        if len(boxes):
            assert (boxes[:, 2:] - boxes[:, :2]).min() >= 1
            assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= width and boxes[:, 3].max() <= height
