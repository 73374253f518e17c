"""Arguments shared by several subcommands, and their validation at the boundary."""

from __future__ import annotations

import argparse

from qsched.card import ScheduleCard
from qsched.errors import QSchedError
from qsched.quant import QuantRecipe, parse_preset

DEFAULT_MODEL = "builtin"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="local pipeline folder, cached hub id, or 'builtin' (default: %(default)s)")
    group.add_argument("--family", default=None, help="model family; detected from the pipeline when omitted")
    group.add_argument("--quant", default=None, metavar="PRESET",
                       help="fp, w8a8, w4a8, w4a4, w4a16, w8a16 (default: the card's recipe, else fp)")
    group.add_argument("--backend", default="fake", help="quantization backend: fake (reference), torchao")
    group.add_argument("--steps", type=positive_int, default=None,
                       help="sampling steps (default: the card's, else the family's)")
    group.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    group.add_argument("--height", type=positive_int, default=None, help="image height (default: the pipeline's)")
    group.add_argument("--width", type=positive_int, default=None, help="image width (default: the pipeline's)")
    group.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    group.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on GPU), float32, float16, bfloat16")


def resolve_recipe(quant: str | None, card: ScheduleCard | None) -> QuantRecipe:
    """The recipe to run: ``--quant`` if given, else the card's, else full precision.

    A card calibrated for another recipe than ``--quant`` is refused: its
    coefficients correct that recipe's error, not this one's.
    """
    if quant is None:
        return QuantRecipe.from_dict(card.quant) if card is not None else parse_preset("fp")
    recipe = parse_preset(quant)
    if card is not None and QuantRecipe.from_dict(card.quant) != recipe:
        raise QSchedError(
            f"--quant {quant} differs from the card's recipe {card.quant.get('name')!r}; "
            "drop --quant to use the card's recipe, or calibrate a card for this one"
        )
    return recipe
