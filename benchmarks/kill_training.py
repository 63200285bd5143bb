"""Reliability under SIGKILL: training is killed at random moments (checkpoints are written after
every step, so many kills land in the middle of a write), restarted with ``--resume`` each time,
and must end bit-identical to a run that was never interrupted.

After every kill: ``last.pth`` (when one exists) must load with ``load_training_state`` and
``last.safetensors`` with ``load_model_weights``; a leftover ``.last.pth.*.tmp`` shows that the kill
landed mid-write (the next start removes it). A round ends when the restarted run finishes on its
own; its final weights and metrics are compared with the uninterrupted reference. Rounds repeat
until ``--kills`` kills have been made.

Run: ``python benchmarks/kill_training.py [--kills 50] [--seed 0] [--out benchmarks/results/kill_training.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, write_json  # noqa: E402
from fpndet.engine.checkpoints import load_model_weights, load_training_state  # noqa: E402

TRAIN = [
    "train", "--data", "shapes", "--device", "cpu",
    "data.shapes_train_images=16", "data.shapes_val_images=4", "data.shapes_image_size=96", "data.num_workers=0",
    "model.backbone=resnet18", "model.backbone_weights=null", "model.fpn_channels=16",
    "model.retinanet.head_channels=16", "model.retinanet.head_depth=1", "model.min_size=[64,96]", "model.max_size=96",
    "train.batch_size=4", "train.epochs=12", "train.warmup_iters=5", "train.checkpoint_every_iters=1",
    "train.eval_every_epochs=100", "train.log_every=1", "eval.max_images=4",
]


def command(out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "fpndet.cli", *TRAIN, "--output", str(out), *(["--resume"] if resume else [])]


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    weights, _ = load_model_weights(out / "last.safetensors")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for record in records:  # a resumed run repeats the steps after its checkpoint: the last record wins
        by_step[(record["step"], "loss" in record)] = {k: v for k, v in record.items() if k != "elapsed_s"}
    return weights, [by_step[key] for key in sorted(by_step)]


def identical(a: Path, b: Path) -> bool:
    weights_a, records_a = final_state(a)
    weights_b, records_b = final_state(b)
    same_weights = weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("images_per_s",)} for r in records]  # noqa: E731
    return same_weights and strip(records_a) == strip(records_b)


def check_after_kill(out: Path) -> dict:
    """What a kill left: whether a write was cut (temporary file present) and whether the
    checkpoints load."""
    state = {"mid_write": any(out.glob(".*.tmp")), "step": None, "loads": True}
    if (out / "last.pth").exists():
        try:
            state["step"] = int(load_training_state(out / "last.pth")["step"])
            load_model_weights(out / "last.safetensors")
        except Exception as error:  # the failure this script exists to catch
            state["loads"], state["error"] = False, f"{type(error).__name__}: {error}"
    return state


def run(args) -> dict:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fpndet_kill_"))
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run(command(root / "reference", False), check=True, env=env, capture_output=True)
    reference_s = time.perf_counter() - start
    print(f"reference run: {reference_s:.1f} s", flush=True)
    kills, rounds, events = 0, [], []
    while kills < args.kills:
        out = root / f"round{len(rounds)}"
        round_kills, starts = 0, 0
        while True:
            process = subprocess.Popen(command(out, (out / "last.pth").exists()), env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            starts += 1
            delay = rng.uniform(args.min_delay, args.max_delay)
            try:
                code = process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                round_kills += 1
                event = {"kill": kills, "after_s": round(delay, 2), **check_after_kill(out)}
                events.append(event)
                if not event["loads"]:
                    print(f"kill {kills}: checkpoint does not load: {event['error']}", flush=True)
                continue
            if code != 0:
                raise SystemExit(f"training exited with {code}: {process.stderr.read().decode()[-2000:]}")
            break
        same = identical(root / "reference", out)
        rounds.append({"round": len(rounds), "kills": round_kills, "starts": starts, "bit_identical": same})
        print(f"round {len(rounds) - 1}: {round_kills} kills, {starts} starts, bit-identical: {same}", flush=True)
        if not args.keep:
            shutil.rmtree(out)
    loads = sum(e["loads"] for e in events)
    mid_write = sum(e["mid_write"] for e in events)
    summary = {
        "kills": kills, "checkpoints_loading_after_kill": loads, "kills_mid_write": mid_write,
        "kills_before_first_checkpoint": sum(e["step"] is None for e in events),
        "rounds": len(rounds), "rounds_bit_identical": sum(r["bit_identical"] for r in rounds),
        "reference_run_s": reference_s, "total_s": time.perf_counter() - start,
    }
    table = format_table(["kills", "last.pth loads after kill", "kills mid-write", "kills before 1st checkpoint",
                          "rounds", "rounds bit-identical", "wall s"],
                         [[kills, loads, mid_write, summary["kills_before_first_checkpoint"], len(rounds),
                           summary["rounds_bit_identical"], f"{summary['total_s']:.0f}"]])
    print("\n" + table)
    write_json(args.out, {"benchmark": "kill_training", "settings": vars(args), "summary": summary,
                          "rounds": rounds, "events": events, "table": table})
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(root)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--min-delay", type=float, default=2.0, help="seconds after a start before the kill, low end")
    parser.add_argument("--max-delay", type=float, default=9.0, help="high end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kill_training.json"))
    summary = run(parser.parse_args(argv))
    ok = summary["checkpoints_loading_after_kill"] == summary["kills"] and \
        summary["rounds_bit_identical"] == summary["rounds"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
