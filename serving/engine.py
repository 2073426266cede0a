"""Pick, verify and load the inference backend for an artifact directory (torch-free)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resdeploy.errors import ArtifactError, BackendError
from serving.artifacts import find_artifact, read_labels, read_manifest, verify_file
from serving.backends.base import Backend
from serving.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A ready backend plus what the service needs to describe and preprocess for it."""

    backend: Backend
    manifest: dict
    entry: dict
    labels: list[str]
    preprocess: PreprocessConfig
    directory: Path

    def summary(self) -> dict:
        m = self.manifest
        return {"arch": m["arch"], "num_classes": m["num_classes"], "input_size": m["input_size"],
                "preprocess": m["preprocess"], "precision": self.entry["precision"],
                "backend": self.backend.name, "file": self.entry["file"], "sha256": self.entry["sha256"],
                "top1": self.entry.get("top1"), "eval": m.get("eval"), "labels": self.labels,
                "artifacts": [{k: a.get(k) for k in ("kind", "precision", "file", "sha256", "top1")}
                              for a in m["artifacts"]],
                "versions": m.get("versions"), "created": m.get("created")}


def _tensorrt_usable() -> bool:
    """TensorRT, pycuda and at least one CUDA device, without raising."""
    try:
        import importlib

        import pycuda.driver as cuda

        importlib.import_module("tensorrt")  # importable is part of usable
        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


def load_model(directory: str | Path, backend: str = "auto", precision: str = "fp32", device_id: int = 0,
               threads: int = 0, max_batch: int | None = None) -> LoadedModel:
    """Verify the manifest's hashes and activate the chosen backend.

    ``auto`` picks TensorRT when the directory has an engine of that precision and TensorRT and a
    GPU are usable, else ONNX Runtime. On ONNX Runtime without CUDA, ``int8`` means the
    ``int8-cpu`` file (the form ORT's x86 kernels fuse).

    Raises:
        ArtifactError: missing directory, manifest or file; hash mismatch; no such precision.
        BackendError: the backend cannot run here.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    labels = read_labels(d, manifest)
    if backend == "auto":
        has_engine = any(a.get("kind") == "engine" and a["precision"] == precision for a in manifest["artifacts"])
        backend = "tensorrt" if has_engine and _tensorrt_usable() else "onnxruntime"
    if backend == "tensorrt":
        from serving.backends.tensorrt import TensorRTBackend

        entry = find_artifact(manifest, precision, "engine")
        b: Backend = TensorRTBackend(verify_file(d, entry), precision, entry, device_id)
    elif backend == "onnxruntime":
        from serving.backends.onnxruntime import OnnxRuntimeBackend, available_providers

        providers = available_providers()
        file_precision = "int8-cpu" if precision == "int8" and providers == ["CPUExecutionProvider"] else precision
        entry = find_artifact(manifest, file_precision)
        b = OnnxRuntimeBackend(verify_file(d, entry), file_precision, providers, threads or None, device_id, max_batch)
    elif backend == "pytorch":
        try:
            from training.torch_backend import TorchBackend
        except ImportError as e:
            raise BackendError(f"the pytorch backend needs torch and resdeploy's training package: {e}") from e
        entry = find_artifact(manifest, "fp32", "pytorch")
        b = TorchBackend(verify_file(d, entry), manifest, device_id)
    else:
        raise BackendError(f"unknown backend {backend!r}")
    b.activate()
    log.info("loaded %s (%s, %s) from %s", entry["file"], b.name, entry["precision"], d)
    return LoadedModel(b, manifest, entry, labels, PreprocessConfig.from_dict(manifest["preprocess"]), d)


def warm_up(model: LoadedModel, batch_sizes: list[int], iters: int) -> None:
    """Run every batch size the service will see, so the first requests pay no lazy init."""
    s = model.preprocess.crop
    for n in batch_sizes:
        x = np.zeros((n, 3, s, s), np.float32)
        for _ in range(iters):
            model.backend.infer(x)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    """The ``k`` most probable classes of one averaged probability vector."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"index": int(i), "label": labels[i], "prob": float(probs[i])} for i in order]


def check_directory(directory: str | Path) -> None:
    """Fail early (at import of the service) with a clear message if the directory is unusable."""
    if not Path(directory).is_dir():
        raise ArtifactError(f"RESDEPLOY_ARTIFACTS={directory} is not a directory; create it with "
                            "`resdeploy export CKPT --out DIR` or `make demo`")
