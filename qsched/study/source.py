"""The images a study shows: read from a ``qsched evaluate`` output folder, never written.

An evaluation folder holds ``evaluation.json`` (the configurations, in order) and, per
configuration, ``images/<config>/00000.png`` with its record ``00000.json`` (prompt,
seed, per-image seed). Image ``i`` of every configuration shares prompt and noise, so
a pair of configurations at one index is a fair comparison. Here that is checked, not
assumed: an index whose prompt or seed differs between configurations is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qsched.errors import QSchedError

MANIFEST = "evaluation.json"  # same name as qsched.evaluate.generation.MANIFEST (not imported: that pulls torch)


@dataclass(frozen=True)
class StudyImage:
    """One image of the evaluation: its configuration, prompt index, prompt, seed and file."""

    config: str
    index: int
    prompt: str
    seed: int
    path: Path


@dataclass(frozen=True)
class StudySource:
    """The configurations and prompts of an evaluation folder, and where each image lies."""

    root: Path
    configs: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    images: dict[tuple[str, int], StudyImage]

    def image(self, config: str, index: int) -> StudyImage:
        return self.images[(config, index)]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QSchedError(f"cannot read {path} ({err}); is this a complete `qsched evaluate` folder?") from None


def load_source(root: str | Path) -> StudySource:
    """Read an evaluation folder; every configuration must have every image, with equal prompts and seeds."""
    root = Path(root).resolve()
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise QSchedError(f"{root} has no {MANIFEST}; pass the --out folder of a `qsched evaluate` run")
    data = _read_json(manifest)
    try:
        configs = tuple(str(c["name"]) for c in data["configs"])  # type: ignore[index]
        count = int(data["spec"]["num_images"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise QSchedError(f"{manifest} is not a qsched evaluation manifest (no configs / spec.num_images)") from None
    if len(configs) < 2:
        raise QSchedError(f"{root} has {len(configs)} configuration(s); a study compares at least two")
    images: dict[tuple[str, int], StudyImage] = {}
    prompts: list[str] = []
    seeds: list[int] = []
    for index in range(count):
        for config in configs:
            png = root / "images" / config / f"{index:05d}.png"
            record = _read_json(png.with_suffix(".json"))
            if not png.is_file() or not isinstance(record, dict):
                raise QSchedError(f"{png} or its record is missing; finish the evaluation first (rerun `qsched evaluate`)")
            prompt, seed = str(record.get("prompt")), int(record.get("image_seed", record.get("seed", -1)))
            if config == configs[0]:
                prompts.append(prompt)
                seeds.append(seed)
            elif (prompt, seed) != (prompts[index], seeds[index]):
                raise QSchedError(f"image {index} of {config!r} has another prompt or seed than of {configs[0]!r}; "
                                  "a study needs the same prompt and noise on both sides")
            images[(config, index)] = StudyImage(config, index, prompt, seed, png)
    return StudySource(root, configs, tuple(prompts), tuple(seeds), images)
