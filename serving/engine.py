"""Pick, verify and load the inference backend for an artifact directory (torch-free)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import flavours
from core.backend import Backend
from core.errors import ArtifactError, BackendError
from core.manifest import ArtifactEntry, Manifest, read_labels, read_manifest, verify_file
from core.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A ready backend plus what the service needs to describe and preprocess for it."""

    backend: Backend
    manifest: Manifest
    entry: ArtifactEntry
    labels: list[str]
    preprocess: PreprocessConfig
    directory: Path

    def summary(self) -> dict:
        m, e = self.manifest, self.entry
        return {"arch": m.arch, "num_classes": m.num_classes, "input_size": m.input_size,
                "preprocess": m.preprocess, "precision": e.precision, "backend": self.backend.name,
                "file": e.file, "sha256": e.sha256, "top1": e.top1, "eval": m.eval, "labels": self.labels,
                "artifacts": [{"kind": a.kind, "precision": a.precision, "file": a.file, "sha256": a.sha256,
                               "top1": a.top1} for a in m.artifacts],
                "versions": m.versions, "created": m.created}


def select_artifact(manifest: Manifest, backend: str = "auto", precision: str = "fp32") -> tuple[str, ArtifactEntry]:
    """``(runtime, entry)``: the runtime and manifest entry ``load_model`` would use on this host.

    ``precision`` is a number format (fp32, fp16, int8); the flavour table picks the file each
    runtime loads (:func:`core.flavours.for_runtime`). ``auto`` picks TensorRT when the directory has
    an engine of that precision and TensorRT and a GPU are usable, else ONNX Runtime.

    Raises:
        ArtifactError: no file of that precision for that runtime.
        BackendError: unknown backend.
    """
    if backend == "auto":
        from backends.tensorrt import tensorrt_usable

        has_engine = manifest.has(flavours.for_runtime(precision, flavours.TENSORRT).name, "engine")
        backend = flavours.TENSORRT if has_engine and tensorrt_usable() else flavours.ONNXRUNTIME
    if backend == flavours.TENSORRT:
        return backend, manifest.find(flavours.for_runtime(precision, backend).name, "engine")
    if backend == flavours.ONNXRUNTIME:
        from backends.onnxruntime import available_providers

        cpu_only = available_providers() == ["CPUExecutionProvider"]
        return backend, manifest.find(flavours.for_runtime(precision, backend, cpu_only).name)
    if backend == flavours.PYTORCH:
        return backend, manifest.find(flavours.FP32.name, flavours.PYTORCH)
    raise BackendError(f"unknown backend {backend!r}")


def open_backend(directory: Path, manifest: Manifest, runtime: str, entry: ArtifactEntry, precision: str,
                 device_id: int = 0, threads: int = 0, max_batch: int | None = None, spin: bool = True) -> Backend:
    """Hash-verify ``entry``'s file and activate ``runtime`` on it (see :func:`select_artifact`);
    ``spin=False``: ONNX Runtime's idle threads sleep instead of spin-waiting (others need the cores)."""
    if runtime == flavours.TENSORRT:
        from backends.tensorrt import TensorRTBackend

        backend: Backend = TensorRTBackend(verify_file(directory, entry), entry.precision, entry.stamp, device_id)
    elif runtime == flavours.ONNXRUNTIME:
        from backends.onnxruntime import OnnxRuntimeBackend, available_providers

        backend = OnnxRuntimeBackend(verify_file(directory, entry), entry.precision, available_providers(),
                                     threads or None, device_id, max_batch, spin)
    elif runtime == flavours.PYTORCH:
        try:
            from backends.pytorch import TorchBackend
        except ImportError as e:
            raise BackendError(f"the pytorch backend needs torch and resdeploy's training package: {e}") from e
        # model.pt holds the fp32 weights; fp16 casts them on the GPU (refused on a CPU host).
        backend = TorchBackend(verify_file(directory, entry), manifest.crop, device_id, max_batch_size=max_batch,
                               half=precision == flavours.FP16.number_format, channels_last=True, cuda_graphs=True)
    else:
        raise BackendError(f"unknown backend {runtime!r}")
    backend.activate()
    log.info("loaded %s (%s, %s) from %s", entry.file, backend.name, entry.precision, directory)
    return backend


def load_model(directory: str | Path, backend: str = "auto", precision: str = "fp32", device_id: int = 0,
               threads: int = 0, max_batch: int | None = None, spin: bool = True) -> LoadedModel:
    """Verify the manifest's hashes and activate the chosen backend (:func:`select_artifact`).

    Raises:
        ArtifactError: missing directory, manifest or file; hash mismatch; no such precision.
        BackendError: the backend cannot run here.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    labels = read_labels(directory, manifest)
    runtime, entry = select_artifact(manifest, backend, precision)
    loaded = open_backend(directory, manifest, runtime, entry, precision, device_id, threads, max_batch, spin)
    return LoadedModel(loaded, manifest, entry, labels, manifest.preprocess_config, directory)


def warm_up(model: LoadedModel, batch_sizes: list[int], iters: int) -> None:
    """Run the serving path (uint8 crops) at every batch size given, so first requests pay no lazy init."""
    cfg = model.preprocess
    for n in batch_sizes:
        x = np.zeros((n, cfg.crop, cfg.crop, 3), np.uint8)
        for _ in range(iters):
            model.backend.infer_uint8(x, cfg.mean, cfg.std)


def check_directory(directory: str | Path) -> None:
    """Fail early (at import of the service) with a clear message if the directory is unusable."""
    if not Path(directory).is_dir():
        raise ArtifactError(f"RESDEPLOY_ARTIFACTS={directory} is not a directory; create it with "
                            "`resdeploy export CKPT --out DIR` or `make demo`")
