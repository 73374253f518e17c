"""Metrics of an evaluation: FID, any registered scorer (CLIP score, CLIP-IQA, ...), MSE to ``fp``, size.

Besides ``fid``, ``mse`` and ``size``, every scorer of :mod:`qsched.score` is a metric
under its name (``clip``, ``clipiqa``, ``brisque``, ``niqe``, ``pickscore``, ``hpsv2``
and any registered later): the mean of its per-image scores, higher is better.

Metric resources (weights, reference statistics) load *before* any image is made,
so a missing file stops the run at once (or, with ``keep_going``, marks that metric
failed -- never 0 -- while the others are computed). Per-image work (features,
scores, squared errors) runs on every process over its share of the images; the
main process combines the gathered values.

FID uses torchmetrics' ``FrechetInceptionDistance`` with a pluggable feature
extractor (any ``nn.Module`` mapping uint8 ``[N, C, H, W]`` to ``[N, D]`` with a
``num_features`` attribute): EfficientNet-Lite0 for the built-in world, or a
TorchScript feature extractor given as a local file (e.g. an Inception-v3 FID
network exported with ``torch.jit.save``: input float ``[N, 3, 299, 299]`` in
[0, 255], output ``[N, D]``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from qsched.errors import QSchedError

#: Metrics that are not scorers.
BASE_METRICS = ("fid", "mse", "size")
DEFAULT_METRICS = ("fid", "clip", "clipiqa", "mse", "size")
#: Direction of the base metrics (scorers are higher-is-better), for the table's arrows and the chart.
HIGHER_IS_BETTER = {"fid": False, "mse": False, "size": False}
UNITS = {"size": "MB"}
#: Fewest reference images accepted for FID (its covariance needs many more for stable numbers).
MIN_REFERENCE_IMAGES = 50
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def known_metrics() -> tuple[str, ...]:
    """The base metrics and every registered scorer."""
    from qsched.score import scorer_names

    return BASE_METRICS + tuple(n for n in scorer_names() if n not in BASE_METRICS)


def is_scorer_metric(name: str) -> bool:
    return name not in BASE_METRICS


def parse_metrics(names: str | Sequence[str]) -> tuple[str, ...]:
    """``"fid,clip"`` -> ``("fid", "clip")``; unknown names are refused, listing the known ones."""
    items = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names)]
    items = [n for n in items if n]
    if not items:
        raise QSchedError(f"no metrics given; allowed: {', '.join(known_metrics())}")
    for name in items:
        if name not in known_metrics():
            raise QSchedError(f"unknown metric {name!r}; allowed: {', '.join(known_metrics())}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class MetricSettings:
    """Where metric weights and references come from.

    ``fid_features``: ``"auto"`` (EffNet for the built-in model), ``"effnet"``, ``"clip"``
    (the built-in CLIP's image embeddings) or a TorchScript file. ``reference``: a
    folder of images or a statistics file (``.safetensors`` from
    :func:`qsched.builtin.fid.save_stats`); None: the built-in Fashion-MNIST test
    statistics (built-in model only). ``clip_model``: a CLIP folder for ``clip`` and
    ``clipiqa`` (None: the built-in CLIP). ``scorer_weights``: ``{scorer: path}`` for
    scorers whose weights are given by a path or checkpoint (``pickscore``, ``hpsv2``).
    """

    fid_features: str = "auto"
    reference: str | None = None
    clip_model: str | None = None
    scorer_weights: Mapping[str, str] = field(default_factory=dict)
    min_reference: int = MIN_REFERENCE_IMAGES
    batch_size: int = 64
    cache_dir: str | None = None


@dataclass(frozen=True)
class MetricResult:
    """One metric of one configuration: a value, or the error that prevented it."""

    value: float | None
    error: str | None = None
    std: float | None = None
    count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.value is not None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "status": "ok" if self.ok else "failed", "error": self.error,
                "std": self.std, "count": self.count, **({"extra": self.extra} if self.extra else {})}


class TorchScriptFeatures(nn.Module):
    """A TorchScript FID feature network from a local file (e.g. Inception-v3 pool features)."""

    def __init__(self, path: str | os.PathLike, *, resolution: int = 299, device: str = "cpu") -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise QSchedError(f"FID feature weights missing: {self.path} (give a local TorchScript file; nothing is downloaded)")
        try:
            self.net = torch.jit.load(str(self.path), map_location=device)
        except (RuntimeError, ValueError) as err:
            raise QSchedError(f"FID feature weights {self.path} are not a TorchScript module: {err}") from None
        self.net.eval()
        self.resolution = resolution
        with torch.no_grad():
            self.num_features = int(self._run(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[-1])

    def identity(self) -> str:
        from qsched.provenance import sha256_file

        return f"torchscript:{sha256_file(self.path)[:16]}:res{self.resolution}"

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        out = self.net(x)
        return (out[0] if isinstance(out, (tuple, list)) else out).reshape(x.shape[0], -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)


def build_feature_extractor(features: str, *, family: str, device: str = "cpu") -> nn.Module:
    """The FID feature module named by ``features`` (see :class:`MetricSettings`)."""
    if features == "auto":
        features = "effnet" if family.startswith("builtin") else ""
        if not features:
            raise QSchedError(
                f"FID on family {family!r} needs a feature extractor: give --fid-features FILE (a local "
                "TorchScript Inception-v3) or --fid-features effnet, and --reference DIR|STATS"
            )
    if features in ("effnet", "clip"):
        from qsched.builtin.fid import feature_extractor

        return feature_extractor(features, device=device)  # type: ignore[arg-type]
    return TorchScriptFeatures(features, device=device)


def extractor_identity(extractor: nn.Module) -> str:
    return extractor.identity() if hasattr(extractor, "identity") else type(extractor).__name__


def reference_stats(settings: MetricSettings, extractor: nn.Module, *, family: str, device: str = "cpu",
                    progress: bool = True) -> Any:
    """FID reference statistics: a stats file, a folder of images (cached), or the built-in ones."""
    from qsched.builtin import fid as builtin_fid

    identity = extractor_identity(extractor)
    if settings.reference is None:
        if not family.startswith("builtin"):
            raise QSchedError(f"FID on family {family!r} needs reference images: pass --reference DIR (images) or STATS (.safetensors)")
        if settings.fid_features not in ("auto", "effnet", "clip"):
            raise QSchedError("custom FID features need --reference DIR|STATS (the built-in statistics are EffNet/CLIP ones)")
        kind = "clip" if settings.fid_features == "clip" else "effnet"
        return builtin_fid.reference_stats(kind, extractor=extractor, cache_dir=settings.cache_dir, device=device)
    path = Path(settings.reference)
    if path.is_file():
        stats = builtin_fid.load_stats(path, extractor=identity)
        _check_reference_count(stats.count, settings.min_reference, str(path))
        return stats
    if not path.is_dir():
        raise QSchedError(f"FID reference {path} does not exist; pass a folder of images or a statistics file")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    _check_reference_count(len(files), settings.min_reference, str(path))
    from qsched.evaluate.generation import load_image_files

    images = load_image_files(files)
    data_hash = builtin_fid.images_hash(images)
    cache = Path(settings.cache_dir or os.environ.get("QSCHED_CACHE", Path.home() / ".cache" / "qsched")) / "fid"
    cached = cache / f"reference-{data_hash}-{_slug(identity)}.safetensors"
    if cached.is_file():
        try:
            return builtin_fid.load_stats(cached, data_hash=data_hash, extractor=identity)
        except QSchedError:
            pass
    stats = builtin_fid.compute_stats(extractor, images, batch_size=settings.batch_size, data_hash=data_hash, progress=progress)
    builtin_fid.save_stats(stats, cached, cov_dtype=torch.float64)
    return stats


def _check_reference_count(count: int, minimum: int, where: str) -> None:
    if count < minimum:
        raise QSchedError(f"FID reference {where} has {count} images; at least {minimum} are needed (thousands for stable FID)")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


class _Precomputed(nn.Module):
    """Pass-through 'extractor' so torchmetrics FID can take features computed on several processes."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(features: torch.Tensor, reference: Any) -> float:
    """FID (torchmetrics) of generated ``features`` [N, D] against reference statistics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from qsched.builtin.fid import set_real_stats

    if features.shape[0] < 2:
        raise QSchedError(f"FID needs at least 2 generated images, got {features.shape[0]}")
    if reference.mean.numel() != features.shape[1]:
        raise QSchedError(f"reference statistics have {reference.mean.numel()} features, the extractor {features.shape[1]}")
    metric = FrechetInceptionDistance(feature=_Precomputed(features.shape[1]), reset_real_features=False, sync_on_compute=False)
    set_real_stats(metric, reference)
    metric.update(features.double(), real=False)
    return float(metric.compute())


@dataclass
class MetricSuite:
    """The loaded metric resources of a run; ``failed`` holds metrics that could not be set up."""

    names: tuple[str, ...]
    extractor: nn.Module | None = None
    reference: Any = None
    scorers: dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def active(self, name: str) -> bool:
        return name in self.names and name not in self.failed

    @torch.no_grad()
    def per_image(self, images: torch.Tensor, prompts: Sequence[str], fp_images: torch.Tensor | None) -> dict[str, Any]:
        """Per-image values of one configuration's share of images (uint8 ``[N, C, H, W]``)."""
        out: dict[str, Any] = {}
        floats = images.float() / 255.0
        if self.active("fid"):
            out["fid"] = _guard(lambda: self.extractor(images).float().cpu())
        for name, scorer in self.scorers.items():
            if self.active(name):
                out[name] = _guard(lambda s=scorer, n=name: _checked(n, s(floats, list(prompts)), len(prompts)))
        if self.active("mse") and fp_images is not None:
            out["mse"] = ((floats - fp_images.float() / 255.0) ** 2).flatten(1).mean(1).double()
        return out


def _checked(name: str, scores: torch.Tensor, count: int) -> torch.Tensor:
    from qsched.score import check_scores

    return check_scores(name, scores, count)


def _guard(compute: Callable[[], torch.Tensor]) -> torch.Tensor | str:
    """A metric that fails on some images fails for its configuration (its error, never 0)."""
    try:
        return compute()
    except QSchedError as err:
        return f"error: {err}"


def build_suite(names: Sequence[str], settings: MetricSettings, *, family: str, device: str = "cpu",
                keep_going: bool = False, need_reference: bool = True, progress: bool = True) -> MetricSuite:
    """Load what ``names`` need. A missing file raises, or with ``keep_going`` marks the metric failed."""
    suite = MetricSuite(names=tuple(names))

    def attempt(name: str, load: Callable[[], None]) -> None:
        try:
            load()
        except QSchedError as err:
            if not keep_going:
                raise QSchedError(f"metric {name}: {err} (pass --keep-going to compute the other metrics)") from None
            suite.failed[name] = str(err)

    if "fid" in names:
        def load_fid() -> None:
            suite.extractor = build_feature_extractor(settings.fid_features, family=family, device=device)
            if need_reference:
                suite.reference = reference_stats(settings, suite.extractor, family=family, device=device, progress=progress)
        attempt("fid", load_fid)
    for name in filter(is_scorer_metric, names):
        attempt(name, lambda n=name: suite.scorers.__setitem__(n, _build_metric_scorer(n, settings, device)))
    return suite


def _build_metric_scorer(name: str, settings: MetricSettings, device: str) -> Callable[..., torch.Tensor]:
    """Build scorer ``name`` with the options its factory takes: device, and its weights if given."""
    from qsched.score import build_scorer, factory_options, weights_option

    accepted = factory_options(name)
    options: dict[str, Any] = {}
    if accepted is None or "device" in accepted:
        options["device"] = device
    weights = settings.scorer_weights.get(name)
    if weights is None and name in ("clip", "clipiqa"):
        weights = settings.clip_model
    if weights is not None:
        option = weights_option(name)
        if option is None:
            raise QSchedError(f"scorer {name!r} takes no weights path (it has no path or checkpoint option)")
        options[option] = weights
    return build_scorer(name, **options)


def summarize(name: str, values: Sequence[Any], *, reference: Any = None) -> MetricResult:
    """Combine the gathered per-image values of one metric of one configuration."""
    errors = [v for v in values if isinstance(v, str)]
    if errors:
        return MetricResult(value=None, error=errors[0].removeprefix("error: "))
    if not values:
        return MetricResult(value=None, error="no images")
    stacked = torch.cat([torch.as_tensor(v) for v in values])
    try:
        if name == "fid":
            return MetricResult(value=fid_from_features(stacked, reference), count=int(stacked.shape[0]))
    except QSchedError as err:
        return MetricResult(value=None, error=str(err))
    stacked = stacked.double()
    std = float(stacked.std()) if stacked.numel() > 1 else 0.0
    value = float(stacked.mean())
    if not math.isfinite(value):
        return MetricResult(value=None, error=f"non-finite {name}")
    return MetricResult(value=value, std=std, count=int(stacked.numel()))


def denoiser_size(prepared: Any, path: Path) -> MetricResult:
    """Size on disk of the denoiser: the packed checkpoint for a quantized recipe, FP32 bytes for ``fp``."""
    from qsched.quant import packed_size, save_packed

    denoiser = prepared.loaded.family.denoiser(prepared.pipe)
    if prepared.recipe.is_noop:
        tensors = list(denoiser.state_dict().values())
        size = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors)
        return MetricResult(value=size / 1e6, count=1, extra={"bytes": size, "format": "fp32 tensors"})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_packed(denoiser, path)
    packed = packed_size(path)
    return MetricResult(value=packed.file_bytes / 1e6, count=1,
                        extra={"bytes": packed.file_bytes, "format": "packed safetensors", "path": str(path),
                               "ratio_vs_fp32": packed.ratio_vs_fp32})
