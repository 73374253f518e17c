"""Real quantization kernels (torchao, optimum-quanto) where they support a recipe.

The fake backend (:mod:`qsched.quant.fake`) is the reference and supports every
recipe on every device. The real backends below are offered only where they
implement the *same* recipe (or say precisely how they differ); otherwise they
refuse with a :class:`~qsched.errors.QSchedError` before touching the model.

=========  ===================  ==========================================================
backend    recipes              notes
=========  ===================  ==========================================================
torchao    w8a8 (per channel)   ``Int8DynamicActivationInt8WeightConfig``: int8 per-row
                                weights, int8 per-token activations (symmetric, or asymmetric
                                with ``act_symmetric=False``). CPU and GPU. On this CPU ~5x
                                slower than fp32 (reference kernels).
torchao    w4a8, w4a8-ref       ``Int8DynamicActivationIntxWeightConfig(weight_dtype=int4)``:
           (per channel or      symmetric int4 weights; activations int8 per token but
           group_size)          *asymmetric* (torchao requires it). Stored unpacked in int8
                                (no size saving). CPU and GPU. ``w4a8-ref`` (full-range grid,
                                asymmetric activations, groups of 32) is exactly this
                                config: it agrees with the fake backend to float rounding.
torchao    w8a16                ``Int8WeightOnlyConfig``: int8 per-row weights. CPU and GPU.
torchao    w4a16 (GPU only)     ``Int4WeightOnlyConfig(group_size=G)``, CUDA only; G
                                defaults to 128 when the recipe has no group size.
quanto     w8a16                ``quantize(weights=qint8)``: symmetric per-channel int8,
                                Linear **and** Conv2d. CPU and GPU.
quanto     w4a16                ``quantize(weights=qint4)``: quanto's own int4 layout
                                (asymmetric, groups of up to 128), Linear and Conv2d.
=========  ===================  ==========================================================

torchao's symmetric grid is the recipe's ``full_range=True`` grid: scale
``amax / ((2**b - 1) / 2)`` with codes in ``[-2**(b-1), 2**(b-1) - 1]`` (amax/7.5 and
[-8, 7] for int4). qsched's own presets use the narrow grid, ``amax / (2**(b-1) - 1)``
and ``[-(2**(b-1) - 1), 2**(b-1) - 1]``, and symmetric activations: with them
individual roundings differ from torchao's, the error level is the same (tested).
torchao has one activation scale per token: ``act_groups > 1`` (``w4a4-ref``) is
refused.

torchao quantizes Linear layers only: a recipe that would also quantize Conv2d
layers of the model is refused (use ``module_types=("Linear",)``, or the fake or
quanto backend). quanto quantizes activations with *static* per-tensor scales
that need a calibration pass, which is not the recipe's dynamic per-token
scheme, so recipes with ``act_bits < 16`` are refused there; W4A4 has no real
kernel in either library and is fake-only. Both backends replace weights by
tensor subclasses (quanto also replaces module classes), so their models cannot
be written with :func:`qsched.quant.save_packed`; save the fake model instead.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
from torch import nn

from qsched.errors import QSchedError
from qsched.quant.fake import LayerPlan, attach
from qsched.quant.recipe import QuantRecipe


def _require(package: str, backend: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise QSchedError(
            f"backend {backend!r} needs the {package!r} package, which is not installed; "
            "install qsched[backends] or use backend='fake'"
        )


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _refuse(backend: str, recipe: QuantRecipe, why: str) -> QSchedError:
    return QSchedError(f"backend {backend!r} does not support recipe {recipe.name!r}: {why}; use backend='fake'")


def torchao_config(recipe: QuantRecipe, *, device: torch.device) -> object:
    """The torchao config implementing ``recipe`` on ``device`` (refuses otherwise)."""
    _require("torchao", "torchao")
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        MappingType,
        PerAxis,
        PerGroup,
    )

    w, a, g = recipe.weight_bits, recipe.act_bits, recipe.group_size
    if a < 16 and recipe.act_groups != 1:
        raise _refuse("torchao", recipe, f"its activations have one scale per token, not {recipe.act_groups} groups")
    if (w, a) == (8, 8):
        if g is not None:
            raise _refuse("torchao", recipe, "its int8 W8A8 kernel has per-channel weights only (group_size=None)")
        act = MappingType.SYMMETRIC if recipe.act_symmetric else MappingType.ASYMMETRIC
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=act)
    if (w, a) == (4, 8):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4,
            weight_granularity=PerAxis(0) if g is None else PerGroup(g),
            weight_mapping_type=MappingType.SYMMETRIC,
            act_mapping_type=MappingType.ASYMMETRIC,  # the only one its int4 path implements
        )
    if (w, a) == (8, 16):
        if g is not None:
            raise _refuse("torchao", recipe, "its int8 weight-only kernel is per channel (group_size=None)")
        return Int8WeightOnlyConfig()
    if (w, a) == (4, 16):
        if device.type != "cuda":
            raise _refuse("torchao", recipe, f"Int4WeightOnlyConfig needs a CUDA device, the model is on {device}")
        return Int4WeightOnlyConfig(group_size=g or 128)
    raise _refuse("torchao", recipe, "torchao has no kernel for these bit widths (w8a8, w4a8, w8a16, w4a16 only)")


def _apply_torchao(model: nn.Module, recipe: QuantRecipe, plans: list[LayerPlan]) -> list[LayerPlan]:
    convs = [p.name for p in plans if p.layer_type == "Conv2d" and (p.quantizes_weight or p.act_bits < 16)]
    if convs:
        raise _refuse(
            "torchao",
            recipe,
            f"torchao quantizes Linear layers only and this recipe targets {len(convs)} Conv2d "
            f"layers (e.g. {convs[0]!r}); pass module_types=('Linear',) or use backend 'quanto'",
        )
    if recipe.weight_bits == 16:
        raise _refuse("torchao", recipe, "torchao has no activation-only quantization")
    config = torchao_config(recipe, device=_device(model))
    from torchao.quantization import quantize_

    targets = {id(p.module) for p in plans if p.quantizes_weight}
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in targets)
    for plan in plans:
        if plan.quantizes_weight:
            attach(plan, scale=None, backend="torchao", act_hook=False)
    return plans


def _apply_quanto(model: nn.Module, recipe: QuantRecipe, plans: list[LayerPlan]) -> list[LayerPlan]:
    if recipe.act_bits < 16:
        raise _refuse(
            "quanto",
            recipe,
            "optimum-quanto quantizes activations with static per-tensor scales from a "
            "calibration pass, not dynamically per token; weight-only recipes (w8a16, w4a16) only",
        )
    if recipe.weight_bits == 16:
        raise _refuse("quanto", recipe, "nothing to quantize (weight_bits=16)")
    if recipe.group_size is not None:
        raise _refuse("quanto", recipe, "quanto chooses its own int4 groups; use group_size=None")
    _require("optimum.quanto", "quanto")
    from optimum.quanto import freeze, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize

    names = [p.name for p in plans if p.quantizes_weight]
    if not names:
        return plans
    quanto_quantize(model, weights=qint8 if recipe.weight_bits == 8 else qint4, include=names)
    freeze(model)
    # quanto swapped the quantized modules for its own classes: plan on the new ones.
    modules = dict(model.named_modules())
    plans = [dataclasses.replace(p, module=modules[p.name]) for p in plans]
    for plan in plans:
        if plan.quantizes_weight:
            attach(plan, scale=None, backend="quanto", act_hook=False)
    return plans


def apply_backend(backend: str, model: nn.Module, recipe: QuantRecipe, plans: list[LayerPlan]) -> list[LayerPlan]:
    """Quantize ``model`` with a real backend; refuses unsupported recipes before changing anything.

    Returns the plans, pointing at the modules now in the model.
    """
    if backend == "torchao":
        return _apply_torchao(model, recipe, plans)
    if backend == "quanto":
        return _apply_quanto(model, recipe, plans)
    raise QSchedError(f"unknown quantization backend {backend!r}; allowed: fake, torchao, quanto")
