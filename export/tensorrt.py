"""ONNX -> TensorRT engine (``.plan``), strongly typed, for TensorRT 10.x and 11.x.

The ONNX file fixes the precision (docs/design.md): TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``,
calibrators and weak typing ("Migrating from TensorRT 10.x to 11.x", Strongly Typed Networks Are Now
Required), and 10.x builds the same way once the network is created ``STRONGLY_TYPED``. So no
precision flag is ever set here; an ``fp16`` engine comes from the fp16 ONNX, an ``int8`` engine
from the symmetric Q/DQ ONNX.

An engine only runs on the TensorRT version and GPU it was built with, so every build returns a
stamp (stored in the manifest) that :func:`check_engine_stamp` compares before an engine is loaded.
Nothing here imports tensorrt or a CUDA binding at module import: this file must load on CPU hosts
and in the torch-free serving image.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from backends.tensorrt import driver_mismatch_hint, gpu_info, tensorrt_status
from core.errors import ExportError, first_line
from core.flavours import ENGINE_PRECISIONS, FLAVOURS
from core.fsutil import write_bytes_atomic

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"


def require_tensorrt():
    """The ``tensorrt`` module, or fail before any export work starts.

    Raises:
        ExportError: TensorRT or a CUDA GPU is missing; the message says what to install.
    """
    usable, reason = tensorrt_status()
    if not usable:
        raise ExportError(f"TensorRT engines need TensorRT and a CUDA GPU: {reason}")
    import tensorrt
    return tensorrt


def engine_file_name(precision: str) -> str:
    """File name of the engine built from one ONNX precision, e.g. ``model.fp16.plan``."""
    _check_precision(precision)
    return FLAVOURS[precision].engine_file


def _check_precision(precision: str) -> None:
    if precision in FLAVOURS and not FLAVOURS[precision].builds_engine:
        tensorrt_form = next(f.name for f in FLAVOURS.values()
                             if f.builds_engine and f.number_format == FLAVOURS[precision].number_format)
        raise ExportError(f"precision {precision!r} is the {FLAVOURS[precision].quantization} ONNX flavour for "
                          f"{FLAVOURS[precision].runtime_names} only; TensorRT takes the "
                          f"{FLAVOURS[tensorrt_form].quantization} file: build the engine from precision "
                          f"{tensorrt_form!r}")
    if precision not in ENGINE_PRECISIONS:
        raise ExportError(f"unknown engine precision {precision!r}; choose one of {list(ENGINE_PRECISIONS)}")


def _check_network_precision(trt, network, precision: str, onnx_path: Path) -> None:
    """Refuse a file whose types do not match its label.

    A strongly typed network computes in the ONNX file's own types (no precision flags exist), so
    an fp32 file handed over as ``fp16`` or ``int8`` would silently build an fp32 engine stamped
    with the wrong precision. Quantize layers mean int8, half tensors fp16, neither fp32.
    """
    quantized = half = False
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        quantized |= layer.type == trt.LayerType.QUANTIZE
        half |= any(layer.get_output(j).dtype == trt.DataType.HALF for j in range(layer.num_outputs))
    found = "int8" if quantized else "fp16" if half else "fp32"
    if found != precision:
        raise ExportError(f"{onnx_path.name} is labelled {precision} but its graph computes in {found} "
                          f"({'Q/DQ layers' if quantized else 'half tensors' if half else 'float32 only'}); "
                          "a strongly typed engine takes the file's own types: build from the "
                          f"{precision} ONNX (model.{precision}.onnx)")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str,
                 input_size: int, max_batch: int, opt_batch: int | None = None, workspace_gib: float = 4.0,
                 timing_cache: str | os.PathLike | None = None) -> dict:
    """Build a strongly typed engine with a dynamic batch and return its stamp.

    Args:
        onnx_path: the ONNX file of ``precision`` (input ``[batch, 3, s, s]`` float32).
        engine_path: where the ``.plan`` goes; written under a temporary name and renamed.
        precision: ``fp32`` | ``fp16`` | ``int8`` (what the ONNX computes in; recorded, not a flag).
        input_size: spatial side ``s``.
        max_batch: largest batch the engine accepts.
        opt_batch: batch TensorRT tunes kernels for; default ``min(max_batch, 10)`` (10-crop TTA).
        workspace_gib: builder workspace memory pool limit.
        timing_cache: timing cache file, loaded if present and written back after the build.

    Returns:
        The stamp: tensorrt_version, gpu_name, compute_capability, max_batch, opt_batch, input_size,
        precision, tf32, build_seconds, bytes.

    Raises:
        ExportError: a flavour TensorRT does not take (ONNX Runtime's int8 form) or another bad
            argument, TensorRT/GPU missing or a driver too old for the wheel, parser errors (every
            one is listed), a file whose types do not match ``precision``, or a failed build.
    """
    _check_precision(precision)  # before importing tensorrt: fails the same way on CPU hosts
    opt_batch = min(max_batch, 10) if opt_batch is None else opt_batch
    for what, value in (("input_size", input_size), ("max_batch", max_batch), ("opt_batch", opt_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"{what} must be a positive integer, got {value!r}")
    if opt_batch > max_batch:
        raise ExportError(f"opt_batch {opt_batch} exceeds max_batch {max_batch}")
    if not workspace_gib > 0:
        raise ExportError(f"workspace_gib must be > 0, got {workspace_gib!r}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX file not found: {onnx_path}")
    trt = require_tensorrt()
    gpu_name, cc = gpu_info(0)

    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError as e:  # a wheel built for a newer CUDA than the driver: "factory function returned nullptr"
        raise ExportError(driver_mismatch_hint(trt, e) or f"TensorRT cannot create a builder: {first_line(e)}") from e
    # 10.x: strong typing is opt-in through this flag; 11.x keeps it deprecated and ignored
    # (Python API reference, Builder: NetworkDefinitionCreationFlag), so tolerate its removal.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), path=str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path} ({len(errors)} errors): "
                          + " | ".join(errors))
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise ExportError(f"{onnx_path} has {network.num_inputs} inputs and {network.num_outputs} outputs; "
                          "a classifier needs one of each")
    _check_network_precision(trt, network, precision, onnx_path)
    inp = network.get_input(0)
    dims = [int(d) for d in inp.shape]  # -1: dynamic; the batch must be, for the profile below
    if len(dims) != 4 or dims[0] != -1 or any(d not in (-1, e) for d, e in zip(dims[1:], (3, input_size, input_size))):
        raise ExportError(f"input {inp.name!r} of {onnx_path} has shape {tuple(dims)}, not "
                          f"[batch, 3, {input_size}, {input_size}] with a dynamic batch; re-export the ONNX")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    # TF32 is on by default for float32 layers (BuilderFlag.TF32); an "fp32" engine must compute in
    # fp32 (STYLE: never degrade precision quietly), so clear it there and record the choice.
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if tf32_flag is not None and precision == "fp32":
        config.clear_flag(tf32_flag)
    tf32 = None if tf32_flag is None else bool(config.get_flag(tf32_flag))
    profile = builder.create_optimization_profile()
    chw = (3, input_size, input_size)
    profile.set_shape(inp.name, (1, *chw), (opt_batch, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if cache_path:
        try:
            cache = config.create_timing_cache(blob)
        except Exception as e:  # a truncated or foreign file: rebuild the cache rather than fail
            log.warning("cannot read timing cache %s (%s); starting an empty one", cache_path, e)
            cache, blob = config.create_timing_cache(b""), b""
        # ignore_mismatch=False: a cache from another GPU or TensorRT version is not used.
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not fit this GPU/TensorRT; starting an empty one", cache_path)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        elif blob:
            log.info("reusing timing cache %s (%d bytes)", cache_path, len(blob))

    log.info("building %s engine from %s (batch 1..%d, opt %d) on %s", precision, onnx_path.name,
             max_batch, opt_batch, gpu_name)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - start
    if plan is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path}; "
                          "see the TensorRT errors logged above")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(engine_path, plan)
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache_path, config.get_timing_cache().serialize())
    return {"tensorrt_version": trt.__version__, "gpu_name": gpu_name, "compute_capability": cc,
            "max_batch": max_batch, "opt_batch": opt_batch, "input_size": input_size,
            "precision": precision, "tf32": tf32, "build_seconds": round(build_seconds, 3),
            "bytes": engine_path.stat().st_size}
