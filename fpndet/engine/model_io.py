"""Opening a trained detector from a run folder, a fpndet checkpoint or a torchvision one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import InputError
from ..modeling.build import build_model
from ..modeling.config import ModelConfig
from . import checkpoints as ckpt


# The name of each label of torchvision's COCO detection models, i.e. of each COCO category id
# 0..90 ("__background__" for 0, "N/A" for the ids COCO 2017 does not use), as in torchvision's
# weights meta (``RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]``).
TORCHVISION_COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


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
    folder, a fpndet ``.safetensors``, a torchvision RetinaNet or Faster R-CNN ``.pth`` (renamed with
    :func:`~fpndet.modeling.torchvision_compat.convert_torchvision_state_dict`) or any other state
    dict file (taken as is). Raises :class:`InputError` naming an unreadable file."""
    file = weights_file(path)
    if file.suffix == ".safetensors":
        return ckpt.load_model_weights(file)[0]
    state = ckpt.load_state_dict_file(file)
    if any(key.startswith("backbone.body.") for key in state):
        from ..modeling.torchvision_compat import (
            convert_torchvision_faster_rcnn_state_dict,
            convert_torchvision_state_dict,
            torchvision_arch_of,
        )

        two_stage = torchvision_arch_of(state).startswith("fasterrcnn")
        state = (convert_torchvision_faster_rcnn_state_dict if two_stage else convert_torchvision_state_dict)(state)
    return state


def load_detector(path: str | Path, *, device: str | torch.device = "cpu",
                  overrides: Optional[dict] = None, named_only: bool = False) -> tuple[nn.Module, Optional[list[str]]]:
    """The model stored at ``path`` in eval mode, and the name of each of its labels.

    Args:
        path: a run folder, a ``.safetensors`` written by fpndet (weights + model config; class
            names from its ``class_names`` metadata), or a torchvision RetinaNet or Faster R-CNN
            ``.pth`` (v1 or v2; which one is read from its keys) converted with
            :func:`fpndet.from_torchvision`: a COCO RetinaNet's 91 labels are COCO category ids,
            named by :data:`TORCHVISION_COCO_CATEGORIES` (``"__background__"``/``"N/A"`` for
            unused ids); a COCO Faster R-CNN's 90 labels are category id - 1. An RPN's proposals
            are all named "object".
        device: where the model goes.
        overrides: post-/pre-processing settings to change (see :func:`apply_inference_overrides`,
            e.g. ``{"score_thresh": 0.3}``; None values are ignored).
        named_only: for a checkpoint that names no classes (no ``class_names`` metadata, or a
            torchvision checkpoint without 91 logits), return None instead of ``"0".."K-1"``.

    Returns:
        ``(model, class_names)``.

    Raises:
        InputError: naming the file when it is not a usable checkpoint.
    """
    file = weights_file(path)
    if file.suffix == ".safetensors":
        state, config = ckpt.load_model_weights(file)
        meta = config.pop("_metadata", None) or {}
        if not config:
            raise InputError(file, "has no fpndet model config in its metadata")
        try:
            model_cfg = ModelConfig.from_dict(config)
        except (TypeError, ValueError) as err:
            raise InputError(file, f"bad model config: {err}") from None
        model = build_model(model_cfg.replace(backbone_weights=None))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(file, f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        class_names = list(meta["class_names"]) if meta.get("class_names") else None
    else:
        from ..modeling.torchvision_compat import from_torchvision, torchvision_arch_of

        state = ckpt.load_state_dict_file(file)
        arch = torchvision_arch_of(state)
        try:
            model = from_torchvision(state, arch=arch)
        except InputError as err:  # it was given a state dict, so its message names no file
            raise InputError(file, f"{err.problem}; for a fpndet run use its folder or a .safetensors file") from None
        num_classes = model.config.num_classes
        class_names = None
        if num_classes == len(TORCHVISION_COCO_CATEGORIES):  # RetinaNet: label = category id
            class_names = list(TORCHVISION_COCO_CATEGORIES)
        elif model.config.arch != "retinanet" and num_classes == len(TORCHVISION_COCO_CATEGORIES) - 1:
            class_names = list(TORCHVISION_COCO_CATEGORIES[1:])  # Faster R-CNN: label = category id - 1
    if class_names is not None and len(class_names) != model.config.num_classes:
        raise InputError(file, f"names {len(class_names)} classes but the model has {model.config.num_classes}")
    if model.config.arch == "rpn":
        class_names = ["object"]  # class-agnostic proposals, all labelled 0
    if class_names is None and not named_only:
        class_names = [str(i) for i in range(model.config.num_classes)]
    if overrides:
        apply_inference_overrides(model, **overrides)
    return model.to(device).eval(), class_names


def model_device(model) -> torch.device:
    """Where a detector's inputs go: an :class:`~fpndet.deploy.runtime.OnnxDetector`'s ``device`` (the CPU), else its
    parameters' device."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def final_stage(model):
    """The module that holds a detector's final score threshold and detection cap: RetinaNet's
    post-processor, Faster R-CNN's RoI heads, or a proposals-only model's RPN (its objectness
    threshold)."""
    if hasattr(model, "postprocessor"):
        return model.postprocessor
    return model.roi_heads if model.roi_heads is not None else model.rpn


def apply_inference_overrides(model: nn.Module, *, score_thresh: Optional[float] = None,
                              detections_per_image: Optional[int] = None,
                              min_size: Optional[int | list[int]] = None) -> dict:
    """Change post-/pre-processing settings of a built model in place (None: leave as is).

    Args:
        score_thresh: the post-processor's minimum score (probability in [0, 1]).
        detections_per_image: the post-processor's cap per image (a proposals-only model: its
            RPN's proposals kept per image at test time, ``post_nms_topk``).
        min_size: the pre-processor's short side in pixels (an int or a list).

    Returns:
        The previous values of the settings changed, as keyword arguments that restore them.
    """
    previous: dict = {}
    final = final_stage(model)
    if score_thresh is not None:
        previous["score_thresh"] = final.score_thresh
        final.score_thresh = score_thresh
    if detections_per_image is not None and hasattr(final, "detections_per_image"):
        previous["detections_per_image"] = final.detections_per_image
        final.detections_per_image = detections_per_image
    elif detections_per_image is not None:  # an RPN: the proposals it keeps per image
        previous["detections_per_image"] = final.post_nms_topk[1]
        final.post_nms_topk = (final.post_nms_topk[0], detections_per_image)
    if min_size is not None:
        previous["min_size"] = list(model.preprocessor.min_size)
        model.preprocessor.min_size = list(min_size) if isinstance(min_size, (list, tuple)) else [min_size]
    return previous
