from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fpndet.engine.evaluation import CocoEvaluator
from fpndet.engine.plots import (
    EXTRA_BOX_COLOR,
    PALETTE,
    draw_detections,
    plot_precision_recall,
    plot_training_curves,
    save_image_grid,
)
from fpndet.errors import InputError


def _open_png(path) -> Image.Image:
    assert path.stat().st_size > 1000
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


def _is_not_blank(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_plot_training_curves_writes_png(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(1, 51):
        loss_cls, loss_box = 1.0 / step, 0.5 / step
        lines.append({"step": step, "loss": loss_cls + loss_box, "loss_cls": loss_cls, "loss_box": loss_box, "lr": 0.01 * min(1, step / 10)})
        if step % 10 == 0:
            lines.append({"step": step, "epoch": step // 10, "AP": step / 200, "AP50": step / 100})
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n" + '{"step": 51, "loss": 0.'  # cut-off last line
    jsonl.write_text(text)
    out = tmp_path / "plots" / "curves.png"
    plot_training_curves(jsonl, out)
    image = _open_png(out)
    assert image.size == (1500, 450)
    assert _is_not_blank(image)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]


def test_plot_training_curves_without_eval_lines_and_bad_input(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 0.1}) + "\n" + json.dumps({"step": 2, "loss": 1.5, "lr": 0.1}) + "\n")
    plot_training_curves(jsonl, tmp_path / "curves.png")
    assert _open_png(tmp_path / "curves.png").size == (1500, 450)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(InputError, match="bad.jsonl: line 2"):
        plot_training_curves(bad, tmp_path / "bad.png")
    with pytest.raises(InputError, match="missing.jsonl"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_plot_precision_recall_from_coco_evaluation(tmp_path):
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "unseen"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
        ],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [12, 10, 30, 30], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [52, 52, 40, 40], "score": 0.7},
    ]
    evaluator = CocoEvaluator(gt)
    precision = evaluator.evaluate(results)["precision"]
    out = tmp_path / "pr.png"
    plot_precision_recall(precision, evaluator.class_names, out)
    image = _open_png(out)
    assert image.size == (1400, 600)
    assert _is_not_blank(image)
    with pytest.raises(ValueError):
        plot_precision_recall(precision, ["only", "two"], tmp_path / "bad.png")


def _blank_image(height=100, width=120) -> torch.Tensor:
    return torch.full((3, height, width), 40, dtype=torch.uint8)


def test_draw_detections_changes_outline_pixels_only(tmp_path):
    image = _blank_image(width=160)
    before = image.clone()
    boxes = torch.tensor([[20.0, 50.0, 60.0, 90.0]])
    out_path = tmp_path / "drawn.png"
    drawn = draw_detections(image, boxes, torch.tensor([1]), torch.tensor([0.87]), ["cat", "dog"], out_path=out_path)

    assert torch.equal(image, before)  # input untouched
    pixels = np.asarray(drawn)
    assert drawn.size == (160, 100)
    dog_color = PALETTE[1]
    for x, y in [(20, 70), (60, 70), (40, 50), (40, 90), (21, 70)]:  # left, right, top, bottom edges
        assert tuple(pixels[y, x]) == dog_color, (x, y)
    assert (pixels[60:85, 25:55] == 40).all()  # inside the box: not filled
    assert (pixels[:, 100:] == 40).all()  # right of the box and its label ("dog 0.87" ~55 px)
    assert (pixels[:30] == 40).all()  # well above the label
    # The label sits just above the box: coloured background and text pixels there.
    label_area = pixels[34:50, 20:60]
    assert (label_area == dog_color).all(axis=-1).mean() > 0.3
    assert ((label_area != dog_color).any(axis=-1) & (label_area != 40).any(axis=-1)).any()
    saved = Image.open(out_path)
    assert saved.format == "PNG"
    assert np.array_equal(np.asarray(saved.convert("RGB")), pixels)


def test_draw_detections_pil_input_extra_boxes_and_no_scores():
    pil = Image.new("RGB", (80, 60), (0, 0, 0))
    drawn = draw_detections(
        pil, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), None, ["a"],
        extra_boxes={"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([0])},
    )  # fmt: skip
    pixels = np.asarray(drawn)
    assert tuple(pixels[25, 10]) == EXTRA_BOX_COLOR and tuple(pixels[25, 30]) == EXTRA_BOX_COLOR
    assert tuple(pixels[25, 20]) == (0, 0, 0)
    assert (pixels[:, 50:] == 0).all()
    assert np.asarray(pil).max() == 0  # the input image is not drawn on


def test_save_image_grid_layout(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (30, 20), color) for color in colors]
    images[3] = Image.new("RGB", (40, 10), colors[3])
    out = tmp_path / "grid.png"
    grid = save_image_grid(images, out, columns=4)
    saved = np.asarray(Image.open(out).convert("RGB"))
    assert saved.shape == (40, 160, 3)  # 2 rows x 4 columns of 40 x 20 cells
    assert np.array_equal(saved, np.asarray(grid))
    assert tuple(saved[5, 5]) == colors[0]
    assert tuple(saved[5, 45]) == colors[1]
    assert tuple(saved[5, 125]) == colors[3]
    assert tuple(saved[15, 125]) == (0, 0, 0)  # below the 10 px tall image
    assert tuple(saved[25, 5]) == colors[4]
    assert tuple(saved[25, 45]) == (0, 0, 0)  # empty cell
    with pytest.raises(ValueError):
        save_image_grid([], out)
