"""ONNX Runtime backend: CUDA execution provider where onnxruntime-gpu sees a GPU, else CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.backend import Backend
from core.errors import BackendError, first_line


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise BackendError("onnxruntime is not installed: pip install onnxruntime "
                           "(or onnxruntime-gpu on CUDA hosts)") from e
    return onnxruntime


def available_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA first when this onnxruntime build offers it (and a GPU is wanted), CPU always."""
    have = _ort().get_available_providers()
    out = ["CUDAExecutionProvider"] if prefer_gpu and "CUDAExecutionProvider" in have else []
    return out + ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    """Runs one ONNX file.

    Args:
        path: the ``.onnx`` file (already hash-verified by the caller when it comes from a manifest).
        precision: what the file computes in, for reporting.
        providers: execution providers; default CUDA (if available) then CPU.
        threads: intra-op threads; default ORT's (all physical cores).
        device_id: CUDA device for the CUDA provider (one GPU per serving worker).
        spin: let idle intra-op threads spin-wait for the next call (ORT's default, the fastest
            when the model has the cores to itself); False where other processes need the cores
            between calls, as ``resdeploy predict``'s decode workers do (9% more images/s on photos,
            docs/design.md "Offline prediction").
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int | None = None, device_id: int = 0, max_batch_size: int | None = None,
                 spin: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"ONNX file not found: {self.path}")
        self.providers = providers or available_providers()
        self.threads, self.device_id, self.spin = threads, device_id, spin
        self.session = None
        super().__init__(precision, (None, 3, None, None), max_batch_size)

    def _activate(self) -> None:
        ort = _ort()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not self.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # warnings about CPU fallbacks of fp16 ops are not errors
        provider_options = [{"device_id": self.device_id} if p == "CUDAExecutionProvider" else {}
                            for p in self.providers]
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers,
                                                provider_options=provider_options)
        except Exception as e:
            raise BackendError(f"ONNX Runtime cannot load {self.path}: {first_line(e)}") from e
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        dims = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.input_shape = (None,) + dims[1:]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def _deactivate(self) -> None:
        self.session = None

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def describe(self) -> dict:
        return super().describe() | {"file": self.path.name, "providers": self.active_providers}
