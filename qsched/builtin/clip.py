"""The built-in CLIP: a small ``CLIPModel`` for Fashion-MNIST, its offline tokenizer and processor.

The model is saved with ``save_pretrained`` beside a ``CLIPProcessor`` (``CLIPTokenizer`` +
``CLIPImageProcessor``), so ``CLIPModel.from_pretrained(path)`` and
``CLIPProcessor.from_pretrained(path)`` load it like any hub CLIP. The tokenizer is
byte-level BPE built offline: the 256 byte symbols (alone and with ``</w>``), the two special
tokens, and merge chains that make each word of a fixed word list one token; any other text
still tokenizes (into smaller pieces).

torchmetrics ``CLIPScore`` / ``CLIPImageQualityAssessment`` take ``load_builtin_clip`` (or
``functools.partial`` of it) as ``model_name_or_path``. Images go in as ``[N, C, H, W]`` in
[0, 255] (uint8 or float), 1 or 3 channels; for CLIP-IQA pass ``data_range=1.0`` on such images,
because torchmetrics divides by ``data_range`` *before* the processor, which rescales by 1/255.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qsched.errors import QSchedError

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "clip"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: files that make up a saved built-in CLIP folder
REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")

#: antonym prompt pairs (positive first) for CLIP-IQA that the built-in CLIP was trained on.
QUALITY_PROMPTS: dict[str, tuple[str, str]] = {
    "quality": ("a good photo", "a bad photo"),
    "noisiness": ("a clean photo", "a noisy photo"),
    "sharpness": ("a sharp photo", "a blurry photo"),
    "contrast": ("a high contrast photo", "a low contrast photo"),
    "blockiness": ("a smooth photo", "a blocky photo"),
}

#: extra words given single tokens besides the caption and quality vocabulary
_EXTRA_WORDS = (
    "a an the of on in and with photo photos image images picture pictures good bad clean noisy sharp blurry "
    "high low contrast bright dark quality colorful dull complex simple natural synthetic real abstract new old "
    "beautiful ugly black white grey gray shoe shoes clothes clothing fashion item"
)


@dataclass(frozen=True)
class ClipSpec:
    """Shape of the built-in CLIP (a small ViT image tower and a small text transformer)."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 256
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_mlp: int = 256
    projection_dim: int = 128
    max_text_length: int = 32


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE: byte b -> one unicode character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def vocabulary_words() -> list[str]:
    """Words that get a single token: caption words, quality words and a few generic ones."""
    from qsched.builtin import captions
    from qsched.builtin.degrade import CLAIMS

    texts: list[str] = [_EXTRA_WORDS]
    texts += [p for phrases in captions.CLASS_PHRASES for p in phrases]
    texts += list(captions.CLASS_NAMES) + list(captions.TRAIN_TEMPLATES) + list(captions.HELDOUT_TEMPLATES)
    texts += [w for words, _ in CLAIMS.values() for w in words]
    words: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[a-z]+", text.lower()):
            words[word] = None
    return sorted(words)


def build_tokenizer(words: Iterable[str], *, max_length: int = 32) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary is the byte symbols plus one token per word in ``words``."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted(set(words)):
        pieces = [symbols[b] for b in word.encode("utf-8")]
        if len(pieces) < 2:
            continue
        pieces[-1] += "</w>"
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current += piece
            vocab.setdefault(current, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_processor(tokenizer: CLIPTokenizer, *, image_size: int = 32) -> CLIPProcessor:
    """A ``CLIPProcessor``: images resized/cropped to ``image_size``, grey -> RGB, scaled to [-1, 1]."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def new_clip(spec: ClipSpec, tokenizer: CLIPTokenizer, *, seed: int = 0) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` of shape ``spec`` for ``tokenizer``'s vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    eos = tokenizer.convert_tokens_to_ids(EOS)
    bos = tokenizer.convert_tokens_to_ids(BOS)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_width,
            "intermediate_size": spec.text_mlp,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "max_position_embeddings": spec.max_text_length,
            "projection_dim": spec.projection_dim,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "hidden_size": spec.vision_width,
            "intermediate_size": spec.vision_mlp,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "num_channels": 3,
            "projection_dim": spec.projection_dim,
        },
        projection_dim=spec.projection_dim,
        logit_scale_init_value=math.log(100.0),  # the fixed scale CLIPScore / CLIP-IQA use
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.config.qsched_clip_spec = asdict(spec)
    return model.float().eval()


class PooledCLIP(nn.Module):
    """Adapter over a ``CLIPModel`` whose ``get_*_features`` return the projected pooled tensor.

    transformers 5 returns an output object from these methods; torchmetrics expects a tensor.
    Everything else (``config``, ``forward``, ``clip``) is the wrapped model.
    """

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip

    @property
    def config(self) -> Any:
        return self.clip.config

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=pixel_values, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.clip(*args, **kwargs)


def save_clip(model: CLIPModel | PooledCLIP, processor: CLIPProcessor, path: str | Path) -> Path:
    """Write ``model`` (safetensors) and ``processor`` to the folder ``path``."""
    clip = model.clip if isinstance(model, PooledCLIP) else model
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def load_builtin_clip(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[PooledCLIP, CLIPProcessor]:
    """Load the built-in (or any saved) CLIP as ``(PooledCLIP, CLIPProcessor)``, float32, eval mode.

    The pair is what torchmetrics ``CLIPScore`` / ``CLIPImageQualityAssessment`` need from a
    callable ``model_name_or_path``. A missing or corrupt file raises ``QSchedError`` naming it.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path) if path is not None else ASSET_DIR
    if not folder.is_dir():
        raise QSchedError(f"CLIP folder {folder} does not exist; pass the folder written by save_clip / clip_train")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise QSchedError(f"CLIP file missing: {folder / name}; retrain with `python -m qsched.builtin.clip_train` or restore it")
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise QSchedError(f"CLIP config {folder / 'config.json'} is not valid JSON: {exc}") from exc
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise QSchedError(f"CLIP weights {folder / 'model.safetensors'} are corrupt or unreadable: {exc}") from exc
    try:
        clip = CLIPModel.from_pretrained(folder, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise QSchedError(f"cannot load the CLIP in {folder}: {exc}") from exc
    return PooledCLIP(clip).to(device).eval(), processor


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """[N, 1|3, H, W] floats in [0, 1] -> the model's pixel values (what the processor makes from [0, 255])."""
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - 0.5) / 0.5


@torch.no_grad()
def encode_texts(model: PooledCLIP, processor: CLIPProcessor, texts: list[str], *, device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D]."""
    tok = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    feats = model.get_text_features(tok["input_ids"].to(device), tok["attention_mask"].to(device))
    return torch.nn.functional.normalize(feats, dim=-1)


@torch.no_grad()
def encode_images(model: PooledCLIP, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings of [N, 1|3, H, W] images in [0, 1] (already at the model's size)."""
    device = next(model.parameters()).device
    out = [
        model.get_image_features(to_pixel_values(images[i : i + batch_size]).to(device))
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def class_text_embeddings(model: PooledCLIP, processor: CLIPProcessor, *, heldout: bool = True) -> torch.Tensor:
    """One normalised embedding per Fashion-MNIST class: the mean over phrases x templates."""
    from qsched.builtin import captions

    templates = captions.HELDOUT_TEMPLATES if heldout else captions.TRAIN_TEMPLATES
    rows = []
    for phrases in captions.CLASS_PHRASES:
        emb = encode_texts(model, processor, [t.format(p) for p in phrases for t in templates])
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
    return torch.stack(rows)


def iqa_scores(model: PooledCLIP, processor: CLIPProcessor, images: torch.Tensor, prompts: tuple[str, str]) -> torch.Tensor:
    """CLIP-IQA as torchmetrics computes it: softmax over 100 * cos(image, [positive, negative])[0]."""
    anchors = encode_texts(model, processor, list(prompts))
    logits = 100.0 * encode_images(model, images) @ anchors.T
    return logits.softmax(-1)[:, 0]
