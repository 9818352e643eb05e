"""Where a pretraining run reports: stdout lines, ``OUT/log.jsonl``, TensorBoard and a progress bar.

Only the main process writes. ``log.jsonl`` has one JSON object per logged step (and
one per evaluation); a resumed run first drops the lines after its checkpoint, so the
file reads as if the run had never stopped. TensorBoard is used when the
``tensorboard`` package is installed (it is optional), with a note when it is not.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["RunLog", "truncate_jsonl"]


def truncate_jsonl(path: Path, *, before_step: int) -> None:
    """Keep only the records of ``path`` whose ``step`` is below ``before_step``."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", -1) < before_step]
    path.write_text("".join(line + "\n" for line in kept))


class RunLog:
    """Metrics of the main process: printed, appended to ``log.jsonl``, sent to TensorBoard."""

    def __init__(self, out_dir: Path, *, start_step: int, total_steps: int, enabled: bool, tensorboard: bool,
                 progress: bool, echo: Callable[[str], None] = print):
        self.enabled, self.echo = enabled, echo
        self.path = out_dir / "log.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        truncate_jsonl(self.path, before_step=start_step)
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                echo("note: TensorBoard logging skipped: the optional tensorboard package is not installed "
                     "(pip install tensorboard)")
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step)
        if progress and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]pretrain[/]"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.task = self.bar.add_task("pretrain", total=total_steps, completed=start_step, rate="")
            self.bar.start()

    def step(self, step: int, values: dict[str, float], *, images_per_second: float, show: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step + 1,
                            rate=f"{images_per_second:.1f} img/s loss {values.get('total_loss', math.nan):.4f}")
        if not show:
            return
        record = {"step": step, **values, "images_per_second": images_per_second}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.add_scalar("train/images_per_second", images_per_second, step)
        if self.bar is None:
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            self.echo(f"step {step + 1} {shown} ({images_per_second:.1f} img/s)")

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, "eval": metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{key}", value, step)
        self.echo(f"eval after step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.console.print if self.bar is not None else self.echo)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()
