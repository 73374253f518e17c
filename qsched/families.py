"""Supported few-step model families, their paper defaults, and loading.

A family says which diffusers pipeline classes it covers, which scheduler (and
config overrides) its few-step sampling needs, its default steps and guidance,
and where its denoiser lives. :func:`load_pipeline` loads a local folder (or a
hub id already in the local cache), detects the family when not given, sets the
family's scheduler from the pipeline's own scheduler config, and fuses a LoRA.

Defaults follow the diffusers docs / model cards and the Q-Sched paper's code:

- ``lcm``: ``SimianLuo/LCM_Dreamshaper_v7``, LCMScheduler, 4 steps, guidance 8.0.
- ``pcm-sd15`` / ``pcm-sdxl``: SD 1.5 / SDXL base + PCM LoRA
  (``wangfuyun/PCM_Weights``, small-CFG 4-step), TCDScheduler with trailing
  timesteps, 4 steps, guidance 0 (classifier-free guidance off).
- ``sdxl-turbo``: ``stabilityai/sdxl-turbo``, EulerAncestral with trailing
  timesteps, 1-4 steps (4 by default), guidance 0.
- ``flux-schnell``: ``black-forest-labs/FLUX.1-schnell``, FlowMatchEuler without
  dynamic shifting, 4 steps, guidance 0, text sequence length at most 256.

Importing this module does not import diffusers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qsched.errors import QSchedError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "FamilySpec",
    "LoadedPipeline",
    "detect_family",
    "family_names",
    "get_family",
    "list_families",
    "load_pipeline",
    "register_family",
    "resolve_pipeline",
]

Pairs = tuple[tuple[str, Any], ...]


def _as_pairs(value: Mapping[str, Any] | Iterable[tuple[str, Any]], what: str) -> Pairs:
    items = value.items() if isinstance(value, Mapping) else value
    pairs = tuple((str(k), v) for k, v in items)
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise QSchedError(f"{what} has duplicate keys: {keys}")
    return tuple(sorted(pairs))


@dataclass(frozen=True)
class FamilySpec:
    """One few-step model family: what it matches, and how to sample it.

    Mapping-valued options (``scheduler_overrides``, ``call_overrides``,
    ``detect_denoiser_config``, ``detect_pipeline_config``) accept a dict and are stored
    as sorted tuples of pairs, so a spec stays frozen and hashable.
    """

    name: str
    description: str
    hub_id: str
    pipeline_classes: tuple[str, ...]
    scheduler_class: str
    default_steps: int
    allowed_steps: tuple[int, ...]
    guidance_scale: float
    denoiser_attr: str
    #: Scheduler config overrides; a dict is accepted and stored as sorted pairs.
    scheduler_overrides: Pairs | Mapping[str, Any] = ()
    #: Scheduler classes that identify the family in :func:`detect_family`; empty: any.
    detect_schedulers: tuple[str, ...] = ()
    #: Denoiser config values a pipeline must have to be detected as this family.
    detect_denoiser_config: Pairs | Mapping[str, Any] = ()
    #: Pipeline config values (``model_index.json``) a pipeline must have to be detected as this family.
    detect_pipeline_config: Pairs | Mapping[str, Any] = ()
    #: Extra keyword arguments for the pipeline call (e.g. ``max_sequence_length``).
    call_overrides: Pairs | Mapping[str, Any] = ()
    lora_hub_id: str | None = None
    #: File inside ``lora_hub_id`` (or a LoRA folder), ``subfolder/name.safetensors``.
    lora_weight_name: str | None = None
    #: ``"module:Class"`` of a custom pipeline class; None loads with DiffusionPipeline.
    pipeline_class: str | None = None
    #: Folder of the weights qsched ships for this family: ``load_pipeline(<family name>)`` loads it.
    default_folder: str | None = None
    #: What to run when ``default_folder`` is missing (shown in the error).
    default_folder_hint: str = ""
    #: Free-text provenance of the defaults (not part of equality).
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            raise QSchedError(
                f"family name {self.name!r} must be lowercase letters, digits, '.', '_' or '-'"
            )
        for attr in ("scheduler_overrides", "detect_denoiser_config", "detect_pipeline_config", "call_overrides"):
            object.__setattr__(self, attr, _as_pairs(getattr(self, attr), f"{self.name}.{attr}"))
        object.__setattr__(self, "pipeline_classes", tuple(self.pipeline_classes))
        object.__setattr__(self, "detect_schedulers", tuple(self.detect_schedulers))
        object.__setattr__(self, "allowed_steps", tuple(sorted(set(self.allowed_steps))))
        if not self.pipeline_classes:
            raise QSchedError(f"family {self.name!r} matches no pipeline class")
        if not self.allowed_steps or any(
            not isinstance(n, int) or n < 1 for n in self.allowed_steps
        ):
            raise QSchedError(
                f"family {self.name!r}: allowed_steps must be positive integers, "
                f"got {self.allowed_steps}"
            )
        if self.default_steps not in self.allowed_steps:
            raise QSchedError(
                f"family {self.name!r}: default_steps {self.default_steps} is not in "
                f"allowed_steps {self.allowed_steps}"
            )
        if self.pipeline_class is not None and not re.fullmatch(
            r"[\w.]+:\w+", self.pipeline_class
        ):
            raise QSchedError(
                f"family {self.name!r}: pipeline_class must look like 'package.module:Class', "
                f"got {self.pipeline_class!r}"
            )

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config overrides as a new dict."""
        return dict(self.scheduler_overrides)

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        """The pipeline's denoiser (UNet or transformer): the module to quantize."""
        module = getattr(pipe, self.denoiser_attr, None)
        if not isinstance(module, torch.nn.Module):
            raise QSchedError(
                f"family {self.name!r} expects the denoiser at pipe.{self.denoiser_attr}, "
                f"but {type(pipe).__name__} has no such module"
            )
        return module

    def check_steps(self, steps: int) -> int:
        """Return ``steps`` if the family supports it, else raise a QSchedError."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps not in self.allowed_steps:
            raise QSchedError(
                f"family {self.name!r} supports {self.allowed_steps} inference steps, got {steps!r}"
            )
        return steps

    def call_kwargs(self, *, steps: int | None = None) -> dict[str, Any]:
        """Pipeline call arguments with the family defaults (steps, guidance, extras)."""
        n = self.default_steps if steps is None else self.check_steps(steps)
        return {"num_inference_steps": n, "guidance_scale": self.guidance_scale} | dict(
            self.call_overrides
        )

    def make_scheduler(self, config: Mapping[str, Any]) -> Any:
        """The family's scheduler, built from ``config`` (another scheduler's) plus overrides."""
        import diffusers

        cls = getattr(diffusers, self.scheduler_class, None)
        if cls is None:
            raise QSchedError(
                f"family {self.name!r} names scheduler {self.scheduler_class!r}, which this "
                f"diffusers {diffusers.__version__} does not provide"
            )
        return cls.from_config(dict(config), **self.scheduler_config)


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Add ``spec`` to the registry (``replace=True`` to overwrite a same-named one)."""
    if not isinstance(spec, FamilySpec):
        raise QSchedError(f"register_family expects a FamilySpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise QSchedError(
            f"family {spec.name!r} is already registered; pass replace=True to overwrite it"
        )
    _REGISTRY[spec.name] = spec
    return spec


def get_family(name: str) -> FamilySpec:
    """The registered family called ``name``."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise QSchedError(
            f"unknown model family {name!r}; known families: {', '.join(family_names())}"
        )
    return spec


def list_families() -> list[FamilySpec]:
    """The registered families, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def family_names() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_REGISTRY)


# --- detection -------------------------------------------------------------------


def _match(
    pipeline_names: list[str],
    scheduler_names: Iterable[str],
    denoiser_config: Mapping[str, Any],
    pipeline_config: Mapping[str, Any],
) -> list[FamilySpec]:
    """Families matching the most specific pipeline class name (first in ``pipeline_names``)."""
    schedulers = set(scheduler_names)
    for name in pipeline_names:
        found = [
            spec
            for spec in _REGISTRY.values()
            if name in spec.pipeline_classes
            and (not spec.detect_schedulers or schedulers & set(spec.detect_schedulers))
            and all(denoiser_config.get(k) == v for k, v in spec.detect_denoiser_config)
            and all(pipeline_config.get(k) == v for k, v in spec.detect_pipeline_config)
        ]
        if found:
            return found
    return []


def _detect(
    pipeline_names: list[str],
    scheduler_names: list[str],
    denoiser_config: Mapping[str, Any],
    pipeline_config: Mapping[str, Any],
) -> FamilySpec:
    found = _match(pipeline_names, scheduler_names, denoiser_config, pipeline_config)
    if len(found) == 1:
        return found[0]
    scheduler = scheduler_names[0] if scheduler_names else "no scheduler"
    what = f"a {pipeline_names[0]} with {scheduler}"
    if found:
        names = ", ".join(sorted(s.name for s in found))
        raise QSchedError(f"{what} matches several families ({names}); pass family=...")
    raise QSchedError(
        f"cannot tell the model family of {what}; pass family= one of: "
        f"{', '.join(family_names())}"
    )


def _mro_names(obj: Any) -> list[str]:
    """Class names from the most specific to the least (``object`` only if it is all)."""
    return [c.__name__ for c in type(obj).__mro__ if c is not object] or [type(obj).__name__]


def detect_family(pipe: Any) -> FamilySpec:
    """The family of a loaded pipeline, from its pipeline and scheduler classes."""
    pipeline_names = _mro_names(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    scheduler_names = _mro_names(scheduler) if scheduler is not None else []
    configs: dict[str, Any] = {}
    for spec in _REGISTRY.values():
        module = getattr(pipe, spec.denoiser_attr, None)
        if module is not None and hasattr(module, "config"):
            configs.update(dict(module.config))
    return _detect(pipeline_names, scheduler_names, configs, dict(getattr(pipe, "config", {})))


# --- loading ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedPipeline:
    """A pipeline ready for few-step sampling, with its family and where it came from."""

    pipe: DiffusionPipeline
    family: FamilySpec
    #: The local folder loaded (absolute), or the hub id as given.
    source: str
    lora: str | None = None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _looks_like_hub_id(model: str | Path) -> bool:
    return isinstance(model, str) and _HUB_ID.fullmatch(model) is not None and ".." not in model


def _resolve_model_folder(model: str | Path) -> tuple[Path, str]:
    """The local folder holding ``model`` and the source string to record."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QSchedError(f"model {str(model)!r} is a file; pass a diffusers pipeline folder")
        return path.resolve(), str(path.resolve())
    if not _looks_like_hub_id(model):
        raise QSchedError(f"model folder {str(model)!r} does not exist")
    from diffusers import DiffusionPipeline

    try:
        cached = DiffusionPipeline.download(str(model), local_files_only=True)
    except (OSError, ValueError) as err:
        raise QSchedError(
            f"model {model!r} is not a local folder, and as a Hugging Face hub id it is not "
            "cached locally (qsched does not download: this machine is offline); download it "
            "where there is network (e.g. `huggingface-cli download "
            f"{model} --local-dir DIR`) and pass the local folder"
        ) from err
    return Path(cached), str(model)


def _read_model_index(folder: Path, source: str) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise QSchedError(
            f"{source!r} is not a diffusers pipeline folder: it has no model_index.json "
            "(save one with pipe.save_pretrained(folder))"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QSchedError(f"cannot read {index_file}: {err}") from err
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise QSchedError(f"{index_file} has no '_class_name': not a diffusers pipeline folder")
    return index


def _component_class(index: Mapping[str, Any], name: str) -> str | None:
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def _detect_from_folder(folder: Path, index: Mapping[str, Any]) -> FamilySpec:
    """Detect the family before loading, from model_index.json and the denoiser config."""
    scheduler = _component_class(index, "scheduler")
    configs: dict[str, Any] = {}
    for attr in {spec.denoiser_attr for spec in _REGISTRY.values()}:
        config_file = folder / attr / "config.json"
        if attr in index and config_file.is_file():
            try:
                configs.update(json.loads(config_file.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise QSchedError(f"cannot read {config_file}: {err}") from err
    return _detect([index["_class_name"]], [scheduler] if scheduler else [], configs, index)


def _import_pipeline_class(spec: FamilySpec) -> Any:
    assert spec.pipeline_class is not None
    module_name, class_name = spec.pipeline_class.split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise QSchedError(
            f"family {spec.name!r}: cannot import its pipeline class {spec.pipeline_class!r}: {err}"
        ) from err


def _has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def _load_lora(pipe: Any, lora: str | Path, spec: FamilySpec) -> str:
    """Load ``lora`` into ``pipe``, fuse it into the weights and drop the adapter layers."""
    path = Path(lora).expanduser()
    kwargs: dict[str, Any] = {}
    if path.is_file():
        target, kwargs["weight_name"], source = str(path.parent), path.name, str(path.resolve())
    elif path.is_dir():
        target, source = str(path), str(path.resolve())
        if spec.lora_weight_name and (path / spec.lora_weight_name).is_file():
            kwargs["weight_name"] = spec.lora_weight_name
    elif _looks_like_hub_id(lora):
        target, source = str(lora), str(lora)
        kwargs["local_files_only"] = True
        if spec.lora_weight_name:
            kwargs["weight_name"] = spec.lora_weight_name
    else:
        raise QSchedError(f"LoRA {str(lora)!r} does not exist (expected a file or folder)")
    if not _has_peft():
        raise QSchedError(
            "loading a LoRA needs the 'peft' package, which is not installed: pip install peft"
        )
    if not hasattr(pipe, "load_lora_weights"):
        raise QSchedError(f"{type(pipe).__name__} cannot load LoRA weights")
    try:
        pipe.load_lora_weights(target, **kwargs)
    except (OSError, ValueError) as err:
        raise QSchedError(
            f"cannot load LoRA {str(lora)!r}: {err}; if it is a hub id, download it where there "
            "is network and pass the local .safetensors file"
        ) from err
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; quantizers see plain modules
    return source


def _shipped_family(model: str | Path) -> FamilySpec | None:
    """The family whose shipped weights ``model`` names (e.g. ``"builtin"``), if any."""
    if not isinstance(model, str) or model not in _REGISTRY:
        return None
    spec = _REGISTRY[model]
    return spec if spec.default_folder is not None else None


def _dtype_keyword() -> str:
    """``dtype`` where diffusers takes it (it deprecates ``torch_dtype``), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def resolve_pipeline(
    model: str | Path, *, family: str | None = None
) -> tuple[Path, str, dict[str, Any], FamilySpec]:
    """Where a pipeline lives and what it is, without loading it: ``(folder, source, model_index, family)``.

    ``model`` is a local folder, a hub id in the local cache, or the name of a family
    whose weights qsched ships (``"builtin"``).
    """
    shipped = _shipped_family(model)
    if shipped is not None:
        family = family or shipped.name
        model = shipped.default_folder
        if not Path(model).is_dir():
            raise QSchedError(
                f"the weights of the built-in model {shipped.name!r} are missing ({model}); "
                f"{shipped.default_folder_hint or 'reinstall qsched'}"
            )
    folder, source = _resolve_model_folder(model)
    index = _read_model_index(folder, source)
    spec = get_family(family) if family is not None else _detect_from_folder(folder, index)
    if spec.denoiser_attr not in index:
        raise QSchedError(
            f"{source!r} holds a {index['_class_name']} without a {spec.denoiser_attr!r}, "
            f"so it is not a {spec.name!r} pipeline; check family= (known: "
            f"{', '.join(family_names())})"
        )
    return folder, source, index, spec


def load_pipeline(
    model: str | Path,
    *,
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: str | Path | None = None,
    components: Callable[[Path, FamilySpec], Mapping[str, Any]] | None = None,
) -> LoadedPipeline:
    """Load a pipeline folder (or a locally cached hub id) ready for few-step sampling.

    The family is detected from the pipeline and scheduler classes when not
    given; the scheduler is replaced by the family's, built from the pipeline's
    own scheduler config plus the family overrides; the safety checker is off;
    ``lora`` (a .safetensors file, a folder, or a cached hub id) is fused.
    ``components(folder, family)`` may return pipeline components built by the
    caller (e.g. a denoiser loaded straight into packed layers); those are not
    loaded from the folder.
    """
    folder, source, index, spec = resolve_pipeline(model, family=family)
    if lora is not None and components is not None:
        raise QSchedError(
            "a LoRA is fused into full-precision weights, so it cannot be combined with components "
            "loaded already quantized; fuse it and save the pipeline first, or use the fake backend"
        )
    kwargs: dict[str, Any] = {_dtype_keyword(): dtype}
    if components is not None:
        kwargs.update(components(folder, spec))
    if "safety_checker" in index:
        kwargs["safety_checker"] = None
    if "requires_safety_checker" in index:
        kwargs["requires_safety_checker"] = False
    if spec.pipeline_class is not None:
        loader = _import_pipeline_class(spec)
    else:
        from diffusers import DiffusionPipeline as loader
    try:
        pipe = loader.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise QSchedError(f"cannot load the pipeline in {source!r}: {err}") from err

    spec.denoiser(pipe)  # fail early if the family's denoiser is missing
    pipe.scheduler = spec.make_scheduler(pipe.scheduler.config)
    lora_source = _load_lora(pipe, lora, spec) if lora is not None else None
    pipe.to(device)
    return LoadedPipeline(pipe=pipe, family=spec, source=source, lora=lora_source)


# --- the families of the paper ---------------------------------------------------

_PCM_NOTE = (
    "PCM ships LoRAs per step count (2, 4, 8, 16); the default is the 4-step small-CFG one, "
    "sampled with TCD (trailing timesteps) and guidance 0 as in the Q-Sched code."
)



def _pcm_spec(variant: str, *, base: str, hub_id: str, pipeline_class: str, notes: str = "") -> FamilySpec:
    """A PCM family: ``base`` model + the 4-step small-CFG PCM LoRA, sampled with TCD (trailing)."""
    return FamilySpec(
        name=f"pcm-{variant}",
        description=f"Phased Consistency Model: {base} + PCM LoRA, TCD sampling",
        hub_id=hub_id,
        pipeline_classes=(pipeline_class,),
        scheduler_class="TCDScheduler",
        scheduler_overrides={"timestep_spacing": "trailing"},
        detect_schedulers=("TCDScheduler",),
        default_steps=4,
        allowed_steps=(2, 4, 8, 16),
        guidance_scale=0.0,
        denoiser_attr="unet",
        lora_hub_id="wangfuyun/PCM_Weights",
        lora_weight_name=f"{variant}/pcm_{variant}_smallcfg_4step_converted.safetensors",
        notes=_PCM_NOTE + notes,
    )


for _spec in (
    FamilySpec(
        name="lcm",
        description="Latent Consistency Model distilled from Dreamshaper v7 (SD 1.5)",
        hub_id="SimianLuo/LCM_Dreamshaper_v7",
        pipeline_classes=("LatentConsistencyModelPipeline",),
        scheduler_class="LCMScheduler",
        default_steps=4,
        allowed_steps=tuple(range(1, 9)),
        guidance_scale=8.0,
        denoiser_attr="unet",
        notes="diffusers LCM docs / model card: 4 steps, guidance_scale=8.0 (w embedding).",
    ),
    _pcm_spec("sd15", base="SD 1.5", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
              pipeline_class="StableDiffusionPipeline",
              notes=" The paper's code loads runwayml/stable-diffusion-v1-5, since moved to this id."),
    _pcm_spec("sdxl", base="SDXL base", hub_id="stabilityai/stable-diffusion-xl-base-1.0",
              pipeline_class="StableDiffusionXLPipeline"),
    FamilySpec(
        name="sdxl-turbo",
        description="SDXL-Turbo: adversarially distilled SDXL, 1-4 steps, no guidance",
        hub_id="stabilityai/sdxl-turbo",
        pipeline_classes=("StableDiffusionXLPipeline",),
        scheduler_class="EulerAncestralDiscreteScheduler",
        scheduler_overrides={"timestep_spacing": "trailing"},
        detect_schedulers=("EulerAncestralDiscreteScheduler",),
        default_steps=4,
        allowed_steps=(1, 2, 3, 4),
        guidance_scale=0.0,
        denoiser_attr="unet",
        notes="diffusers SDXL Turbo docs: guidance_scale=0.0, timestep_spacing='trailing', "
        "1-4 steps, trained at 512x512.",
    ),
    FamilySpec(
        name="flux-schnell",
        description="FLUX.1 [schnell]: timestep-distilled rectified-flow transformer",
        hub_id="black-forest-labs/FLUX.1-schnell",
        pipeline_classes=("FluxPipeline",),
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler_overrides={"use_dynamic_shifting": False, "shift": 1.0},
        detect_denoiser_config={"guidance_embeds": False},
        call_overrides={"max_sequence_length": 256},
        default_steps=4,
        allowed_steps=(1, 2, 3, 4),
        guidance_scale=0.0,
        denoiser_attr="transformer",
        notes="diffusers Flux docs (timestep-distilled): guidance_scale=0, "
        "max_sequence_length at most 256; shift 1.0 without dynamic shifting as in its config.",
    ),
):
    register_family(_spec)
del _spec


# --- the built-in model world (trained and shipped by qsched, see qsched/builtin) ---

_BUILTIN_ASSETS = Path(__file__).resolve().parent / "builtin" / "assets"
_BUILTIN_SCHEDULE_NOTE = (
    "Pixel-space 32x32 Fashion-MNIST model with the MiniLM text encoder; v-prediction, "
    "zero terminal SNR, trailing timesteps; see qsched/builtin/MODEL_CARD.md."
)


def _builtin_spec(stage: str, *, description: str, scheduler_class: str, default_steps: int,
                  allowed_steps: tuple[int, ...], **flow: Any) -> FamilySpec:
    """A family of the built-in models; ``stage`` is its folder under the shipped assets.

    The name is ``builtin-<stage>`` without ``-student``: ``builtin``, ``builtin-teacher``,
    ``builtin-flow``, ``builtin-flow-teacher``. ``flow`` holds the FamilySpec fields where the
    rectified-flow pipeline differs from the UNet one.
    """
    fields: dict[str, Any] = dict(
        pipeline_classes=("QSchedBuiltinPipeline",),
        denoiser_attr="unet",
        pipeline_class="qsched.builtin.pipeline:QSchedBuiltinPipeline",
        notes=_BUILTIN_SCHEDULE_NOTE,
    )
    fields.update(flow)
    return FamilySpec(
        name=f"builtin-{stage}".removesuffix("-student"),
        description=description,
        hub_id="(shipped with qsched)",
        scheduler_class=scheduler_class,
        detect_schedulers=(scheduler_class,),
        default_steps=default_steps,
        allowed_steps=allowed_steps,
        guidance_scale=3.0,
        default_folder=str(_BUILTIN_ASSETS / stage),
        default_folder_hint=f"train it with `python -m qsched.builtin.train {stage}` "
        "(see qsched/builtin/MODEL_CARD.md)",
        **fields,
    )


register_family(_builtin_spec(
    "student", description="qsched's own few-step model (LCM-distilled, Fashion-MNIST, 32x32)",
    scheduler_class="LCMScheduler", default_steps=4, allowed_steps=(1, 2, 4, 8),
))
register_family(_builtin_spec(
    "teacher", description="the many-step teacher of the built-in model (DDIM, classifier-free guidance)",
    scheduler_class="DDIMScheduler", default_steps=25, allowed_steps=(4, 8, 10, 25, 50),
))

_BUILTIN_FLOW = dict(
    pipeline_classes=("QSchedBuiltinFlowPipeline",),
    denoiser_attr="transformer",
    pipeline_class="qsched.builtin.flow_pipeline:QSchedBuiltinFlowPipeline",
    scheduler_overrides={"use_dynamic_shifting": False, "shift": 1.0},  # as FLUX.1-schnell
    notes="Rectified-flow FluxTransformer2DModel on 2x2-patchified, FLUX-packed 32x32 Fashion-MNIST pixels "
    "with the MiniLM text encoder; FlowMatchEuler as FLUX.1-schnell; see qsched/builtin/MODEL_CARD.md.",
)
register_family(_builtin_spec(
    "flow-student", description="qsched's own FLUX.1-schnell-like model (rectified flow, guidance-distilled: "
    "CFG 3 baked in, best at 4 steps; Fashion-MNIST, 32x32)",
    scheduler_class="FlowMatchEulerDiscreteScheduler", default_steps=4, allowed_steps=(1, 2, 4),
    detect_pipeline_config={"distilled": True}, **_BUILTIN_FLOW,
))
register_family(_builtin_spec(
    "flow-teacher", description="the many-step teacher of the built-in flow model (FlowMatchEuler, "
    "classifier-free guidance)",
    scheduler_class="FlowMatchEulerDiscreteScheduler", default_steps=25, allowed_steps=(4, 8, 10, 25, 50),
    detect_pipeline_config={"distilled": False}, **_BUILTIN_FLOW,
))
