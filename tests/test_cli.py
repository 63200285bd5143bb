"""The ``fpndet`` command, run in-process through ``fpndet.cli.main`` (and once as a subprocess)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fpndet.cli import main
from fpndet.data.detect import open_dataset
from fpndet.engine.checkpoints import load_model_weights, load_training_state, save_model_weights
from fpndet.errors import InputError
from fpndet.modeling.build import build_model
from fpndet.modeling.config import named_config

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["cat", "dog"]
TINY_MODEL = ["model.backbone=resnet18", "model.min_size=[96]", "model.max_size=128", "model.fpn_channels=16",
              "model.retinanet.head_channels=16", "model.retinanet.head_depth=1"]


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny checkpoint, a small COCO dataset, raccoon images
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-class ResNet-18 RetinaNet (128 px) saved as fpndet writes it."""
    torch.manual_seed(0)
    cfg = named_config("retinanet_r18_fpn_cpu", num_classes=2, min_size=[128], max_size=160,
                       fpn_channels=32, retinanet={"head_channels": 32, "head_depth": 1})
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model_weights(path, model.state_dict(), config=cfg.to_dict(), metadata={"class_names": CLASS_NAMES})
    return path


def write_coco(root: Path, *, images: int = 4, edit=None) -> Path:
    """``root/images/<i>.jpg`` (96x128 noise) and ``root/annotations/instances_val.json``, one
    40x30 box per image, classes cat (id 1) and dog (id 2). ``edit(content)`` may change the JSON."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    content = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        content["images"].append({"id": i + 1, "file_name": f"{i}.jpg", "height": 96, "width": 128})
        content["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2,
                                       "bbox": [10, 10 + 5 * i, 40, 30], "area": 1200, "iscrowd": 0})
    if edit is not None:
        edit(content)
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def raccoon_images(raccoon_dir, tmp_path) -> Path:
    """A folder with two raccoon photos (raccoon-150 is single-channel grayscale)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("raccoon-1.jpg", "raccoon-150.jpg"):
        shutil.copy(raccoon_dir / "JPEGImages" / name, folder / name)
    return folder


def assert_one_error(capsys, command: str, exit_code: int, *must_contain: str) -> str:
    """Exit status 2, exactly one "fpndet <command>: error: ..." line naming the file, no traceback."""
    captured = capsys.readouterr()
    assert exit_code == 2, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith(f"fpndet {command}: error: ")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for text in must_contain:
        assert text in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------
HELP_OPTIONS = {
    "train": ["--config", "--data", "--val-data", "--format", "--weights", "--output", "--resume", "--debug",
              "--device", "overrides", "KEY=VALUE"],
    "eval": ["--weights", "--data", "--split", "--format", "--output", "--batch-size", "--max-images",
             "--proposals", "--score-thresh", "--debug", "--device", "--backend", "--diagnostics-thresh",
             "--no-diagnostics", "--tile", "--tile-overlap", "--tile-full-image"],
    "proposals": ["--weights", "--data", "--split", "--format", "--output", "--topk", "--pre-topk", "--batch-size",
                  "--debug", "--device"],
    "predict": ["--weights", "sources", "--output", "--score-thresh", "--batch-size", "--no-draw", "--workers",
                "--resume", "--strict", "--debug", "--device", "--backend", "--tile", "--tile-overlap",
                "--tile-full-image"],
    "inspect": ["--data", "--split", "--format", "--config", "--output", "--samples", "overrides", "--debug",
                "--suggest-anchors", "--num-ratios"],
    "export": ["--weights", "--format", "--output", "--opset", "--raw", "--input-dtype", "--input-size",
               "--score-thresh", "--detections", "--check", "--images", "--debug"],
}
# CPU-only commands take no --device (it would do nothing).
NO_DEVICE = ("inspect", "export")


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
def test_subcommand_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fpndet {command}")
    assert ("--device" in text) == (command not in NO_DEVICE)
    for option in HELP_OPTIONS[command]:
        assert option in text, f"{command} --help does not mention {option}"


def test_help_and_bad_input_as_a_subprocess(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fpndet.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    for command in HELP_OPTIONS:
        assert command in run.stdout
    missing = tmp_path / "nothing.safetensors"
    Image.new("RGB", (32, 24)).save(tmp_path / "photo.png")
    run = subprocess.run([sys.executable, "-m", "fpndet.cli", "predict", "--weights", str(missing), str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"fpndet predict: error: {missing}: no such checkpoint file or run folder"


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: fpndet" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad inputs: exit status 2, one message naming the file
# --------------------------------------------------------------------------------------------
def test_corrupt_image_in_eval(checkpoint, tmp_path, capsys):
    annotations = write_coco(tmp_path / "coco")
    corrupt = tmp_path / "coco" / "images" / "1.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:500])
    args = ["eval", "--weights", str(checkpoint), "--data", str(annotations), "--output", str(tmp_path / "out"),
            "--device", "cpu"]
    assert_one_error(capsys, "eval", main(args), str(corrupt), "cannot read image")
    with pytest.raises(InputError, match="cannot read image"):
        main(args + ["--debug"])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_in_train_is_named_by_the_check_before_training(tmp_path, capsys, num_workers):
    """The image check lists every bad file before the first step (exit 2, no traceback)."""
    annotations = write_coco(tmp_path / "coco")
    corrupt = tmp_path / "coco" / "images" / "2.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    args = ["train", "--data", str(annotations), "--output", str(tmp_path / "run"), *TINY_MODEL,
            "train.batch_size=4", "train.max_iters=1", f"data.num_workers={num_workers}", "data.hflip_prob=0"]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert f"fpndet train: error: {annotations}: 1 of 4 images failed the check:" in lines
    assert any(line.startswith(f"  {corrupt}: cannot read image") for line in lines), lines
    assert not (tmp_path / "run" / "last.pth").exists()
    with pytest.raises(InputError, match="cannot read image"):
        main(args + ["--debug"])


def test_input_error_rebuilt_from_a_worker_keeps_its_message():
    """torch's DataLoader re-raises a worker's exception as ``type(msg)`` with the traceback text."""
    rebuilt = InputError("Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                         "call last):\n  File \"x.py\", line 1\nfpndet.errors.InputError: a.jpg: cannot read image\n")
    assert str(rebuilt) == "a.jpg: cannot read image"
    assert str(InputError("b.json", "bad JSON")) == "b.json: bad JSON"


@pytest.mark.parametrize("command", ["eval", "train", "inspect"])
def test_malformed_annotation_file(command, checkpoint, tmp_path, capsys):
    broken = tmp_path / "instances.json"
    broken.write_text('{"images": [{"id": 1, ')
    args = {
        "eval": ["eval", "--weights", str(checkpoint), "--data", str(broken), "--device", "cpu"],
        "train": ["train", "--data", str(broken), "--output", str(tmp_path / "run"), *TINY_MODEL],
        "inspect": ["inspect", "--data", str(broken), "--output", str(tmp_path / "inspect")],
    }[command]
    assert_one_error(capsys, command, main(args), str(broken), "malformed JSON")


def test_unknown_class(checkpoint, tmp_path, capsys):
    def unknown_category(content):
        content["annotations"][2]["category_id"] = 7

    annotations = write_coco(tmp_path / "coco", edit=unknown_category)
    args = ["eval", "--weights", str(checkpoint), "--data", str(annotations), "--device", "cpu"]
    assert_one_error(capsys, "eval", main(args), str(annotations), "annotation id 3", "unknown class",
                     "category_id 7")


def test_boxes_outside_the_image_are_clipped_or_dropped_and_training_runs(tmp_path, capsys):
    """A box partly outside its image is clipped (warning), one entirely outside is dropped
    (warning); neither is an error, and training goes on."""
    def outside(content):
        content["annotations"][0]["bbox"] = [100, 80, 60, 40]  # reaches x=160, y=120 in a 128x96 image
        content["annotations"][1]["bbox"] = [200, 10, 20, 20]  # entirely right of the image

    annotations = write_coco(tmp_path / "coco", edit=outside)
    with pytest.warns(UserWarning) as record:
        dataset = open_dataset(annotations, split="val")
    messages = [str(w.message) for w in record]
    assert any("1 box(es) reach more than 1 px outside their image and were clipped (first: annotation id 1)" in m
               for m in messages)
    assert any("1 box(es) have zero width or height inside their image and were dropped (first: annotation id 2)"
               in m for m in messages)
    assert all(str(annotations) in m for m in messages)
    assert dataset.annotation(0).boxes.tolist() == [[100.0, 80.0, 128.0, 96.0]]
    assert len(dataset.annotation(1).boxes) == 0 and len(dataset.annotation(2).boxes) == 1

    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = main(["train", "--data", str(annotations), "--output", str(run), *TINY_MODEL, "train.batch_size=2",
                     "train.max_iters=2", "data.num_workers=0", "eval.batch_size=4"])
    assert code == 0, capsys.readouterr().err
    assert load_training_state(run / "last.pth")["step"] == 2
    assert load_model_weights(run / "last.safetensors")[1]["_metadata"]["class_names"] == CLASS_NAMES


def test_input_warnings_are_one_line_naming_the_file(checkpoint, tmp_path, capsys):
    def all_outside(content):
        for annotation in content["annotations"]:
            annotation["bbox"] = [100, 10, 60, 20]  # reaches x=160 in a 128 px wide image

    annotations = write_coco(tmp_path / "coco", images=8, edit=all_outside)
    assert main(["eval", "--weights", str(checkpoint), "--data", str(annotations), "--device", "cpu",
                 "--output", str(tmp_path / "eval")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert lines == [f"warning: {annotations}: 8 box(es) reach more than 1 px outside their image and were clipped "
                     "(first: annotation id 1)"], err
    assert "UserWarning" not in err and "records.py" not in err


def test_input_warnings_past_five_of_a_kind_are_counted_not_listed(capsys):
    from fpndet.cli import InputWarningPrinter
    from fpndet.errors import InputWarning

    printer = InputWarningPrinter(warnings.showwarning)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = printer
        for i in range(8):
            warnings.warn(InputWarning(f"a/{i}.xml", f"{i + 1} box(es) dropped", kind="box(es) dropped"))
        warnings.warn(InputWarning("b.jpg", "unreadable image skipped"))
    printer.summary()
    assert capsys.readouterr().err.splitlines() == [
        *(f"warning: a/{i}.xml: {i + 1} box(es) dropped" for i in range(5)),
        "warning: further warnings of this kind are counted, not shown: box(es) dropped",
        "warning: b.jpg: unreadable image skipped",
        "warning: 8 warnings in all: box(es) dropped",
    ]


@pytest.mark.parametrize("command", ["predict", "eval"])
@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_truncated_checkpoint(command, kind, checkpoint, raccoon_images, tmp_path, capsys):
    if kind == "safetensors":
        truncated = tmp_path / "cut.safetensors"
        truncated.write_bytes(checkpoint.read_bytes()[:100_000])
    else:
        whole = tmp_path / "whole.pth"
        torch.save({"model": load_model_weights(checkpoint)[0]}, whole)
        truncated = tmp_path / "cut.pth"
        truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    args = {
        "predict": ["predict", "--weights", str(truncated), str(raccoon_images), "--output", str(tmp_path / "p")],
        "eval": ["eval", "--weights", str(truncated), "--data", str(write_coco(tmp_path / "coco"))],
    }[command]
    assert_one_error(capsys, command, main(args + ["--device", "cpu"]), str(truncated), "truncated or corrupt")
    assert not (tmp_path / "p").exists()


def test_fpndet_state_dict_as_pth_names_the_file(checkpoint, raccoon_images, tmp_path, capsys):
    """A .pth is read as a torchvision checkpoint; a fpndet state dict there is refused by name."""
    path = tmp_path / "fpndet_weights.pth"
    torch.save(load_model_weights(checkpoint)[0], path)
    code = main(["predict", "--weights", str(path), str(raccoon_images), "--device", "cpu"])
    assert_one_error(capsys, "predict", code, str(path), "not a torchvision")


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_missing_weights(command, raccoon_images, tmp_path, capsys):
    missing = tmp_path / "runs" / "nothing"
    args = {
        "predict": ["predict", "--weights", str(missing), str(raccoon_images)],
        "eval": ["eval", "--weights", str(missing), "--data", "shapes:4"],
    }[command]
    assert_one_error(capsys, command, main(args), str(missing), "no such checkpoint file or run folder")
    (tmp_path / "empty_run").mkdir()
    code = main([*args[:2], str(tmp_path / "empty_run"), *args[3:]])
    assert_one_error(capsys, command, code, str(tmp_path / "empty_run"), "no best.safetensors")


def test_images_glob_matching_nothing(checkpoint, raccoon_images, tmp_path, capsys):
    pattern = str(raccoon_images / "*.png")
    code = main(["predict", "--weights", str(checkpoint), str(raccoon_images / "raccoon-1.jpg"), pattern,
                 "--output", str(tmp_path / "p")])
    assert_one_error(capsys, "predict", code, pattern, "no images found")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------------------------
# predict, eval, train, inspect
# --------------------------------------------------------------------------------------------
def _predict(checkpoint, sources, out, *extra) -> int:
    return main(["predict", "--weights", str(checkpoint), *map(str, sources), "--output", str(out),
                 "--device", "cpu", *extra])


def test_predict_writes_json_and_annotated_jpeg(checkpoint, raccoon_images, tmp_path, capsys):
    low, high = tmp_path / "low", tmp_path / "high"
    assert _predict(checkpoint, [raccoon_images], low, "--score-thresh", "0.0") == 0
    assert "2 images, 200 detections (score >= 0.0, backend fast); written to" in capsys.readouterr().out
    for name, size in (("raccoon-1", (650, 417)), ("raccoon-150", None)):
        record = json.loads((low / f"{name}.json").read_text())
        assert set(record) == {"file", "image", "width", "height", "detections"}
        assert record["file"] == str((raccoon_images / f"{name}.jpg").resolve()) and record["image"] == f"{name}.jpg"
        with Image.open(raccoon_images / f"{name}.jpg") as original:
            assert (record["width"], record["height"]) == original.size
        if size is not None:
            assert (record["width"], record["height"]) == size
        detections = record["detections"]
        # A random model scores every anchor about prior_prob = 0.01 > 0: the 100 kept per image.
        assert len(detections) == 100
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0.0
        for d in detections:
            assert set(d) == {"box", "score", "label", "class_name"}
            assert d["class_name"] == CLASS_NAMES[d["label"]]
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
        with Image.open(low / f"{name}.jpg") as drawn:
            assert drawn.format == "JPEG" and drawn.size == (record["width"], record["height"])

    assert _predict(checkpoint, [raccoon_images / "raccoon-1.jpg"], high, "--score-thresh", "0.99", "--no-draw") == 0
    assert "1 images, 0 detections (score >= 0.99, backend fast); written to" in capsys.readouterr().out
    assert json.loads((high / "raccoon-1.json").read_text())["detections"] == []
    assert not (high / "raccoon-1.jpg").exists()

    assert _predict(checkpoint, [raccoon_images / "*.jpg"], tmp_path / "mid", "--score-thresh", "0.0105",
                    "--batch-size", "1") == 0
    middle = [json.loads(p.read_text())["detections"] for p in sorted((tmp_path / "mid").glob("*.json"))]
    assert len(middle) == 2 and 0 < sum(len(d) for d in middle) < 200, [len(d) for d in middle]
    assert all(x["score"] >= 0.0105 for d in middle for x in d)


def write_photos(root: Path, names: list[str]) -> None:
    rng = np.random.default_rng(1)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / name)


def test_predict_over_a_folder_tree_skips_bad_images_keys_by_path_and_resumes(checkpoint, tmp_path, capsys):
    """Same file names in two folders both survive; a corrupt image is skipped with a warning and
    listed (exit 0, --strict: 2); a combined CSV holds every detection; --resume does only what
    is missing; an --output that would overwrite an input is refused before anything is written."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    write_photos(photos, ["a/img.jpg", "b/img.jpg", "b/c/deep.png", "b/img.png"])
    (photos / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = _predict(checkpoint, [photos], out, "--score-thresh", "0.0105", "--workers", "2")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"warning: {(photos / 'a' / 'bad.jpg').resolve()}: cannot read image" in captured.err
    assert "1 image(s) skipped, unreadable:" in captured.err and "4 images," in captured.out
    done = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert done == ["a/img.json", "b/c/deep.json", "b/img.jpg.json", "b/img.png.json"]  # stems shared in b/ only
    assert (out / "b" / "img.png.jpg").is_file() and (out / "b" / "c" / "deep.jpg").is_file()
    records = {p: json.loads((out / p).read_text()) for p in done}
    assert records["b/img.jpg.json"]["image"] == "b/img.jpg"
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(r["detections"]) for r in records.values()) > 0
    assert {row["image"] for row in rows} <= {"a/img.jpg", "b/img.jpg", "b/img.png", "b/c/deep.png"}

    assert _predict(checkpoint, [photos], out, "--score-thresh", "0.0105", "--strict", "--resume") == 2
    assert "0 images, 0 detections" in capsys.readouterr().out  # all four done before
    (out / "b" / "img.jpg.json").unlink()
    (photos / "a" / "bad.jpg").unlink()
    assert _predict(checkpoint, [photos], out, "--score-thresh", "0.0105", "--resume", "--strict") == 0
    text = capsys.readouterr().out
    assert "1 images," in text and ", 3 done before (--resume)" in text
    with open(out / "predictions.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)

    before = sorted(p.name for p in photos.rglob("*"))
    assert_one_error(capsys, "predict", _predict(checkpoint, [photos], photos), "would write over this input image")
    assert sorted(p.name for p in photos.rglob("*")) == before


def test_predict_takes_odd_image_modes_and_sizes(checkpoint, tmp_path, capsys):
    """16-bit grayscale, CMYK, palette, alpha, 1x1 and 10000x100 images: all predicted, sizes right."""
    photos = tmp_path / "odd"
    photos.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)).save(photos / "gray16.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).convert("CMYK").save(photos / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).convert("P").save(photos / "palette.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 4), dtype=np.uint8), "RGBA").save(photos / "alpha.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(photos / "one.png")
    Image.new("RGB", (100, 10000), (0, 0, 0)).save(photos / "tall.png")
    assert _predict(checkpoint, [photos], tmp_path / "out", "--score-thresh", "0.0", "--workers", "0") == 0
    assert "6 images," in capsys.readouterr().out
    sizes = {p.stem: (json.loads(p.read_text())["width"], json.loads(p.read_text())["height"])
             for p in (tmp_path / "out").glob("*.json")}
    assert sizes == {"gray16": (30, 40), "cmyk": (30, 40), "palette": (30, 40), "alpha": (30, 40), "one": (1, 1),
                     "tall": (100, 10000)}


def test_eval_prints_metrics_and_writes_files(checkpoint, tmp_path, capsys):
    annotations = write_coco(tmp_path / "coco")
    out = tmp_path / "eval"
    code = main(["eval", "--weights", str(checkpoint), "--data", str(annotations), "--output", str(out),
                 "--score-thresh", "0.0", "--batch-size", "3", "--device", "cpu"])
    assert code == 0
    text = capsys.readouterr().out
    assert "COCO bbox metrics" in text and "AP50" in text and "AR100" in text
    assert "cat" in text and "dog" in text
    assert "4 images in" in text and f"results in {out}" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"AP", "AP50", "AP75", "AR100"}
    assert 0.0 <= metrics["metrics"]["AP"] <= metrics["metrics"]["AP50"] <= 1.0
    assert set(metrics["per_class_ap"]) == set(CLASS_NAMES)
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == 4 * 100  # score threshold 0: every image keeps its 100 best
    assert {d["image_id"] for d in detections} == {1, 2, 3, 4}
    assert {d["category_id"] for d in detections} <= {1, 2}
    assert all(len(d["bbox"]) == 4 and d["score"] >= 0 for d in detections)

    code = main(["eval", "--weights", str(checkpoint), "--data", str(annotations), "--output", str(tmp_path / "two"),
                 "--score-thresh", "0.0", "--max-images", "2", "--device", "cpu"])
    assert code == 0 and "2 images in" in capsys.readouterr().out
    assert {d["image_id"] for d in json.loads((tmp_path / "two" / "detections.json").read_text())} == {1, 2}


def test_eval_torchvision_checkpoint_on_coco_writes_its_labels_as_category_ids(coco128_dir, tmp_path, capsys):
    """A torchvision COCO model predicts category ids: label 1 (person) must be written as category
    1, not as the dataset's label 1 (bicycle, category 2); label 84 (book) must not crash."""
    tv = pytest.importorskip("torchvision.models.detection")
    from fpndet.engine.model_io import load_detector

    torch.manual_seed(0)
    weights = tmp_path / "tv.pth"
    reference = tv.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():  # labels 1 (person), 12 (unused id, "N/A"), 84 (book) and 90 (toothbrush) fire
        reference.head.classification_head.cls_logits.bias.view(9, 91)[:, [1, 12, 84, 90]] = 2.0
    torch.save(reference.state_dict(), weights)
    out = tmp_path / "eval"
    code = main(["eval", "--weights", str(weights), "--data", str(coco128_dir / "annotations" / "instances.json"),
                 "--max-images", "1", "--score-thresh", "0.0", "--output", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "detections.json").read_text())
    model, names = load_detector(weights, overrides={"score_thresh": 0.0})
    image, _ = open_dataset(str(coco128_dir / "annotations" / "instances.json"), split="val")[0]
    with torch.no_grad():
        raw = model([image.float() / 255])[0]
    coco_ids = {c["id"] for c in json.loads((coco128_dir / "annotations" / "instances.json").read_text())["categories"]}
    expected = sorted((label, round(score, 5)) for label, score in zip(raw["labels"].tolist(), raw["scores"].tolist())
                      if label in coco_ids)
    assert {label for label, _ in expected} == {1, 84, 90} and 12 in raw["labels"].tolist()
    assert sorted((d["category_id"], d["score"]) for d in written) == expected


def test_eval_refuses_a_model_whose_classes_do_not_cover_the_dataset(checkpoint, raccoon_dir, tmp_path, capsys):
    code = main(["eval", "--weights", str(checkpoint), "--data", str(raccoon_dir), "--output", str(tmp_path / "e"),
                 "--device", "cpu"])
    line = assert_one_error(capsys, "eval", code, str(checkpoint), "cat, dog", "raccoon")
    assert "warning" not in line
    assert not (tmp_path / "e").exists()


def test_train_evaluation_applies_eval_score_thresh(tmp_path, capsys):
    """``eval.score_thresh`` is the post-processor's threshold during the trainer's evaluation."""
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), "train.max_iters=2", *TRAIN_ARGS, "eval.score_thresh=0.0",
                 "model.detections_per_image=7"]) == 0
    capsys.readouterr()
    detections = json.loads((run / "eval" / "detections.json").read_text())
    assert len(detections) == 8 * 7  # threshold 0: every validation image keeps its 7 best
    assert min(d["score"] for d in detections) < 0.05  # below the model's own threshold


TRAIN_ARGS = ["data.shapes_train_images=16", "data.shapes_val_images=8", "train.batch_size=4", "data.num_workers=0",
              "model.min_size=[128]", "model.max_size=128", "data.shapes_image_size=128", "eval.batch_size=8"]


def test_train_end_to_end_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), "train.max_iters=4", *TRAIN_ARGS]) == 0
    text = capsys.readouterr().out
    assert "COCO bbox metrics" in text and f"run folder {run}" in text
    for name in ("config.yaml", "last.pth", "last.safetensors", "best.safetensors", "metrics.jsonl", "curves.png",
                 "eval/metrics.json", "predictions/grid.png"):
        assert (run / name).is_file(), name
    assert "max_iters: 4" in (run / "config.yaml").read_text()
    assert load_training_state(run / "last.pth")["step"] == 4
    _, config = load_model_weights(run / "best.safetensors")
    assert config["num_classes"] == 4 and config["min_size"] == [128]
    assert config["_metadata"]["class_names"] == ["circle", "square", "triangle", "cross"]
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first if "loss" in r] == [4] and [r["step"] for r in first if "AP" in r] == [4]
    with Image.open(run / "predictions" / "grid.png") as grid:
        assert grid.format == "PNG" and grid.size == (4 * 128, 2 * 128)

    assert main(["train", "--output", str(run), "--resume", "train.max_iters=6", *TRAIN_ARGS]) == 0
    assert f"resumed from {run / 'last.pth'} at step 4" in capsys.readouterr().out
    assert load_training_state(run / "last.pth")["step"] == 6
    assert load_model_weights(run / "last.safetensors")[1]["_metadata"]["step"] == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[: len(first)] == first  # the first run's lines are kept, not rewritten
    assert [r["step"] for r in records if "loss" in r] == [4, 6]
    assert [r["step"] for r in records if "AP" in r] == [4, 6]


def test_inspect_raccoon(raccoon_dir, tmp_path, capsys):
    out = tmp_path / "inspect"
    code = main(["inspect", "--data", str(raccoon_dir), "--output", str(out), "--samples", "2",
                 "model.min_size=[416]", "model.max_size=640"])
    assert code == 0
    text = capsys.readouterr().out
    summary = json.loads(text[: text.rindex("}") + 1])
    assert summary["images"] == 160 and summary["classes"] == {"raccoon": summary["boxes"]}
    assert summary["coverage"] > 0.9
    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == summary
    assert report["model"]["min_size"] == [416] and report["model"]["anchor_sizes"] == [32, 64, 128, 256, 512]
    for name in ("box_sizes.png", "samples.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    assert f"report and figures in {out}/" in text


def test_every_command_runs_a_faster_rcnn_and_an_rpn(tmp_path, capsys):
    """train / eval / predict / inspect with model.arch=faster_rcnn and rpn: the run folder rebuilds
    the architecture, and an RPN is evaluated by class-agnostic proposal recall."""
    annotations = write_coco(tmp_path / "coco")
    for arch in ("faster_rcnn", "rpn"):
        run = tmp_path / f"run_{arch}"
        overrides = ["model.preset=faster_rcnn_r50_fpn", f"model.arch={arch}", "model.backbone=resnet18",
                     "model.min_size=[96]", "model.max_size=128", "model.fpn_channels=16",
                     "model.roi_heads.fc_dim=32", f"train.output_dir={run}", "train.epochs=null", "train.max_iters=2",
                     "train.batch_size=2", "train.device=cpu", "data.num_workers=0", "train.warmup_iters=1"]
        assert main(["train", "--data", str(annotations), *overrides]) == 0, arch
        metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
        assert ("AR1000" in metrics) == (arch == "rpn") and ("AP" in metrics) == (arch != "rpn")
        out = tmp_path / f"eval_{arch}"
        assert main(["eval", "--weights", str(run), "--data", str(annotations), "--output", str(out),
                     "--device", "cpu"]) == 0
        text = capsys.readouterr().out
        assert ("RPN proposal recall" in text) == (arch == "rpn")
        assert main(["predict", "--weights", str(run), str(annotations.parent.parent / "images"),
                     "--output", str(tmp_path / f"pred_{arch}"), "--score-thresh", "0.0", "--device", "cpu"]) == 0
        assert list((tmp_path / f"pred_{arch}").glob("*.json"))
    assert main(["inspect", "--data", str(annotations), "--output", str(tmp_path / "inspect"),
                 "model.preset=faster_rcnn_r50_fpn", "model.min_size=[96]", "model.max_size=128"]) == 0
    report = json.loads((tmp_path / "inspect" / "report.json").read_text())
    assert set(report["summary"]["roi_levels"]) == {"P2", "P3", "P4", "P5"}


def test_fast_rcnn_on_proposals_written_by_a_trained_rpn(tmp_path, capsys):
    """The FPN paper's Table 2 setting through the CLI: train an RPN, write its proposals with
    `fpndet proposals`, train and evaluate a Fast R-CNN on them; misuse is one message, exit 2."""
    annotations = write_coco(tmp_path / "coco")
    small = ["model.preset=faster_rcnn_r50_fpn", "model.backbone=resnet18", "model.min_size=[96]",
             "model.max_size=128", "model.fpn_channels=16", "model.roi_heads.fc_dim=32", "train.epochs=null",
             "train.max_iters=2", "train.batch_size=2", "train.device=cpu", "data.num_workers=0", "train.warmup_iters=1"]
    rpn_run, fast_run, proposals = tmp_path / "rpn", tmp_path / "fast", tmp_path / "proposals.safetensors"
    assert main(["train", "--data", str(annotations), *small, "model.arch=rpn", f"train.output_dir={rpn_run}"]) == 0
    capsys.readouterr()
    assert main(["proposals", "--weights", str(rpn_run), "--data", str(annotations), "--output", str(proposals),
                 "--topk", "50", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "recall of the written proposals" in text and f"written to {proposals}" in text
    from fpndet.engine.proposals import ProposalFile

    written = ProposalFile(proposals)
    assert len(written) == 4 and all(0 < len(written.get(i)) <= 50 for i in range(1, 5))
    few = tmp_path / "few.safetensors"  # --pre-topk 4: at most 4 anchors per level (P2-P6) reach NMS
    assert main(["proposals", "--weights", str(rpn_run), "--data", str(annotations), "--output", str(few),
                 "--topk", "50", "--pre-topk", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert all(0 < len(ProposalFile(few).get(i)) <= 4 * 5 for i in range(1, 5))
    assert max(len(written.get(i)) for i in range(1, 5)) > 4 * 5
    assert main(["train", "--data", str(annotations), *small, "model.arch=fast_rcnn", f"train.output_dir={fast_run}",
                 f"data.train_proposals={proposals}", f"data.val_proposals={proposals}"]) == 0
    assert "AP" in json.loads((fast_run / "eval" / "metrics.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["eval", "--weights", str(fast_run), "--data", str(annotations), "--proposals", str(proposals),
                 "--output", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert "AP50" in capsys.readouterr().out
    assert_one_error(capsys, "eval", main(["eval", "--weights", str(fast_run), "--data", str(annotations)]),
                     str(fast_run), "give --proposals FILE")
    assert_one_error(capsys, "predict", main(["predict", "--weights", str(fast_run), str(annotations.parent.parent / "images"),
                                              "--output", str(tmp_path / "pred")]), "fpndet eval --proposals")
    other = write_coco(tmp_path / "other", images=6)
    assert_one_error(capsys, "eval", main(["eval", "--weights", str(fast_run), "--data", str(other),
                                           "--proposals", str(proposals)]), str(proposals), "does not match the dataset")
    assert_one_error(capsys, "eval", main(["eval", "--weights", str(rpn_run), "--data", str(annotations),
                                           "--proposals", str(proposals)]), str(proposals), "for model.arch=fast_rcnn")
