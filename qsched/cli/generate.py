"""``qsched generate``: images from prompts with a (quantized, Q-Sched-corrected) model."""

from __future__ import annotations

import argparse
from typing import Any

from qsched.cli.options import (
    add_model_options,
    model_options,
    non_negative_int,
    output_folder,
    parse_quant,
    positive_int,
)


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "generate",
        parents=parents,
        help="generate images",
        description="Generate images; image i's noise depends only on (seed, i).",
    )
    parser.add_argument("prompt", nargs="*", help="prompts (or use --prompts FILE)")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="prompts file: .txt, .json, .yaml, .csv")
    add_model_options(parser)
    parser.add_argument("--card", default=None, help="schedule card (JSON) with Q-Sched coefficients")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--out", required=True, type=output_folder, help="output folder (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qsched.card import ScheduleCard
    from qsched.errors import QSchedError
    from qsched.generate import generate_to_folder
    from qsched.prepare import prepare_pipeline
    from qsched.prompts import read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise QSchedError("no prompts given; pass them as arguments or with --prompts FILE")
    card = ScheduleCard.load(args.card) if args.card else None
    prepared = prepare_pipeline(
        args.model,
        recipe=parse_quant(args.quant),
        packed=args.packed,
        card=card,
        options=model_options(args),
    )
    records = generate_to_folder(
        prepared,
        prompts,
        out=args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        card_path=args.card,
        progress=not args.no_progress,
    )
    print(f"wrote {len(records)} images to {args.out} ({prepared.family}, {prepared.recipe.name}, {prepared.steps} steps)")
    return 0
