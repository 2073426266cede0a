"""The Open Inference Protocol's (KServe v2) REST wire format: requests in, responses out.

Pure parsing and encoding, no model and no web framework, so every malformed request is a
:class:`ProtocolError` (a 4xx with the protocol's ``{"error": "..."}`` body) before anything runs.

* An inference request is a JSON object ``{"id"?, "parameters"?, "inputs": [...], "outputs"?: [...]}``;
  each input is ``{"name", "datatype", "shape", "parameters"?, "data"?}``.
* Binary tensor data extension: with an ``Inference-Header-Content-Length: N`` header the JSON is
  the first N bytes of the body and the tensors whose ``parameters.binary_data_size`` is set follow
  it, in input order, as raw little-endian bytes; a ``BYTES`` element is a 4-byte little-endian
  length and its bytes. Responses use the same form for outputs asked for with ``binary_data``
  (or every output with the request parameter ``binary_data_output``).
* In JSON, ``BYTES`` elements are strings; the service reads an image sent that way as base64.

Spec: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol and
Triton's binary data extension (docs/protocol/extension_binary_data.md).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

# Protocol datatype -> numpy dtype (little-endian); BYTES is handled apart.
DTYPES = {"BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
          "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
          "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
BYTES = "BYTES"
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ELEMENTS = 50_000_000  # a shape may not promise more than this (the body limit binds first)


class ProtocolError(Exception):
    """A request the protocol cannot take: HTTP ``status`` with ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    """One input tensor: ``data`` is an ndarray, or a list of ``bytes``/``str`` for ``BYTES``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: object
    parameters: dict = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request's binary_data_output decides
    classification: int = 0  # >0: the top-k "score:index:label" strings in place of the tensor


@dataclass
class InferRequest:
    id: str | None
    parameters: dict
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output the model has for these inputs

    @property
    def binary_output(self) -> bool:
        return self.parameters.get("binary_data_output") is True


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _shape(raw, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ProtocolError(f"{where}.shape must be a list of non-negative integers, got {json.dumps(raw)}")
    if math.prod(raw) > MAX_ELEMENTS:
        raise ProtocolError(f"{where}.shape {raw} has more than {MAX_ELEMENTS} elements", 413)
    return tuple(raw)


def deserialize_bytes(raw: bytes | memoryview, count: int, where: str) -> list[bytes]:
    """``count`` length-prefixed elements filling ``raw`` exactly."""
    raw, out, pos = memoryview(raw), [], 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"{where}: binary BYTES data ends before element {i} of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"{where}: BYTES element {i} claims {n} bytes, only {len(raw) - pos} remain")
        out.append(bytes(raw[pos:pos + n]))
        pos += n
    if pos != len(raw):
        raise ProtocolError(f"{where}: {len(raw) - pos} bytes left after {count} BYTES elements")
    return out


def serialize_bytes(items) -> bytes:
    """The binary form of a BYTES tensor: each element as 4-byte little-endian length + bytes."""
    parts = []
    for item in items:
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def _flatten(data, where: str) -> list:
    """Nested (row-major) or flat JSON data, as a flat list."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where}.data must be a JSON array")
    if not any(isinstance(x, list) for x in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _tensor(raw, index: int, binary: memoryview, pos: int) -> tuple[Tensor, int]:
    where = f"inputs[{index}]"
    raw = _object(raw, where)
    name, datatype = raw.get("name"), raw.get("datatype")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}.name must be a non-empty string")
    where = f"input '{name}'"
    if datatype != BYTES and datatype not in DTYPES:
        raise ProtocolError(f"{where}: datatype {datatype!r} is not one of {', '.join([*DTYPES, BYTES])}")
    shape = _shape(raw.get("shape"), where)
    params = _object(raw.get("parameters") or {}, f"{where}.parameters")
    if any(k.startswith("shared_memory") for k in params):
        raise ProtocolError(f"{where}: the shared-memory extension is not supported; send the data in the body")
    count = math.prod(shape)
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer")
        if pos + size > len(binary):
            raise ProtocolError(f"{where}: binary_data_size {size} runs past the {len(binary)} bytes of binary data")
        chunk = binary[pos:pos + size]
        pos += size
        if datatype == BYTES:
            data = deserialize_bytes(chunk, count, where)
        else:
            dtype = DTYPES[datatype]
            if size != count * dtype.itemsize:
                raise ProtocolError(f"{where}: {size} bytes of binary data, but shape {list(shape)} of "
                                    f"{datatype} needs {count * dtype.itemsize}")
            data = np.frombuffer(chunk, dtype).reshape(shape)
    elif "data" in raw:
        flat = _flatten(raw["data"], where)
        if len(flat) != count:
            raise ProtocolError(f"{where}: {len(flat)} data elements for shape {list(shape)} ({count} elements)")
        if datatype == BYTES:
            if not all(isinstance(x, str) for x in flat):
                raise ProtocolError(f"{where}: BYTES data in JSON must be strings")
            data = flat
        else:
            try:
                data = np.asarray(flat, dtype=DTYPES[datatype]).reshape(shape)
            except (TypeError, ValueError, OverflowError) as e:
                raise ProtocolError(f"{where}: data is not {datatype}: {e}") from None
    else:
        raise ProtocolError(f"{where} has neither data nor parameters.binary_data_size")
    return Tensor(name, datatype, shape, data, params), pos


def _output(raw, index: int) -> RequestedOutput:
    raw = _object(raw, f"outputs[{index}]")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"outputs[{index}].name must be a non-empty string")
    params = _object(raw.get("parameters") or {}, f"output '{name}'.parameters")
    if any(k.startswith("shared_memory") for k in params):
        raise ProtocolError(f"output '{name}': the shared-memory extension is not supported")
    binary = params.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise ProtocolError(f"output '{name}': binary_data must be true or false")
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ProtocolError(f"output '{name}': classification must be a non-negative integer (the top-k count)")
    return RequestedOutput(name, binary, k)


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An :class:`InferRequest` from a request body and its ``Inference-Header-Content-Length``."""
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH}: {header_length!r} is not a length within the "
                                f"{len(body)}-byte body")
        n = int(header_length)
        head, binary = body[:n], memoryview(body)[n:]
    try:
        obj = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = f" (binary tensor data needs the {HEADER_LENGTH} header)" if header_length is None else ""
        raise ProtocolError(f"the request is not valid JSON: {e}{hint}") from None
    obj = _object(obj, "the request")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    params = _object(obj.get("parameters") or {}, "parameters")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError("'id' must be a string")
    tensors, pos = [], 0
    for i, raw in enumerate(inputs):
        t, pos = _tensor(raw, i, binary, pos)
        tensors.append(t)
    if pos != len(binary):
        raise ProtocolError(f"{len(binary) - pos} bytes of binary data are not claimed by any input's "
                            "binary_data_size")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ProtocolError(f"input names repeat: {names}")
    outputs = obj.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = [_output(o, i) for i, o in enumerate(outputs)]
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):  # a client finds an output by its name
            raise ProtocolError(f"output names repeat: {names}; ask for each output once")
    return InferRequest(rid, params, tensors, outputs)


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    outputs: list[tuple[str, str, np.ndarray, bool]]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for ``(name, datatype, array, binary)`` outputs.

    Binary outputs follow the JSON header (``Inference-Header-Content-Length``); the others are
    inline ``data`` (BYTES as UTF-8 strings).
    """
    header: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = []
    blobs = []
    for name, datatype, array, binary in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = serialize_bytes(array.ravel()) if datatype == BYTES else \
                np.ascontiguousarray(array, DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == BYTES:
            entry["data"] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        header["outputs"].append(entry)
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
