"""Worker lifecycle: leave with the arbiter, and take connections only when they can be answered.

BentoML runs ``bentoml serve`` as a circus arbiter that owns the listening socket and forks one
process per worker (``RESDEPLOY_WORKERS``); every worker accepts from that one shared socket, and
circus puts each worker in a session of its own. Two gaps follow (issue #22, docs/design.md#serving):

* A SIGKILLed arbiter leaves its workers running with parent 1, still holding the port and the
  model's memory. :func:`exit_with_parent` makes a worker leave on its own: the kernel's parent-death
  signal (Linux) plus a watcher thread that notices the re-parenting anywhere, sends SIGTERM (uvicorn
  then finishes the requests in flight) and ends the process after a short grace if that hangs.
* A restarted worker accepts connections as soon as uvicorn starts, i.e. while its model loads, and
  answers them 503 although another worker is ready. :func:`accepts_before_ready` says when a worker
  should load its model *before* uvicorn starts accepting (uvicorn only calls ``accept`` once the
  ASGI lifespan start-up, where BentoML runs the service's start-up hooks, has finished); until then
  its share of connections stays in the kernel's accept queue for the workers that are ready.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("serving")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GRACE_S = 3.0  # SIGTERM's graceful shutdown, then the process ends regardless
POLL_S = 0.5


def accepts_before_ready(workers: int) -> bool:
    """Whether a worker takes connections while its model is still loading.

    One worker: yes, so ``/livez`` is 200 and ``/readyz`` 503 during the load and Kubernetes probes
    see a live, unready pod (today's behaviour). Several workers: no. A worker that is not ready
    leaves the shared socket to the ready ones; at a cold start, when none is ready yet, connections
    wait in the accept queue until the first model is loaded rather than being answered 503.
    """
    return workers <= 1


def exit_with_parent(grace_s: float = GRACE_S, poll_s: float = POLL_S) -> int:
    """Make this process leave within ``grace_s + poll_s`` seconds of its parent's death.

    Returns the parent's pid being watched. Safe to call once per process (a second call is a no-op
    returning the same pid).
    """
    global _watched
    if _watched is not None:
        return _watched
    parent = _watched = os.getppid()
    if sys.platform.startswith("linux"):
        try:  # the kernel sends SIGTERM the moment the parent exits, even with every thread busy in C
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watcher below still works
            pass
    threading.Thread(target=_watch, args=(parent, grace_s, poll_s), name="resdeploy-parent-watch",
                     daemon=True).start()
    return parent


_watched: int | None = None


def _watch(parent: int, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:  # re-parented (to 1 or a subreaper) once the parent is gone
        time.sleep(poll_s)
    log.warning("resdeploy: the server's arbiter (pid %d) is gone; worker %d shutting down", parent, os.getpid())
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown: in-flight requests finish
    finally:
        time.sleep(grace_s)
        os._exit(1)  # the shutdown hung (a stuck thread, a join): free the port and the memory anyway
