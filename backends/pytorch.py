"""The PyTorch reference backend: the artifact directory's unfolded ``model.pt`` in eager mode.

Serving never imports this module unless asked (``RESDEPLOY_BACKEND=pytorch``): the runtime image
has no torch. Its logits are the ones every exported artifact was gated against, so it answers
"is the artifact or the network wrong?" behind the same service. The bench times the same class,
built from an in-memory network with :meth:`TorchBackend.from_module`.

On CUDA it is also a serving backend: :meth:`~core.backend.Backend.infer_uint8` uploads uint8 crops
through a pinned staging buffer and normalises on the device, optionally in fp16 and channels_last,
optionally replaying CUDA graphs (:mod:`backends.torch_cuda`). The float32 :meth:`infer` path stays
eager: it is the reference the other paths are compared with.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch

from backends.torch_cuda import GraphLadder, graph_batch_sizes
from core.backend import Backend
from core.errors import BackendError, CheckpointError, ConfigError, first_line
from training.checkpoint import read_checkpoint
from training.resnet import build_model

WEIGHTS_FORMAT = "resdeploy.weights/1"

log = logging.getLogger(__name__)


def save_weights(model: torch.nn.Module, path: str | os.PathLike, arch: str, shortcut: str | None,
                 num_classes: int) -> None:
    """Write ``model.pt``: the unfolded network's state_dict and what rebuilds it."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": WEIGHTS_FORMAT, "arch": arch, "shortcut": shortcut, "num_classes": num_classes,
                "model": sd}, path)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise BackendError(f"PyTorch weights not found: {path}; re-export the artifacts (`resdeploy export` writes model.pt)")


def load_weights(path: str | os.PathLike) -> torch.nn.Module:
    """The network of a ``model.pt`` file, in eval mode (``torch.load(weights_only=True)``).

    Raises:
        BackendError: unreadable, another format, or weights that do not fit the recorded network.
    """
    _require_file(Path(path))
    try:
        obj = read_checkpoint(path)  # torch.load(weights_only=True), with the same clear errors
    except CheckpointError as e:
        raise BackendError(f"{e}; re-export the artifacts (`resdeploy export` writes model.pt)") from e
    if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
        raise BackendError(f"{path} is not a {WEIGHTS_FORMAT} file; re-export the artifacts")
    try:
        model = build_model(obj["arch"], num_classes=obj["num_classes"], shortcut=obj["shortcut"])
        model.load_state_dict(obj["model"], strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise BackendError(f"{path} does not rebuild a network: {first_line(e)}") from e
    return model.eval()


def _channel_stats(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` and ``std`` as 3 floats each, checked as :func:`core.preprocess.normalize` does."""
    out = []
    for name, value, positive in (("mean", mean, False), ("std", std, True)):
        try:
            triple = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            triple = ()
        if len(triple) != 3 or not all(math.isfinite(v) for v in triple) or (positive and min(triple) <= 0):
            raise ConfigError(f"{name} must be 3 {'positive ' if positive else ''}finite numbers (RGB, in [0,1] "
                              f"pixel units), got {value!r}")
        out.append(triple)
    return out[0], out[1]


class TorchBackend(Backend):
    """Runs a ResNet with PyTorch: ``model.pt`` (written by ``resdeploy export``) or a module.

    Args:
        weights_path: the ``model.pt`` file (hash-verified by the caller when it comes from a manifest).
        input_size: the network's input side (the manifest's crop).
        device_id: CUDA device when CUDA is used.
        max_batch_size: largest batch accepted, or ``None`` for no limit.
        device: ``"cpu"`` or ``"cuda"`` to pin the device; ``None`` picks CUDA when available.
        half: run in float16 (CUDA only; normalisation stays float32, logits are returned as float32).
        channels_last: weights and input in channels_last memory format (faster convolutions on
            many CPUs and on tensor cores).
        cuda_graphs: replay CUDA graphs on the uint8 path (:mod:`backends.torch_cuda`): one per
            size of :func:`~backends.torch_cuda.graph_batch_sizes`, captured at activation, each
            covering normalisation and the network. Needs CUDA and ``max_batch_size``; without
            either it is turned off with a log line. The float32 :meth:`infer` path stays eager.

    Activation and inference may run on different threads: every CUDA call runs under the
    backend's device context, and the uint8 path's staging buffers are used under a lock.
    """

    name = "pytorch"

    def __init__(self, weights_path: str | os.PathLike | None, input_size: int, device_id: int = 0,
                 max_batch_size: int | None = None, device: str | None = None, half: bool = False,
                 channels_last: bool = False, cuda_graphs: bool = False):
        self.path = None if weights_path is None else Path(weights_path)
        if self.path is not None:
            _require_file(self.path)
        if device not in (None, "cpu", "cuda"):
            raise BackendError(f"device {device!r}: choose 'cpu' or 'cuda'")
        use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise BackendError("device 'cuda' asked for, but torch.cuda.is_available() is False")
        if half and not use_cuda:
            raise BackendError("half precision needs CUDA (CPU fp16 convolutions are a slow fallback): serve the "
                               "fp32 precision on this host, or run where torch.cuda.is_available() is True")
        if use_cuda and not 0 <= device_id < torch.cuda.device_count():
            raise BackendError(f"CUDA device {device_id} does not exist: torch sees {torch.cuda.device_count()} "
                               f"device(s); pick device_id 0..{torch.cuda.device_count() - 1}")
        self.device = torch.device(f"cuda:{device_id}" if use_cuda else "cpu")
        self.half, self.channels_last = half, channels_last
        self.graph_sizes: tuple[int, ...] = ()
        if cuda_graphs and not use_cuda:
            log.info("cuda_graphs ignored: CUDA graphs need a CUDA device and this backend runs on the CPU")
        elif cuda_graphs and max_batch_size is None:
            log.warning("cuda_graphs turned off: graphs are captured per batch size up to max_batch_size, "
                        "which is not set; pass max_batch_size=N to use them")
        elif cuda_graphs:
            try:
                self.graph_sizes = graph_batch_sizes(max_batch_size)
            except ValueError as e:
                raise BackendError(f"cuda_graphs: {e}") from e
        self.cuda_graphs = bool(self.graph_sizes)
        self.source: torch.nn.Module | None = None
        self.model: torch.nn.Module | None = None
        self._lock = threading.Lock()
        self._clear_buffers()
        super().__init__("fp16" if half else "fp32", (None, 3, int(input_size), int(input_size)), max_batch_size)

    @classmethod
    def from_module(cls, model: torch.nn.Module, input_size: int, **kwargs) -> "TorchBackend":
        """A backend over an in-memory network (copied on activation; the caller's is left as is)."""
        backend = cls(None, input_size, **kwargs)
        backend.source = model
        return backend

    def _device_context(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _clear_buffers(self) -> None:
        self._host = self._host_np = self._device_in = None  # uint8 staging: pinned host, device
        self._scale = self._mean = self._std = None  # 255, mean and std, (1, 3, 1, 1), on the device
        self._stats: tuple | None = None  # the (mean, std) floats now in _mean and _std
        self._graphs: GraphLadder | None = None

    def _activate(self) -> None:
        model = copy.deepcopy(self.source) if self.source is not None else load_weights(self.path)
        with self._device_context(), torch.no_grad():
            model = model.eval().to(self.device)
            if self.half:
                model = model.half()
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.model = model
            f32 = dict(dtype=torch.float32, device=self.device)
            # 255 as a tensor: CUDA turns division by a Python number into a multiplication by its
            # reciprocal, one rounding away from normalize()'s division
            self._scale = torch.tensor(255.0, **f32)
            self._mean, self._std = torch.zeros((1, 3, 1, 1), **f32), torch.ones((1, 3, 1, 1), **f32)
            if self.device.type == "cuda":
                self._reserve(self.max_batch_size or 1)
            if self.cuda_graphs:
                try:
                    self._graphs = GraphLadder(self._forward_uint8, self._device_in, self.graph_sizes)
                except RuntimeError as e:
                    self._deactivate()
                    raise BackendError(f"CUDA graph capture failed: {first_line(e)}; run with cuda_graphs=False "
                                       f"to serve eagerly") from e
                log.info("captured CUDA graphs for batch sizes %s on %s", list(self.graph_sizes), self.device)

    def _reserve(self, rows: int) -> None:
        """Staging buffers for ``rows`` uint8 crops: pinned host memory (async upload) and device memory."""
        if self._host is not None and self._host.shape[0] >= rows:
            return
        shape = (rows, *self.input_shape[2:], 3)
        self._host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        self._host_np = self._host.numpy()
        self._device_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)

    def _forward_uint8(self, crops: torch.Tensor) -> torch.Tensor:
        """Float32 logits of (N, H, W, 3) uint8 crops on the model's device (CUDA-graph capturable)."""
        x = crops.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last strides
        x = x.div(self._scale).sub(self._mean).div(self._std)  # normalize()'s op order, in float32
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if self.half:
            x = x.half()
        return self.model(x).float()

    def _load_stats(self, mean, std) -> None:
        stats = _channel_stats(mean, std)
        if stats != self._stats:  # copied in place: captured graphs read these very tensors
            self._mean.copy_(torch.tensor(stats[0], dtype=torch.float32).view(1, 3, 1, 1))
            self._std.copy_(torch.tensor(stats[1], dtype=torch.float32).view(1, 3, 1, 1))
            self._stats = stats

    def _infer_uint8(self, crops: np.ndarray, mean, std) -> np.ndarray:
        n = crops.shape[0]
        with self._lock, self._device_context(), torch.no_grad():
            self._load_stats(mean, std)
            if self.device.type != "cuda":
                return self._forward_uint8(torch.from_numpy(crops)).numpy()
            self._reserve(n)  # grows only without max_batch_size (and so without graphs)
            np.copyto(self._host_np[:n], crops)
            self._device_in[:n].copy_(self._host[:n], non_blocking=True)  # ordered before the kernels below
            out = self._graphs.run(n) if self._graphs is not None else self._forward_uint8(self._device_in[:n])
            return out.cpu().numpy()  # synchronises: the staging buffers are free again on return

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._device_context(), torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self.half:
                x = x.half()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(x)
            return out.float().cpu().numpy()  # .cpu() synchronises CUDA

    def _deactivate(self) -> None:
        self.model = None
        self._clear_buffers()  # graphs first: their pool is released with them
        if self.device.type == "cuda":
            with self._device_context():
                torch.cuda.empty_cache()

    def describe(self) -> dict:
        return super().describe() | {
            "file": self.path.name if self.path else None, "device": str(self.device), "half": self.half,
            "channels_last": self.channels_last, "cuda_graphs": self.cuda_graphs,
            "graph_batch_sizes": list(self._graphs.sizes) if self._graphs is not None else [],
            "torch": torch.__version__, **({"cudnn_tf32": _cudnn_tf32()} if self.device.type == "cuda" else {})}


def _cudnn_tf32() -> bool:
    """Whether cuDNN convolutions may use TF32 (the legacy flag raises once the per-op API was mixed in)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return torch.backends.cudnn.conv.fp32_precision == "tf32"
