"""CUDA graphs for :class:`backends.pytorch.TorchBackend`: one captured forward per batch size.

A CUDA graph replays a fixed sequence of kernels on fixed addresses, so it cannot take a batch of
any size: the backend captures one graph per size of a ladder (1, 2, 4, ... up to and including
``max_batch_size``), all reading the first rows of one static device input. A batch of ``n`` rows
is copied into the first ``n`` rows of that input and runs the graph of the smallest captured size
``>= n``; the rows past ``n`` hold whatever an earlier batch left there (every layer of a ResNet in
eval mode treats rows independently) and their outputs are discarded.

Capture follows PyTorch's CUDA graphs notes (docs/source/notes/cuda.rst, "CUDA Graphs"): a few
warm-up runs on a side stream, then ``torch.cuda.graph`` capturing on that side stream. The graphs
share one memory pool ("Sharing memory across captures"), captured from the largest size down so
the smaller ones reuse its blocks. The notes call a shared pool safe for graphs replayed in their
capture order and never concurrently; the order does not matter here because no graph reads what
another one wrote: the static input and the mean/std tensors live outside the pool, the backend
replays one graph at a time under a lock, and it copies each output out before the next replay
(a later replay of another size may overwrite it). The caller holds the device context and
``torch.no_grad()``; replay runs on the calling thread's current stream, whichever thread captured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

WARMUP_RUNS = 3


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a graph is captured for: powers of two below ``max_batch``, then ``max_batch``.

    >>> graph_batch_sizes(1), graph_batch_sizes(8), graph_batch_sizes(48)
    ((1,), (1, 2, 4, 8), (1, 2, 4, 8, 16, 32, 48))
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max batch size must be a positive integer, got {max_batch!r}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def padded_batch(n: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``n`` rows.

    Raises:
        ValueError: ``n`` is below 1 or above every size.
    """
    fits = [s for s in sizes if s >= n]
    if n < 1 or not fits:
        raise ValueError(f"batch of {n} does not fit the captured sizes {sorted(sizes)}")
    return min(fits)


class GraphLadder:
    """CUDA graphs of ``forward(static_input[:size])``, one per size.

    Args:
        forward: device uint8 crops -> float32 logits, only CUDA work (capturable).
        static_input: the device buffer every graph reads; it holds at least ``max(sizes)`` rows.
        sizes: the batch sizes to capture, e.g. :func:`graph_batch_sizes`.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], static_input: torch.Tensor,
                 sizes: Sequence[int]):
        if max(sizes) > static_input.shape[0]:
            raise ValueError(f"static input of {static_input.shape[0]} rows is smaller than {max(sizes)}")
        self.sizes = tuple(sorted(sizes))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()  # on the current device (the caller's device context)
        for size in sorted(sizes, reverse=True):
            x = static_input[:size]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy initialisation (cuDNN plans, workspaces) off the capture
                for _ in range(WARMUP_RUNS):
                    forward(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # An explicit stream: torch.cuda.graph's own default is created once, on whichever device
            # captured first; and captures that share a pool should share the stream too.
            with torch.cuda.graph(graph, pool=pool, stream=side):
                out = forward(x)
            self._graphs[size] = (graph, out)  # `out` is the static output: replays rewrite it
        torch.cuda.synchronize()

    def run(self, n: int) -> torch.Tensor:
        """Replay the graph for ``n`` rows (already in the static input); the first ``n`` output rows.

        The returned tensor is a view of a static output: copy it out before the next :meth:`run`.
        """
        graph, out = self._graphs[padded_batch(n, self.sizes)]
        graph.replay()
        return out[:n]
