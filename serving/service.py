"""The BentoML service: ``bentoml serve serving.service:Classifier``.

One service, one process per worker (``RESDEPLOY_WORKERS``, default 1), each holding:

* the public endpoints (a Starlette app, serving/http.py): read and limit the upload, decode,
  validate and crop it with the shared preprocessing into uint8 crops, on a small thread pool;
* one backend and one inference thread fed by an in-process adaptive batcher (serving/batcher.py)
  over *rows*, i.e. crops of many requests (a 10-crop request is 10 rows; ``max_batch`` is a
  multiple of 10). The backend normalises the uint8 crops where it runs (``infer_uint8``).

Why not BentoML's two-service pattern (a batchable inner service over ``bentoml.depends``), which
this service used until issue #11: every request paid a second HTTP hop, pickled float32 crops
both ways and a per-call client, ~6 ms of host CPU per digits request on the dev CPU, and the
server delivered 40-55% of its own in-process pipeline; docs/design.md#serving has the figures.

Model source: ``RESDEPLOY_ARTIFACTS=DIR``, else the BentoML model-store model
``RESDEPLOY_BENTO_MODEL`` (default: in a built Bento the model it packed, else
``resdeploy-digits:latest``; serving/bento_model.py), referenced at class scope so that
``bentoml build`` packs it. Hashes are verified before anything is loaded. Settings: serving/config.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import bentoml
from starlette.applications import Starlette
from starlette.routing import Route

from core.errors import ResdeployError
from core.parent import exit_with_parent
from core.manifest import read_labels, read_manifest
from core.scores import crop_average, top_k
from serving import http, v2
from serving.batcher import Batcher, Closed, Overloaded, resolve
from serving.config import Settings
from serving.engine import LoadedModel, check_directory, load_model, warm_up
from serving.lifecycle import accepts_before_ready
from serving.memory import limit_malloc_arenas
from serving.metrics import metrics

log = logging.getLogger("serving")
try:
    SETTINGS = Settings.from_env()
    if SETTINGS.artifacts:
        check_directory(SETTINGS.artifacts)
except ResdeployError as e:  # a bad RESDEPLOY_* value: one line naming it and the fix, not a traceback
    raise SystemExit(f"resdeploy: {e}") from None


def _observe(rows: int, requests: int, wait_s: float) -> None:
    m = metrics()
    m["crops"].observe(rows)
    m["requests"].observe(requests)
    m["queue"].observe(wait_s)


def _device_id() -> int:
    """Worker i (BentoML's worker_index is 1-based) runs on GPU (i - 1) mod RESDEPLOY_GPUS."""
    index = getattr(bentoml.server_context, "worker_index", None)
    return max(0, (index or 1) - 1) % SETTINGS.gpus


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


async def _classify_images(request, batch: bool):
    svc = bentoml.get_current_service()
    t0 = time.perf_counter()
    try:
        body = await http.read_body(request, SETTINGS.max_bytes)
        max_files = 32 if batch else 1
        form = await http.parse_form(request, body, max_files)
        images = await http.images_from(form, max_files)
        k, tta = http.options(form, svc.num_classes)
        # All images at once, so the batcher runs their crops together.
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
        loaded = svc.loaded()
    except http.HTTPError as e:
        return http.error_response(e)
    return http.json_response(loaded.summary() | {"backend_info": loaded.backend.describe(),
                                                  "worker": {"index": svc.worker_index, "pid": os.getpid()}})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]),
                        Route("/classify_batch", classify_batch, methods=["POST"]),
                        Route("/model", model, methods=["GET"]),
                        *v2.routes()])  # the Open Inference Protocol (serving/v2.py)


@bentoml.service(name="resdeploy", traffic={"timeout": SETTINGS.timeout_s}, workers=SETTINGS.workers,
                 logging={"access": {"enabled": SETTINGS.access_log}},
                 tracing={"excluded_urls": [] if SETTINGS.trace else ["/classify"]})
@bentoml.asgi_app(app, path="/")
class Classifier:
    """Public endpoints: ``POST /classify``, ``POST /classify_batch``, ``GET /model``, and the Open
    Inference Protocol's ``/v2/...`` (serving/v2.py).

    The model loads, is hash-verified and warmed up in a background thread; ``/readyz`` is 503
    until then (``__is_ready__``), and so is every request. With several workers a worker does not
    accept connections until then (``_accept_when_ready``, serving/lifecycle.py), and every worker
    leaves on its own when the arbiter dies.
    """

    if not SETTINGS.artifacts:
        bento_model = bentoml.models.BentoModel(SETTINGS.bento_model)

    def __init__(self) -> None:
        self.worker_index = getattr(bentoml.server_context, "worker_index", None)  # set in served workers
        if self.worker_index is not None:  # a worker of `bentoml serve`, not an in-process instance
            exit_with_parent()
        limit_malloc_arenas()
        self.directory = Path(SETTINGS.artifacts) if SETTINGS.artifacts else Path(self.bento_model.path)
        self.manifest = read_manifest(self.directory)
        self.labels = read_labels(self.directory, self.manifest)  # hash-checked
        self.num_classes = self.manifest.num_classes
        self.settings = SETTINGS
        self.model_name = SETTINGS.model_name or self.manifest.model_name  # the v2 protocol's name
        self.preprocess = self.manifest.preprocess_config
        self.model: LoadedModel | None = None
        self.model_info: dict | None = None
        self.batcher: Batcher | None = None  # uint8 crops: /classify, /classify_batch, v2 images and pixels
        self.float_batcher: Batcher | None = None  # normalised float32 rows: v2's FP32 input
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.settled = threading.Event()  # loaded or failed: either way the worker can answer
        # Half the CPUs decode by default: the model's own threads take the rest (on 2 cores one decode
        # thread served ~8% more than two, docs/design.md#serving).
        self.decoders = ThreadPoolExecutor(SETTINGS.decode_threads or max(1, _cpus() // 2),
                                           thread_name_prefix="resdeploy-decode")
        metrics()
        threading.Thread(target=self._load, name="resdeploy-load", daemon=True).start()

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            model = load_model(self.directory, SETTINGS.backend, SETTINGS.precision, _device_id(),
                               SETTINGS.threads, SETTINGS.max_batch)
            warm_up(model, sorted({1, 10, SETTINGS.max_batch}), SETTINGS.warmup_iters)
            mean, std = model.preprocess.mean, model.preprocess.std
            # Two queues, one model: the lock keeps their inference threads off the backend at once
            # (a TensorRT execution context is not re-entrant).
            lock = threading.Lock()

            def run_uint8(rows):
                with lock:
                    return model.backend.infer_uint8(rows, mean, std)

            def run_float(rows):
                with lock:
                    return model.backend.infer(rows)

            budget = SETTINGS.max_latency_ms / 1000
            self.batcher = Batcher(run_uint8, SETTINGS.max_batch, budget, _observe)
            self.float_batcher = Batcher(run_float, SETTINGS.max_batch, budget, _observe, "resdeploy-batcher-fp32")
            self.model = model
            self.model_info = {"arch": model.manifest.arch, "precision": model.entry.precision,
                               "backend": model.backend.name, "sha256": model.entry.sha256}
            self.ready.set()
            log.info("model ready in %.1f s (worker %s, pid %d): %s", time.perf_counter() - t0, self.worker_index,
                     os.getpid(), model.backend.describe())
        except BaseException as e:  # surfaced by /readyz staying 503 and by every request
            self.error = e
            log.exception("model failed to load")
        finally:
            self.settled.set()

    @bentoml.on_startup
    async def _accept_when_ready(self) -> None:
        """BentoML awaits this in the ASGI lifespan start-up, before uvicorn accepts a connection: with
        several workers, wait for the model (or its failure, which requests then report as 503)."""
        if not accepts_before_ready(SETTINGS.workers):
            await asyncio.to_thread(self.settled.wait)

    def __is_ready__(self) -> bool:
        return self.ready.is_set()

    def loaded(self) -> LoadedModel:
        """The ready model, else a 503 saying why not."""
        if not self.ready.is_set():
            detail = f"model failed to load: {self.error}" if self.error else "model still loading; poll /readyz"
            raise http.HTTPError(503, "not_ready", detail)
        return self.model

    async def classify_bytes(self, data: bytes, k: int, tta: str) -> dict:
        """Decode, crop, infer (batched with other requests), average softmax over crops, top-k."""
        t0 = time.perf_counter()
        logits, t_pre = await self.image_logits(data, tta)
        t_inf = time.perf_counter()
        best = top_k(crop_average(logits), k, self.labels)
        return {"top1": best[0], "top_k": best, "tta": tta, "model": self.model_info,
                "timing_ms": {"preprocess": round((t_pre - t0) * 1000, 3),
                              "inference": round((t_inf - t_pre) * 1000, 3),
                              "total": round((time.perf_counter() - t0) * 1000, 3)}}

    async def image_logits(self, data: bytes, tta: str):
        """``(logits of the crops, when decoding ended)``: decode and crop on a decode thread, queue the
        crops for the model, await their batch. Bad images raise a 4xx :class:`http.HTTPError`."""
        self.loaded()  # refuse before decoding anything
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        decoded: list[float] = []

        def decode_and_queue() -> None:  # on a decode thread: decode, crop, queue for the model
            try:
                crops = http.decode_and_crop(data, self.preprocess, tta, SETTINGS.max_pixels)
                decoded.append(time.perf_counter())
                metrics()["preprocess"].observe(decoded[0] - t0)
                self.batcher.put(crops, loop, future)
            except BaseException as e:  # noqa: BLE001 - a 4xx for bad images, else why it failed
                loop.call_soon_threadsafe(resolve, future, None, e)

        self.decoders.submit(decode_and_queue)
        return await _answer(future), decoded[0]

    async def tensor_logits(self, rows):
        """Logits of preprocessed rows: uint8 (N, crop, crop, 3) crops or float32 (N, 3, crop, crop)
        normalised input, batched with other requests of the same kind."""
        self.loaded()
        batcher = self.batcher if rows.dtype == np.uint8 else self.float_batcher
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            batcher.put(rows, loop, future)
        except Closed as e:
            raise http.HTTPError(503, "overloaded", str(e)) from e
        return await _answer(future)


async def _answer(future):
    """A batcher future's logits; queueing and inference failures as 503s."""
    try:
        return await future
    except http.HTTPError:
        raise
    except (Overloaded, Closed) as e:  # counted by reason where the 503 is answered
        raise http.HTTPError(503, "overloaded", str(e)) from e
    except Exception as e:
        raise http.HTTPError(503, "inference_failed", f"inference failed: {e}") from e
