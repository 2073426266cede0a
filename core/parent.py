"""Child processes that leave when their parent dies, however it died.

A parent killed hard (SIGKILL, the OOM killer) shuts nothing down: BentoML's service workers (circus
puts each in a session of its own) kept the port and the model with parent 1, and ``resdeploy
predict``'s decode processes waited forever on a task queue whose write end they hold themselves
(issue #22). :func:`exit_with_parent` asks the kernel for SIGTERM at the parent's death (Linux) and
runs a thread that notices the re-parenting on any system, sends SIGTERM (a server finishes the
requests in flight) and ends the process after a short grace if that hangs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GRACE_S = 3.0  # SIGTERM's graceful shutdown, then the process ends regardless
POLL_S = 0.5


def exit_with_parent(grace_s: float = GRACE_S, poll_s: float = POLL_S, kernel_signal: bool = True) -> int:
    """Make this process leave within ``grace_s + poll_s`` seconds of its parent's death.

    Args:
        grace_s: how long SIGTERM's shutdown may take before the process ends regardless.
        poll_s: how often the watcher thread checks the parent.
        kernel_signal: also ask the kernel for SIGTERM at once (``PR_SET_PDEATHSIG``, Linux). The
            kernel sends it when the *thread* that created this process exits, so only where the parent
            spawns from a thread that lives as long as it does (circus's event loop); the watcher alone
            is right for pools that may spawn from a passing thread.

    Returns:
        The parent's pid being watched. A second call is a no-op returning the same pid.
    """
    global _watched
    if _watched is not None:
        return _watched
    parent = _watched = os.getppid()
    if kernel_signal and sys.platform.startswith("linux"):
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
    log.warning("resdeploy: parent process %d is gone; process %d shutting down", parent, os.getpid())
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # a server's graceful shutdown: in-flight requests finish
    finally:
        time.sleep(grace_s)
        os._exit(1)  # the shutdown hung (a stuck thread, a join): free the port and the memory anyway
