"""Human-preference reward models as alignment scorers: ``pickscore`` and ``hpsv2``.

Both are CLIP ViT-H-14 models fine-tuned on human choices between generated images
of one prompt; a higher score is an image people would rather pick. Their weights
are large and come from the Hugging Face hub, which qsched never contacts: each
factory loads them from a local file or folder and names what is missing.

``pickscore`` (Kirstain et al. 2023, Pick-a-Pic): a CLIP in transformers format.
Score = ``logit_scale.exp() * cos(image, prompt)``, the official inference snippet's
``model.logit_scale.exp() * (text_embs @ image_embs.T)`` for one image per prompt;
about 20–23 for good matches (``logit_scale.exp()`` is about 100).

``hpsv2`` (Wu et al. 2023, Human Preference Score v2 / v2.1): an open_clip ViT-H-14
whose whole state dict is the checkpoint ``HPS_v2_compressed.pt`` or
``HPS_v2.1_compressed.pt``. Score = ``cos(image, prompt)`` (the hpsv2 package's
``diagonal(image_features @ text_features.T)`` of normalised features, no logit
scale): about 0.2–0.3. Images are prepared as the hpsv2 package does (its
``preprocess_val``): the longer side resized to the model's input size (bicubic,
PIL), the shorter side padded with black to a square, then open_clip's mean/std.
That is done here with PIL and torch, so torchvision is not needed beyond what
open_clip itself imports.

Text features are computed once per distinct prompt and cached: calibration scores
the same prompts for every candidate.
"""

from __future__ import annotations

import os
from pathlib import Path
from pickle import UnpicklingError  # the error torch.load(weights_only=True) raises; nothing is unpickled
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qsched.errors import QSchedError
from qsched.score.clip import (
    ClipScore,
    as_uint8,
    batched_image_features,
    cached_text_features,
    load_clip,
    paired_prompts,
)

__all__ = ["HPSv2", "PickScore", "hpsv2_factory", "hps_pixels", "pickscore_factory"]

PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_HUB_ID = "xswu/HPSv2"
HPSV2_CHECKPOINTS = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")


class PickScore(ClipScore):
    """PickScore per image: ``logit_scale.exp() * cos(image, prompt)``; text features cached per prompt.

    Images take :class:`ClipScore`'s path (uint8 into the processor). Text is tokenised as
    the official snippet does: padded, truncated to the text model's length (end token kept).
    """

    def __init__(self, model: Any, processor: Any, *, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        super().__init__(model, processor, device=device, batch_size=batch_size)
        clip = getattr(model, "clip", model)
        self.scale = float(clip.logit_scale.detach().exp())

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        limit = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None) or 77
        processed = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True, max_length=limit)
        return self.model.get_text_features(processed["input_ids"].to(self.device), processed["attention_mask"].to(self.device))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = paired_prompts(images, prompts)
        return self.scale * (self.image_features(images) * self.text_features(prompts)).sum(-1)


def pickscore_factory(
    path: str | None = None, *, processor_path: str | None = None, device: str = "cpu", batch_size: int = 32
) -> PickScore:
    """The ``pickscore`` scorer: ``path`` the PickScore weights (a local folder, or a hub id in the
    local cache), ``processor_path`` its processor (default: ``path``; officially
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    get = (f"qsched never downloads; get them with `huggingface-cli download {PICKSCORE_HUB_ID}` "
           "on a machine with internet")
    if path is None:
        raise QSchedError(
            "scorer 'pickscore' needs the PickScore weights in a local folder (transformers format): "
            f"pass path=/models/PickScore_v1 ({get})"
        )
    try:
        model, processor = load_clip(path, processor_path=processor_path, device=device, what="PickScore")
    except QSchedError as err:
        no_processor = (processor_path is None and Path(path).expanduser().is_dir()
                        and str(err).startswith("cannot load a PickScore processor"))
        hint = f"; pass processor_path= a local copy of {PICKSCORE_PROCESSOR_HUB_ID}" if no_processor else ""
        raise QSchedError(f"scorer 'pickscore': {err}{hint} ({get})") from None
    return PickScore(model, processor, device=device, batch_size=batch_size)


def hps_pixels(
    images: torch.Tensor, *, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[N, 1|3, H, W] in [0, 1] -> normalised [N, 3, size, size] as hpsv2's ``preprocess_val``.

    uint8 (what a PNG holds), longer side resized to ``size`` (PIL bicubic), centred
    on a black square (pad before normalisation), ``(x - mean) / std``.
    """
    from PIL import Image

    x = as_uint8(images)
    out = torch.zeros(x.shape[0], 3, size, size)
    for i, image in enumerate(x):
        height, width = image.shape[1:]
        scale = size / max(height, width)
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        new_h, new_w = height, width
        if scale != 1.0:
            new_h, new_w = round(height * scale), round(width * scale)
            pil = pil.resize((new_w, new_h), Image.BICUBIC)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        out[i, :, top : top + new_h, left : left + new_w] = pixels
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return (out - mean_t) / std_t


class HPSv2:
    """HPSv2 per image: ``cos(image, prompt)`` of an open_clip model; text features cached per prompt."""

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features [len(prompts), D], computed once per distinct prompt."""
        return cached_text_features(
            self._text, prompts, lambda missing: self.model.encode_text(self.tokenizer(missing).to(self.device))
        )

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [N, D] of images in [0, 1]."""
        return batched_image_features(images, self.batch_size, lambda chunk: self.model.encode_image(
            hps_pixels(chunk, size=self.size, mean=self.mean, std=self.std).to(self.device)))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = paired_prompts(images, prompts)
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


def _hps_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The state dict in an HPSv2 checkpoint (under ``state_dict``, or the file itself), tensors only."""
    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, UnpicklingError) as err:  # weights_only refuses objects
        raise QSchedError(f"cannot read the HPSv2 checkpoint {checkpoint} (a torch file of tensors): {err}") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QSchedError(f"HPSv2 checkpoint {checkpoint} holds no state dict (expected tensors under 'state_dict')")
    return state


def hpsv2_factory(
    checkpoint: str | os.PathLike | None = None, *, model_name: str = "ViT-H-14", device: str = "cpu", batch_size: int = 32
) -> HPSv2:
    """The ``hpsv2`` scorer: ``checkpoint`` the HPSv2 file (``HPS_v2.1_compressed.pt`` or
    ``HPS_v2_compressed.pt``), ``model_name`` the open_clip architecture it fits."""
    get = (f"qsched never downloads; get it with `huggingface-cli download {HPSV2_HUB_ID} {HPSV2_CHECKPOINTS[0]}` "
           "on a machine with internet")
    if checkpoint is None:
        raise QSchedError(
            f"scorer 'hpsv2' needs an HPSv2 checkpoint file: pass checkpoint=/models/{HPSV2_CHECKPOINTS[0]} ({get})"
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise QSchedError(f"scorer 'hpsv2': checkpoint {path} does not exist ({get})")
    try:
        import open_clip
    except ImportError:
        raise QSchedError(
            "scorer 'hpsv2' needs open_clip: pip install open-clip-torch (install the torchvision that matches "
            "your torch first, or pip pulls another torch)"
        ) from None
    state = _hps_state_dict(path)
    try:
        model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
    except (RuntimeError, ValueError) as err:
        raise QSchedError(f"scorer 'hpsv2': open_clip has no model {model_name!r}: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise QSchedError(f"scorer 'hpsv2': checkpoint {path} does not fit open_clip {model_name}: {first}") from None
    model = model.to(device=device, dtype=torch.float32).eval()
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise QSchedError(
                f"scorer 'hpsv2': open_clip {model_name} takes {tuple(size)} images; only square inputs are supported"
            )
        size = size[0]
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return HPSv2(model, open_clip.get_tokenizer(model_name), size=int(size), mean=mean, std=std,
                 device=device, batch_size=batch_size)
