"""The pre-processor: multi-scale draws where the model resizes, boxes scaled with their image."""
from __future__ import annotations

import random

import torch

from fpndet.modeling.preprocess import ImagePreprocessor


def make_preprocessor(min_size):
    return ImagePreprocessor(min_size=min_size, max_size=1000, size_divisible=32,
                             pixel_mean=[0.5, 0.5, 0.5], pixel_std=[0.25, 0.25, 0.25])


def test_training_draws_one_short_side_per_image_and_boxes_follow_their_image():
    random.seed(0)
    pre = make_preprocessor([64, 96, 128]).train()
    image = torch.zeros(3, 60, 100)
    image[:, 20:40, 10:30] = 1.0  # a bright square exactly under the box
    box = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    sides = set()
    for _ in range(20):
        batch = pre([image], [{"boxes": box, "labels": torch.tensor([0])}])
        height, width = batch.image_sizes[0]
        sides.add(height)
        scale = torch.tensor([width / 100, height / 60, width / 100, height / 60])
        scaled = batch.targets[0]["boxes"]
        torch.testing.assert_close(scaled, box * scale)
        # the box still frames the bright square in the resized pixels
        x1, y1, x2, y2 = scaled[0].round().int().tolist()
        inside = batch.tensor[0, 0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
        assert float(inside.min()) > 1.9  # (1 - 0.5) / 0.25 = 2
        assert float(batch.tensor[0, 0, : max(y1 - 2, 0), :width].max()) < -1.9  # dark above it
    assert sides == {64, 96, 128}


def test_evaluation_uses_the_last_short_side():
    pre = make_preprocessor([64, 96, 128]).eval()
    assert {pre([torch.zeros(3, 60, 100)]).image_sizes[0][0] for _ in range(5)} == {128}
