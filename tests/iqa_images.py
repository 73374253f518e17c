"""Deterministic test pictures for the BRISQUE / NIQE golden values (numpy, scipy, scikit-image only).

Shared by tests/test_score_brisque.py, tests/test_score_niqe.py and the reference script
benchmarks/iqa_reference.py, which runs in a separate venv with the reference packages.
A picture is named by a spec: a scikit-image photo, optionally reduced by block means,
then degradations, e.g. ``"astronaut/4+blur2"``, ``"chelsea/2+crop97x131"``, ``"coffee+jpeg10"``.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import skimage.data
from scipy import ndimage

PHOTOS = ("astronaut", "camera", "chelsea", "coffee")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def picture(spec: str) -> np.ndarray:
    """uint8 [H, W, C] (C = 1 for the grey ``camera``) of a spec such as ``"astronaut/4+noise10"``."""
    head, *steps = spec.split("+")
    name, _, factor = head.partition("/")
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {PHOTOS}")
    image = getattr(skimage.data, name)()
    image = image[..., None] if image.ndim == 2 else image
    if factor:
        f = int(factor)
        h, w, c = image.shape
        blocks = image[: h - h % f, : w - w % f].astype(np.float64).reshape(h // f, f, w // f, f, c)
        image = _to_uint8(blocks.mean(axis=(1, 3)))
    for step in steps:
        if step.startswith("blur"):
            s = float(step[4:])
            image = _to_uint8(ndimage.gaussian_filter(image.astype(np.float64), sigma=(s, s, 0)))
        elif step.startswith("noise"):
            noise = np.random.default_rng(0).normal(0.0, float(step[5:]), image.shape)
            image = _to_uint8(image + noise)
        elif step.startswith("jpeg"):
            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                buffer, format="JPEG", quality=int(step[4:]))
            image = np.asarray(Image.open(buffer))
            image = image[..., None] if image.ndim == 2 else image
        elif step.startswith("crop"):
            h, w = (int(v) for v in step[4:].split("x"))
            image = np.ascontiguousarray(image[:h, :w])
        else:
            raise ValueError(f"unknown step {step!r} in {spec!r}")
    return image


def checksum(image: np.ndarray) -> int:
    """CRC-32 of the pixels: the golden tables record it, so a changed input is told from a changed score."""
    return zlib.crc32(np.ascontiguousarray(image).tobytes())


def as_tensor(image: np.ndarray):
    """uint8 [H, W, C] -> float [1, C, H, W] in [0, 1], what a scorer takes (torch imported here: the
    reference script's venv has none)."""
    import torch

    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


def negated_scores(scorer, golden: dict) -> dict[str, float]:
    """The lower-is-better value (a ``brisque``/``niqe`` score negated back) of each golden picture.

    ``golden`` maps a spec to (CRC-32 of the picture, reference value); a picture whose checksum
    changed fails, since its reference value would no longer apply.
    """
    out = {}
    for spec, (crc, _) in golden.items():
        image = picture(spec)
        assert checksum(image) == crc, f"{spec}: the test picture changed (scikit-image / scipy / numpy?)"
        out[spec] = -float(scorer(as_tensor(image), [""])[0])
    return out

