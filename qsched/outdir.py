"""Output folders: refuse to mix runs, clear only what qsched wrote on --overwrite."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from qsched.errors import QSchedError


def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool, owned: Iterable[str]) -> Path:
    """Create ``out``; an existing non-empty folder is refused unless ``overwrite``.

    With ``overwrite`` the files matching the glob patterns ``owned`` (what this
    command writes) are deleted first; anything else in the folder is left alone.
    Call this only after every input has been validated, so that a bad input
    never leaves a half-made folder behind.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QSchedError(f"output path {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise QSchedError(
                f"output folder {out} exists and is not empty; pass --overwrite to replace "
                "its results or choose another --out"
            )
        for pattern in owned:
            for path in out.glob(pattern):
                if path.is_file():
                    path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
