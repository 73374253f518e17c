"""The built-in rectified-flow model: FLUX packing, the transformer, and QSchedBuiltinFlowPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from flow_helpers import tiny_flow_pipeline

from qsched.builtin.flow import SHAPES, FlowShape, image_ids, make_transformer, pack, pooled_text, unpack, velocity
from qsched.builtin.flow_pipeline import QSchedBuiltinFlowPipeline
from qsched.builtin.pipeline import load_builtin_pipeline
from qsched.errors import QSchedError


@pytest.fixture(scope="module")
def student() -> QSchedBuiltinFlowPipeline:
    return tiny_flow_pipeline(distilled=True)


@pytest.fixture(scope="module")
def teacher() -> QSchedBuiltinFlowPipeline:
    return tiny_flow_pipeline(distilled=False, seed=1)


def test_packing_is_fluxpipelines():
    x = torch.randn(3, 4, 16, 16)
    tokens = pack(x)
    assert tokens.shape == (3, 64, 16)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, 4, 16, 16))
    assert torch.equal(unpack(tokens, 16, 16), x)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 16, 16, 1), x)
    assert torch.equal(image_ids(16, 16), FluxPipeline._prepare_latent_image_ids(3, 8, 8, "cpu", torch.float32))


def test_pooled_text_ignores_padding():
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pooled_text(states, mask)
    torch.testing.assert_close(pooled[0], states[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], states[1].mean(0))


def test_new_transformer_is_flux_schnell_like_and_starts_at_zero():
    model = make_transformer(SHAPES["tiny"])
    assert type(model).__name__ == "FluxTransformer2DModel" and model.config.guidance_embeds is False
    assert model.config.joint_attention_dim == model.config.pooled_projection_dim == 384
    x, states = torch.randn(2, 64, 16), torch.randn(2, 16, 384)
    v = velocity(model, x, torch.rand(2), states, states.mean(1), height=16, width=16)
    assert v.shape == x.shape and not v.any()  # adaLN-Zero: every block starts as the identity
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FlowShape(attention_head_dim=32, axes_dims_rope=(4, 12, 12))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_steps_and_output_types(student, steps):
    gen = [torch.Generator().manual_seed(i) for i in range(2)]
    pt = student(["a photo of a sneaker", "a coat"], num_inference_steps=steps, generator=gen, output_type="pt").images
    assert pt.shape == (2, 3, 32, 32) and 0.0 <= float(pt.min()) <= float(pt.max()) <= 1.0
    assert torch.equal(pt[:, 0], pt[:, 1])  # gray repeated to RGB
    assert student("a bag", num_inference_steps=steps, output_type="np").images.shape == (1, 32, 32, 3)
    pil = student("a bag", num_inference_steps=steps).images[0]
    assert pil.size == (32, 32) and pil.mode == "RGB"
    assert student("a bag", num_inference_steps=steps, output_type="latent").images.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_euler_sampling_is_its_consistency_sampler(student, steps):
    """FlowMatchEuler on the student = f(x_s, s) = x_s - s v, re-noised to s' with the implied noise."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = student("a coat", num_inference_steps=steps, latents=noise, output_type="latent").images
    states, pooled = student.encode_prompt(["a coat"], torch.device("cpu"))
    sigmas = [1.0 - i / steps for i in range(steps)] + [0.0]
    x = pack(noise)
    for s, s_next in zip(sigmas, sigmas[1:]):
        v = velocity(student.transformer, x, torch.tensor([s]), states, pooled, height=16, width=16)
        f = x - s * v  # the student's clean-image estimate
        x = (s_next / s) * x + (1 - s_next / s) * f
    torch.testing.assert_close(out, unpack(x, 16, 16), atol=1e-5, rtol=0)


def test_teacher_uses_classifier_free_guidance(teacher):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    out = teacher("a dress", num_inference_steps=1, guidance_scale=3.0, latents=noise, output_type="latent").images
    states, pooled = teacher.encode_prompt(["a dress"], torch.device("cpu"))
    null_states, null_pooled = teacher.encode_prompt([""], torch.device("cpu"))
    x, one = pack(noise), torch.ones(1)
    cond = velocity(teacher.transformer, x, one, states, pooled, height=16, width=16)
    uncond = velocity(teacher.transformer, x, one, null_states, null_pooled, height=16, width=16)
    torch.testing.assert_close(out, unpack(x - (uncond + 3.0 * (cond - uncond)), 16, 16), atol=1e-5, rtol=0)
    # guidance 1 (or less) turns CFG off; None is the model's default (3)
    plain = teacher("a dress", num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="latent").images
    torch.testing.assert_close(plain, unpack(x - cond, 16, 16), atol=1e-5, rtol=0)
    default = teacher("a dress", num_inference_steps=1, latents=noise, output_type="latent").images
    assert torch.equal(default, out)


def test_student_refuses_another_guidance_scale(student):
    kw = dict(num_inference_steps=1, output_type="pt", generator=torch.Generator().manual_seed(0))
    baked = student("a bag", guidance_scale=3.0, **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(student("a bag", guidance_scale=None, **kw).images, baked)
    with pytest.raises(QSchedError, match="guidance 3 baked into its weights .* guidance_scale=5"):
        student("a bag", guidance_scale=5.0, num_inference_steps=1)


@pytest.mark.parametrize("distilled", [False, True])
def test_save_reload_identical(tmp_path, distilled):
    pipe = tiny_flow_pipeline(distilled=distilled)
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "text_encoder").exists()  # MiniLM stays in its pip package
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["distilled"] is distilled and index["max_sequence_length"] == 16
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    again = QSchedBuiltinFlowPipeline.from_pretrained(str(tmp_path))
    again.set_progress_bar_config(disable=True)
    assert again.is_distilled is distilled
    kw = dict(num_inference_steps=2, output_type="np")
    a = pipe("a coat", generator=torch.Generator().manual_seed(1), **kw).images
    b = again("a coat", generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert type(again.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert isinstance(load_builtin_pipeline(tmp_path), QSchedBuiltinFlowPipeline)
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QSchedError, match="corrupt"):
        load_builtin_pipeline(tmp_path)
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(QSchedError, match="transformer/diffusion_pytorch_model.safetensors is missing"):
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


def test_bad_arguments(student):
    with pytest.raises(QSchedError):
        student("a bag", num_inference_steps=0)
    with pytest.raises(QSchedError):
        student("a bag", output_type="jpeg")
    with pytest.raises(QSchedError, match="latents must have shape"):
        student("a bag", latents=torch.zeros(1, 64, 16))


def test_callback_on_step_end_sees_and_replaces_latents(student):
    """As for the UNet pipeline: unpacked latents [B, 4, 16, 16] after each step; the last seen is
    the output; returned latents replace the sample."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = []
    out = student("a coat", num_inference_steps=2, latents=noise, output_type="latent",
                  callback_on_step_end=lambda p, i, t, kw: seen.append((i, kw["latents"].clone()))).images
    assert [i for i, _ in seen] == [0, 1] and seen[0][1].shape == noise.shape
    assert torch.equal(seen[-1][1], out)
    halved = student("a coat", num_inference_steps=2, latents=noise, output_type="latent",
                     callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] / 2} if i == 1 else None).images
    torch.testing.assert_close(halved, out / 2, atol=1e-6, rtol=0)
    with pytest.raises(QSchedError, match="must be among"):
        student("a bag", callback_on_step_end=lambda *a: None, callback_on_step_end_tensor_inputs=["tokens"])
