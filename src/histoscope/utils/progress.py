"""A progress bar over training steps, on stderr (rich)."""

from __future__ import annotations

__all__ = ["StepProgress"]


class StepProgress:
    """``advance(status)`` once per step; ``close()`` at the end."""

    def __init__(self, label: str, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self.task = self.progress.add_task(label, total=total, status="")
        self.progress.start()

    def advance(self, status: str) -> None:
        self.progress.update(self.task, advance=1, status=status)

    def close(self) -> None:
        self.progress.stop()
