"""Fake quantization (quantize -> dequantize): the reference implementation on any device.

Weights are replaced once, in place, by their dequantized values; activations are
quantized at run time by a forward pre-hook. Module classes and state-dict keys
stay unchanged, so diffusers code, ``save_pretrained`` and ``load_state_dict``
keep working. Each quantized layer keeps its small fp32 weight scale as a
non-persistent buffer ``qsched_weight_scale`` (shape ``[out, n_groups]``) so the
packed export (:mod:`qsched.quant.packed`) can recover the integer codes exactly.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from qsched.errors import QSchedError
from qsched.quant.recipe import DEFAULT_SKIP, QuantRecipe
from qsched.quant.report import (
    REASON_BIAS,
    REASON_BITS16,
    REASON_OTHER,
    LayerRecord,
    QuantReport,
    reason_not_targeted,
    reason_skipped,
)

SCALE_BUFFER = "qsched_weight_scale"
_MARKER = "_qsched_quant"
RECIPE_ATTR = "_qsched_recipe"  # the recipe, kept on the root module passed to quantize()
BACKENDS: tuple[str, ...] = ("packed", "fake", "torchao", "quanto")


@dataclass(frozen=True)
class LayerQuantState:
    """Marker left on every quantized module (weights and/or activations)."""

    weight_bits: int
    act_bits: int
    group_size: int  # effective group size along the flattened input dimension
    backend: str


@dataclass(frozen=True)
class LayerPlan:
    """What quantization does to one module with parameters of its own."""

    name: str
    module: nn.Module
    layer_type: str  # "Linear" | "Conv2d" | "other"
    weight_bits: int  # 16 = weight kept
    act_bits: int  # 16 = input kept
    group_size: int  # effective group size (the flattened input size if per channel)
    kept_reason: str  # why the weight is kept ("" when quantized)
    full_range: bool = False  # codes in [-2**(b-1), 2**(b-1) - 1] (torchao's grid), else narrow
    act_symmetric: bool = True  # False: asymmetric activations with a zero point
    act_groups: int = 1  # scales per token (Linear) or per pixel (Conv2d)

    @property
    def quantizes_weight(self) -> bool:
        return self.weight_bits < 16


def layer_type(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    return "other"


def qmax(bits: int) -> int:
    """Largest integer code of symmetric ``bits``-bit quantization (7 for 4 bits)."""
    return 2 ** (bits - 1) - 1


def code_range(bits: int, *, full_range: bool = False) -> tuple[int, int]:
    """Smallest and largest code: ``(-qmax, qmax)`` on the narrow grid, ``(-qmax - 1, qmax)`` on the full one."""
    return (-qmax(bits) - 1 if full_range else -qmax(bits)), qmax(bits)


def _symmetric_divisor(bits: int, full_range: bool) -> float:
    """``amax / divisor`` is the scale: ``qmax`` (narrow) or ``(2**b - 1) / 2`` (full, torchao)."""
    return (2**bits - 1) / 2 if full_range else float(qmax(bits))


def is_quantized(model: nn.Module) -> bool:
    """True when qsched (any backend) or another tool already quantized ``model``."""
    return _quantized_example(model) is not None


def _quantized_example(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if hasattr(module, _MARKER):
            return f"layer {name!r} ({getattr(module, _MARKER).backend})"
        if type(module).__module__.startswith("optimum.quanto"):
            return f"layer {name!r} (optimum-quanto {type(module).__name__})"
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
            return f"layer {name!r} (weight is a {type(weight).__name__})"
    return None


def refuse_quantized(model: nn.Module) -> None:
    example = _quantized_example(model)
    if example is not None:
        raise QSchedError(
            f"the model is already quantized ({example}); quantize a freshly loaded "
            "full-precision model instead (one FP checkpoint serves every bit-width)"
        )


def plan_layers(model: nn.Module, recipe: QuantRecipe) -> tuple[list[LayerPlan], tuple[str, ...]]:
    """Decide, for every module with parameters, what the recipe does to it.

    Validates group sizes against every quantized layer before anything is
    changed. Returns the plans and the non-default skip patterns that matched
    no module.
    """
    plans: list[LayerPlan] = []
    bad_groups: list[str] = []
    bad_act_groups: list[str] = []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        kind = layer_type(module)
        pattern = next((p for p in recipe.skip if fnmatch.fnmatchcase(name, p)), None)
        in_flat = module.weight[0].numel() if kind != "other" else 0
        if kind == "other":
            plan = (16, 16, REASON_OTHER)
        elif kind not in recipe.module_types:
            plan = (16, 16, reason_not_targeted(kind))
        elif pattern is not None:
            plan = (16, 16, reason_skipped(pattern))
        elif recipe.weight_bits == 16:
            plan = (16, recipe.act_bits, REASON_BITS16)
        else:
            plan = (recipe.weight_bits, recipe.act_bits, "")
        group = in_flat
        if plan[0] < 16 and recipe.group_size is not None:
            group = recipe.group_size
            if in_flat % group:
                bad_groups.append(f"{name!r} ({kind} {tuple(module.weight.shape)}, input size {in_flat})")
        if plan[1] < 16 and recipe.act_groups > 1:
            features = module.weight.shape[1]  # Linear in_features, Conv2d in_channels
            if features % recipe.act_groups:
                bad_act_groups.append(f"{name!r} ({kind} with {features} input features)")
        plans.append(LayerPlan(name, module, kind, plan[0], plan[1], group, plan[2], recipe.full_range,
                               recipe.act_symmetric, recipe.act_groups))
    if bad_act_groups:
        raise QSchedError(
            f"act_groups={recipe.act_groups} does not divide the input features of layer {bad_act_groups[0]}"
            + (f" and {len(bad_act_groups) - 1} more" if len(bad_act_groups) > 1 else "")
            + "; choose a number of activation groups dividing them, or skip those layers"
        )
    if bad_groups:
        raise QSchedError(
            f"group_size={recipe.group_size} does not divide the input size of layer "
            f"{bad_groups[0]}"
            + (f" and {len(bad_groups) - 1} more" if len(bad_groups) > 1 else "")
            + "; choose a group size dividing every quantized layer's input size, "
            "skip those layers, or use group_size=None (per output channel)"
        )
    # Matches on any module count, also those without parameters (e.g. 'time_proj').
    names = [name for name, _ in model.named_modules()]
    matched = {p for p in recipe.skip if any(fnmatch.fnmatchcase(n, p) for n in names)}
    unmatched = tuple(p for p in recipe.skip if p not in matched and p not in DEFAULT_SKIP)
    return plans, unmatched


def quantize_weight(
    weight: torch.Tensor, *, bits: int, group_size: int, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest codes (float, shape ``[out, in_flat]``) and fp32 scales ``[out, n_groups]``.

    Codes lie in :func:`code_range` (``[-8, 7]`` at most for 4 bits, so ``code + 8`` fits a nibble).
    """
    out = weight.shape[0]
    grouped = weight.detach().reshape(out, -1, group_size).float()
    scale = grouped.abs().amax(dim=-1) / _symmetric_divisor(bits, full_range)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # x * (1 / scale), as torchao computes it: on the full grid amax lands on 7.5 and the
    # last float bit decides between codes 7 and 8 (then clamped), so the arithmetic must match.
    codes = torch.round(grouped * scale.reciprocal().unsqueeze(-1)).clamp_(*code_range(bits, full_range=full_range))
    return codes.reshape(out, -1), scale


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, *, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``codes * scale`` per group, reshaped to the layer's weight shape and dtype."""
    out, groups = scale.shape
    deq = codes.float().reshape(out, groups, -1) * scale.float().unsqueeze(-1)
    return deq.reshape(shape).to(dtype)


def _grouped_shape(shape: torch.Size, d: int, groups: int) -> tuple[int, ...]:
    """``shape`` with dimension ``d`` split into ``(groups, shape[d] // groups)``."""
    if shape[d] % groups:
        raise QSchedError(f"act_groups={groups} does not divide the {shape[d]} input features")
    return (*shape[:d], groups, shape[d] // groups, *shape[d + 1:])


def quantize_activation(
    x: torch.Tensor, *, bits: int, dim: int, symmetric: bool = True, groups: int = 1, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dynamic quantization of ``x``: float32 ``codes``, ``scale`` and ``zero_point`` (None if symmetric).

    ``dim`` is the reduced dimension: -1 (features) gives one scale per token, -3
    (channels of ``[N, C, H, W]``) one per pixel; ``groups`` splits it into that many
    groups of consecutive features with a scale each. ``codes`` has ``x``'s shape;
    ``scale`` and ``zero_point`` have ``dim`` split into ``(groups, 1)``. The arithmetic
    runs in float32 whatever ``x``'s dtype: in bfloat16, ``x / (amax / 127)`` can round
    to 128, outside the int8 grid. Codes are clamped to the grid all the same.
    """
    d = dim % x.dim()
    xf = x.float().reshape(_grouped_shape(x.shape, d, groups))
    lo, hi = code_range(bits, full_range=full_range or not symmetric)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        # abs().amax() is ~30x faster on CPU than linalg.vector_norm(ord=inf) (torch 2.13).
        amax = xf.abs().amax(dim=d + 1, keepdim=True)
        scale = (amax / _symmetric_divisor(bits, full_range)).clamp_min_(tiny)
        codes = (xf * scale.reciprocal()).round_().clamp_(lo, hi)
        return codes.reshape(x.shape), scale, None
    # Asymmetric (torchao's choose_qparams_affine, ASYMMETRIC): the range always holds 0.
    low = xf.amin(dim=d + 1, keepdim=True).clamp_max_(0.0)
    high = xf.amax(dim=d + 1, keepdim=True).clamp_min_(0.0)
    scale = ((high - low) / float(hi - lo)).clamp_min_(tiny)
    zero_point = (lo - torch.round(low / scale)).clamp_(lo, hi)
    codes = (xf * scale.reciprocal()).round_().add_(zero_point).clamp_(lo, hi)
    return codes.reshape(x.shape), scale, zero_point


def fake_quantize_activation(
    x: torch.Tensor, *, bits: int, dim: int, symmetric: bool = True, groups: int = 1, full_range: bool = False
) -> torch.Tensor:
    """Quantize -> dequantize ``x`` (see :func:`quantize_activation`), returned in ``x``'s dtype."""
    codes, scale, zero_point = quantize_activation(
        x, bits=bits, dim=dim, symmetric=symmetric, groups=groups, full_range=full_range
    )
    grouped = codes.reshape(_grouped_shape(x.shape, dim % x.dim(), groups))
    if zero_point is not None:
        grouped = grouped.sub_(zero_point)
    return grouped.mul_(scale).reshape(x.shape).to(x.dtype)


class ActivationQuantizer:
    """Forward pre-hook quantizing a layer's input (per token or per pixel, optionally in groups)."""

    def __init__(
        self, *, bits: int, dim: int, symmetric: bool = True, groups: int = 1, full_range: bool = False
    ) -> None:
        self.bits = bits
        self.dim = dim
        self.symmetric = symmetric
        self.groups = groups
        self.full_range = full_range

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        return (self.quantize(args[0]), *args[1:])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized (same shape and dtype)."""
        return fake_quantize_activation(
            x, bits=self.bits, dim=self.dim, symmetric=self.symmetric, groups=self.groups, full_range=self.full_range
        )

    def __repr__(self) -> str:
        return (
            f"ActivationQuantizer(bits={self.bits}, dim={self.dim}, symmetric={self.symmetric}, "
            f"groups={self.groups}, full_range={self.full_range})"
        )


def make_activation_quantizer(plan: LayerPlan) -> ActivationQuantizer | None:
    """The input quantizer of a planned layer (None when its input stays in full precision).

    The one place that turns a plan into activation quantization: the fake-quant hook
    and the packed layers (:mod:`qsched.quant.packed_modules`) both call it, so the
    two paths quantize inputs identically.
    """
    if plan.act_bits >= 16:
        return None
    dim = -1 if plan.layer_type == "Linear" else -3
    return ActivationQuantizer(
        bits=plan.act_bits, dim=dim, symmetric=plan.act_symmetric, groups=plan.act_groups, full_range=plan.full_range
    )


def attach(plan: LayerPlan, *, scale: torch.Tensor | None, backend: str, act_hook: bool = True) -> None:
    """Mark a module as quantized, keep its weight scale, add the activation hook."""
    module = plan.module
    if scale is not None:
        module.register_buffer(SCALE_BUFFER, scale.to(module.weight.device), persistent=False)
    quantizer = make_activation_quantizer(plan) if act_hook else None
    if quantizer is not None:
        module.register_forward_pre_hook(quantizer)
    setattr(module, _MARKER, LayerQuantState(plan.weight_bits, plan.act_bits, plan.group_size, backend))


def apply_fake(plans: list[LayerPlan]) -> None:
    """Quantize weights in place and attach hooks for every plan that asks for it."""
    for plan in plans:
        if not plan.quantizes_weight and plan.act_bits == 16:
            continue
        scale = None
        if plan.quantizes_weight:
            weight = plan.module.weight
            codes, scale = quantize_weight(
                weight, bits=plan.weight_bits, group_size=plan.group_size, full_range=plan.full_range
            )
            with torch.no_grad():
                weight.copy_(dequantize_weight(codes, scale, shape=weight.shape, dtype=weight.dtype))
        attach(plan, scale=scale, backend="fake")


def build_report(
    plans: list[LayerPlan], recipe: QuantRecipe, *, backend: str, unmatched: tuple[str, ...] = ()
) -> QuantReport:
    records = []
    for plan in plans:
        own = sum(p.numel() for p in plan.module.parameters(recurse=False))
        quantized = plan.module.weight.numel() if plan.quantizes_weight else 0
        kept = own - quantized
        reason = plan.kept_reason if not plan.quantizes_weight else (REASON_BIAS if kept else "")
        records.append(LayerRecord(plan.name, plan.layer_type, quantized, kept, reason, plan.act_bits))
    return QuantReport(recipe=recipe, backend=backend, layers=tuple(records), unmatched_skip=unmatched)


def quantize(model: nn.Module, recipe: QuantRecipe, *, backend: str = "fake") -> QuantReport:
    """Quantize ``model`` in place according to ``recipe`` and report what was done.

    ``backend="fake"`` (default) is the reference fake quantization (float weights on
    the integer grid); ``"packed"`` replaces the quantized layers by packed layers that
    hold only int4/int8 codes and scales and compute the same outputs (see
    :mod:`qsched.quant.packed_modules`); ``"torchao"`` and ``"quanto"`` use real
    kernels where they support the recipe (see :mod:`qsched.quant.backends`). A model that is already quantized is refused;
    nothing is changed when an error is raised.
    """
    if not isinstance(recipe, QuantRecipe):
        raise QSchedError(
            f"recipe must be a QuantRecipe, got {type(recipe).__name__}; "
            "use qsched.quant.parse_preset('w4a8') for a preset name"
        )
    if backend not in BACKENDS:
        raise QSchedError(f"unknown quantization backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "packed":
        from qsched.quant.stream import pack_model

        return pack_model(model, recipe)
    refuse_quantized(model)
    plans, unmatched = plan_layers(model, recipe)
    if backend == "fake":
        apply_fake(plans)
    else:
        from qsched.quant.backends import apply_backend

        plans = apply_backend(backend, model, recipe, plans)
    if not recipe.is_noop:
        setattr(model, RECIPE_ATTR, recipe)
    return build_report(plans, recipe, backend=backend, unmatched=unmatched)
