"""What a quantization did: per layer and per layer type, quantized vs kept, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qsched.quant.recipe import QuantRecipe

LAYER_TYPES: tuple[str, ...] = ("Linear", "Conv2d", "other")

REASON_BIAS = "bias (always full precision)"
REASON_OTHER = "not a Linear/Conv2d layer"
REASON_BITS16 = "weight_bits=16"


def reason_skipped(pattern: str) -> str:
    return f"skipped by pattern {pattern!r}"


def reason_not_targeted(layer_type: str) -> str:
    return f"{layer_type} not in module_types"


@dataclass(frozen=True)
class LayerRecord:
    """One module with parameters of its own.

    ``kept_reason`` explains ``kept_params`` (empty when nothing was kept);
    ``act_bits`` is the activation quantization applied to the input (16 = none).
    """

    name: str
    layer_type: str
    quantized_params: int
    kept_params: int
    kept_reason: str
    act_bits: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer_type": self.layer_type,
            "quantized_params": self.quantized_params,
            "kept_params": self.kept_params,
            "kept_reason": self.kept_reason,
            "act_bits": self.act_bits,
        }


@dataclass(frozen=True)
class QuantReport:
    """Result of :func:`qsched.quant.quantize` or :func:`qsched.quant.load_packed`."""

    recipe: QuantRecipe
    backend: str
    layers: tuple[LayerRecord, ...]
    unmatched_skip: tuple[str, ...] = ()

    @property
    def quantized_params(self) -> int:
        return sum(r.quantized_params for r in self.layers)

    @property
    def kept_params(self) -> int:
        return sum(r.kept_params for r in self.layers)

    @property
    def quantized_fraction(self) -> float:
        total = self.quantized_params + self.kept_params
        return self.quantized_params / total if total else 0.0

    @property
    def quantized_layers(self) -> tuple[str, ...]:
        """Names of layers whose weights were quantized."""
        return tuple(r.name for r in self.layers if r.quantized_params)

    @property
    def act_quantized_layers(self) -> tuple[str, ...]:
        """Names of layers whose inputs are quantized at run time."""
        return tuple(r.name for r in self.layers if r.act_bits < 16)

    def by_type(self) -> dict[str, dict[str, Any]]:
        """Per layer type: layers, quantized params, kept params and kept-by-reason."""
        out: dict[str, dict[str, Any]] = {
            t: {"layers": 0, "quantized": 0, "kept": 0, "kept_by_reason": {}} for t in LAYER_TYPES
        }
        for r in self.layers:
            row = out[r.layer_type]
            row["layers"] += 1
            row["quantized"] += r.quantized_params
            row["kept"] += r.kept_params
            if r.kept_params:
                reasons = row["kept_by_reason"]
                reasons[r.kept_reason] = reasons.get(r.kept_reason, 0) + r.kept_params
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary, including every layer."""
        return {
            "recipe": self.recipe.to_dict(),
            "backend": self.backend,
            "quantized_params": self.quantized_params,
            "kept_params": self.kept_params,
            "by_type": self.by_type(),
            "unmatched_skip": list(self.unmatched_skip),
            "layers": [r.to_dict() for r in self.layers],
        }

    def format(self) -> str:
        """A readable table: per type, then what was kept and why."""
        lines = [f"quantization {self.recipe.name} (backend {self.backend})"]
        head = f"{'type':<8} {'layers':>7} {'quantized':>13} {'kept':>13} {'quantized %':>12}"
        lines += [head, "-" * len(head)]
        rows = self.by_type()
        for t in LAYER_TYPES:
            row = rows[t]
            total = row["quantized"] + row["kept"]
            pct = f"{100 * row['quantized'] / total:.1f}" if total else "-"
            lines.append(
                f"{t:<8} {row['layers']:>7} {row['quantized']:>13,} {row['kept']:>13,} {pct:>12}"
            )
        total = self.quantized_params + self.kept_params
        lines.append(
            f"{'total':<8} {len(self.layers):>7} {self.quantized_params:>13,} "
            f"{self.kept_params:>13,} {100 * self.quantized_fraction:>12.1f}"
            if total
            else f"{'total':<8} {0:>7} {0:>13} {0:>13} {'-':>12}"
        )
        kept = [(t, reason, n) for t in LAYER_TYPES for reason, n in rows[t]["kept_by_reason"].items()]
        if kept:
            lines.append("kept in full precision:")
            for t, reason, n in sorted(kept, key=lambda k: -k[2]):
                lines.append(f"  {t:<8} {n:>13,}  {reason}")
        if self.unmatched_skip:
            lines.append(f"skip patterns matching no module: {', '.join(self.unmatched_skip)}")
        return "\n".join(lines)
