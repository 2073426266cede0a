"""The default engine: decode processes feeding one batched backend in this process.

Decoding (file read, JPEG/PNG decode, resize, crops) runs in ``workers`` spawned processes, a chunk
of files per task, while this process runs the model on batches of up to ``max_batch`` crops (an
image's crops are never split across batches) and writes shards as they complete. Tasks are
submitted a bounded window ahead, in input order, so memory stays flat on any number of files and
the model rarely waits. ``workers=0`` decodes in this process (no overlap; for debugging).
The pool is started (:func:`decode_pool`) before the model loads, so spawning the workers and their
imports overlap the model's load instead of delaying the first batch.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from core.parent import exit_with_parent
from predict.rows import DecodeSpec, decode_many, result_row
from predict.shards import Shard, ShardPlan
from predict.stats import Progress, RunStats


def _init_decoder() -> None:
    # Ctrl-C reaches the whole process group; the parent decides (stop, keep finished shards).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed hard (SIGKILL, the OOM killer) shuts nothing down, and a worker waiting for its
    # next task would wait forever (it holds the task queue's write end itself): leave when it is gone.
    exit_with_parent(kernel_signal=False)  # the pool may spawn from a passing thread


def _ready() -> bool:
    return True  # unpickling this task in a worker imported predict.rows (numpy, Pillow) already


def decode_pool(workers: int) -> ProcessPoolExecutor | None:
    """``workers`` spawned decode processes, started now (None for 0: decode in this process)."""
    if workers == 0:
        return None
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_decoder)
    for _ in range(workers):
        pool.submit(_ready)
    return pool


class ShardAssembler:
    """Collects result rows by input index and writes each shard the moment it is whole."""

    def __init__(self, plan: ShardPlan, todo: list[Shard]):
        self.plan = plan
        self.rows = {s.index: [None] * (s.stop - s.start) for s in todo}
        self.left = {s.index: s.stop - s.start for s in todo}
        self.by_index = {s.index: s for s in todo}
        self.size = plan.plan["shard_size"]

    def add(self, i: int, row: dict) -> None:
        si = i // self.size
        shard = self.by_index[si]
        if self.rows[si][i - shard.start] is None:
            self.left[si] -= 1
        self.rows[si][i - shard.start] = row
        if self.left[si] == 0:
            self.plan.write(shard, self.rows.pop(si))
            del self.left[si]

    @property
    def complete(self) -> bool:
        return not self.left


def run_local(model, plan: ShardPlan, todo: list[Shard], spec: DecodeSpec, k: int, max_batch: int,
              pool: ProcessPoolExecutor | None, workers: int, progress: Progress) -> RunStats:
    """Classify every file of the ``todo`` shards with ``pool``'s ``workers`` decode processes
    (None and 0: in this process); return what it took. The caller shuts the pool down."""
    crops_per = 10 if spec.tta == "ten_crop" else 1
    per_batch = max(1, max_batch // crops_per)
    cfg, labels, sha = model.preprocess, model.labels, model.entry.sha256
    assembler = ShardAssembler(plan, todo)
    stats = RunStats(engine="local", workers=workers)
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        logits = model.backend.infer_uint8(np.concatenate([c for _, c in batch]), cfg.mean, cfg.std)
        stats.model_s += time.perf_counter() - t0
        for j, (i, _) in enumerate(batch):
            assembler.add(i, result_row(plan.paths[i], logits[j * crops_per:(j + 1) * crops_per], None, k, labels,
                                        spec.tta, sha))
        progress.update(len(batch))
        batch.clear()

    def take(start: int, results) -> None:
        for i, (crops, error) in enumerate(results, start):
            if error is not None:
                assembler.add(i, result_row(plan.paths[i], None, error, k, labels, spec.tta, sha))
                stats.errors += 1
                progress.update(1, errors=stats.errors)
                continue
            batch.append((i, crops))
            if len(batch) == per_batch:
                flush()

    chunks = [(a, plan.paths[a:min(a + per_batch, s.stop)]) for s in todo for a in range(s.start, s.stop, per_batch)]
    stats.start()
    if pool is None:
        for a, paths in chunks:
            t0 = time.perf_counter()
            results = decode_many(paths, spec)
            stats.wait_s += time.perf_counter() - t0
            take(a, results)
    else:
        window: deque = deque()
        feed = iter(chunks)
        for a, paths in feed:
            window.append((a, pool.submit(decode_many, paths, spec)))
            if len(window) >= 4 * workers + 2:
                break
        while window:
            a, fut = window.popleft()
            t0 = time.perf_counter()
            results = fut.result()
            stats.wait_s += time.perf_counter() - t0
            nxt = next(feed, None)
            if nxt is not None:
                window.append((nxt[0], pool.submit(decode_many, nxt[1], spec)))
            take(a, results)
    flush()
    stats.stop(images=sum(s.stop - s.start for s in todo))
    assert assembler.complete, "every shard should have been written"
    return stats
