"""Reading weights for fine-tuning and opening detectors from run folders or files."""
from __future__ import annotations

import pytest
import torch

from fpndet.engine.checkpoints import save_model_weights
from fpndet.engine.model_io import load_detector, read_weights
from fpndet.errors import InputError
from fpndet.modeling.build import build_model
from fpndet.modeling.config import ModelConfig
from fpndet.modeling.weights import load_matching_weights


def tiny_config(num_classes: int = 2) -> ModelConfig:
    return ModelConfig(num_classes=num_classes, backbone="resnet18", fpn_channels=32, min_size=[96], max_size=128,
                       retinanet={"head_channels": 32, "head_depth": 1})


def test_run_folder_and_safetensors_give_the_saved_weights(tmp_path):
    config = tiny_config()
    model = build_model(config)
    save_model_weights(tmp_path / "best.safetensors", model.state_dict(), config=config.to_dict(),
                       metadata={"class_names": ["a", "b"]})
    for source in (tmp_path, tmp_path / "best.safetensors"):
        state = read_weights(source)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    detector, names = load_detector(tmp_path)
    assert names == ["a", "b"] and not detector.training
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(InputError, match="no best.safetensors"):
        read_weights(tmp_path / "empty_run")


def test_torchvision_pth_is_renamed_for_fine_tuning(tmp_path):
    tv = pytest.importorskip("torchvision.models.detection")
    reference = tv.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    state = read_weights(path)
    assert "backbone.layer1.0.conv1.weight" in state and "fpn.extra_convs.1.weight" in state
    model = build_model(ModelConfig(num_classes=3, p6_input="p5"))
    report = load_matching_weights(model, state)
    assert sorted(report.skipped) == ["head.cls_logits.bias", "head.cls_logits.weight"]
    assert not report.missing and not report.unexpected
    assert torch.equal(model.head.box_deltas.weight, reference.head.regression_head.bbox_reg.weight)


def test_torchvision_coco_checkpoint_is_named_with_the_coco_categories(tmp_path):
    """91 logits = torchvision's COCO labels (category ids): named as torchvision's weights meta."""
    tv = pytest.importorskip("torchvision.models.detection")
    path = tmp_path / "tv.pth"
    torch.save(tv.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), path)
    _, names = load_detector(path)
    assert names == tv.RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert names[1] == "person" and names[90] == "toothbrush" and names[12] == "N/A"


def test_checkpoint_without_class_names_is_unnamed_on_request(tmp_path):
    config = tiny_config(3)
    save_model_weights(tmp_path / "m.safetensors", build_model(config).state_dict(), config=config.to_dict())
    assert load_detector(tmp_path / "m.safetensors")[1] == ["0", "1", "2"]  # for display
    assert load_detector(tmp_path / "m.safetensors", named_only=True)[1] is None
