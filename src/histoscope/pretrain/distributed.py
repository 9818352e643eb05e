"""The process group, for code that runs the same in one process and under ``torchrun``.

Every collective here is a no-op without an initialised process group, so losses and
the trainer need no ``if distributed`` branches. :func:`setup` reads the variables
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``)
when it is called, never at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "all_reduce", "barrier", "is_initialized", "rank", "setup", "teardown", "world_size"]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def all_reduce(tensor: torch.Tensor, *, async_op: bool = False):
    """Sum ``tensor`` over all processes in place; returns the async handle (None when alone)."""
    if not is_initialized():
        return None
    return dist.all_reduce(tensor, async_op=async_op)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA), or run alone.

    ``device``: ``auto`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    from histoscope.utils.device import resolve_device

    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if size > 1 and not is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank(), world_size=world_size(), local_rank=local_rank, device=device)


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()
