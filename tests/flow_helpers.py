"""Tiny random built-in flow pipelines for the tests (random weights, the real classes)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_flow_pipeline(*, distilled: bool, seed: int = 0):
    """A tiny ``QSchedBuiltinFlowPipeline`` whose transformer predicts something non-zero.

    ``make_transformer`` zero-initialises the output projection and the modulations
    (adaLN-Zero), which would make every prediction 0; they get small random values here.
    """
    from qsched.builtin.flow import SHAPES, make_scheduler, make_transformer
    from qsched.builtin.flow_pipeline import QSchedBuiltinFlowPipeline

    torch.manual_seed(seed)
    transformer = make_transformer(SHAPES["tiny"])
    with torch.no_grad():
        for p in transformer.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    pipe = QSchedBuiltinFlowPipeline(transformer=transformer.eval(), scheduler=make_scheduler(), distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_flow(folder: Path, *, distilled: bool, seed: int = 0) -> Path:
    tiny_flow_pipeline(distilled=distilled, seed=seed).save_pretrained(folder)
    return folder
