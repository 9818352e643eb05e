"""Output folders: one histoscope run at a time, and what a killed run left behind removed.

Every stage writes inside :func:`output_folder`: it creates the folder (a path that is a
file, or a folder that cannot be written, is an error naming it), takes an exclusive
lock on ``OUT/.histoscope.lock`` and only then deletes the temporary files of killed
runs, which are certainly stale once no other run holds the lock. The lock is an
``fcntl`` lock, so the kernel releases it when its process ends, however it ends; a
second run into the same folder stops at once with the PID of the first. A run that
ends by an exception (Ctrl-C, SIGTERM) removes the temporary files it leaves, once
its workers are stopped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from histoscope.io.atomic import remove_stale_partials

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs into one folder are not guarded there
    fcntl = None

__all__ = ["LOCK_NAME", "OutputFolderError", "output_folder"]

LOCK_NAME = ".histoscope.lock"

# Folders this process holds the lock of (resolved path -> [fd, depth]): a stage that runs
# another inside it (predict around its batch) claims the same folder twice.
_held: dict[Path, list[int]] = {}


class OutputFolderError(ValueError):
    """An output folder cannot be created or written, or another run is writing into it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


def _create(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OutputFolderError(path, "is a file, not a folder; choose an output folder (--out)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise OutputFolderError(path, "cannot be created: part of this path is a file; choose another output "
                                      "folder (--out)") from None
    except OSError as error:
        raise OutputFolderError(path, f"cannot be created ({error.strerror}); choose another output folder "
                                      "(--out)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputFolderError(path, "is not writable by this user; choose another output folder (--out)")


def _lock(path: Path) -> int:
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputFolderError(path, f"cannot be written ({error.strerror}); choose another output folder "
                                      "(--out)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputFolderError(path, f"another histoscope run (PID {holder}) is writing into this folder; "
                                      "wait for it to finish, or choose another output folder (--out)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """Create ``path``, hold its lock while the block runs, and start it clean of temporary files.

    Raises
    ------
    OutputFolderError
        ``path`` is a file or cannot be created or written, or another run holds its lock.
    """
    path = Path(path)
    _create(path)
    key = path.resolve()
    if key in _held:
        _held[key][1] += 1
    else:
        fd = _lock(path) if fcntl is not None else -1
        _held[key] = [fd, 1]
        remove_stale_partials(path)
    try:
        yield path
    except BaseException:
        if _held[key][1] == 1:  # the run is ending early and its workers are stopped: drop what they left
            remove_stale_partials(path)
        raise
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            fd, _ = _held.pop(key)
            if fd >= 0:
                os.close(fd)  # releases the lock; the file stays, harmless and reused
