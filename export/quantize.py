"""FP16 conversion and INT8 explicit quantization (Q/DQ) of the FP32 ONNX file.

Two INT8 flavours (the rows of :mod:`core.flavours` whose number format is int8), because the two
runtimes fuse different forms (docs/design.md):

* ``INT8``, for TensorRT: symmetric int8 activations and weights (zero point 0), per-channel
  weight scales on axis 0, a dedicated Q/DQ pair on *both* inputs of every residual ``Add`` (else
  TensorRT runs the Add in fp16/fp32), and no bias quantization (TensorRT quantizes biases itself).
* ``INT8_CPU``, for ONNX Runtime on x86: uint8 activations with int8 per-channel weights (U8S8), the
  only form ORT's CPU kernels fuse into QLinearConv (measured: ResNet-50 batch 10, U8S8 82 ms vs
  S8S8 284 ms vs FP32 262 ms on the dev CPU).

Calibration images go through exactly the serving preprocessing and are cached as ``.npy`` in the
artifact directory, keyed by what produced them, so a re-export does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from core.errors import ExportError, first_line

log = logging.getLogger(__name__)
CALIB_DIR = "calib"


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its producers (ONNX requires it; converters append casts)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"graph has a cycle or dangling inputs at node {pending[0].name}")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """An ONNX file computing in float16 with float32 inputs and outputs (casts at the edges).

    Uses ONNX Runtime's converter (``onnxruntime.transformers.float16``), then re-sorts the graph:
    it appends the input casts at the end of the node list.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        toposort(model.graph)
        onnx.checker.check_model(model)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"fp16 conversion failed: {type(e).__name__}: {first_line(e)}") from e
    onnx.save(model, str(dst))
    return Path(dst)


def calibration_key(source: str, n: int, preprocess: dict) -> str:
    """Cache key of a calibration tensor set: dataset, image count and preprocessing."""
    blob = json.dumps({"source": source, "n": n, "preprocess": preprocess}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_calibration(key: str, search: list[Path], dest: Path) -> np.ndarray | None:
    """Reuse ``calib/<key>.npy`` from an earlier export (copied into ``dest``), if one exists."""
    for d in search:
        f = d / CALIB_DIR / f"{key}.npy"
        if f.is_file():
            (dest / CALIB_DIR).mkdir(parents=True, exist_ok=True)
            if f.resolve() != (dest / CALIB_DIR / f.name).resolve():
                shutil.copy2(f, dest / CALIB_DIR / f.name)
            log.info("calibration tensors reused from %s", f)
            return np.load(f, allow_pickle=False)
    return None


def save_calibration(key: str, tensors: np.ndarray, dest: Path) -> Path:
    (dest / CALIB_DIR).mkdir(parents=True, exist_ok=True)
    path = dest / CALIB_DIR / f"{key}.npy"
    np.save(path, tensors, allow_pickle=False)
    return path


def quantize_int8(fp32: str | os.PathLike, dst: str | os.PathLike, flavour: str, calib: np.ndarray,
                  method: str = "percentile", work: str | os.PathLike | None = None,
                  progress: bool = False, keep_float: tuple[str, ...] = (),
                  overflow_fix: str | None = None) -> dict:
    """Quantize ``fp32`` into ``dst`` in one call (QDQ, per-channel weights on axis 0).

    The building blocks are in :mod:`export.qdq`; the export pipeline drives them itself so that
    it can measure layers and fall back. This is for callers that want one file (bench/).

    Args:
        fp32: the BN-folded FP32 ONNX file.
        dst: output path.
        flavour: an int8 flavour name (``core.flavours.INT8_FLAVOURS``).
        calib: calibration inputs (N, 3, H, W) float32, preprocessed like serving.
        method: ``entropy`` | ``percentile`` | ``minmax``.
        work: scratch directory for ORT's pre-processed model and calibration files.
        keep_float: Conv/Gemm node names left in float.
        overflow_fix: see :data:`export.options.OVERFLOW_FIXES`; default: the flavour's.

    Returns:
        ``{"method", "images", "seconds"}``.

    Raises:
        ConfigError: unknown flavour or method; ExportError: ORT's quantizer failed.
    """
    from export import qdq

    t0 = time.perf_counter()
    work = Path(work or Path(dst).parent)
    with qdq.Prepared(fp32, work, Path(dst).stem) as prepared:
        ranges = prepared.ranges(flavour, calib, method, progress)
        prepared.write(dst, flavour, ranges, method, keep_float=keep_float, overflow_fix=overflow_fix)
    return {"method": method, "images": int(len(calib)), "seconds": round(time.perf_counter() - t0, 2)}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def inspect_int8(path: str | os.PathLike) -> dict:
    """Facts about a QDQ graph, for tests and the export log.

    Returns:
        ``{"conv_weights": n, "per_channel_axis0": n, "nonzero_zero_points": n, "adds": n,
        "adds_with_dq_inputs": n, "zero_point_types": [...], "quantized_bias": n}``.
    """
    model = onnx.load(str(path))
    init = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    facts = {"conv_weights": 0, "per_channel_axis0": 0, "nonzero_zero_points": 0, "adds": 0,
             "adds_with_dq_inputs": 0, "zero_point_types": set(), "quantized_bias": 0}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = init.get(node.input[2])
            if zp is not None:
                facts["zero_point_types"].add(str(zp.dtype))
                facts["nonzero_zero_points"] += int(np.any(zp != 0))
        if node.op_type == "Conv":
            dq = producers.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                facts["conv_weights"] += 1
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                scale = init.get(dq.input[1])
                if axis == 0 and scale is not None and scale.size > 1:
                    facts["per_channel_axis0"] += 1
            if len(node.input) > 2:
                b = producers.get(node.input[2])
                facts["quantized_bias"] += int(b is not None and b.op_type == "DequantizeLinear")
        if node.op_type == "Add":
            facts["adds"] += 1
            srcs = [producers.get(i) for i in node.input]
            facts["adds_with_dq_inputs"] += int(all(s is not None and s.op_type == "DequantizeLinear" for s in srcs))
    facts["zero_point_types"] = sorted(facts["zero_point_types"])
    return facts
