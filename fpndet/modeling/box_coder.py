"""Box ↔ regression-target encoding (R-CNN parameterisation used by RetinaNet §4 "Box regression").

A ground-truth box ``g`` is regressed from an anchor ``a`` (both xyxy, absolute pixels) as the
weighted deltas::

    dx = wx * (gx - ax) / aw        dw = ww * log(gw / aw)
    dy = wy * (gy - ay) / ah        dh = wh * log(gh / ah)

with widths ``w = x2 - x1`` (no "+1") and centres ``x = x1 + 0.5 * w``, numerically the same as
torchvision's ``BoxCoder.encode_single`` / ``decode_single``. Everything is computed in float32
(float64 stays float64) with autocast disabled, so half-precision heads still get exact targets.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import Tensor


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that switches autocast off on ``device`` (no-op for devices autocast ignores)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half/bfloat16/integers are cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(cx, cy, w, h) of xyxy ``boxes[..., 4]``, each ``[...]``."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


class BoxCoder:
    """Encodes boxes as deltas relative to anchors and decodes deltas back to boxes.

    Args (keyword-only):
        weights: (wx, wy, ww, wh) multipliers of the deltas; RetinaNet uses (1, 1, 1, 1).
        scale_clamp: upper bound applied to ``dw / ww`` and ``dh / wh`` before ``exp`` in
            :meth:`decode`, so a wild prediction cannot overflow (default log(1000 / 16), as
            torchvision and Detectron).
    """

    def __init__(self, *, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = math.log(1000.0 / 16)):
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 entries (wx, wy, ww, wh), got {len(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets of ``boxes`` relative to ``anchors``.

        Args:
            boxes: ``[..., 4]`` xyxy target boxes in pixels, any float dtype.
            anchors: ``[..., 4]`` xyxy anchors in pixels; leading dims broadcast against
                ``boxes`` (e.g. boxes ``[B, A, 4]`` with anchors ``[A, 4]``).

        Returns:
            float32 (float64 for float64 inputs) ``[broadcast(...), 4]`` deltas (dx, dy, dw, dh).
            Boxes or anchors of zero width/height give inf/NaN deltas: select real matches with
            ``torch.where`` rather than multiplying by a mask.
        """
        dtype = _compute_dtype(boxes, anchors)
        with _no_autocast(boxes.device):
            boxes, anchors = boxes.to(dtype), anchors.to(dtype)
            gx, gy, gw, gh = _centre_size(boxes)
            ax, ay, aw, ah = _centre_size(anchors)
            wx, wy, ww, wh = self.weights
            dx = wx * (gx - ax) / aw
            dy = wy * (gy - ay) / ah
            dw = ww * torch.log(gw / aw)
            dh = wh * torch.log(gh / ah)
            return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes that ``deltas`` describe relative to ``anchors`` (inverse of :meth:`encode`).

        Args:
            deltas: ``[..., 4]`` (dx, dy, dw, dh), any float dtype (half is cast up).
            anchors: ``[..., 4]`` xyxy anchors in pixels, broadcasting against ``deltas``.

        Returns:
            float32 (float64 for float64 inputs) ``[broadcast(...), 4]`` xyxy boxes in pixels.
            ``dw / ww`` and ``dh / wh`` are clamped from above at ``scale_clamp`` before ``exp``.
        """
        dtype = _compute_dtype(deltas, anchors)
        with _no_autocast(deltas.device):
            deltas, anchors = deltas.to(dtype), anchors.to(dtype)
            ax, ay, aw, ah = _centre_size(anchors)
            wx, wy, ww, wh = self.weights
            dx = deltas[..., 0] / wx
            dy = deltas[..., 1] / wy
            dw = torch.clamp(deltas[..., 2] / ww, max=self.scale_clamp)
            dh = torch.clamp(deltas[..., 3] / wh, max=self.scale_clamp)
            cx = dx * aw + ax
            cy = dy * ah + ay
            half_w = 0.5 * (torch.exp(dw) * aw)
            half_h = 0.5 * (torch.exp(dh) * ah)
            return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
