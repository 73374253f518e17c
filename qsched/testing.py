"""Tiny random pipelines of every supported family, built offline.

Tests and demos cannot download real models here, so they build pipelines of the
*same classes* as the real ones (same ``from_pretrained`` / ``save_pretrained``
code path), with random weights small enough to save in well under 2 MB and run
a 2-step 32x32 call in a fraction of a second on CPU:

    >>> from qsched.testing import TINY_CALL_KWARGS, build_tiny_pipeline, save_tiny_pipeline
    >>> pipe = build_tiny_pipeline("lcm")
    >>> image = pipe("a cat", num_inference_steps=2, **TINY_CALL_KWARGS).images[0]
    >>> folder = save_tiny_pipeline("flux-schnell", "/tmp/tiny-flux")

Tokenizers are built from locally written vocabularies: CLIP from the 256
byte-level characters (plain and with ``</w>``) plus its two special tokens and
a merges file holding only its version line; T5 from an in-memory unigram vocab.
The weights depend only on ``seed``; the global torch RNG is left untouched.

A reloaded pipeline matches the freshly built one to ~1e-6, not bit for bit:
weights loaded from safetensors are not 64-byte aligned, and the CPU matmul
kernels sum in another order for them. Two loads of one folder are bit-identical.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsched.errors import QSchedError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "TINY_CALL_KWARGS",
    "TINY_FAMILIES",
    "TINY_IMAGE_SIZE",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
]

#: Image side length (pixels) every tiny pipeline is meant to be called with.
TINY_IMAGE_SIZE = 32

#: Keyword arguments for a fast call of any tiny pipeline (FluxPipeline's default
#: size is 128 latent pixels whatever the model, so the size is always passed).
TINY_CALL_KWARGS: dict[str, Any] = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}

_CLIP_MAX_LENGTH = 16
_T5_MAX_LENGTH = 32
_HIDDEN = 32  # width of every tiny text encoder


def _clip_byte_characters() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE maps the bytes to."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = [chr(b) for b in keep]
    extra = 0
    for b in range(256):
        if b not in keep:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_tokenizer() -> Any:
    """A CLIPTokenizer loaded from a vocab.json / merges.txt written to a temp folder."""
    from transformers import CLIPTokenizer

    chars = _clip_byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    with tempfile.TemporaryDirectory(prefix="qsched-tiny-clip-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": _CLIP_MAX_LENGTH}), encoding="utf-8"
        )
        return CLIPTokenizer.from_pretrained(folder)


def _t5_tokenizer() -> Any:
    """A T5 tokenizer from an in-memory unigram vocab (specials, then single characters)."""
    from transformers import T5Tokenizer

    pieces = ["▁"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits)
    pieces += list(string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def _clip_text_config(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": _HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": _CLIP_MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**(kwargs | overrides))


def _vae(*, latent_channels: int = 4, **overrides: Any) -> Any:
    """A 2-level AutoencoderKL: downsamples by 2, so 32x32 images give 16x16 latents."""
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (4, 8),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 2,
        "sample_size": TINY_IMAGE_SIZE,
    }
    return AutoencoderKL(**(kwargs | overrides))


def _sd_unet(**overrides: Any) -> Any:
    from diffusers import UNet2DConditionModel

    kwargs: dict[str, Any] = {
        "sample_size": TINY_IMAGE_SIZE // 2,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "cross_attention_dim": _HIDDEN,
        "attention_head_dim": 4,
    }
    kwargs.update(overrides)
    return UNet2DConditionModel(**kwargs)


def _sd_scheduler_config() -> dict[str, Any]:
    """The noise schedule of SD 1.5 / SDXL (what their hub scheduler configs hold)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
    }


def _build_lcm() -> DiffusionPipeline:
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    return LatentConsistencyModelPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=_sd_unet(time_cond_proj_dim=_HIDDEN),
        scheduler=LCMScheduler(**_sd_scheduler_config(), clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_pcm_sd15() -> DiffusionPipeline:
    from diffusers import StableDiffusionPipeline, TCDScheduler
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=_sd_unet(),
        scheduler=TCDScheduler(**_sd_scheduler_config(), timestep_spacing="trailing"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(scheduler: Any) -> DiffusionPipeline:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    time_embed_dim = 8
    unet = _sd_unet(
        cross_attention_dim=2 * _HIDDEN,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 micro-conditioning numbers (sizes, crop, target) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + _HIDDEN,
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(force_upcast=False),
        text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(
            _clip_text_config(tokenizer_2, projection_dim=_HIDDEN)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _build_sdxl_turbo() -> DiffusionPipeline:
    from diffusers import EulerAncestralDiscreteScheduler

    return _build_sdxl(
        EulerAncestralDiscreteScheduler(**_sd_scheduler_config(), timestep_spacing="trailing")
    )


def _build_pcm_sdxl() -> DiffusionPipeline:
    from diffusers import TCDScheduler

    return _build_sdxl(TCDScheduler(**_sd_scheduler_config(), timestep_spacing="trailing"))


def _build_flux_schnell() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    latent_channels = 16
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=_HIDDEN,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latents are packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_HIDDEN,
        pooled_projection_dim=_HIDDEN,
        guidance_embeds=False,  # schnell is timestep-distilled, not guidance-distilled
        axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=_vae(latent_channels=latent_channels, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "lcm": _build_lcm,
    "pcm-sd15": _build_pcm_sd15,
    "sdxl-turbo": _build_sdxl_turbo,
    "pcm-sdxl": _build_pcm_sdxl,
    "flux-schnell": _build_flux_schnell,
}

#: Families :func:`build_tiny_pipeline` can build.
TINY_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def build_tiny_pipeline(family: str, *, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random float32 pipeline of ``family``'s real classes, on CPU.

    The same ``seed`` gives the same weights; the global RNG state is restored.
    """
    import torch

    builder = _BUILDERS.get(family)
    if builder is None:
        raise QSchedError(
            f"no tiny pipeline for family {family!r}; known: {', '.join(TINY_FAMILIES)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builder()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them (T5 has dropout)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, path: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny ``family`` pipeline and ``save_pretrained`` it to ``path``; return the folder."""
    folder = Path(path)
    build_tiny_pipeline(family, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder
