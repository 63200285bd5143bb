"""Run the benchmarks one after the other (each in its own process) and collect their
tables.

    python benchmarks/run_all.py --device cuda --out benchmarks/results/

writes ``bench_postprocess.json``, ``bench_inference.json``, ``bench_matching.json``,
``bench_faster_rcnn.json`` and ``summary.md`` (every table, with the environment line) into ``--out``. ``--quick`` runs the
short versions; extra arguments after ``--`` go to every benchmark (e.g. ``-- --threads 8``).
On CUDA the matching benchmark also times the backward pass.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("bench_postprocess", "bench_inference", "bench_matching", "bench_faster_rcnn")


def uses_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="folder for the JSON files")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments after -- go to every benchmark")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]

    failures, sections = [], []
    for name in args.only:
        command = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--device", args.device,
                   "--out", str(out_dir / f"{name}.json"), *extra]
        if args.quick:
            command.append("--quick")
        if name == "bench_matching" and uses_cuda(args.device):
            command.append("--backward")
        print(f"\n=== {' '.join(command)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command)
        print(f"=== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failures.append(name)
            continue
        payload = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
        env = payload["environment"]
        sections.append(
            f"# {name}\n\n{env['device_name']} ({env['device']}), torch {env['torch']}, torchvision "
            f"{env['torchvision']}, {env['torch_threads']} threads, {env['date']}\n\n"
            + "\n\n".join(f"## {title}\n\n{table}" for title, table in payload["tables"].items())
        )
    (out_dir / "summary.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    print(f"\nwrote {out_dir / 'summary.md'}" + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
