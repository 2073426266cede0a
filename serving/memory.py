"""Keep a long-running worker's resident memory flat (issue #11's soak).

glibc gives every thread that calls malloc its own arena (up to 8 per core) and rarely returns
their memory: a server that decodes images on a thread pool while an inference thread allocates
batches grows its RSS for minutes. Two arenas bound that; the process runs no faster with more
here, because the pixel work happens inside Pillow and the runtimes, not in malloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int | None = None) -> bool:
    """``mallopt(M_ARENA_MAX, n)`` for this process (``MALLOC_ARENA_MAX`` wins when set).

    Returns True when applied; False off glibc (musl, macOS), where there is nothing to bound.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False  # glibc read it at start-up; the operator's choice stands
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(M_ARENA_MAX, arenas or DEFAULT_ARENAS))
    log.debug("mallopt(M_ARENA_MAX, %s) -> %s", arenas or DEFAULT_ARENAS, ok)
    return ok
