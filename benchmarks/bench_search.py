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
    parser.add_argument("--gain-fraction", type=float, default=0.9,
                        help="also report candidates to reach this fraction of the grid's gain over the baseline")
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
    gain_target = grid.baseline.value + args.gain_fraction * (grid_best - grid.baseline.value)
    print(f"{args.model} {recipe.name}: {args.grid_points}x{args.grid_points} grid, {len(grid_curve)} candidates, "
          f"best JAQ {grid_best:.5f} (baseline {grid.baseline.value:.5f}); target >= {target:.5f} "
          f"({args.tolerance:.1%}); {time.perf_counter() - start:.0f} s")
    print(f"  (the whole gain over the baseline is {grid_best - grid.baseline.value:.5f}, so {args.tolerance:.1%} of JAQ "
          f"is {args.tolerance * abs(grid_best) / (grid_best - grid.baseline.value):.0%} of it; stricter target: "
          f"{args.gain_fraction:.0%} of the gain, JAQ >= {gain_target:.5f}, reached by the grid after "
          f"{candidates_to_reach(grid_curve, gain_target)} candidates in its order)")

    curves: dict[str, list[list[float]]] = {}
    for strategy in ("tpe", "cmaes", "random"):
        needed, strict = [], []
        for seed in range(args.seeds):
            run = calibrate(args.model, out=args.out / f"{strategy}-seed{seed}",
                            search=SearchSettings(strategy=strategy, trials=args.trials, sampler_seed=seed),
                            **common)
            curve = best_so_far(run.candidates)
            curves.setdefault(strategy, []).append(curve)
            needed.append(candidates_to_reach(curve, target))
            strict.append(candidates_to_reach(curve, gain_target))
            print(f"  {strategy:6s} seed {seed}: best {curve[-1]:.5f} after {len(curve)}; within {args.tolerance:.1%} "
                  f"after {_count(needed[-1], curve)}, {args.gain_fraction:.0%} of the gain after {_count(strict[-1], curve)} candidates")
        print(f"{strategy}: candidates to within {args.tolerance:.1%} of the grid's best: {needed} ({_summary(needed)}); "
              f"to {args.gain_fraction:.0%} of its gain: {strict} ({_summary(strict)})")
    path = plot_convergence(
        args.out / "convergence.png", curves, grid_best=grid_best, baseline=grid.baseline.value, target=target,
        target_label=f"within {args.tolerance:.1%}",
        title=f"{args.model} {recipe.name}, {args.grid_points}x{args.grid_points} grid",
    )
    print(f"wrote {path}")


def plot_convergence(path: Path, curves: dict[str, list[list[float]]], *, grid_best: float, baseline: float,
                     target: float, target_label: str, title: str) -> Path:
    """Best JAQ so far against candidates, one line per strategy and sampler seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    colours = {"tpe": "tab:blue", "cmaes": "tab:orange", "random": "tab:grey"}
    for strategy, runs in curves.items():
        for i, curve in enumerate(runs):
            ax.plot(range(1, len(curve) + 1), curve, color=colours.get(strategy), alpha=0.8,
                    label=strategy if i == 0 else None)
    ax.axhline(grid_best, color="black", linestyle="--", linewidth=1, label="best of the grid")
    ax.axhline(target, color="black", linestyle=":", linewidth=1, label=target_label)
    ax.axhline(baseline, color="tab:red", linewidth=1, label="uncorrected")
    ax.set_xscale("log")
    ax.set_xlabel("candidates (the uncorrected baseline is the first)")
    ax.set_ylabel("best JAQ so far")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _count(count: int | None, curve: list[float]) -> str:
    return str(count) if count is not None else f">{len(curve)}"


def _summary(counts: list[int | None]) -> str:
    reached = [n for n in counts if n is not None]
    if len(reached) == len(counts):
        return f"median {statistics.median(reached):.0f}"
    return f"{len(reached)}/{len(counts)} runs reached it"

if __name__ == "__main__":
    main()
