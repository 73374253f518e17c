"""Arguments shared by several subcommands, and their validation at the boundary."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qsched.quant import BACKENDS, PRESETS, QuantRecipe, parse_preset

if TYPE_CHECKING:
    from qsched.prepare import ModelOptions

DEFAULT_MODEL = "builtin"
PRESET_NAMES = ", ".join(PRESETS)


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "non-negative")


def _output_path(text: str, *, folder: bool) -> str:
    from qsched.errors import QSchedError
    from qsched.outdir import check_output_path

    try:
        check_output_path(text, folder=folder)
    except QSchedError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def output_folder(text: str) -> str:
    """argparse type: an output folder that can be created (nothing above it is a file)."""
    return _output_path(text, folder=True)


def output_file(text: str) -> str:
    """argparse type: an output file whose folder can be created (nothing above it is a file)."""
    return _output_path(text, folder=False)


def add_model_options(
    parser: argparse.ArgumentParser,
    *,
    quant_help: str = f"{PRESET_NAMES} (default: the --packed or card recipe, else fp)",
    packed: bool = True,
) -> None:
    """The options that choose and set up the model; :func:`model_options` passes them on."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="local pipeline folder, cached hub id, or 'builtin' (default: %(default)s)")
    group.add_argument("--family", default=None, help="model family; detected from the pipeline when omitted")
    group.add_argument("--quant", default=None, metavar="PRESET", help=quant_help)
    if packed:
        group.add_argument("--packed", default=None, metavar="FILE",
                           help="packed quantized denoiser from `qsched quantize` (its recipe is used)")
    add_backend_options(group)
    group.add_argument("--steps", type=positive_int, default=None,
                       help="sampling steps (default: the card's, else the family's)")
    group.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    group.add_argument("--height", type=positive_int, default=None, help="image height (default: the pipeline's)")
    group.add_argument("--width", type=positive_int, default=None, help="image width (default: the pipeline's)")
    group.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    group.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on GPU), float32, float16, bfloat16")


BACKEND_HELP = (
    "how quantized layers run: packed (default; int4/int8 codes in memory, the full-precision "
    "denoiser is never loaded whole), fake (float reference, full-precision memory), torchao, quanto"
)


def add_backend_options(group: argparse._ActionsContainer) -> None:
    """``--backend`` and ``--quantize-modules`` (shared by generate, calibrate and evaluate)."""
    group.add_argument("--backend", default="packed", choices=BACKENDS, help=BACKEND_HELP)
    group.add_argument("--quantize-modules", type=module_list, default=("denoiser",), metavar="NAMES",
                       help="components the recipe applies to, comma-separated: denoiser (always) plus "
                       "text_encoder, text_encoder_2, vae (weights only) (default: denoiser)")


def module_list(text: str) -> tuple[str, ...]:
    """argparse type: ``denoiser,text_encoder`` -> a tuple that includes ``denoiser``."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if not n.replace("_", "").isalnum()]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected component names like denoiser,text_encoder,vae, got {text!r}")
    return names if "denoiser" in names else ("denoiser", *names)


def parse_quant(quant: str | None) -> QuantRecipe | None:
    """``--quant PRESET`` as a recipe; None lets the packed checkpoint or card decide (else fp)."""
    return None if quant is None else parse_preset(quant)


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The :class:`~qsched.prepare.ModelOptions` of :func:`add_model_options`."""
    from qsched.prepare import ModelOptions

    return ModelOptions(
        family=args.family, steps=args.steps, guidance_scale=args.guidance, height=args.height,
        width=args.width, device=args.device, dtype=args.dtype, backend=args.backend,
        quantize_modules=args.quantize_modules,
    )
