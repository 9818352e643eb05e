"""Executors run one function over many items and survive any single item failing.

An item's exception comes back as its result instead of stopping the run, and a
worker process that dies outright (a segfault in a slide library on a corrupt file)
costs only the item that killed it: the pool is rebuilt and the rest continue.
``LocalExecutor`` uses processes on this machine; ``RayExecutor``
(``pipeline.ray_executor``, with the optional ``ray`` extra) implements the same ``map``
on a Ray cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from histoscope.utils.processes import die_with_parent

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "WorkerCrashed", "get_executor", "open_executor"]

EXECUTORS = ("local", "ray")


class WorkerCrashed(RuntimeError):
    """The worker process running an item died (signal or hard exit)."""


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result or exception)`` for each item, in completion order."""


class LocalExecutor:
    """Process-parallel executor on this machine.

    Parameters
    ----------
    workers : int
        Worker processes. ``0`` runs items in this process (no isolation from crashes;
        for debugging and notebooks).
    start_method : str
        ``spawn`` (default) is safe with threads and CUDA in the parent.
    """

    def __init__(self, *, workers: int = 1, start_method: str = "spawn"):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.start_method = start_method

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if self.workers == 0:
            for index, item in enumerate(items):
                try:
                    yield index, fn(item)
                except Exception as error:  # reported per item, never fatal for the batch
                    yield index, error
            return
        yield from self._map_pool(fn, list(items))

    def _pool(self, workers: int) -> cf.ProcessPoolExecutor:
        # Workers end with this process however it ends, even by SIGKILL (utils/processes.py).
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(self.start_method),
                                      initializer=die_with_parent)

    def _map_pool(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[tuple[int, Any]]:
        suspects: list[int] = []
        with _stopped_on_interrupt(self._pool(min(self.workers, max(1, len(items))))) as pool:
            futures = {pool.submit(fn, item): index for index, item in enumerate(items)}
            for future in cf.as_completed(futures):
                index = futures[future]
                try:
                    yield index, future.result()
                except BrokenProcessPool:
                    suspects.append(index)
                except Exception as error:
                    yield index, error
        # A dead worker breaks every pending future; rerun those alone to find the culprit.
        for index in sorted(suspects):
            with _stopped_on_interrupt(self._pool(1)) as pool:
                try:
                    yield index, pool.submit(fn, items[index]).result()
                except BrokenProcessPool:
                    yield index, WorkerCrashed("worker process died while processing this item "
                                               "(crash in a native library?)")
                except Exception as error:
                    yield index, error


@contextlib.contextmanager
def _stopped_on_interrupt(pool: cf.ProcessPoolExecutor) -> Iterator[cf.ProcessPoolExecutor]:
    """Shut ``pool`` down after the block; if the block is left by an exception (Ctrl-C,
    SIGTERM, the consumer giving up), stop its workers first instead of waiting for
    the items they are working on."""
    try:
        yield pool
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def get_executor(name: str = "local", **options: Any) -> Executor:
    """Executor by name: ``local`` (:class:`LocalExecutor`) or ``ray``
    (:class:`~histoscope.pipeline.ray_executor.RayExecutor`; ``close()`` it when done)."""
    if name == "local":
        return LocalExecutor(**options)
    if name == "ray":
        try:
            from histoscope.pipeline.ray_executor import RayExecutor
        except ImportError as error:  # ray missing, or not importable here
            raise ValueError(f"the ray executor needs Ray ({error}); install it with "
                             "`pip install 'histoscope[ray]'`") from None
        return RayExecutor(**options)
    raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")


@contextlib.contextmanager
def open_executor(name: str = "local", *, workers: int = 1, address: str | None = None,
                  gpus_per_task: float = 0) -> Iterator[Executor]:
    """The executor a command line asked for, closed (a private Ray head stopped) afterwards.

    ``workers`` is the local worker processes, or the CPUs of a private Ray head
    (``address="local"``); ``address`` is for ``ray`` only.
    """
    if name == "local":
        if address is not None:
            raise ValueError("--address is for --executor ray; drop it or add --executor ray")
        yield LocalExecutor(workers=workers)
        return
    executor = get_executor(name, address=address, workers=workers, gpus_per_task=gpus_per_task)
    try:
        yield executor
    finally:
        executor.close()
