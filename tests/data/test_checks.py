"""The image check before training: unreadable files and sizes that contradict the annotation are
found together (cached, re-read only when a file changes); the dataset without them; images that
fail to decode during training are skipped and counted, never ending the run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fpndet.data.checks as checks
from fpndet.config import load_config
from fpndet.data.checks import KeptImages, SkipUnreadable, check_images
from fpndet.data.detect import open_dataset
from fpndet.engine.trainer import Trainer
from fpndet.errors import InputError


def write_coco(root: Path, images: int = 6) -> Path:
    """``root/images/<i>.jpg`` (48x64 noise), one box each, one class."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    content = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        content["images"].append({"id": i + 1, "file_name": f"{i}.jpg", "height": 48, "width": 64})
        content["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [8, 8, 30, 20],
                                       "area": 600, "iscrowd": 0})
    path = root / "annotations" / "instances.json"
    path.write_text(json.dumps(content))
    return path


def spoil(root: Path) -> None:
    """Image 1 missing, image 2 not an image, image 3 of another size than declared, image 4
    truncated (its header is fine: only decoding fails)."""
    (root / "images" / "1.jpg").unlink()
    (root / "images" / "2.jpg").write_bytes(b"this is not an image")
    Image.new("RGB", (80, 48)).save(root / "images" / "3.jpg")
    data = (root / "images" / "4.jpg").read_bytes()
    (root / "images" / "4.jpg").write_bytes(data[: len(data) // 2])


def test_check_reports_every_bad_image_and_caches_the_rest(tmp_path, monkeypatch):
    annotations = write_coco(tmp_path / "coco")
    spoil(tmp_path / "coco")
    dataset = open_dataset(annotations, split="val")
    cache = tmp_path / "run" / "check.json"
    problems = check_images(dataset, cache_file=cache)
    assert [(p.index, Path(p.file).name) for p in problems] == [(1, "1.jpg"), (2, "2.jpg"), (3, "3.jpg")]
    assert problems[0].problem == "image file does not exist"
    assert problems[1].problem.startswith("cannot read image")
    assert problems[2].problem == (f"image is 80x48 pixels but {annotations} says 64x48 (its boxes would be misplaced)")

    reads = []
    original = checks.image_size
    monkeypatch.setattr(checks, "image_size", lambda path: reads.append(Path(path).name) or original(path))
    assert check_images(dataset, cache_file=cache) == problems
    assert reads == []  # every header came from the cache
    Image.new("RGB", (64, 48)).save(tmp_path / "coco" / "images" / "3.jpg")  # fixed: re-read, passes
    assert [p.index for p in check_images(dataset, cache_file=cache)] == [1, 2]
    assert reads == ["3.jpg"]


def test_kept_images_is_the_dataset_without_the_others(tmp_path):
    dataset = open_dataset(write_coco(tmp_path / "coco"), split="val")
    kept = KeptImages(dataset, [0, 2, 5])
    assert len(kept) == 3 and kept.image_ids == [1, 3, 6] and kept.class_names == ["thing"]
    assert kept.annotation(1).image_id == 3 and kept[2][1]["image_id"] == 6
    assert kept.load(1)[1].image_id == 3  # load maps the index too (it used to reach image 2 of the dataset)
    coco = kept.to_coco()
    assert [im["id"] for im in coco["images"]] == [1, 3, 6]
    assert sorted(a["image_id"] for a in coco["annotations"]) == [1, 3, 6]
    kept.transforms = "set through"
    assert dataset.transforms == "set through"


def test_an_image_that_fails_to_decode_is_replaced_by_the_next(tmp_path):
    root = tmp_path / "coco"
    annotations = write_coco(root)
    spoil(root)
    dataset = SkipUnreadable(open_dataset(annotations, split="val"))
    image, target = dataset[4]  # truncated: image 5 served instead
    assert target["image_id"] == 6 and len(target["skipped"]) == 1
    assert "4.jpg" in target["skipped"][0]
    assert "skipped" not in dataset[0][1]
    _, target = dataset[1]  # 1, 2 unreadable, 3 of the wrong size, 4 truncated
    assert target["image_id"] == 6 and [Path(s.split(":")[0]).name for s in target["skipped"]] == [
        "1.jpg", "2.jpg", "3.jpg", "4.jpg"]


def tiny(annotations: Path, out: Path, *overrides: str):
    return load_config(None, [
        f"data.train={annotations}", "data.num_workers=0", "model.backbone=resnet18", "model.backbone_weights=null",
        "model.fpn_channels=16", "model.retinanet.head_channels=16", "model.retinanet.head_depth=1",
        "model.min_size=[48]", "model.max_size=64", "train.batch_size=2", f"train.output_dir={out}", "train.epochs=1",
        "train.warmup_iters=1", "train.device=cpu", "train.log_every=1", *overrides,
    ])


def test_trainer_stops_at_the_check_listing_every_bad_image(tmp_path, capsys):
    root = tmp_path / "coco"
    annotations = write_coco(root)
    spoil(root)
    with pytest.raises(InputError) as caught:
        Trainer(tiny(annotations, tmp_path / "run"))
    message = str(caught.value)
    assert message.startswith(f"{annotations}: 3 of 6 images failed the check:")
    for name in ("1.jpg: image file does not exist", "2.jpg: cannot read image", "3.jpg: image is 80x48"):
        assert name in message
    assert "data.bad_images=skip" in message
    assert "image check (train): 6 images, 3 failed" in capsys.readouterr().out


def test_trainer_with_skip_trains_without_them_and_counts_decode_failures(tmp_path, capsys):
    root = tmp_path / "coco"
    annotations = write_coco(root, images=8)
    spoil(root)
    with pytest.warns(UserWarning) as caught:
        trainer = Trainer(tiny(annotations, tmp_path / "run", "data.bad_images=skip", "train.eval_every_epochs=1"))
        report = trainer.fit()
    messages = [str(w.message) for w in caught]
    assert sum("left out (train set)" in m for m in messages) == 3
    assert any("4.jpg" in m and "skipped, the next image used in its place" in m for m in messages)
    assert any("4.jpg" in m and "left out of this evaluation" in m for m in messages)  # val = train here
    assert len(trainer.train_set) == 5 and trainer.progress.skipped_images >= 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_images", 0) for r in records if "loss" in r) >= 1
    assert "AP" in report["metrics"]
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["extra"]["skipped_images"] >= 1
