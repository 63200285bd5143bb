"""Inference edge cases for both architectures: 1x1, 10000x100 and 100x10000 images, an all-zero
image, a batch of mixed sizes and an image without any detection give outputs of the documented
shapes and dtypes (boxes inside the image); NaN pixels, integer pixels and empty inputs raise a
ValueError naming the image."""
from __future__ import annotations

import pytest
import torch

from fpndet.modeling.build import build_model
from fpndet.modeling.config import named_config

SIZES = [(1, 1), (10000, 100), (100, 10000), (3, 2000), (37, 53)]


@pytest.fixture(scope="module", params=["retinanet", "faster_rcnn"])
def model(request):
    torch.manual_seed(0)
    if request.param == "retinanet":
        config = named_config("retinanet_r18_fpn_cpu", num_classes=3, min_size=[64], max_size=96, fpn_channels=16,
                              backbone_weights=None, retinanet={"head_channels": 16, "head_depth": 1})
    else:
        config = named_config("faster_rcnn_r18_fpn_cpu", num_classes=3, min_size=[64], max_size=96, fpn_channels=16,
                              backbone_weights=None, roi_heads={"fc_dim": 16})
    return build_model(config).eval()


def check_outputs(outputs, images, cap: int) -> None:
    assert len(outputs) == len(images)
    for out, image in zip(outputs, images):
        count = len(out["scores"])
        assert out["boxes"].shape == (count, 4) and out["boxes"].dtype == torch.float32
        assert out["scores"].shape == (count,) and out["scores"].dtype == torch.float32
        assert out["labels"].shape == (count,) and out["labels"].dtype == torch.int64
        assert count <= cap
        height, width = image.shape[-2:]
        boxes = out["boxes"]
        assert torch.isfinite(boxes).all() and torch.isfinite(out["scores"]).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width + 1e-3).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height + 1e-3).all()


def cap_of(model) -> int:
    return model.config.detections_per_image


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_extreme_sizes_give_valid_outputs(model, size):
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model([image])
    check_outputs(outputs, [image], cap_of(model))


def test_all_zero_image_and_mixed_batch(model):
    images = [torch.zeros(3, 50, 70), torch.rand(3, 120, 40), torch.ones(3, 1, 1), torch.rand(3, 64, 64)]
    with torch.no_grad():
        batch = model(images)
    check_outputs(batch, images, cap_of(model))  # each image's boxes inside its own frame


def test_no_detection_is_an_empty_but_well_typed_result(model):
    from fpndet.engine.model_io import apply_inference_overrides

    restore = apply_inference_overrides(model, score_thresh=1.01)
    try:
        with torch.no_grad():
            outputs = model([torch.rand(3, 40, 60), torch.rand(3, 60, 40)])
    finally:
        apply_inference_overrides(model, **restore)
    check_outputs(outputs, [torch.empty(3, 40, 60), torch.empty(3, 60, 40)], cap_of(model))
    assert all(len(out["scores"]) == 0 for out in outputs)


@pytest.mark.parametrize("bad, message", [
    (lambda: [torch.rand(3, 20, 20), torch.full((3, 20, 20), float("nan"))], r"image 1: 1200 pixel values are NaN"),
    (lambda: [torch.rand(3, 20, 20).clone().index_put_((torch.tensor([0]),), torch.tensor(float("inf")))],
     r"image 0: 400 pixel values are NaN or infinite"),
    (lambda: [torch.randint(0, 255, (3, 20, 20), dtype=torch.uint8)], r"image 0: expected float pixels.*uint8"),
    (lambda: [torch.rand(3, 0, 20)], r"image 0: expected a \[3, H, W\] tensor with H, W >= 1"),
    (lambda: [torch.rand(4, 20, 20)], r"image 0: expected a \[3, H, W\] tensor"),
    (lambda: [], r"no images"),
])
def test_images_the_network_cannot_take_raise_a_clear_error(model, bad, message):
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(bad())
