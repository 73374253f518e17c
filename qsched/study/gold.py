"""Gold-question images: a real image with a defect no attentive annotator misses.

The defect is made from the evaluation's own image (same prompt, content and size), so
the only difference between the sides is the defect: strong pixelation plus heavy
Gaussian noise (:func:`qsched.builtin.degrade.degrade`). It is deterministic (seeded
by the prompt index), so every server process of a study makes the same file. Files are
written into the study's cache folder, never over the evaluation's images.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def defective_png(source: Path, *, seed: int) -> bytes:
    """PNG bytes of ``source`` pixelated into ~16 blocks across and covered in heavy noise."""
    import torch
    import torch.nn.functional as F

    from qsched.builtin.degrade import degrade

    with Image.open(source) as image:
        mode = "L" if image.mode in ("L", "I", "I;16") else "RGB"
        array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    x = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))[None]
    h, w = x.shape[-2:]
    block = max(2, min(h, w) // 16)
    x = F.interpolate(F.avg_pool2d(x, block, ceil_mode=True), scale_factor=block, mode="nearest")[..., :h, :w]
    generator = torch.Generator().manual_seed(seed)
    y = degrade(x, "noise", 1.0, generator=generator)[0]
    out = (y.numpy() * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(out[0] if mode == "L" else out.transpose(1, 2, 0), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def ensure_defect(source: Path, target: Path, *, seed: int) -> Path:
    """Write the defective copy of ``source`` to ``target`` once (atomically); returns ``target``."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(defective_png(source, seed=seed))
        os.replace(tmp, target)
    return target
