"""Winograd F(4x4, 3x3) convolutions for CPU inference (``--backend winograd``).

A 3x3 convolution of stride 1 computes each 4x4 block of outputs from the 6x6 block of inputs
around it. Winograd's minimal filtering algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016, section 4.2, F(4x4, 3x3)) does it with 36 products
per input and output channel instead of 144:

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A          (d: 6x6 input tile, g: 3x3 filter)

so a convolution becomes an input transform V = B^T d B of every tile ([36, tiles, C_in]), 36
matrix products with the transformed filters U = G g G^T ([36, C_in, C_out], computed once), and
an output transform A^T M A. The products hold the FLOPs (4x fewer than the direct convolution);
the transforms are additions of strided slices, which ``torch.compile`` fuses into one pass over
memory each (written as Python sums of views, they would be slower than the convolution itself:
``benchmarks/bench_cpu_roofline.py`` times both).

Same network, same answers up to float rounding: the transforms' coefficients (up to 8 and 1/24)
cost about 1.5e-5 of the largest output per layer in float32, against ~1e-7 for the direct
convolution. RetinaNet's heads, FPN and ResNet bottlenecks spend most of their FLOPs in such
convolutions (3x3, stride 1, padding 1, no groups or dilation): :func:`use_winograd` swaps them.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

# F(4x4, 3x3): output tile m = 4, input tile a = m + 3 - 1 = 6 (Lavin & Gray 2016, section 4.2).
TILE_OUT, TILE_IN = 4, 6
B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def _combine(coefficients, terms):
    """sum(c * t) over the non-zero coefficients, written so the compiler sees constants."""
    total = None
    for c, term in zip(coefficients, terms):
        if c:
            part = term if c == 1 else -term if c == -1 else term * c
            total = part if total is None else total + part
    return total


def transform_filters(weight: Tensor) -> Tensor:
    """U = G g G^T for every filter: ``[C_out, C_in, 3, 3]`` -> ``[36, C_in, C_out]`` (same dtype;
    computed in float64)."""
    g = torch.tensor(G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ij,ocjk,lk->ilco", g, weight.detach().double(), g)
    return u.reshape(TILE_IN * TILE_IN, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def transform_input(x: Tensor, rows: int, cols: int) -> Tensor:
    """V = B^T d B of every 6x6 tile (stride 4) of the padded input.

    Args:
        x: ``[B, 4 * rows + 2, 4 * cols + 2, C]`` (channels last), the input zero-padded by 1
            pixel before and up to that size after.
    Returns:
        ``[36, B * rows * cols, C]``, tile position (i, j) major, then image, tile row, tile column.
    """
    m = TILE_OUT
    along_h = [x[:, k: k + m * (rows - 1) + 1: m] for k in range(TILE_IN)]
    mixed_h = [_combine(b, along_h) for b in B_T]
    tiles = []
    for part in mixed_h:
        along_w = [part[:, :, k: k + m * (cols - 1) + 1: m] for k in range(TILE_IN)]
        tiles += [_combine(b, along_w) for b in B_T]
    return torch.stack(tiles).reshape(TILE_IN * TILE_IN, -1, x.shape[-1])


def transform_output(products: Tensor, bias: Tensor, batch: int, rows: int, cols: int, height: int,
                     width: int) -> Tensor:
    """Y = A^T M A of every tile, the 4x4 blocks placed side by side, cropped, plus the bias.

    Args:
        products: ``[36, B * rows * cols, C_out]`` (the layout of :func:`transform_input` times U).
        bias: ``[C_out]``.
    Returns:
        ``[B, height, width, C_out]`` (channels last), contiguous.
    """
    m = products.reshape(TILE_IN, TILE_IN, batch, rows, cols, -1)
    mixed_h = [_combine(a, [m[k] for k in range(TILE_IN)]) for a in A_T]
    blocks = [torch.stack([_combine(a, [part[k] for k in range(TILE_IN)]) for a in A_T], dim=3)
              for part in mixed_h]
    y = torch.stack(blocks, dim=2).reshape(batch, rows * TILE_OUT, cols * TILE_OUT, -1)
    return (y[:, :height, :width] + bias).contiguous()


@functools.lru_cache(maxsize=None)
def _compiled(function):
    return torch.compile(function, dynamic=True)


def eligible(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution :class:`WinogradConv2d` computes: a plain ``nn.Conv2d``,
    3x3, stride 1, padding 1 (zeros), dilation 1, one group."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


# Above this many output positions per call (B * H * W) the transforms' memory traffic outweighs
# the products saved and the direct convolution is used (2 cores, 256 channels: Winograd takes
# 0.58x the direct time at 3,400 positions, 0.90x at 13,600, 0.98x at 27,200, 1.17x at 54,400).
MAX_POSITIONS = 20_000


class WinogradConv2d(nn.Module):
    """A 3x3 stride-1 convolution computed by Winograd F(4x4, 3x3) (module doc).

    Input ``[B, C_in, H, W]`` float (any memory format), output ``[B, C_out, H, W]`` in
    channels_last memory (the input's format when the direct convolution runs), equal to ``conv(x)`` within ~1.5e-5 of its largest value (float32).
    The transforms run through ``torch.compile`` (dynamic shapes: one compilation serves every
    image size) unless ``compiled=False``. Inputs of more than ``max_positions`` output
    positions (B * H * W) go through the direct convolution instead (:data:`MAX_POSITIONS`).

    Raises:
        ValueError: ``conv`` is not :func:`eligible`.
    """

    def __init__(self, conv: nn.Conv2d, *, compiled: bool = True, max_positions: int = MAX_POSITIONS):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"Winograd F(4x4, 3x3) needs a 3x3 stride-1 padding-1 convolution, got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("filters", transform_filters(conv.weight))
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=conv.weight.device)
        self.register_buffer("bias", bias.detach().clone())
        self.compiled = compiled
        self.max_positions = max_positions

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        if batch * height * width > self.max_positions:
            return nn.functional.conv2d(x, self.weight, self.bias, padding=1)
        rows, cols = -(-height // TILE_OUT), -(-width // TILE_OUT)
        inputs = _compiled(transform_input) if self.compiled else transform_input
        outputs = _compiled(transform_output) if self.compiled else transform_output
        padded = nn.functional.pad(x.permute(0, 2, 3, 1),
                                   (0, 0, 1, cols * TILE_OUT + 1 - width, 1, rows * TILE_OUT + 1 - height))
        products = torch.bmm(inputs(padded, rows, cols), self.filters)
        return outputs(products, self.bias, batch, rows, cols, height, width).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, F(4x4, 3x3), compiled={self.compiled}"


# Narrower convolutions gain nothing: with 64 input channels (ResNet's first stage, 200x336 at
# 800x1333) the transforms cost more than the products save (35 ms against 21 ms direct on 2
# cores); from 128 channels on the Winograd form is faster.
MIN_CHANNELS = 128


def use_winograd(model: nn.Module, *, compiled: bool = True, min_channels: int = MIN_CHANNELS,
                 max_positions: int = MAX_POSITIONS) -> int:
    """Replace every :func:`eligible` convolution of ``model`` with at least ``min_channels``
    input channels (in place) by a :class:`WinogradConv2d` (``compiled``, ``max_positions``
    passed on); returns how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if eligible(child) and child.in_channels >= min_channels:
                setattr(module, name, WinogradConv2d(child, compiled=compiled, max_positions=max_positions))
                replaced += 1
    return replaced
