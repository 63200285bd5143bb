"""Choosing how a detector runs for inference (``--backend`` of predict, eval and benchmark).

============== ==================================================================================
eager          the PyTorch model as trained
fast           eager with BatchNorm folded and channels_last (:mod:`fpndet.deploy.tuning`)
winograd       fast with the 3x3 stride-1 convolutions computed by Winograd F(4x4, 3x3)
               (:mod:`fpndet.deploy.winograd`; CPU; compiles its transforms on the first call)
compile        ``torch.compile`` of the backbone, FPN and heads (dynamic shapes)
onnxruntime    the ONNX export (:mod:`fpndet.deploy.export`) on onnxruntime, float32
openvino       the ONNX export on OpenVINO, float32
openvino-bf16  the ONNX export on OpenVINO in bfloat16: faster where the CPU has bf16, not equal
auto           the fastest float32 path that needs no export: for an ``.onnx`` file openvino,
               else onnxruntime; for a PyTorch checkpoint fast (eager on CUDA)
============== ==================================================================================

``auto`` follows the order measured on CPUs (benchmarks/README.md; ``fpndet benchmark`` shows it
on yours). It never exports by itself: exporting takes minutes on a small CPU, so for the
fastest path export once (``fpndet export``) and predict with the ``.onnx``. Asked for by name, an
ONNX backend given a PyTorch checkpoint exports it once to ``<weights folder>/onnx/<name>.onnx``
(reused while newer than the weights). An ``.onnx`` file runs only on the ONNX backends.
``None`` (the default of ``fpndet eval``) is eager for a checkpoint and auto for an ``.onnx``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError

BACKEND_CHOICES = ("auto", "eager", "fast", "winograd", "compile", "onnxruntime", "openvino", "openvino-bf16")
PYTORCH_BACKENDS = ("eager", "fast", "winograd", "compile")
ONNX_BACKENDS = ("onnxruntime", "openvino", "openvino-bf16")


def installed(backend: str) -> bool:
    """Whether a backend's runtime can be imported here."""
    if backend == "onnxruntime":
        return importlib.util.find_spec("onnxruntime") is not None
    if backend.startswith("openvino"):
        return importlib.util.find_spec("openvino") is not None
    return True


def resolve_backend(backend: Optional[str], *, onnx_file: bool, device: torch.device) -> str:
    """The concrete backend ``auto`` stands for (module doc); others are returned as given."""
    if backend is None:
        backend = "auto" if onnx_file else "eager"
    if backend != "auto":
        return backend
    if not onnx_file:
        return "fast" if device.type == "cpu" else "eager"
    return "openvino" if installed("openvino") else "onnxruntime"


def cached_export(weights: Path, model, class_names) -> Path:
    """The ONNX export of a checkpoint, written next to it on first use (module doc)."""
    from .export import export_onnx

    target = weights.parent / "onnx" / f"{weights.stem}.onnx"
    if target.is_file() and target.stat().st_mtime >= weights.stat().st_mtime:
        return target
    print(f"exporting {weights} to {target} for the ONNX backend (once)...", flush=True)
    return export_onnx(model, target, class_names=class_names, source=weights)


def open_detector(weights: str | Path, *, backend: Optional[str] = "auto", device: torch.device = torch.device("cpu"),
                  overrides: Optional[dict] = None, named_only: bool = False):
    """``(detector, class_names, backend)`` for inference: a PyTorch model or an
    :class:`~fpndet.deploy.runtime.OnnxDetector`, both called as ``detector(images)``.

    Args:
        weights: run folder, ``.safetensors``, torchvision ``.pth`` or ``.onnx`` from ``fpndet export``.
        backend: one of :data:`BACKEND_CHOICES` (module doc).
        device: for PyTorch backends; the ONNX backends run on the CPU.
        overrides, named_only: as :func:`fpndet.engine.model_io.load_detector`.

    Raises:
        InputError: an unknown or uninstalled backend, a backend that cannot run this file, or
            any problem :func:`~fpndet.engine.model_io.load_detector` / the runner reports.
    """
    from ..engine.model_io import apply_inference_overrides, load_detector, weights_file
    from .runtime import OnnxDetector

    if backend is not None and backend not in BACKEND_CHOICES:
        raise InputError(None, f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    path = Path(weights)
    onnx_file = path.suffix == ".onnx"
    chosen = resolve_backend(backend, onnx_file=onnx_file, device=device)
    if not installed(chosen):
        raise InputError(path, f"backend {chosen} is not installed (pip install {chosen.split('-')[0]})")
    if onnx_file:
        if chosen not in ONNX_BACKENDS:
            raise InputError(path, f"an ONNX file runs on {', '.join(ONNX_BACKENDS)}, not on {chosen}")
        detector = OnnxDetector(path, backend=chosen)
        if overrides:
            apply_inference_overrides(detector, **{k: v for k, v in overrides.items() if k == "score_thresh"})
        names = detector.class_names
        return detector, names if names or not named_only else None, chosen
    if chosen == "winograd" and device.type != "cpu":
        raise InputError(path, "the winograd backend runs on the CPU (on a GPU use eager or compile)")
    if chosen in ONNX_BACKENDS:  # exported with the model's own settings, the overrides applied after
        model, class_names = load_detector(weights, named_only=named_only)
        names = class_names or [str(i) for i in range(model.config.num_classes)]
        detector = OnnxDetector(cached_export(weights_file(weights), model, names), backend=chosen)
        if overrides and overrides.get("score_thresh") is not None:
            detector.postprocessor.score_thresh = overrides["score_thresh"]
        return detector, class_names, chosen
    model, class_names = load_detector(weights, device=device, overrides=overrides, named_only=named_only)
    if chosen in ("fast", "winograd"):
        from .tuning import tune_for_cpu

        model = tune_for_cpu(model)
    if chosen == "winograd":
        from .winograd import use_winograd

        use_winograd(model)
    elif chosen == "compile":
        for name in ("backbone", "fpn", "head"):
            if getattr(model, name, None) is not None:
                setattr(model, name, torch.compile(getattr(model, name), dynamic=True))
    return model, class_names, chosen
