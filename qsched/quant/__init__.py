"""Quantization of diffusion denoisers: recipes, fake quantization, packed checkpoints.

Importing this package loads no model and needs neither torchao nor quanto.
"""

from __future__ import annotations

from qsched.quant.fake import BACKENDS, is_quantized, quantize
from qsched.quant.packed import PackedSize, load_packed, packed_size, read_packed_recipe, save_packed
from qsched.quant.recipe import DEFAULT_SKIP, PRESETS, QuantRecipe, parse_preset
from qsched.quant.report import LayerRecord, QuantReport

__all__ = [
    "BACKENDS",
    "DEFAULT_SKIP",
    "PRESETS",
    "LayerRecord",
    "PackedSize",
    "QuantRecipe",
    "QuantReport",
    "is_quantized",
    "load_packed",
    "packed_size",
    "parse_preset",
    "quantize",
    "read_packed_recipe",
    "save_packed",
]
