"""A real ``bentoml serve serving.service:Classifier`` for tests: free loopback port, own process
group, polled until ready, always torn down (workers included)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from conftest import ROOT

READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def serve(artifacts: Path, workdir: Path, env: dict[str, str] | None = None,
          on_poll: Callable[[httpx.Client, int | None], None] | None = None,
          poll_s: float = 0.05, ready: bool = True) -> Iterator[tuple[str, Path]]:
    """Start the service on ``artifacts``; yield ``(url, log_path)`` once /readyz is 200 (with
    ``ready=False``: once the server answers at all, for a model that is not meant to load).

    ``on_poll(client, readyz_status)`` runs after every poll that got an HTTP answer (None while
    the server does not listen yet), e.g. to record the readiness sequence.
    """
    port = free_port()
    url, log_path = f"http://127.0.0.1:{port}", workdir / "server.log"
    full_env = os.environ | {
        "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True", "RESDEPLOY_ARTIFACTS": str(artifacts),
    } | (env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "serving.service:Classifier", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=url, timeout=5, trust_env=False) as client:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"bentoml serve exited with {proc.returncode}:\n{log_tail(log_path)}"
                assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S} s:\n{log_tail(log_path)}"
                try:
                    code = client.get("/readyz").status_code
                except httpx.TransportError:  # not listening yet
                    code = None
                if code is not None and on_poll is not None:
                    on_poll(client, code)
                if code == 200 or (code is not None and not ready):
                    break
                time.sleep(poll_s)
        yield url, log_path
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:  # workers that outlived the arbiter
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
