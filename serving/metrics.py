"""The service's Prometheus metrics (``/metrics``), shared by the ``/classify`` and ``/v2`` handlers."""

from __future__ import annotations

import functools


@functools.cache
def metrics():
    """Prometheus metrics, created lazily: BentoML sets the multiprocess directory after import."""
    import prometheus_client as p

    return {
        "preprocess": p.Histogram("resdeploy_preprocess_seconds", "decode + crop time per image",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)),
        "crops": p.Histogram("resdeploy_crops_per_batch", "rows (crops) per inference batch",
                             buckets=(1, 2, 5, 10, 11, 20, 30, 40, 60, 80, 100, 200, 400)),
        "requests": p.Histogram("resdeploy_requests_per_batch", "images (requests' blocks of rows) per inference batch",
                                buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64)),
        "queue": p.Histogram("resdeploy_queue_seconds", "wait of the oldest request in a batch for the model",
                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)),
        "rejected": p.Counter("resdeploy_rejected_requests", "requests answered 4xx/503, by reason", ["reason"]),
    }
