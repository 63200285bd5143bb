"""Tiled (sliced) inference for large images with small objects.

A detector resizes every input so that its short side is its ``min_size``: a 1280 px image given
to a model trained at 320 px is shrunk 4x, and a 20 px object becomes 5 px, smaller than the
anchors of the finest pyramid level. :class:`TiledDetector` runs the model on overlapping crops
(tiles) instead, and merges what it finds:

1. **Layout** (:func:`tile_layout`): tiles of ``size x size`` pixels (the image's side where it is
   shorter) start every ``round(size * (1 - overlap))`` pixels; the last row and column are moved
   back to end at the image's border (they overlap their neighbour more), so every tile has the
   same size and lies inside the image. An image no larger than a tile is one tile.
2. **Inference**: the tiles of all images of a call (and, with ``full_image``, the whole images:
   objects larger than a tile) run through the model ``batch_size`` at a time. Each tile goes
   through the model's own pre-processing as any image: resized so that its short side is the
   model's ``min_size``. A tile of the model's ``min_size`` is thus seen at its original scale, a
   smaller one enlarged, a larger one shrunk (less than the whole image would be).
3. **Objects cut by a tile edge.** A detection touching an inner edge of its tile (within
   ``edge_margin`` of the tile size; the image border does not count) is the visible part of an
   object that may go on in the next tile:

   - when the neighbouring tile(s) across the touched edge(s) contain the whole box without it
     touching their own edge there (by more than ``edge_margin``), that tile saw everything this
     one saw and more, uncut: the box is dropped (an object narrower than the overlap is found
     whole in a tile, once). The neighbour's margin is what makes this safe: a box that touches
     the edges of both tiles (an object about as wide as the overlap) is dropped by neither and
     stitched instead;
   - otherwise (an object larger than the overlap, which no tile sees whole) the cut boxes of
     neighbouring tiles are *stitched*: two cut boxes of the same class, from different tiles,
     that agree on the region both tiles see (each clipped to the other's tile, IoU >=
     ``stitch_iou``) are parts of one object; a connected group becomes one box whose every
     side is taken from the best-scoring member not cut on that side (the extreme one if all
     are), with the group's best score.
4. **Merge**: boxes shifted back to image pixels, then one class-wise NMS per image (the model's
   own IoU threshold; all images in one call, :func:`~fpndet.modeling.box_ops.batched_class_nms`)
   and the model's ``detections_per_image`` best.

The wrapper is called like the models (a list of float ``[3, H, W]`` images in [0, 1] -> one
``{"boxes", "scores", "labels"}`` per image) and exposes the wrapped detector's ``config``,
``postprocessor`` (its final stage: score threshold and detection cap, so that
:func:`~fpndet.engine.model_io.apply_inference_overrides` works through it), ``preprocessor`` and
``device``. It wraps a PyTorch detector or an :class:`~fpndet.deploy.runtime.OnnxDetector`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..modeling.box_ops import batched_class_nms
from ..modeling.postprocess import first_n_per_image
from .model_io import final_stage, model_device

LEFT, TOP, RIGHT, BOTTOM = range(4)


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one side of ``length`` pixels: every
    ``round(size * (1 - overlap))`` pixels, the last one moved back to end at ``length``; ``[0]``
    when ``length <= size``."""
    if length <= size:
        return [0]
    stride = max(1, int(round(size * (1.0 - overlap))))
    count = math.ceil((length - size) / stride) + 1
    return [i * stride for i in range(count - 1)] + [length - size]


class TileGrid(NamedTuple):
    """The tiles of one image.

    boxes: int64 ``[T, 4]`` xyxy pixel rectangles of the tiles, row by row.
    inner: bool ``[T, 4]``: whether each side (left, top, right, bottom) of a tile lies inside the
        image (a cut) rather than on its border.
    neighbour_edge: float ``[T, 4]``: across each inner side, the far edge of the neighbouring
        row/column of tiles (left: the previous column's right edge; top: the previous row's
        bottom; right: the next column's left edge; bottom: the next row's top); a box touching
        that side lies whole, and uncut, in the neighbour when it ends before (left/top) or starts
        after (right/bottom) it by more than the edge margin.
    """

    boxes: Tensor
    inner: Tensor
    neighbour_edge: Tensor


def tile_layout(height: int, width: int, size: int, overlap: float = 0.2) -> TileGrid:
    """The tiles covering an image of ``height x width`` pixels (module doc, step 1).

    Args:
        size: tile side in pixels (tiles are ``min(size, height) x min(size, width)``).
        overlap: fraction of ``size`` shared by neighbouring tiles, in [0, 1).
    """
    check_tiling(size, overlap)
    ys, xs = tile_starts(height, size, overlap), tile_starts(width, size, overlap)
    tile_h, tile_w = min(size, height), min(size, width)
    boxes, inner, edges = [], [], []
    for r, y0 in enumerate(ys):
        for c, x0 in enumerate(xs):
            boxes.append([x0, y0, x0 + tile_w, y0 + tile_h])
            inner.append([c > 0, r > 0, c < len(xs) - 1, r < len(ys) - 1])
            edges.append([xs[c - 1] + tile_w if c > 0 else 0, ys[r - 1] + tile_h if r > 0 else 0,
                          xs[c + 1] if c < len(xs) - 1 else width, ys[r + 1] if r < len(ys) - 1 else height])
    return TileGrid(torch.tensor(boxes, dtype=torch.int64), torch.tensor(inner, dtype=torch.bool),
                    torch.tensor(edges, dtype=torch.float32))


def check_tiling(size: int, overlap: float) -> None:
    """Raise :class:`InputError` for a tile size below 1 px or an overlap outside [0, 1)."""
    if int(size) != size or size < 1:
        raise InputError(None, f"--tile must be a positive number of pixels, got {size}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(None, f"--tile-overlap must be a fraction in [0, 1), got {overlap}")


class TiledDetector:
    """A detector run on overlapping tiles of each image (module doc).

    Args:
        detector: a fpndet model in eval mode or an :class:`~fpndet.deploy.runtime.OnnxDetector`
            (RetinaNet or Faster R-CNN; not an RPN or a Fast R-CNN on fixed proposals).
        tile_size: tile side in pixels.
        overlap: fraction of a tile shared with its neighbour (default 0.2).
        full_image: also run the model on each whole image (for objects larger than a tile).
        batch_size: tiles (and whole images) per model call.
        edge_margin: a box within this fraction of the tile size of an inner tile edge touches it.
        stitch_iou: IoU two cut boxes must have in the region their tiles share to be joined.

    Raises:
        InputError: a bad tile size or overlap, or a detector that cannot be tiled.
    """

    def __init__(self, detector, tile_size: int, *, overlap: float = 0.2, full_image: bool = False,
                 batch_size: int = 8, edge_margin: float = 0.02, stitch_iou: float = 0.5):
        check_tiling(tile_size, overlap)
        arch = detector.config.arch
        if arch in ("rpn", "fast_rcnn"):
            raise InputError(None, f"tiled inference runs detectors (retinanet, faster_rcnn), not a {arch} model")
        self.detector = detector
        self.tile_size, self.overlap, self.full_image = int(tile_size), float(overlap), bool(full_image)
        self.batch_size = max(1, int(batch_size))
        self.edge_margin, self.stitch_iou = float(edge_margin), float(stitch_iou)

    # -- the wrapped detector's interface ------------------------------------------------------
    @property
    def config(self):
        return self.detector.config

    @property
    def postprocessor(self):
        """The wrapped detector's final stage (score threshold, detection cap, NMS threshold)."""
        return final_stage(self.detector)

    @property
    def preprocessor(self):
        return self.detector.preprocessor

    @property
    def device(self) -> torch.device:
        return model_device(self.detector)

    @property
    def training(self) -> bool:
        return bool(self.detector.training)

    def eval(self):
        self.detector.eval()
        return self

    def train(self, mode: bool = True):
        self.detector.train(mode)
        return self

    def to(self, device):
        self.detector = self.detector.to(device)
        return self

    def __repr__(self) -> str:
        return (f"TiledDetector(tile_size={self.tile_size}, overlap={self.overlap}, full_image={self.full_image}, "
                f"batch_size={self.batch_size}, detector={type(self.detector).__name__})")

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: Sequence[Tensor], **kwargs) -> list[dict[str, Tensor]]:
        """Detections ``{"boxes" [N, 4] xyxy pixels of the image, "scores" [N], "labels" [N]}``
        for each float ``[3, H, W]`` image in [0, 1], sorted by decreasing score."""
        if kwargs:
            raise TypeError(f"tiled inference takes images only, not {', '.join(sorted(kwargs))}")
        if len(images) == 0:
            raise ValueError("no images: expected a list of [3, H, W] tensors")
        grids = [tile_layout(int(img.shape[-2]), int(img.shape[-1]), self.tile_size, self.overlap) for img in images]
        # (image index, tile index or -1 for the whole image, crop) for every model input
        inputs = []
        for i, (image, grid) in enumerate(zip(images, grids)):
            for t, (x0, y0, x1, y1) in enumerate(grid.boxes.tolist()):
                inputs.append((i, t, image[:, y0:y1, x0:x1]))
            if self.full_image and len(grid.boxes) > 1:
                inputs.append((i, -1, image))
        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            outputs.extend(self.detector([crop for _, _, crop in chunk]))
        return self._merge(images, grids, inputs, outputs)

    def _merge(self, images, grids: list[TileGrid], inputs, outputs) -> list[dict[str, Tensor]]:
        device = outputs[0]["boxes"].device
        counts = torch.tensor([len(o["boxes"]) for o in outputs], device=device)
        boxes = torch.cat([o["boxes"].float() for o in outputs]).reshape(-1, 4)
        scores = torch.cat([o["scores"].float() for o in outputs])
        labels = torch.cat([o["labels"].long() for o in outputs])
        image_of_input = torch.tensor([i for i, _, _ in inputs], device=device)
        # global tile index (over the tiles of all images); -1 for whole-image passes
        offsets = [0]
        for grid in grids[:-1]:
            offsets.append(offsets[-1] + len(grid.boxes))
        tile_of_input = torch.tensor([offsets[i] + t if t >= 0 else -1 for i, t, _ in inputs], device=device)
        image = image_of_input.repeat_interleave(counts)
        tile = tile_of_input.repeat_interleave(counts)

        rects = torch.cat([g.boxes for g in grids]).to(device=device, dtype=torch.float32)
        inner = torch.cat([g.inner for g in grids]).to(device)
        edges = torch.cat([g.neighbour_edge for g in grids]).to(device)
        from_tile = tile >= 0
        rect = rects[tile.clamp(min=0)]
        boxes = boxes + torch.where(from_tile[:, None], rect[:, :2].repeat(1, 2), torch.zeros_like(rect))

        # cut boxes (step 3 of the module doc)
        margin = self.edge_margin * self.tile_size
        touch = inner[tile.clamp(min=0)] & from_tile[:, None] & torch.stack([
            boxes[:, 0] <= rect[:, 0] + margin, boxes[:, 1] <= rect[:, 1] + margin,
            boxes[:, 2] >= rect[:, 2] - margin, boxes[:, 3] >= rect[:, 3] - margin], dim=1)
        edge = edges[tile.clamp(min=0)]
        # whole in the neighbour and not touching its edge there (the negation of `touch` in it):
        # with `<= edge + margin` a box touching the edges of both tiles was dropped by both
        inside_neighbour = torch.stack([
            boxes[:, 2] < edge[:, 0] - margin, boxes[:, 3] < edge[:, 1] - margin,
            boxes[:, 0] > edge[:, 2] + margin, boxes[:, 1] > edge[:, 3] + margin], dim=1)
        cut = touch.any(dim=1)
        covered = (~touch | inside_neighbour).all(dim=1)
        stitch = cut & ~covered
        whole = ~cut
        parts = [(boxes[whole], scores[whole], labels[whole], image[whole])]
        if bool(stitch.any()):
            parts.append(self._stitch(boxes[stitch], scores[stitch], labels[stitch], image[stitch],
                                      tile[stitch], touch[stitch], rects))
        boxes, scores, labels, image = (torch.cat(p) for p in zip(*parts))

        final = self.postprocessor
        nms_thresh = getattr(final, "nms_thresh", self.config.nms_thresh)
        limit = getattr(final, "detections_per_image", self.config.detections_per_image)
        num_labels = int(labels.max()) + 1 if labels.numel() else 1
        keep = batched_class_nms(boxes, scores, image * num_labels + labels, nms_thresh)
        keep = keep[first_n_per_image(image[keep], limit)]
        keep = keep[torch.sort(image[keep], stable=True).indices]
        per_image = torch.bincount(image[keep], minlength=len(images)).tolist()
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in
                zip(boxes[keep].split(per_image), scores[keep].split(per_image), labels[keep].split(per_image))]

    def _stitch(self, boxes: Tensor, scores: Tensor, labels: Tensor, image: Tensor, tile: Tensor,
                touch: Tensor, rects: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Join cut boxes that are parts of one object (module doc, step 3): one box per group."""
        # tiles are numbered over all images: boxes of different images never share or neighbour one,
        # but they can overlap in pixels, hence the image in the pairing
        pairs = self._agree(boxes, image * (int(labels.max()) + 1) + labels, tile, rects)
        # first: each group's smallest member (the component's label); group: each box's group
        first, group = torch.unique(_connected(len(boxes), pairs), return_inverse=True)
        count = len(first)
        # each side from the best-scoring member not cut on it; the extreme one when all are
        side_boxes = []
        for side in range(4):
            coordinate = boxes[:, side]
            free = ~touch[:, side]
            best = torch.full((count,), -1.0, device=boxes.device).scatter_reduce(
                0, group, torch.where(free, scores, torch.full_like(scores, -1.0)), "amax")
            chosen = free & (scores == best[group])
            taken = torch.zeros(count, device=boxes.device).scatter_reduce(
                0, group[chosen], coordinate[chosen], "mean", include_self=False)
            extreme = torch.zeros(count, device=boxes.device).scatter_reduce(
                0, group, coordinate, "amin" if side < 2 else "amax", include_self=False)
            side_boxes.append(torch.where(best >= 0, taken, extreme))
        merged = torch.stack(side_boxes, dim=1)
        best_score = torch.zeros(count, device=boxes.device).scatter_reduce(
            0, group, scores, "amax", include_self=False)
        return merged, best_score, labels[first], image[first]

    def _agree(self, boxes: Tensor, groups: Tensor, tile: Tensor, rects: Tensor, *, chunk: int = 512) -> Tensor:
        """int64 ``[2, E]`` pairs (i, j) of boxes of the same group (image and class) from different tiles that,
        each clipped to the other's tile, overlap with IoU >= ``stitch_iou`` (computed ``chunk``
        rows at a time: memory ``chunk x n``)."""
        rect = rects[tile]
        pairs = []
        for start in range(0, len(boxes), chunk):
            rows = slice(start, start + chunk)
            # a[i, j]: box i clipped to tile j; b[i, j]: box j clipped to tile i
            a = torch.cat([torch.maximum(boxes[rows, None, :2], rect[None, :, :2]),
                           torch.minimum(boxes[rows, None, 2:], rect[None, :, 2:])], dim=-1)
            b = torch.cat([torch.maximum(boxes[None, :, :2], rect[rows, None, :2]),
                           torch.minimum(boxes[None, :, 2:], rect[rows, None, 2:])], dim=-1)
            inter = _area(torch.cat([torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])], -1))
            union = _area(a) + _area(b) - inter
            agree = ((groups[rows, None] == groups[None, :]) & (tile[rows, None] != tile[None, :])
                     & (inter > 0) & (inter >= self.stitch_iou * union))
            i, j = agree.nonzero(as_tuple=True)
            pairs.append(torch.stack([i + start, j]))
        return torch.cat(pairs, dim=1)


def _area(boxes: Tensor) -> Tensor:
    """Areas of xyxy boxes, 0 for empty ones (x2 <= x1 or y2 <= y1)."""
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)


def _connected(count: int, pairs: Tensor) -> Tensor:
    """Connected components of the graph of ``count`` nodes and edges ``pairs [2, E]``: each
    node's smallest member."""
    component = torch.arange(count, device=pairs.device)
    src, dst = torch.cat([pairs, pairs.flip(0)], dim=1)
    while True:
        updated = component.scatter_reduce(0, dst, component[src], "amin")
        if torch.equal(updated, component):
            return component
        component = updated
