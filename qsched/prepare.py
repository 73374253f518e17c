"""Build the pipeline a run samples with: load, quantize the denoiser, apply a schedule card.

Shared by ``generate``, ``calibrate`` and ``evaluate`` so that each configuration
is set up the same way. Every input is validated before any output is written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qsched.card import ScheduleCard
from qsched.errors import QSchedError
from qsched.families import FamilySpec, LoadedPipeline, load_pipeline
from qsched.quant import BACKENDS, QuantRecipe, QuantReport, load_packed, parse_preset, quantize, read_packed_recipe
from qsched.quant.stream import component_source, load_quantized
from qsched.scheduler import unwrap, wrap


@dataclass(frozen=True)
class ModelOptions:
    """How a model is set up for sampling, apart from its quantization (shared by generate, calibrate, evaluate).

    ``steps`` None: the card's, else the family's default; ``guidance_scale`` None: the
    family's; ``height``/``width`` None: the pipeline's own size; ``family`` None:
    detected from the pipeline; ``dtype`` ``"auto"``: float32 on CPU, float16 elsewhere;
    ``backend``: the quantization backend: ``packed`` (default: int4/int8 codes in memory,
    the denoiser read straight into them, never whole in full precision), ``fake`` (the
    float reference), ``torchao``, ``quanto``. ``quantize_modules``: which components
    the recipe applies to: ``denoiser`` (always) plus e.g. ``text_encoder``,
    ``text_encoder_2``, ``vae``, which get its weights only (activations stay float).
    """

    family: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    device: str = "cpu"
    dtype: str | torch.dtype = "auto"
    backend: str = "packed"
    quantize_modules: tuple[str, ...] = ("denoiser",)

    def __post_init__(self) -> None:
        modules = self.quantize_modules
        if isinstance(modules, str) or not all(isinstance(m, str) and m for m in modules):
            raise QSchedError(f"quantize_modules must be a tuple of component names, got {modules!r}")
        if "denoiser" not in modules:
            raise QSchedError(f"quantize_modules {modules!r} must include 'denoiser' (what the recipe is for)")
        if len(set(modules)) != len(modules):
            raise QSchedError(f"quantize_modules {modules!r} names a component twice")
        object.__setattr__(self, "quantize_modules", tuple(modules))
        if self.backend not in BACKENDS:
            raise QSchedError(f"unknown quantization backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")

    def replace(self, **changes: Any) -> ModelOptions:
        """A copy with ``changes`` (e.g. the device a worker process resolved)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PreparedPipeline:
    """A loaded pipeline with its denoiser quantized and its scheduler corrected (or not)."""

    loaded: LoadedPipeline
    recipe: QuantRecipe
    report: QuantReport
    card: ScheduleCard | None
    steps: int
    guidance_scale: float
    height: int | None = None
    width: int | None = None
    #: Reports of the other quantized components (``text_encoder``, ``vae``, ...), by name.
    module_reports: Mapping[str, QuantReport] = dataclasses.field(default_factory=dict)

    @property
    def pipe(self) -> Any:
        return self.loaded.pipe

    @property
    def family(self) -> str:
        return self.loaded.family.name


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``"auto"`` is float32 on CPU (bf16 is ~30x slower there) and float16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in allowed:
        raise QSchedError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(allowed)}")
    return allowed[dtype]


def check_device(device: str) -> str:
    """Refuse a device that does not exist here, naming what is available."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise QSchedError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise QSchedError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise QSchedError(f"device {device!r} requested but MPS is not available; use --device cpu")
    return device


def prepare_pipeline(
    model: str | os.PathLike,
    *,
    recipe: QuantRecipe | None = None,
    packed: str | os.PathLike | None = None,
    card: ScheduleCard | None = None,
    options: ModelOptions | None = None,
) -> PreparedPipeline:
    """Load ``model`` set up by ``options``, quantize its denoiser with ``recipe``, apply ``card``'s coefficients.

    With ``packed`` (a file from :func:`qsched.quant.save_packed`) the denoiser's
    quantized weights come from that file. ``recipe`` defaults to the packed
    checkpoint's, else the card's, else full precision; all that are given must agree.

    ``options.steps`` defaults to the card's, else the family's default; a card made
    for another family or step count is refused.
    """
    options = options or ModelOptions()
    device, steps = check_device(options.device), options.steps
    recipe = _resolve_recipe(recipe, packed, card)
    dtype = resolve_dtype(options.dtype, device)
    streamed = options.backend == "packed" and (not recipe.is_noop or packed is not None)
    reports: dict[str, QuantReport] = {}
    loader = _stream_components(recipe, packed, options.quantize_modules, dtype, reports) if streamed else None
    loaded = load_pipeline(model, family=options.family, device=device, dtype=dtype, components=loader)
    spec = loaded.family
    if steps is None:
        steps = card.steps if card is not None else spec.default_steps
    spec.check_steps(steps)
    if card is not None:
        card.check(family=spec.name, steps=steps)
    if streamed:
        report = reports.pop(spec.denoiser_attr)
    else:
        denoiser = spec.denoiser(loaded.pipe)
        report = load_packed(denoiser, packed) if packed is not None else quantize(denoiser, recipe, backend=options.backend)
        for name in _other_modules(options.quantize_modules, spec.denoiser_attr):
            reports[name] = quantize(_component(loaded.pipe, name), weight_only(recipe), backend=options.backend)
    pipe = loaded.pipe
    pipe.scheduler = wrap(pipe.scheduler, card.coefficients) if card is not None else unwrap(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return PreparedPipeline(
        loaded=loaded,
        recipe=recipe,
        report=report,
        card=card,
        steps=steps,
        guidance_scale=spec.guidance_scale if options.guidance_scale is None else float(options.guidance_scale),
        height=options.height,
        width=options.width,
        module_reports=reports,
    )


def weight_only(recipe: QuantRecipe) -> QuantRecipe:
    """``recipe`` with activations kept in float: what text encoders and VAEs get."""
    return dataclasses.replace(recipe, act_bits=16)


def _other_modules(names: tuple[str, ...], denoiser_attr: str) -> list[str]:
    return [n for n in names if n not in ("denoiser", denoiser_attr)]


def _component(pipe: Any, name: str) -> torch.nn.Module:
    module = getattr(pipe, name, None)
    if not isinstance(module, torch.nn.Module):
        present = [k for k, v in getattr(pipe, "components", {}).items() if isinstance(v, torch.nn.Module)]
        raise QSchedError(f"the pipeline has no component {name!r} to quantize; it has: {', '.join(present)}")
    return module


def _stream_components(
    recipe: QuantRecipe,
    packed: str | os.PathLike | None,
    names: tuple[str, ...],
    dtype: torch.dtype,
    reports: dict[str, QuantReport],
) -> Callable[[Path, FamilySpec], dict[str, Any]]:
    """A ``load_pipeline`` hook reading the quantized components straight into packed layers."""

    def load(folder: Path, spec: FamilySpec) -> dict[str, Any]:
        built: dict[str, Any] = {}
        for name in [spec.denoiser_attr, *_other_modules(names, spec.denoiser_attr)]:
            is_denoiser = name == spec.denoiser_attr
            built[name], reports[name] = load_quantized(
                component_source(folder, name),
                recipe if is_denoiser else weight_only(recipe),
                dtype=dtype,
                packed=packed if is_denoiser else None,
            )
        return built

    return load


def _resolve_recipe(
    recipe: QuantRecipe | None, packed: str | os.PathLike | None, card: ScheduleCard | None
) -> QuantRecipe:
    """The recipe to run: the one given, else the packed checkpoint's, else the card's, else fp.

    A packed checkpoint or card made for another recipe is refused: a card's
    coefficients correct the error of the recipe it was calibrated for.
    """
    sources = []
    if recipe is not None:
        sources.append(("the requested recipe", recipe))
    if packed is not None:
        sources.append((f"packed checkpoint {packed}", read_packed_recipe(packed)))
    if card is not None:
        sources.append(("the schedule card", QuantRecipe.from_dict(card.quant)))
    if not sources:
        return parse_preset("fp")
    (first_name, resolved), *others = sources
    for name, other in others:
        if other != resolved:
            raise QSchedError(
                f"{name} is for recipe {other.name!r} but {first_name} is {resolved.name!r}; "
                "use matching settings (omit --quant to take the recipe from the checkpoint or card)"
            )
    return resolved
