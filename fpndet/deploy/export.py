"""Writing a trained detector as one ONNX file (``fpndet export``).

The graph is :class:`~fpndet.deploy.graph.RetinaNetGraph` traced by ``torch.onnx.export``
(the dynamo exporter) with dynamic batch, height and width (multiples of 32); class-wise NMS
becomes ONNX ``NonMaxSuppression``. Inputs: ``images [B, 3, H, W]`` and ``image_sizes [B, 2]``
int64 (:func:`~fpndet.deploy.graph.pad_batch` makes both). The file's metadata (``metadata_props``) carries what a runner needs:
``fpndet_format`` (version of this layout), ``arch``, ``outputs`` ("detections" or "raw"),
``class_names`` (JSON list), ``model_config`` (JSON, the fpndet model config), ``score_thresh``,
``nms_thresh``, ``detections_per_image``, ``min_size``, ``max_size`` (the resize the runner
applies first), ``input_dtype``, ``min_input_side``, ``inputs`` (a description) and
``pixel_mean`` / ``pixel_std``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import InputError
from .graph import PAD_TO, RetinaNetGraph

FORMAT_VERSION = "1"
DEFAULT_OPSET = 18
DETECTION_OUTPUTS = ["boxes", "scores", "labels", "num_detections"]
RAW_OUTPUTS = ["cls_logits", "box_deltas", "anchors"]


def min_input_side(model: nn.Module) -> int:
    """The smallest padded side the export is traced for (every level keeps >= 2 cells); smaller
    inputs run too (tested down to 64 px), the tracer just cannot promise it."""
    return 2 ** model.config.max_level * 2


def example_inputs(model: nn.Module, input_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 of unequal sides, multiples of 32, with image sizes smaller than the batch."""
    side = min_input_side(model)
    shape = (2, 3, side + 3 * PAD_TO, side + 7 * PAD_TO)
    images = torch.randint(0, 256, shape, dtype=torch.uint8) if input_dtype == "uint8" else torch.rand(shape)
    sizes = torch.tensor([[shape[2] - 5, shape[3]], [shape[2], shape[3] - 37]], dtype=torch.int64)
    return images, sizes


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
    raw: bool = False,
    input_dtype: str = "float32",
    source: Optional[str | os.PathLike] = None,
) -> Path:
    """Export a RetinaNet (eval mode, CPU) to ``path`` (written atomically) and check the file.

    Args:
        model: a :class:`~fpndet.modeling.retinanet.RetinaNet`; its post-processor settings
            (score threshold, NMS IoU, detections per image, top-k per level) go into the graph.
        class_names: the name of each label, stored in the metadata.
        opset: ONNX opset (>= 18).
        raw: export head outputs and anchors only (:class:`~fpndet.deploy.graph.RetinaNetGraph`).
        input_dtype: "float32" (RGB in [0, 1]) or "uint8" (RGB in [0, 255]).
        source: the checkpoint the model came from, named in errors.

    Returns: the written path.

    Raises:
        InputError: for a model that cannot be exported (not a RetinaNet) or a bad option.
    """
    from ..engine.checkpoints import atomic_write_bytes

    if model.config.arch != "retinanet":
        raise InputError(source, f"ONNX export covers RetinaNet models; this is a {model.config.arch} model")
    if input_dtype not in ("float32", "uint8"):
        raise InputError(source, f"input dtype must be float32 or uint8, got {input_dtype}")
    if opset < 18:
        raise InputError(source, f"opset must be >= 18 (ONNX NonMaxSuppression and Resize as used here), got {opset}")
    from . import nms_op

    model = model.cpu().eval()
    graph = RetinaNetGraph(model=model, raw=raw).eval()
    example = example_inputs(model, input_dtype)
    batch = torch.export.Dim("batch", min=1, max=1024)
    low, high = min_input_side(model) // PAD_TO, 16384 // PAD_TO
    dims = ({0: batch, 2: PAD_TO * torch.export.Dim("height_32", min=low, max=high),
             3: PAD_TO * torch.export.Dim("width_32", min=low, max=high)}, {0: batch})
    names = RAW_OUTPUTS if raw else DETECTION_OUTPUTS
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, example, dynamic_shapes=dims, input_names=["images", "image_sizes"],
            output_names=names, custom_translation_table=nms_op.onnx_translation(), opset_version=opset,
            dynamo=True, verbose=False,
        )
    import onnx

    proto = program.model_proto
    for key, value in export_metadata(model, class_names, raw=raw, input_dtype=input_dtype).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def export_metadata(model: nn.Module, class_names: Sequence[str], *, raw: bool, input_dtype: str) -> dict[str, str]:
    """The ``metadata_props`` of an exported model (module doc)."""
    post, pre = model.postprocessor, model.preprocessor
    return {
        "fpndet_format": FORMAT_VERSION,
        "arch": model.config.arch,
        "outputs": "raw" if raw else "detections",
        "class_names": json.dumps(list(class_names)),
        "model_config": json.dumps(model.config.to_dict()),
        "score_thresh": repr(float(post.score_thresh)),
        "nms_thresh": repr(float(post.nms_thresh)),
        "detections_per_image": str(int(post.detections_per_image)),
        "min_size": str(int(pre.min_size[-1])),
        "max_size": str(int(pre.max_size)),
        "input_dtype": input_dtype,
        "min_input_side": str(min_input_side(model)),
        "inputs": "images [B, 3, H, W] resized to the model's size and zero-padded to H, W multiples of 32; "
                  "image_sizes [B, 2] int64 (h, w) before padding",
        "pixel_mean": json.dumps([float(v) for v in pre.pixel_mean.flatten()]),
        "pixel_std": json.dumps([float(v) for v in pre.pixel_std.flatten()]),
    }
