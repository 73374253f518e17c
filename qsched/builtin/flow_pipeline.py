"""``QSchedBuiltinFlowPipeline``: the built-in rectified-flow text-to-image pipeline (32x32).

The FLUX.1-schnell-like member of the built-in world (family ``builtin-flow``): components
``transformer`` (a ``FluxTransformer2DModel``), ``scheduler`` (``FlowMatchEulerDiscreteScheduler``),
``text_encoder`` and ``tokenizer`` (the frozen MiniLM, from its pip package when not given,
as in :class:`~qsched.builtin.pipeline.QSchedBuiltinPipeline`). ``__call__`` sets the
scheduler's sigmas the FluxPipeline way (``linspace(1, 1/n, n)``) and drives
``self.scheduler.step`` on the packed tokens, so a Q-Sched scheduler wrapper or a quantized
``transformer`` applies unchanged; with FlowMatchEuler, ``c_x`` scales the sample the Euler
step starts from and ``c_eps`` the predicted velocity.

One class serves both stages, told apart by the config entry ``distilled``:

* the teacher (``distilled=False``) does classifier-free guidance when ``guidance_scale > 1``
  (default ``default_guidance_scale``, 3);
* the consistency-distilled student (``distilled=True``) has guidance ``default_guidance_scale``
  baked into its weights (FLUX.1-schnell has no guidance input either): one transformer call
  per step, and a ``guidance_scale`` other than that value (or None) is refused.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from qsched.builtin.flow import (
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    inference_sigmas,
    pack,
    pooled_text,
    unpack,
    velocity,
)
from qsched.builtin.pipeline import (
    DEFAULT_GUIDANCE_SCALE,
    check_call,
    check_callback,
    register_with_text,
    step_end,
    to_images,
)
from qsched.builtin.text import encode_prompts
from qsched.errors import QSchedError


class QSchedBuiltinFlowPipeline(DiffusionPipeline):
    """Text-to-image pipeline of the built-in rectified-flow model (teacher or distilled student)."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: Any,
        scheduler: Any,
        text_encoder: Any = None,
        tokenizer: Any = None,
        patch_size: int = 2,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        distilled: bool = False,
        default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    ):
        super().__init__()
        register_with_text(self, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                           scheduler=scheduler)
        self.register_to_config(
            patch_size=int(patch_size), max_sequence_length=int(max_sequence_length), distilled=bool(distilled),
            default_guidance_scale=float(default_guidance_scale),
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    @property
    def is_distilled(self) -> bool:
        """True for the consistency-distilled student (guidance baked in, no CFG batch)."""
        return bool(self.config.distilled)

    @property
    def latent_size(self) -> int:
        """Side of the patchified image the tokens are packed from (16 for patch size 2)."""
        return IMAGE_SIZE // int(self.config.patch_size)

    def encode_prompt(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, 384] and their masked mean [B, 384] (L = ``max_sequence_length``)."""
        states, mask = encode_prompts(prompts, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                                      device=device, max_length=int(self.config.max_sequence_length))
        dtype = self.transformer.dtype
        return states.to(dtype), pooled_text(states, mask).to(dtype)

    def resolve_guidance(self, guidance_scale: float | None) -> float:
        """The guidance scale a call samples at; the student accepts only its own (or None)."""
        own = float(self.config.default_guidance_scale)
        if guidance_scale is None:
            return own
        if self.is_distilled and float(guidance_scale) != own:
            raise QSchedError(
                f"this distilled student has classifier-free guidance {own:g} baked into its weights and cannot "
                f"sample at guidance_scale={guidance_scale!r}; pass {own:g} or None (or use the teacher)"
            )
        return float(guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate 32x32 images (RGB, the gray channel repeated) for ``prompt``.

        ``guidance_scale``: None is the model's own (``default_guidance_scale``); the teacher
        uses classifier-free guidance when it is > 1. ``generator``: one ``torch.Generator`` or
        a list with one per image. ``latents``: initial noise [B, 4, 16, 16] (2x2-patchified
        pixels, packed into tokens here). ``output_type``: "pil", "np" ([B, 32, 32, 3] in
        [0, 1]), "pt" ([B, 3, 32, 32] in [0, 1]) or "latent" ([B, 4, 16, 16], unpacked).
        ``callback_on_step_end(pipe, i, t, {"latents": ...})``: called after step i with the
        unpacked latents (diffusers' convention); a returned ``"latents"`` replaces the sample.
        """
        prompts = check_call(prompt, num_inference_steps, num_images_per_prompt, generator, output_type)
        callback_inputs = check_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        scale = self.resolve_guidance(guidance_scale)
        batch = len(prompts)
        device = self._execution_device
        dtype = self.transformer.dtype
        use_cfg = not self.is_distilled and scale > 1.0

        states, pooled = self.encode_prompt(prompts, device)
        if use_cfg:
            null_states, null_pooled = self.encode_prompt([""] * batch, device)
            states, pooled = torch.cat([null_states, states]), torch.cat([null_pooled, pooled])

        timesteps, _ = retrieve_timesteps(self.scheduler, device=device, sigmas=inference_sigmas(int(num_inference_steps)))
        size = self.latent_size
        shape = (batch, IMAGE_CHANNELS * int(self.config.patch_size) ** 2, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise QSchedError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        tokens = pack(latents.to(device=device, dtype=dtype))
        scale_t = self.scheduler.config.num_train_timesteps

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([tokens] * 2) if use_cfg else tokens
            sigma = t.expand(model_in.shape[0]).to(dtype) / scale_t  # FluxPipeline: timestep / 1000
            pred = velocity(self.transformer, model_in, sigma, states, pooled, height=size, width=size)
            if use_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + scale * (cond - uncond)
            tokens = self.scheduler.step(pred, t, tokens, return_dict=False)[0]
            if callback_on_step_end is not None:
                tokens = pack(step_end(self, callback_on_step_end, callback_inputs, i, t, unpack(tokens, size, size)))

        images = to_images(unpack(tokens, size, size), int(self.config.patch_size), output_type, self.image_processor)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
