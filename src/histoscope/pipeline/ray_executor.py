"""The executor interface on a Ray cluster: each item (a slide) is one Ray task.

Only the job function (sent once, through the object store) and the items (paths and
names) travel to the workers, and only each item's small run-report record comes back:
tiles and features are read and written by the workers on storage every node sees at the
same paths. An exception inside the job is already a record (``pipeline.batch``), so Ray
retries a task only when its worker process dies (killed, out of memory, a segfault in a
slide library): ``max_retries`` times, then the item is reported as a
:class:`~histoscope.pipeline.executors.WorkerCrashed` with Ray's reason. Outputs are written
under a temporary name and renamed, so a retried slide never leaves half a file.

Ray is an optional dependency (``pip install histoscope[ray]``), imported when an executor
is created.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from histoscope.pipeline.executors import WorkerCrashed

__all__ = ["RayExecutor", "task_name"]


def task_name(fn: Callable[..., Any]) -> str:
    """The job function's own name (``tile_slide``), through wrappers and partials: Ray
    shows it in the worker's process title, ``ray::tile_slide``."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "fn"):  # pipeline.batch._Timed
            fn = fn.fn
        else:
            return getattr(fn, "__name__", type(fn).__name__)


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].removeprefix("ray://")
    return address == "local" or host in ("127.0.0.1", "localhost")


def _import_ray(*, loopback: bool):
    """``ray``, set up so that a driver of a loopback head stays on 127.0.0.1.

    Ray swaps a 127.0.0.1 head address for the machine's routable address (and then never
    reaches the head) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which it reads when it
    is imported: set it first, and set the switch it becomes in case Ray was imported already.
    """
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if loopback:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


class RayExecutor:
    """Runs each item as a Ray task with declared resources and bounded retries.

    Parameters
    ----------
    address : str, optional
        A running cluster (``HOST:PORT``), or ``"local"`` for a private loopback-only head
        started for this executor and stopped by :meth:`close`
        (:class:`~histoscope.pipeline.ray_head.LoopbackHead`). Default: ``RAY_ADDRESS``,
        else ``"local"``.
    workers : int
        CPUs of the private head (``address="local"``); a cluster offers its own.
    cpus_per_task, gpus_per_task : float
        Resources each slide's task declares: Ray runs as many at once as the nodes hold.
    memory_gb : float, optional
        Memory each task declares, so Ray never packs more tasks on a node than fit.
    max_retries : int
        How often a slide whose worker died is tried again before it is reported failed.
    """

    def __init__(self, *, address: str | None = None, workers: int = 1, cpus_per_task: float = 1,
                 gpus_per_task: float = 0, memory_gb: float | None = None, max_retries: int = 2):
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray = _import_ray(loopback=_is_loopback(address))
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.max_retries = max_retries
        self.options: dict[str, Any] = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task,
                                        "max_retries": max_retries, "retry_exceptions": False}
        if memory_gb:
            self.options["memory"] = int(memory_gb * 2**30)
        self.head = None
        self.owns_connection = False
        if ray.is_initialized():  # a session the caller opened (a notebook, a test): use it, leave it open
            return
        if address == "local":
            from histoscope.pipeline.ray_head import LoopbackHead

            self.head = LoopbackHead(num_cpus=max(1, workers)).start()
            atexit.register(self.close)  # also when the caller never gets to close it
            address = self.head.address
        try:
            ray.init(address=address, _node_ip_address="127.0.0.1" if _is_loopback(address) else None,
                     log_to_driver=False, configure_logging=False)
        except Exception:
            self.close()
            raise
        self.owns_connection = True

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        import ray

        items = list(items)
        if not items:
            return
        remote = ray.remote(_call).options(name=task_name(fn), **self.options)
        fn_ref = ray.put(fn)  # once, not once per slide (predict's carries a model)
        pending = {remote.remote(fn_ref, item): index for index, item in enumerate(items)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready[0])
                try:
                    yield index, ray.get(ready[0])
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.OutOfMemoryError, ray.exceptions.TaskUnschedulableError) as error:
                    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    yield index, WorkerCrashed(f"the Ray worker running this item died on each of "
                                               f"{self.max_retries + 1} attempts ({type(error).__name__}: {first})")
                except ray.exceptions.RayTaskError as error:  # a bug outside the job's own try (pickling)
                    yield index, error
        finally:
            for ref in pending:  # left early (Ctrl-C, SIGTERM): stop the slides still running
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """Disconnect, and stop the private head if this executor started one."""
        if self.owns_connection:
            import ray

            ray.shutdown()
            self.owns_connection = False
        if self.head is not None:
            self.head.stop()
            self.head = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
