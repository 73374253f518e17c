"""Denoiser and scheduler configurations of the built-in rectified-flow model (``builtin-flow``).

A FLUX.1-schnell-like member of the built-in world: the denoiser is a small
``diffusers.FluxTransformer2DModel`` (double- and single-stream blocks, rotary position
ids, no guidance embedding) sampled by ``FlowMatchEulerDiscreteScheduler`` as FLUX.1-schnell
is (``shift=1``, no dynamic shifting).

Image space: a 1x32x32 gray image is 2x2-patchified (``pixel_unshuffle``) to a 4x16x16
"latent", as in the UNet model, then FLUX-packed 2x2 into 64 tokens of 16 channels (the
layout of ``FluxPipeline._pack_latents``). Text: the MiniLM token states (384-d,
``MAX_SEQUENCE_LENGTH`` tokens) are ``encoder_hidden_states``; their masked mean is
``pooled_projections``.

Flow convention (as FLUX / SD3 in diffusers): ``x_sigma = (1 - sigma) * x0 + sigma * noise``,
the model predicts the velocity ``v = noise - x0`` and is given ``timestep = sigma``
(``FluxTransformer2DModel`` multiplies it by 1000 for its sinusoidal embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qsched.builtin.text import HIDDEN_SIZE

if TYPE_CHECKING:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

IMAGE_SIZE = 32
IMAGE_CHANNELS = 1
#: Text tokens fed to the transformer (every caption and evaluation prompt has at most 14).
MAX_SEQUENCE_LENGTH = 16

#: Scheduler of teacher and student: FLUX.1-schnell's (no shift, no dynamic shifting).
SCHEDULE: dict[str, Any] = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


@dataclass(frozen=True)
class FlowShape:
    """Transformer shape; ``axes_dims_rope`` (text index, row, column) must sum to ``attention_head_dim``."""

    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_layers: int = 2  # double-stream (MMDiT) blocks
    num_single_layers: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 14, 14)
    patch_size: int = 2  # pixel_unshuffle before FLUX packing

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to {self.attention_head_dim}")


SHAPES: dict[str, FlowShape] = {
    # 1.88 M parameters, ~1.3 s per batch-64 training step on one CPU thread (measured, see MODEL_CARD.md)
    "default": FlowShape(),
    # for tests and smoke runs only
    "tiny": FlowShape(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
                      axes_dims_rope=(4, 6, 6)),
}


def token_channels(patch_size: int) -> int:
    """Channels of one packed token: (C * p * p) latent channels x the 2x2 FLUX packing."""
    return IMAGE_CHANNELS * patch_size**2 * 4


def make_transformer(shape: FlowShape) -> "FluxTransformer2DModel":
    """A randomly initialised denoiser, its AdaLN modulations and output projection zero-initialised.

    Zero-initialising the modulations and ``proj_out`` (adaLN-Zero, as DiT) makes every block
    start as the identity and the first prediction 0; the class and config are plain FLUX.
    """
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=token_channels(shape.patch_size),
        num_layers=shape.num_layers,
        num_single_layers=shape.num_single_layers,
        attention_head_dim=shape.attention_head_dim,
        num_attention_heads=shape.num_attention_heads,
        joint_attention_dim=HIDDEN_SIZE,
        pooled_projection_dim=HIDDEN_SIZE,
        guidance_embeds=False,  # as FLUX.1-schnell: the student has its guidance distilled in
        axes_dims_rope=tuple(shape.axes_dims_rope),
    )
    with torch.no_grad():
        modulations = [b.norm1.linear for b in model.transformer_blocks]
        modulations += [b.norm1_context.linear for b in model.transformer_blocks]
        modulations += [b.norm.linear for b in model.single_transformer_blocks]
        for layer in [*modulations, model.norm_out.linear, model.proj_out]:
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def transformer_record(model: "torch.nn.Module") -> dict[str, Any]:
    """``{"transformer_config": ...}``: the model's diffusers config, for a checkpoint's ``state.json``."""
    return {"transformer_config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")}}


def transformer_from_record(config: dict[str, Any]) -> "FluxTransformer2DModel":
    """A transformer (random weights) with the config :func:`transformer_record` wrote."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_config(config["transformer_config"])


def make_scheduler() -> "FlowMatchEulerDiscreteScheduler":
    """FlowMatchEuler as FLUX.1-schnell (teacher and student)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULE)


def inference_sigmas(num_inference_steps: int) -> "Any":
    """FluxPipeline's sigmas: ``linspace(1, 1/n, n)`` (the scheduler appends the final 0)."""
    import numpy as np

    return np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)


def pack(latents: "torch.Tensor") -> "torch.Tensor":
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] tokens, the layout of ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
    """Inverse of :func:`pack` for a ``height`` x ``width`` latent (``FluxPipeline._unpack_latents``)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, *, device: Any = None, dtype: Any = None) -> "torch.Tensor":
    """Rotary position ids [H/2 * W/2, 3] of the packed tokens: (0, row, column), as FluxPipeline."""
    import torch

    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def text_ids(length: int, *, device: Any = None, dtype: Any = None) -> "torch.Tensor":
    """Rotary position ids of the text tokens: all zeros, as FluxPipeline."""
    import torch

    return torch.zeros(length, 3, device=device, dtype=dtype)


def pooled_text(states: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """Masked mean of the token states [B, L, D] -> [B, D]: the ``pooled_projections`` input."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


def velocity(
    model: "torch.nn.Module", tokens: "torch.Tensor", sigma: "torch.Tensor", states: "torch.Tensor",
    pooled: "torch.Tensor", *, height: int, width: int,
) -> "torch.Tensor":
    """The transformer's velocity for packed ``tokens`` of a ``height`` x ``width`` latent at noise level ``sigma`` [B]."""
    device, dtype = tokens.device, tokens.dtype
    return model(
        hidden_states=tokens, encoder_hidden_states=states, pooled_projections=pooled, timestep=sigma,
        img_ids=image_ids(height, width, device=device, dtype=dtype),
        txt_ids=text_ids(states.shape[1], device=device, dtype=dtype), return_dict=False,
    )[0]
