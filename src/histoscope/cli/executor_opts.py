"""``--executor`` and ``--address``: where a batch command runs its slides (shared by the commands)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from histoscope.cli.errors import one_of
from histoscope.pipeline.executors import EXECUTORS

__all__ = ["AddressOpt", "ExecutorOpt", "gpus_per_task"]

ExecutorOpt = Annotated[str, typer.Option(
    "--executor", callback=one_of(*EXECUTORS),
    help="local: worker processes on this machine; ray: one Ray task per slide (pip install 'histoscope[ray]').")]
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
