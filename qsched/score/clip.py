"""CLIP-based scorers: ``clip`` (text-image alignment) and ``clipiqa`` (no-reference quality).

Both load a CLIP in transformers format (``CLIPModel`` + ``CLIPProcessor``) from a
local folder, a hub id already in the local cache, or, by default, the built-in
CLIP (``qsched/builtin/assets/clip``). Nothing is downloaded.

``clip`` is torchmetrics' ``CLIPScore`` computed per image,
``100 * max(cos(image, prompt), 0)``, with the text features of each prompt
computed once and cached (calibration scores the same prompts for every
candidate). With ``clamp=False`` it returns ``100 * cos`` unclamped: torchmetrics'
``CLIPScore`` over a *set* sums those and clamps only the mean, which is what the
reference's JAQ (criterion ``new``) takes the log of. ``clipiqa`` is torchmetrics' ``CLIPImageQualityAssessment``: for each
antonym pair, the softmax probability of the positive prompt; with several pairs
the score is their mean. Its text anchors are computed once, when it is built.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from qsched.errors import QSchedError

#: CLIP-IQA pairs used when none are given: overall quality, as in CLIP-IQA's default
#: ``"quality"`` prompt; for the built-in CLIP the pair it was trained on for that claim.
DEFAULT_IQA_PROMPTS: tuple[str, ...] = ("quality",)


def load_clip(
    path: str | os.PathLike | None = None,
    *,
    processor_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    what: str = "CLIP",
) -> tuple[Any, Any]:
    """``(model, processor)`` with ``model.get_*_features`` returning tensors, float32, eval mode.

    ``path`` None is the built-in CLIP. ``processor_path`` (default: ``path``) is where
    the processor lives when the weights come without one (PickScore). ``what`` names
    the model in messages. A missing folder or file raises :class:`QSchedError` naming it.
    """
    from qsched.builtin.clip import ASSET_DIR, PooledCLIP, load_builtin_clip

    if path is None:
        if not ASSET_DIR.is_dir():
            raise QSchedError(
                f"the built-in CLIP weights are missing: {ASSET_DIR} does not exist; train them with "
                "`python -m qsched.builtin.clip_train`, or pass a CLIP folder (clip_path / --clip PATH)"
            )
        return load_builtin_clip(None, device=device)
    from transformers import CLIPModel, CLIPProcessor

    source, kwargs = pretrained_source(path, what=what)
    if processor_path is None:
        processor_source, processor_kwargs = source, kwargs
    else:
        processor_source, processor_kwargs = pretrained_source(processor_path, what=f"{what} processor", required=None)
    processor = _from_pretrained(CLIPProcessor, processor_source, processor_kwargs, f"{what} processor")  # cheap: first
    model = _from_pretrained(CLIPModel, source, kwargs, what, dtype=torch.float32)
    return PooledCLIP(model).to(device).eval(), processor


def pretrained_source(
    path: str | os.PathLike, *, what: str = "CLIP", required: str | None = "config.json"
) -> tuple[str, dict[str, Any]]:
    """``(source, from_pretrained kwargs)`` of a local folder or of a hub id in the local cache.

    A hub id gets ``local_files_only=True``: qsched never downloads. A folder must hold
    ``required`` (None: anything); a path that is neither raises :class:`QSchedError`.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        if required is not None and not (folder / required).is_file():
            raise QSchedError(f"{what} folder {folder} has no {required}; pass a {what} saved in transformers format")
        return str(folder), {}
    if _looks_like_hub_id(str(path)):
        return str(path), {"local_files_only": True}
    raise QSchedError(f"{what} folder {folder} does not exist; pass a {what} saved in transformers format")


def _from_pretrained(cls: Any, source: str, kwargs: dict[str, Any], what: str, **extra: Any) -> Any:
    try:
        return cls.from_pretrained(source, **kwargs, **extra)
    except (OSError, ValueError, RuntimeError) as err:
        hint = " (qsched does not download: it must be a local folder or in the local cache)" if kwargs else ""
        raise QSchedError(f"cannot load a {what} from {source}{hint}: {err}") from None


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 1|3, H, W] in [0, 1] -> uint8 [N, 3, H, W] on CPU, the input every CLIP processor reads right.

    (The PIL-backed processors used without torchvision reject floats above 1 and
    rescale floats in [0, 1] a second time; uint8 is what a saved PNG holds anyway.)
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise QSchedError(f"images must be a tensor [N, 1 or 3, H, W] in [0, 1], got {shape}")
    x = (images.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def cached_text_features(
    cache: dict[str, torch.Tensor], prompts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """L2-normalised text features [len(prompts), D]; ``encode`` runs once on the prompts not yet in ``cache``.

    Calibration scores the same prompts for every candidate, so each is encoded once.
    """
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        features = encode(missing).float()
        features = features / features.norm(p=2, dim=-1, keepdim=True)
        cache.update(zip(missing, features.cpu()))
    return torch.stack([cache[p] for p in prompts])


def batched_image_features(
    images: torch.Tensor, batch_size: int, encode: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """L2-normalised features [N, D] of ``images``, ``encode``d ``batch_size`` at a time."""
    out = [encode(images[i : i + batch_size]).float().cpu() for i in range(0, images.shape[0], batch_size)]
    features = torch.cat(out)
    return features / features.norm(p=2, dim=-1, keepdim=True)


def paired_prompts(images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list, refused unless there is one per image."""
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise QSchedError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return prompts


class ClipScore:
    """Per-image CLIP score ``100 * max(cos(image, prompt), 0)`` (``clamp=False``: ``100 * cos``); text features cached."""

    def __init__(self, model: Any, processor: Any, *, device: str | torch.device = "cpu", batch_size: int = 64,
                 clamp: bool = True) -> None:
        self.model = model
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.clamp = bool(clamp)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features [len(prompts), D], computed once per distinct prompt."""
        return cached_text_features(self._text, prompts, self._encode_text)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        with warnings.catch_warnings():  # truncation is ours, below (as torchmetrics does it)
            warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")
            processed = self.processor(text=prompts, return_tensors="pt", padding=True)
        limit = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None)
        ids, mask = processed["input_ids"], processed["attention_mask"]
        if limit is not None and ids.shape[-1] > limit:  # torchmetrics truncates the same way
            ids, mask = ids[..., :limit], mask[..., :limit]
        return self.model.get_text_features(ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [N, D] of images in [0, 1]."""
        return batched_image_features(as_uint8(images), self.batch_size, self._encode_images)

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixels.to(self.device))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = paired_prompts(images, prompts)
        cosine = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        return 100.0 * (cosine.clamp(min=0.0) if self.clamp else cosine)


def clip_score_factory(
    path: str | None = None, *, device: str = "cpu", batch_size: int = 64, clamp: bool = True
) -> ClipScore:
    """The ``clip`` scorer: ``path`` is a CLIP folder in transformers format (None: the built-in CLIP).

    ``clamp=False`` returns ``100 * cos`` unclamped (for a set's CLIPScore, which clamps the mean).
    """
    if not isinstance(clamp, bool):
        raise QSchedError(f"clip option clamp must be true or false, got {clamp!r}")
    model, processor = load_clip(path, device=device)
    return ClipScore(model, processor, device=device, batch_size=batch_size, clamp=clamp)


def resolve_iqa_prompts(prompts: Iterable[Any] | None, *, builtin: bool) -> tuple[Any, ...]:
    """Prompt pairs for torchmetrics CLIP-IQA.

    Each entry is a name or a ``(positive, negative)`` pair. With the built-in
    CLIP, names of :data:`qsched.builtin.clip.QUALITY_PROMPTS` map to the pairs it
    was trained on; other names go to torchmetrics (``quality``, ``brightness``, ...).
    """
    from qsched.builtin.clip import QUALITY_PROMPTS

    entries = list(DEFAULT_IQA_PROMPTS if prompts is None else prompts)
    if not entries:
        raise QSchedError("clipiqa needs at least one prompt name or (positive, negative) pair")
    resolved: list[Any] = []
    for entry in entries:
        if isinstance(entry, str):
            resolved.append(QUALITY_PROMPTS[entry] if builtin and entry in QUALITY_PROMPTS else entry)
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(s, str) and s for s in entry):
            resolved.append((entry[0], entry[1]))
        else:
            raise QSchedError(f"a clipiqa prompt is a name or a (positive, negative) pair of strings, got {entry!r}")
    return tuple(resolved)


class ClipIQA:
    """CLIP-IQA per image: for each antonym pair, softmax(100 * cos(image, [positive, negative]))[positive].

    The anchors (text features of the pairs) come from torchmetrics'
    ``CLIPImageQualityAssessment``, built once; the formula is torchmetrics'. Images
    go through :class:`ClipScore`'s image path (uint8 into the processor). With
    several pairs the score is their mean.
    """

    def __init__(self, images: ClipScore, anchors: torch.Tensor, prompts: tuple[Any, ...]) -> None:
        self.encoder = images
        self.anchors = anchors.detach().float().cpu()
        self.prompts = prompts

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        features = self.encoder.image_features(images)
        logits = 100.0 * features @ self.anchors.T
        probs = logits.reshape(features.shape[0], -1, 2).softmax(-1)[:, :, 0]
        return probs.mean(-1)


def clip_iqa_factory(
    path: str | None = None, *, prompts: Sequence[Any] | None = None, device: str = "cpu", batch_size: int = 64
) -> ClipIQA:
    """The ``clipiqa`` scorer: ``path`` a CLIP folder (None: built-in), ``prompts`` antonym pairs or names."""
    from torchmetrics.multimodal import CLIPImageQualityAssessment

    resolved = resolve_iqa_prompts(prompts, builtin=path is None)
    model, processor = load_clip(path, device=device)
    try:
        metric = CLIPImageQualityAssessment(model_name_or_path=lambda: (model, processor), data_range=1.0, prompts=resolved)
    except ValueError as err:
        raise QSchedError(f"clipiqa prompts {list(resolved)!r} are not valid: {err}") from None
    encoder = ClipScore(model, processor, device=device, batch_size=batch_size)
    return ClipIQA(encoder, metric.anchors, resolved)
