"""Where a served request's time goes, for bench/load.py: CPU time of client and server, raw backend rate.

* :class:`CpuMeter` sums user+system CPU seconds of this process (the load client) and of the
  server's process tree (found by the port it listens on, or given by PID) across one level, also
  per server process role (BentoML's ``--service-name`` of each worker: the public service and the
  batching engine);
* :func:`raw_rate` runs the served artifact in this process, with the serving engine's own loader,
  on batches of ``batch`` crops: the throughput the server would reach if HTTP, decoding and the hop
  between its two services cost nothing. Served images/s over this rate is ``pct_of_raw``.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core.flavours import flavour
from core.timing import WARMUP, time_calls


def _server_processes(port: int | None, pid: int | None) -> list:
    """The server's process and all its children (BentoML's arbiter spawns one per service worker)."""
    try:
        import psutil
    except ImportError:
        return []
    root = None
    try:
        if pid is not None:
            root = psutil.Process(pid)
        elif port is not None:
            for c in psutil.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                    root = psutil.Process(c.pid)
                    break
        if root is None:
            return []
        while root.parent() is not None and root.parent().pid != 1 and _listens_on(root.parent(), port):
            root = root.parent()
        return [root, *root.children(recursive=True)]
    except (psutil.Error, OSError):  # no permission to list sockets, process gone
        return []


def _listens_on(proc, port: int | None) -> bool:
    try:
        return port is not None and any(c.laddr and c.laddr.port == port for c in proc.net_connections("tcp"))
    except Exception:  # noqa: BLE001 - psutil.AccessDenied and friends: stop climbing
        return False


def _role(proc) -> str:
    """BentoML names each worker's service on its command line (``--service-name NAME``)."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return "unknown"
    if "--service-name" in cmd[:-1]:
        return cmd[cmd.index("--service-name") + 1]
    return "arbiter" if any(c == "serve" for c in cmd) else "worker"


def _cpu_seconds(procs: list) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except Exception:  # noqa: BLE001 - a worker that exited mid-level
            continue
    return out


class CpuMeter:
    """CPU seconds of the client (this process) and the server tree between ``start()`` and ``stop()``."""

    def __init__(self, port: int | None, pid: int | None = None):
        self.procs = _server_processes(port, pid)
        self.server_pids = [p.pid for p in self.procs]
        self.roles = {p.pid: _role(p) for p in self.procs}

    def start(self) -> None:
        self.c0, self.s0 = time.process_time(), _cpu_seconds(self.procs)

    def stop(self, requests: int, elapsed_s: float) -> dict[str, Any]:
        """Per-request CPU ms of the client, the server and each server process role, and how busy the CPUs were."""
        client = time.process_time() - self.c0
        after = _cpu_seconds(self.procs)
        by_role: dict[str, float] = {}
        for pid, t in after.items():
            role = self.roles.get(pid, "unknown")
            by_role[role] = by_role.get(role, 0.0) + t - self.s0.get(pid, t)
        server = sum(by_role.values()) if self.procs else None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = max(requests, 1)
        return {"client_cpu_ms_per_req": 1000.0 * client / n,
                "server_cpu_ms_per_req": None if server is None else 1000.0 * server / n,
                "server_cpu_ms_per_req_by_process": {k: 1000.0 * v / n for k, v in sorted(by_role.items())},
                "cpu_busy_pct": None if server is None else 100.0 * (client + server) / (elapsed_s * cores)}


def raw_rate(directory: str | os.PathLike, precision: str, batch: int, crops_per_image: int,
             seconds: float = 3.0, threads: int = 0) -> dict[str, Any]:
    """Images/s of the served artifact run in-process on ``batch``-crop batches (at least 5 calls).

    Loads through :func:`serving.engine.load_model` (sha256-checked, same backend choice as the
    server's ``auto``), so the file and session options are the ones the engine uses. ``precision``
    is the flavour the server reports (either int8 form included) or its number format.
    """
    from serving.engine import load_model

    model = load_model(Path(directory), "auto", flavour(precision).number_format, 0, threads)
    try:
        size = model.preprocess.crop
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        infer = partial(model.backend.infer, x)
        for _ in range(WARMUP):  # here, not in time_calls: the CPU seconds count only timed calls
            infer()
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        calls = len(time_calls(infer, seconds, warmup=0, min_iters=5))
        wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
        images = calls * batch / crops_per_image
        return {"images_per_s": images / wall, "cpu_ms_per_image": 1000.0 * cpu / images,
                "batch_crops": batch, "calls": calls, "file": model.entry.file, "sha256": model.entry.sha256,
                "backend": model.backend.name, "precision": model.backend.precision}
    finally:
        model.backend.deactivate()
