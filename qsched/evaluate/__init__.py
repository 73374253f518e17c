"""``qsched evaluate``: the comparison table of the paper, reproducible and multi-process.

Modules, one concept each: :mod:`~qsched.evaluate.configs` (configuration names ->
values), :mod:`~qsched.evaluate.generation` (resumable images per configuration),
:mod:`~qsched.evaluate.metrics` (FID, CLIP score, CLIP-IQA, MSE to fp, size),
:mod:`~qsched.evaluate.report` (results.json/md/png, grid.png),
:mod:`~qsched.evaluate.parallel` (process split via accelerate) and
:mod:`~qsched.evaluate.run` (:func:`evaluate`, tying them together).
"""

from __future__ import annotations

from qsched.evaluate.configs import DEFAULT_CONFIGS, EvalConfig, parse_configs
from qsched.evaluate.metrics import DEFAULT_METRICS, MetricResult, MetricSettings, known_metrics, parse_metrics
from qsched.evaluate.run import EvalResult, EvalSettings, evaluate

__all__ = [
    "DEFAULT_CONFIGS", "DEFAULT_METRICS", "EvalConfig", "EvalResult", "EvalSettings",
    "MetricResult", "MetricSettings", "evaluate", "known_metrics", "parse_configs", "parse_metrics",
]
