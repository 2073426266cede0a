"""The PyTorch reference backend: the artifact directory's unfolded ``model.pt`` in eager mode.

It lives here, not in serving/, because serving never imports torch (the runtime image has
none); ``serving.engine.load_model`` imports it only for ``backend="pytorch"``
(``RESDEPLOY_BACKEND=pytorch``). Its logits are the ones every exported artifact was gated
against, so it answers "is the artifact or the network wrong?" behind the same service.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from resdeploy.errors import BackendError
from serving.backends.base import Backend
from training.resnet import build_model

WEIGHTS_FORMAT = "resdeploy.weights/1"


class TorchBackend(Backend):
    """Runs ``model.pt`` (written by ``resdeploy export``) with PyTorch in FP32.

    Args:
        weights_path: the ``model.pt`` file (hash-verified by the caller when it comes from a manifest).
        manifest: the artifact directory's manifest (crop size for the input shape).
        device_id: CUDA device when CUDA is available; CPU otherwise.
        max_batch_size: largest batch accepted, or ``None`` for no limit.
        device: ``"cpu"`` or ``"cuda"`` to pin the device; ``None`` picks CUDA when available.
        half: run in float16 (CUDA only; logits are returned as float32).
    """

    name = "pytorch"

    def __init__(self, weights_path: str | os.PathLike, manifest: dict, device_id: int = 0,
                 max_batch_size: int | None = None, device: str | None = None, half: bool = False):
        self.path = Path(weights_path)
        if not self.path.is_file():
            raise BackendError(f"PyTorch weights not found: {self.path}; re-export the artifacts "
                               "(`resdeploy export` writes model.pt)")
        if device not in (None, "cpu", "cuda"):
            raise BackendError(f"device {device!r}: choose 'cpu' or 'cuda'")
        use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise BackendError("device 'cuda' asked for, but torch.cuda.is_available() is False")
        if half and not use_cuda:
            raise BackendError("half precision needs CUDA: CPU fp16 convolutions are a slow fallback")
        self.device = torch.device(f"cuda:{device_id}" if use_cuda else "cpu")
        self.half = half
        self.model: torch.nn.Module | None = None
        size = int(manifest["preprocess"]["crop"])
        super().__init__("fp16" if half else "fp32", (None, 3, size, size), max_batch_size)

    def _activate(self) -> None:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackendError(f"cannot read {self.path}: {first[:200]}") from e
        if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
            raise BackendError(f"{self.path} is not a {WEIGHTS_FORMAT} file; re-export the artifacts")
        try:
            model = build_model(obj["arch"], num_classes=obj["num_classes"], shortcut=obj["shortcut"])
            model.load_state_dict(obj["model"], strict=True)
        except (KeyError, RuntimeError, ValueError) as e:
            raise BackendError(f"{self.path} does not rebuild a network: {str(e).splitlines()[0]}") from e
        model = model.eval().to(self.device)
        self.model = model.half() if self.half else model

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            out = self.model(x.half() if self.half else x)
        return out.float().cpu().numpy()

    def _deactivate(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict:
        return super().describe() | {"file": self.path.name, "device": str(self.device), "torch": torch.__version__,
                                     **({"cudnn_tf32": torch.backends.cudnn.allow_tf32}
                                        if self.device.type == "cuda" else {})}
