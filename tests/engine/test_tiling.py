"""Tiled inference (fpndet.engine.tiling): the tile layout, objects cut by tile borders found once,
the options, batching, the score threshold through the wrapper, and ``--tile`` on the CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fpndet.cli import main
from fpndet.engine.checkpoints import save_model_weights
from fpndet.engine.model_io import apply_inference_overrides, load_detector
from fpndet.engine.tiling import TiledDetector, tile_layout, tile_starts
from fpndet.errors import InputError
from fpndet.modeling.build import build_model
from fpndet.modeling.config import ModelConfig


# --------------------------------------------------------------------------------------------
# A fake detector that finds the painted rectangles of what it is given
# --------------------------------------------------------------------------------------------
class RectangleFinder:
    """Finds each rectangle :func:`painted` drew, as far as the image it is given shows it: the
    box of the pixels of each id in channel 0, the label in channel 1, the score in channel 2.
    ``whole_only``: miss rectangles that touch the border of the given image (a model that does
    not recognise a cut object). Records the (h, w) of every input of every call."""

    def __init__(self, *, whole_only: bool = False, detections_per_image: int = 100):
        self.config = SimpleNamespace(arch="retinanet", num_classes=4, nms_thresh=0.5,
                                      detections_per_image=detections_per_image)
        self.postprocessor = SimpleNamespace(score_thresh=0.05, nms_thresh=0.5,
                                             detections_per_image=detections_per_image)
        self.device, self.training, self.whole_only = torch.device("cpu"), False, whole_only
        self.calls: list[list[tuple[int, int]]] = []

    def eval(self):
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def __call__(self, images):
        self.calls.append([tuple(image.shape[-2:]) for image in images])
        return [self.detect(image) for image in images]

    def detect(self, image):
        found = []
        height, width = image.shape[-2:]
        for value in image[0].unique().tolist():
            if value == 0:
                continue
            ys, xs = (image[0] == value).nonzero(as_tuple=True)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            if self.whole_only and (box[0] == 0 or box[1] == 0 or box[2] == width or box[3] == height):
                continue
            score = float(image[2, ys[0], xs[0]])
            if score >= self.postprocessor.score_thresh:
                found.append((box, score, round(float(image[1, ys[0], xs[0]]) * 10)))
        found = sorted(found, key=lambda f: -f[1])[: self.postprocessor.detections_per_image]
        return {"boxes": torch.tensor([f[0] for f in found], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([f[1] for f in found], dtype=torch.float32),
                "labels": torch.tensor([f[2] for f in found], dtype=torch.int64)}


def painted(height: int, width: int, rectangles) -> torch.Tensor:
    """A float [3, H, W] image with each ``(x1, y1, x2, y2, label, score)`` painted (module doc)."""
    image = torch.zeros(3, height, width)
    for k, (x1, y1, x2, y2, label, score) in enumerate(rectangles):
        image[0, y1:y2, x1:x2] = (k + 1) / 1000
        image[1, y1:y2, x1:x2] = label / 10
        image[2, y1:y2, x1:x2] = score
    return image


def as_list(detections: dict) -> list[tuple]:
    return [(tuple(b), round(s, 4), lab) for b, s, lab in
            zip(detections["boxes"].tolist(), detections["scores"].tolist(), detections["labels"].tolist())]


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(1280, 1280), (700, 1000), (321, 959), (100, 2000), (320, 320), (50, 40)])
@pytest.mark.parametrize("size,overlap", [(320, 0.2), (320, 0.0), (256, 0.5), (500, 0.25)])
def test_tiles_cover_the_image_with_the_overlap_and_end_at_its_border(height, width, size, overlap):
    grid = tile_layout(height, width, size, overlap)
    boxes = grid.boxes
    tile_h, tile_w = min(size, height), min(size, width)
    assert ((boxes[:, 2] - boxes[:, 0]) == tile_w).all() and ((boxes[:, 3] - boxes[:, 1]) == tile_h).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    covered = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    for length, tile, starts in ((height, tile_h, tile_starts(height, size, overlap)),
                                 (width, tile_w, tile_starts(width, size, overlap))):
        assert starts[0] == 0 and starts[-1] + tile == length  # the last row/column ends at the border
        assert starts == sorted(set(starts))
        for a, b in zip(starts, starts[1:]):  # neighbours share at least the asked overlap
            assert a + tile - b >= round(overlap * size) - 1e-9
        steps = [b - a for a, b in zip(starts, starts[1:])]  # and no more, but the last one
        assert all(step == max(1, round(size * (1 - overlap))) for step in steps[:-1])
        assert all(0 < step <= max(1, round(size * (1 - overlap))) for step in steps[-1:])
    assert len(boxes) == len(tile_starts(height, size, overlap)) * len(tile_starts(width, size, overlap))
    # inner sides are exactly those not on the image border
    assert torch.equal(grid.inner[:, 0], boxes[:, 0] > 0) and torch.equal(grid.inner[:, 1], boxes[:, 1] > 0)
    assert torch.equal(grid.inner[:, 2], boxes[:, 2] < width) and torch.equal(grid.inner[:, 3], boxes[:, 3] < height)


def test_an_image_no_larger_than_a_tile_is_one_tile():
    assert tile_layout(300, 320, 320).boxes.tolist() == [[0, 0, 320, 300]]
    assert tile_layout(320, 320, 320).boxes.tolist() == [[0, 0, 320, 320]]
    assert tile_starts(1280, 320, 0.2) == [0, 256, 512, 768, 960]


@pytest.mark.parametrize("size,overlap", [(0, 0.2), (-5, 0.2), (320, 1.0), (320, -0.1)])
def test_bad_tile_size_or_overlap_is_refused(size, overlap):
    with pytest.raises(InputError, match="--tile"):
        tile_layout(100, 100, size, overlap)
    with pytest.raises(InputError, match="--tile"):
        TiledDetector(RectangleFinder(), size, overlap=overlap)


# --------------------------------------------------------------------------------------------
# Objects cut by tile borders
# --------------------------------------------------------------------------------------------
# tiles of 320 px with overlap 0.2 on a 640 x 800 image: columns start at 0, 256, 480; rows at 0, 256,
# 320 (the last row and column end at the border). Inner edges: x = 256, 320, 480, 576 and y = 256, 320.
BORDER_CASES = {
    "across one vertical edge": (300, 100, 340, 140),
    "across an edge, mostly in the next tile": (250, 30, 290, 70),
    "across a horizontal edge": (100, 240, 140, 280),
    "across a corner of four tiles": (240, 240, 280, 280),
    "wider than the overlap": (150, 100, 430, 180),
    "across a corner, larger than the overlap": (200, 200, 400, 400),
    "wider than a tile": (100, 120, 700, 200),
    "in an overlap, touching no edge": (270, 270, 310, 310),
    # about as wide as the overlap: within the edge margin (6.4 px) of the edges of both tiles
    "as wide as the overlap, touching both tiles' edges": (252, 100, 318, 140),
    "inside an overlap, touching both of its edges": (258, 100, 318, 140),
    "as tall as the overlap, touching both tiles' edges": (100, 252, 140, 318),
    "just wider than the overlap, a few px into one tile": (252, 100, 330, 140),
}


@pytest.mark.parametrize("box", list(BORDER_CASES.values()), ids=list(BORDER_CASES))
def test_an_object_spanning_a_tile_border_is_found_exactly_once(box):
    finder = RectangleFinder()
    image = painted(640, 800, [(*box, 2, 0.9)])
    detections = TiledDetector(finder, 320, overlap=0.2)([image])
    assert as_list(detections[0]) == [(tuple(float(v) for v in box), 0.9, 2)]
    # the tiles did see it several times, some of them cut
    seen = sum(len(finder.detect(image[:, y1:y2, x1:x2])["boxes"])
               for x1, y1, x2, y2 in tile_layout(640, 800, 320, 0.2).boxes.tolist())
    assert seen >= 2


@pytest.mark.parametrize("vertical", [False, True], ids=["across a vertical edge", "across a horizontal edge"])
def test_objects_of_every_width_and_place_around_an_overlap_are_found_once(vertical):
    """Tiles of 320 px, overlap 0.2 on a 576 px side: two tiles [0, 320) and [256, 576), edge
    margin 6.4 px. Objects of widths about the overlap (64 px), at every position around it (in
    one tile, touching one edge, both, cut by both), are each found once with their own box; the
    images run as one batch (so cut boxes of different images at the same place must not join)."""
    cases = [(x1, x1 + width) for width in range(40, 101, 6) for x1 in range(236, 276, 3)]
    images = []
    for k, (x1, x2) in enumerate(cases):
        image = painted(64, 576, [(x1, 10, x2, 50, k % 3, 0.9)])
        images.append(image.transpose(1, 2) if vertical else image)
    found = TiledDetector(RectangleFinder(), 320, overlap=0.2, batch_size=64)(images)
    for k, ((x1, x2), detections) in enumerate(zip(cases, found)):
        box = (10.0, float(x1), 50.0, float(x2)) if vertical else (float(x1), 10.0, float(x2), 50.0)
        assert as_list(detections) == [(box, 0.9, k % 3)], (x1, x2)


def test_a_stitched_box_takes_each_side_from_the_best_part_not_cut_there():
    """Parts of one object seen by two tiles ([0, 320) and [256, 576) on x): each side of the
    joined box comes from the best-scoring part not cut on that side, the extreme one where all
    parts are cut; the score is the best part's (a union of the parts would differ)."""
    tiled = TiledDetector(RectangleFinder(), 320, overlap=0.2)
    rects = tile_layout(64, 576, 320, 0.2).boxes.float()
    boxes = torch.tensor([[250.0, 12, 320, 41], [256, 10, 400, 44],  # one object: cut right / cut left
                          [200, 0, 320, 64], [256, 0, 330, 64]])  # another, cut on both sides of y too
    touch = torch.tensor([[False, False, True, False], [True, False, False, False],
                          [False, True, True, True], [True, True, False, True]])
    merged, scores, labels, image = tiled._stitch(boxes, torch.tensor([0.9, 0.7, 0.4, 0.5]), torch.tensor([1, 1, 2, 2]),
                                                  torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1, 0, 1]),
                                                  touch, rects)
    assert merged.tolist() == [[250.0, 12.0, 400.0, 41.0], [200.0, 0.0, 330.0, 64.0]]
    assert scores.tolist() == pytest.approx([0.9, 0.5]) and labels.tolist() == [1, 2] and image.tolist() == [0, 0]


def test_neighbouring_objects_across_a_border_stay_apart():
    """Two shapes of one class side by side across a tile edge, one of another class overlapping
    them: each is found once, with its own box."""
    objects = [(290, 100, 318, 140, 1, 0.9), (322, 100, 360, 140, 1, 0.8), (300, 130, 340, 170, 3, 0.7),
               (240, 400, 300, 460, 1, 0.6), (300, 400, 360, 460, 1, 0.5)]
    detections = TiledDetector(RectangleFinder(), 320, overlap=0.2)([painted(640, 800, objects)])[0]
    assert sorted(as_list(detections)) == sorted(((float(a), float(b), float(c), float(d)), s, lab)
                                                 for a, b, c, d, lab, s in objects)


def test_many_objects_all_over_the_image_are_each_found_once():
    generator = torch.Generator().manual_seed(0)
    objects, taken = [], torch.zeros(700, 900, dtype=torch.bool)
    while len(objects) < 40:
        side = int(torch.randint(8, 120, (1,), generator=generator))
        x, y = (int(torch.randint(0, limit - side, (1,), generator=generator)) for limit in (900, 700))
        if taken[max(0, y - 2):y + side + 2, max(0, x - 2):x + side + 2].any():
            continue
        taken[y:y + side, x:x + side] = True
        objects.append((x, y, x + side, y + side, len(objects) % 4, round(0.3 + 0.01 * len(objects), 2)))
    detections = TiledDetector(RectangleFinder(), 256, overlap=0.25, batch_size=7)([painted(700, 900, objects)])[0]
    assert sorted(as_list(detections)) == sorted(((float(a), float(b), float(c), float(d)), s, lab)
                                                 for a, b, c, d, lab, s in objects)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
def test_overlap_sets_the_tiles_run():
    image = painted(640, 800, [(10, 10, 30, 30, 0, 0.9)])
    sizes = {}
    for overlap in (0.0, 0.2, 0.5):
        finder = RectangleFinder()
        TiledDetector(finder, 320, overlap=overlap, batch_size=100)([image])
        sizes[overlap] = [size for call in finder.calls for size in call]
        assert set(sizes[overlap]) == {(320, 320)}
    assert len(sizes[0.0]) == 2 * 3 and len(sizes[0.2]) == 3 * 3 and len(sizes[0.5]) == 3 * 4


def test_full_image_adds_a_whole_image_pass_that_finds_objects_larger_than_a_tile():
    big = (40, 60, 760, 600)  # larger than a 320 px tile both ways
    image = painted(640, 800, [(*big, 1, 0.8), (500, 500, 520, 520, 2, 0.7)])
    finder = RectangleFinder(whole_only=True)  # misses cut objects: tiles never see the big one
    tiles_only = TiledDetector(finder, 320)([image])[0]
    assert as_list(tiles_only) == [((500.0, 500.0, 520.0, 520.0), 0.7, 2)]
    assert all(size == (320, 320) for call in finder.calls for size in call)

    finder = RectangleFinder(whole_only=True)
    both = TiledDetector(finder, 320, full_image=True)([image])[0]
    assert sorted(as_list(both)) == [((40.0, 60.0, 760.0, 600.0), 0.8, 1), ((500.0, 500.0, 520.0, 520.0), 0.7, 2)]
    sizes = [size for call in finder.calls for size in call]
    assert sizes.count((640, 800)) == 1 and len(sizes) == 9 + 1

    # an image that is one tile is not run twice
    finder = RectangleFinder()
    TiledDetector(finder, 320, full_image=True)([painted(200, 300, [])])
    assert [size for call in finder.calls for size in call] == [(200, 300)]


def test_a_whole_image_pass_and_the_tiles_agree_on_one_box():
    objects = [(300, 100, 340, 140, 2, 0.9), (150, 150, 430, 230, 1, 0.6), (30, 500, 70, 540, 0, 0.5)]
    detections = TiledDetector(RectangleFinder(), 320, full_image=True)([painted(640, 800, objects)])[0]
    assert sorted(as_list(detections)) == sorted(((float(a), float(b), float(c), float(d)), s, lab)
                                                 for a, b, c, d, lab, s in objects)


def test_detections_per_image_cap_keeps_the_best():
    objects = [(20 + 60 * k, 20 + 40 * (k % 10), 60 + 60 * k, 50 + 40 * (k % 10), 0, 0.1 + 0.05 * k) for k in range(12)]
    detections = TiledDetector(RectangleFinder(detections_per_image=5), 256)([painted(500, 800, objects)])[0]
    assert len(detections["scores"]) == 5
    assert detections["scores"].tolist() == pytest.approx(sorted((o[5] for o in objects), reverse=True)[:5])


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def test_several_images_are_batched_and_each_gets_its_own_detections():
    images = [painted(640, 800, [(300, 100, 340, 140, 1, 0.9)]),
              painted(300, 200, [(10, 10, 50, 50, 2, 0.8)]),  # one tile
              painted(500, 1000, []),  # nothing
              painted(700, 700, [(200, 200, 400, 400, 3, 0.7), (600, 20, 680, 60, 0, 0.6)])]
    finder = RectangleFinder()
    batched = TiledDetector(finder, 320, batch_size=5, full_image=True)(images)
    tiles = sum(len(tile_layout(*img.shape[-2:], 320, 0.2).boxes) for img in images)
    inputs = [size for call in finder.calls for size in call]
    assert len(inputs) == tiles + 3  # + a whole-image pass for each image larger than a tile
    assert all(len(call) <= 5 for call in finder.calls) and len(finder.calls) == -(-len(inputs) // 5)
    one_by_one = [TiledDetector(RectangleFinder(), 320, full_image=True)([image])[0] for image in images]
    assert [as_list(d) for d in batched] == [as_list(d) for d in one_by_one]
    assert [len(d["boxes"]) for d in batched] == [1, 1, 0, 2]
    assert as_list(batched[3])[0] == ((200.0, 200.0, 400.0, 400.0), 0.7, 3)


# --------------------------------------------------------------------------------------------
# The wrapper's interface: score threshold, real models
# --------------------------------------------------------------------------------------------
def test_score_threshold_override_goes_through_the_wrapper():
    finder = RectangleFinder()
    tiled = TiledDetector(finder, 320)
    image = painted(640, 800, [(300, 100, 340, 140, 1, 0.9), (100, 400, 140, 440, 2, 0.3)])
    assert len(tiled([image])[0]["boxes"]) == 2
    previous = apply_inference_overrides(tiled, score_thresh=0.5)
    assert finder.postprocessor.score_thresh == 0.5 and tiled.postprocessor.score_thresh == 0.5
    assert as_list(tiled([image])[0]) == [((300.0, 100.0, 340.0, 140.0), 0.9, 1)]
    apply_inference_overrides(tiled, **previous)
    assert finder.postprocessor.score_thresh == 0.05 and len(tiled([image])[0]["boxes"]) == 2


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(**{"num_classes": 3, "backbone": "resnet18", "fpn_channels": 16, "min_size": [128],
                          "max_size": 128, "retinanet": {"head_channels": 16, "head_depth": 1}, **changes})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with a random 3-class ResNet-18 RetinaNet at 128 px, scores spread out."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-2.0)
        model.head.cls_logits.weight.mul_(10)
    folder = tmp_path_factory.mktemp("tiny_run")
    save_model_weights(folder / "best.safetensors", model.state_dict(), config=model.config.to_dict(),
                       metadata={"class_names": ["a", "b", "c"]})
    return folder


def test_real_model_through_the_wrapper(tiny_run):
    model, _ = load_detector(tiny_run)
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 300, 420, generator=generator), torch.rand(3, 100, 120, generator=generator)]
    tiled = TiledDetector(model, 128, overlap=0.25, batch_size=6)
    assert tiled.device == torch.device("cpu") and tiled.config is model.config and not tiled.training
    outputs = tiled(images)
    for image, found in zip(images, outputs):
        assert 0 < len(found["boxes"]) <= model.postprocessor.detections_per_image
        boxes = found["boxes"]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= image.shape[-1] + 1e-3).all()
        assert (boxes[:, 3] <= image.shape[-2] + 1e-3).all() and (found["scores"] >= 0.05).all()
        assert torch.equal(found["scores"], found["scores"].sort(descending=True).values)
    # an image no larger than a tile: the model's own detections (batched with other tiles: equal up to rounding)
    with torch.no_grad():
        alone = model([images[1]])[0]
    assert torch.equal(outputs[1]["labels"], alone["labels"])
    torch.testing.assert_close(outputs[1]["boxes"], alone["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(outputs[1]["scores"], alone["scores"], atol=1e-5, rtol=0)
    # the score threshold and the detection cap of the wrapped model apply to the merged result
    apply_inference_overrides(tiled, score_thresh=0.2, detections_per_image=7)
    capped = tiled(images)
    assert all(0 < len(d["boxes"]) <= 7 and (d["scores"] >= 0.2).all() for d in capped)
    with pytest.raises(TypeError, match="images only"):
        tiled(images, targets=[{}])


@pytest.mark.parametrize("arch", ["rpn", "fast_rcnn"])
def test_proposal_models_are_refused(arch):
    with pytest.raises(InputError, match=arch):
        TiledDetector(SimpleNamespace(config=SimpleNamespace(arch=arch)), 320)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def write_large_coco(root, *, images: int = 2):
    """Large noise images with a few small boxes, as a COCO dataset of classes a, b, c."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    generator = torch.Generator().manual_seed(0)
    content = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate("abc")]}
    for i in range(images):
        pixels = torch.randint(0, 255, (300, 500, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        content["images"].append({"id": i + 1, "file_name": f"{i}.png", "height": 300, "width": 500})
        for k in range(3):
            content["annotations"].append({"id": len(content["annotations"]) + 1, "image_id": i + 1,
                                           "category_id": 1 + k, "bbox": [50 + 120 * k, 40 + 60 * k, 20, 16],
                                           "area": 320, "iscrowd": 0})
    (root / "annotations" / "instances_val.json").write_text(json.dumps(content))
    return root / "annotations" / "instances_val.json"


class RecordedTiledDetector(TiledDetector):
    """A :class:`TiledDetector` that keeps each instance and what it returned (put in place of the
    one the CLI builds, to see its options reach the wrapper and its detections the output)."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.found = 0
        RecordedTiledDetector.instances.append(self)

    def __call__(self, images, **kwargs):
        outputs = super().__call__(images, **kwargs)
        self.found += sum(len(o["boxes"]) for o in outputs)
        return outputs


def test_eval_and_predict_with_tiles(tiny_run, tmp_path, capsys, monkeypatch):
    import fpndet.engine.tiling

    monkeypatch.setattr(fpndet.engine.tiling, "TiledDetector", RecordedTiledDetector)
    monkeypatch.setattr(RecordedTiledDetector, "instances", [])
    data = write_large_coco(tmp_path / "coco")
    out = tmp_path / "eval"
    assert main(["eval", "--weights", str(tiny_run), "--data", str(data), "--output", str(out), "--device", "cpu",
                 "--tile", "128", "--tile-overlap", "0.25", "--tile-full-image", "--score-thresh", "0.2"]) == 0
    text = capsys.readouterr().out
    assert "2 images in" in text and "tiles of 128 px" in text
    detections = json.loads((out / "detections.json").read_text())
    assert detections and min(d["score"] for d in detections) >= 0.2
    assert max(sum(d["image_id"] == i for d in detections) for i in (1, 2)) <= 100
    # the options reach the wrapper, and the detections evaluated are the wrapper's
    (tiled,) = RecordedTiledDetector.instances
    assert (tiled.tile_size, tiled.overlap, tiled.full_image, tiled.batch_size) == (128, 0.25, True, 4)
    assert tiled.postprocessor.score_thresh == 0.2 and tiled.found == len(detections)

    pred = tmp_path / "pred"
    assert main(["predict", "--weights", str(tiny_run), str(data.parent.parent / "images"), "--output", str(pred),
                 "--tile", "128", "--score-thresh", "0.4", "--no-draw", "--device", "cpu", "--workers", "0",
                 "--backend", "eager"]) == 0
    record = json.loads((pred / "0.json").read_text())
    assert record["width"] == 500 and all(d["score"] >= 0.4 for d in record["detections"])
    assert all(0 <= d["box"][0] <= d["box"][2] <= 500 + 1e-3 for d in record["detections"])
    tiled = RecordedTiledDetector.instances[-1]
    assert len(RecordedTiledDetector.instances) == 2 and (tiled.tile_size, tiled.overlap, tiled.full_image) == (128, 0.2, False)
    assert tiled.found == sum(len(json.loads((pred / f"{i}.json").read_text())["detections"]) for i in (0, 1))


@pytest.mark.parametrize("options,message", [
    (["--tile-full-image"], "--tile-full-image needs --tile"),
    (["--tile", "0"], "--tile must be a positive"),
    (["--tile", "128", "--tile-overlap", "1.5"], "--tile-overlap must be a fraction"),
])
def test_bad_tile_options_are_one_error(tiny_run, tmp_path, capsys, options, message):
    data = write_large_coco(tmp_path / "coco", images=1)
    assert main(["eval", "--weights", str(tiny_run), "--data", str(data), "--output", str(tmp_path / "e"),
                 "--device", "cpu", *options]) == 2
    err = capsys.readouterr().err
    assert f"fpndet eval: error: {message}" in err and "Traceback" not in err


def test_tile_options_in_help(capsys):
    for command in ("eval", "predict"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--tile SIZE" in text and "--tile-overlap" in text and "--tile-full-image" in text


def test_rpn_model_with_tiles_is_refused_naming_the_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch="rpn", num_classes=1, min_level=2, max_level=6,
                                    fpn_top_block="max_pool", anchor_sizes=[32.0, 64.0, 128.0, 256.0, 512.0],
                                    anchor_scales=[1.0]))
    path = tmp_path / "rpn.safetensors"
    save_model_weights(path, model.state_dict(), config=model.config.to_dict())
    data = write_large_coco(tmp_path / "coco", images=1)
    assert main(["eval", "--weights", str(path), "--data", str(data), "--tile", "128", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "--tile runs detectors" in err


def test_stitching_in_chunks_gives_the_same_boxes(monkeypatch):
    """The pairwise test of cut boxes runs a few rows at a time; the chunk size changes nothing."""
    objects = [(150, 100, 430, 180, 1, 0.9), (200, 200, 400, 400, 2, 0.8), (100, 520, 700, 600, 1, 0.7),
               (500, 250, 560, 330, 0, 0.6), (600, 100, 790, 150, 1, 0.5)]
    image = painted(640, 800, objects)
    expected = TiledDetector(RectangleFinder(), 256, overlap=0.1)([image])[0]
    assert sorted(as_list(expected)) == sorted(((float(a), float(b), float(c), float(d)), s, lab)
                                               for a, b, c, d, lab, s in objects)
    original = TiledDetector._agree
    monkeypatch.setattr(TiledDetector, "_agree", lambda self, *args: original(self, *args, chunk=1))
    assert as_list(TiledDetector(RectangleFinder(), 256, overlap=0.1)([image])[0]) == as_list(expected)


def test_an_onnx_export_runs_tiled_like_the_pytorch_model(tiny_run):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fpndet.deploy.backends import open_detector
    from fpndet.deploy.benchmark import compare

    assert main(["export", "--weights", str(tiny_run)]) == 0
    eager, _, _ = open_detector(tiny_run, backend="eager", overrides={"score_thresh": 0.2})
    onnx, _, backend = open_detector(tiny_run / "model.onnx", backend="onnxruntime", overrides={"score_thresh": 0.2})
    assert backend == "onnxruntime"
    images = [torch.rand(3, 300, 420, generator=torch.Generator().manual_seed(2))]
    reference = TiledDetector(eager, 128, full_image=True)(images)
    found = TiledDetector(onnx, 128, full_image=True)(images)
    assert len(reference[0]["boxes"]) > 0 and compare(reference, found)["equal"], compare(reference, found)
