"""Adaptive batching inside the serving worker: one inference thread fed from the event loop.

Requests are blocks of rows (one image's crops: 1 or 10) that are never split. The inference
thread takes every request that is waiting, up to ``max_rows`` rows, runs them as one batch and
answers each request's future on its own event loop. There is no timer: while the model runs on
one batch, the next one forms, so a lone request waits for nothing and a busy worker runs full
batches. Requests that waited longer than ``max_wait_s`` are answered with :class:`Overloaded`
instead of being run (load shedding); cancelled ones (client gone) are dropped.

This replaces BentoML's two-service hop (docs/design.md#serving): rows stay uint8 numpy arrays in
one process, with no pickling, no second HTTP hop and no per-call client session.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """A request waited in the queue longer than the latency budget and was not run."""


class Closed(Exception):
    """The batcher was closed before the request ran."""


@dataclass
class _Request:
    rows: np.ndarray
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


def resolve(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    """Set ``future``'s result or error unless it is already done (cancelled); call on its loop."""
    if future.done():  # cancelled by a client that went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Batcher:
    """Greedy adaptive batching of row blocks onto ``run`` (called from one thread only).

    Args:
        run: computes the outputs of a batch of rows, e.g. ``backend.infer_uint8`` with the
            normalisation bound; its output has one row per input row.
        max_rows: most rows per batch (a request larger than this runs alone).
        max_wait_s: queueing budget; older requests get :class:`Overloaded`.
        observe: called as ``observe(rows, requests, wait_s)`` after each batch (metrics).
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_rows: int, max_wait_s: float,
                 observe: Callable[[int, int, float], None] | None = None, name: str = "resdeploy-batcher"):
        self.run, self.max_rows, self.max_wait_s, self.observe = run, max_rows, max_wait_s, observe
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """The outputs for ``rows`` (one block, never split), once its batch has run."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.put(rows, loop, future)
        return await future

    def put(self, rows: np.ndarray, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        """Queue ``rows`` from any thread; ``future`` (of ``loop``) gets the outputs or the error.

        The service's decode threads call this directly, so an upload crosses threads twice (to the
        decoder, and back with its answer) instead of four times.
        """
        with self._cond:
            if self._closed:
                raise Closed("the inference queue is closed")
            self._queue.append(_Request(rows, loop, future))
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking work; queued requests get :class:`Closed`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[_Request] | None:
        """The next batch: waiting requests in order, up to ``max_rows`` rows (None once closed)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                pending, self._queue = list(self._queue), deque()
                for r in pending:
                    r.loop.call_soon_threadsafe(resolve, r.future, None, Closed("the server is shutting down"))
                return None
            batch, rows = [], 0
            while self._queue and (not batch or rows + len(self._queue[0].rows) <= self.max_rows):
                r = self._queue.popleft()
                if r.future.cancelled():
                    continue
                batch.append(r)
                rows += len(r.rows)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            now = time.perf_counter()
            live = []
            for r in batch:
                if now - r.queued > self.max_wait_s:
                    r.loop.call_soon_threadsafe(resolve, r.future, None, Overloaded(
                        f"waited {now - r.queued:.1f} s for the model, over the {self.max_wait_s:g} s budget"))
                else:
                    live.append(r)
            if live:
                self._run(live, now)

    def _run(self, batch: list[_Request], started: float) -> None:
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([r.rows for r in batch])
        try:
            out = self.run(rows)
        except Exception as e:  # noqa: BLE001 - every waiting request learns why
            log.exception("inference failed on a batch of %d rows", len(rows))
            for r in batch:
                r.loop.call_soon_threadsafe(resolve, r.future, None, e)
            return
        start = 0
        for r in batch:
            end = start + len(r.rows)
            r.loop.call_soon_threadsafe(resolve, r.future, out[start:end])
            start = end
        if self.observe is not None:
            self.observe(len(rows), len(batch), started - min(r.queued for r in batch))
