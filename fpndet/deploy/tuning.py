"""The tuned eager PyTorch path for CPU inference (``--backend fast``).

Same network, same detections (up to float rounding), less work per image:

- BatchNorm folded into the convolution before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``):
  a frozen BatchNorm is y = x * scale + shift, which the convolution's weight and bias absorb.
  Pairs are found the way torchvision's ResNets are written: ``convN`` followed by ``bnN`` in
  one module, and consecutive (Conv2d, BatchNorm2d) children of a ``Sequential`` (the
  ``downsample`` branches). Other BatchNorms (timm's BatchNormAct2d, for instance) are left as
  they are.
- channels_last memory format for the convolution weights and the input batch (oneDNN's
  preferred layout on x86 CPUs).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import FrozenBatchNorm2d


def as_batch_norm(module: nn.Module) -> nn.BatchNorm2d:
    """An eval-mode ``BatchNorm2d`` equal to a ``FrozenBatchNorm2d`` (or the BatchNorm2d itself)."""
    if isinstance(module, FrozenBatchNorm2d):
        bn = nn.BatchNorm2d(module.weight.numel(), eps=module.eps).to(module.weight.device)
        with torch.no_grad():
            bn.weight.copy_(module.weight)
            bn.bias.copy_(module.bias)
            bn.running_mean.copy_(module.running_mean)
            bn.running_var.copy_(module.running_var)
        return bn.eval()
    return module


def _is_plain_bn(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm2d, FrozenBatchNorm2d)


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names (conv, bn) of the children of ``module`` where the BatchNorm directly follows the conv."""
    children = dict(module.named_children())
    pairs = []
    if isinstance(module, nn.Sequential):
        names = list(children)
        pairs += [(a, b) for a, b in zip(names, names[1:])
                  if type(children[a]) is nn.Conv2d and _is_plain_bn(children[b])]
    for name, child in children.items():
        if name.startswith("conv") and type(child) is nn.Conv2d:
            bn_name = "bn" + name[len("conv"):]
            if bn_name in children and _is_plain_bn(children[bn_name]):
                pairs.append((name, bn_name))
    return pairs


def fold_batch_norms(model: nn.Module) -> int:
    """Fold BatchNorms into their convolutions in place (module doc); returns how many."""
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), as_batch_norm(bn).eval()))
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


class ChannelsLast(nn.Module):
    """Runs ``module`` on a channels_last copy of its input (``[B, C, H, W]``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x.contiguous(memory_format=torch.channels_last))


def tune_for_cpu(model: nn.Module) -> nn.Module:
    """A copy of a detector (eval mode) with BatchNorms folded and the backbone, FPN and heads in
    channels_last (module doc). The original is left untouched."""
    tuned = copy.deepcopy(model).eval()
    fold_batch_norms(tuned)
    for name in ("backbone", "fpn", "head", "rpn", "roi_heads"):
        part = getattr(tuned, name, None)
        if part is not None:
            part.to(memory_format=torch.channels_last)
    tuned.backbone = ChannelsLast(tuned.backbone)
    return tuned
