"""Service settings, read once from the environment (12-factor style), validated with clear errors."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from core.errors import ConfigError
from core.flavours import INT8, NUMBER_FORMATS, ONNXRUNTIME, PYTORCH, TENSORRT, for_runtime
from serving.bento_model import bento_model_tag

BACKENDS = ("auto", TENSORRT, ONNXRUNTIME, PYTORCH)


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r}: use 1 or 0")


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from ``RESDEPLOY_*`` environment variables.

    Attributes:
        artifacts: artifact directory (``RESDEPLOY_ARTIFACTS``); empty = the BentoML model.
        bento_model: model-store tag used when ``artifacts`` is empty: ``RESDEPLOY_BENTO_MODEL``, else in a
            built Bento the model it packed, else ``resdeploy-digits:latest`` (serving/bento_model.py).
        backend / precision: engine choice (``RESDEPLOY_BACKEND`` / ``RESDEPLOY_PRECISION``).
        max_batch: adaptive-batching cap in crops, a multiple of 10 (``RESDEPLOY_MAX_BATCH``).
        max_latency_ms: how long a request may wait for the model before a 503 (``RESDEPLOY_MAX_LATENCY_MS``).
        max_bytes / max_pixels: request and image limits (``RESDEPLOY_MAX_BYTES`` / ``_MAX_PIXELS``).
        warmup_iters: warm-up runs per batch size before /readyz says ready.
        threads: ONNX Runtime intra-op threads (0 = ORT's default).
        workers: service worker processes, each with its own model and batcher (``RESDEPLOY_WORKERS``).
        gpus: GPUs the workers are spread over, worker i on GPU (i - 1) mod gpus (``RESDEPLOY_GPUS``).
        access_log: BentoML's per-request access log lines (``RESDEPLOY_ACCESS_LOG=1``). Off by default:
            /metrics counts requests, and py-spy showed the log line among the largest per-request
            costs on the event loop (docs/design.md#serving).
        trace: OpenTelemetry spans for /classify and /classify_batch (``RESDEPLOY_TRACE=1``). Off by
            default: with no exporter configured they are built and dropped, at a cost per request.
        timeout_s: BentoML's per-request timeout, a 504 past it (``RESDEPLOY_TIMEOUT_S``; default the
            queueing budget + 30 s).
        model_name: the Open Inference Protocol's model name (``RESDEPLOY_MODEL_NAME``; empty = the
            manifest's ``ARCH_DATASET``, the name ``resdeploy triton`` gives the same artifacts).
        decode_threads: threads per worker decoding and cropping uploads (``RESDEPLOY_DECODE_THREADS``;
            0 = half the CPUs this process may use, at least 1).
    """

    artifacts: str
    bento_model: str
    backend: str
    precision: str
    max_batch: int
    max_latency_ms: int
    max_bytes: int
    max_pixels: int
    warmup_iters: int
    threads: int
    workers: int
    gpus: int
    decode_threads: int
    access_log: bool
    trace: bool
    timeout_s: int
    model_name: str = ""

    @classmethod
    def from_env(cls) -> "Settings":
        backend = os.environ.get("RESDEPLOY_BACKEND", "auto").lower()
        if backend not in BACKENDS:
            raise ConfigError(f"RESDEPLOY_BACKEND={backend!r}: choose one of {', '.join(BACKENDS)}")
        precision = os.environ.get("RESDEPLOY_PRECISION", "fp32").lower()
        if precision not in NUMBER_FORMATS:
            cpu_int8 = for_runtime(INT8.number_format, ONNXRUNTIME, cpu_only=True)
            raise ConfigError(f"RESDEPLOY_PRECISION={precision!r}: choose {', '.join(NUMBER_FORMATS)} "
                              f"({INT8.number_format} means the {cpu_int8.name} file on ONNX Runtime CPU)")
        max_batch = _int("RESDEPLOY_MAX_BATCH", 40, 10)
        if max_batch % 10:
            raise ConfigError(f"RESDEPLOY_MAX_BATCH={max_batch} must be a multiple of 10 (a 10-crop request "
                              "is 10 rows and is never split across batches)")
        # The queueing budget (503 past it). 500 ms shed load on 2 CPUs (docs/design.md); 60 s never
        # sheds a queue we can serve.
        max_latency_ms = _int("RESDEPLOY_MAX_LATENCY_MS", 60_000, 10)
        # BentoML's request timeout (504 past it). It must outlast the queueing budget; and it is kept
        # short because BentoML 1.4's TimeoutMiddleware leaves a timer per request pending for the
        # whole timeout (docs/design.md#serving): memory grows for that long at any request rate.
        timeout_s = _int("RESDEPLOY_TIMEOUT_S", max_latency_ms // 1000 + 30, 1)
        if timeout_s * 1000 <= max_latency_ms:
            raise ConfigError(f"RESDEPLOY_TIMEOUT_S={timeout_s} must exceed RESDEPLOY_MAX_LATENCY_MS={max_latency_ms} "
                              "(in seconds) so queued requests are answered 503, not cut off")
        artifacts = os.environ.get("RESDEPLOY_ARTIFACTS", "")
        return cls(
            artifacts=artifacts,
            # With RESDEPLOY_ARTIFACTS the model store is not read: no Bento lookup that could fail.
            bento_model=bento_model_tag(bento=None if artifacts else "detect"),
            backend=backend, precision=precision, max_batch=max_batch,
            max_latency_ms=max_latency_ms,
            max_bytes=_int("RESDEPLOY_MAX_BYTES", 20 * 1024 * 1024, 1024),
            max_pixels=_int("RESDEPLOY_MAX_PIXELS", 40_000_000, 1),
            warmup_iters=_int("RESDEPLOY_WARMUP_ITERS", 3, 1),
            threads=_int("RESDEPLOY_THREADS", 0, 0),
            workers=_int("RESDEPLOY_WORKERS", 1, 1),
            gpus=_int("RESDEPLOY_GPUS", 1, 1),
            decode_threads=_int("RESDEPLOY_DECODE_THREADS", 0, 0),
            access_log=_flag("RESDEPLOY_ACCESS_LOG"),
            trace=_flag("RESDEPLOY_TRACE"),
            timeout_s=timeout_s,
            model_name=_model_name(os.environ.get("RESDEPLOY_MODEL_NAME", "")),
        )


def _model_name(raw: str) -> str:
    if raw and not re.fullmatch(r"[A-Za-z0-9_.-]+", raw):
        raise ConfigError(f"RESDEPLOY_MODEL_NAME={raw!r}: use letters, digits, '_', '.' and '-' only (it is a URL "
                          "path segment)")
    return raw
