"""``--executor`` and ``--address``: where a batch command runs its slides (shared by the commands)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any, Optional

import typer

from histoscope.cli.errors import one_of
from histoscope.pipeline.executors import EXECUTORS

__all__ = ["AddressOpt", "ExecutorOpt", "gpus_per_task", "ray_or_none"]

ExecutorOpt = Annotated[str, typer.Option(
    "--executor", callback=one_of(*EXECUTORS),
    help="local: processes on this machine; ray: one Ray task per slide (per fold for train), with the ray "
         "extra installed.")]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster HOST:PORT for --executor ray (default: RAY_ADDRESS, else 'local': a private "
                      "loopback-only head for this run, with --workers CPUs).")]


def gpus_per_task(devices: str) -> float:
    """GPUs a Ray task declares for ``--devices``: Ray hides the GPUs from tasks that declare none."""
    names = [d.strip() for d in devices.split(",")]
    if any(name.startswith("cuda") for name in names):
        return 1
    if names == ["auto"]:
        import torch

        return 1 if torch.cuda.is_available() else 0
    return 0


@contextlib.contextmanager
def ray_or_none(executor: str, *, workers: int, address: str | None, devices: str) -> Iterator[Any]:
    """For stages whose local run is not a pool of slide jobs (embed streams every slide through
    one model; train runs its folds in this process): None for ``local``, else the Ray
    executor, closed afterwards."""
    from histoscope.pipeline import open_executor

    if executor == "local":
        with open_executor("local", address=address):  # checks --address
            yield None
        return
    with open_executor(executor, workers=workers, address=address, gpus_per_task=gpus_per_task(devices)) as runner:
        yield runner
