"""Opening a trained detector from a run folder, a fpndet checkpoint or a torchvision one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError
from ..modeling.build import build_model
from ..modeling.config import RetinaNetConfig
from ..modeling.retinanet import RetinaNet
from . import checkpoints as ckpt


def weights_file(path: str | Path) -> Path:
    """A run folder resolves to its ``best.safetensors`` (else ``last.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).exists():
                return path / name
        raise InputError(path, "no best.safetensors or last.safetensors in this run folder")
    if not path.exists():
        raise InputError(path, "no such checkpoint file or run folder")
    return path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights under fpndet's module names, for initialising or fine-tuning a model: from a run
    folder, a fpndet ``.safetensors``, a torchvision RetinaNet ``.pth`` (renamed with
    :func:`~fpndet.modeling.torchvision_compat.convert_torchvision_state_dict`) or any other state
    dict file (taken as is). Raises :class:`InputError` naming an unreadable file."""
    file = weights_file(path)
    if file.suffix == ".safetensors":
        return ckpt.load_model_weights(file)[0]
    state = ckpt.load_state_dict_file(file)
    if any(key.startswith("backbone.body.") for key in state):
        from ..modeling.torchvision_compat import convert_torchvision_state_dict

        state = convert_torchvision_state_dict(state)
    return state


def load_detector(path: str | Path, *, device: str | torch.device = "cpu",
                  overrides: Optional[dict] = None) -> tuple[RetinaNet, list[str]]:
    """The model stored at ``path`` in eval mode, and its class names.

    ``path``: a run folder, a ``.safetensors`` written by fpndet (weights + model config), or a
    torchvision RetinaNet ``.pth`` (v1 or v2, told apart by its GroupNorm head), converted with
    :func:`fpndet.from_torchvision` (class names are then COCO category ids as strings).
    ``overrides``: model-config fields to change (e.g. ``score_thresh``).
    Raises :class:`InputError` naming the file when it is not a usable checkpoint.
    """
    file = weights_file(path)
    if file.suffix == ".safetensors":
        state, config = ckpt.load_model_weights(file)
        meta = config.pop("_metadata", None) or {}
        if not config:
            raise InputError(file, "has no fpndet model config in its metadata")
        try:
            model_cfg = RetinaNetConfig.from_dict(config)
        except (TypeError, ValueError) as err:
            raise InputError(file, f"bad model config: {err}") from None
        model = build_model(model_cfg.replace(backbone_weights=None))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(file, f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        class_names = list(meta.get("class_names") or [str(i) for i in range(model_cfg.num_classes)])
    else:
        from ..modeling.torchvision_compat import from_torchvision

        state = ckpt.load_state_dict_file(file)
        arch = "retinanet_resnet50_fpn_v2" if any(".conv.0.1.weight" in k for k in state) else "retinanet_resnet50_fpn"
        try:
            model = from_torchvision(state, arch=arch)
        except InputError as err:  # it was given a state dict, so its message names no file
            raise InputError(file, f"{err.problem}; for a fpndet run use its folder or a .safetensors file") from None
        class_names = [str(i) for i in range(model.config.num_classes)]
    if overrides:
        apply_inference_overrides(model, **overrides)
    return model.to(device).eval(), class_names


def apply_inference_overrides(model: RetinaNet, *, score_thresh: Optional[float] = None,
                              detections_per_image: Optional[int] = None, min_size: Optional[int] = None) -> None:
    """Change post-/pre-processing settings of a built model in place."""
    if score_thresh is not None:
        model.postprocessor.score_thresh = score_thresh
    if detections_per_image is not None:
        model.postprocessor.detections_per_image = detections_per_image
    if min_size is not None:
        model.preprocessor.min_size = [min_size]
