from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from fpndet.data.formats.shapes import ShapesDataset
from fpndet.data.loaders import build_loader, collate_detection, set_loader_epoch
from fpndet.data.transforms import build_eval_transforms, build_train_transforms


def _order(loader):
    return [target["image_id"] for _, targets in loader for target in targets]


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


def test_loader_batches_and_orders_deterministically():
    dataset = ShapesDataset(
        split="val", num_images=10, image_size=(48, 48), min_object_size=8, transforms=build_eval_transforms()
    )
    evaluation = build_loader(dataset, batch_size=4, shuffle=False, num_workers=0)
    assert _order(evaluation) == list(range(10))
    assert [len(images) for images, _ in evaluation] == [4, 4, 2]

    first = build_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=5)
    second = build_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=5)
    order = _order(first)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == _order(second) == _order(first)  # same epoch, same order
    set_loader_epoch(first, 1)
    assert _order(first) != order and sorted(_order(first)) == list(range(10))
    other_seed = build_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=6)
    assert _order(other_seed) != order
    dropping = build_loader(dataset, batch_size=4, shuffle=True, num_workers=0, drop_last=True)
    assert [len(images) for images, _ in dropping] == [4, 4]


def test_worker_augmentation_is_reproducible():
    dataset = ShapesDataset(
        split="train",
        num_images=4,
        image_size=(48, 48),
        min_object_size=8,
        transforms=build_train_transforms(scale_range=(32, 96), color_jitter=True),
    )
    runs = []
    for _ in range(2):
        loader = build_loader(dataset, batch_size=2, shuffle=True, num_workers=1, seed=3)
        assert loader.persistent_workers
        runs.append([image for images, _ in loader for image in images])
    assert len(runs[0]) == 4
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_distributed_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        build_loader(ShapesDataset(num_images=2), batch_size=1, shuffle=True, num_workers=0, distributed=True)
