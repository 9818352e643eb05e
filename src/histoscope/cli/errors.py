"""The one place where the command line turns errors into messages and exit codes.

Every command runs inside :class:`HandledGroup.invoke`, so no command catches errors itself:

- ``0``: done; ``1``: some slides of a batch failed, the others finished (the run report
  and one ``FAILED`` line per slide say why);
- ``2``: bad input or usage, nothing done: one line ``error: …`` naming the file or flag
  and the fix (histoscope's errors are written to be that line);
- ``130`` / ``143``: interrupted by Ctrl-C / SIGTERM, which are handled alike (temporary
  files removed, worker processes stopped); a rerun resumes.

Anything else is a bug in histoscope and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

__all__ = ["HandledGroup", "INPUT_ERROR", "BATCH_FAILED", "check_mpp", "fail", "one_of", "user_message"]

BATCH_FAILED = 1
INPUT_ERROR = 2
# typer ships its own copy of click; its usage-error class is the base of typer.BadParameter.
_UsageError = typer.BadParameter.__base__


def fail(message: str) -> NoReturn:
    """End the command with ``error: message`` on stderr and exit status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(INPUT_ERROR)


def check_mpp(value: float | None) -> float | None:
    """Option callback: a resolution in µm/px that a scan can have (a usage error otherwise)."""
    from histoscope.io.mpp import mpp_problem

    if value is not None and (problem := mpp_problem(value)):
        raise typer.BadParameter(problem)
    return value


def one_of(*choices: str):
    """Option callback accepting only ``choices`` (a usage error listing them otherwise)."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def _input_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input", not "bug" (imported when an error happens)."""
    from histoscope.encoders.errors import UnknownTileEncoderError, WeightsError
    from histoscope.io.errors import SlideError
    from histoscope.slide.registry import SlideWeightsError

    # OSError: a file that cannot be read or written (missing, a folder, no permission, disk full).
    return (ValueError, KeyError, UnknownTileEncoderError, OSError, SlideError, WeightsError, SlideWeightsError)


def user_message(error: BaseException) -> str | None:
    """The message of an input error as the user should read it; None for a bug."""
    if not isinstance(error, _input_errors()):
        return None
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]  # str(KeyError) would wrap the whole message in quotes
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so it unwinds like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        # Ctrl-C reaches the workers too (one process group); SIGTERM reaches this process
        # only, so stop them here, before unwinding can talk to a half-stopped worker.
        for child in multiprocessing.active_children():
            child.kill()
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class HandledGroup(TyperGroup):
    """The ``histoscope`` command group: turns every error into its message and exit status."""

    def invoke(self, ctx: Any) -> Any:
        try:
            with _sigterm_as_interrupt():
                return super().invoke(ctx)
        except _UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # typer prints the help for it
                raise
            where = error.ctx.command_path if error.ctx is not None else ctx.command_path
            fail(f"{error.format_message()} (see `{where} --help`)")
        except KeyboardInterrupt as error:
            sigterm = isinstance(error, _Interrupted)
            typer.secho(f"interrupted{' by SIGTERM' if sigterm else ''}: unfinished outputs removed; "
                        "run the same command again to resume", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(128 + (signal.SIGTERM if sigterm else signal.SIGINT)) from None
        except Exception as error:
            message = user_message(error)
            if message is None:
                raise
            fail(message)
