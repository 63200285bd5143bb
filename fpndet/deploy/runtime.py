"""Running an exported ONNX detector (``fpndet export``) with onnxruntime or OpenVINO.

:class:`OnnxDetector` is used like a PyTorch detector in eval mode: ``detector(images)`` with
float ``[3, h, w]`` RGB images in [0, 1] returns one ``{"boxes" [N, 4] xyxy pixels of the
input image, "scores" [N], "labels" int64 [N]}`` per image, so ``fpndet predict`` and
``fpndet eval --weights model.onnx`` run it unchanged. The images of a call are resized with
:func:`~fpndet.modeling.preprocess.resize_image` (the eager model's resize, with the export's
``min_size`` / ``max_size``) and padded together into one batch
(:func:`~fpndet.deploy.graph.pad_batch`), as the eager model batches them (or onto the fixed
canvas of an export with ``input_size``), and the boxes are scaled back by the same float32
ratios as the eager post-processor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..modeling.config import ModelConfig
from .graph import pad_batch

BACKENDS = ("onnxruntime", "openvino", "openvino-bf16")


class ExportedThresholds:
    """The score threshold and detection cap of an export, as ``final_stage(model)`` exposes them.

    ``score_thresh`` may be raised (detections below it are dropped after the graph) but not
    lowered below the exported one, which the graph already applied: that raises InputError."""

    def __init__(self, path: Path, score_thresh: float, detections_per_image: int):
        self.path, self.exported_score_thresh = path, score_thresh
        self._score_thresh, self.detections_per_image = score_thresh, detections_per_image

    @property
    def score_thresh(self) -> float:
        return self._score_thresh

    @score_thresh.setter
    def score_thresh(self, value: float) -> None:
        if value < self.exported_score_thresh - 1e-12:
            raise InputError(self.path, f"was exported with score threshold {self.exported_score_thresh}; a lower "
                             f"one ({value}) needs a new export (fpndet export --score-thresh {value})")
        self._score_thresh = float(value)


def read_export_metadata(path: Path) -> tuple[dict[str, str], list]:
    """``(metadata_props, input shapes)`` of an ONNX file; InputError naming it when unreadable."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends: a truncated or foreign file
        raise InputError(path, f"is not a readable ONNX file (truncated or corrupt?): {type(err).__name__}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    shapes = [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input]
    return meta, shapes


class OnnxDetector:
    """An exported detector on onnxruntime or OpenVINO (module doc).

    Args:
        path: the ``.onnx`` file written by ``fpndet export``.
        backend: "onnxruntime", "openvino" (float32) or "openvino-bf16" (OpenVINO's bfloat16
            inference on CPUs that have it: about twice as fast, detections no longer equal to
            the float32 ones; its AP is measured in benchmarks/README.md).
        threads: intra-op threads (None: the runtime's default, all cores).

    Raises:
        InputError(path, ...): no such file, not a readable ONNX file, not an fpndet export, an
            export of raw head outputs, an input layout other than ``[B, 3, H, W]``, or a
            backend that is not installed.
    """

    def __init__(self, path: str | os.PathLike, *, backend: str = "onnxruntime", threads: Optional[int] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "no such ONNX file")
        meta, shapes = read_export_metadata(self.path)
        if "fpndet_format" not in meta:
            raise InputError(self.path, "has no fpndet metadata: export it with `fpndet export`")
        if meta.get("outputs") != "detections":
            raise InputError(self.path, "was exported with --raw (head outputs only); predict and eval need an "
                             "export with detections (fpndet export without --raw)")
        if len(shapes) != 2 or len(shapes[0]) != 4 or shapes[0][1] != 3 or shapes[1][1:] != [2]:
            raise InputError(self.path, f"expects inputs of shapes {shapes}; fpndet runs exports of inputs "
                             "images [B, 3, H, W] and image_sizes [B, 2]")
        self.metadata = meta
        self.class_names = json.loads(meta["class_names"])
        self.config = ModelConfig.from_dict(json.loads(meta["model_config"]))
        self.min_size, self.max_size = int(meta["min_size"]), int(meta["max_size"])
        self.input_dtype = meta.get("input_dtype", "float32")
        self.input_size = tuple(json.loads(meta["input_size"])) if "input_size" in meta else None
        self.postprocessor = ExportedThresholds(self.path, float(meta["score_thresh"]), int(meta["detections_per_image"]))
        self.backend = backend
        self.device = torch.device("cpu")
        self.training = False
        self._run = self._open(backend, threads)

    def _open(self, backend: str, threads: Optional[int]):
        if backend == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError:
                raise InputError(self.path, "needs onnxruntime: pip install onnxruntime") from None
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            try:
                session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as err:
                raise InputError(self.path, f"onnxruntime cannot load it: {str(err).splitlines()[0][:200]}") from None
            return lambda batch, sizes: session.run(None, {"images": batch, "image_sizes": sizes})
        if backend in ("openvino", "openvino-bf16"):
            try:
                import openvino as ov
            except ImportError:
                raise InputError(self.path, "needs OpenVINO: pip install openvino") from None
            core = ov.Core()
            # float32 unless asked: OpenVINO picks bf16 by itself on CPUs that have it
            config = {"INFERENCE_PRECISION_HINT": "bf16" if backend == "openvino-bf16" else "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            try:
                compiled = core.compile_model(str(self.path), "CPU", config)
            except Exception as err:
                raise InputError(self.path, f"OpenVINO cannot load it: {str(err).splitlines()[0][:200]}") from None
            request = compiled.create_infer_request()

            def run(batch, sizes):
                result = request.infer({0: batch, 1: sizes})
                return [result[out] for out in compiled.outputs]

            return run
        raise InputError(self.path, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise InputError(self.path, "an exported ONNX model cannot be trained; train the fpndet run it came from")
        return self

    def to(self, device):
        return self

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for float ``[3, h, w]`` RGB images in [0, 1] (any sizes; module doc)."""
        images = [image.detach().float().cpu() for image in images]
        try:
            batch, sizes = pad_batch(images, min_size=self.min_size, max_size=self.max_size, canvas=self.input_size,
                                     size_divisible=self.config.size_divisible)
        except ValueError as err:
            raise InputError(self.path, f"was exported for a fixed input size: {err}") from None
        batch = batch.numpy()
        if self.input_dtype == "uint8":
            batch = np.clip(np.rint(batch * 255.0), 0, 255).astype(np.uint8)
        boxes, scores, labels, counts = self._run(np.ascontiguousarray(batch), sizes.numpy())
        return [self._detections(image, tuple(sizes[i].tolist()), boxes[i], scores[i], labels[i], int(counts[i]))
                for i, image in enumerate(images)]

    def _detections(self, image: Tensor, resized: tuple, boxes, scores, labels, count: int) -> dict[str, Tensor]:
        keep = scores[:count] >= self.postprocessor.score_thresh
        (height, width), (new_h, new_w) = image.shape[-2:], resized
        ratios = torch.tensor([width / new_w, height / new_h], dtype=torch.float32).repeat(2)
        return {
            "boxes": torch.from_numpy(np.array(boxes[:count][keep], dtype=np.float32)).reshape(-1, 4) * ratios,
            "scores": torch.from_numpy(np.array(scores[:count][keep], dtype=np.float32)),
            "labels": torch.from_numpy(np.array(labels[:count][keep], dtype=np.int64)),
        }

