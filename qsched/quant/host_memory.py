"""What the process can do about host memory: how much is left, and giving freed memory back."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return freed heap memory to the system.

    Quantizing tensor after tensor leaves glibc's heap fragmented: measured on the
    SD1.5 UNet (W8A8, 0.87 GB packed), resident memory after loading is 2.3 GB
    without trimming and 1.3 GB with it.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (Linux MemAvailable / CUDA free), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
