"""Tiny offline pipelines: real classes, tiny, deterministic, save/reload round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qsched.errors import QSchedError
from qsched.testing import (
    TINY_CALL_KWARGS,
    TINY_FAMILIES,
    TINY_IMAGE_SIZE,
    build_tiny_pipeline,
    save_tiny_pipeline,
)

EXPECTED_CLASSES = {
    "lcm": ("LatentConsistencyModelPipeline", "LCMScheduler", "unet"),
    "pcm-sd15": ("StableDiffusionPipeline", "TCDScheduler", "unet"),
    "sdxl-turbo": ("StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler", "unet"),
    "pcm-sdxl": ("StableDiffusionXLPipeline", "TCDScheduler", "unet"),
    "flux-schnell": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", "transformer"),
}


def _run(pipe, *, output_type: str = "pt", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a red cube on a blue table",
        num_inference_steps=2,
        generator=generator,
        output_type=output_type,
        **TINY_CALL_KWARGS,
    ).images


def _load(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_families_listed() -> None:
    assert set(TINY_FAMILIES) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_run_save_reload(family: str, tiny_pipeline_path) -> None:
    pipe = build_tiny_pipeline(family)
    pipe_cls, scheduler_cls, denoiser = EXPECTED_CLASSES[family]
    assert type(pipe).__name__ == pipe_cls
    assert type(pipe.scheduler).__name__ == scheduler_cls
    module = getattr(pipe, denoiser)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert not module.training
    assert sum(p.numel() for p in module.parameters()) < 200_000

    image = _run(pipe)
    assert image.shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert torch.isfinite(image).all()
    assert torch.equal(image, _run(pipe)), "same generator seed must give the same image"

    folder = tiny_pipeline_path(family)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 2_000_000
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))

    first, second = _run(_load(folder)), _run(_load(folder))
    assert torch.equal(first, second), "two loads of one folder must agree bit for bit"
    # Loaded weights are not 64-byte aligned, so CPU matmuls may round differently.
    torch.testing.assert_close(first, image, rtol=0, atol=1e-5)


def test_pil_output() -> None:
    images = _run(build_tiny_pipeline("pcm-sd15"), output_type="pil")
    assert images[0].size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert images[0].mode == "RGB"


def test_safety_checker_off() -> None:
    for family in ("lcm", "pcm-sd15"):
        pipe = build_tiny_pipeline(family)
        assert pipe.safety_checker is None
        assert pipe.config.requires_safety_checker is False


@pytest.mark.parametrize("family", ["lcm", "flux-schnell"])
def test_seed_determines_weights(family: str) -> None:
    a = build_tiny_pipeline(family, seed=1).components
    b = build_tiny_pipeline(family, seed=1).components
    c = build_tiny_pipeline(family, seed=2).components
    for name, module in a.items():
        if isinstance(module, torch.nn.Module):
            sa, sb, sc = module.state_dict(), b[name].state_dict(), c[name].state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    denoiser = "transformer" if family == "flux-schnell" else "unet"
    sa, sc = a[denoiser].state_dict(), c[denoiser].state_dict()
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("pcm-sd15", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizers_are_offline_and_tiny() -> None:
    pipe = build_tiny_pipeline("flux-schnell")
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2
    assert len(clip) == 2 * 256 + 2
    ids = clip("a cat").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "c", "a", "t</w>"]
    assert t5("a cat").input_ids[-1] == t5.eos_token_id
    assert pipe.text_encoder.config.vocab_size == len(clip)
    assert pipe.text_encoder_2.config.vocab_size == len(t5)


def test_unknown_family() -> None:
    with pytest.raises(QSchedError, match="known: lcm"):
        build_tiny_pipeline("sd3")


def test_save_returns_folder(tmp_path: Path) -> None:
    folder = save_tiny_pipeline("pcm-sd15", tmp_path / "tiny", seed=3)
    assert folder == tmp_path / "tiny"
    assert (folder / "model_index.json").is_file()
