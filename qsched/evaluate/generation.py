"""Images of each configuration: ``DIR/images/<config>/00000.png`` plus ``00000.json``, resumable.

Each image has a sidecar record (prompt, seed, per-image seed, configuration and
what its correction came from). On a rerun an image whose PNG exists and whose
record matches is kept; every other one is (re)generated. The folder's
``evaluation.json`` pins what all images depend on (model, prompts, seed, steps, ...):
a folder made by a different evaluation is refused, naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from qsched.errors import QSchedError
from qsched.evaluate.configs import EvalConfig
from qsched.evaluate.parallel import Workers
from qsched.generate import batches, image_seed, sample
from qsched.outdir import check_output_path
from qsched.prepare import PreparedPipeline
from qsched.provenance import write_json_atomic

MANIFEST = "evaluation.json"
IMAGE_PATTERN = "{index:05d}.png"


@dataclass(frozen=True)
class EvalSpec:
    """What every image of an evaluation depends on, besides its configuration."""

    model: str
    family: str
    steps: int
    guidance_scale: float
    height: int | None
    width: int | None
    seed: int
    num_images: int
    prompts_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompts_digest(prompts: Sequence[str]) -> str:
    """SHA-256 of the prompt list (order matters: prompt i goes with noise i)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def check_manifest(out: Path, spec: EvalSpec) -> None:
    """Refuse ``out`` if it holds another evaluation, naming what differs; a new folder passes."""
    check_output_path(out)
    path = out / MANIFEST
    if not path.is_file():
        if out.is_dir() and (out / "images").exists():
            raise QSchedError(f"{out} holds images but no {MANIFEST}; it is not a qsched evaluation folder, choose another --out")
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["spec"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise QSchedError(f"{path} is unreadable ({err}); choose another --out") from None
    labels = {"model": "model", "family": "family", "steps": "steps", "guidance_scale": "guidance scale",
              "height": "height", "width": "width", "seed": "seed", "num_images": "number of images (--num)",
              "prompts_sha256": "prompts"}
    differences = [f"{labels.get(k, k)} {stored.get(k)!r} there vs {v!r} now"
                   for k, v in spec.to_dict().items() if stored.get(k) != v]
    if differences:
        raise QSchedError(
            f"output folder {out} holds a different evaluation ({'; '.join(differences)}); "
            "refusing to mix results: use another --out or the same settings"
        )


def write_manifest(out: Path, spec: EvalSpec, configs: Sequence[EvalConfig]) -> None:
    write_json_atomic(out / MANIFEST, {"format": "qsched-evaluation", "version": 1, "spec": spec.to_dict(),
                                       "configs": [c.identity() for c in configs]})


def config_folder(out: Path, config: EvalConfig) -> Path:
    return out / "images" / config.name


def image_record(config: EvalConfig, index: int, prompt: str, seed: int, correction: dict[str, Any] | None) -> dict[str, Any]:
    """The sidecar record of image ``index`` (compared on resume)."""
    return {
        "file": IMAGE_PATTERN.format(index=index), "index": index, "prompt": prompt, "seed": seed,
        "image_seed": image_seed(seed, index), "config": config.identity(), "correction": correction,
    }


def missing_indices(folder: Path, config: EvalConfig, prompts: Sequence[str], *, seed: int,
                    correction: dict[str, Any] | None) -> list[int]:
    """Indices whose PNG is absent or whose record differs from what would be written now."""
    missing = []
    for index, prompt in enumerate(prompts):
        png = folder / IMAGE_PATTERN.format(index=index)
        try:
            stored = json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if not png.is_file() or stored != image_record(config, index, prompt, seed, correction):
            missing.append(index)
    return missing


def generate_images(
    prepared: PreparedPipeline,
    config: EvalConfig,
    prompts: Sequence[str],
    indices: Sequence[int],
    *,
    folder: Path,
    seed: int,
    batch_size: int,
    correction: dict[str, Any] | None,
    progress: bool = True,
) -> int:
    """Generate images ``indices`` of ``config`` into ``folder`` (PNG, then its record); returns the count."""
    folder.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    with tqdm(total=len(indices), desc=f"generate {config.name}", unit="img", disable=not progress) as bar:
        for chunk in batches(len(indices), batch_size):
            chosen = [indices[j] for j in chunk]
            images = sample(prepared, [prompts[i] for i in chosen], chosen, seed=seed)
            for index, image in zip(chosen, images):
                png = folder / IMAGE_PATTERN.format(index=index)
                png.with_suffix(".json").unlink(missing_ok=True)  # a PNG without its record is never trusted
                tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, png)
                write_json_atomic(png.with_suffix(".json"), image_record(config, index, prompts[index], seed, correction))
            bar.update(len(chosen))
    return len(indices)


def collect_metadata(folder: Path, count: int) -> list[dict[str, Any]]:
    """All sidecar records of a configuration, written as ``metadata.json`` by the main process."""
    records = [json.loads((folder / IMAGE_PATTERN.format(index=i)).with_suffix(".json").read_text(encoding="utf-8"))
               for i in range(count)]
    write_json_atomic(folder / "metadata.json", records)
    return records


def load_images(folder: Path, indices: Sequence[int]) -> torch.Tensor:
    """PNG images ``indices`` of ``folder`` as uint8 ``[N, C, H, W]`` (C = 1 or 3)."""
    return load_image_files([folder / IMAGE_PATTERN.format(index=i) for i in indices])


def shard_work(workers: Workers, missing: Sequence[int]) -> list[int]:
    """This process's share of the images still to make."""
    return workers.share(list(missing))


def load_image_files(files: Sequence[Path]) -> torch.Tensor:
    """Image files (one size) as uint8 ``[N, C, H, W]``; greyscale stays one channel."""
    if not files:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    arrays = []
    for file in files:
        with Image.open(file) as image:
            array = np.asarray(image.convert("L") if image.mode in ("L", "I", "I;16") else image.convert("RGB"))
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise QSchedError(f"reference images differ in size or channels: {sorted(shapes)[:3]}; resize them to one size")
    return torch.from_numpy(np.stack(arrays)).contiguous()
