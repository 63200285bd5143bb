"""ONNX export of RetinaNet: onnxruntime / OpenVINO against eager PyTorch on real images (coco128,
raccoon) at three sizes and batches 1, 2, 4; an image with no detection; raw and uint8 exports;
the CLI (export, predict, eval on the .onnx); bad files refused with one message."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fpndet.cli import main  # noqa: E402
from fpndet.data.images import load_image  # noqa: E402
from fpndet.deploy.benchmark import compare  # noqa: E402
from fpndet.deploy.export import export_onnx  # noqa: E402
from fpndet.deploy.graph import pad_batch  # noqa: E402
from fpndet.deploy.runtime import OnnxDetector  # noqa: E402
from fpndet.engine.checkpoints import save_model_weights  # noqa: E402
from fpndet.engine.model_io import load_detector  # noqa: E402
from fpndet.errors import InputError  # noqa: E402
from fpndet.modeling.build import build_model  # noqa: E402
from fpndet.modeling.config import ModelConfig  # noqa: E402
from tests.conftest import COCO128, RACCOON  # noqa: E402

CLASSES = ["a", "b", "c", "d", "e"]
# (name, folder, files, crop (h, w)): a landscape, a portrait and a very wide image size
SIZES = {
    "coco_landscape": (COCO128 / "images", ["000000000009.jpg", "000000000042.jpg", "000000000061.jpg", "000000000064.jpg"], (426, 480)),
    "raccoon_portrait": (RACCOON / "JPEGImages", ["raccoon-103.jpg", "raccoon-105.jpg", "raccoon-111.jpg", "raccoon-115.jpg"], (600, 420)),
    "coco_wide": (COCO128 / "images", ["000000000025.jpg", "000000000030.jpg", "000000000034.jpg", "000000000071.jpg"], (120, 640)),
}


def tiny_model(head_norm: str | None = None, **changes) -> torch.nn.Module:
    """A small ResNet-18 RetinaNet whose scores spread around the threshold on real photos."""
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(CLASSES), backbone="resnet18", fpn_channels=32, min_size=[320], max_size=480,
                         retinanet={"head_channels": 32, "head_depth": 1, "head_norm": head_norm}, **changes)
    model = build_model(config).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-2.5)
        model.head.cls_logits.weight.mul_(20)
        model.head.box_deltas.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with the tiny model, exported through the CLI to model.onnx."""
    folder = tmp_path_factory.mktemp("run")
    model = tiny_model()
    save_model_weights(folder / "best.safetensors", model.state_dict(), config=model.config.to_dict(),
                       metadata={"class_names": CLASSES})
    assert main(["export", "--weights", str(folder)]) == 0
    return folder


def real_images(name: str, count: int) -> list[torch.Tensor]:
    folder, files, (height, width) = SIZES[name]
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    return [load_image(folder / f)[:, :height, :width].float().div(255) for f in files[:count]]


def parity_images(size: str, batch: int) -> list[torch.Tensor]:
    """``batch`` real images of one of SIZES, or "mixed": a landscape, a portrait, a wide and a
    landscape image padded into one batch."""
    if size == "mixed":
        return ([real_images(name, 2)[-1] for name in SIZES] + real_images("coco_landscape", 1))[:batch]
    return real_images(size, batch)


def assert_export_equals_eager(run, size: str, batch: int, backend: str) -> None:
    """The run's model.onnx on ``backend`` gives the eager model's detections (some found)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    model, _ = load_detector(run)
    images = parity_images(size, batch)
    with torch.no_grad():
        reference = model(images)
    assert sum(len(r["boxes"]) for r in reference) > 0
    assert_same(reference, OnnxDetector(run / "model.onnx", backend=backend)(images))


def assert_same(reference, found):
    """Same detections per image: counts, and one to one (near-tied scores may swap places) the
    labels, boxes within 0.5 px and scores within 1e-4."""
    assert len(reference) == len(found)
    check = compare(reference, found, box_tol=0.5, score_tol=1e-4)
    assert check["equal"], check


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("size", [*SIZES, "mixed"])
def test_export_gives_the_eager_detections(run, size, batch, backend):
    assert_export_equals_eager(run, size, batch, backend)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_group_norm_heads_export(tmp_path, backend):
    """GroupNorm heads whose statistics leave out the batch padding (``head_norm: group_masked``,
    the shapes config): the graph builds each image's masks from ``image_sizes`` as
    eager does from the batch; a mixed batch of four, whose images pad each other."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    model = tiny_model(head_norm="group_masked")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.head.modules())
    path = export_onnx(model, tmp_path / "group_norm.onnx", class_names=CLASSES)
    images = parity_images("mixed", 4)
    assert len({tuple(image.shape[-2:]) for image in images}) > 1
    with torch.no_grad():
        reference = model(images)
    assert sum(len(r["boxes"]) for r in reference) > 0
    assert_same(reference, OnnxDetector(path, backend=backend)(images))


def test_size_divisible_reaches_the_export(tmp_path):
    """``model.size_divisible=128``: the runner pads each batch as the eager model does (to 128,
    not 32), so the export gives the eager detections; those differ from the same model's at 32,
    so padding to 32 would have been caught. A size_divisible the graph cannot pad to is refused."""
    model = tiny_model(size_divisible=128)
    path = export_onnx(model, tmp_path / "div128.onnx", class_names=CLASSES)
    images = parity_images("mixed", 4)
    batch, _ = pad_batch(images, min_size=320, max_size=480, size_divisible=128)
    assert batch.shape[-2] % 128 == 0 and batch.shape[-1] % 128 == 0
    with torch.no_grad():
        reference = model(images)
        at_32 = tiny_model()(images)
    assert sum(len(r["boxes"]) for r in reference) > 0
    assert not compare(reference, at_32, box_tol=0.5, score_tol=1e-4)["equal"]
    assert_same(reference, OnnxDetector(path)(images))
    with pytest.raises(InputError, match="size_divisible=16"):
        export_onnx(tiny_model(size_divisible=16), tmp_path / "div16.onnx", class_names=CLASSES)


def test_graph_batches_in_one_call_with_fixed_rank_outputs(run):
    session = ort.InferenceSession(str(run / "model.onnx"))
    images = real_images("coco_landscape", 4)
    batch, sizes = pad_batch(images, min_size=320, max_size=480)
    assert batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
    boxes, scores, labels, counts = session.run(None, {"images": batch.numpy(), "image_sizes": sizes.numpy()})
    assert boxes.shape == (4, 100, 4) and scores.shape == (4, 100) and labels.shape == (4, 100) and counts.shape == (4,)
    for i, count in enumerate(counts):  # padding after the detections
        assert (labels[i, count:] == -1).all() and (scores[i, count:] == 0).all() and (boxes[i, count:] == 0).all()
        assert (np.diff(scores[i, :count]) <= 0).all()


def test_no_detection_above_the_threshold(tmp_path):
    model = tiny_model()
    model.postprocessor.score_thresh = 0.9999
    path = export_onnx(model, tmp_path / "none.onnx", class_names=CLASSES, input_dtype="uint8")
    images = real_images("coco_landscape", 2)
    with torch.no_grad():
        assert all(len(r["boxes"]) == 0 for r in model(images))
    found = OnnxDetector(path)(images)
    assert [tuple(f["boxes"].shape) for f in found] == [(0, 4), (0, 4)]
    session = ort.InferenceSession(str(path))
    sizes = np.array([[320, 416], [300, 400], [64, 64]], dtype=np.int64)
    counts = session.run(None, {"images": np.zeros((3, 3, 320, 416), dtype=np.uint8), "image_sizes": sizes})[3]
    assert counts.tolist() == [0, 0, 0]
    meta = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    assert meta["input_dtype"] == "uint8" and json.loads(meta["class_names"]) == CLASSES and meta["score_thresh"] == "0.9999"


def test_raw_export_gives_head_outputs(tmp_path):
    model = tiny_model()
    path = export_onnx(model, tmp_path / "raw.onnx", class_names=CLASSES, raw=True)
    images = real_images("coco_wide", 1) + real_images("raccoon_portrait", 1)
    batch, sizes = pad_batch(images, min_size=320, max_size=480)
    cls_logits, box_deltas, anchors = ort.InferenceSession(str(path)).run(
        None, {"images": batch.numpy(), "image_sizes": sizes.numpy()})
    with torch.no_grad():
        expected = model.head_outputs(model.preprocessor(images).tensor)
    assert np.abs(cls_logits - expected.cls_logits.numpy()).max() < 1e-3
    assert np.abs(box_deltas - expected.box_deltas.numpy()).max() < 1e-3
    assert np.array_equal(anchors, expected.anchors.numpy())
    with pytest.raises(InputError, match="--raw"):
        OnnxDetector(path)


def test_predict_and_eval_run_the_onnx_file(run, coco128_dir, tmp_path):
    images = sorted((coco128_dir / "images").glob("*.jpg"))[:3]
    assert main(["predict", "--weights", str(run / "model.onnx"), *map(str, images), "--output", str(tmp_path / "p"),
                 "--no-draw", "--score-thresh", "0.2", "--workers", "0"]) == 0
    onnx_json = json.loads((tmp_path / "p" / f"{images[0].stem}.json").read_text())
    assert main(["predict", "--weights", str(run), *map(str, images), "--output", str(tmp_path / "e"),
                 "--no-draw", "--score-thresh", "0.2", "--workers", "0", "--backend", "eager"]) == 0
    eager_json = json.loads((tmp_path / "e" / f"{images[0].stem}.json").read_text())
    assert [d["class_name"] for d in onnx_json["detections"]] == [d["class_name"] for d in eager_json["detections"]]
    assert len(onnx_json["detections"]) > 0


def test_eval_of_the_export_equals_eval_of_the_weights(run, tmp_path):
    """The same metrics through `fpndet eval` (shapes data, whose classes the tiny model's names match)."""
    run_shapes = tmp_path / "shapes_run"
    model = tiny_model()
    from fpndet.data.formats.shapes import SHAPE_CLASSES

    names = list(SHAPE_CLASSES) + CLASSES[len(SHAPE_CLASSES):]
    save_model_weights(run_shapes / "best.safetensors", model.state_dict(), config=model.config.to_dict(),
                       metadata={"class_names": names})
    export_onnx(model, run_shapes / "model.onnx", class_names=names)
    metrics = {}
    for name, weights in (("eager", run_shapes), ("onnx", run_shapes / "model.onnx")):
        assert main(["eval", "--weights", str(weights), "--data", "shapes", "--max-images", "6",
                     "--output", str(tmp_path / name)]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]
    for key, value in metrics["eager"].items():
        assert abs(value - metrics["onnx"][key]) <= 0.002, key


def test_bad_onnx_files_get_one_message(run, coco128_dir, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((run / "model.onnx").read_bytes()[:5000])
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, "H", "W"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 3, "H", "W"])])
    onnx.save(helper.make_model(graph), foreign)
    nhwc = tmp_path / "nhwc.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", "H", "W", 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "H", "W", 3])])
    model = helper.make_model(graph)
    for key, value in {"fpndet_format": "1", "outputs": "detections"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, nhwc)
    cases = {tmp_path / "missing.onnx": "no such", truncated: "not a readable ONNX file", foreign: "no fpndet metadata",
             nhwc: "image_sizes \\[B, 2\\]"}
    for path, message in cases.items():
        with pytest.raises(InputError, match=message):
            OnnxDetector(path)
        image = coco128_dir / "images" / "000000000009.jpg"
        assert main(["predict", "--weights", str(path), str(image), "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--weights", str(run / "model.onnx"), "--data", "shapes", "--backend", "eager"]) == 2
    assert "runs on onnxruntime" in capsys.readouterr().err
    with pytest.raises(InputError, match="exported with score threshold"):
        OnnxDetector(run / "model.onnx").postprocessor.score_thresh = 0.01


def test_export_options_set_the_graph_threshold_and_k(run, tmp_path):
    path = tmp_path / "k7.onnx"
    assert main(["export", "--weights", str(run), "--output", str(path), "--score-thresh", "0.3",
                 "--detections", "7"]) == 0
    images = real_images("coco_landscape", 2)
    batch, sizes = pad_batch(images, min_size=320, max_size=480)
    boxes, scores, labels, counts = ort.InferenceSession(str(path)).run(
        None, {"images": batch.numpy(), "image_sizes": sizes.numpy()})
    assert boxes.shape == (2, 7, 4) and counts.max() <= 7
    assert all((scores[i, :n] > 0.3).all() for i, n in enumerate(counts))
    model, _ = load_detector(run, overrides={"score_thresh": 0.3, "detections_per_image": 7})
    with torch.no_grad():
        assert_same(model(images), OnnxDetector(path)(images))
    assert OnnxDetector(path).postprocessor.score_thresh == 0.3


def test_fixed_input_size_export(run, tmp_path, capsys):
    """`--input-size max`: the image axes fixed to a square of max_size (batch still dynamic);
    every batch is padded to that canvas, where the graph gives PyTorch's detections; an image
    that does not fit and a bad size are refused with one message."""
    from fpndet.deploy.graph import RetinaNetGraph

    path = tmp_path / "fixed.onnx"
    assert main(["export", "--weights", str(run), "--output", str(path), "--input-size", "max"]) == 0
    proto = __import__("onnx").load(str(path))
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 480, 480] and isinstance(dims[0], str)
    assert json.loads({p.key: p.value for p in proto.metadata_props}["input_size"]) == [480, 480]
    model, _ = load_detector(run)
    for images in (real_images("raccoon_portrait", 1), real_images("coco_wide", 2) + real_images("coco_landscape", 1)):
        batch, sizes = pad_batch(images, min_size=320, max_size=480, canvas=(480, 480))
        assert batch.shape[-2:] == (480, 480)
        with torch.no_grad():
            boxes, scores, labels, counts = RetinaNetGraph(model=model).eval()(batch, sizes)
        found = OnnxDetector(path)(images)
        reference = []
        for i, image in enumerate(images):
            n = int(counts[i])
            scale = torch.tensor([image.shape[-1] / sizes[i, 1], image.shape[-2] / sizes[i, 0]]).float().repeat(2)
            reference.append({"boxes": boxes[i, :n] * scale, "scores": scores[i, :n], "labels": labels[i, :n]})
        assert sum(len(r["boxes"]) for r in reference) > 0
        assert_same(reference, found)
    small = tmp_path / "small.onnx"
    export_onnx(model, small, class_names=CLASSES, input_size=(320, 320))
    with pytest.raises(InputError, match="fixed input size"):
        OnnxDetector(small)(real_images("coco_wide", 1))
    with pytest.raises(InputError, match="multiples of 32"):
        export_onnx(model, tmp_path / "bad.onnx", class_names=CLASSES, input_size=(330, 320))
    assert main(["export", "--weights", str(run), "--output", str(tmp_path / "bad.onnx"), "--input-size", "big"]) == 2
    assert "--input-size must be HxW" in capsys.readouterr().err


def test_export_check_compares_real_detections(run):
    """The check of `fpndet export --check --images FOLDER` says how many detections it compared;
    the check of an export against another model fails (the CLI then exits with status 1)."""
    from fpndet.deploy.benchmark import check_export

    folder = COCO128 / "images"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    path = run / "model.onnx"
    line, equal = check_export(load_detector(run)[0], path, image_folder=str(folder))
    compared = int(line.split(" detections)")[0].rsplit(", ", 1)[1])
    assert equal and compared > 0 and "): equal" in line
    other = tiny_model()
    with torch.no_grad():
        other.head.cls_logits.bias.add_(0.5)
    text, equal = check_export(other, path, image_folder=str(folder))
    assert not equal and "NOT EQUAL" in text
