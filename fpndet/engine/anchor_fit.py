"""Anchors fitted to a dataset's boxes (``fpndet inspect --suggest-anchors``,
``model.anchor_sizes=auto`` / ``model.anchor_ratios=auto`` in training).

The boxes are taken in the frame the network sees, as :mod:`fpndet.engine.inspect` takes them:
each image resized as the model resizes it in evaluation (short side ``min_size[-1]``, long side
at most ``max_size``) and padded to a multiple of ``size_divisible``; crowd boxes are left out.
The anchors are the model's own (:func:`~fpndet.modeling.anchors.cell_anchors` on every level's
grid, strides from :meth:`~fpndet.modeling.anchors.AnchorGenerator.level_stride`).

**Objective.** For anchor sizes ``S`` and ratios ``R`` (the config's ``anchor_scales`` kept), each
box ``i`` has its best IoU ``b_i`` over all anchors of its image. With ``t`` the matcher's
foreground threshold (``model.retinanet.foreground_iou`` for RetinaNet, ``model.rpn.foreground_iou``
for the two-stage architectures), the fit maximises, lexicographically,

    (covered, mean_iou) = (#{i : b_i >= t}, (1/N) * sum_i b_i)

i.e. the number of boxes with a foreground anchor first, the mean best IoU over all N boxes only
between equal counts (the scalar ``covered + mean_iou`` orders candidates the same way, since
``mean_iou <= 1``). That is ``fpndet inspect``'s ``coverage`` and the mean of its per-box best IoU.

**Exact and fast.** For a fixed anchor shape the IoU with a box does not increase as the centres
move apart along x or along y, so the best anchor of each (level, ratio, scale) is the one at the
grid point nearest the box centre, clamped to the grid. Evaluating a candidate is therefore
``N x levels x anchors-per-location`` IoUs (same float32 formula as
:func:`~fpndet.modeling.box_ops.pairwise_iou`), not ``N x all anchors``: it gives the same best IoU
as :func:`fpndet.engine.inspect.box_coverage` over every anchor (tests/engine/test_anchor_fit.py
checks it on both anchor placements), at ~1000x less work.

**Search.** Sizes keep the ratios between levels of the starting sizes (2x per level in the paper
and every shipped config: the FPN assigns scales to levels) and are all multiplied by one factor
``2^u``; the ratios (as many as the config has, or ``num_ratios``) are free. Steps:

1. sizes: ``u`` on a grid of 1/8 octave over [-5, 5] with the starting ratios;
2. ratios: candidate sets — the starting ratios, the box aspect-ratio quantiles at
   ``(k + 1/2) / K``, and geometric sets around the median ratio (spreads 1.5x, 2x, 3x between
   the extremes and the median) — each with ``u`` re-searched within ±1 octave of the best;
3. a coordinate (pattern) search on ``u`` and the log-ratios from the best start: each coordinate
   is moved ±step, any improvement kept; steps halve when none improves (from 1/16 octave and
   0.1 in log-ratio, down to 1/8192 and 1/4096: the anchors are whole pixels, so the score is
   a staircase whose treads can be that narrow); then again from the fit with all sizes moved by
   the ratio of two anchor scales (±1/3, ±2/3 octave for the paper's) or by one octave (the same
   anchor shapes on other scales or levels: the usual local optima), from the two best-scoring
   of these moves;
4. 300 seeded random mutations of the best (YOLOv5's autoanchor evolution, as an idea: each
   coordinate moved with probability 0.7 by a normal step of sigma 0.02, 0.05, 0.1 or 0.3, in
   octaves for ``u`` and in log-ratio), improvements kept, then step 3 again if any improved;
   at most ``max_evaluations`` (1500) distinct anchor sets scored in steps 1-4;
5. round numbers: the lowest size rounded to 1 or 0.1 px and each ratio to 0.1 or 0.01 (every
   combination): the best of them replaces the fit when it scores at least as well, the roundest
   among equals.

The lowest level's size is rounded to 0.01 px (the others are it times the start's proportions,
rounded to 0.01 px) and ratios to 0.001 before each evaluation, so the score reported is the score
of the printed numbers. With more than ``max_boxes`` boxes, the search runs on a seeded
random sample of them; the before/after figures are always over every box.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import auto_anchor_fields, model_config, set_fitted_anchors
from ..data.records import ImageRecord
from ..modeling.anchors import cell_anchors
from ..modeling.build import build_anchor_generator
from ..modeling.config import ModelConfig
from .inspect import _coverage_by_size, _records, _scaled, input_geometry, pyramid_grids

__all__ = [
    "FitBoxes", "AnchorScore", "AnchorFit", "fit_boxes", "best_anchor_iou", "anchor_score", "fit_anchors",
    "format_anchor_fit", "resolve_auto_anchors",
]

SIZE_GRID = np.arange(-5.0, 5.0 + 1e-9, 1.0 / 8)  # step 1: log2 of the size factor, 1/8 octave apart
LOCAL_OCTAVES = 1.0  # step 2: u searched within ±1 octave of the best u
RATIO_SPREADS = (1.5, 2.0, 3.0)  # step 2: extreme / median ratio of the geometric candidate sets
MAX_BOXES = 10000  # the search runs on a sample of at most this many boxes
RESTARTS = 2  # step 3: pattern searches from sizes shifted by a scale ratio or an octave
EVOLVE_GENERATIONS = 300  # step 4
EVOLVE_SIGMAS = (0.02, 0.05, 0.1, 0.3)
MAX_EVALUATIONS = 1500
_MAX_ELEMENTS = 2**21  # bound on boxes x levels x anchors-per-location per block


# --------------------------------------------------------------------------------------------
# The boxes and the exact best IoU
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitBoxes:
    """The non-crowd boxes of a dataset in network-input pixels, with their images' anchor grids.

    boxes: float32 ``[N, 4]`` xyxy; grid: int64 ``[N, L, 2]`` (rows, columns) of each level's
    feature map; stride: int64 ``[N, L, 2]`` (y, x) pixels between anchor centres of each level;
    centre: float32 ``[N, L, 2]`` (x, y) of the grid point of each level nearest the box centre
    (where the best anchor of every shape centred on its cell lies, as the model's are).
    """

    boxes: torch.Tensor
    grid: torch.Tensor
    stride: torch.Tensor
    centre: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        nearest = [_nearest_grid_point(self.boxes, self.grid, self.stride, axis) for axis in (0, 1)]
        object.__setattr__(self, "centre", torch.stack(nearest, dim=2))

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, index: torch.Tensor) -> "FitBoxes":
        return FitBoxes(self.boxes[index], self.grid[index], self.stride[index])

    @property
    def sizes(self) -> np.ndarray:
        """sqrt(w * h), ``[N]``."""
        wh = (self.boxes[:, 2:] - self.boxes[:, :2]).double().numpy()
        return np.sqrt(wh[:, 0] * wh[:, 1])

    @property
    def aspect_ratios(self) -> np.ndarray:
        """h / w (the anchors' convention), ``[N]``."""
        wh = (self.boxes[:, 2:] - self.boxes[:, :2]).double().numpy()
        return wh[:, 1] / np.maximum(wh[:, 0], 1e-9)


def fit_boxes(records: Sequence[ImageRecord], config: ModelConfig) -> FitBoxes:
    """The boxes of ``records`` as the network sees them under ``config`` (its resize, padding,
    levels and anchor placement; its anchor sizes and ratios play no part)."""
    generator = build_anchor_generator(config)
    levels = range(config.max_level - config.min_level + 1)
    boxes, grids, strides = [], [], []
    per_padded: dict[tuple[int, int], tuple[list, list]] = {}
    for record in records:
        keep = ~np.asarray(record.iscrowd, dtype=bool).reshape(-1)
        if not keep.any():
            continue
        geometry = input_geometry(record.height, record.width, config)
        if geometry.padded not in per_padded:
            grid = pyramid_grids(geometry.padded, config.min_level, config.max_level)
            per_padded[geometry.padded] = (grid, [generator.level_stride(l, geometry.padded, grid[l]) for l in levels])
        grid, stride = per_padded[geometry.padded]
        count = int(keep.sum())
        boxes.append(_scaled(np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)[keep], geometry))
        grids.append(np.broadcast_to(np.asarray(grid, dtype=np.int64), (count, len(grid), 2)))
        strides.append(np.broadcast_to(np.asarray(stride, dtype=np.int64), (count, len(grid), 2)))
    if not boxes:
        num_levels = len(levels)
        return FitBoxes(torch.zeros(0, 4), torch.zeros(0, num_levels, 2, dtype=torch.int64),
                        torch.zeros(0, num_levels, 2, dtype=torch.int64))
    return FitBoxes(torch.from_numpy(np.concatenate(boxes)), torch.from_numpy(np.concatenate(grids)),
                    torch.from_numpy(np.concatenate(strides)))


def _level_cells(sizes: Sequence[float], scales: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """float32 ``[L, K, 4]``: the anchors of one location of each level (the model's rounding)."""
    return torch.stack([cell_anchors(size, scales, ratios) for size in sizes])


def best_anchor_iou(boxes: FitBoxes, sizes: Sequence[float], scales: Sequence[float],
                    ratios: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each box's highest IoU with any anchor of its image, and the level index of that anchor
    (lowest level on ties): float32 ``[N]``, int64 ``[N]``. Equal to
    :func:`fpndet.engine.inspect.box_coverage`'s ``best_iou`` / ``best_level`` (module doc)."""
    cells = _level_cells(sizes, scales, ratios)  # [L, K, 4]
    num_levels, per_location = cells.shape[:2]
    best = torch.zeros(len(boxes))
    level = torch.zeros(len(boxes), dtype=torch.int64)
    block = max(1, _MAX_ELEMENTS // (num_levels * per_location))
    for start in range(0, len(boxes), block):
        part = boxes.subset(slice(start, start + block)) if len(boxes) > block else boxes
        iou = _nearest_anchor_iou(part, cells)  # [n, L, K]
        per_level = iou.amax(dim=2)  # [n, L]
        best[start : start + block], level[start : start + block] = per_level.max(dim=1)
    return best, level


def _nearest_grid_point(box: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor, axis: int) -> torch.Tensor:
    """The x (axis 0) or y (1) of each level's grid point nearest each box centre, clamped to the
    grid: float32 ``[n, L]``, whole pixels. Every anchor of :func:`cell_anchors` is centred on
    its grid point (its corners are ``±round(extent / 2)``), so that point carries the best
    anchor of every shape (module doc)."""
    step = stride[:, :, 1 - axis].to(torch.float32)  # [n, L]; x uses columns, y rows
    last = (grid[:, :, 1 - axis] - 1).to(torch.float32)
    centre = (box[:, axis, None] + box[:, axis + 2, None]) / 2
    return torch.round(centre / step).clamp_(min=0).minimum(last) * step


def _nearest_anchor_iou(boxes: FitBoxes, cells: torch.Tensor) -> torch.Tensor:
    """IoU ``[n, L, K]`` of each box with the anchor of each level and shape nearest to it.

    :func:`~fpndet.modeling.box_ops.pairwise_iou`'s operations in its order (torchvision's), so
    bitwise inspect's values, written out because it is the search's hot path: each anchor
    corner is one ``[n, L, K]`` sum and the anchor areas one ``[L, K]`` product (the corners are
    whole pixels, so the areas do not depend on the shift), ~1.7x faster than building the
    ``[n, L, K, 4]`` anchors for ``pairwise_iou``."""
    box, centre = boxes.boxes, boxes.centre[:, :, None, :]  # [n, 4], [n, L, 1, 2]
    ax1, ay1, ax2, ay2 = (centre[..., k % 2] + cells[None, :, :, k] for k in range(4))  # [n, L, K]
    bx1, by1, bx2, by2 = (box[:, k, None, None] for k in range(4))
    overlap_w = torch.minimum(bx2, ax2).sub_(torch.maximum(bx1, ax1)).clamp_(min=0)
    overlap_h = torch.minimum(by2, ay2).sub_(torch.maximum(by1, ay1)).clamp_(min=0)
    inter = overlap_w.mul_(overlap_h)
    anchor_area = (cells[:, :, 2] - cells[:, :, 0]) * (cells[:, :, 3] - cells[:, :, 1])  # [L, K]
    union = ((bx2 - bx1) * (by2 - by1)) + anchor_area - inter
    return inter.div_(union)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnchorScore:
    """Coverage of ``boxes`` boxes by one anchor set (definitions in the module doc).

    covered: boxes whose best IoU >= ``foreground_iou``; mean_iou: mean best IoU over all boxes;
    per_level: level name -> {anchor_size, boxes (best anchor on the level), covered (share of
    them)}; by_size: small/medium/large (COCO areas, network-input pixels) -> {boxes, covered}.
    """

    boxes: int
    covered: int
    mean_iou: float
    per_level: dict = field(default_factory=dict)
    by_size: dict = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        return self.covered / self.boxes if self.boxes else 0.0

    @property
    def key(self) -> tuple[int, float]:
        """What the fit maximises, lexicographically."""
        return self.covered, self.mean_iou

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": self.boxes, "covered": self.covered, "coverage": round(self.coverage, 4),
                "mean_best_iou": round(self.mean_iou, 4), "per_level": self.per_level, "by_size": self.by_size}


def anchor_score(boxes: FitBoxes, config: ModelConfig, *, sizes: Optional[Sequence[float]] = None,
                 ratios: Optional[Sequence[float]] = None, detail: bool = True) -> AnchorScore:
    """The score of ``sizes`` / ``ratios`` (default: the config's) with the config's scales and
    foreground threshold; ``detail`` adds the per-level and per-size breakdowns."""
    sizes = list(config.anchor_sizes if sizes is None else sizes)
    ratios = list(config.anchor_ratios if ratios is None else ratios)
    best, level = best_anchor_iou(boxes, sizes, config.anchor_scales, ratios)
    covered = best >= config.anchor_stage.foreground_iou
    total = len(boxes)
    mean = float(best.double().mean()) if total else 0.0
    if not detail:
        return AnchorScore(total, int(covered.sum()), mean)
    per_level = {}
    for index, size in enumerate(sizes):
        on_level = level == index
        count = int(on_level.sum())
        per_level[f"P{config.min_level + index}"] = {
            "anchor_size": float(size), "boxes": count,
            "covered": round(int(covered[on_level].sum()) / count, 4) if count else 0.0,
        }
    by_size = _coverage_by_size(boxes, covered.numpy())  # inspect's (it reads only ``.sizes``)
    return AnchorScore(total, int(covered.sum()), mean, per_level, by_size)


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------
@dataclass
class AnchorFit:
    """The result of :func:`fit_anchors`: the fitted ``sizes`` / ``ratios`` (the other one is
    the starting value when only one is fitted), their ``config``, scores ``before`` (starting
    anchors) and ``after`` over every box, and the search's cost."""

    sizes: list[float]
    ratios: list[float]
    config: ModelConfig
    before: AnchorScore
    after: AnchorScore
    fitted: tuple[str, ...]
    evaluations: int
    seconds: float
    searched_boxes: int
    start: dict = field(default_factory=dict)

    @property
    def override(self) -> str:
        """The command-line overrides that give these anchors."""
        return f"model.anchor_sizes={_fmt(self.sizes)} model.anchor_ratios={_fmt(self.ratios)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "anchor_sizes": self.sizes, "anchor_ratios": self.ratios, "anchor_scales": list(self.config.anchor_scales),
            "fitted": list(self.fitted), "override": self.override, "start": self.start,
            "foreground_iou": self.config.anchor_stage.foreground_iou,
            "before": self.before.to_dict(), "after": self.after.to_dict(),
            "evaluations": self.evaluations, "searched_boxes": self.searched_boxes, "seconds": round(self.seconds, 2),
        }

    def table(self, *, start_label: str = "before") -> str:
        """Before / after lines for the terminal (:func:`format_anchor_fit`)."""
        return format_anchor_fit(self.to_dict(), start_label=start_label)


def format_anchor_fit(fit: dict, *, start_label: str = "before") -> str:
    """Terminal lines for an :meth:`AnchorFit.to_dict` (as in ``report.json``'s "anchor_fit"):
    coverage, mean best IoU, boxes and coverage per level and by size, before and after, and
    the override."""
    rows = [f"anchor fit of {' and '.join(fit['fitted'])} (foreground IoU >= {fit['foreground_iou']:g}; "
            f"{fit['before']['boxes']} boxes, {fit['evaluations']} anchor sets scored in {fit['seconds']:.1f} s)"]
    start = fit["start"]
    for name, score, sizes, ratios in ((start_label, fit["before"], start["anchor_sizes"], start["anchor_ratios"]),
                                       ("after", fit["after"], fit["anchor_sizes"], fit["anchor_ratios"])):
        levels = " ".join(f"{level} {v['boxes']}/{v['covered']:.2f}" for level, v in score["per_level"].items())
        by_size = " ".join(f"{k} {v['covered']:.2f}" for k, v in score["by_size"].items() if v["boxes"])
        rows.append(f"  {name:7s} coverage {score['coverage']:.4f} ({score['covered']}/{score['boxes']}), "
                    f"mean best IoU {score['mean_best_iou']:.4f}; sizes {_fmt(sizes)} ratios {_fmt(ratios)}")
        rows.append(f"          per level (boxes/covered): {levels}; covered by size: {by_size}")
    rows.append(f"override: {fit['override']}")
    return "\n".join(rows)


def _fmt(values: Sequence[float]) -> str:
    return "[" + ",".join(f"{v:.10g}" for v in values) + "]"


def _default_ratios(count: int) -> list[float]:
    """``count`` ratios spread geometrically over [1/2, 2] (the paper's for 3), [1] for one."""
    if count == 1:
        return [1.0]
    return [float(v) for v in np.geomspace(0.5, 2.0, count)]


class _Search:
    """The search state: memoised scores of candidates ``(u, log_ratios)`` (``u``: log2 of the
    size factor) on the search boxes, and the best so far. Steps 1-5 of the module doc."""

    def __init__(self, boxes: FitBoxes, config: ModelConfig, start_ratios: Sequence[float], *, fit_sizes: bool,
                 fit_ratios: bool, max_evaluations: int, seed: int):
        self.boxes, self.config = boxes, config
        self.base_sizes = np.asarray(config.anchor_sizes, dtype=np.float64)
        self.fit_sizes, self.fit_ratios = fit_sizes, fit_ratios
        self.max_evaluations, self.seed = max_evaluations, seed
        self.cache: dict[tuple, tuple[int, float]] = {}
        self.start_ratios = list(start_ratios)
        self.best = (0.0, [float(v) for v in np.log(start_ratios)])
        self.best_key = self.score(*self.best)

    # ------------------------------------------------------------------ candidates
    def numbers(self, u: float, log_ratios: Sequence[float]) -> tuple[list[float], list[float]]:
        """The sizes and ratios of a candidate, rounded as printed: the lowest level's size to
        0.01 px, the others that times the start's proportions (rounded to 0.01 px), ratios to
        0.001, sorted."""
        lowest = round(float(self.base_sizes[0] * 2.0**u), 2)
        sizes = [round(lowest * float(v), 2) for v in self.base_sizes / self.base_sizes[0]]
        ratios = sorted(max(round(float(math.exp(v)), 3), 0.001) for v in log_ratios)
        return sizes, ratios

    def score(self, u: float, log_ratios: Sequence[float]) -> tuple[int, float]:
        sizes, ratios = self.numbers(u, log_ratios)
        key = (tuple(sizes), tuple(ratios))
        if key not in self.cache:
            self.cache[key] = anchor_score(self.boxes, self.config, sizes=sizes, ratios=ratios, detail=False).key
        return self.cache[key]

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def has_budget(self) -> bool:
        return self.evaluations < self.max_evaluations

    def consider(self, u: float, log_ratios: Sequence[float], *, ties: bool = False) -> bool:
        """Score a candidate; keep it when better than the best (or as good, with ``ties``)."""
        if not self.has_budget():
            return False
        return self.offer((float(u), [float(v) for v in log_ratios]), self.score(u, log_ratios), ties=ties)

    def offer(self, point: tuple[float, list[float]], key: tuple[int, float], *, ties: bool = False) -> bool:
        if key > self.best_key or (ties and key == self.best_key):
            self.best_key, self.best = key, point
            return True
        return False

    # ------------------------------------------------------------------ steps
    def run(self) -> None:
        if self.fit_sizes:  # 1
            for u in SIZE_GRID:
                self.consider(float(u), self.best[1])
        if self.fit_ratios:  # 2
            centre = self.best[0]
            grid = SIZE_GRID[np.abs(SIZE_GRID - centre) <= LOCAL_OCTAVES] if self.fit_sizes else [centre]
            for log_ratios in _ratio_candidates(self.boxes.aspect_ratios, self.start_ratios):
                for u in grid:
                    self.consider(float(u), log_ratios)
        self.pattern_search(self.best)  # 3
        if self.fit_sizes:
            self.restart_shifted()
        if self.evolve():  # 4
            self.pattern_search(self.best)
        self.prefer_round_numbers()  # 5

    def _coordinates(self) -> list[int]:
        """0 is u, 1 + k the k-th log-ratio."""
        return ([0] if self.fit_sizes else []) + ([1 + k for k in range(len(self.best[1]))] if self.fit_ratios else [])

    @staticmethod
    def _moved(point, coordinate: int, value: float) -> tuple[float, list[float]]:
        u, log_ratios = point[0], list(point[1])
        if coordinate == 0:
            return value, log_ratios
        log_ratios[coordinate - 1] = value
        return u, log_ratios

    @staticmethod
    def _value(point, coordinate: int) -> float:
        return point[0] if coordinate == 0 else point[1][coordinate - 1]

    def pattern_search(self, point: tuple[float, list[float]]) -> None:
        """Step 3 from ``point``: coordinate moves of ±step, any improvement kept, steps halved
        when no move improves; the end point is offered as the best."""
        key = self.score(*point)
        coordinates = self._coordinates()
        steps = {c: (1.0 / 16 if c == 0 else 0.1) for c in coordinates}
        floors = {c: (1.0 / 8192 if c == 0 else 1.0 / 4096) for c in coordinates}
        while self.has_budget() and any(steps[c] >= floors[c] for c in coordinates):
            improved = False
            for c in coordinates:
                if steps[c] < floors[c]:
                    continue
                for sign in (1.0, -1.0):
                    trial = self._moved(point, c, self._value(point, c) + sign * steps[c])
                    trial_key = self.score(*trial)
                    if trial_key > key:
                        point, key, improved = trial, trial_key, True
                        break
            if not improved:
                steps = {c: step / 2 for c, step in steps.items()}
        self.offer(point, key)

    def restart_shifted(self) -> None:
        """Step 3 again from the best with all sizes moved by the ratio of two anchor scales or
        by one octave (the same anchor shapes on other scales or levels: the usual local optima),
        from the two best-scoring of these starts."""
        if not self.has_budget():
            return
        scales = np.log2(np.asarray(self.config.anchor_scales, dtype=np.float64))
        shifts = {round(float(a - b), 9) for a in scales for b in scales} | {-1.0, 1.0}
        shifts.discard(0.0)
        u, log_ratios = self.best
        starts = sorted(((self.score(u + shift, log_ratios), shift) for shift in sorted(shifts)), reverse=True)
        for _, shift in starts[:RESTARTS]:
            self.pattern_search((u + shift, list(log_ratios)))

    def evolve(self) -> bool:
        """Step 4: ``EVOLVE_GENERATIONS`` random mutations of the best (each searched coordinate
        moved with probability 0.7 by N(0, sigma), sigma drawn from ``EVOLVE_SIGMAS``),
        improvements kept. Returns whether any improved."""
        rng = np.random.default_rng(self.seed)
        coordinates = self._coordinates()
        improved = False
        for _ in range(EVOLVE_GENERATIONS):
            if not self.has_budget():
                break
            sigma = float(rng.choice(EVOLVE_SIGMAS))
            moves = rng.normal(0.0, sigma, size=len(coordinates)) * (rng.random(len(coordinates)) < 0.7)
            u, log_ratios = self.best[0], list(self.best[1])
            for c, move in zip(coordinates, moves):
                if c == 0:
                    u += float(move)
                else:
                    log_ratios[c - 1] += float(move)
            improved |= self.consider(u, log_ratios)
        return improved

    def prefer_round_numbers(self) -> None:
        """Step 5: the lowest size rounded to 1 px or 0.1 px and each ratio to 0.1 or 0.01, in
        every combination (coordinate by coordinate beyond 243): the best-scoring one replaces
        the fit when it scores at least as well, the roundest among equals (the anchors are
        whole pixels: round numbers often give the same anchors, and then read better)."""
        # The same anchor set with its log-ratios in the printed (sorted) order, so that coordinate
        # 1 + k is the k-th printed ratio (mutations may have reordered them).
        self.best = (self.best[0], sorted(self.best[1]))
        sizes, ratios = self.numbers(*self.best)
        options = []
        if self.fit_sizes:
            lowest = sizes[0]
            options.append([math.log2(v / self.base_sizes[0]) for v in _rounded(lowest, (0, 1)) if v > 0])
        if self.fit_ratios:
            options += [[math.log(v) for v in _rounded(ratio, (1, 2)) if v > 0] for ratio in ratios]
        coordinates = self._coordinates()
        if math.prod(len(o) for o in options) <= 243:
            chosen = None
            for values in itertools.product(*options):  # coarsest first; the fit itself is among them
                point = self.best
                for c, value in zip(coordinates, values):
                    point = self._moved(point, c, value)
                key = self.score(*point)
                if chosen is None or key > chosen[0]:
                    chosen = (key, point)
            if chosen[0] >= self.best_key:
                self.best_key, self.best = chosen
            return
        for c, values in zip(coordinates, options):
            for value in values:
                if self.consider(*self._moved(self.best, c, value), ties=True):
                    break


def _rounded(value: float, decimals: Sequence[int]) -> list[float]:
    """``value`` rounded to each number of decimals (coarsest first), distinct, then itself."""
    out = []
    for digits in sorted(decimals):
        v = round(value, digits)
        if v not in out and v != value:
            out.append(v)
    return out + [value]


def _ratio_candidates(aspect: np.ndarray, start: Sequence[float]) -> list[list[float]]:
    """Starting ratio sets (log values, as many as ``start``) for step 2 (module doc)."""
    count = len(start)
    candidates = [list(np.log(start))]
    if len(aspect):
        log_aspect = np.log(aspect[np.isfinite(aspect) & (aspect > 0)])
        candidates.append(list(np.quantile(log_aspect, (np.arange(count) + 0.5) / count)))
        median = float(np.median(log_aspect))
        offsets = np.linspace(-1.0, 1.0, count) if count > 1 else np.zeros(1)
        candidates += [list(median + offsets * math.log(spread)) for spread in RATIO_SPREADS]
    return candidates


def fit_anchors(records: Sequence[ImageRecord], config: ModelConfig, *, fit_sizes: bool = True,
                fit_ratios: bool = True, num_ratios: Optional[int] = None, max_boxes: int = MAX_BOXES,
                max_evaluations: int = MAX_EVALUATIONS, seed: int = 0) -> AnchorFit:
    """Search anchor sizes and/or ratios for the boxes of ``records`` under ``config``.

    Args:
        records: the dataset's ground truth (``fpndet.engine.inspect._records(dataset)``).
        config: the model; its sizes and ratios are the starting point (and the "before"), its
            scales, levels, resize, placement and foreground threshold are kept.
        fit_sizes, fit_ratios: what to search (the other stays as configured).
        num_ratios: ratios per location when fitting ratios (default: as many as the config's).
        max_boxes: the search uses a seeded random sample of at most this many boxes.
        max_evaluations: bound on distinct anchor sets scored.
        seed: of the box sample and of step 4's mutations (the fit is deterministic).

    Returns:
        :class:`AnchorFit`. Sizes keep the starting sizes' proportions between levels (module
        doc); with the config's number of ratios, the fit never scores below the start.
    """
    if not (fit_sizes or fit_ratios):
        raise ValueError("nothing to fit: fit_sizes and fit_ratios are both false")
    count = len(config.anchor_ratios) if num_ratios is None else num_ratios
    if count < 1 or (num_ratios is not None and not fit_ratios):
        raise ValueError(f"num_ratios={num_ratios}: expected >= 1, and only when fitting ratios")
    started = time.perf_counter()
    boxes = fit_boxes(records, config)
    start_ratios = list(config.anchor_ratios) if count == len(config.anchor_ratios) else _default_ratios(count)
    search_boxes = boxes
    if len(boxes) > max_boxes:
        generator = torch.Generator().manual_seed(seed)
        search_boxes = boxes.subset(torch.randperm(len(boxes), generator=generator)[:max_boxes])
    search = _Search(search_boxes, config, start_ratios, fit_sizes=fit_sizes, fit_ratios=fit_ratios,
                     max_evaluations=max_evaluations, seed=seed)
    if len(search_boxes):
        with _one_thread():
            search.run()
    sizes, ratios = search.numbers(*search.best)
    fitted_config = config.replace(anchor_sizes=sizes, anchor_ratios=ratios)
    before = anchor_score(boxes, config)
    after = anchor_score(boxes, fitted_config)
    if after.key < before.key and count == len(config.anchor_ratios):  # possible on a sample: keep the start
        sizes, ratios, fitted_config, after = list(config.anchor_sizes), list(config.anchor_ratios), config, before
    return AnchorFit(
        sizes=sizes, ratios=ratios, config=fitted_config, before=before, after=after,
        fitted=tuple(name for name, on in (("anchor_sizes", fit_sizes), ("anchor_ratios", fit_ratios)) if on),
        evaluations=search.evaluations, seconds=time.perf_counter() - started, searched_boxes=len(search_boxes),
        start={"anchor_sizes": list(config.anchor_sizes), "anchor_ratios": list(config.anchor_ratios)},
    )


@contextlib.contextmanager
def _one_thread():
    """The search's tensors are small: one thread is faster than two (and than any on a busy
    machine); the caller's setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# model.anchor_sizes=auto / model.anchor_ratios=auto
# --------------------------------------------------------------------------------------------
def resolve_auto_anchors(cfg: DictConfig, train_set, *, verbose: bool = True,
                         saved_config: Optional[Path] = None) -> Optional[AnchorFit]:
    """Replace ``auto`` in ``cfg.model.anchor_sizes`` / ``anchor_ratios`` by numbers fitted to
    ``train_set``'s boxes (:func:`fit_anchors`), in place, before the model is built; the run's
    ``config.yaml`` then records the numbers. Returns the fit, or None when nothing is ``auto``.

    The starting point, and the "before" printed, is the paper's anchors for the fields left
    ``auto`` (:func:`fpndet.config.model_config` with ``reference_anchors=True``).

    Args:
        saved_config: a resumed run's ``config.yaml``: when it holds numbers for the ``auto``
            fields, they are taken as they are (no refit), so a resumed run keeps its anchors.
    """
    fields = auto_anchor_fields(cfg)
    if not fields:
        return None
    if saved_config is not None and Path(saved_config).exists():
        saved = OmegaConf.load(saved_config).get("model", {})
        values = {key: saved.get(key) for key in fields}
        if all(isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0 for v in values.values()):
            set_fitted_anchors(cfg, **{key: [float(x) for x in v] for key, v in values.items()})
            if verbose:
                print(f"anchors (auto) from {saved_config}: "
                      + " ".join(f"model.{key}={_fmt(cfg.model[key])}" for key in fields), flush=True)
            return None
    reference = model_config(cfg, reference_anchors=True)
    fit = fit_anchors(_records(train_set), reference, fit_sizes="anchor_sizes" in fields,
                      fit_ratios="anchor_ratios" in fields)
    set_fitted_anchors(cfg, **{key: {"anchor_sizes": fit.sizes, "anchor_ratios": fit.ratios}[key] for key in fields})
    if verbose:
        print(fit.table(start_label="paper"), flush=True)
        print("anchors (auto) for this run: " + " ".join(f"model.{key}={_fmt(cfg.model[key])}" for key in fields),
              flush=True)
    return fit
