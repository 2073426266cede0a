"""Q/DQ building blocks: the two INT8 forms, activation ranges, QDQ files with float layers.

Two INT8 forms, because the two runtimes run different kernels (docs/design.md):

* ``INT8`` (:mod:`core.flavours`), for TensorRT: symmetric int8 activations and weights (zero point 0), per-channel
  weight scales on axis 0, a dedicated Q/DQ pair on *both* inputs of every residual ``Add`` (else
  TensorRT runs the Add in fp16/fp32), no bias quantization (TensorRT quantizes biases itself).
  TensorRT accumulates int8 products in int32, so the file is judged by its exact Q/DQ semantics:
  ONNX Runtime with the Q/DQ fusions switched off (float Conv on dequantized values).
* ``INT8_CPU``, for ONNX Runtime on x86: uint8 activations with int8 per-channel weights (U8S8), the
  only form ORT's CPU kernels fuse into QLinearConv. It is judged by the fused kernels it will run.
  On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) those kernels add pairs of u8*s8 products in
  16 bits with saturation (``vpmaddubsw``); a layer with large inputs and full-range weights then
  overflows. Measured on an AMD Zen 3 (AVX2): the digits ResNet-20 drops from 100% to 93% top-1
  agreement with FP32, all of it from the first Conv, whose inputs (the normalised image) use the
  whole uint8 range. The fix is NNCF's default ("overflow fix, first layer"): 7-bit weights
  (``reduce_range``) there, so two products never exceed 2**15.

A *float layer* is a Conv/Gemm left out of quantization: no Q/DQ on its inputs or weights, so it
runs in float between the Q/DQ pairs of its neighbours (valid for strongly typed TensorRT, and
ORT still fuses every remaining quantized Conv).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from core.errors import ConfigError, ExportError
from core.flavours import FLAVOURS, INT8, INT8_CPU
from export.options import CALIB_METHODS, OVERFLOW_FIXES

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm")


@dataclass(frozen=True)
class Int8Form:
    """How one INT8 flavour is quantized and how its accuracy is judged on CPU."""

    activation: str  # "int8" | "uint8"
    symmetric_activations: bool
    op_types: tuple[str, ...] | None  # None: every op ORT can quantize
    quantize_bias: bool
    fused_gate: bool  # judge with ORT's fused int8 kernels (else exact Q/DQ semantics)
    overflow_fix: str  # default weight range fix for non-VNNI x86 (see module docstring)


INT8_FORMS = {
    INT8.name: Int8Form("int8", True, ("Conv", "Gemm", "Add", "Relu", "MaxPool"), False, False, "none"),
    INT8_CPU.name: Int8Form("uint8", False, None, True, True, "first-layer"),
}


def form(flavour: str) -> Int8Form:
    if flavour not in INT8_FORMS:
        raise ConfigError(f"unknown int8 flavour '{flavour}'; choose "
                          + " or ".join(f"{f} ({FLAVOURS[f].runtime_names})" for f in INT8_FORMS))
    return INT8_FORMS[flavour]


@dataclass(frozen=True)
class Layer:
    """A quantizable Conv/Gemm: node name, op, weight initializer, multiply-adds per image."""

    name: str
    op: str
    weight: str
    macs: int


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


class _Reader:
    """ORT CalibrationDataReader over an in-memory array, with a progress bar."""

    def __init__(self, tensors: np.ndarray, input_name: str, batch: int, progress: bool, desc: str):
        from tqdm import tqdm

        self.tensors, self.input_name, self.batch = tensors, input_name, batch
        self.i = 0
        self.bar = tqdm(total=len(tensors), desc=desc, unit="img", leave=False, disable=not progress)

    def get_next(self):
        if self.i >= len(self.tensors):
            self.bar.close()
            return None
        chunk = self.tensors[self.i:self.i + self.batch]
        self.i += len(chunk)
        self.bar.update(len(chunk))
        return {self.input_name: chunk}

    def rewind(self):
        self.i = 0


class Prepared:
    """The FP32 file after ORT's ``quant_pre_process``, with scratch files under ``work``.

    Use as a context manager: the scratch files are removed on exit. One instance serves every
    quantization of one model (both flavours, every fallback step), so pre-processing and range
    calibration run once per flavour.
    """

    def __init__(self, fp32: str | os.PathLike, work: str | os.PathLike, tag: str = "model"):
        self.fp32, self.work, self.tag = Path(fp32), Path(work), tag
        self.path = self.work / f".{tag}.pre.onnx"
        self._scratch: list[Path] = [self.path]

    def __enter__(self) -> "Prepared":
        from onnxruntime.quantization.shape_inference import quant_pre_process

        try:
            quant_pre_process(str(self.fp32), str(self.path), skip_symbolic_shape=True)
        except Exception as e:
            raise ExportError(f"quantization pre-processing failed: {_first_line(e)}") from e
        self.model = onnx.load(str(self.path))
        self.input_name = self.model.graph.input[0].name
        return self

    def __exit__(self, *exc) -> None:
        for p in self._scratch:
            p.unlink(missing_ok=True)
        for p in self.work.glob(f".{self.tag}.*augmented*"):
            p.unlink(missing_ok=True)

    def layers(self) -> list[Layer]:
        """Every Conv/Gemm with a constant weight, in graph order, with its MACs per image."""
        inits = {i.name: i for i in self.model.graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(self.model)
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in [*inferred.graph.value_info, *inferred.graph.output]}
        layers = []
        for node in self.model.graph.node:
            if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in inits:
                continue
            w = inits[node.input[1]].dims
            out = shapes.get(node.output[0], [])
            spatial = int(np.prod(out[2:])) if len(out) > 2 and all(out[2:]) else 1
            macs = int(np.prod(w)) * spatial  # Conv: Cout*Cin/g*kh*kw per output pixel; Gemm: N*K
            layers.append(Layer(node.name, node.op_type, node.input[1], macs))
        return layers

    def ranges(self, flavour: str, calib: np.ndarray, method: str, progress: bool = False) -> Path:
        """Activation ranges of ``flavour``'s quantized tensors over ``calib``, as ORT's cache file.

        Computed here rather than inside ``quantize_static`` because quantize_static cannot set
        the histogram size, and its entropy default (128 bins for 128 quantized bins) leaves KL one
        candidate threshold: the max, i.e. exactly MinMax (measured: byte-identical files). 2048
        bins is TensorRT's entropy calibrator setting.
        """
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data


        if method not in CALIB_METHODS:
            raise ConfigError(f"unknown --calib-method '{method}'; choose one of {', '.join(CALIB_METHODS)}")
        f = form(flavour)
        out = self.work / f".{self.tag}.{flavour}.ranges.json"
        self._scratch.append(out)
        try:
            calibrator = create_calibrator(
                self.path, list(f.op_types) if f.op_types else None,
                augmented_model_path=str(self.work / f".{self.tag}.{flavour}.augmented.onnx"),
                calibrate_method=getattr(CalibrationMethod, method.capitalize().replace("Minmax", "MinMax")),
                extra_options={"symmetric": f.symmetric_activations} | ({} if method == "minmax" else {"num_bins": 2048}))
            # Equal batches: ORT's histogram collectors stack per-batch arrays and fail on a short
            # last batch (e.g. 40 images in batches of 16).
            batch = max(b for b in range(1, 17) if len(calib) % b == 0)
            reader = _Reader(calib, self.input_name, batch, progress, f"calibrating {flavour}")
            with contextlib.redirect_stdout(io.StringIO()):  # ORT prints calibration chatter
                calibrator.collect_data(reader)
                save_tensors_data(calibrator.compute_data(), out)
        except (ConfigError, ExportError):
            raise
        except Exception as e:
            raise ExportError(f"{flavour} calibration failed: {_first_line(e)}") from e
        return out

    def write(self, dst: str | os.PathLike, flavour: str, ranges: Path, method: str,
              keep_float: tuple[str, ...] | list[str] = (), only: list[str] | None = None,
              overflow_fix: str | None = None) -> Path:
        """Write the QDQ file of ``flavour`` with ``keep_float`` layers left in float.

        Args:
            only: quantize just these Conv/Gemm nodes (sensitivity of one layer alone).
            overflow_fix: 7-bit weights for ``first-layer``, ``all`` or ``none`` of the layers;
                default: the flavour's (see the module docstring).
        """
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        f = form(flavour)
        fix = f.overflow_fix if overflow_fix is None else overflow_fix
        if fix not in OVERFLOW_FIXES:
            raise ConfigError(f"--overflow-fix {fix}: choose one of {', '.join(OVERFLOW_FIXES)}")
        layers = self.layers()
        quantized = [l for l in layers if l.name not in keep_float and (only is None or l.name in only)]
        seven_bit = quantized if fix == "all" else quantized[:1] if fix == "first-layer" else []
        # Only the network's first layer gets the fix under "first-layer", as in NNCF, so a
        # sensitivity model quantizing one later layer alone must not apply it there.
        if fix == "first-layer" and seven_bit and seven_bit[0].name != layers[0].name:
            seven_bit = []
        extra = {"DedicatedQDQPair": True, "QuantizeBias": f.quantize_bias,
                 "ActivationSymmetric": f.symmetric_activations, "WeightSymmetric": True,
                 "TensorQuantOverrides": {l.weight: [{"axis": 0, "reduce_range": True}] for l in seven_bit}}
        activation = QuantType.QInt8 if f.activation == "int8" else QuantType.QUInt8
        ops = list(f.op_types) if f.op_types else None
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(self.path), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=activation, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                    calibrate_method=getattr(CalibrationMethod, method.capitalize().replace("Minmax", "MinMax")),
                    calibration_cache_path=str(ranges), extra_options=extra,
                    nodes_to_exclude=list(keep_float), nodes_to_quantize=only)
        except (ConfigError, ExportError):
            raise
        except Exception as e:
            raise ExportError(f"{flavour} quantization failed: {_first_line(e)}") from e
        return Path(dst)


def session(path: str | os.PathLike, fused: bool = True, threads: int | None = None):
    """An ONNX Runtime CPU session; ``fused=False`` keeps Q/DQ as written (exact reference semantics).

    Basic optimizations (constant folding, so DQ of constant weights becomes a float weight) stay
    on; the extended level is the one that fuses DQ->Conv->Q into int8 kernels.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load {Path(path).name}: {_first_line(e)}") from e


def run(sess, x: np.ndarray, batch: int = 50, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``sess`` over ``x`` in batches; returns each requested output concatenated."""
    name = sess.get_inputs()[0].name
    parts = [sess.run(outputs, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
