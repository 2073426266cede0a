"""serving/batcher.py with real threads and a real event loop (no BentoML, no model).

``run`` is a stand-in model whose output row is a function of its input row (row id times 2), so
a row delivered to the wrong request, or a split or dropped request, shows in the answer.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from serving.batcher import Batcher, Closed, Overloaded
from serving.memory import limit_malloc_arenas


class Model:
    """Records every batch; ``gate`` (when set) holds the first batch until released."""

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.gate, self.fail_on = gate, fail_on
        self.threads: set[str] = set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batches.append(rows[:, 0].tolist())
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(10)
        if self.fail_on is not None and self.fail_on in rows[:, 0]:
            raise RuntimeError(f"bad row {self.fail_on}")
        return rows[:, :1] * 2.0


def block(first: int, n: int) -> np.ndarray:
    """``n`` rows with ids first..first+n-1 in column 0."""
    return np.arange(first, first + n, dtype=np.int64)[:, None].repeat(3, axis=1)


def test_every_request_gets_its_own_rows_and_batches_respect_the_cap():
    model = Model()
    batcher = Batcher(model, max_rows=40, max_wait_s=60)
    sizes = [10, 1, 10, 10, 1, 10, 10, 10, 1, 10] * 6
    starts = np.cumsum([0] + sizes[:-1]).tolist()

    async def main():
        return await asyncio.gather(*(batcher.submit(block(s, n)) for s, n in zip(starts, sizes)))

    answers = asyncio.run(main())
    batcher.close()
    for s, n, out in zip(starts, sizes, answers):
        assert out.shape == (n, 1)
        np.testing.assert_array_equal(out[:, 0], 2.0 * np.arange(s, s + n))
    flat = [r for b in model.batches for r in b]
    assert sorted(flat) == list(range(sum(sizes)))  # every row ran exactly once
    assert max(len(b) for b in model.batches) <= 40
    blocks = {s: set(range(s, s + n)) for s, n in zip(starts, sizes)}
    for b in model.batches:  # a request's rows are never split across batches
        for rows in blocks.values():
            assert rows <= set(b) or not rows & set(b)
    assert model.threads == {"resdeploy-batcher"}  # one inference thread, never the event loop


def test_requests_that_arrive_while_the_model_runs_form_the_next_batch():
    gate = threading.Event()
    model = Model(gate)
    batcher = Batcher(model, max_rows=40, max_wait_s=60)

    async def main():
        first = asyncio.ensure_future(batcher.submit(block(0, 10)))
        await asyncio.sleep(0.2)  # the first batch (one request) is now running and held
        rest = [asyncio.ensure_future(batcher.submit(block(10 * i, 10))) for i in range(1, 6)]
        await asyncio.sleep(0.2)
        gate.set()
        return await asyncio.gather(first, *rest)

    asyncio.run(main())
    batcher.close()
    # Greedy, no timer: 1 request alone, then the 5 that queued meanwhile as 4 + 1 (cap 40 rows).
    assert [len(b) for b in model.batches] == [10, 40, 10]


def test_requests_over_the_wait_budget_are_shed_not_run():
    gate = threading.Event()
    model = Model(gate)
    batcher = Batcher(model, max_rows=10, max_wait_s=0.1)

    async def main():
        first = asyncio.ensure_future(batcher.submit(block(0, 10)))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit(block(10, 10)))
        await asyncio.sleep(0.3)  # `late` waits behind the held batch, past its budget
        gate.set()
        return await asyncio.gather(first, late, return_exceptions=True)

    first, late = asyncio.run(main())
    batcher.close()
    assert isinstance(first, np.ndarray)
    assert isinstance(late, Overloaded) and "budget" in str(late)
    assert [b[0] for b in model.batches] == [0]  # the shed request never reached the model


def test_a_failing_batch_fails_its_requests_and_the_next_batch_runs():
    gate = threading.Event()
    model = Model(gate, fail_on=15)
    batcher = Batcher(model, max_rows=40, max_wait_s=60)

    async def main():
        held = asyncio.ensure_future(batcher.submit(block(0, 10)))
        await asyncio.sleep(0.1)
        same_batch = [asyncio.ensure_future(batcher.submit(block(s, 10))) for s in (10, 20)]
        await asyncio.sleep(0.1)
        gate.set()
        out = await asyncio.gather(held, *same_batch, return_exceptions=True)
        return out, await batcher.submit(block(100, 1))

    (held, bad, also_bad), after = asyncio.run(main())
    batcher.close()
    assert isinstance(held, np.ndarray)
    assert isinstance(bad, RuntimeError) and isinstance(also_bad, RuntimeError)  # rows 10-29 ran together
    assert after[0, 0] == 200.0


def test_cancelled_requests_are_dropped_and_close_answers_the_queue():
    gate = threading.Event()
    model = Model(gate)
    batcher = Batcher(model, max_rows=10, max_wait_s=60)

    async def main():
        running = asyncio.ensure_future(batcher.submit(block(0, 10)))
        await asyncio.sleep(0.1)
        gone = asyncio.ensure_future(batcher.submit(block(10, 10)))
        await asyncio.sleep(0.05)
        gone.cancel()  # a client that went away
        kept = asyncio.ensure_future(batcher.submit(block(20, 10)))
        await asyncio.sleep(0.05)
        gate.set()
        await running
        await kept
        closing = asyncio.ensure_future(asyncio.to_thread(batcher.close))
        await closing
        with pytest.raises(Closed):
            await batcher.submit(block(30, 10))

    asyncio.run(main())
    assert [b[0] for b in model.batches] == [0, 20]


def test_malloc_arena_limit_applies_on_glibc_and_defers_to_the_environment(monkeypatch):
    if os.uname().sysname != "Linux" or os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("not glibc: nothing to bound")
    assert limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_wait_time_is_reported_per_batch():
    seen = []
    batcher = Batcher(Model(), max_rows=40, max_wait_s=60, observe=lambda *a: seen.append(a))

    async def main():
        await asyncio.gather(*(batcher.submit(block(10 * i, 10)) for i in range(3)))

    t0 = time.perf_counter()
    asyncio.run(main())
    batcher.close()
    assert sum(rows for rows, _, _ in seen) == 30 and sum(n for _, n, _ in seen) == 3
    assert all(0 <= wait <= time.perf_counter() - t0 for _, _, wait in seen)
