"""Shared fixtures: tiny offline pipelines of every family, saved once per session.

Use ``tiny_pipeline_path`` in any test that needs a real pipeline folder::

    def test_something(tiny_pipeline_path):
        folder = tiny_pipeline_path("lcm")          # a pathlib.Path, saved once
        loaded = qsched.families.load_pipeline(folder)
        loaded.pipe("a cat", num_inference_steps=2, **TINY_CALL_KWARGS)

Folders are shared by the whole session: treat them as read-only.

Torch runs single-threaded in tests (override with QSCHED_TEST_THREADS=N): the
models are tiny, and on a shared 2-core machine two spinning OpenMP threads made
a 30 ms tiny-pipeline call take 6 s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qsched.testing import TINY_FAMILIES, save_tiny_pipeline

torch.set_num_threads(int(os.environ.get("QSCHED_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A function ``get(family) -> Path`` to a saved tiny pipeline (seed 0), built once."""
    root = tmp_path_factory.mktemp("tiny-pipelines")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            if family not in TINY_FAMILIES:
                raise ValueError(f"no tiny pipeline for {family!r}; known: {TINY_FAMILIES}")
            cache[family] = save_tiny_pipeline(family, root / family, seed=0)
        return cache[family]

    return get
