"""Synthetic "shapes" dataset: coloured geometric shapes on textured backgrounds, no files needed.

Every image is generated from ``(seed, split, index)`` alone (a NumPy ``SeedSequence`` with that
entropy), so a dataset is reproducible and the splits never share an image (each split has its
own stream). An image holds 1 to ``max_objects`` shapes of the classes
:data:`SHAPE_CLASSES`, with sides drawn log-uniformly between ``min_object_size`` px and
``max_object_fraction`` of the shorter image side. Placement rejects a shape whose box would
cover more than 30 % of a smaller or larger already placed box (intersection over the smaller
area), so overlaps stay partial.

Shapes are filled with saturated colours (HSV saturation and value >= 0.7, so
``max(rgb) - min(rgb) >= 125``) over low-saturation backgrounds (tinted gradients, stripes or
blotches plus luminance noise; ``max(rgb) - min(rgb) <= 24``), and drawn without antialiasing
through Pillow masks. Each box is the exact tight box of the shape's *visible* pixels in
pixel-edge xyxy (pixel columns ``c0..c1`` -> ``x1 = c0, x2 = c1 + 1``): shapes are painted in
order, later ones covering earlier ones, and a shape with less than half of its pixels visible
is left out of the image altogether.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw

from fpndet.data.dataset import DetectionDataset
from fpndet.data.records import ImageRecord

__all__ = ["ShapesDataset", "SHAPE_CLASSES", "DEFAULT_NUM_IMAGES"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
DEFAULT_NUM_IMAGES = {"train": 2000, "val": 200, "test": 200}
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
_MAX_OVERLAP_OF_SMALLER = 0.3
_MIN_VISIBLE_FRACTION = 0.5
_PLACEMENT_ATTEMPTS = 30
_MIN_SATURATION, _MIN_VALUE = 0.7, 0.7


class ShapesDataset(DetectionDataset):
    """Deterministic synthetic detection data (see the module doc).

    Args:
        split: "train", "val" or "test" (independent random streams).
        num_images: dataset length; default 2000 for train, 200 for val/test.
        image_size: ``(H, W)`` in pixels.
        seed: base seed; with ``split`` and the index it fixes every image.
        transforms: optional ``(image, target) -> (image, target)`` callable.
        min_object_size: smallest shape side in pixels.
        max_object_fraction: largest shape side as a fraction of ``min(H, W)``.
        max_objects: most shapes per image (at least one).

    Samples have ``image_id = index`` and ``file_name = "shapes/<split>/<index>.png"`` (virtual).
    """

    has_image_files = False  # generated in memory: nothing on disk to check

    def __init__(
        self,
        *,
        split: str = "train",
        num_images: int | None = None,
        image_size: tuple[int, int] = (320, 320),
        seed: int = 0,
        transforms: Callable | None = None,
        min_object_size: int = 12,
        max_object_fraction: float = 0.6,
        max_objects: int = 6,
    ):
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        height, width = (int(v) for v in image_size)
        largest = int(max_object_fraction * min(height, width))
        if not 1 <= min_object_size <= largest:
            raise ValueError(f"min_object_size {min_object_size} must be in [1, {largest}] for image_size {image_size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        super().__init__(class_names=SHAPE_CLASSES, transforms=transforms)
        self.split = split
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
        self.image_size = (height, width)
        self.seed = int(seed)
        self.min_object_size = int(min_object_size)
        self.max_object_size = largest
        self.max_objects = int(max_objects)
        self.image_ids = list(range(self.num_images))

    def __len__(self) -> int:
        return self.num_images

    def annotation(self, index: int) -> ImageRecord:
        """Ground truth of image ``index`` (shapes are laid out, not painted)."""
        return self._generate(index, paint=False)[1]

    def load(self, index: int) -> tuple[torch.Tensor, ImageRecord]:
        """Image uint8 ``[3, H, W]`` and ground truth of image ``index``."""
        return self._generate(index, paint=True)

    def _generate(self, index: int, *, paint: bool) -> tuple[torch.Tensor | None, ImageRecord]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index])
        height, width = self.image_size
        shapes = _place_shapes(rng, height, width, self.min_object_size, self.max_object_size, self.max_objects)
        masks = [_shape_mask(shape, (width, height)) for shape in shapes]
        visible, boxes = _visible_shapes(masks)
        record = ImageRecord(
            image_id=index,
            file_name=f"shapes/{self.split}/{index}.png",
            height=height,
            width=width,
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.array([shapes[i]["label"] for i in visible], dtype=np.int64),
            iscrowd=np.zeros(len(visible), dtype=bool),
        )
        if not paint:
            return None, record
        canvas = Image.fromarray(_background(rng, height, width))
        for i in visible:
            x0, y0, side = shapes[i]["extent"]
            region = (x0, y0, x0 + side, y0 + side)
            canvas.paste(shapes[i]["colour"], region, masks[i].crop(region))
        image = torch.from_numpy(np.ascontiguousarray(np.asarray(canvas).transpose(2, 0, 1)))
        return image, record


def _place_shapes(rng: np.random.Generator, height: int, width: int, smallest: int, largest: int, count_max: int):
    """Random shape specs (label, integer square extent, colour, variant), partial overlaps only."""
    count = int(rng.integers(1, count_max + 1))
    shapes, boxes = [], np.zeros((0, 4))
    for _ in range(count):
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            side = int(round(math.exp(rng.uniform(math.log(smallest), math.log(largest)))))
            x0 = int(rng.integers(0, width - side + 1))
            y0 = int(rng.integers(0, height - side + 1))
            box = np.array([[x0, y0, x0 + side, y0 + side]], dtype=np.float64)
            if _max_overlap_of_smaller(box, boxes) <= _MAX_OVERLAP_OF_SMALLER:
                break
        else:
            continue
        boxes = np.concatenate([boxes, box])
        hue = rng.uniform()
        saturation, value = rng.uniform(_MIN_SATURATION, 1.0), rng.uniform(_MIN_VALUE, 1.0)
        colour = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        shapes.append(
            {
                "label": int(rng.integers(len(SHAPE_CLASSES))),
                "extent": (x0, y0, side),
                "colour": colour,
                "turns": int(rng.integers(4)),
                "arm": float(rng.uniform(0.28, 0.4)),
            }
        )
    return shapes


def _max_overlap_of_smaller(box: np.ndarray, others: np.ndarray) -> float:
    """Largest intersection / smaller-area between ``box [1, 4]`` and ``others [M, 4]``."""
    if len(others) == 0:
        return 0.0
    top_left = np.maximum(box[:, :2], others[:, :2])
    bottom_right = np.minimum(box[:, 2:], others[:, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=1)
    areas = (others[:, 2:] - others[:, :2]).prod(axis=1)
    smaller = np.minimum(areas, (box[0, 2:] - box[0, :2]).prod())
    return float((intersection / smaller).max())


def _shape_mask(shape: dict, size_wh: tuple[int, int]) -> Image.Image:
    """Binary ``L`` mask (0/255) of one shape, drawn inside its ``side x side`` square."""
    mask = Image.new("L", size_wh, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, side = shape["extent"]
    x1, y1 = x0 + side - 1, y0 + side - 1
    name = SHAPE_CLASSES[shape["label"]]
    if name == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif name == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif name == "triangle":
        draw.polygon(_triangle(x0, y0, x1, y1, shape["turns"]), fill=255)
    else:
        arm = max(2, int(round(shape["arm"] * side)))
        start = x0 + (side - arm) // 2
        draw.rectangle([start, y0, start + arm - 1, y1], fill=255)
        start = y0 + (side - arm) // 2
        draw.rectangle([x0, start, x1, start + arm - 1], fill=255)
    return mask


def _triangle(x0: int, y0: int, x1: int, y1: int, turns: int) -> list[tuple[float, float]]:
    """Isosceles triangle filling the square, apex up/right/down/left for turns 0..3."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [
        [(cx, y0), (x1, y1), (x0, y1)],
        [(x1, cy), (x0, y1), (x0, y0)],
        [(cx, y1), (x0, y0), (x1, y0)],
        [(x0, cy), (x1, y0), (x1, y1)],
    ][turns]


def _visible_shapes(masks: list[Image.Image]) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """Indices (in painting order) of the shapes at least half visible, and their tight boxes.

    Shape ``i`` is covered by the kept shapes painted after it; dropping a shape only uncovers
    earlier ones, so one pass from the last shape to the first decides every shape.
    """
    if not masks:
        return [], []
    cover = Image.new("L", masks[0].size, 0)
    kept, boxes = [], []
    for i in range(len(masks) - 1, -1, -1):
        visible = ImageChops.subtract(masks[i], cover)
        drawn = masks[i].histogram()[255]
        if drawn == 0 or visible.histogram()[255] < _MIN_VISIBLE_FRACTION * drawn:
            continue
        kept.append(i)
        boxes.append(visible.getbbox())
        cover = ImageChops.lighter(cover, masks[i])
    return kept[::-1], boxes[::-1]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation texture uint8 ``[H, W, 3]``: gradient, stripes or blotches, plus noise."""
    kind = int(rng.integers(3))
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
    ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.sin(angle))
    along = xs + ys
    if kind == 0:
        low = float(xs.min() + ys.min())
        span = float(xs.max() + ys.max()) - low or 1.0
        gray = rng.uniform(70, 180) + np.float32(rng.uniform(-50, 50) / span) * (along - np.float32(low))
    elif kind == 1:
        period = rng.uniform(6, 40)
        gray = rng.uniform(80, 170) + rng.uniform(10, 30) * np.sin(along * np.float32(2 * math.pi / period))
    else:
        cells = rng.uniform(60, 190, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        gray = np.asarray(Image.fromarray(cells).resize((width, height), Image.BILINEAR))
    gray = gray + rng.integers(-12, 13, size=(height, width), dtype=np.int16)
    tint = rng.uniform(-12, 12, size=3).astype(np.float32)
    pixels = gray.astype(np.float32)[:, :, None] + tint
    return np.clip(pixels, 0, 255, out=pixels).round().astype(np.uint8)
