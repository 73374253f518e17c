"""Processes of one evaluation: which share of the images this process handles, and gathering.

Built on ``accelerate``'s :class:`~accelerate.PartialState`: run under
``accelerate launch -m qsched evaluate ...`` (or ``torchrun``), or let
``qsched evaluate --num-processes P`` start the processes. A single process needs
no launcher and no process group. Work is split by image index, round robin, so
an image is the same whoever makes it (its noise depends only on ``(seed, i)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's rank among ``world`` processes (rank 0 is the main process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (the same list on every process)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def device(self, device: str) -> str:
        """``device`` with this process's accelerator index (``cuda`` -> ``cuda:<local rank>``)."""
        if device in ("cuda", "xpu") and self.world > 1:
            return f"{device}:{self.local_rank}"
        return device


def current_workers() -> Workers:
    """The processes of this run (from the launcher's environment; one process without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Workers()
    from accelerate import PartialState

    import torch

    # Without an accelerator, accelerate sets up a CPU (gloo) process group only when asked to.
    state = PartialState(cpu=not torch.cuda.is_available() or os.environ.get("QSCHED_FORCE_CPU") == "1")
    return Workers(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index)
