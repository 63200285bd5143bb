"""Anchor fitting (fpndet/engine/anchor_fit.py): the fast best-IoU equals inspect's over every
anchor, the search finds a planted optimum, ``model.anchor_sizes=auto`` / ``anchor_ratios=auto``
in the config, ``resolve_auto_anchors``, and ``fpndet inspect --suggest-anchors``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fpndet.cli import main
from fpndet.config import auto_anchor_fields, load_config, model_config, save_config
from fpndet.data.formats import ShapesDataset
from fpndet.data.records import ImageRecord
from fpndet.engine.anchor_fit import anchor_score, best_anchor_iou, fit_anchors, fit_boxes, resolve_auto_anchors
from fpndet.engine.inspect import box_coverage, image_anchors, input_geometry, inspect_dataset, pyramid_grids
from fpndet.errors import InputError
from fpndet.modeling.anchors import cell_anchors
from fpndet.modeling.build import build_anchor_generator
from fpndet.modeling.config import ModelConfig, named_config


def _record(image_id: int, boxes, size) -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return ImageRecord(image_id=image_id, file_name=f"img{image_id}.png", height=size[0], width=size[1], boxes=boxes,
                       labels=np.zeros(len(boxes), np.int64), iscrowd=np.zeros(len(boxes), bool))


def _random_boxes(rng, count: int, height: int, width: int) -> np.ndarray:
    xy = rng.uniform(-16, [width, height], size=(count, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(1.5 * max(height, width)), size=(count, 2)))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


CONFIGS = {
    "retinanet_level": ModelConfig(min_size=[416], max_size=700, anchor_sizes=[20.0, 40.0, 80.0, 160.0, 320.0],
                                   anchor_ratios=[0.3, 1.0, 2.7]),
    "retinanet_image": ModelConfig(min_size=[416], max_size=700, anchor_placement="image",
                                   anchor_sizes=[11.5, 23.0, 46.0, 92.0, 184.0], anchor_ratios=[0.6, 1.7]),
    "faster_rcnn": named_config("faster_rcnn_r50_fpn", min_size=[448], max_size=640),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nearest_anchor_gives_inspects_best_iou_exactly(name):
    """The best IoU (and its level) from the anchor nearest each box equal box_coverage's over
    every anchor of the image, bit for bit, on odd image sizes (grids rounded up, torchvision
    strides)."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(0)
    generator = build_anchor_generator(cfg)
    for height, width in [(300, 500), (480, 640), (333, 777), (1000, 90)]:
        boxes = _random_boxes(rng, 300, height, width)
        fitted = fit_boxes([_record(1, boxes, (height, width))], cfg)
        best, level = best_anchor_iou(fitted, cfg.anchor_sizes, cfg.anchor_scales, cfg.anchor_ratios)
        padded = input_geometry(height, width, cfg).padded
        assert fitted.grid[0].tolist() == [list(g) for g in pyramid_grids(padded, cfg.min_level, cfg.max_level)]
        coverage = box_coverage(fitted.boxes, image_anchors(generator, padded, cfg),
                                foreground_iou=cfg.anchor_stage.foreground_iou)
        assert torch.equal(best, coverage.best_iou)
        assert torch.equal(level, coverage.best_level)


def test_anchor_score_matches_inspect_on_shapes(tmp_path):
    dataset = ShapesDataset(split="val", num_images=24, image_size=(128, 128))
    cfg = ModelConfig(num_classes=4, min_size=[128], max_size=128)
    records = [dataset.annotation(i) for i in range(len(dataset))]
    score = anchor_score(fit_boxes(records, cfg), cfg)
    summary = inspect_dataset(dataset, cfg, tmp_path, samples=0)["summary"]
    assert score.boxes == summary["boxes"]
    assert round(score.coverage, 4) == summary["coverage"]
    for level, values in summary["coverage_per_level"].items():
        assert score.per_level[level]["boxes"] == values["boxes"]
        assert score.per_level[level]["covered"] == values["covered"]


# --------------------------------------------------------------------------------------------
# The planted optimum
# --------------------------------------------------------------------------------------------
PLANTED_SIZES = [44.0, 88.0, 176.0, 352.0, 704.0]  # 1.375 x the paper's
PLANTED_RATIOS = [0.4, 1.0, 2.5]
# Numbers that step 5 (round numbers) cannot reach: the search itself has to.
UNROUND_SIZES = [37.33, 74.66, 149.32, 298.64, 597.28]
UNROUND_RATIOS = [0.617, 1.37, 3.13]
IMAGE_SIZES = [(512, 512), (512, 768), (768, 512)]


def _planted_records(rng, config: ModelConfig, *, per_image: int = 60) -> list[ImageRecord]:
    """Boxes that are each exactly one anchor of ``config`` (every level, ratio and scale alike),
    on images that the model does not resize (min_size 512, max_size 768)."""
    records = []
    strides = [2**level for level in range(config.min_level, config.max_level + 1)]
    cells = [cell_anchors(size, config.anchor_scales, config.anchor_ratios).numpy() for size in config.anchor_sizes]
    for image_id, (height, width) in enumerate(IMAGE_SIZES * 2):
        boxes = []
        for k in range(per_image):
            level = k % len(strides)
            cell = cells[level][(k // len(strides)) % len(cells[level])]
            x = rng.integers(0, width // strides[level]) * strides[level]
            y = rng.integers(0, height // strides[level]) * strides[level]
            boxes.append(cell + np.array([x, y, x, y], dtype=np.float32))
        records.append(_record(image_id, boxes, (height, width)))
    return records


@pytest.mark.parametrize("sizes, ratios", [(PLANTED_SIZES, PLANTED_RATIOS), (UNROUND_SIZES, UNROUND_RATIOS)])
def test_the_search_finds_a_planted_optimum(sizes, ratios):
    """Boxes planted as the anchors of other sizes and ratios than the paper's: from the paper's
    anchors the fit recovers both, every box then has an anchor equal to it (IoU 1, the optimum)."""
    start = ModelConfig(min_size=[512], max_size=768)
    planted = start.replace(anchor_sizes=sizes, anchor_ratios=ratios)
    records = _planted_records(np.random.default_rng(0), planted)
    boxes = fit_boxes(records, start)
    assert anchor_score(boxes, planted).mean_iou == 1.0
    before = anchor_score(boxes, start)
    assert before.mean_iou < 0.8

    fit = fit_anchors(records, start)
    assert fit.after.covered == fit.after.boxes == len(boxes)
    assert fit.after.mean_iou == 1.0
    assert fit.sizes == pytest.approx(sizes, rel=0.005)
    assert fit.ratios == pytest.approx(ratios, rel=0.01)
    assert fit.after.key > fit.before.key == before.key
    assert fit.seconds < 30
    # The printed override gives the scored anchors.
    printed_sizes, printed_ratios = (part.split("=")[1] for part in fit.override.split())
    assert json.loads(printed_sizes) == fit.sizes and json.loads(printed_ratios) == fit.ratios

    # One field at a time, the other given right.
    sizes_only = fit_anchors(records, start.replace(anchor_ratios=ratios), fit_ratios=False)
    assert sizes_only.ratios == ratios and sizes_only.sizes == pytest.approx(sizes, rel=0.005)
    assert sizes_only.after.mean_iou == 1.0
    ratios_only = fit_anchors(records, start.replace(anchor_sizes=sizes), fit_sizes=False)
    assert ratios_only.sizes == sizes and ratios_only.ratios == pytest.approx(ratios, rel=0.01)
    assert ratios_only.after.mean_iou == 1.0


def test_coverage_comes_before_mean_iou():
    """Tiny squares on the P3 grid need small anchors: the fit covers them all, and only among
    fully covering sets does it raise the mean IoU."""
    start = ModelConfig(min_size=[256], max_size=256)
    rng = np.random.default_rng(1)
    corners = rng.integers(1, 30, size=(80, 2)) * 8
    boxes = np.concatenate([corners - 5, corners + 5], axis=1)  # 10 px squares centred on P3 cells
    records = [_record(0, boxes[:40], (256, 256)), _record(1, boxes[40:], (256, 256))]
    fit = fit_anchors(records, start, fit_ratios=False)
    assert fit.before.covered == 0
    assert fit.after.covered == 80 and fit.after.mean_iou == 1.0
    assert fit.after.per_level["P3"]["boxes"] == 80


def test_coverage_wins_over_a_higher_mean_iou():
    """One anchor shape per level, foreground IoU 0.8, squares of 20 px and 23 px centred on P3
    points: a 22 px anchor covers both (IoU 0.83, 0.92), a 20 px one has the higher mean best IoU
    (1.0 and 0.76) but covers half. The fit takes the 22 px one (the whole-pixel anchors have
    even sides: there is nothing between)."""
    start = ModelConfig(min_size=[256], max_size=256, anchor_scales=[1.0],
                        anchor_ratios=[1.0]).replace(retinanet={"foreground_iou": 0.8})
    centres = np.random.default_rng(3).integers(2, 30, size=(80, 2)) * 8
    half = np.where(np.arange(80) % 2 == 0, 10.0, 11.5)[:, None]
    boxes = np.concatenate([centres - half, centres + half], axis=1)
    records = [_record(0, boxes[:40], (256, 256)), _record(1, boxes[40:], (256, 256))]
    fit = fit_anchors(records, start, fit_ratios=False)
    assert fit.after.covered == 80 and 22 <= fit.sizes[0] < 23  # anchor side 2 * round(int(size) / 2) = 22
    higher_mean = anchor_score(fit_boxes(records, start), start, sizes=[20.0 * 2**k for k in range(5)])
    assert higher_mean.covered == 40 and higher_mean.mean_iou > fit.after.mean_iou


def test_more_or_fewer_ratios_on_request():
    start = ModelConfig(min_size=[512], max_size=768)
    planted = start.replace(anchor_sizes=PLANTED_SIZES, anchor_ratios=PLANTED_RATIOS)
    records = _planted_records(np.random.default_rng(2), planted, per_image=30)
    one = fit_anchors(records, start, num_ratios=1)
    assert len(one.ratios) == 1 and one.config.num_anchors_per_location == 3
    four = fit_anchors(records, start, num_ratios=4)
    assert len(four.ratios) == 4 and four.after.key >= one.after.key
    assert four.config.num_anchors_per_location == 12 and four.after.key > four.before.key
    with pytest.raises(ValueError, match="num_ratios=0"):
        fit_anchors(records, start, num_ratios=0)
    with pytest.raises(ValueError, match="only when fitting ratios"):
        fit_anchors(records, start, num_ratios=2, fit_ratios=False)


def test_search_on_a_sample_and_within_the_budget():
    """max_boxes: the search sees a seeded sample, the before/after scores count every box, and
    the same seed gives the same fit; max_evaluations bounds steps 1-4 (step 5's round-number
    combinations, at most 3^4 here, come on top)."""
    start = ModelConfig(min_size=[512], max_size=768)
    planted = start.replace(anchor_sizes=PLANTED_SIZES, anchor_ratios=PLANTED_RATIOS)
    records = _planted_records(np.random.default_rng(4), planted)
    sampled = fit_anchors(records, start, max_boxes=100)
    assert sampled.searched_boxes == 100 and sampled.before.boxes == sampled.after.boxes == 360
    assert sampled.after.key > sampled.before.key
    again = fit_anchors(records, start, max_boxes=100)
    assert (again.sizes, again.ratios, again.evaluations) == (sampled.sizes, sampled.ratios, sampled.evaluations)
    limited = fit_anchors(records, start, max_evaluations=30)
    assert limited.evaluations <= 30 + 3**4 < sampled.evaluations


# --------------------------------------------------------------------------------------------
# auto in the config
# --------------------------------------------------------------------------------------------
def test_auto_is_a_marker_that_only_the_fit_resolves(tmp_path):
    cfg = load_config("shapes", ["model.anchor_sizes=auto", "model.anchor_ratios=AUTO"])
    assert auto_anchor_fields(cfg) == ["anchor_sizes", "anchor_ratios"]
    assert "???" in OmegaConf.to_yaml(cfg.model)
    with pytest.raises(InputError, match="model.anchor_sizes=auto and model.anchor_ratios=auto"):
        model_config(cfg)
    reference = model_config(cfg, reference_anchors=True)  # the paper's anchors
    assert reference.anchor_sizes == [32.0, 64.0, 128.0, 256.0, 512.0] and reference.anchor_ratios == [0.5, 1.0, 2.0]

    # In a YAML, and overridden by numbers on the command line (the last layer wins).
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  preset: faster_rcnn_r18_fpn_cpu\n  anchor_sizes: auto\n")
    assert auto_anchor_fields(load_config(str(path))) == ["anchor_sizes"]
    # a two-stage preset (P2-P6) starts from the FPN paper's 32 px on P2
    assert model_config(load_config(str(path)), reference_anchors=True).anchor_sizes == [32.0, 64.0, 128.0, 256.0, 512.0]
    given = load_config(str(path), ["model.anchor_sizes=[8,16,32,64,128]"])
    assert auto_anchor_fields(given) == [] and model_config(given).anchor_sizes == [8.0, 16.0, 32.0, 64.0, 128.0]
    with pytest.raises(InputError):
        load_config(None, ["model.anchor_scales=auto"])  # only sizes and ratios are fitted


def _tiny_shapes_cfg(out, *overrides):
    return load_config(None, [
        "data.train=shapes", "data.shapes_train_images=16", "data.shapes_val_images=8",
        "data.shapes_image_size=128", "data.num_workers=0",
        "model.backbone=resnet18", "model.fpn_channels=16", "model.retinanet.head_channels=16",
        "model.retinanet.head_depth=1", "model.min_size=[128]", "model.max_size=128",
        "train.batch_size=4", f"train.output_dir={out}", "train.epochs=null", "train.max_iters=1",
        "train.device=cpu", "train.eval_every_epochs=100", "eval.max_images=2", *overrides,
    ])


def test_resolve_auto_anchors_writes_numbers_into_the_config(tmp_path, capsys):
    cfg = _tiny_shapes_cfg(tmp_path / "run", "model.anchor_sizes=auto", "model.anchor_ratios=auto")
    dataset = ShapesDataset(split="train", num_images=16, image_size=(128, 128))
    fit = resolve_auto_anchors(cfg, dataset)
    assert auto_anchor_fields(cfg) == []
    assert list(cfg.model.anchor_sizes) == fit.sizes and list(cfg.model.anchor_ratios) == fit.ratios
    assert len(fit.sizes) == 5 and len(fit.ratios) == 3
    assert fit.start == {"anchor_sizes": [32.0, 64.0, 128.0, 256.0, 512.0], "anchor_ratios": [0.5, 1.0, 2.0]}
    assert fit.after.key > fit.before.key  # small shapes: the paper's 32 px smallest anchor misses some
    assert model_config(cfg).anchor_sizes == fit.sizes
    printed = capsys.readouterr().out
    assert "anchors (auto) for this run: model.anchor_sizes=[" in printed and "paper " in printed
    save_config(cfg, tmp_path / "config.yaml")
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert list(saved.model.anchor_sizes) == fit.sizes and list(saved.model.anchor_ratios) == fit.ratios

    # Nothing auto: nothing done. A resumed run takes the numbers its config.yaml holds.
    assert resolve_auto_anchors(cfg, dataset) is None
    again = _tiny_shapes_cfg(tmp_path / "run", "model.anchor_sizes=auto")
    assert resolve_auto_anchors(again, dataset, saved_config=tmp_path / "config.yaml") is None
    assert list(again.model.anchor_sizes) == fit.sizes and list(again.model.anchor_ratios) == [0.5, 1.0, 2.0]


def test_training_with_auto_anchors_saves_the_fitted_numbers(tmp_path):
    from fpndet.engine.trainer import Trainer

    out = tmp_path / "run"
    cfg = _tiny_shapes_cfg(out, "model.anchor_sizes=auto")
    trainer = Trainer(cfg)
    trainer.fit()
    saved = OmegaConf.load(out / "config.yaml")
    sizes = list(saved.model.anchor_sizes)
    assert len(sizes) == 5 and all(isinstance(v, float) for v in sizes)
    assert trainer.model_cfg.anchor_sizes == sizes
    assert sizes != [32.0, 64.0, 128.0, 256.0, 512.0]


# --------------------------------------------------------------------------------------------
# fpndet inspect --suggest-anchors
# --------------------------------------------------------------------------------------------
def test_inspect_help_lists_the_anchor_options(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = capsys.readouterr().out
    assert "--suggest-anchors" in text and "--num-ratios" in text


def test_inspect_num_ratios(tmp_path, capsys):
    out = tmp_path / "inspect"
    common = ["inspect", "--data", "shapes:16", "--samples", "0", "model.min_size=[128]", "model.max_size=128"]
    assert main([*common, "--output", str(out), "--suggest-anchors", "--num-ratios", "2"]) == 0
    fit = json.loads((out / "report.json").read_text())["anchor_fit"]
    assert len(fit["anchor_ratios"]) == 2 and fit["fitted"] == ["anchor_sizes", "anchor_ratios"]
    assert f"model.anchor_ratios=[{fit['anchor_ratios'][0]:.10g}," in capsys.readouterr().out
    # Without a ratio fit there is nothing to give a count to.
    assert main([*common, "--output", str(tmp_path / "no"), "--num-ratios", "2"]) == 2
    assert "--num-ratios 2" in capsys.readouterr().err


def test_inspect_suggest_anchors_on_raccoon(raccoon_dir, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", "--data", str(raccoon_dir), "--config", "raccoon", "--output", str(out), "--samples", "0",
                 "--suggest-anchors"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    fit = report["anchor_fit"]
    assert f"override: {fit['override']}" in printed
    assert fit["override"].startswith("model.anchor_sizes=[") and " model.anchor_ratios=[" in fit["override"]
    assert fit["start"]["anchor_sizes"] == report["model"]["anchor_sizes"]
    assert fit["before"]["coverage"] == report["summary"]["coverage"]  # inspected as configured
    assert (fit["after"]["covered"], fit["after"]["mean_best_iou"]) >= (fit["before"]["covered"],
                                                                      fit["before"]["mean_best_iou"])
    assert len(fit["anchor_ratios"]) == 3 and fit["seconds"] < 30

    # The override reproduces the fitted coverage in a plain inspection; auto inspects the fit.
    again = tmp_path / "again"
    assert main(["inspect", "--data", str(raccoon_dir), "--config", "raccoon", "--output", str(again),
                 "--samples", "0", *fit["override"].split()]) == 0
    assert json.loads((again / "report.json").read_text())["summary"]["coverage"] == fit["after"]["coverage"]
    auto = tmp_path / "auto"
    assert main(["inspect", "--data", str(raccoon_dir), "--config", "raccoon", "--output", str(auto),
                 "--samples", "0", "model.anchor_ratios=auto"]) == 0
    auto_report = json.loads((auto / "report.json").read_text())
    assert auto_report["anchor_fit"]["fitted"] == ["anchor_ratios"]
    assert auto_report["model"]["anchor_ratios"] == auto_report["anchor_fit"]["anchor_ratios"]
    assert "paper " in capsys.readouterr().out
