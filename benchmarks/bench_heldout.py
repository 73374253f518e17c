"""Do the best-JAQ coefficients of the calibration prompts also win on other prompts and noise?

For each recipe (the quantized one and full precision, the control), this runs the
same grid twice with ``calibrate``: on the calibration prompts (noise seed 0), and on
held-out prompts (the first ``--heldout`` evaluation prompts, noise seed 1). Both
grids share their points, so the script can report, per recipe:

* the Spearman rank correlation of JAQ (and of each term) between the two prompt sets;
* on the held-out set, JAQ, CLIP score and CLIP-IQA of the uncorrected sampler, of the
  calibration's best point, and of the held-out set's own best point (the oracle).

Every run is resumable (its study lives in ``--out``).

    python benchmarks/bench_heldout.py --out runs/bench-heldout [--grid-points 11] [--bounds 0.8 1.2] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from qsched.builtin.captions import evaluation_prompts
from qsched.calibrate import calibrate
from qsched.quant import parse_preset
from qsched.search.samplers import SearchSettings


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def by_point(result) -> dict[tuple[float, float], dict[str, float]]:
    """``{(cx_start, ceps_start): {jaq, alignment, quality}}`` of the completed candidates."""
    out = {}
    for c in result.candidates:
        if c.state == "COMPLETE" and c.value is not None:
            key = (round(c.params["cx_start"], 6), round(c.params["ceps_start"], 6))
            out[key] = {"jaq": c.value, "alignment": c.user_attrs["alignment"], "quality": c.user_attrs["quality"]}
    return out


def describe(point: tuple[float, float], values: dict[str, float], baseline: dict[str, float]) -> str:
    gains = ", ".join(f"{k} {values[k]:.4f} ({100 * (values[k] / baseline[k] - 1):+.2f}%)" for k in ("jaq", "alignment", "quality"))
    return f"(cx {point[0]:.2f}, ceps {point[1]:.2f}): {gains}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--quant", default="w4a8")
    parser.add_argument("--grid-points", type=int, default=11)
    parser.add_argument("--bounds", nargs=2, type=float, default=[0.8, 1.2])
    parser.add_argument("--heldout", type=int, default=64, help="held-out prompts (evaluation prompts, classes interleaved)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heldout = [prompt for prompt, _ in evaluation_prompts()][: args.heldout]
    low, high = args.bounds

    for name in (args.quant, "fp"):
        runs = {}
        for split, prompts, seed in (("calibration", None, 0), ("heldout", heldout, 1)):
            search = SearchSettings(strategy="grid", grid_points=args.grid_points, low=low, high=high, seed=seed)
            runs[split] = by_point(calibrate(
                args.model, recipe=parse_preset(name), out=args.out / f"{name}-{split}", search=search,
                prompts=prompts, resume=True, allow_full_precision=name == "fp", progress=False,
            ))
        cal, held = runs["calibration"], runs["heldout"]
        points = sorted(set(cal) & set(held))
        base = (1.0, 1.0)
        best_cal = max(points, key=lambda p: cal[p]["jaq"])
        best_held = max(points, key=lambda p: held[p]["jaq"])
        rho = {k: spearman([cal[p][k] for p in points], [held[p][k] for p in points]) for k in ("jaq", "alignment", "quality")}
        print(f"{name}: {len(points)} grid points in [{low:g}, {high:g}]^2, calibration 16 prompts seed 0, "
              f"held-out {len(heldout)} prompts seed 1")
        print("  Spearman(calibration, held-out): " + ", ".join(f"{k} {v:+.3f}" for k, v in rho.items()))
        print(f"  held-out, uncorrected          {describe(base, held[base], held[base])}")
        print(f"  held-out, calibration's best   {describe(best_cal, held[best_cal], held[base])}")
        print(f"  held-out, held-out's own best  {describe(best_held, held[best_held], held[base])}")
        rank = sorted(points, key=lambda p: -held[p]["jaq"]).index(best_cal) + 1
        print(f"  the calibration's best ranks {rank} of {len(points)} on the held-out set")


if __name__ == "__main__":
    main()
