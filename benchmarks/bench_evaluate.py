"""1 -> P process speed-up of ``qsched evaluate`` (goal: >= 1.8x for 2 processes where there are cores).

Runs the same evaluation (generation + per-image metrics) into fresh folders with 1
and with P processes, times each end to end, checks the images are identical, and
prints the speed-up. Process start-up and model loading are included on purpose:
that is what a user waits for. Do not run it while the machine is busy (training).

    python benchmarks/bench_evaluate.py                          # built-in model, 64 prompts, fp,w4a8
    python benchmarks/bench_evaluate.py --model out/tiny-lcm --steps 2 --size 32 --num 32
    python benchmarks/bench_evaluate.py --processes 2 --metrics mse,size,fid --num 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: argparse.Namespace, processes: int, out: Path) -> float:
    command = [sys.executable, "-m", "qsched", "evaluate", "--model", args.model, "--num", str(args.num),
               "--configs", args.configs, "--metrics", args.metrics, "--batch-size", str(args.batch_size),
               "--num-processes", str(processes), "--out", str(out), "--no-progress"]
    if args.steps:
        command += ["--steps", str(args.steps)]
    if args.size:
        command += ["--height", str(args.size), "--width", str(args.size)]
    if args.prompts:
        command += ["--prompts", args.prompts]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--prompts", default=None)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--configs", default="fp,w4a8")
    parser.add_argument("--metrics", default="mse,size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        one = run(args, 1, Path(root) / "p1")
        many = run(args, args.processes, Path(root) / f"p{args.processes}")
        different = [p.relative_to(Path(root) / "p1") for p in sorted((Path(root) / "p1" / "images").rglob("*.png"))
                     if p.read_bytes() != (Path(root) / f"p{args.processes}" / p.relative_to(Path(root) / "p1")).read_bytes()]
    print(f"1 process: {one:.1f} s; {args.processes} processes: {many:.1f} s; speed-up {one / many:.2f}x "
          f"({args.num} prompts x {args.configs}, metrics {args.metrics}, {args.threads} threads in all)")
    print("images identical" if not different else f"{len(different)} images differ (batching differs per process): {different[:3]}")


if __name__ == "__main__":
    main()
