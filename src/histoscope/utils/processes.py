"""Worker processes that never outlive the run that started them.

A killed run (SIGKILL, the OOM killer, a batch system's time limit) runs no clean-up
code, and its workers would live on: pool workers wait for work that never comes,
and DataLoader workers keep their forkserver alive, which keeps them alive in turn,
with the resource tracker waiting on all of them. So each worker calls
:func:`die_with` on the run's PID when it starts, and ends itself the moment that
process ends, whoever its own parent is (a forkserver's children are not the run's):
:func:`die_with_parent` finds that PID in a multiprocessing worker.

On Linux the worker waits on a pidfd of the run (an event, not a poll). The kernel's
parent-death signal (``prctl(PR_SET_PDEATHSIG)``) would not do: it follows the
parent, which for DataLoader workers is the forkserver, and fires when the parent's
*thread* that started the worker ends, not the process.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

__all__ = ["die_with", "die_with_parent"]

_POLL_SECONDS = 1.0  # where there is no pidfd (macOS): how often the run's PID is checked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (the PID was reused)
        return False
    return True


def _end_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_with(pid: int) -> None:
    """End this process (SIGKILL) as soon as process ``pid`` ends; returns at once.

    Call it first thing in a worker, with the PID of the run that started it (taken in
    that run: ``os.getpid()`` there). A worker whose run is already gone ends at once.
    """
    opener = getattr(os, "pidfd_open", None)
    fd = None
    if opener is not None:
        try:
            fd = opener(pid)
        except ProcessLookupError:
            _end_self()
        except OSError:  # a kernel older than 5.3
            fd = None
    if fd is None and not _alive(pid):
        _end_self()

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable when the process has ended
        else:
            while _alive(pid):
                time.sleep(_POLL_SECONDS)
        _end_self()

    threading.Thread(target=wait, name=f"die-with-{pid}", daemon=True).start()


def die_with_parent() -> None:
    """:func:`die_with` the process that started this multiprocessing worker: the run
    itself, also for workers a forkserver forked for it. Nothing outside a worker."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None:
        die_with(parent.pid)
