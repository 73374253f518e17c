"""Quantization recipes: what to quantize, to how many bits, and what to leave alone.

A :class:`QuantRecipe` is a frozen value. Named presets (``w4a8`` …) are parsed
with :func:`parse_preset`, which is meant for the CLI boundary; library code
passes recipes around.

Weights are always quantized **symmetrically** (no zero point). On the default
*narrow* grid a tensor slice with largest magnitude ``amax`` gets the scale
``amax / (2**(b-1) - 1)`` and integer codes in ``[-(2**(b-1) - 1), 2**(b-1) - 1]``
(e.g. [-7, 7] for 4 bits, [-127, 127] for 8 bits). With ``full_range=True`` it is
torchao's symmetric grid: scale ``amax / ((2**b - 1) / 2)`` and codes in
``[-2**(b-1), 2**(b-1) - 1]`` (amax/7.5 and [-8, 7] for 4 bits). Weights get one
scale per output channel (``group_size=None``) or per group of ``group_size``
consecutive inputs. Activations are quantized at run time per token (Linear) or
per pixel across channels (Conv2d), optionally in ``act_groups`` groups of
consecutive features, symmetrically on the same grid as the weights or, with
``act_symmetric=False``, asymmetrically with a zero point (torchao's int8
dynamic activations: scale ``(max(x, 0) - min(x, 0)) / (2**b - 1)``, codes in
``[-2**(b-1), 2**(b-1) - 1]``). Quantization arithmetic runs in float32 whatever
the model's dtype.

Presets: ``w8a8``, ``w4a8``, ``w4a4`` … are qsched's own (and the default): every
Linear **and** Conv2d, per output channel, symmetric narrow grid, the
:data:`DEFAULT_SKIP` list. In a UNet most weights are convolutions, so only these
make the model as small as its bit width says. ``w4a8-ref`` and ``w4a4-ref``
reproduce the setting of the Q-Sched paper's code (torchao): Linear layers only,
nothing skipped, torchao's full-range int4 weights; W4A8 with groups of 32 weights
and asymmetric int8 per-token activations, W4A4 per output channel with symmetric
int4 activations in 4 groups per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from qsched.errors import QSchedError

ALLOWED_BITS: tuple[int, ...] = (4, 8, 16)
"""Bit widths a recipe accepts; 16 means "off" (kept in the model's own dtype)."""

ALLOWED_MODULE_TYPES: tuple[str, ...] = ("Linear", "Conv2d")
"""Module types the fake-quant reference implementation knows how to quantize."""

DEFAULT_SKIP: tuple[str, ...] = (
    # UNet (SD1.5 / SDXL: LCM, PCM, SDXL-Turbo): the first and last convolution map
    # between the 4-channel latent and the network width. They hold a tiny share of
    # the weights but their error lands directly in every sample.
    "conv_in",
    "conv_out",
    # Timestep / conditioning embeddings: tiny MLPs whose output modulates every
    # block; an error there shifts the whole denoising trajectory.
    "time_proj",
    "time_embedding*",
    "add_time_proj",
    "add_embedding*",
    "class_embedding*",
    # FLUX / DiT-style transformers: timestep+guidance+pooled-text embedder, the
    # patch embedders (first layers), and the final modulation + projection (last
    # layers) for the same reasons as conv_in / conv_out above.
    "*time_text_embed*",
    "x_embedder",
    "context_embedder",
    "pos_embed*",
    "norm_out*",
    "proj_out",
)
"""Default :attr:`QuantRecipe.skip` patterns (``fnmatch`` on full module names).

Patterns without a wildcard match top-level modules only: ``proj_out`` is FLUX's
final projection, not the ``proj_out`` inside every UNet attention block.
"""

_FIELDS = ("weight_bits", "act_bits", "group_size", "module_types", "skip", "full_range", "act_symmetric", "act_groups")


def _check_bits(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        raise QSchedError(
            f"{what}={value!r} is not supported; allowed: 4, 8 or 16 (16 = not quantized)"
        )


def _as_str_tuple(what: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise QSchedError(
            f"{what} must be a tuple of strings, got {value!r}"
            + (f"; did you mean ({value!r},)?" if isinstance(value, str) else "")
        )
    if not all(isinstance(v, str) and v for v in value):
        raise QSchedError(f"{what} must hold non-empty strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class QuantRecipe:
    """How to fake-quantize a denoiser (symmetric, round-to-nearest).

    weight_bits: 4, 8, or 16 (weights not quantized).
    act_bits: 4, 8, or 16 (activations not quantized); dynamic, per token for
        Linear inputs and per pixel across channels for Conv2d inputs.
    group_size: ``None`` for one weight scale per output channel; otherwise one
        scale per group of ``group_size`` consecutive values of the flattened input
        dimension (``in_features`` for Linear, ``in_channels*kh*kw`` for Conv2d),
        which must divide that dimension in every quantized layer.
    module_types: which layer types are quantized (``"Linear"``, ``"Conv2d"``).
    skip: ``fnmatch`` patterns on module qualified names kept in full precision
        (weights and inputs); a pattern names modules, not subtrees (use
        ``"block.*"``); see :data:`DEFAULT_SKIP` for the default and why.
    full_range: False (default) for the narrow symmetric grid ``[-(2**(b-1) - 1),
        2**(b-1) - 1]``, scale ``amax / (2**(b-1) - 1)``; True for torchao's symmetric
        grid ``[-2**(b-1), 2**(b-1) - 1]``, scale ``amax / ((2**b - 1) / 2)``. Applies
        to weights and to symmetric activations.
    act_symmetric: True (default) for symmetric activations; False for asymmetric
        ones with a per-slice zero point (torchao's int8 dynamic activations).
    act_groups: number of groups of consecutive input features per token (per
        pixel for Conv2d) with a scale each; 1 (default) is one scale per token. Must
        divide the input features of every layer whose input is quantized.
    """

    weight_bits: int = 8
    act_bits: int = 8
    group_size: int | None = None
    module_types: tuple[str, ...] = ALLOWED_MODULE_TYPES
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP)
    full_range: bool = False
    act_symmetric: bool = True
    act_groups: int = 1

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        gs = self.group_size
        if gs is not None:
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise QSchedError(
                    f"group_size={gs!r} is not supported; allowed: None (per output "
                    "channel) or a positive integer dividing each layer's input size"
                )
            if self.weight_bits == 16:
                raise QSchedError(
                    f"group_size={gs} given but weight_bits=16 (weights are not "
                    "quantized); set group_size=None or weight_bits to 4 or 8"
                )
        types = _as_str_tuple("module_types", self.module_types)
        unknown = [t for t in types if t not in ALLOWED_MODULE_TYPES]
        if unknown or not types:
            raise QSchedError(
                f"module_types={types!r} is not supported; allowed: a non-empty "
                f"subset of {ALLOWED_MODULE_TYPES!r}"
            )
        object.__setattr__(self, "module_types", types)
        object.__setattr__(self, "skip", _as_str_tuple("skip", self.skip))
        for name in ("full_range", "act_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise QSchedError(f"{name}={getattr(self, name)!r} must be True or False")
        groups = self.act_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise QSchedError(
                f"act_groups={groups!r} is not supported; allowed: a positive integer dividing "
                "the input features of each layer whose input is quantized (1 = one scale per token)"
            )
        if self.act_bits == 16 and (groups != 1 or not self.act_symmetric):
            raise QSchedError(
                f"act_groups={groups} / act_symmetric={self.act_symmetric} given but act_bits=16 "
                "(activations are not quantized); set act_bits to 4 or 8 or leave them at 1 / True"
            )
        if self.is_noop and self.full_range:
            raise QSchedError("full_range=True given but nothing is quantized (weight_bits=act_bits=16)")

    @property
    def is_noop(self) -> bool:
        """True when nothing is quantized (both bit widths are 16)."""
        return self.weight_bits == 16 and self.act_bits == 16

    @property
    def name(self) -> str:
        """Short name: the preset's name if it is one (``w4a8``, ``w4a8-ref``), else a base plus deviations.

        Deviations: ``g32`` (weight groups), ``full`` (full-range grid), ``asym``
        (asymmetric activations), ``ag4`` (activation groups), the module types and
        the skip list when they differ from the defaults.
        """
        preset = next((key for key, recipe in PRESETS.items() if recipe == self), None)
        if preset is not None:
            return preset
        base = "fp" if self.is_noop else f"w{self.weight_bits}a{self.act_bits}"
        parts = [base]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.full_range:
            parts.append("full")
        if not self.act_symmetric:
            parts.append("asym")
        if self.act_groups != 1:
            parts.append(f"ag{self.act_groups}")
        if self.module_types != ALLOWED_MODULE_TYPES:
            parts.append("+".join(self.module_types))
        if self.skip != DEFAULT_SKIP:
            parts.append(f"skip{len(self.skip)}" if self.skip else "noskip")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (schedule cards, packed-checkpoint headers)."""
        return {
            "name": self.name,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "group_size": self.group_size,
            "symmetric": True,
            "module_types": list(self.module_types),
            "skip": list(self.skip),
            "full_range": self.full_range,
            "act_symmetric": self.act_symmetric,
            "act_groups": self.act_groups,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantRecipe:
        """Inverse of :meth:`to_dict`; validates keys and values.

        Dicts written before ``full_range``/``act_symmetric``/``act_groups`` existed
        read as the defaults (what those versions did). ``symmetric`` is the weights'.
        """
        if not isinstance(data, Mapping):
            raise QSchedError(f"a quant recipe must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS) - {"name", "symmetric"})
        if unknown:
            raise QSchedError(
                f"unknown quant recipe keys {unknown}; allowed: {list(_FIELDS)} (+ 'name', 'symmetric')"
            )
        missing = [k for k in ("weight_bits", "act_bits") if k not in data]
        if missing:
            raise QSchedError(f"quant recipe lacks required keys {missing}")
        if data.get("symmetric", True) is not True:
            raise QSchedError("only symmetric weight quantization is supported ('symmetric': true)")
        kwargs = {k: data[k] for k in _FIELDS if k in data}
        for key in ("module_types", "skip"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


PRESETS: dict[str, QuantRecipe] = {
    "fp": QuantRecipe(weight_bits=16, act_bits=16),
    "w8a8": QuantRecipe(weight_bits=8, act_bits=8),
    "w4a8": QuantRecipe(weight_bits=4, act_bits=8),
    "w4a4": QuantRecipe(weight_bits=4, act_bits=4),
    "w4a16": QuantRecipe(weight_bits=4, act_bits=16),
    "w8a16": QuantRecipe(weight_bits=8, act_bits=16),
    # The Q-Sched paper's code (enyac-group/q-sched, torchao): W4A8 is
    # int8_dynamic_activation_int4_weight() -- int4 symmetric weights in groups of 32,
    # asymmetric int8 per-token activations; W4A4 is its own torchao config -- int4
    # symmetric weights per row, symmetric int4 activations in 4 groups per token.
    # Both: quantize_ on the denoiser, which touches Linear layers only and skips nothing.
    "w4a8-ref": QuantRecipe(weight_bits=4, act_bits=8, group_size=32, module_types=("Linear",), skip=(),
                            full_range=True, act_symmetric=False),
    "w4a4-ref": QuantRecipe(weight_bits=4, act_bits=4, module_types=("Linear",), skip=(),
                            full_range=True, act_groups=4),
}
"""Named recipes: qsched's own (per-channel weights, Linear and Conv2d, default skip list;
``w4a8`` is the CLI default) and the paper code's reference recipes (``-ref``)."""


def parse_preset(name: str) -> QuantRecipe:
    """The recipe of a preset name (case-insensitive), e.g. ``"w4a8"``."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PRESETS:
        raise QSchedError(
            f"unknown quantization preset {name!r}; allowed: {', '.join(PRESETS)}"
        )
    return PRESETS[key]
