"""Optimiser and learning-rate schedule (Focal Loss paper §4 "Optimization": SGD, momentum 0.9,
weight decay 1e-4, lr 0.01 for a batch of 16, warm-up, steps; cosine as an option)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def scaled_lr(base_lr: float, base_batch: int, total_batch: int) -> float:
    """Linear scaling rule: ``base_lr`` is for ``base_batch`` images."""
    return base_lr * total_batch / base_batch


def build_optimizer(model: nn.Module, *, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters; norm and bias parameters get no
    weight decay with AdamW. ``ValueError`` for another name."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use 'sgd' or 'adamw'")


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, warmup_factor: float, schedule: str,
              milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up from ``warmup_factor``, then cosine
    decay to 0 at ``total_steps`` or a ``gamma`` step at each milestone."""
    if step < warmup_steps:
        alpha = step / max(1, warmup_steps)
        warm = warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if schedule == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return warm * gamma ** sum(step >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}: use 'cosine' or 'step'")


def milestones_from(lr_steps: Sequence[float], total_steps: int) -> list[int]:
    """Values <= 1 are fractions of ``total_steps``, larger values are iteration numbers."""
    return [int(round(s * total_steps)) if s <= 1 else int(s) for s in lr_steps]


def build_scheduler(optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs))
