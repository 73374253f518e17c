"""JAQ: the reference-free objective Q-Sched maximises, alignment + k * quality.

A :class:`JAQ` is a frozen *definition*: the ranking criterion, which alignment
scorer and which quality scorer (by registry name, with their options), the weight
``k``, the alignment transform and the normalisation. Three criteria, over the
calibration images ``i`` (``a_i`` alignment, ``q_i`` quality scores):

``new`` (the default; the reference code's default criterion, enyac-group/q-sched
``src/qsched_optimize.py``, ``--ranking_criteria new``, ``--k 2``)::

    JAQ = log(CLIPScore of the set) + k * mean_i q_i,     k = 2
    CLIPScore of the set = max(mean_i 100 * cos_i, 0)     (torchmetrics CLIPScore over the set)

the log of the *set's* CLIP score, not a mean of per-image logs, and no floor. The
``clip`` scorer is built unclamped for it (``clamp=False``), so the set's score is
torchmetrics' ``max(mean of 100 * cos, 0)``, which clamps the mean, not each image. A set
whose score is 0 (log undefined; the reference gets -inf and ranks it last) fails the
candidate. ``transform="none"`` uses ``mean_i a_i`` instead of the log.

``kclip2`` (the criterion the reference's shipped script ``scripts/qsched.sh`` ranks by)::

    JAQ = mean_i quality_map_i + k * mean_i hpsv2_i,      k = 2

``k`` weighs the HPSv2 term (the ``alignment`` scorer), not the quality map. The
reference's quality map is Q-Refine's AQ-Map (CLIP Surgery ViT-B/16 on spaCy noun
phrases); qsched does not implement it (neither its weights nor the parser model can be
obtained offline), so ``kclip2`` takes the quality scorer by name and has no default one.

``per-image`` (qsched's definition before it matched the reference; kept because every
card and study made before records it, and because only per-image terms allow the
``zscore`` normalisation)::

    JAQ = mean_i [T(a_i) + k * q_i],  T(a) = log(max(a, 1)) for transform="log", k = 1

The log floor of 1 is a CLIP score of 1 (cosine 0.01): an unrelated image, so a single
clamped image cannot send the mean to minus infinity. An alignment scorer whose scores
all lie below the floor (HPSv2: its registered ``typical_range``) would score 0 for
every image, so ``transform="log"`` is refused for it there. ``normalize="zscore"``
divides each term, after subtracting its mean, by its standard deviation over the
calibration images of the uncorrected model (the baseline), so ``k`` is a trade-off in
units of the baseline's spread and the baseline's JAQ is 0.

A definition recorded without a criterion (cards and studies made before criteria
existed) is read as ``per-image``, which is what made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from qsched.errors import QSchedError
from qsched.score import Scorer, build_scorer, check_scores, scorer_info

CRITERIA: tuple[str, ...] = ("new", "kclip2", "per-image")
DEFAULT_CRITERION = "new"
#: The criterion of a definition recorded before criteria existed (cards, studies).
LEGACY_CRITERION = "per-image"
TRANSFORMS: tuple[str, ...] = ("none", "log")
NORMALIZATIONS: tuple[str, ...] = ("none", "zscore")
#: Defaults per criterion: alignment, quality (None: must be named), k, transform.
CRITERION_DEFAULTS: dict[str, tuple[str, str | None, float, str]] = {
    "new": ("clip", "clipiqa", 2.0, "log"),
    "kclip2": ("hpsv2", None, 2.0, "none"),
    "per-image": ("clip", "clipiqa", 1.0, "log"),
}
#: per-image only: log(max(score, LOG_FLOOR)); see the module docstring.
LOG_FLOOR = 1.0
_MIN_SPREAD = 1e-8


def _frozen(value: Any, what: str) -> Any:
    """JSON-like value -> hashable (dicts to sorted pairs, lists to tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v, what)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v, what) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise QSchedError(f"{what} must hold JSON values (strings, numbers, lists), got {type(value).__name__}")


def _thawed(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class Reference:
    """Mean and standard deviation of each transformed term over the baseline's images (for zscore)."""

    alignment_mean: float
    alignment_std: float
    quality_mean: float
    quality_std: float

    def to_dict(self) -> dict[str, float]:
        return {"alignment_mean": self.alignment_mean, "alignment_std": self.alignment_std,
                "quality_mean": self.quality_mean, "quality_std": self.quality_std}


@dataclass(frozen=True)
class JAQResult:
    """Per-image raw scores, the two terms as they enter JAQ, and the JAQ.

    ``per_image`` holds each image's JAQ for the ``per-image`` criterion; the set
    criteria (``new``, ``kclip2``) have none (the log of a mean is not a mean).
    """

    alignment: torch.Tensor
    quality: torch.Tensor
    alignment_term: float
    quality_term: float
    value: float
    per_image: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Means of the raw scores, the two terms and the JAQ, for logs and trial records."""
        return {
            "alignment": float(self.alignment.mean()),
            "quality": float(self.quality.mean()),
            "alignment_term": self.alignment_term,
            "quality_term": self.quality_term,
            "jaq": self.value,
        }


@dataclass(frozen=True)
class JAQ:
    """The definition of JAQ (see the module docstring); None fields take the criterion's defaults."""

    criterion: str = DEFAULT_CRITERION
    alignment: str | None = None
    quality: str | None = None
    k: float | None = None
    transform: str | None = None
    normalize: str = "none"
    alignment_options: Any = field(default=())
    quality_options: Any = field(default=())

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise QSchedError(f"unknown JAQ criterion {self.criterion!r}; allowed: {', '.join(CRITERIA)}")
        alignment, quality, k, transform = CRITERION_DEFAULTS[self.criterion]
        for name, default in (("alignment", alignment), ("quality", quality), ("k", k), ("transform", transform)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.quality is None:
            raise QSchedError(
                "criterion 'kclip2' ranks by mean(quality map) + k * mean(hpsv2), and the reference's quality map "
                "(Q-Refine's AQ-Map on CLIP Surgery ViT-B/16) is not implemented in qsched (no offline weights): "
                "name the quality scorer (quality=..., --quality clipiqa)"
            )
        scorer_info(self.alignment)  # unknown names list the known ones
        scorer_info(self.quality)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not math.isfinite(self.k) or self.k < 0:
            raise QSchedError(f"k must be a finite number >= 0, got {self.k!r}")
        object.__setattr__(self, "k", float(self.k))
        if self.transform not in TRANSFORMS:
            raise QSchedError(f"unknown alignment transform {self.transform!r}; allowed: {', '.join(TRANSFORMS)}")
        if self.criterion == "kclip2" and self.transform != "none":
            raise QSchedError("criterion 'kclip2' takes the mean HPSv2 as it is: transform must be 'none'")
        typical = scorer_info(self.alignment).typical_range
        if self.criterion == "per-image" and self.transform == "log" and typical is not None and typical[1] <= LOG_FLOOR:
            raise QSchedError(
                f"transform 'log' takes log(max({self.alignment}, {LOG_FLOOR:g})) per image, but {self.alignment} scores "
                f"are about {typical[0]:g}-{typical[1]:g}: every image would score 0; use transform 'none' "
                "(--transform none) or criterion 'new'"
            )
        if self.normalize not in NORMALIZATIONS:
            raise QSchedError(f"unknown normalisation {self.normalize!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if self.normalize != "none" and self.criterion != "per-image":
            raise QSchedError(
                f"normalisation {self.normalize!r} needs per-image terms: use criterion 'per-image' "
                f"(criterion {self.criterion!r} scores the set)"
            )
        for name in ("alignment_options", "quality_options"):
            value = getattr(self, name)
            if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
                value = dict(value)
            if not isinstance(value, Mapping):
                raise QSchedError(f"{name} must be a mapping of scorer options, got {value!r}")
            if name == "alignment_options" and self.set_clip_score and "clamp" not in value:
                value = {**value, "clamp": False}  # torchmetrics clamps the set's mean, not each image
            object.__setattr__(self, name, _frozen(value, name))

    @property
    def set_clip_score(self) -> bool:
        """True when the alignment term is the log of the set's CLIP score (criterion ``new`` with ``clip``)."""
        return self.criterion == "new" and self.alignment == "clip" and self.transform == "log"

    @property
    def needs_reference(self) -> bool:
        """True when the terms are normalised with the baseline's statistics."""
        return self.normalize == "zscore"

    def options(self, which: str) -> dict[str, Any]:
        """The scorer options of ``which`` ("alignment" or "quality") as a plain dict."""
        return {k: _thawed(v) for k, v in getattr(self, f"{which}_options")}

    def build(self, *, device: str = "cpu") -> JAQEvaluator:
        """Build both scorers (loading their weights) into an evaluator."""
        scorers = {}
        for which in ("alignment", "quality"):
            name = getattr(self, which)
            options = self.options(which)
            if "device" not in options and _accepts(name, "device"):
                options["device"] = device
            scorers[which] = build_scorer(name, **options)
        return JAQEvaluator(self, scorers["alignment"], scorers["quality"])

    def _transform(self, alignment: torch.Tensor) -> torch.Tensor:
        if self.transform == "log":
            return torch.log(alignment.clamp(min=LOG_FLOOR))
        return alignment

    def reference(self, alignment: torch.Tensor, quality: torch.Tensor) -> Reference:
        """Statistics of the uncorrected model's terms, for ``normalize="zscore"``."""
        a = self._transform(alignment.double())
        q = quality.double()
        ref = Reference(float(a.mean()), float(a.std(unbiased=False)), float(q.mean()), float(q.std(unbiased=False)))
        for which, spread in (("alignment", ref.alignment_std), ("quality", ref.quality_std)):
            if spread < _MIN_SPREAD:
                raise QSchedError(
                    f"zscore normalisation: the uncorrected model's {which} ({getattr(self, which)}) has no spread "
                    "over the calibration images; use normalize='none' or more calibration prompts"
                )
        return ref

    def evaluate(self, alignment: torch.Tensor, quality: torch.Tensor, *, reference: Reference | None = None) -> JAQResult:
        """JAQ of per-image raw scores (with ``reference`` when normalising)."""
        a = alignment.double().reshape(-1)
        q = quality.double().reshape(-1)
        if a.shape != q.shape:
            raise QSchedError(f"{a.numel()} alignment scores but {q.numel()} quality scores")
        if a.numel() == 0:
            raise QSchedError("JAQ needs at least one calibration image")
        if self.criterion == "kclip2":
            a_term, q_term = float(a.mean()), float(q.mean())
            return JAQResult(a, q, a_term, q_term, q_term + self.k * a_term)
        if self.criterion == "new":
            set_score = float(a.mean())
            if self.transform == "log":
                set_score = max(set_score, 0.0)  # torchmetrics CLIPScore.compute
                if set_score <= 0.0:
                    raise QSchedError(
                        f"the calibration set's {self.alignment} score is {set_score:g}: its log is undefined "
                        "(every image unrelated to its prompt); the candidate fails"
                    )
                a_term = math.log(set_score)
            else:
                a_term = set_score
            q_term = float(q.mean())
            return JAQResult(a, q, a_term, q_term, a_term + self.k * q_term)
        a_i, q_i = self._transform(a), q
        if self.needs_reference:
            if reference is None:
                raise QSchedError("normalize='zscore' needs the baseline's reference statistics")
            a_i = (a_i - reference.alignment_mean) / reference.alignment_std
            q_i = (q_i - reference.quality_mean) / reference.quality_std
        per_image = a_i + self.k * q_i
        return JAQResult(a, q, float(a_i.mean()), float(q_i.mean()), float(per_image.mean()), per_image)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, recorded in schedule cards and in the search study."""
        aggregate = {
            "new": "log of the set's mean alignment (torchmetrics CLIPScore over the set) + k * mean quality",
            "kclip2": "mean quality + k * mean alignment",
            "per-image": "mean over calibration images of the per-image JAQ",
        }[self.criterion]
        if self.criterion == "new" and self.transform == "none":
            aggregate = "mean alignment + k * mean quality"
        return {
            "name": "JAQ",
            "criterion": self.criterion,
            "formula": self.formula,
            "alignment": self.alignment,
            "quality": self.quality,
            "k": self.k,
            "transform": self.transform,
            "log_floor": LOG_FLOOR if self.criterion == "per-image" and self.transform == "log" else None,
            "normalize": self.normalize,
            "alignment_options": self.options("alignment"),
            "quality_options": self.options("quality"),
            "aggregate": aggregate,
        }

    @property
    def formula(self) -> str:
        k = f"{self.k:g}"
        if self.criterion == "kclip2":
            return f"mean({self.quality}) + {k} * mean({self.alignment})"
        if self.criterion == "new":
            a = f"log(mean({self.alignment}))" if self.transform == "log" else f"mean({self.alignment})"
            return f"{a} + {k} * mean({self.quality})"
        a = f"log(max({self.alignment}, {LOG_FLOOR:g}))" if self.transform == "log" else self.alignment
        q = self.quality
        if self.needs_reference:
            a, q = f"z[{a}]", f"z[{q}]"
        return f"mean({a} + {k} * {q})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JAQ:
        """Inverse of :meth:`to_dict` (ignores the descriptive keys).

        A definition without ``criterion`` was recorded before criteria existed and is
        read as :data:`LEGACY_CRITERION` (``per-image``), the definition that made it.
        """
        keys = ("alignment", "quality", "k", "transform", "normalize", "alignment_options", "quality_options")
        values = {k: data[k] for k in keys if k in data}
        return cls(criterion=data.get("criterion", LEGACY_CRITERION), **values)


def _accepts(name: str, option: str) -> bool:
    import inspect

    try:
        params = inspect.signature(scorer_info(name).factory).parameters
    except (TypeError, ValueError):
        return False
    return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class JAQEvaluator:
    """A :class:`JAQ` with its scorers built: ``evaluator(images, prompts) -> JAQResult``."""

    def __init__(self, definition: JAQ, alignment: Scorer, quality: Scorer) -> None:
        self.definition = definition
        self.alignment_scorer = alignment
        self.quality_scorer = quality

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw per-image scores of both scorers (validated: finite, one per image)."""
        n = images.shape[0]
        a = check_scores(self.definition.alignment, self.alignment_scorer(images, list(prompts)), n)
        q = check_scores(self.definition.quality, self.quality_scorer(images, list(prompts)), n)
        return a, q

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], *, reference: Reference | None = None) -> JAQResult:
        a, q = self.scores(images, prompts)
        return self.definition.evaluate(a, q, reference=reference)
