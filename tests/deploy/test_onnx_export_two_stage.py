"""ONNX export of the two-stage detectors (Faster R-CNN, a proposals-only RPN): onnxruntime /
OpenVINO against eager PyTorch on real images (coco128, raccoon) at three sizes and batches 1, 2,
4 and a mixed batch; no detection above the threshold; `fpndet eval` of the export; refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fpndet.cli import main  # noqa: E402
from fpndet.deploy.export import export_onnx  # noqa: E402
from fpndet.deploy.faster_rcnn_graph import strict_threshold  # noqa: E402
from fpndet.deploy.graph import pad_batch  # noqa: E402
from fpndet.deploy.runtime import OnnxDetector  # noqa: E402
from fpndet.engine.checkpoints import save_model_weights  # noqa: E402
from fpndet.errors import InputError  # noqa: E402
from fpndet.modeling.build import build_model  # noqa: E402
from fpndet.modeling.config import named_config  # noqa: E402
from tests.deploy.test_onnx_export import SIZES, assert_export_equals_eager, real_images  # noqa: E402

CLASSES = ["a", "b", "c", "d"]


def two_stage_model(arch: str = "faster_rcnn", score_thresh: float = 0.5) -> torch.nn.Module:
    """A small ResNet-18 Faster R-CNN (or RPN) whose RPN proposes varied boxes on real photos and
    whose detection scores spread around the 0.5 threshold (0 to about 150 per image, none tied;
    at most 300 kept, so that near-equal scores never compete for the last place)."""
    torch.manual_seed(0)
    config = named_config("faster_rcnn_r50_fpn", arch=arch, num_classes=len(CLASSES), backbone="resnet18",
                          fpn_channels=32, min_size=[320], max_size=480, score_thresh=score_thresh,
                          detections_per_image=300)
    model = build_model(config).eval()
    with torch.no_grad():
        model.rpn.head.objectness.weight.mul_(30)
        model.rpn.head.deltas.weight.mul_(10)
        if model.roi_heads is not None:
            model.roi_heads.predictor.cls_score.weight.mul_(5)
            model.roi_heads.predictor.bbox_pred.weight.mul_(30)
    return model


def save_run(folder, model):
    save_model_weights(folder / "best.safetensors", model.state_dict(), config=model.config.to_dict(),
                       metadata={"class_names": CLASSES})
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with the Faster R-CNN, exported through the CLI to model.onnx."""
    folder = save_run(tmp_path_factory.mktemp("frcnn"), two_stage_model())
    assert main(["export", "--weights", str(folder)]) == 0
    return folder


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("size", [*SIZES, "mixed"])
def test_faster_rcnn_export_gives_the_eager_detections(run, size, batch, backend):
    assert_export_equals_eager(run, size, batch, backend)


def test_faster_rcnn_graph_outputs_are_fixed_rank_and_padded(run):
    meta = {p.key: p.value for p in __import__("onnx").load(str(run / "model.onnx")).metadata_props}
    assert meta["arch"] == "faster_rcnn" and meta["score_thresh"] == "0.5" and meta["detections_per_image"] == "300"
    images = real_images("raccoon_portrait", 3)
    batch, sizes = pad_batch(images, min_size=320, max_size=480)
    boxes, scores, labels, counts = ort.InferenceSession(str(run / "model.onnx")).run(
        None, {"images": batch.numpy(), "image_sizes": sizes.numpy()})
    assert boxes.shape == (3, 300, 4) and scores.shape == (3, 300) and labels.shape == (3, 300)
    assert counts.max() > 0
    for i, count in enumerate(counts):
        assert (labels[i, count:] == -1).all() and (scores[i, count:] == 0).all() and (boxes[i, count:] == 0).all()
        assert (np.diff(scores[i, :count]) <= 0).all() and (scores[i, :count] > 0.5).all()


def test_rpn_export_gives_the_eager_proposals(tmp_path):
    """Proposals of a proposals-only model: the same set (1000 per image, matched box to box, as
    saturated objectness scores tie and tied proposals may come in another order)."""
    model = two_stage_model("rpn")
    path = export_onnx(model, tmp_path / "rpn.onnx", class_names=["object"])
    images = real_images("coco_landscape", 1) + real_images("raccoon_portrait", 1)
    with torch.no_grad():
        reference = model(images)
    found = OnnxDetector(path)(images)
    for ref, out in zip(reference, found):
        assert len(ref["boxes"]) == len(out["boxes"]) == 1000
        assert (out["labels"] == 0).all()
        distance = (ref["boxes"][:, None, :] - out["boxes"][None, :, :]).abs().amax(-1)
        distance += 1e3 * ((ref["scores"][:, None] - out["scores"][None, :]).abs() > 1e-4)
        matched = distance <= 0.5
        assert matched.any(1).all() and matched.any(0).all()
        assert torch.allclose(ref["scores"], out["scores"], atol=1e-4)  # both by decreasing objectness


def test_export_detections_option_caps_an_rpn_proposals(tmp_path):
    """`fpndet export --detections K` of a proposals-only model keeps K proposals per image (its
    RPN's post-NMS count at test time), the best K of the 1000 it keeps by default."""
    run = save_run(tmp_path, two_stage_model("rpn"))
    path = tmp_path / "rpn50.onnx"
    assert main(["export", "--weights", str(run), "--output", str(path), "--detections", "50"]) == 0
    meta = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    assert meta["detections_per_image"] == "50"
    images = real_images("coco_landscape", 1)
    found = OnnxDetector(path)(images)[0]
    with torch.no_grad():
        full = two_stage_model("rpn")(images)[0]
    assert len(found["boxes"]) == 50 and len(full["boxes"]) == 1000
    assert torch.allclose(found["scores"], full["scores"][:50], atol=1e-4)


def test_no_detection_above_the_threshold_and_export_options(run, tmp_path):
    path = tmp_path / "none.onnx"
    assert main(["export", "--weights", str(run), "--output", str(path), "--score-thresh", "0.9999",
                 "--detections", "7", "--input-dtype", "uint8"]) == 0
    session = ort.InferenceSession(str(path))
    images = real_images("coco_landscape", 2)
    batch, sizes = pad_batch(images, min_size=320, max_size=480)
    uint8 = np.clip(np.rint(batch.numpy() * 255), 0, 255).astype(np.uint8)
    boxes, scores, labels, counts = session.run(None, {"images": uint8, "image_sizes": sizes.numpy()})
    assert boxes.shape == (2, 7, 4) and counts.tolist() == [0, 0] and (labels == -1).all()
    assert [len(d["boxes"]) for d in OnnxDetector(path)(images)] == [0, 0]


def test_eval_of_the_export_equals_eval_of_the_weights(tmp_path):
    """The same metrics through `fpndet eval` (shapes data; the model's classes named as its)."""
    from fpndet.data.formats.shapes import SHAPE_CLASSES

    model = two_stage_model(score_thresh=0.05)
    names = list(SHAPE_CLASSES) + CLASSES[len(SHAPE_CLASSES):]
    folder = tmp_path / "shapes_run"
    save_model_weights(folder / "best.safetensors", model.state_dict(), config=model.config.to_dict(),
                       metadata={"class_names": names})
    export_onnx(model, folder / "model.onnx", class_names=names)
    metrics = {}
    for name, weights in (("eager", folder), ("onnx", folder / "model.onnx")):
        assert main(["eval", "--weights", str(weights), "--data", "shapes", "--max-images", "6",
                     "--output", str(tmp_path / name), "--no-diagnostics"]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]
    assert metrics["eager"]
    for key, value in metrics["eager"].items():
        assert abs(value - metrics["onnx"][key]) <= 0.002, key


def test_what_cannot_be_exported_is_refused(tmp_path):
    fast = build_model(named_config("faster_rcnn_r50_fpn", arch="fast_rcnn", num_classes=2, backbone="resnet18",
                                    fpn_channels=32, min_size=[320], max_size=480)).eval()
    with pytest.raises(InputError, match="Fast R-CNN model runs on given proposals"):
        export_onnx(fast, tmp_path / "fast.onnx", class_names=["a", "b"])
    model = two_stage_model()
    with pytest.raises(InputError, match="--raw exports RetinaNet head outputs"):
        export_onnx(model, tmp_path / "raw.onnx", class_names=CLASSES, raw=True)
    assert not list(tmp_path.glob("*.onnx"))


def test_strict_threshold_turns_at_least_into_greater_than():
    scores = torch.tensor([0.0, 1e-30, 0.25, np.nextafter(np.float32(0.25), np.float32(1)), 0.2499999], dtype=torch.float32)
    for at_least in (0.0, 0.25):
        assert torch.equal(scores > strict_threshold(at_least), scores >= at_least)
