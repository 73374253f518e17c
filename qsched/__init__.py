"""qsched: quantization-aware scheduling (Q-Sched) for few-step diffusion models.

Importing this package loads no model, touches no GPU and does not import
diffusers: the public names below are resolved lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "QSchedError": "qsched.errors",
    "QSchedCoefficients": "qsched.schedule",
    "ramp": "qsched.schedule",
    "constant": "qsched.schedule",
    "wrap": "qsched.scheduler",
    "unwrap": "qsched.scheduler",
    "is_wrapped": "qsched.scheduler",
    "ScheduleCard": "qsched.card",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsched' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
