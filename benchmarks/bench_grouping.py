"""Training speed with and without batches grouped by aspect ratio (``data.group_aspect_ratio``).

Builds the raccoon training run of the ``raccoon`` config twice (grouped / mixed batches), times
every training step of one epoch (the first ``--warmup`` steps untimed) and reports the median
seconds per step, images per second and the padded pixels per epoch that the sampler's batches
imply. Needs ``../shared/data/raccoon``.

    python benchmarks/bench_grouping.py [--epochs 1] [--threads 2]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import REPO_DIR, base_parser, format_table, report, resolve_device  # noqa: E402
from fpndet.config import load_config  # noqa: E402
from fpndet.engine.inspect import input_geometry  # noqa: E402
from fpndet.engine.trainer import Trainer  # noqa: E402


def padded_pixels(trainer: Trainer, epochs: int) -> tuple[float, float]:
    """(padded, image) megapixels per epoch of the sampler's batches at the evaluation size."""
    records = map(trainer.train_set.annotation, range(len(trainer.train_set)))
    geometry = [input_geometry(record.height, record.width, trainer.model_cfg) for record in records]
    padded = image = 0
    for epoch in range(epochs):
        trainer.sampler.set_epoch(epoch)
        order = list(trainer.sampler)
        size = trainer.sampler.batch_size
        for start in range(0, len(order), size):
            batch = [geometry[i] for i in order[start : start + size]]
            height = max(g.padded[0] for g in batch)  # a batch pads to its largest padded image
            width = max(g.padded[1] for g in batch)
            padded += height * width * len(batch)
            image += sum(g.resized[0] * g.resized[1] for g in batch)
    return padded / epochs / 1e6, image / epochs / 1e6


def time_epochs(trainer: Trainer, epochs: int, warmup: int) -> list[float]:
    times = []
    trainer.model.train()
    for epoch in range(epochs):
        trainer.sampler.set_epoch(epoch)
        trainer.augmented.epoch = epoch
        for step, (images, targets) in enumerate(trainer.loader):
            tic = time.perf_counter()
            trainer.train_step(images, targets)
            trainer.progress.step += 1
            if epoch > 0 or step >= warmup:
                times.append(time.perf_counter() - tic)
    return times


def main() -> None:
    parser = base_parser("bench_grouping", __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", default=str(REPO_DIR.parent / "shared" / "data" / "raccoon"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = 2 if args.warmup is None else args.warmup
    rows, results = [], {}
    for grouped in (True, False):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config("raccoon", [f"data.train={args.data}", f"train.output_dir={out}",
                                          f"train.device={device.type}", f"data.group_aspect_ratio={grouped}",
                                          "train.batch_size=8"])  # as measured in the README
            trainer = Trainer(cfg)
            padded, image = padded_pixels(trainer, args.epochs)
            times = time_epochs(trainer, args.epochs, warmup)
        median = statistics.median(times)
        name = "grouped" if grouped else "mixed"
        results[name] = {"median_s_per_step": median, "steps_timed": len(times), "padded_mpx_per_epoch": padded,
                         "image_mpx_per_epoch": image, "images_per_s": cfg.train.batch_size / median}
        rows.append([name, f"{median:.2f}", f"{cfg.train.batch_size / median:.2f}", f"{padded:.1f}",
                     f"{padded / image:.2f}", len(times)])
    ratio = results["grouped"]["median_s_per_step"] / results["mixed"]["median_s_per_step"]
    results["grouped_over_mixed_time"] = ratio
    table = format_table(["batches", "s/step (median)", "images/s", "padded Mpx/epoch", "padded/image", "steps"], rows)
    report("bench_grouping", args, device, {f"raccoon training steps (grouped/mixed time {ratio:.2f}x)": table},
           results)


if __name__ == "__main__":
    main()
