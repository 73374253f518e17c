"""Output folders: refuse to mix runs, clear only what qsched wrote on --overwrite."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from qsched.errors import QSchedError


def check_output_path(out: str | os.PathLike, *, option: str = "--out", folder: bool = True) -> Path:
    """Refuse an output path that cannot be created: it, or a folder above it, is a file.

    ``folder=False`` checks the parents of an output *file* only. Cheap and touches
    nothing, so the CLI runs it before loading any model.
    """
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise QSchedError(f"output path {out} exists and is not a folder; choose another {option}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QSchedError(f"{option} {out} lies under {parent}, which is a file, not a folder; choose another {option}")
            break
    return out


def make_folder(folder: str | os.PathLike, *, option: str = "--out") -> Path:
    """``mkdir -p`` with a one-line :class:`QSchedError` instead of an ``OSError``."""
    folder = check_output_path(folder, option=option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QSchedError(f"cannot create the output folder {folder}: {err.strerror or err}; choose another {option}") from None
    return folder


def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool, owned: Iterable[str]) -> Path:
    """Create ``out``; an existing non-empty folder is refused unless ``overwrite``.

    With ``overwrite`` the files matching the glob patterns ``owned`` (what this
    command writes) are deleted first; anything else in the folder is left alone.
    Call this only after every input has been validated, so that a bad input
    never leaves a half-made folder behind.
    """
    out = check_output_path(out)
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
    return make_folder(out)
