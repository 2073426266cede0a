"""The one latency loop: warm-up calls, then timed calls for a time budget (Polygraphy's runners
time their own ``infer``; every bench row and the GPU check time a :class:`core.backend.Backend`
through this)."""

from __future__ import annotations

import time
from typing import Callable

WARMUP = 3
MIN_ITERS = 3


def time_calls(call: Callable[[], object], budget_s: float, warmup: int = WARMUP, min_iters: int = MIN_ITERS,
               max_iters: int | None = None) -> list[float]:
    """Milliseconds per ``call()``: ``warmup`` untimed calls, then timed ones until ``budget_s`` has
    passed and at least ``min_iters`` ran (at most ``max_iters``).

    ``call`` must return only when its work is done: :meth:`Backend.infer` returns host arrays, so
    a GPU backend has synchronised by then.
    """
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < budget_s:
        if max_iters is not None and len(times) >= max_iters:
            break
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times
