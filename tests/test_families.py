"""Family registry, detection and load_pipeline on tiny saved pipelines."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qsched.families as families
from qsched.errors import QSchedError
from qsched.families import (
    FamilySpec,
    LoadedPipeline,
    detect_family,
    family_names,
    get_family,
    list_families,
    load_pipeline,
    register_family,
)
from qsched.testing import TINY_CALL_KWARGS, TINY_FAMILIES, build_tiny_pipeline

PAPER_FAMILIES = ["flux-schnell", "lcm", "pcm-sd15", "pcm-sdxl", "sdxl-turbo"]

# name: (hub id, scheduler, overrides, default steps, guidance, denoiser)
DEFAULTS = {
    "lcm": ("SimianLuo/LCM_Dreamshaper_v7", "LCMScheduler", {}, 4, 8.0, "unet"),
    "pcm-sd15": (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "TCDScheduler",
        {"timestep_spacing": "trailing"},
        4,
        0.0,
        "unet",
    ),
    "pcm-sdxl": (
        "stabilityai/stable-diffusion-xl-base-1.0",
        "TCDScheduler",
        {"timestep_spacing": "trailing"},
        4,
        0.0,
        "unet",
    ),
    "sdxl-turbo": (
        "stabilityai/sdxl-turbo",
        "EulerAncestralDiscreteScheduler",
        {"timestep_spacing": "trailing"},
        4,
        0.0,
        "unet",
    ),
    "flux-schnell": (
        "black-forest-labs/FLUX.1-schnell",
        "FlowMatchEulerDiscreteScheduler",
        {"use_dynamic_shifting": False, "shift": 1.0},
        4,
        0.0,
        "transformer",
    ),
}


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, FamilySpec]:
    """A private copy of the registry, restored after the test."""
    copy = dict(families._REGISTRY)
    monkeypatch.setattr(families, "_REGISTRY", copy)
    return copy


def _spec(**changes) -> FamilySpec:
    return dataclasses.replace(get_family("pcm-sd15"), **changes)


# --- registry ----------------------------------------------------------------------


def test_paper_families_registered() -> None:
    assert set(PAPER_FAMILIES) <= set(family_names())
    assert family_names() == sorted(family_names())
    specs = list_families()
    assert all(isinstance(s, FamilySpec) for s in specs)
    assert [s.name for s in specs] == family_names()


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_paper_defaults(name: str) -> None:
    hub_id, scheduler, overrides, steps, guidance, denoiser = DEFAULTS[name]
    spec = get_family(name)
    assert spec.name == name
    assert spec.hub_id == hub_id
    assert spec.scheduler_class == scheduler
    assert spec.scheduler_config == overrides
    assert spec.default_steps == steps and steps in spec.allowed_steps
    assert spec.guidance_scale == guidance
    assert spec.denoiser_attr == denoiser
    assert spec.description
    kwargs = spec.call_kwargs()
    assert kwargs["num_inference_steps"] == steps and kwargs["guidance_scale"] == guidance


def test_pcm_lora_and_step_ranges() -> None:
    for name in ("pcm-sd15", "pcm-sdxl"):
        spec = get_family(name)
        assert spec.lora_hub_id == "wangfuyun/PCM_Weights"
        assert spec.lora_weight_name is not None and "4step" in spec.lora_weight_name
    assert get_family("sdxl-turbo").allowed_steps == (1, 2, 3, 4)
    assert 1 in get_family("sdxl-turbo").allowed_steps
    assert get_family("flux-schnell").call_kwargs()["max_sequence_length"] == 256
    assert all(get_family(n).pipeline_class is None for n in PAPER_FAMILIES)


def test_call_kwargs_checks_steps() -> None:
    spec = get_family("sdxl-turbo")
    assert spec.call_kwargs(steps=1)["num_inference_steps"] == 1
    with pytest.raises(QSchedError, match=r"supports \(1, 2, 3, 4\).*got 8"):
        spec.call_kwargs(steps=8)


def test_spec_is_frozen_and_hashable() -> None:
    spec = get_family("flux-schnell")
    assert isinstance(spec.scheduler_overrides, tuple)
    assert hash(spec) == hash(dataclasses.replace(spec))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.default_steps = 8  # type: ignore[misc]
    config = spec.scheduler_config
    config["shift"] = 3.0
    assert spec.scheduler_config["shift"] == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"default_steps": 3}, "default_steps 3 is not in allowed_steps"),
        ({"allowed_steps": (0, 4)}, "positive integers"),
        ({"name": "Bad Name"}, "lowercase"),
        ({"pipeline_class": "no_colon"}, "package.module:Class"),
        ({"pipeline_classes": ()}, "matches no pipeline class"),
    ],
)
def test_spec_validation(changes: dict, message: str) -> None:
    with pytest.raises(QSchedError, match=message):
        _spec(**changes)


def test_get_family_unknown_lists_known() -> None:
    with pytest.raises(QSchedError, match="unknown model family 'sd3'.*lcm.*sdxl-turbo"):
        get_family("sd3")


def test_register_family(registry: dict[str, FamilySpec]) -> None:
    spec = _spec(name="my-pcm", description="mine")
    assert register_family(spec) is spec
    assert get_family("my-pcm") is spec and "my-pcm" in family_names()
    assert register_family(spec) is spec  # the same spec again is fine
    with pytest.raises(QSchedError, match="already registered.*replace=True"):
        register_family(dataclasses.replace(spec, guidance_scale=2.0))
    register_family(dataclasses.replace(spec, guidance_scale=2.0), replace=True)
    assert get_family("my-pcm").guidance_scale == 2.0
    with pytest.raises(QSchedError, match="expects a FamilySpec"):
        register_family("my-pcm")  # type: ignore[arg-type]


def test_import_is_cheap() -> None:
    code = "import sys, qsched.families; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- detection ---------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_detect_each_family(family: str) -> None:
    pipe = build_tiny_pipeline(family)
    assert detect_family(pipe).name == family
    assert detect_family(pipe).denoiser(pipe) is getattr(pipe, get_family(family).denoiser_attr)


def test_detect_sees_through_scheduler_subclass() -> None:
    """A run-time subclass of the scheduler (as qsched.wrap makes) keeps the family."""
    pipe = build_tiny_pipeline("sdxl-turbo")
    wrapped_cls = type("Wrapped", (type(pipe.scheduler),), {})
    pipe.scheduler = wrapped_cls.from_config(pipe.scheduler.config)
    assert detect_family(pipe).name == "sdxl-turbo"


def test_detect_unknown_says_pass_family() -> None:
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    sd = build_tiny_pipeline("pcm-sd15")
    sd.scheduler = PNDMScheduler.from_config(sd.scheduler.config)
    with pytest.raises(QSchedError, match="StableDiffusionPipeline with PNDMScheduler.*family="):
        detect_family(sd)
    sdxl = build_tiny_pipeline("pcm-sdxl")
    sdxl.scheduler = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    with pytest.raises(QSchedError, match="pass family="):
        detect_family(sdxl)
    with pytest.raises(QSchedError, match="cannot tell the model family of a object"):
        detect_family(object())


def test_detect_refuses_guidance_distilled_flux() -> None:
    pipe = build_tiny_pipeline("flux-schnell")
    pipe.transformer.register_to_config(guidance_embeds=True)  # FLUX.1-dev, not schnell
    with pytest.raises(QSchedError, match="FluxPipeline.*family="):
        detect_family(pipe)


def test_denoiser_missing() -> None:
    with pytest.raises(QSchedError, match="pipe.transformer"):
        get_family("flux-schnell").denoiser(build_tiny_pipeline("pcm-sd15"))


# --- load_pipeline -----------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_load_each_family(family: str, tiny_pipeline_path) -> None:
    folder = tiny_pipeline_path(family)
    loaded = load_pipeline(folder)
    spec = get_family(family)
    assert isinstance(loaded, LoadedPipeline)
    assert loaded.family is spec
    assert loaded.source == str(folder.resolve())
    assert loaded.lora is None
    scheduler = loaded.pipe.scheduler
    assert type(scheduler).__name__ == spec.scheduler_class
    for key, value in spec.scheduler_overrides:
        assert scheduler.config[key] == value
    assert scheduler.config["num_train_timesteps"] == 1000
    denoiser = spec.denoiser(loaded.pipe)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in denoiser.parameters())
    if hasattr(loaded.pipe, "safety_checker"):
        assert loaded.pipe.safety_checker is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.source = "x"  # type: ignore[misc]

    kwargs = spec.call_kwargs(steps=min(spec.allowed_steps, key=lambda n: abs(n - 2)))
    loaded.pipe.set_progress_bar_config(disable=True)
    image = loaded.pipe(
        "a cat", generator=torch.Generator().manual_seed(0), output_type="pt",
        **(kwargs | TINY_CALL_KWARGS),
    ).images
    assert image.shape[-2:] == (32, 32) and torch.isfinite(image).all()


def test_scheduler_built_from_pipeline_config(tmp_path: Path) -> None:
    """The family scheduler keeps the folder's noise schedule and adds its overrides."""
    from diffusers import PNDMScheduler

    pipe = build_tiny_pipeline("pcm-sd15")
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, beta_end=0.0125)
    pipe.save_pretrained(tmp_path / "sd")
    with pytest.raises(QSchedError, match="family="):
        load_pipeline(tmp_path / "sd")  # plain SD + PNDM: not a few-step family
    loaded = load_pipeline(tmp_path / "sd", family="pcm-sd15")
    assert type(loaded.pipe.scheduler).__name__ == "TCDScheduler"
    assert loaded.pipe.scheduler.config["beta_end"] == 0.0125
    assert loaded.pipe.scheduler.config["timestep_spacing"] == "trailing"


def test_explicit_family_overrides_detection(tiny_pipeline_path) -> None:
    loaded = load_pipeline(tiny_pipeline_path("sdxl-turbo"), family="pcm-sdxl")
    assert loaded.family.name == "pcm-sdxl"
    assert type(loaded.pipe.scheduler).__name__ == "TCDScheduler"


def test_family_without_its_denoiser(tiny_pipeline_path) -> None:
    with pytest.raises(QSchedError, match="without a 'transformer'.*not a 'flux-schnell'"):
        load_pipeline(tiny_pipeline_path("pcm-sd15"), family="flux-schnell")


def test_unknown_family_name(tiny_pipeline_path) -> None:
    with pytest.raises(QSchedError, match="unknown model family 'sd3'"):
        load_pipeline(tiny_pipeline_path("lcm"), family="sd3")


def test_dtype(tiny_pipeline_path) -> None:
    loaded = load_pipeline(tiny_pipeline_path("pcm-sd15"), dtype=torch.bfloat16)
    assert next(loaded.pipe.unet.parameters()).dtype == torch.bfloat16


def test_safety_checker_dropped_at_load(tmp_path: Path, tiny_pipeline_path) -> None:
    """A folder that asks for a safety checker loads without one (and without its weights)."""
    folder = tmp_path / "sd"
    pipe = build_tiny_pipeline("pcm-sd15")
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline(folder)
    assert loaded.pipe.safety_checker is None
    assert loaded.pipe.config.requires_safety_checker is False


def test_hub_id_offline() -> None:
    with pytest.raises(QSchedError) as info:
        load_pipeline("stabilityai/sdxl-turbo-not-cached")
    message = str(info.value)
    assert "'stabilityai/sdxl-turbo-not-cached'" in message
    assert "not cached locally" in message and "pass the local folder" in message


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(QSchedError, match=f"model folder '{missing}' does not exist"):
        load_pipeline(missing)
    with pytest.raises(QSchedError, match="does not exist"):
        load_pipeline(str(missing))


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(QSchedError, match="not a diffusers pipeline folder.*model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(QSchedError, match="cannot read"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text("[]")
    with pytest.raises(QSchedError, match="_class_name"):
        load_pipeline(tmp_path)
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    with pytest.raises(QSchedError, match="is a file"):
        load_pipeline(file)


def test_broken_pipeline_folder(tmp_path: Path, tiny_pipeline_path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    src = tiny_pipeline_path("pcm-sd15")
    (folder / "model_index.json").write_text((src / "model_index.json").read_text())
    with pytest.raises(QSchedError, match="cannot load the pipeline"):
        load_pipeline(folder)


CUSTOM_MODULE = textwrap.dedent(
    """
    from diffusers import StableDiffusionPipeline

    class QSchedTestCustomPipeline(StableDiffusionPipeline):
        pass
    """
)


def test_custom_pipeline_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: dict[str, FamilySpec]
) -> None:
    """A family with its own pipeline class (like the built-in model) loads without code changes."""
    (tmp_path / "qsched_test_custom_pipe.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from qsched_test_custom_pipe import QSchedTestCustomPipeline  # type: ignore[import-not-found]

    tiny = build_tiny_pipeline("pcm-sd15")
    from diffusers import LCMScheduler

    components = tiny.components | {"scheduler": LCMScheduler.from_config(tiny.scheduler.config)}
    folder = tmp_path / "custom"
    QSchedTestCustomPipeline(**components).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "QSchedTestCustomPipeline"

    spec = FamilySpec(
        name="custom",
        description="a custom pipeline class",
        hub_id="local/custom",
        pipeline_classes=("QSchedTestCustomPipeline",),
        scheduler_class="LCMScheduler",
        default_steps=2,
        allowed_steps=(1, 2, 4),
        guidance_scale=1.0,
        denoiser_attr="unet",
        pipeline_class="qsched_test_custom_pipe:QSchedTestCustomPipeline",
    )
    register_family(spec)
    loaded = load_pipeline(folder)
    assert loaded.family is spec
    assert type(loaded.pipe) is QSchedTestCustomPipeline
    assert detect_family(loaded.pipe) is spec
    assert type(loaded.pipe.scheduler).__name__ == "LCMScheduler"

    register_family(dataclasses.replace(spec, pipeline_class="no_such_module:X"), replace=True)
    with pytest.raises(QSchedError, match="cannot import its pipeline class 'no_such_module:X'"):
        load_pipeline(folder)


# --- LoRA ----------------------------------------------------------------------------


def test_lora_needs_peft(
    tiny_pipeline_path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(families, "_has_peft", lambda: False)
    lora_file = tmp_path / "lora.safetensors"
    lora_file.write_bytes(b"")
    with pytest.raises(QSchedError, match="needs the 'peft' package.*pip install peft"):
        load_pipeline(tiny_pipeline_path("pcm-sd15"), lora=lora_file)


def test_lora_missing(tiny_pipeline_path) -> None:
    with pytest.raises(QSchedError, match="LoRA './no/such.safetensors' does not exist"):
        load_pipeline(tiny_pipeline_path("pcm-sd15"), lora="./no/such.safetensors")
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed")
    with pytest.raises(QSchedError, match="cannot load LoRA 'wangfuyun/PCM_Weights'"):
        load_pipeline(tiny_pipeline_path("pcm-sd15"), lora="wangfuyun/PCM_Weights")


def test_lora_is_fused(tiny_pipeline_path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder = tiny_pipeline_path("pcm-sd15")
    plain = load_pipeline(folder).pipe
    unet = plain.unet
    config = peft.LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    unet.add_adapter(config)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the LoRA do something
                param.normal_(std=0.1)
    state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state)
    lora_file = next(tmp_path.glob("*.safetensors"))

    loaded = load_pipeline(folder, lora=lora_file)
    assert loaded.lora == str(lora_file.resolve())
    names = [n for n, _ in loaded.pipe.unet.named_modules()]
    assert not any("lora" in n for n in names), "adapters must be fused and unloaded"
    before = load_pipeline(folder).pipe.unet.state_dict()
    after = loaded.pipe.unet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("attn" in k for k in changed)
