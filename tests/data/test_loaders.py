from __future__ import annotations

import torch
from torchvision import tv_tensors

from fpndet.data.formats.shapes import ShapesDataset
from fpndet.data.loaders import collate_detection
from fpndet.data.transforms import build_eval_transforms


def test_collate_keeps_lists_of_plain_tensors():
    dataset = ShapesDataset(split="val", num_images=3, image_size=(64, 96), transforms=build_eval_transforms())
    samples = [dataset[0], dataset[1]]
    samples[1] = (samples[1][0][:, :48], samples[1][1])  # a second size in the same batch
    images, targets = collate_detection(samples)
    assert [tuple(image.shape) for image in images] == [(3, 64, 96), (3, 48, 96)]
    assert all(type(image) is torch.Tensor and image.dtype == torch.float32 for image in images)
    for target, (_, original) in zip(targets, samples):
        assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
        assert torch.equal(target["boxes"], original["boxes"].as_subclass(torch.Tensor))
        assert type(target["labels"]) is torch.Tensor and target["labels"].dtype == torch.int64
        assert target["iscrowd"].dtype == torch.bool and len(target["iscrowd"]) == len(target["boxes"])
        assert type(target["image_id"]) is int and target["orig_size"] == (64, 96)
    assert targets[0]["size"] == (64, 96) and targets[1]["size"] == (48, 96)


def test_collate_scales_uint8_images_and_fills_missing_iscrowd():
    image = tv_tensors.Image(torch.full((3, 4, 5), 255, dtype=torch.uint8))
    target = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([1]), "image_id": 7}
    images, targets = collate_detection([(image, target)])
    assert images[0].dtype == torch.float32 and float(images[0].max()) == 1.0
    assert targets[0]["iscrowd"].tolist() == [False] and targets[0]["size"] == (4, 5)
