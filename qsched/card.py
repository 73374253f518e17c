"""Schedule cards: the coefficients of a calibration and everything needed to reproduce them.

A card is a small versioned JSON file. It is what ``qsched calibrate`` writes and
what ``qsched generate --card`` reads; the pipeline's saved scheduler config never
holds coefficients. Loading validates the schema, and :meth:`ScheduleCard.check`
refuses a card made for another model family or number of steps.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from qsched.errors import QSchedError
from qsched.provenance import package_versions, write_json_atomic
from qsched.schedule import QSchedCoefficients

CARD_FORMAT = "qsched-schedule-card"
CARD_VERSION = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ScheduleCard:
    """Coefficients plus their provenance.

    ``quant`` is a quantization recipe as a dict (``QuantRecipe.to_dict()``),
    ``parametrization`` how the coefficients were parametrised in the search (e.g.
    ``{"space": "ramp", "cx_start": 1.04, "ceps_start": 0.97}``), ``objective`` the
    JAQ definition with its value, ``prompts`` the calibration prompt source with
    its SHA-256 and count.
    """

    coefficients: QSchedCoefficients
    model: str
    family: str
    quant: Mapping[str, Any]
    steps: int
    guidance_scale: float | None = None
    seed: int | None = None
    parametrization: Mapping[str, Any] = field(default_factory=dict)
    objective: Mapping[str, Any] | None = None
    prompts: Mapping[str, Any] | None = None
    versions: Mapping[str, str] = field(default_factory=package_versions)
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not isinstance(self.coefficients, QSchedCoefficients):
            raise QSchedError("card coefficients must be a QSchedCoefficients")
        for name in ("model", "family", "created"):
            _require(self, isinstance(getattr(self, name), str) and bool(getattr(self, name)), name, "a non-empty string")
        _require(self, _is_int(self.steps) and self.steps >= 1, "steps", "a positive integer")
        _require(self, self.guidance_scale is None or _is_number(self.guidance_scale), "guidance_scale", "a number or null")
        _require(self, self.seed is None or _is_int(self.seed), "seed", "an integer or null")
        for name in ("quant", "parametrization", "versions"):
            _require(self, isinstance(getattr(self, name), Mapping), name, "an object")
        for name in ("objective", "prompts"):
            _require(self, getattr(self, name) is None or isinstance(getattr(self, name), Mapping), name, "an object or null")
        if self.coefficients.num_steps != self.steps:
            raise QSchedError(
                f"card says steps={self.steps} but its coefficients have "
                f"{self.coefficients.num_steps} entries"
            )

    def check(self, *, family: str | None = None, steps: int | None = None) -> None:
        """Refuse to apply this card to another family or number of steps, naming the mismatch."""
        problems = []
        if family is not None and family != self.family:
            problems.append(f"it was calibrated for family {self.family!r}, not {family!r}")
        if steps is not None and steps != self.steps:
            problems.append(f"it was calibrated for {self.steps} steps, not {steps}")
        if problems:
            raise QSchedError(
                "schedule card does not fit: " + "; ".join(problems)
                + " (calibrate a card for this setting, or match the card's settings)"
            )

    def for_recipe(self, quant: Mapping[str, Any], *, note: str | None = None) -> ScheduleCard:
        """These coefficients relabelled for another recipe ``quant`` (``QuantRecipe.to_dict()``), on purpose.

        A card is refused for any recipe but its own: its coefficients correct that
        recipe's error. A control study that applies one recipe's coefficients to
        another (full precision's on W4A8, say) makes the transplant explicit with this.
        The new card says where its coefficients came from in
        ``parametrization["transplanted_from"]`` (the recipe they were calibrated for, and
        ``note``); everything else, ``objective`` (measured on that recipe) and ``created``
        included, is kept, so the same card always gives the same file.
        """
        if dict(quant) == dict(self.quant):
            raise QSchedError(f"the card is already for recipe {dict(quant).get('name', dict(quant))!r}; nothing to transplant")
        origin = dict(self.parametrization.get("transplanted_from") or {"quant": dict(self.quant)})
        if note is not None:
            origin["note"] = note
        return replace(self, quant=dict(quant), parametrization={**self.parametrization, "transplanted_from": origin})

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, with format and version first."""
        return {
            "format": CARD_FORMAT,
            "version": CARD_VERSION,
            "model": self.model,
            "family": self.family,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "quant": dict(self.quant),
            "coefficients": self.coefficients.to_dict(),
            "parametrization": dict(self.parametrization),
            "objective": None if self.objective is None else dict(self.objective),
            "prompts": None if self.prompts is None else dict(self.prompts),
            "seed": self.seed,
            "versions": dict(self.versions),
            "created": self.created,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the card atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "card") -> ScheduleCard:
        """Validate a parsed card document and build the card."""
        if not isinstance(data, dict):
            raise QSchedError(f"{source}: a schedule card is a JSON object, got {type(data).__name__}")
        if data.get("format") != CARD_FORMAT:
            raise QSchedError(f"{source}: not a schedule card (format is {data.get('format')!r}, expected {CARD_FORMAT!r})")
        if data.get("version") != CARD_VERSION:
            raise QSchedError(
                f"{source}: card version {data.get('version')!r} is not supported "
                f"(this qsched reads version {CARD_VERSION})"
            )
        fields = {
            "model", "family", "steps", "guidance_scale", "quant", "coefficients",
            "parametrization", "objective", "prompts", "seed", "versions", "created",
        }
        present = set(data) - {"format", "version"}
        if present != fields:
            missing, unknown = sorted(fields - present), sorted(present - fields)
            raise QSchedError(f"{source}: malformed card (missing fields {missing}, unknown fields {unknown})")
        values = {name: data[name] for name in fields}
        try:
            values["coefficients"] = QSchedCoefficients.from_dict(data["coefficients"])
            return cls(**values)
        except QSchedError as err:
            raise QSchedError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, *, family: str | None = None, steps: int | None = None) -> ScheduleCard:
        """Read and validate a card; with ``family``/``steps`` also :meth:`check` it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise QSchedError(f"schedule card {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise QSchedError(f"cannot read schedule card {path}: {err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise QSchedError(f"schedule card {path} is not valid JSON (corrupt or truncated?): {err}") from None
        card = cls.from_dict(data, source=str(path))
        card.check(family=family, steps=steps)
        return card


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _require(card: ScheduleCard, ok: bool, name: str, allowed: str) -> None:
    if not ok:
        raise QSchedError(f"card field {name!r} must be {allowed}, got {getattr(card, name)!r}")
