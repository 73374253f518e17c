"""Quantization of diffusion denoisers: recipes, fake quantization, packed layers and checkpoints.

Importing this package loads no model and needs neither torchao nor quanto.
"""

from __future__ import annotations

from qsched.quant.fake import BACKENDS, is_quantized, quantize
from qsched.quant.packed import PackedSize, load_packed, packed_size, read_packed_recipe, save_packed
from qsched.quant.packed_modules import PackedConv2d, PackedLinear, use_int8_kernel
from qsched.quant.recipe import DEFAULT_SKIP, PRESETS, QuantRecipe, parse_preset
from qsched.quant.report import LayerRecord, QuantReport
from qsched.quant.stream import component_source, load_quantized, pack_model

__all__ = [
    "BACKENDS",
    "DEFAULT_SKIP",
    "PRESETS",
    "LayerRecord",
    "PackedConv2d",
    "PackedLinear",
    "PackedSize",
    "QuantRecipe",
    "QuantReport",
    "component_source",
    "is_quantized",
    "load_packed",
    "load_quantized",
    "pack_model",
    "packed_size",
    "parse_preset",
    "quantize",
    "read_packed_recipe",
    "save_packed",
    "use_int8_kernel",
]
