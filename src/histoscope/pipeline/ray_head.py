"""A private Ray head on this machine that listens on loopback only, and ends with its owner.

``--address local`` and the tests start one. With Ray 2.x, ``--node-ip-address 127.0.0.1``
alone is not enough: ``ray start`` still swaps in the machine's routable address and its
servers listen on all interfaces. What keeps every server on 127.0.0.1 is the node address
plus an explicit free loopback port for each server (so parallel heads never collide), the
two metric ports given by environment variables, and no dashboard.

``ray start`` runs in a session of its own (``setsid``): Ray's daemons share that session
and its process group, and its workers share the session but put themselves in groups of
their own. :meth:`LoopbackHead.stop` therefore sends TERM to the session's group and to
every process of the session, waits a short grace, then KILLs what is left. It never
calls ``ray stop``, which ends every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["LoopbackHead", "RayHeadError", "free_loopback_ports", "session_processes"]

# `ray start` flags that each open one server; each gets its own free loopback port.
_PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
               "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
_PORT_VARIABLES = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")


class RayHeadError(RuntimeError):
    """``ray start`` failed; the message carries the end of its output."""


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 (all held open until all are found)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def session_processes(sid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(entry))
    return pids


def _client_server_available() -> bool:
    """Ray refuses ``--ray-client-server-port`` without ``ray[client]``; without it no client
    server starts, so there is no port to pin."""
    try:
        from ray.util.client.common import get_ray_client_dependency_error  # noqa: PLC0415
    except ImportError:
        return False
    return get_ray_client_dependency_error() is None


class LoopbackHead:
    """A Ray head for this process: loopback only, explicit free ports, private temp dir.

    Parameters
    ----------
    num_cpus, num_gpus : int, optional
        Resources the head offers (default: Ray's count of this machine's).
    object_store_mb : int
        Shared-memory object store. histoscope passes only paths and small records
        through it, so it can stay small.

    Examples
    --------
    >>> with LoopbackHead(num_cpus=2) as head:              # doctest: +SKIP
    ...     ray.init(address=head.address, _node_ip_address="127.0.0.1")
    """

    def __init__(self, *, num_cpus: int | None = None, num_gpus: int | None = None, object_store_mb: int = 128,
                 start_timeout: float = 120.0):
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        self.sid: int | None = None
        self.address: str | None = None
        self.temp_dir: Path | None = None

    def command(self, ports: list[int]) -> list[str]:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address", "127.0.0.1",
               "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(self.temp_dir),
               "--object-store-memory", str(self.object_store_mb * 2**20)]
        flags = _PORT_FLAGS + (("--ray-client-server-port",) if _client_server_available() else ())
        for flag, port in zip(flags, ports):
            cmd += [flag, str(port)]
        if self.num_cpus is not None:
            cmd += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            cmd += ["--num-gpus", str(self.num_gpus)]
        return cmd

    def start(self) -> LoopbackHead:
        # Short path: Ray's unix sockets live under it and their names must stay < 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        ports = free_loopback_ports(len(_PORT_FLAGS) + 1 + len(_PORT_VARIABLES))
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               **{name: str(port) for name, port in zip(_PORT_VARIABLES, ports[-len(_PORT_VARIABLES):])}}
        env.pop("RAY_ADDRESS", None)
        log = self.temp_dir / "ray_start.log"
        with open(log, "wb") as out:
            # start_new_session: setsid in the child, so its daemons and workers form one session.
            proc = subprocess.Popen(self.command(ports), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.sid = proc.pid
        try:
            code = proc.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            self.stop()
            reason = "did not come up in time" if code is None else f"exited with status {code}"
            raise RayHeadError(f"ray start {reason}: {' | '.join(tail)}")
        self.address = f"127.0.0.1:{ports[0]}"
        return self

    def processes(self) -> list[int]:
        """PIDs of the head's daemons and of its workers (one session)."""
        return session_processes(self.sid) if self.sid is not None else []

    def stop(self, grace: float = 2.0) -> None:
        """TERM the head's process group and session, KILL what outlives ``grace``; drop its temp dir."""
        if self.sid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.sid, signal.SIGTERM)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.processes():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + grace
                while self.processes() and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.sid = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> LoopbackHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
