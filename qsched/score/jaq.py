"""JAQ: the reference-free objective Q-Sched maximises, ``alignment + k * quality``.

A :class:`JAQ` is a frozen *definition*: which alignment scorer and which quality
scorer (by registry name, with their options), the weight ``k``, the transform of
the alignment term and the normalisation. Per image ``i``::

    JAQ_i = T(alignment_i) + k * quality_i            (normalize="none", the default)
    T     = log(max(a, 1))  for transform="log"        (the paper's log CLIP score)

and the JAQ of a candidate is the mean of ``JAQ_i`` over the calibration images.
The log floor of 1 is a CLIP score of 1 (cosine 0.01): an unrelated image, and the
largest penalty one image can contribute, so a single clamped image cannot send
the mean to minus infinity. An alignment scorer whose scores all lie below the
floor (HPSv2, about 0.2-0.3: its registered ``typical_range``) would make the log
term 0 for every image, so ``transform="log"`` is refused for it: use ``"none"``.

``normalize="zscore"`` divides each (transformed) term, after subtracting its mean,
by its standard deviation *over the calibration images of the uncorrected model*
(the baseline candidate). Then ``k`` is a trade-off in units of the baseline's
spread, the same whatever the scorers' scales, and the baseline's JAQ is 0. It is
off by default: the default reproduces the paper, and a spread estimated from a
handful of images is itself noisy (a term that barely varies, such as a saturated
CLIP-IQA, gets a huge weight). The normalisation is an affine map per term, so it
only changes how much ``k`` weighs quality against alignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from qsched.errors import QSchedError
from qsched.score import Scorer, build_scorer, check_scores, scorer_info

TRANSFORMS: tuple[str, ...] = ("none", "log")
NORMALIZATIONS: tuple[str, ...] = ("none", "zscore")
#: log(max(score, LOG_FLOOR)): see the module docstring.
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
    """Per-image raw scores, their JAQ terms, and the JAQ (mean over images)."""

    alignment: torch.Tensor
    quality: torch.Tensor
    alignment_term: torch.Tensor
    quality_term: torch.Tensor
    per_image: torch.Tensor

    @property
    def value(self) -> float:
        return float(self.per_image.mean())

    def summary(self) -> dict[str, float]:
        """Means of each quantity, for logs and trial records."""
        return {
            "alignment": float(self.alignment.mean()),
            "quality": float(self.quality.mean()),
            "alignment_term": float(self.alignment_term.mean()),
            "quality_term": float(self.quality_term.mean()),
            "jaq": self.value,
        }


@dataclass(frozen=True)
class JAQ:
    """The definition of JAQ = T(alignment) + k * quality (see the module docstring)."""

    alignment: str = "clip"
    quality: str = "clipiqa"
    k: float = 1.0
    transform: str = "log"
    normalize: str = "none"
    alignment_options: Any = field(default=())
    quality_options: Any = field(default=())

    def __post_init__(self) -> None:
        scorer_info(self.alignment)  # unknown names list the known ones
        scorer_info(self.quality)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not math.isfinite(self.k) or self.k < 0:
            raise QSchedError(f"k must be a finite number >= 0, got {self.k!r}")
        object.__setattr__(self, "k", float(self.k))
        if self.transform not in TRANSFORMS:
            raise QSchedError(f"unknown alignment transform {self.transform!r}; allowed: {', '.join(TRANSFORMS)}")
        typical = scorer_info(self.alignment).typical_range
        if self.transform == "log" and typical is not None and typical[1] <= LOG_FLOOR:
            raise QSchedError(
                f"transform 'log' takes log(max({self.alignment}, {LOG_FLOOR:g})), but {self.alignment} scores are "
                f"about {typical[0]:g}-{typical[1]:g}: every image would score 0; use transform 'none' (--transform none)"
            )
        if self.normalize not in NORMALIZATIONS:
            raise QSchedError(f"unknown normalisation {self.normalize!r}; allowed: {', '.join(NORMALIZATIONS)}")
        for name in ("alignment_options", "quality_options"):
            value = getattr(self, name)
            if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
                value = dict(value)
            if not isinstance(value, Mapping):
                raise QSchedError(f"{name} must be a mapping of scorer options, got {value!r}")
            object.__setattr__(self, name, _frozen(value, name))

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
        a_term, q_term = self._transform(a), q
        if self.needs_reference:
            if reference is None:
                raise QSchedError("normalize='zscore' needs the baseline's reference statistics")
            a_term = (a_term - reference.alignment_mean) / reference.alignment_std
            q_term = (q_term - reference.quality_mean) / reference.quality_std
        return JAQResult(a, q, a_term, q_term, a_term + self.k * q_term)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, recorded in schedule cards and in the search study."""
        return {
            "name": "JAQ",
            "formula": self.formula,
            "alignment": self.alignment,
            "quality": self.quality,
            "k": self.k,
            "transform": self.transform,
            "log_floor": LOG_FLOOR if self.transform == "log" else None,
            "normalize": self.normalize,
            "alignment_options": self.options("alignment"),
            "quality_options": self.options("quality"),
            "aggregate": "mean over calibration images",
        }

    @property
    def formula(self) -> str:
        a = f"log(max({self.alignment}, {LOG_FLOOR:g}))" if self.transform == "log" else self.alignment
        q = self.quality
        if self.needs_reference:
            a, q = f"z[{a}]", f"z[{q}]"
        return f"{a} + {self.k:g} * {q}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JAQ:
        """Inverse of :meth:`to_dict` (ignores the descriptive keys)."""
        keys = ("alignment", "quality", "k", "transform", "normalize", "alignment_options", "quality_options")
        return cls(**{k: data[k] for k in keys if k in data})


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
