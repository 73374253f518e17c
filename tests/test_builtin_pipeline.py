from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from qsched.builtin.pipeline import QSchedBuiltinPipeline, load_builtin_pipeline
from qsched.builtin.unet import SHAPES, make_student_scheduler, make_teacher_scheduler, make_unet
from qsched.errors import QSchedError


def _pipe(distilled: bool) -> QSchedBuiltinPipeline:
    torch.manual_seed(0)
    unet = make_unet(SHAPES["tiny"], guidance_embedding=distilled).eval()
    scheduler = make_student_scheduler() if distilled else make_teacher_scheduler()
    pipe = QSchedBuiltinPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def student() -> QSchedBuiltinPipeline:
    return _pipe(True)


@pytest.fixture(scope="module")
def teacher() -> QSchedBuiltinPipeline:
    return _pipe(False)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_steps_and_output_types(student, steps):
    gen = torch.Generator().manual_seed(0)
    pt = student(["a photo of a sneaker", "a coat"], num_inference_steps=steps, generator=gen, output_type="pt").images
    assert pt.shape == (2, 3, 32, 32) and 0.0 <= float(pt.min()) <= float(pt.max()) <= 1.0
    assert torch.equal(pt[:, 0], pt[:, 1])  # gray repeated to RGB
    np_img = student("a bag", num_inference_steps=steps, output_type="np").images
    assert np_img.shape == (1, 32, 32, 3)
    pil = student("a bag", num_inference_steps=steps).images[0]
    assert pil.size == (32, 32) and pil.mode == "RGB"


def test_teacher_cfg_runs(teacher):
    out = teacher("a dress", num_inference_steps=3, guidance_scale=3.0, output_type="pt", return_dict=False)[0]
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("distilled", [False, True])
def test_save_reload_identical(tmp_path, distilled):
    pipe = _pipe(distilled)
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "text_encoder").exists()  # MiniLM stays in its pip package
    again = QSchedBuiltinPipeline.from_pretrained(str(tmp_path))
    again.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    a = pipe("a coat", generator=torch.Generator().manual_seed(1), **kw).images
    b = again("a coat", generator=torch.Generator().manual_seed(1), **kw).images
    # same weights, config and noise; the reloaded UNet may pick other CPU kernels (last-bit differences)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert type(again.scheduler) is type(pipe.scheduler)
    loaded = load_builtin_pipeline(tmp_path)
    assert isinstance(loaded, QSchedBuiltinPipeline)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QSchedError, match="diffusion_pytorch_model.safetensors|corrupt"):
        load_builtin_pipeline(tmp_path)


def test_generator_list_independent_of_batch(student):
    prompts = ["a sandal", "a shirt", "a bag"]
    full = student(prompts, num_inference_steps=2, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)]).images
    single = student(prompts[1], num_inference_steps=2, output_type="pt",
                     generator=[torch.Generator().manual_seed(11)]).images
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=0)
    with pytest.raises(QSchedError, match="one per image"):
        student(prompts, generator=[torch.Generator()])


def test_empty_long_and_unknown_prompts(student, caplog):
    assert student("", num_inference_steps=1, output_type="pt").images.shape == (1, 3, 32, 32)
    assert student("a red sports car", num_inference_steps=1, output_type="pt").images.shape == (1, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="qsched.builtin.text"):
        out = student("a photo of a sneaker " * 20, num_inference_steps=1, output_type="pt").images
    assert out.shape == (1, 3, 32, 32)
    assert any("truncated" in r.message for r in caplog.records)


def test_bad_arguments(student, tmp_path):
    with pytest.raises(QSchedError):
        student("a bag", num_inference_steps=0)
    with pytest.raises(QSchedError):
        student("a bag", output_type="jpeg")
    with pytest.raises(QSchedError, match="missing"):
        load_builtin_pipeline(tmp_path)


@pytest.mark.parametrize("distilled", [False, True])
def test_callback_on_step_end_sees_and_replaces_latents(distilled, student, teacher):
    """diffusers' convention: callback(pipe, i, t, {"latents"}) after each step, in the scheduler's
    timestep order; the last latents seen are the output; returned latents replace the sample."""
    pipe = student if distilled else teacher
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = []

    def record(p, i, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((i, int(t), kwargs["latents"].clone()))

    def run(**kw):  # the LCM scheduler draws fresh noise between steps: one generator per call
        return pipe(["a coat", "a bag"], num_inference_steps=3, latents=noise, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kw).images

    plain, out = run(), run(callback_on_step_end=record)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(pipe.scheduler.timesteps.tolist()))
    assert torch.equal(out, plain) and torch.equal(seen[-1][2], out)
    assert not torch.equal(seen[0][2], seen[1][2])
    zeroed = run(callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])} if i == 2 else {})
    assert torch.equal(zeroed, torch.zeros_like(out))
    with pytest.raises(QSchedError, match="must be among"):
        pipe("a bag", callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with pytest.raises(QSchedError, match="must be callable"):
        pipe("a bag", callback_on_step_end="latents")
