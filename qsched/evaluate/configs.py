"""Evaluation configurations: the names a user types (``fp``, ``w4a8+card``, ...) as frozen values.

A configuration is a quantization recipe plus a sampler correction:

* ``fp``, ``w8a8``, ``w4a8``, ``w4a4`` (any preset of :data:`qsched.quant.PRESETS`): the plain sampler;
* ``<preset>+card``: the Q-Sched coefficients of a schedule card given with ``--card``;
* ``<preset>+qsched``: Q-Sched coefficients, calibrated first when no card for the recipe is given;
* ``<preset>+ptqd``: the PTQD baseline (:mod:`qsched.ptqd`), calibrated first against ``fp``
  when no statistics file is given.

Names are parsed only here, at the boundary; the rest of :mod:`qsched.evaluate` sees
:class:`EvalConfig` values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from qsched.errors import QSchedError
from qsched.quant import PRESETS, QuantRecipe, parse_preset

CORRECTIONS = ("none", "card", "qsched", "ptqd")
#: The issue's default comparison (the built-in model).
#: The paper's comparison plus ``fp+qsched``, full precision with its own calibrated
#: coefficients: the control without which a gain cannot be called quantization-specific.
DEFAULT_CONFIGS = ("fp", "fp+qsched", "w8a8", "w4a8", "w4a8+qsched", "w4a4", "w4a4+qsched")
_NAME = re.compile(r"^(?P<preset>[a-z0-9-]+)(?:\+(?P<correction>[a-z]+))?$")


@dataclass(frozen=True)
class EvalConfig:
    """One row of the comparison table.

    ``card`` is the schedule card file for ``card``/``qsched`` configurations (None:
    calibrate a Q-Sched card first), ``stats`` the PTQD statistics file for ``ptqd``
    (None: estimate them first).
    """

    name: str
    recipe: QuantRecipe
    correction: str = "none"
    card: str | None = None
    stats: str | None = None

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise QSchedError(f"unknown correction {self.correction!r}; allowed: {', '.join(CORRECTIONS)}")
        if self.correction == "card" and self.card is None:
            raise QSchedError(f"configuration {self.name!r} needs a schedule card (--card CARD.json)")

    @property
    def is_fp(self) -> bool:
        return self.recipe.is_noop and self.correction == "none"

    def identity(self) -> dict[str, object]:
        """What the images of this configuration depend on (compared on resume)."""
        return {"name": self.name, "recipe": self.recipe.to_dict(), "correction": self.correction}


def config_names_help() -> str:
    presets = ", ".join(p for p in PRESETS)
    return f"presets {presets}; optionally +card, +qsched or +ptqd (e.g. w4a8+qsched)"


def parse_configs(
    names: str | Sequence[str],
    *,
    cards: Sequence[str | Path] = (),
    card_recipes: Mapping[str, QuantRecipe] | None = None,
    ptqd_stats: Mapping[str, str] | None = None,
) -> list[EvalConfig]:
    """Parse ``"fp,w4a8,w4a8+card"`` (or a list) into configurations, ``fp`` first.

    ``cards`` are schedule-card paths; ``card_recipes`` maps each to its recipe (read
    by the caller with :class:`qsched.card.ScheduleCard`). A ``<preset>+card`` or
    ``<preset>+qsched`` configuration uses the card whose recipe is the preset's; a
    ``+card`` configuration without one is refused. ``fp`` is added when missing:
    every relative change and every mean squared error is measured against it.
    """
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    items = [n for n in items if n]
    if not items:
        raise QSchedError(f"no configurations given; use e.g. --configs {','.join(DEFAULT_CONFIGS)}")
    recipes_of_cards = dict(card_recipes or {})
    stats = dict(ptqd_stats or {})
    configs: list[EvalConfig] = []
    for name in items:
        match = _NAME.match(name.lower())
        if match is None or match["preset"] not in PRESETS:
            raise QSchedError(f"unknown configuration {name!r}; allowed: {config_names_help()}")
        preset, correction = match["preset"], match["correction"] or "none"
        if correction not in CORRECTIONS[1:] and correction != "none":
            raise QSchedError(f"unknown correction '+{correction}' in {name!r}; allowed: +card, +qsched, +ptqd")
        recipe = parse_preset(preset)
        card = _card_for(recipe, cards, recipes_of_cards) if correction in ("card", "qsched") else None
        if correction == "card" and card is None:
            given = ", ".join(f"{p} ({r.name})" for p, r in recipes_of_cards.items()) or "none"
            raise QSchedError(
                f"configuration {name!r} needs a schedule card for recipe {preset!r} (--card CARD.json); "
                f"cards given: {given}"
            )
        if correction == "ptqd" and recipe.is_noop:
            raise QSchedError(f"{name!r}: PTQD corrects a quantized model; use it with a quantization preset (e.g. w4a8+ptqd)")
        configs.append(EvalConfig(name=name.lower(), recipe=recipe, correction=correction, card=card,
                                  stats=stats.get(preset) if correction == "ptqd" else None))
    _check_unique(configs)
    if not any(c.is_fp for c in configs):
        configs.insert(0, EvalConfig(name="fp", recipe=parse_preset("fp")))
    configs.sort(key=lambda c: not c.is_fp)
    return configs


def _card_for(recipe: QuantRecipe, cards: Iterable[str | Path], recipes: Mapping[str, QuantRecipe]) -> str | None:
    matching = [str(path) for path in cards if recipes.get(str(path)) == recipe]
    if len(matching) > 1:
        raise QSchedError(f"several cards are for recipe {recipe.name!r}: {', '.join(matching)}; pass one")
    return matching[0] if matching else None


def _check_unique(configs: Sequence[EvalConfig]) -> None:
    seen: set[str] = set()
    for config in configs:
        if config.name in seen:
            raise QSchedError(f"configuration {config.name!r} is listed twice")
        seen.add(config.name)
