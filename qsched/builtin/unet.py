"""Denoiser and scheduler configurations of the built-in model.

The denoiser is a ``diffusers.UNet2DConditionModel`` working on 2x2-patchified pixels:
a 1x32x32 image is a 4x16x16 "latent" (``pixel_unshuffle``), a fixed, lossless stand-in for
a VAE that cuts the UNet's cost four-fold. Parameterisation for few-step sampling:
v-prediction, zero terminal SNR (``rescale_betas_zero_snr``) and trailing timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qsched.builtin.text import HIDDEN_SIZE

if TYPE_CHECKING:
    import torch
    from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

#: Size of the guidance-scale embedding of the LCM student (``time_cond_proj_dim``).
GUIDANCE_EMBED_DIM = 256
IMAGE_SIZE = 32
IMAGE_CHANNELS = 1

#: Noise schedule shared by teacher, student and their schedulers.
SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
)


@dataclass(frozen=True)
class DenoiserShape:
    """UNet shape; ``patch_size`` p turns 1xHxW images into (p*p)x(H/p)x(W/p) UNet inputs."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 16
    patch_size: int = 2


SHAPES: dict[str, DenoiserShape] = {
    # 4.6 M parameters, ~0.8 s per batch-64 training step on one CPU thread (measured, see MODEL_CARD.md)
    "default": DenoiserShape(),
    # for tests and smoke runs only
    "tiny": DenoiserShape(block_out_channels=(16, 16), layers_per_block=1, attention_heads=2, norm_num_groups=8),
}


def make_unet(shape: DenoiserShape, *, guidance_embedding: bool = False) -> "UNet2DConditionModel":
    """A randomly initialised denoiser; ``guidance_embedding`` adds the LCM ``time_cond_proj_dim`` input."""
    from diffusers import UNet2DConditionModel

    n = len(shape.block_out_channels)
    channels = IMAGE_CHANNELS * shape.patch_size**2
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // shape.patch_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=tuple(shape.block_out_channels),
        layers_per_block=shape.layers_per_block,
        attention_head_dim=shape.attention_heads,  # diffusers' legacy name: it is the number of heads
        norm_num_groups=shape.norm_num_groups,
        cross_attention_dim=HIDDEN_SIZE,
        time_cond_proj_dim=GUIDANCE_EMBED_DIM if guidance_embedding else None,
    )


def make_teacher_scheduler() -> "DDIMScheduler":
    """DDIM sampler for the teacher (v-prediction, zero terminal SNR, trailing timesteps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=True)


def make_student_scheduler() -> "LCMScheduler":
    """LCM sampler for the distilled student; its timesteps start at t=999 (pure noise under zero SNR)."""
    from diffusers import LCMScheduler

    return LCMScheduler(**SCHEDULE, set_alpha_to_one=True, original_inference_steps=50, timestep_scaling=10.0)


def guidance_embedding(w: "torch.Tensor", dim: int = GUIDANCE_EMBED_DIM) -> "torch.Tensor":
    """Sinusoidal embedding of the guidance strength w = guidance_scale - 1 (as in LCM), [B] -> [B, dim]."""
    import torch

    w = w.to(torch.float32) * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def patchify(images: "torch.Tensor", patch_size: int) -> "torch.Tensor":
    """[B, C, H, W] pixels -> [B, C*p*p, H/p, W/p] UNet space."""
    import torch

    return torch.nn.functional.pixel_unshuffle(images, patch_size) if patch_size > 1 else images


def unpatchify(latents: "torch.Tensor", patch_size: int) -> "torch.Tensor":
    """Inverse of :func:`patchify`."""
    import torch

    return torch.nn.functional.pixel_shuffle(latents, patch_size) if patch_size > 1 else latents
