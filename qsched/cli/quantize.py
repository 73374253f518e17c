"""``qsched quantize``: save a model's denoiser as a packed int4/int8 checkpoint and report sizes."""

from __future__ import annotations

import argparse
from typing import Any

from qsched.cli.options import DEFAULT_MODEL, PRESET_NAMES, output_file


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "quantize",
        parents=parents,
        help="save a packed quantized denoiser",
        description="Quantize the denoiser of a full-precision pipeline and save it as packed integer "
        "weights plus scales (safetensors), reading the checkpoint one tensor at a time (peak memory: "
        "the packed model plus the largest layer). `qsched generate --packed FILE` runs it: "
        "one FP checkpoint serves every bit-width.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local pipeline folder or 'builtin' (default: %(default)s)")
    parser.add_argument("--family", default=None, help="model family; detected when omitted")
    parser.add_argument("--quant", required=True, metavar="PRESET", help=PRESET_NAMES.removeprefix("fp, "))
    parser.add_argument("--out", required=True, type=output_file, metavar="FILE", help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qsched.errors import QSchedError
    from qsched.families import resolve_pipeline
    from qsched.quant import packed_size, parse_preset, save_packed
    from qsched.quant.stream import component_source, load_quantized

    recipe = parse_preset(args.quant)
    if recipe.weight_bits == 16:
        raise QSchedError(f"--quant {args.quant} keeps the weights in full precision: nothing to pack; "
                          "use a preset with 4- or 8-bit weights")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise QSchedError(f"--out {out} must end in .safetensors")
    if out.exists() and not args.overwrite:
        raise QSchedError(f"{out} exists; pass --overwrite to replace it")
    folder, _, _, spec = resolve_pipeline(args.model, family=args.family)
    # read tensor by tensor into packed layers: the full-precision denoiser is never whole in memory
    denoiser, report = load_quantized(component_source(folder, spec.denoiser_attr), recipe)
    save_packed(denoiser, out)
    print(report.format())
    print(packed_size(out).format())
    return 0
