"""PTQD baseline (He et al., NeurIPS 2023) as a scheduler-side correction.

PTQD models the quantized denoiser's output as ``q = (1 + k) * f + d``: a part
correlated with the full-precision output ``f`` (the scale ``1 + k``) and an
uncorrelated residual ``d`` with a mean (the *bias*) and a variance. Unlike Q-Sched,
its calibration runs the full-precision model. Per sampling step ``i``:

* **correlated part**: ``q = (1 + k_i) * f + b_i + d`` fitted by least squares with
  an intercept ``b_i`` (PTQD's ``linregress`` of the error ``q - f`` on ``f``); the
  sampler divides the prediction by ``1 + k_i``: a Q-Sched coefficient
  ``c_eps[i] = 1 / (1 + k_i)`` (``c_x = 1``), applied with :func:`qsched.scheduler.wrap`
  -- the same run-time subclass, no second mechanism;
* **bias**: the mean of the residual ``q - (1 + k_i) * f`` per channel (``mu_i[c]``;
  its average over channels is the intercept ``b_i``) is subtracted from the
  prediction before the division: ``(q - mu_i) / (1 + k_i)``;
* **uncorrelated part**: what is left, ``(q - mu_i) / (1 + k_i) - f``, has zero mean
  per channel; its per-element variance is ``residual_var[i]``. Pushed through the
  scheduler's own ``step`` (same input, same noise, so only the residual's effect on
  the next sample remains) it gives the variance ``v_i`` in sample space. Where the
  scheduler injects fresh Gaussian noise of variance ``s_i^2``, PTQD injects
  ``max(s_i^2 - v_i, 0)`` instead, so the total variance is what the sampler expects.

Differences from the official code (ziplab/PTQD), on purpose: it subtracts the
per-channel mean of the raw error ``q - f``, which also holds ``k * mean(f)``, a part the
division by ``1 + k`` already corrects; qsched subtracts the mean of the residual ``d`` as
the paper defines it; it clips ``k`` at 0 where qsched keeps a negative ``k`` (only
``1 + k <= 0`` is refused); its noise correction is written for DDIM with ``eta > 0``,
qsched's for the LCM sampler (the variance term is the same: the residual's
coefficient in the step, squared, times its variance).

What can be expressed generically and what cannot: the correlated and bias parts work
with every scheduler :func:`qsched.scheduler.wrap` accepts. The noise part needs to know
where a scheduler injects noise; it is implemented for ``LCMScheduler`` (multi-step
consistency sampling re-noises with ``sqrt(1 - a_prev) * z``; the deterministic part is
``sqrt(a_prev) * denoised``, which the step returns) -- the sampler of the LCM family and
of the built-in model. Deterministic samplers (DDIM with eta=0, Euler, FlowMatchEuler,
DPMSolver) inject no noise, so only the correlated and bias corrections apply; for other
stochastic schedulers (EulerAncestral, TCD with gamma > 0, DDPM) the noise part is not
applied and :func:`ptqd_wrap` says so in ``scheduler.ptqd_noise_applied``.

Calibration trajectory: each step's input ``x_i`` is taken from the *quantized*
(uncorrected) trajectory; the full-precision model is evaluated on the same
``x_i`` by teacher forcing (its step returns the quantized trajectory's next sample),
so both outputs are compared on identical inputs, with classifier-free guidance
handled by the pipeline itself.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from qsched.errors import QSchedError
from qsched.provenance import package_versions, write_json_atomic
from qsched.quant.recipe import QuantRecipe
from qsched.schedule import QSchedCoefficients
from qsched.scheduler import plain_class, step_index_of, unwrap, wrapped_class

PTQD_FORMAT = "qsched-ptqd-stats"
PTQD_VERSION = 2  # 2: intercept, per-channel bias, residual variance without the bias


@dataclass(frozen=True)
class PTQDStats:
    """Per-step PTQD statistics of one model + recipe + step count.

    ``scale[i] = 1 + k_i``; ``bias[i]`` the per-channel mean of the residual
    ``q - (1 + k_i) f`` (empty: no bias correction, e.g. synthetic statistics);
    ``residual_var[i]`` the per-element variance of the corrected residual
    ``(q - bias) / (1 + k) - f`` (model-output space, bias excluded); ``sample_var[i]``
    the same residual's variance after the scheduler's step (sample space; what is
    taken off the noise).
    """

    scale: tuple[float, ...]
    residual_var: tuple[float, ...]
    sample_var: tuple[float, ...]
    bias: tuple[tuple[float, ...], ...] = ()
    model: str = ""
    family: str = ""
    quant: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    guidance_scale: float | None = None
    seed: int | None = None
    images: int = 0
    versions: dict[str, str] = field(default_factory=package_versions)

    def __post_init__(self) -> None:
        n = len(self.scale)
        if n == 0 or len(self.residual_var) != n or len(self.sample_var) != n:
            raise QSchedError(
                f"PTQD statistics need one scale, residual and sample variance per step; got "
                f"{len(self.scale)}, {len(self.residual_var)}, {len(self.sample_var)}"
            )
        for name in ("scale", "residual_var", "sample_var"):
            values = tuple(float(v) for v in getattr(self, name))
            if not all(math.isfinite(v) for v in values):
                raise QSchedError(f"PTQD statistics {name} has non-finite values {values}")
            object.__setattr__(self, name, values)
        if any(v <= 0 for v in self.scale):
            raise QSchedError(f"PTQD scales must be positive, got {self.scale}")
        if any(v < 0 for v in self.residual_var + self.sample_var):
            raise QSchedError("PTQD variances must be non-negative")
        bias = tuple(tuple(float(v) for v in step) for step in self.bias)
        if bias and (len(bias) != n or not all(bias) or not all(math.isfinite(v) for step in bias for v in step)):
            raise QSchedError(
                f"PTQD bias needs one non-empty list of finite per-channel values per step ({n}), got {self.bias!r}"
            )
        object.__setattr__(self, "bias", bias)
        if self.steps and self.steps != n:
            raise QSchedError(f"PTQD statistics say steps={self.steps} but hold {n} entries")

    @property
    def num_steps(self) -> int:
        return len(self.scale)

    def coefficients(self) -> QSchedCoefficients:
        """The correlated correction as Q-Sched coefficients: ``c_x = 1``, ``c_eps = 1 / (1 + k)``."""
        return QSchedCoefficients(c_x=(1.0,) * self.num_steps, c_eps=tuple(1.0 / s for s in self.scale))

    def check(self, *, family: str, steps: int, quant: dict[str, Any] | None = None) -> None:
        """Refuse statistics of another family, step count or recipe."""
        problems = []
        if self.family and self.family != family:
            problems.append(f"they are for family {self.family!r}, not {family!r}")
        if self.num_steps != steps:
            problems.append(f"they are for {self.num_steps} steps, not {steps}")
        if quant is not None and self.quant and _recipe(self.quant) != _recipe(quant):
            problems.append(f"they are for recipe {self.quant.get('name', self.quant)!r}, not {quant.get('name', quant)!r}")
        if problems:
            raise QSchedError("PTQD statistics do not fit: " + "; ".join(problems) + " (estimate them for this setting)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PTQD_FORMAT, "version": PTQD_VERSION, "model": self.model, "family": self.family,
            "quant": dict(self.quant), "steps": self.num_steps, "guidance_scale": self.guidance_scale,
            "seed": self.seed, "images": self.images, "scale": list(self.scale),
            "bias": [list(step) for step in self.bias],
            "residual_var": list(self.residual_var), "sample_var": list(self.sample_var),
            "versions": dict(self.versions),
        }

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PTQDStats:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QSchedError(f"PTQD statistics file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise QSchedError(f"cannot read PTQD statistics {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != PTQD_FORMAT:
            raise QSchedError(f"{path} is not a PTQD statistics file (format {PTQD_FORMAT!r}, version {PTQD_VERSION})")
        if data.get("version") != PTQD_VERSION:
            raise QSchedError(
                f"{path} holds PTQD statistics version {data.get('version')!r}, this qsched reads version "
                f"{PTQD_VERSION} (version 1 lacked the bias correction and fitted no intercept); estimate them again"
            )
        try:
            return cls(scale=tuple(data["scale"]), bias=tuple(tuple(b) for b in data["bias"]),
                       residual_var=tuple(data["residual_var"]),
                       sample_var=tuple(data["sample_var"]), model=data["model"], family=data["family"],
                       quant=dict(data["quant"]), steps=int(data["steps"]), guidance_scale=data["guidance_scale"],
                       seed=data["seed"], images=int(data["images"]), versions=dict(data["versions"]))
        except (KeyError, TypeError, ValueError) as err:
            raise QSchedError(f"{path}: malformed PTQD statistics ({err})") from None


def _recipe(quant: dict[str, Any]) -> QuantRecipe:
    """The recipe of a stored dict (older dicts lack keys that now have defaults)."""
    return QuantRecipe.from_dict(quant)


# --- estimation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StepFit:
    """PTQD's fit of one step: ``quantized = scale * full + intercept + residual``.

    ``bias`` is the residual's mean per channel (its mean over channels of equal size
    is ``intercept``); ``residual_var`` the per-element variance of the corrected
    residual ``(quantized - bias) / scale - full``, the bias excluded.
    """

    scale: float
    intercept: float
    bias: tuple[float, ...]
    residual_var: float


def channel_dim(output: torch.Tensor) -> int | None:
    """The channel axis of a denoiser output: 1 for ``[B, C, H, W]`` (and video), -1 for tokens ``[B, S, C]``."""
    if output.dim() >= 4:
        return 1
    if output.dim() == 3:
        return -1
    return None


def _per_channel_mean(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        return x.mean().reshape(1)
    return x.movedim(dim, 0).reshape(x.shape[dim], -1).mean(dim=1)


def _channel_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel ``values`` shaped to broadcast against ``like``."""
    dim = channel_dim(like)
    if dim is None:
        return values.reshape(())
    shape = [1] * like.dim()
    shape[dim] = -1
    return values.reshape(shape)


def fit_step(quantized: torch.Tensor, full: torch.Tensor) -> StepFit:
    """Fit ``quantized = (1 + k) * full + b + d`` by least squares with an intercept, as PTQD does.

    ``quantized`` and ``full`` are same-shaped denoiser outputs (channels on
    :func:`channel_dim`); the statistics are computed in float64.
    """
    if quantized.shape != full.shape or quantized.numel() == 0:
        raise QSchedError(f"PTQD fit needs equal, non-empty outputs; got shapes {tuple(quantized.shape)} and {tuple(full.shape)}")
    q, f = quantized.detach().double(), full.detach().double()
    f_centred = f - f.mean()
    variance = float(f_centred.pow(2).mean())
    if variance == 0.0:
        raise QSchedError("the full-precision outputs are constant; cannot estimate the PTQD scale")
    scale = float((f_centred * (q - q.mean())).mean()) / variance
    if scale <= 0:
        raise QSchedError(f"quantized and full-precision outputs are anti-correlated (scale {scale:.3g}); PTQD does not apply")
    residual = q - scale * f
    dim = channel_dim(q)
    bias = _per_channel_mean(residual, dim)
    centred = residual - _channel_view(bias, residual)
    return StepFit(scale=scale, intercept=float(residual.mean()), bias=tuple(bias.tolist()),
                   residual_var=float(centred.pow(2).mean()) / scale**2)


@dataclass
class _StepRecord:
    snapshot: Any
    timestep: Any
    sample: torch.Tensor
    quantized: torch.Tensor | None = None
    full: torch.Tensor | None = None
    prev_sample: torch.Tensor | None = None


def estimate_ptqd(
    full: Any,
    quantized: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> PTQDStats:
    """Estimate PTQD statistics from two :class:`qsched.prepare.PreparedPipeline` of one model.

    ``full`` must be the full-precision pipeline, ``quantized`` the quantized one, both
    with plain (unwrapped) schedulers and the same steps. Image ``i`` uses the noise of
    ``(seed, i)``.
    """
    from qsched.generate import batches, sample

    if not prompts:
        raise QSchedError("PTQD calibration needs at least one prompt")
    if not full.recipe.is_noop:
        raise QSchedError(f"PTQD compares against full precision, but the reference pipeline is {full.recipe.name!r}")
    if full.steps != quantized.steps or full.family != quantized.family:
        raise QSchedError("the full-precision and quantized pipelines differ in family or steps")
    steps = quantized.steps
    per_step: list[list[_StepRecord]] = [[] for _ in range(steps)]
    with tqdm(total=len(prompts), desc="PTQD calibration", unit="img", disable=not progress) as bar:
        for chunk in batches(len(prompts), batch_size):
            texts = [prompts[i] for i in chunk]
            records: list[_StepRecord] = []
            with _tapped(quantized.pipe, _QuantizedTap(records)):
                sample(quantized, texts, chunk, seed=seed, output_type="latent")
            if len(records) != steps:
                raise QSchedError(f"the sampler ran {len(records)} steps, expected {steps}")
            with _tapped(full.pipe, _FullTap(records)):
                sample(full, texts, chunk, seed=seed, output_type="latent")
            for i, record in enumerate(records):
                per_step[i].append(record)
            bar.update(len(chunk))
    fits = []
    for records in per_step:
        fit = fit_step(torch.cat([r.quantized for r in records]), torch.cat([r.full for r in records]))
        fits.append((fit, _propagated_variance(records, fit)))
    return PTQDStats(
        scale=tuple(fit.scale for fit, _ in fits), bias=tuple(fit.bias for fit, _ in fits),
        residual_var=tuple(fit.residual_var for fit, _ in fits), sample_var=tuple(v for _, v in fits),
        model=quantized.loaded.source, family=quantized.family, quant=quantized.recipe.to_dict(), steps=steps,
        guidance_scale=quantized.guidance_scale, seed=seed, images=len(prompts),
    )


def _propagated_variance(records: Sequence[_StepRecord], fit: StepFit) -> float:
    """Per-element variance of ``step((q - bias) / scale) - step(f)`` with identical input and noise."""
    total, count = 0.0, 0
    for record in records:
        bias = _channel_view(torch.tensor(fit.bias, dtype=record.quantized.dtype), record.quantized)
        outputs = []
        for model_output in ((record.quantized - bias) / fit.scale, record.full):
            scheduler = copy.deepcopy(record.snapshot)
            base = type(scheduler)._ptqd_tap_base
            kwargs: dict[str, Any] = {"return_dict": False}
            if "generator" in inspect.signature(base.step).parameters:
                kwargs["generator"] = torch.Generator(device=record.sample.device).manual_seed(0)
            outputs.append(base.step(scheduler, model_output, record.timestep, record.sample, **kwargs)[0])
        difference = (outputs[0] - outputs[1]).double()
        total += float(difference.pow(2).sum())
        count += difference.numel()
    return total / count


class _QuantizedTap:
    """Records each step's input, model output and next sample (the quantized trajectory)."""

    def __init__(self, records: list[_StepRecord]) -> None:
        self.records = records

    def __call__(self, scheduler: Any, bound: inspect.BoundArguments, run: Callable[[], Any]) -> Any:
        args = bound.arguments
        record = _StepRecord(snapshot=None, timestep=args["timestep"], sample=args["sample"].detach().clone(),
                             quantized=args["model_output"].detach().clone())
        result = run()
        record.prev_sample = _prev_sample(result).detach().clone()
        self.records.append(record)
        return result


class _FullTap:
    """Records the full-precision output on the quantized trajectory's inputs (teacher forcing)."""

    def __init__(self, records: list[_StepRecord]) -> None:
        self.records = records
        self.index = 0

    def __call__(self, scheduler: Any, bound: inspect.BoundArguments, run: Callable[[], Any]) -> Any:
        if self.index >= len(self.records):
            raise QSchedError("the full-precision sampler ran more steps than the quantized one")
        record = self.records[self.index]
        self.index += 1
        args = bound.arguments
        if not torch.allclose(args["sample"], record.sample, rtol=1e-4, atol=1e-5):
            raise QSchedError("PTQD teacher forcing failed: the full-precision pipeline saw another sample")
        record.full = args["model_output"].detach().clone()
        record.snapshot = copy.deepcopy(scheduler)
        result = run()
        return _replace_prev_sample(result, record.prev_sample)


def _prev_sample(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result.prev_sample


def _replace_prev_sample(result: Any, prev_sample: torch.Tensor) -> Any:
    if isinstance(result, tuple):
        return (prev_sample, *result[1:])
    result.prev_sample = prev_sample
    return result


_TAP_CLASSES: dict[type, type] = {}


def _tap_class(base: type) -> type:
    """A run-time subclass of ``base`` whose ``step`` calls ``self._ptqd_tap(self, bound, run)``."""
    cls = _TAP_CLASSES.get(base)
    if cls is not None:
        return cls
    base_step = base.step
    signature = inspect.signature(base_step)

    @functools.wraps(base_step)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        return self._ptqd_tap(self, bound, lambda: base_step(*bound.args, **bound.kwargs))

    cls = type(base.__name__, (base,), {"__module__": base.__module__, "__qualname__": base.__qualname__,
                                         "_ptqd_tap_base": base, "_ptqd_tap": None, "step": step})
    _TAP_CLASSES[base] = cls
    return cls


class _tapped:
    """Context: the pipeline's scheduler replaced by a tapped copy, restored on exit."""

    def __init__(self, pipe: Any, tap: Callable[..., Any]) -> None:
        self.pipe, self.tap = pipe, tap

    def __enter__(self) -> None:
        self.original = self.pipe.scheduler
        plain = unwrap(self.original)
        tapped = _tap_class(type(plain)).from_config(plain.config)
        tapped._ptqd_tap = self.tap
        self.pipe.scheduler = tapped

    def __exit__(self, *exc: Any) -> None:
        self.pipe.scheduler = self.original


# --- the corrected sampler ---------------------------------------------------------------------

def _lcm_noise(scheduler: Any, index: int, result: Any, sample_var: float) -> Any:
    """LCM: ``prev = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * z``; shrink the noise term."""
    timesteps = scheduler.timesteps
    if index + 1 >= len(timesteps) or sample_var <= 0.0:
        return result  # the last step injects no noise
    a_prev = scheduler.alphas_cumprod[int(timesteps[index + 1])].to(torch.float64).item()
    noise_var = 1.0 - a_prev
    if noise_var <= 0.0:
        return result
    ratio = math.sqrt(max(noise_var - sample_var, 0.0) / noise_var)
    prev, denoised = (result[0], result[1]) if isinstance(result, tuple) else (result.prev_sample, result.denoised)
    deterministic = math.sqrt(a_prev) * denoised
    return _replace_prev_sample(result, deterministic + ratio * (prev - deterministic))


#: Where a scheduler injects noise: class name -> hook(scheduler, step index, step result, variance).
NOISE_HOOKS: dict[str, Callable[[Any, int, Any, float], Any]] = {"LCMScheduler": _lcm_noise}
#: Schedulers that inject no noise (only the correlated part of PTQD applies).
DETERMINISTIC = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
                 "DPMSolverMultistepScheduler")

_PTQD_CLASSES: dict[type, type] = {}


def _ptqd_class(base: type) -> type:
    cls = _PTQD_CLASSES.get(base)
    if cls is not None:
        return cls
    wrapped = wrapped_class(base)  # the Q-Sched wrapper: applies c_eps = 1 / (1 + k)
    wrapped_step = wrapped.step
    signature = inspect.signature(base.step)
    hook = NOISE_HOOKS.get(base.__name__)

    @functools.wraps(base.step)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        stats = self._ptqd_active
        if stats is None or (hook is None and not stats.bias):
            return wrapped_step(self, *args, **kwargs)  # only c_eps = 1 / (1 + k), or nothing
        bound = signature.bind(self, *args, **kwargs)
        index = step_index_of(self, bound.arguments["timestep"])  # before the step advances it
        if stats.bias:
            output = bound.arguments["model_output"]
            bias = torch.tensor(stats.bias[index], dtype=output.dtype, device=output.device)
            if channel_dim(output) is not None and output.shape[channel_dim(output)] != bias.numel():
                raise QSchedError(
                    f"the PTQD statistics hold {bias.numel()} channels, the model output {tuple(output.shape)} "
                    f"has {output.shape[channel_dim(output)]}; estimate them for this model"
                )
            bound.arguments["model_output"] = output - _channel_view(bias, output)
        result = wrapped_step(*bound.args, **bound.kwargs)
        return result if hook is None else hook(self, index, result, stats.sample_var[index])

    @functools.wraps(base.set_timesteps)
    def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = wrapped.set_timesteps(self, *args, **kwargs)  # checks the step count
        self._ptqd_active = self._ptqd_stats
        return result

    cls = type(base.__name__, (wrapped,), {
        "__module__": base.__module__, "__qualname__": base.__qualname__,
        "__doc__": f"{base.__name__} with the PTQD correction (made by qsched.ptqd.ptqd_wrap).",
        "_qsched_factory": _ptqd_class,  # pickling rebuilds this class, not the plain wrapper
        "_ptqd_stats": None, "_ptqd_active": None, "ptqd_noise_applied": hook is not None,
        "step": step, "set_timesteps": set_timesteps,
    })
    _PTQD_CLASSES[base] = cls
    return cls


def ptqd_wrap(scheduler: Any, stats: PTQDStats) -> Any:
    """A copy of ``scheduler`` with PTQD's correction: (prediction - bias) / (1 + k), less noise where injected.

    ``scheduler.ptqd_noise_applied`` is False where the scheduler's noise injection is
    not known to qsched (see :data:`NOISE_HOOKS`); deterministic schedulers need none.
    """
    base = plain_class(scheduler)
    corrected = _ptqd_class(base).from_config(scheduler.config)
    corrected.set_coefficients(stats.coefficients())
    corrected._ptqd_stats = stats
    return corrected
