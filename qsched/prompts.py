"""Prompt sets from local files: .txt, .json (list, MJHQ-30K, COCO captions), .yaml (sDCI), .csv.

Every reader returns a list of non-empty prompt strings in file order; an empty
or unreadable file is an error, never an empty list.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable

from qsched.errors import QSchedError
from qsched.provenance import sha256_file


def _from_txt(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _from_json(path: Path) -> list[str]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise QSchedError(f"prompts file {path} is not valid JSON: {err}") from None
    if isinstance(data, list):
        return [_prompt_of(item, path) for item in data]
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        # COCO captions_*.json: {"annotations": [{"image_id": ..., "caption": ...}, ...]}
        return [_field(item, "caption", path) for item in data["annotations"]]
    if isinstance(data, dict):
        # MJHQ-30K meta_data.json: {"<id>": {"category": ..., "prompt": ...}, ...}
        return [_prompt_of(item, path) for item in data.values()]
    raise QSchedError(f"prompts file {path}: expected a JSON list or object, got {type(data).__name__}")


def _from_yaml(path: Path) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise QSchedError(f"prompts file {path} is not valid YAML: {err}") from None
    if isinstance(data, dict):  # sDCI: {"<key>": "<prompt>", ...}
        return [_prompt_of(item, path) for item in data.values()]
    if isinstance(data, list):
        return [_prompt_of(item, path) for item in data]
    raise QSchedError(f"prompts file {path}: expected a YAML mapping or list, got {type(data).__name__}")


def _from_csv(path: Path) -> list[str]:
    rows = csv.DictReader(_read_text(path).splitlines())
    if rows.fieldnames is None or "prompt" not in rows.fieldnames:
        raise QSchedError(f"prompts file {path}: a CSV needs a 'prompt' column, found {rows.fieldnames}")
    return [row["prompt"].strip() for row in rows if (row["prompt"] or "").strip()]


READERS: dict[str, Callable[[Path], list[str]]] = {
    ".txt": _from_txt,
    ".json": _from_json,
    ".yaml": _from_yaml,
    ".yml": _from_yaml,
    ".csv": _from_csv,
}


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read the prompts of a file, chosen by its suffix."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise QSchedError(
            f"prompts file {path}: format {path.suffix or '(no suffix)'!r} is not recognised; "
            f"use one of {', '.join(sorted(READERS))}"
        )
    prompts = [p for p in reader(path) if p]
    if not prompts:
        raise QSchedError(f"prompts file {path} holds no prompts")
    return prompts


def prompt_source(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance of a prompts file for cards and results: path, SHA-256 and prompt count."""
    return {"source": str(path), "sha256": sha256_file(path), "count": len(read_prompts(path))}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QSchedError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise QSchedError(f"cannot read prompts file {path}: {err}") from None


def _field(item: Any, key: str, path: Path) -> str:
    if not isinstance(item, dict) or not isinstance(item.get(key), str):
        raise QSchedError(f"prompts file {path}: expected entries with a {key!r} string, got {item!r:.80}")
    return item[key].strip()


def _prompt_of(item: Any, path: Path) -> str:
    if isinstance(item, str):
        return item.strip()
    return _field(item, "prompt", path)
