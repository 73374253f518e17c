"""``qsched tiny``: save a tiny random pipeline of a family, to try the tools offline."""

from __future__ import annotations

import argparse
from typing import Any

from qsched.cli.options import output_folder


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "tiny",
        parents=parents,
        help="save a tiny random pipeline (for tests and offline trials)",
        description="Save a tiny pipeline with random weights in the real diffusers classes of FAMILY. "
        "Its images are noise; it exercises the same code paths as the real model.",
    )
    parser.add_argument("family", help="lcm, pcm-sd15, sdxl-turbo, pcm-sdxl, flux-schnell")
    parser.add_argument("--out", required=True, type=output_folder, help="folder to save the pipeline in (must be new or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qsched.outdir import prepare_output_dir
    from qsched.testing import TINY_FAMILIES, save_tiny_pipeline
    from qsched.errors import QSchedError

    if args.family not in TINY_FAMILIES:
        raise QSchedError(f"no tiny pipeline for family {args.family!r}; allowed: {', '.join(TINY_FAMILIES)}")
    out = prepare_output_dir(args.out, overwrite=False, owned=())
    save_tiny_pipeline(args.family, out, seed=args.seed)
    print(f"saved a tiny {args.family} pipeline to {out}")
    return 0
