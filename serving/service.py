"""The BentoML service: ``bentoml serve serving.service:Classifier``.

Two services (the BentoYolo pattern, docs/design.md):

* ``Classifier`` (public): reads and limits the upload, decodes, validates and crops it with the
  shared preprocessing, sends the crops to the engine and averages softmax over them.
* ``Engine`` (inner, batchable): one backend, adaptive batching over *rows*, i.e. crops of many
  requests (a 10-crop request is 10 rows; ``max_batch_size`` is a multiple of 10).

Model source: ``RESDEPLOY_ARTIFACTS=DIR``, else the BentoML model-store model
``RESDEPLOY_BENTO_MODEL`` (default ``resdeploy-digits:latest``), referenced at class scope so that
``bentoml build`` packs it. Hashes are verified before anything is loaded. Settings: serving/config.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from pathlib import Path

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.routing import Route

from core.manifest import read_labels, read_manifest
from core.scores import softmax, top_k
from serving import http
from serving.config import Settings
from serving.engine import LoadedModel, check_directory, load_model, warm_up

log = logging.getLogger("serving")
SETTINGS = Settings.from_env()
if SETTINGS.artifacts:
    check_directory(SETTINGS.artifacts)


@functools.cache
def metrics():
    """Prometheus metrics, created lazily: BentoML sets the multiprocess directory after import."""
    import prometheus_client as p

    return {
        "preprocess": p.Histogram("resdeploy_preprocess_seconds", "decode + crop time per image",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)),
        "crops": p.Histogram("resdeploy_crops_per_batch", "rows (crops) per engine batch",
                             buckets=(1, 2, 5, 10, 11, 20, 30, 40, 60, 80, 100, 200)),
        "rejected": p.Counter("resdeploy_rejected_requests", "requests answered 4xx/503, by reason", ["reason"]),
    }


def _directory(svc) -> Path:
    return Path(SETTINGS.artifacts) if SETTINGS.artifacts else Path(svc.bento_model.path)


def _device_id() -> int:
    """One GPU per worker: BentoML's worker_index is 1-based."""
    index = getattr(bentoml.server_context, "worker_index", None)
    return max(0, (index or 1) - 1)


# BentoML 1.4.40's client to a dependency replaces its aiohttp session every 100 requests or 300 s
# (runner_connection defaults) by closing the old one while calls on it are still in flight: under
# concurrent load those fail ("Connector is closed.", "Server disconnected") and became 503s here
# (tests/test_service.py reproduces it with 64-request bursts). The engine is a local worker whose
# address never changes, so the session is never refreshed.
NO_SESSION_REFRESH = {"max_requests": 2**62, "max_age": 1e12}


@bentoml.service(name="resdeploy_engine", traffic={"timeout": 300}, runner_connection=NO_SESSION_REFRESH)
class Engine:
    """Loads, verifies and warms the backend in the background; ``/readyz`` is 503 until done."""

    if not SETTINGS.artifacts:
        bento_model = bentoml.models.BentoModel(SETTINGS.bento_model)

    def __init__(self) -> None:
        self.model: LoadedModel | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        metrics()
        threading.Thread(target=self._load, name="resdeploy-load", daemon=True).start()

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            self.model = load_model(_directory(self), SETTINGS.backend, SETTINGS.precision, _device_id(),
                                    SETTINGS.threads)
            warm_up(self.model, sorted({1, 10, SETTINGS.max_batch}), SETTINGS.warmup_iters)
            self.ready.set()
            log.info("engine ready in %.1f s: %s", time.perf_counter() - t0, self.model.backend.describe())
        except BaseException as e:  # surfaced by /readyz staying 503 and by infer()
            self.error = e
            log.exception("engine failed to load")

    def __is_ready__(self) -> bool:
        return self.ready.is_set()

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def infer(self, crops: np.ndarray) -> np.ndarray:
        """Logits for a batch of preprocessed crops (rows of many requests)."""
        if not self.ready.wait(timeout=0 if self.error else 120):
            raise bentoml.exceptions.ServiceUnavailable(f"engine not ready: {self.error or 'still loading'}")
        metrics()["crops"].observe(len(crops))
        return self.model.backend.infer(np.ascontiguousarray(crops, dtype=np.float32))

    @bentoml.api
    def describe(self) -> dict:
        """The loaded model's summary (backend, precision, hashes)."""
        if not self.ready.is_set():
            raise bentoml.exceptions.ServiceUnavailable("engine not ready")
        return self.model.summary() | {"backend_info": self.model.backend.describe()}


async def _classify_images(request, batch: bool):
    svc = bentoml.get_current_service()
    t0 = time.perf_counter()
    try:
        body = await http.read_body(request, SETTINGS.max_bytes)
        max_files = 32 if batch else 1
        form = await http.parse_form(request, body, max_files)
        images = await http.images_from(form, max_files)
        k, tta = http.options(form, svc.num_classes)
        # All images at once, so the engine batches their crops together.
        results = list(await asyncio.gather(*(svc.classify_bytes(data, k, tta) for data in images)))
    except http.HTTPError as e:
        metrics()["rejected"].labels(e.error).inc()
        return http.error_response(e)
    if not batch:  # the whole request, upload and parsing included
        results[0]["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1000, 3)
    return http.json_response(results if batch else results[0])


async def classify(request):
    return await _classify_images(request, batch=False)


async def classify_batch(request):
    return await _classify_images(request, batch=True)


async def model(request):
    svc = bentoml.get_current_service()
    try:
        info = await svc.engine.to_async.describe()
    except Exception as e:
        return http.error_response(http.HTTPError(503, "not_ready", f"engine not ready: {e}"))
    return http.json_response(info)


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]),
                        Route("/classify_batch", classify_batch, methods=["POST"]),
                        Route("/model", model, methods=["GET"])])


@bentoml.service(name="resdeploy", traffic={"timeout": 300})
@bentoml.asgi_app(app, path="/")
class Classifier:
    """Public endpoints: ``POST /classify``, ``POST /classify_batch``, ``GET /model``."""

    engine = bentoml.depends(Engine)
    if not SETTINGS.artifacts:
        bento_model = bentoml.models.BentoModel(SETTINGS.bento_model)

    def __init__(self) -> None:
        directory = _directory(self)
        self.manifest = read_manifest(directory)
        self.labels = read_labels(directory, self.manifest)  # hash-checked
        self.num_classes = self.manifest.num_classes
        self.preprocess = self.manifest.preprocess_config
        self.model_info: dict | None = None
        metrics()

    async def classify_bytes(self, data: bytes, k: int, tta: str) -> dict:
        """Decode, crop, infer, average softmax over crops, top-k (one image)."""
        import anyio

        t0 = time.perf_counter()
        crops = await anyio.to_thread.run_sync(http.decode_and_crop, data, self.preprocess, tta, SETTINGS.max_pixels)
        t_pre = time.perf_counter()
        metrics()["preprocess"].observe(t_pre - t0)
        try:
            logits = await self.engine.to_async.infer(crops)
        except Exception as e:
            metrics()["rejected"].labels("engine_unavailable").inc()
            raise http.HTTPError(503, "engine_unavailable", f"inference failed: {e}") from e
        t_inf = time.perf_counter()
        if self.model_info is None:  # the engine's real choice (auto backend; the int8 file the runtime loads)
            described = await self.engine.to_async.describe()
            self.model_info = {key: described[key] for key in ("arch", "precision", "backend", "sha256")}
        probs = softmax(np.asarray(logits, dtype=np.float64)).mean(axis=0)
        best = top_k(probs, k, self.labels)
        return {"top1": best[0], "top_k": best, "tta": tta,
                "model": self.model_info,
                "timing_ms": {"preprocess": round((t_pre - t0) * 1000, 3),
                              "inference": round((t_inf - t_pre) * 1000, 3),
                              "total": round((time.perf_counter() - t0) * 1000, 3)}}
