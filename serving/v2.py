"""Open Inference Protocol (KServe v2) REST endpoints beside ``/classify``, on the same model and batcher.

The v2 model (named ``RESDEPLOY_MODEL_NAME``, default the manifest's ``ARCH_DATASET``, version 1)
takes exactly one of three inputs per request:

* ``image``: ``BYTES`` ``[N]``, encoded images (binary, or base64 strings in JSON), decoded and
  cropped here with the same preprocessing as ``/classify``; parameter ``tta`` = ``ten_crop``
  (default) or ``center``; at most 32 images.
* ``pixels``: ``UINT8`` ``[N, crop, crop, 3]``, crops already resized and cropped (what the service
  batches internally).
* the ONNX file's own input (``input``): ``FP32`` ``[N, 3, crop, crop]``, already normalised, so a
  client written for the Triton repository of ``resdeploy triton`` runs here unchanged.

Outputs: ``probabilities`` ``FP32`` ``[N, classes]`` (an image: the mean of its crops' softmax, what
``/classify`` reports) and, for tensor inputs, the ONNX output (``logits``). The classification
extension (output parameter ``classification: k``) answers ``BYTES`` ``[N, k]`` strings
``"score:index:label"`` as Triton does. Errors are 4xx (503 while loading) with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import zlib

import numpy as np
from starlette.responses import JSONResponse, Response

from core import __version__
from core.preprocess import TTA_MODES
from core.scores import crop_average, softmax, top_k_indices
from serving import http
from serving.metrics import metrics
from serving.v2_codec import BYTES, HEADER_LENGTH, ProtocolError, RequestedOutput, encode_response, parse_request

VERSION = "1"
IMAGE, PIXELS, PROBS = "image", "pixels", "probabilities"
MAX_IMAGES = 32  # as /classify_batch
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "pytorch": "pytorch"}
log = logging.getLogger("serving")
# resdeploy_rejected_requests_total{reason} of protocol errors, by status (image errors keep /classify's reasons)
REASONS = {404: "v2_not_found", 413: "request_too_large", 415: "unsupported_media_type"}
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration"]


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _svc():
    import bentoml

    return bentoml.get_current_service()


def _model(request):
    """The service, after checking the path's model name and version (404 otherwise)."""
    svc = _svc()
    name, version = request.path_params["model"], request.path_params.get("version")
    if name != svc.model_name:
        raise ProtocolError(f"unknown model {name!r}; this server serves {svc.model_name!r}", 404)
    if version not in (None, VERSION):
        raise ProtocolError(f"model {name!r} has no version {version!r}; it has version {VERSION}", 404)
    return svc


def _guard(handler):
    async def wrapped(request):
        try:
            return await handler(request)
        except ProtocolError as e:
            metrics()["rejected"].labels(REASONS.get(e.status, "v2_bad_request")).inc()
            return _error(str(e), e.status)
        except http.HTTPError as e:
            metrics()["rejected"].labels(e.error).inc()
            return _error(e.detail, e.status)
        except Exception as e:  # a bug of ours: still the protocol's JSON error body
            log.exception("v2 %s failed", request.url.path)
            return _error(f"internal error: {type(e).__name__}: {e}", 500)
    return wrapped


@_guard
async def live(request):
    return Response(status_code=200)


@_guard
async def ready(request):  # the protocol: 200 ready, 4xx not (empty bodies)
    return Response(status_code=200 if _svc().ready.is_set() else 400)


@_guard
async def server_metadata(request):
    return JSONResponse({"name": "resdeploy", "version": __version__, "extensions": EXTENSIONS})


@_guard
async def model_ready(request):
    return Response(status_code=200 if _model(request).ready.is_set() else 400)


def _io(svc) -> tuple[list[dict], list[dict]]:
    m, crop, n = svc.manifest, svc.manifest.crop, svc.num_classes
    inputs = [{"name": IMAGE, "datatype": BYTES, "shape": [-1]},
              {"name": PIXELS, "datatype": "UINT8", "shape": [-1, crop, crop, 3]},
              {"name": m.input_name, "datatype": "FP32", "shape": [-1, 3, crop, crop]}]
    outputs = [{"name": PROBS, "datatype": "FP32", "shape": [-1, n]},
               {"name": m.output_name, "datatype": "FP32", "shape": [-1, n]}]
    return inputs, outputs


@_guard
async def model_metadata(request):
    svc = _model(request)
    inputs, outputs = _io(svc)
    backend = svc.model.backend.name if svc.model else None
    return JSONResponse({"name": svc.model_name, "versions": [VERSION], "platform": PLATFORMS.get(backend, "resdeploy"),
                         "inputs": inputs, "outputs": outputs})


@_guard
async def model_config(request):
    """Triton's model-configuration extension (``tritonclient``'s ``get_model_config``, perf_analyzer)."""
    svc = _model(request)
    inputs, outputs = _io(svc)
    dtype = {BYTES: "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}
    backend = svc.model.backend.name if svc.model else None
    return JSONResponse({
        "name": svc.model_name, "platform": PLATFORMS.get(backend, "resdeploy"),
        "max_batch_size": svc.settings.max_batch,
        # Any one input per request, hence optional; dims without the batch axis.
        "input": [{"name": i["name"], "data_type": dtype[i["datatype"]], "dims": i["shape"][1:] or [1],
                   "optional": True} for i in inputs],
        "output": [{"name": o["name"], "data_type": "TYPE_FP32", "dims": o["shape"][1:]} for o in outputs]})


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate body (tritonclient's request compression), refused past ``limit`` bytes."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none", 415)
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(f"cannot {encoding}-decompress the body: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(f"the decompressed body exceeds the limit of {limit} bytes", 413)
    return out


def _image_bytes(t) -> list[bytes]:
    if t.datatype != BYTES:
        raise ProtocolError(f"input '{IMAGE}' must be BYTES (encoded images), got {t.datatype}")
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
        raise ProtocolError(f"input '{IMAGE}' must have shape [N] or [N, 1] (one image per row), got {list(t.shape)}")
    if not 1 <= t.shape[0] <= MAX_IMAGES:
        raise ProtocolError(f"{t.shape[0]} images; send 1 to {MAX_IMAGES} per request", 413 if t.shape[0] else 400)
    out = []
    for i, x in enumerate(t.data):
        if isinstance(x, str):  # JSON: base64 text
            try:
                x = base64.b64decode(x, validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError(f"image {i} is a JSON string but not base64; send base64 text or binary "
                                    "data") from None
        if not x:
            raise ProtocolError(f"image {i} is empty")
        out.append(x)
    return out


def _tensor_rows(svc, t, max_rows: int) -> np.ndarray:
    crop, m = svc.manifest.crop, svc.manifest
    want = {PIXELS: ("UINT8", (crop, crop, 3)), m.input_name: ("FP32", (3, crop, crop))}[t.name]
    if t.datatype != want[0] or len(t.shape) != 4 or t.shape[1:] != want[1]:
        raise ProtocolError(f"input '{t.name}' must be {want[0]} of shape [N, {', '.join(map(str, want[1]))}], "
                            f"got {t.datatype} {list(t.shape)}")
    if not 1 <= t.shape[0] <= max_rows:
        raise ProtocolError(f"{t.shape[0]} rows in '{t.name}'; send 1 to {max_rows} per request (RESDEPLOY_MAX_BATCH)",
                            413 if t.shape[0] else 400)
    return np.ascontiguousarray(t.data)


def _classification(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification strings: the top ``k`` of each row as ``"score:index:label"``."""
    if k > scores.shape[1]:
        raise ProtocolError(f"classification {k} exceeds the {scores.shape[1]} classes")
    idx = top_k_indices(scores, k)
    return np.array([[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in r] for row, r in zip(scores, idx)], dtype=object)


@_guard
async def infer(request):
    svc = _model(request)
    settings = svc.settings
    svc.loaded()  # 503 before reading anything while the model loads
    body = await http.read_body(request, settings.max_bytes)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        body = _decompress(body, encoding, settings.max_bytes)
    req = parse_request(body, request.headers.get(HEADER_LENGTH))
    known = [IMAGE, PIXELS, svc.manifest.input_name]
    if len(req.inputs) != 1 or req.inputs[0].name not in known:
        raise ProtocolError(f"send exactly one input, one of {', '.join(known)}; got "
                            f"{', '.join(t.name for t in req.inputs)}")
    t = req.inputs[0]
    tta = req.parameters.get("tta", t.parameters.get("tta"))
    out_names = [PROBS] if t.name == IMAGE else [PROBS, svc.manifest.output_name]
    wanted = req.outputs if req.outputs is not None else [RequestedOutput(n) for n in out_names]
    for o in wanted:
        if o.name not in out_names:
            why = " (per-crop logits: an image's crops are averaged into probabilities)" \
                if o.name == svc.manifest.output_name else ""
            raise ProtocolError(f"unknown output {o.name!r} for input '{t.name}'; choose {', '.join(out_names)}{why}")
    if t.name == IMAGE:
        tta = "ten_crop" if tta is None else tta
        if tta not in TTA_MODES:
            raise ProtocolError(f"parameter tta={tta!r}: choose one of {', '.join(TTA_MODES)}")
        images = _image_bytes(t)
        answers = await asyncio.gather(*(svc.image_logits(data, tta) for data in images))
        scores = {PROBS: np.stack([crop_average(logits) for logits, _ in answers]).astype(np.float32)}
    else:
        if tta is not None:
            raise ProtocolError(f"parameter tta applies to the '{IMAGE}' input; '{t.name}' rows are already crops")
        rows = _tensor_rows(svc, t, settings.max_batch)
        logits = await svc.tensor_logits(rows)
        scores = {PROBS: softmax(logits.astype(np.float64)).astype(np.float32), svc.manifest.output_name: logits}
    outputs = []
    for o in wanted:
        binary = o.binary if o.binary is not None else req.binary_output
        if o.classification:
            outputs.append((o.name, BYTES, _classification(scores[o.name], o.classification, svc.labels), binary))
        else:
            outputs.append((o.name, "FP32", np.asarray(scores[o.name], np.float32), binary))
    content, headers = encode_response(svc.model_name, VERSION, req.id, outputs)
    media = headers.pop("content-type")
    return Response(content, media_type=media, headers=headers)


def routes():
    from starlette.routing import Route

    model = "/v2/models/{model}"
    versioned = model + "/versions/{version}"
    return [Route("/v2", server_metadata, methods=["GET"]),
            Route("/v2/health/live", live, methods=["GET"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
            *(r for base in (model, versioned) for r in (
                Route(base, model_metadata, methods=["GET"]),
                Route(base + "/ready", model_ready, methods=["GET"]),
                Route(base + "/config", model_config, methods=["GET"]),
                Route(base + "/infer", infer, methods=["POST"])))]
