"""The PyTorch reference backend: the artifact directory's unfolded ``model.pt`` in eager mode.

Serving never imports this module unless asked (``RESDEPLOY_BACKEND=pytorch``): the runtime image
has no torch. Its logits are the ones every exported artifact was gated against, so it answers
"is the artifact or the network wrong?" behind the same service. The bench times the same class,
built from an in-memory network with :meth:`TorchBackend.from_module`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch

from core.backend import Backend
from core.errors import BackendError, CheckpointError, first_line
from training.checkpoint import read_checkpoint
from training.resnet import build_model

WEIGHTS_FORMAT = "resdeploy.weights/1"


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


class TorchBackend(Backend):
    """Runs a ResNet with PyTorch: ``model.pt`` (written by ``resdeploy export``) or a module.

    Args:
        weights_path: the ``model.pt`` file (hash-verified by the caller when it comes from a manifest).
        input_size: the network's input side (the manifest's crop).
        device_id: CUDA device when CUDA is used.
        max_batch_size: largest batch accepted, or ``None`` for no limit.
        device: ``"cpu"`` or ``"cuda"`` to pin the device; ``None`` picks CUDA when available.
        half: run in float16 (CUDA only; logits are returned as float32).
        channels_last: weights and input in channels_last memory format (faster convolutions on
            many CPUs and on tensor cores).
    """

    name = "pytorch"

    def __init__(self, weights_path: str | os.PathLike | None, input_size: int, device_id: int = 0,
                 max_batch_size: int | None = None, device: str | None = None, half: bool = False,
                 channels_last: bool = False):
        self.path = None if weights_path is None else Path(weights_path)
        if self.path is not None:
            _require_file(self.path)
        if device not in (None, "cpu", "cuda"):
            raise BackendError(f"device {device!r}: choose 'cpu' or 'cuda'")
        use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise BackendError("device 'cuda' asked for, but torch.cuda.is_available() is False")
        if half and not use_cuda:
            raise BackendError("half precision needs CUDA: CPU fp16 convolutions are a slow fallback")
        self.device = torch.device(f"cuda:{device_id}" if use_cuda else "cpu")
        self.half, self.channels_last = half, channels_last
        self.source: torch.nn.Module | None = None
        self.model: torch.nn.Module | None = None
        super().__init__("fp16" if half else "fp32", (None, 3, int(input_size), int(input_size)), max_batch_size)

    @classmethod
    def from_module(cls, model: torch.nn.Module, input_size: int, **kwargs) -> "TorchBackend":
        """A backend over an in-memory network (copied on activation; the caller's is left as is)."""
        backend = cls(None, input_size, **kwargs)
        backend.source = model
        return backend

    def _activate(self) -> None:
        model = copy.deepcopy(self.source) if self.source is not None else load_weights(self.path)
        model = model.eval().to(self.device)
        if self.half:
            model = model.half()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self.half:
                x = x.half()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(x)
        return out.float().cpu().numpy()  # .cpu() synchronises CUDA

    def _deactivate(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict:
        return super().describe() | {"file": self.path.name if self.path else None, "device": str(self.device),
                                     "channels_last": self.channels_last, "torch": torch.__version__,
                                     **({"cudnn_tf32": torch.backends.cudnn.allow_tf32}
                                        if self.device.type == "cuda" else {})}
