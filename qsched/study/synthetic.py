"""A synthetic evaluation folder in ``qsched evaluate``'s layout: for tests, benchmarks and demos.

Each configuration draws the same shape per prompt with its own amount of noise
(configuration k: noise ``0.08 * k``), so there is a visible "better" side. No model runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


def _draw(shape: str, colour: tuple[int, int, int], size: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    r = np.hypot(xx, yy)
    mask = {"circle": r < 0.6, "square": (abs(xx) < 0.5) & (abs(yy) < 0.5),
            "triangle": (yy > -0.5) & (yy < 0.6) & (abs(xx) < (yy + 0.5) * 0.55), "ring": (r < 0.65) & (r > 0.4)}[shape]
    image = np.full((size, size, 3), 245.0)
    image[mask] = colour
    image += rng.normal(0.0, 255.0 * noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_evaluation(root: str | Path, *, configs: Sequence[str] = ("fp", "w4a8", "w4a4"), num: int = 12,
                               size: int = 64, seed: int = 0) -> Path:
    """Write ``evaluation.json`` and ``images/<config>/NNNNN.png|json`` under ``root``; returns ``root``."""
    root = Path(root)
    prompts = [f"a {c} {s}" for c, s in zip(np.resize(list(COLOURS), num), np.resize(SHAPES, num))]
    for k, config in enumerate(configs):
        folder = root / "images" / config
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for index, prompt in enumerate(prompts):
            colour_name, shape = prompt.split()[1:]
            rng = np.random.default_rng([seed, index, k])
            Image.fromarray(_draw(shape, COLOURS[colour_name], size, 0.08 * k, rng)).save(folder / f"{index:05d}.png")
            record = {"file": f"{index:05d}.png", "index": index, "prompt": prompt, "seed": seed,
                      "image_seed": seed * 1_000_003 + index, "config": {"name": config}, "correction": None}
            (folder / f"{index:05d}.json").write_text(json.dumps(record), encoding="utf-8")
            records.append(record)
        (folder / "metadata.json").write_text(json.dumps(records), encoding="utf-8")
    spec = {"model": "synthetic", "family": "synthetic", "steps": 0, "guidance_scale": 0.0, "height": size,
            "width": size, "seed": seed, "num_images": num, "prompts_sha256": ""}
    (root / "evaluation.json").write_text(json.dumps({"format": "qsched-evaluation", "version": 1, "spec": spec,
                                                      "configs": [{"name": c} for c in configs]}), encoding="utf-8")
    return root
