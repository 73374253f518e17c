"""How much do the evaluation metrics move with the noise seed alone?

Runs ``qsched evaluate`` on the same prompts with several seeds and prints, per
configuration and metric, the mean and standard deviation over seeds, and the
spread of each configuration's change against ``fp`` of the same seed (paired:
the same noise for both). A difference in the evaluation record smaller than
about two of these standard deviations is not distinguishable from seed noise.
Every run is resumable (its output folder is reused).

    python benchmarks/bench_seed_noise.py --out runs/bench-seed-noise [--seeds 5] [--num 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from qsched.builtin.captions import EVALUATION_FILE as EVALUATION_PROMPTS
from qsched.evaluate import EvalSettings, evaluate, parse_configs
from qsched.prepare import ModelOptions
from qsched.prompts import read_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--configs", default="fp,w4a8")
    parser.add_argument("--card", action="append", default=[], help="schedule card for +card configurations")
    parser.add_argument("--metrics", default="fid,clip,clipiqa")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from qsched.card import ScheduleCard
    from qsched.quant import QuantRecipe

    recipes = {str(p): QuantRecipe.from_dict(ScheduleCard.load(p).quant) for p in args.card}
    configs = tuple(parse_configs(args.configs, cards=args.card, card_recipes=recipes))
    metrics = tuple(args.metrics.split(","))
    prompts = tuple(read_prompts(EVALUATION_PROMPTS)[: args.num])
    values: dict[str, dict[str, list[float]]] = {c.name: {m: [] for m in metrics} for c in configs}
    for seed in range(args.seeds):
        result = evaluate(EvalSettings(
            model=args.model, prompts=prompts, configs=configs, out=str(args.out / f"seed{seed}"), metrics=metrics,
            seed=seed, options=ModelOptions(steps=args.steps), progress=False,
        ))
        for config, row in result.results.items():
            for metric in metrics:
                values[config][metric].append(row[metric]["value"])
        print(f"seed {seed}: " + "; ".join(
            f"{c} " + ", ".join(f"{m} {values[c][m][-1]:.4g}" for m in metrics) for c in values))

    print(f"\n{args.model}, {len(prompts)} prompts, {args.seeds} seeds: mean ± std over seeds "
          "(change vs fp of the same seed: mean ± std)")
    for config, row in values.items():
        parts = []
        for metric, series in row.items():
            text = f"{metric} {statistics.mean(series):.4g} ± {statistics.stdev(series):.2g}"
            if config != "fp":
                changes = [100 * (v / f - 1) for v, f in zip(series, values["fp"][metric])]
                text += f" ({statistics.mean(changes):+.2f}% ± {statistics.stdev(changes):.2f}%)"
            parts.append(text)
        print(f"  {config:14s} " + "; ".join(parts))


if __name__ == "__main__":
    main()
