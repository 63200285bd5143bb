"""What the image check before training costs (``fpndet.data.checks.check_images``: every
image's header read, sizes compared with the annotation, results cached): on coco128 and on
10,000 generated JPEGs in a COCO layout, without the cache (first run) and with it (every later
run), next to decoding the same images fully (what a check that decoded would cost).

Run: ``python benchmarks/bench_image_check.py [--images 10000] [--quick]`` (--quick: 500 images).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common import base_parser, format_table, report, resolve_device  # noqa: E402
from fpndet.data.checks import check_images  # noqa: E402
from fpndet.data.detect import open_dataset  # noqa: E402
from fpndet.data.images import load_image  # noqa: E402

NAME = "bench_image_check"
COCO128 = [Path("/work/shared/data/coco128/annotations/instances.json"),
           Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128" / "annotations" / "instances.json"]


def generated_coco(root: Path, count: int, seed: int) -> Path:
    """``count`` 160x120 noise JPEGs with one box each, as a COCO instances file."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    content = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(count):
        Image.fromarray(np.roll(tile, i, axis=1)).save(root / "images" / f"{i:06d}.jpg", quality=85)
        content["images"].append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": 120, "width": 160})
        content["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 50, 40],
                                       "area": 2000, "iscrowd": 0})
    path = root / "annotations" / "instances.json"
    path.write_text(json.dumps(content))
    return path


def measure(annotations: Path, cache: Path, decode_sample: int) -> dict:
    dataset = open_dataset(annotations, split="train")
    start = time.perf_counter()
    problems = check_images(dataset, cache_file=cache)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    check_images(dataset, cache_file=cache)
    warm = time.perf_counter() - start
    sample = min(decode_sample, len(dataset))
    start = time.perf_counter()
    for index in range(sample):
        load_image(dataset.annotation(index).file_name)
    decode = (time.perf_counter() - start) / sample * len(dataset)
    return {"images": len(dataset), "problems": len(problems), "check_s": cold, "cached_check_s": warm,
            "full_decode_s_estimated": decode, "decode_sample": sample}


def run(args) -> None:
    device = resolve_device("cpu")
    count = 500 if args.quick else args.images
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        cases = [(f"{count} generated 160x120 JPEGs", generated_coco(folder / "gen", count, args.seed))]
        found = [p for p in COCO128 if p.is_file()]
        if found:
            cases.insert(0, ("coco128", found[0]))
        for name, annotations in cases:
            result = measure(annotations, folder / f"{len(results)}.json", decode_sample=200)
            results[name] = result
            rows.append([name, result["images"], result["problems"], f"{result['check_s']:.2f}",
                         f"{result['cached_check_s']:.2f}", f"{1000 * result['check_s'] / result['images']:.2f}",
                         f"{result['full_decode_s_estimated']:.1f}"])
    tables = {"Image check before training (seconds)": format_table(
        ["dataset", "images", "failed", "check s", "cached check s", "ms/image", "full decode s (est.)"], rows)}
    report(NAME, args, device, tables, results)


def main(argv=None) -> None:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000, help="generated images (default 10000)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
