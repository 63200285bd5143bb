"""Classification losses of the Focal Loss paper (Lin et al. 2017, §3 and appendix A) and box losses.

All functions take raw logits (never probabilities), return elementwise losses unless
``reduction`` is ``"sum"`` or ``"mean"``, and compute in float32 with autocast switched off
(half/bfloat16 inputs are cast up; float64 stays float64), so the result is float32/float64
whatever the input precision. Every log-probability is formed with log-sigmoid / log-sum-exp, so
losses and gradients stay finite for logits as large as ±100 and beyond.

Reductions: ``"none"`` keeps the elementwise shape, ``"sum"`` sums everything, ``"mean"``
averages everything (an empty input gives 0, still attached to the graph).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import paired_giou

_REDUCTIONS = ("none", "sum", "mean")
_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that switches autocast off on ``device`` (no-op for devices autocast ignores)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _full_precision(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast disabled on the device of its first (tensor) argument."""

    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs):
        with _no_autocast(first.device):
            return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as float64 if any is float64, else as float32."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tuple(t.to(dtype) for t in tensors)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else loss.sum() * 0.0
    return loss


def _check_alpha(alpha: float | None) -> None:
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")


def _alpha_t(targets: Tensor, alpha: float) -> Tensor:
    """α_t = α for positives (y=1), 1-α for negatives (y=0), linear in between (paper eq. 3)."""
    return alpha * targets + (1.0 - alpha) * (1.0 - targets)


def _log_sigmoids(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log σ(x), log σ(-x)), both accurate to the last bit for any finite x."""
    return F.logsigmoid(logits), F.logsigmoid(-logits)


def _cross_entropy(targets: Tensor, log_p: Tensor, log_1mp: Tensor) -> Tensor:
    """CE = -(y log p + (1-y) log(1-p)) (eq. 1-2 with soft labels); unlike the fused
    BCE-with-logits kernel this keeps full relative precision for confident predictions."""
    return -(targets * log_p + (1.0 - targets) * log_1mp)


def _log_one_minus_p_t(targets: Tensor, log_p: Tensor, log_1mp: Tensor) -> Tensor:
    """log(1 - p_t) where 1 - p_t = p(1-y) + (1-p)y, evaluated in log space (no cancellation)."""
    return torch.logaddexp(log_p + torch.log1p(-targets), log_1mp + torch.log(targets))


@_full_precision
def binary_cross_entropy(logits: Tensor, targets: Tensor, *, reduction: str = "none") -> Tensor:
    """Binary cross-entropy CE(p_t) = -log(p_t) with p = σ(logits) (paper eq. 1-2).

    Args:
        logits: ``[...]`` raw scores x, any float dtype.
        targets: ``[...]`` labels y in [0, 1] (soft labels allowed), same shape.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.

    Returns:
        float32 (float64 for float64 inputs) ``[...]`` losses in nats, or their reduction.

    Raises:
        ValueError: unknown ``reduction``.
    """
    _check_reduction(reduction)
    logits, targets = _upcast(logits, targets)
    return _reduce(_cross_entropy(targets, *_log_sigmoids(logits)), reduction)


@_full_precision
def alpha_balanced_cross_entropy(
    logits: Tensor, targets: Tensor, *, alpha: float = 0.25, reduction: str = "none"
) -> Tensor:
    """α-balanced cross-entropy CE(p_t) = -α_t log(p_t) (paper eq. 3).

    Args:
        logits, targets, reduction: as :func:`binary_cross_entropy`.
        alpha: weight α of positives in [0, 1]; negatives get 1 - α.

    Raises:
        ValueError: ``alpha`` outside [0, 1] or unknown ``reduction``.
    """
    _check_reduction(reduction)
    _check_alpha(alpha)
    logits, targets = _upcast(logits, targets)
    loss = _cross_entropy(targets, *_log_sigmoids(logits))
    return _reduce(_alpha_t(targets, alpha) * loss, reduction)


@_full_precision
def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Focal loss FL(p_t) = -α_t (1 - p_t)^γ log(p_t) with p = σ(logits) (paper eq. 5, §3.2).

    Same values as ``torchvision.ops.sigmoid_focal_loss`` (``alpha=None`` there is ``alpha=-1``),
    but the modulating factor (1 - p_t)^γ is evaluated as exp(γ · log(1 - p_t)) with
    1 - p_t = σ(x)(1 - y) + σ(-x)y, which avoids the cancellation in ``1 - p_t`` and keeps
    gradients finite for confident logits and any γ ≥ 0.

    Args:
        logits: ``[...]`` raw scores x, any float dtype (e.g. ``[B, A, K]``).
        targets: ``[...]`` labels y in [0, 1] (soft labels allowed), same shape. Do not let
            gradients flow into hard (0/1) targets: d/dy of log(y) is infinite there.
        alpha: α of positives in [0, 1], negatives get 1 - α; ``None`` disables α weighting.
        gamma: focusing parameter γ ≥ 0; γ = 0 gives (α-balanced) cross-entropy.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.

    Returns:
        float32 (float64 for float64 inputs) ``[...]`` losses in nats, or their reduction.

    Raises:
        ValueError: ``alpha`` outside [0, 1], negative ``gamma`` or unknown ``reduction``.
    """
    _check_reduction(reduction)
    _check_alpha(alpha)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logits, targets = _upcast(logits, targets)
    log_p, log_1mp = _log_sigmoids(logits)
    loss = _cross_entropy(targets, log_p, log_1mp)
    if gamma != 0:
        loss = loss * torch.exp(gamma * _log_one_minus_p_t(targets, log_p, log_1mp))
    if alpha is not None:
        loss = _alpha_t(targets, alpha) * loss
    return _reduce(loss, reduction)


@_full_precision
def focal_loss_star(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma_star: float = 2.0,
    beta_star: float = 1.0,
    reduction: str = "none",
) -> Tensor:
    """FL* of appendix A: FL* = -log(σ(γ* x_t + β*)) / γ*, with x_t = x for y=1 and -x for y=0.

    Soft labels interpolate: y · FL*(x) + (1 - y) · FL*(-x).

    Args:
        logits: ``[...]`` raw scores x, any float dtype.
        targets: ``[...]`` labels y in [0, 1], same shape.
        gamma_star: γ* > 0 (paper: 2).
        beta_star: β* (paper: 1).
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.

    Returns:
        float32 (float64 for float64 inputs) ``[...]`` losses, or their reduction.

    Raises:
        ValueError: ``gamma_star`` <= 0 or unknown ``reduction``.
    """
    _check_reduction(reduction)
    if gamma_star <= 0:
        raise ValueError(f"gamma_star must be > 0, got {gamma_star}")
    logits, targets = _upcast(logits, targets)
    positive = -F.logsigmoid(gamma_star * logits + beta_star)
    negative = -F.logsigmoid(-gamma_star * logits + beta_star)
    loss = (targets * positive + (1.0 - targets) * negative) / gamma_star
    return _reduce(loss, reduction)


@_full_precision
def softmax_focal_loss(
    logits: Tensor,
    target_classes: Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Multi-class focal loss -α_t (1 - p_t)^γ log(p_t) with p = softmax(logits) (paper §3.2, §5.1).

    The last class index K is background; α_t is ``alpha`` for object classes and
    ``1 - alpha`` for background. log(p_t) is the log-softmax at the target class and
    log(1 - p_t) the log-sum-exp of the other logits minus that of all logits, so both stay
    exact and differentiable however confident the prediction.

    Args:
        logits: ``[..., K+1]`` raw scores (K object classes, then background), K + 1 ≥ 2.
        target_classes: int64 ``[...]`` class index in ``0..K`` (K = background). Rows to be
            ignored must be removed or masked by the caller (out-of-range indices raise).
        alpha: α in [0, 1], or ``None`` for no α weighting.
        gamma: focusing parameter γ ≥ 0; γ = 0 gives (α-weighted) softmax cross-entropy.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.

    Returns:
        float32 (float64 for float64 inputs) ``[...]`` losses per row, or their reduction.

    Raises:
        ValueError: fewer than 2 classes, shape mismatch, bad ``alpha``/``gamma``/``reduction``.
    """
    _check_reduction(reduction)
    _check_alpha(alpha)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must be [..., K+1] with K+1 >= 2, got {list(logits.shape)}")
    if target_classes.shape != logits.shape[:-1]:
        raise ValueError(
            f"target_classes must be {list(logits.shape[:-1])} to match logits, got {list(target_classes.shape)}"
        )
    (logits,) = _upcast(logits)
    index = target_classes.long()[..., None]
    log_normaliser = torch.logsumexp(logits, dim=-1)
    log_p_t = logits.gather(-1, index).squeeze(-1) - log_normaliser
    loss = -log_p_t
    if gamma != 0:
        is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
        log_others = torch.logsumexp(logits.masked_fill(is_target, float("-inf")), dim=-1)
        loss = loss * torch.exp(gamma * (log_others - log_normaliser))
    if alpha is not None:
        is_background = target_classes == logits.shape[-1] - 1
        loss = torch.where(is_background, 1.0 - alpha, alpha) * loss
    return _reduce(loss, reduction)


@_full_precision
def smooth_l1_loss(pred: Tensor, target: Tensor, *, beta: float = 0.11, reduction: str = "none") -> Tensor:
    """Smooth L1 (Huber / β): 0.5 d² / β where d = |pred - target| < β, else d - 0.5 β.

    RetinaNet's box regression loss (paper §4, β = 0.11 as in Detectron). ``beta=0`` is L1.

    Args:
        pred, target: ``[...]`` regression values (e.g. box deltas ``[..., 4]``), same shape.
        beta: β ≥ 0, where the quadratic part meets the linear one.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.

    Returns:
        float32 (float64 for float64 inputs) ``[...]`` losses, or their reduction.

    Raises:
        ValueError: negative ``beta`` or unknown ``reduction``.
    """
    _check_reduction(reduction)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    pred, target = _upcast(pred, target)
    distance = (pred - target).abs()
    if beta < 1e-5:  # the quadratic branch would divide by ~0 (NaN gradients through torch.where)
        return _reduce(distance, reduction)
    loss = torch.where(distance < beta, 0.5 * distance**2 / beta, distance - 0.5 * beta)
    return _reduce(loss, reduction)


@_full_precision
def l1_loss(pred: Tensor, target: Tensor, *, reduction: str = "none") -> Tensor:
    """L1 loss |pred - target|, elementwise ``[...]`` (float32/float64) or reduced.

    Raises:
        ValueError: unknown ``reduction``.
    """
    _check_reduction(reduction)
    pred, target = _upcast(pred, target)
    return _reduce((pred - target).abs(), reduction)


@_full_precision
def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, *, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """Generalized-IoU loss 1 - GIoU (Rezatofighi et al. 2019), as ``torchvision.ops.generalized_box_iou_loss``.

    GIoU = IoU - (|C| - |A ∪ B|) / |C| with C the smallest box enclosing both; the loss lies in
    [0, 2] and is differentiable also for disjoint boxes.

    Args:
        pred_boxes: ``[..., 4]`` xyxy boxes in pixels (x1 ≤ x2, y1 ≤ y2).
        target_boxes: ``[..., 4]`` xyxy boxes, same shape.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.
        eps: added to the union and enclosing area before dividing.

    Returns:
        float32 (float64 for float64 inputs) ``[...]`` losses, or their reduction.

    Raises:
        ValueError: unknown ``reduction``.
    """
    _check_reduction(reduction)
    pred_boxes, target_boxes = _upcast(pred_boxes, target_boxes)
    giou = paired_giou(pred_boxes, target_boxes, eps=eps)
    return _reduce(1.0 - giou, reduction)
