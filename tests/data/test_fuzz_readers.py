"""Readers fuzzed (property-based, hypothesis): COCO JSON, VOC XML and YOLO label files mutated
(missing and extra fields, wrong types, NaN/inf/negative/huge coordinates, duplicate ids, unknown
categories, non-UTF-8 bytes, truncation, absurd declared sizes) and image bytes (truncated, random,
decompression bombs). Every outcome is a valid dataset (finite boxes inside their image, labels in
range, COCO ground truth buildable) or an :class:`InputError` naming the file; nothing else.

``FPNDET_FUZZ_EXAMPLES`` sets the number of cases per reader (default 60, for CI).
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fpndet.data.detect import open_dataset
from fpndet.data.images import load_image
from fpndet.errors import InputError

EXAMPLES = int(os.environ.get("FPNDET_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                             1e308, -1e-308, 0.0, -5.0, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.lists(st.integers(-5, 5), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def assert_valid_or_named(open_it, named: list[Path]) -> str:
    """Open the dataset and check every record, or accept an InputError naming one of ``named``.
    Returns "ok" or "error"."""
    try:
        dataset = open_it()
        for index in range(len(dataset)):
            record = dataset.annotation(index)
            boxes = np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4)
            assert np.isfinite(boxes).all()
            assert record.height > 0 and record.width > 0
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= record.width).all()
            assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= record.height).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            labels = np.asarray(record.labels)
            assert ((labels >= 0) & (labels < dataset.num_classes)).all()
            assert len(labels) == len(boxes) == len(record.iscrowd)
        coco = dataset.to_coco()
        assert len(coco["images"]) == len(dataset)
        return "ok"
    except InputError as error:
        assert error.path is not None and any(str(p) in error.path or error.path in str(p) for p in named), (
            f"error names {error.path!r}, expected one of {named}: {error}")
        return "error"


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def base_coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 50},
                   {"id": 2, "file_name": "b.jpg", "height": 30, "width": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 1},
                        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [30, 20, 19, 19], "area": 361}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


@st.composite
def coco_mutations(draw):
    content = base_coco()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["images", "annotations", "categories", "top"]))
        if section == "top":
            key = draw(st.sampled_from(["images", "annotations", "categories"]))
            action = draw(st.sampled_from(["drop", "replace"]))
            if action == "drop":
                content.pop(key, None)
            else:
                content[key] = draw(ODD_VALUES)
            continue
        items = content.get(section)
        if not isinstance(items, list) or not items:
            continue
        index = draw(st.integers(0, len(items) - 1))
        item = items[index]
        action = draw(st.sampled_from(["drop_field", "set_field", "extra_field", "duplicate", "bbox", "remove"]))
        if not isinstance(item, dict):
            continue
        if action == "drop_field" and item:
            item.pop(draw(st.sampled_from(sorted(item))))
        elif action == "set_field" and item:
            item[draw(st.sampled_from(sorted(item)))] = draw(ODD_VALUES)
        elif action == "extra_field":
            item[draw(st.text(min_size=1, max_size=6))] = draw(ODD_VALUES)
        elif action == "duplicate":
            items.append(dict(item))
        elif action == "bbox" and section == "annotations":
            item["bbox"] = draw(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                                   st.integers(-10**9, 10**9)), min_size=0, max_size=6))
        elif action == "remove":
            items.pop(index)
    raw = json.dumps(content).encode()
    damage = draw(st.sampled_from(["none", "none", "truncate", "non_utf8", "nan_literal"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif damage == "non_utf8":
        raw = raw.replace(b"a.jpg", b"\xff\xfe.jpg")
    elif damage == "nan_literal":
        raw = raw.replace(b"[5, 5, 20, 10]", b"[NaN, 5, Infinity, 10]")
    return raw


@FUZZ
@given(raw=coco_mutations())
def test_coco_reader_fuzzed(raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    path = root / "instances.json"
    path.write_bytes(raw)
    assert_valid_or_named(lambda: open_dataset(path, split="val", format="coco"), [path])


# --------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------
VOC_TEXT = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-5", "1e308", "", "12.5", "0", "abc", "99999999999999"]),
                     st.integers(-1000, 1000).map(str), st.text(max_size=5))


@st.composite
def voc_xml(draw):
    fields = {"width": "50", "height": "40", "depth": "3", "name": "raccoon", "difficult": "0",
              "xmin": "5", "ymin": "6", "xmax": "30", "ymax": "25"}
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(fields)))
        fields[key] = None if draw(st.booleans()) and key != "name" else draw(VOC_TEXT)
    def tag(name):
        return "" if fields[name] is None else f"<{name}>{fields[name]}</{name}>"
    obj = (f"<object>{tag('name')}{tag('difficult')}<bndbox>{tag('xmin')}{tag('ymin')}{tag('xmax')}{tag('ymax')}"
           f"</bndbox></object>")
    objects = obj * draw(st.integers(0, 3))
    xml = (f"<annotation><filename>img.jpg</filename><size>{tag('width')}{tag('height')}{tag('depth')}</size>"
           f"{objects}</annotation>").encode()
    damage = draw(st.sampled_from(["none", "none", "truncate", "non_utf8", "no_root"]))
    if damage == "truncate":
        xml = xml[: draw(st.integers(0, len(xml) - 1))]
    elif damage == "non_utf8":
        xml = xml.replace(b"raccoon", b"racc\xff\xfeon")
    elif damage == "no_root":
        xml = b"<?xml version='1.0'?>"
    return xml


@FUZZ
@given(xml=voc_xml(), explicit_classes=st.booleans())
def test_voc_reader_fuzzed(xml, explicit_classes, tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("img\n")
    (root / "Annotations" / "img.xml").write_bytes(xml)
    kwargs = {"class_names": ["raccoon"]} if explicit_classes else {}
    assert_valid_or_named(lambda: open_dataset(root, split="train", format="voc", **kwargs),
                          [root / "Annotations" / "img.xml", root / "Annotations"])


# --------------------------------------------------------------------------------------------
# YOLO
# --------------------------------------------------------------------------------------------
YOLO_TOKEN = st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "1", "0.5", "2", "1e308", "-0.5", "x", "", "7"]),
                       st.floats(-2, 2).map(lambda v: f"{v:.3f}"), st.text(max_size=4))


@st.composite
def yolo_labels(draw):
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        tokens = draw(st.lists(YOLO_TOKEN, min_size=0, max_size=9))
        lines.append(" ".join(tokens))
    raw = "\n".join(lines).encode()
    if draw(st.booleans()):
        raw = raw + b"\n0 0.5 0.5 0.2 0.2"
    if draw(st.integers(0, 9)) == 0:
        raw = raw + b"\xff\xfe"
    return raw


@FUZZ
@given(labels=yolo_labels())
def test_yolo_reader_fuzzed(labels, tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(root / "images" / "train" / "a.jpg")
    (root / "labels" / "train" / "a.txt").write_bytes(labels)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames: [a, b]\n")
    assert_valid_or_named(lambda: open_dataset(data, split="train", format="yolo"),
                          [root / "labels" / "train" / "a.txt", data])


# --------------------------------------------------------------------------------------------
# image bytes
# --------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels (its data is far shorter)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def good_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["truncated", "flipped", "random", "bomb", "absurd"]))
    data = good_jpeg()
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flipped":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 20))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "bomb":
        return bomb_png(draw(st.integers(20_000, 100_000)), draw(st.integers(20_000, 100_000)))
    return bomb_png(draw(st.sampled_from([0, 1, 2**31 - 1])), draw(st.sampled_from([0, 1, 2**31 - 1])))


@FUZZ
@given(data=image_bytes())
def test_image_reader_fuzzed(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.jpg"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except InputError as error:
        assert error.path == str(path) and error.problem.startswith("cannot read image")
        return
    assert image.dtype.is_floating_point is False and image.dim() == 3 and image.shape[0] == 3
    assert image.shape[1] >= 1 and image.shape[2] >= 1


def test_a_decompression_bomb_is_refused_without_decoding():
    """PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``, 89M; twice that raises) stops a 100k x 100k PNG."""
    from tempfile import TemporaryDirectory

    with TemporaryDirectory() as folder:
        path = Path(folder) / "bomb.png"
        path.write_bytes(bomb_png(100_000, 100_000))
        with pytest.raises(InputError, match="bomb.png: cannot read image"):
            load_image(path)
