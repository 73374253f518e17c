"""Search efficiency: candidates TPE / CMA-ES / random need to come within 0.5% of a dense grid's best JAQ.

The reference code searches a 50x50 grid of ramp starts (2,500 candidates). This
script runs that grid once (resumable: its optuna study lives in the output folder,
so a killed run continues with the same command), then each strategy with a few
seeds over the same space, prompts, seeds and noise, and prints for each run the
number of candidates (baseline included) until the best JAQ so far is within
``--tolerance`` of the grid's best.

    python benchmarks/bench_search.py --out runs/bench-search [--grid-points 50] [--trials 100] [--threads 1]

Defaults: the built-in model, W4A8, 4 steps, the built-in calibration prompts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qsched.calibrate import calibrate
from qsched.prepare import ModelOptions
from qsched.quant import parse_preset
from qsched.search.samplers import SearchSettings


def best_so_far(candidates) -> list[float]:
    """Best JAQ after each finished candidate, in the order they were numbered."""
    best, curve = float("-inf"), []
    for candidate in sorted(candidates, key=lambda c: c.number):
        if candidate.state == "COMPLETE" and candidate.value is not None:
            best = max(best, candidate.value)
            curve.append(best)
    return curve


def candidates_to_reach(curve: list[float], target: float) -> int | None:
    for count, value in enumerate(curve, start=1):
        if value >= target:
            return count
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--quant", default="w4a8")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--grid-points", type=int, default=50)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = parse_preset(args.quant)
    common = dict(recipe=recipe, options=ModelOptions(steps=args.steps), progress=True, resume=True)

    start = time.perf_counter()
    grid = calibrate(args.model, out=args.out / f"grid{args.grid_points}",
                     search=SearchSettings(strategy="grid", grid_points=args.grid_points), **common)
    grid_curve = best_so_far(grid.candidates)
    grid_best = grid_curve[-1]
    target = grid_best - args.tolerance * abs(grid_best)
    print(f"{args.model} {recipe.name}: {args.grid_points}x{args.grid_points} grid, {len(grid_curve)} candidates, "
          f"best JAQ {grid_best:.5f} (baseline {grid.baseline.value:.5f}); target >= {target:.5f} "
          f"({args.tolerance:.1%}); {time.perf_counter() - start:.0f} s")

    for strategy in ("tpe", "cmaes", "random"):
        needed = []
        for seed in range(args.seeds):
            run = calibrate(args.model, out=args.out / f"{strategy}-seed{seed}",
                            search=SearchSettings(strategy=strategy, trials=args.trials, seed=seed), **common)
            curve = best_so_far(run.candidates)
            count = candidates_to_reach(curve, target)
            needed.append(count)
            print(f"  {strategy:6s} seed {seed}: best {curve[-1]:.5f} after {len(curve)}; "
                  f"within {args.tolerance:.1%} after {count if count is not None else f'>{len(curve)}'} candidates")
        reached = [n for n in needed if n is not None]
        summary = f"median {statistics.median(reached):.0f}" if len(reached) == len(needed) else \
            f"{len(reached)}/{len(needed)} runs reached it"
        print(f"{strategy}: candidates to within {args.tolerance:.1%} of the grid's best: {needed} ({summary})")


if __name__ == "__main__":
    main()
