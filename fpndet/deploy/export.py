"""Writing a trained detector as one ONNX file (``fpndet export``).

The graph is :class:`~fpndet.deploy.graph.RetinaNetGraph` (RetinaNet) or
:class:`~fpndet.deploy.faster_rcnn_graph.FasterRCNNGraph` (Faster R-CNN, RPN) traced by ``torch.onnx.export``
(the dynamo exporter) with dynamic batch, height and width (multiples of the model's
``size_divisible``, 32 or a multiple of it, as the eager model pads); class-wise NMS
becomes ONNX ``NonMaxSuppression``. Inputs: ``images [B, 3, H, W]`` and ``image_sizes [B, 2]``
int64 (:func:`~fpndet.deploy.graph.pad_batch` makes both). The file's metadata (``metadata_props``) carries what a runner needs:
``fpndet_format`` (version of this layout), ``arch``, ``outputs`` ("detections" or "raw"),
``class_names`` (JSON list), ``model_config`` (JSON, the fpndet model config), ``score_thresh``,
``nms_thresh``, ``detections_per_image``, ``min_size``, ``max_size`` (the resize the runner
applies first), ``input_dtype``, ``min_input_side``, ``inputs`` (a description),
``pixel_mean`` / ``pixel_std`` and, for an export of a fixed input size, ``input_size``
(JSON ``[H, W]``).

Image size: dynamic by default (any multiple of ``size_divisible``). ``input_size=(H, W)`` fixes it (the batch
stays dynamic): every batch is then padded to that canvas, which must hold the resized images.
Exporting a fixed size takes seconds where the dynamic graph of a deep backbone takes many
minutes (EfficientNet-Lite0: 19 s against more than 13 min on a 2-core CPU: the tracer's
reasoning over the symbolic sizes of ~50 convolutions), and it is the form edge runtimes prefer.
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


def pad_multiple(model: nn.Module, source=None) -> int:
    """The multiple the export's inputs are padded to: the model's ``size_divisible``, as the eager
    pre-processor pads (a multiple of 32, which the graph's pyramid needs).

    Raises:
        InputError: a ``size_divisible`` that is not a multiple of 32 (the graph would pad
            differently from the eager model, so its detections would differ).
    """
    multiple = int(model.preprocessor.size_divisible)
    if multiple % PAD_TO:
        raise InputError(source, f"model.size_divisible={multiple} cannot be exported: the graph pads to multiples "
                         f"of {PAD_TO} (the model's pyramid needs them), so its detections would differ from the "
                         f"model's; use a multiple of {PAD_TO}")
    return multiple


def detector_graph(model: nn.Module, *, raw: bool = False, source=None) -> nn.Module:
    """The exportable graph of a detector in eval mode: RetinaNet (detections or ``raw`` head
    outputs), Faster R-CNN or a proposals-only RPN (detections only).

    Raises:
        InputError: a Fast R-CNN model (it needs proposals as an input), ``raw`` for a two-stage
            model, or a proposals setting the graph does not cover.
    """
    from .faster_rcnn_graph import FasterRCNNGraph

    arch = model.config.arch
    if arch == "retinanet":
        return RetinaNetGraph(model=model, raw=raw).eval()
    if raw:
        raise InputError(source, f"--raw exports RetinaNet head outputs; a {arch} model exports its detections")
    try:
        return FasterRCNNGraph(model=model).eval()
    except ValueError as err:
        raise InputError(source, f"cannot export this {arch} model: {err}") from None


def fixed_input_size(model: nn.Module, size, source=None) -> Optional[tuple[int, int]]:
    """``size`` as an (H, W) canvas for :func:`export_onnx`: None (dynamic), ``"max"`` (a
    square of the model's ``max_size`` rounded up to 32: holds every resized image, portrait or
    landscape), or (H, W) multiples of 32 of at least :func:`min_input_side`.

    Raises:
        InputError: a size that is not a multiple of 32 or is smaller than the model needs.
    """
    if size is None:
        return None
    multiple = pad_multiple(model, source)
    if size == "max":
        side = -(-int(model.preprocessor.max_size) // multiple) * multiple
        return side, side
    height, width = (int(v) for v in size)
    low = min_input_side(model)
    if height % multiple or width % multiple or min(height, width) < low:
        raise InputError(source, f"input size {height}x{width} must be multiples of {multiple} of at least {low}")
    return height, width


def example_inputs(model: nn.Module, input_dtype: str,
                   input_size: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 of unequal sides, multiples of 32 (or of ``input_size``), with image sizes
    smaller than the batch."""
    side, multiple = min_input_side(model), pad_multiple(model)
    shape = (2, 3, *input_size) if input_size else (2, 3, side + 3 * multiple, side + 7 * multiple)
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
    input_size=None,
    source: Optional[str | os.PathLike] = None,
) -> Path:
    """Export a RetinaNet (eval mode, CPU) to ``path`` (written atomically) and check the file.

    Args:
        model: a :class:`~fpndet.modeling.retinanet.RetinaNet`, or a
            :class:`~fpndet.modeling.faster_rcnn.FasterRCNN` with an RPN (``faster_rcnn``, ``rpn``);
            its inference settings (score threshold, NMS IoU, detections per image, top-k per
            level, proposals) go into the graph.
        class_names: the name of each label, stored in the metadata.
        opset: ONNX opset (>= 18).
        raw: export head outputs and anchors only (RetinaNet; :class:`~fpndet.deploy.graph.RetinaNetGraph`).
        input_dtype: "float32" (RGB in [0, 1]) or "uint8" (RGB in [0, 255]).
        input_size: None (dynamic image size), ``(H, W)`` or ``"max"``: a fixed canvas
            (:func:`fixed_input_size`, module doc); the batch stays dynamic.
        source: the checkpoint the model came from, named in errors.

    Returns: the written path.

    Raises:
        InputError: for a model that cannot be exported (see :func:`detector_graph`) or a bad option.
    """
    from ..engine.checkpoints import atomic_write_bytes

    if input_dtype not in ("float32", "uint8"):
        raise InputError(source, f"input dtype must be float32 or uint8, got {input_dtype}")
    if opset < 18:
        raise InputError(source, f"opset must be >= 18 (ONNX NonMaxSuppression and Resize as used here), got {opset}")
    from . import nms_op

    model = model.cpu().eval()
    graph = detector_graph(model, raw=raw, source=source)
    multiple = pad_multiple(model, source)
    input_size = fixed_input_size(model, input_size, source)
    example = example_inputs(model, input_dtype, input_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    image_dims = {0: batch}
    if not input_size:
        low, high = -(-min_input_side(model) // multiple), 16384 // multiple
        image_dims.update({2: multiple * torch.export.Dim("height_tiles", min=low, max=high),
                           3: multiple * torch.export.Dim("width_tiles", min=low, max=high)})
    dims = (image_dims, {0: batch})
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
    check_dynamic_inputs(proto, source, axes=(0,) if input_size else (0, 2, 3))
    metadata = export_metadata(model, class_names, raw=raw, input_dtype=input_dtype)
    if input_size:
        metadata["input_size"] = json.dumps(list(input_size))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def check_dynamic_inputs(proto, source=None, axes=(0, 2, 3)) -> None:
    """Raise InputError when the exporter fixed one of the ``axes`` of ``images`` meant to stay
    dynamic (it falls back to a specialised graph instead of failing when some code pins a
    dynamic size)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = [axis for axis in axes if dims[axis].HasField("dim_value")]
    if fixed:
        raise InputError(source, f"the exporter fixed axes {fixed} of 'images' to "
                         f"{[dims[a].dim_value for a in fixed]}: some code pins a size the graph must keep dynamic")


def export_metadata(model: nn.Module, class_names: Sequence[str], *, raw: bool, input_dtype: str) -> dict[str, str]:
    """The ``metadata_props`` of an exported model (module doc)."""
    from ..engine.model_io import final_stage

    post, pre = final_stage(model), model.preprocessor
    detections = getattr(post, "detections_per_image", None) or post.post_nms_topk[1]  # an RPN: its proposals
    return {
        "fpndet_format": FORMAT_VERSION,
        "arch": model.config.arch,
        "outputs": "raw" if raw else "detections",
        "class_names": json.dumps(list(class_names)),
        "model_config": json.dumps(model.config.to_dict()),
        "score_thresh": repr(float(post.score_thresh)),
        "nms_thresh": repr(float(post.nms_thresh)),
        "detections_per_image": str(int(detections)),
        "min_size": str(int(pre.min_size[-1])),
        "max_size": str(int(pre.max_size)),
        "input_dtype": input_dtype,
        "min_input_side": str(min_input_side(model)),
        "inputs": f"images [B, 3, H, W] resized to the model's size and zero-padded to H, W multiples of "
                  f"{int(pre.size_divisible)}; image_sizes [B, 2] int64 (h, w) before padding",
        "pixel_mean": json.dumps([float(v) for v in pre.pixel_mean.flatten()]),
        "pixel_std": json.dumps([float(v) for v in pre.pixel_std.flatten()]),
    }
