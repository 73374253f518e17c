"""Sampling with per-image noise: image ``i`` depends only on ``(seed, i)``.

Every image gets its own ``torch.Generator`` seeded from ``(seed, i)`` and
diffusers pipelines draw each image's initial noise (and any per-step noise of
ancestral samplers) from its own generator. So an image does not change with
the batch size, the order of batches or the number of processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qsched.errors import QSchedError
from qsched.outdir import prepare_output_dir
from qsched.prepare import PreparedPipeline
from qsched.provenance import package_versions, write_json_atomic

IMAGE_PATTERN = "{index:05d}.png"


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run with ``seed`` (independent streams via SeedSequence)."""
    if seed < 0 or index < 0:
        raise QSchedError(f"seed and image index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def image_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded generator per image index."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]


def sample(
    prepared: PreparedPipeline,
    prompts: Sequence[str],
    indices: Sequence[int],
    *,
    seed: int,
    output_type: str = "pil",
) -> Any:
    """Run the pipeline once on ``prompts`` (one image each) with the noise of ``indices``."""
    if len(prompts) != len(indices):
        raise QSchedError(f"{len(prompts)} prompts but {len(indices)} image indices")
    pipe = prepared.pipe
    extra = dict(prepared.loaded.family.call_overrides)
    extra.update({k: v for k, v in (("height", prepared.height), ("width", prepared.width)) if v is not None})
    result = pipe(
        prompt=list(prompts),
        num_inference_steps=prepared.steps,
        guidance_scale=prepared.guidance_scale,
        generator=image_generators(seed, indices, pipe.device),
        output_type=output_type,
        **extra,
    )
    return result.images


def batches(count: int, batch_size: int, *, start: int = 0) -> Iterator[range]:
    """Consecutive index ranges of at most ``batch_size`` covering ``start .. count-1``."""
    if batch_size < 1:
        raise QSchedError(f"batch size must be a positive integer, got {batch_size}")
    for first in range(start, count, batch_size):
        yield range(first, min(first + batch_size, count))


def generate_to_folder(
    prepared: PreparedPipeline,
    prompts: Sequence[str],
    *,
    out: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 4,
    overwrite: bool = False,
    card_path: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write ``out/00000.png, ...``, ``out/metadata.json`` (one record per image) and ``out/run.json``.

    Metadata is rewritten after every batch, so a crash loses at most the batch
    in flight.
    """
    if not prompts:
        raise QSchedError("no prompts given; pass prompts as arguments or with --prompts FILE")
    list(batches(0, batch_size))  # validate before touching the disk
    out = prepare_output_dir(out, overwrite=overwrite, owned=("*.png", "metadata.json", "run.json"))
    run = _run_record(prepared, len(prompts), seed, batch_size, card_path)
    write_json_atomic(out / "run.json", run)
    records: list[dict[str, Any]] = []
    sampling, calls = 0.0, 0
    with tqdm(total=len(prompts), desc="generate", unit="img", disable=not progress) as bar:
        for chunk in batches(len(prompts), batch_size):
            start = time.perf_counter()
            images = sample(prepared, [prompts[i] for i in chunk], chunk, seed=seed)
            sampling += time.perf_counter() - start
            calls += 1
            for index, image in zip(chunk, images):
                name = IMAGE_PATTERN.format(index=index)
                _save_png(image, out / name)
                records.append(_record(prepared, name, index, prompts[index], seed, card_path))
            write_json_atomic(out / "metadata.json", records)
            bar.update(len(chunk))
    # seconds per sampling step of one batch (pipeline call / steps), text encoding and decoding included
    run["timing"] = {"sampling_s": sampling, "pipeline_calls": calls, "per_step_s": sampling / (calls * prepared.steps)}
    write_json_atomic(out / "run.json", run)
    return records


def _record(prepared: PreparedPipeline, name: str, index: int, prompt: str, seed: int, card_path: str | None) -> dict[str, Any]:
    return {
        "file": name,
        "index": index,
        "prompt": prompt,
        "seed": seed,
        "image_seed": image_seed(seed, index),
        "steps": prepared.steps,
        "guidance_scale": prepared.guidance_scale,
        "quant": prepared.recipe.name,
        "card": card_path,
    }


def _run_record(prepared: PreparedPipeline, count: int, seed: int, batch_size: int, card_path: str | None) -> dict[str, Any]:
    return {
        "command": "generate",
        "model": prepared.loaded.source,
        "family": prepared.family,
        "images": count,
        "seed": seed,
        "batch_size": batch_size,
        "steps": prepared.steps,
        "guidance_scale": prepared.guidance_scale,
        "height": prepared.height,
        "width": prepared.width,
        "quant": prepared.recipe.to_dict(),
        "quant_report": prepared.report.to_dict(),
        "module_reports": {name: report.to_dict() for name, report in prepared.module_reports.items()},
        "card": card_path,
        "versions": package_versions(),
    }


def _save_png(image: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
