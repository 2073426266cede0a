"""The one Backend interface every runtime implements."""

from __future__ import annotations

import abc

import numpy as np

from core.errors import BackendError
from core.preprocess import normalize


class Backend(abc.ABC):
    """Runs a classifier on float32 NCHW batches (or uint8 NHWC crops) and returns float32 logits.

    Subclasses implement :meth:`_activate`, :meth:`_infer` and :meth:`_deactivate`, and may
    override :meth:`_infer_uint8`; the public methods check state and input so every backend
    rejects bad input the same way.

    Attributes:
        name: runtime name, e.g. ``"onnxruntime"``.
        precision: a flavour name of :mod:`core.flavours` (the file's precision).
        input_shape: ``(None, 3, H, W)``; ``None`` marks the dynamic batch axis.
        max_batch_size: largest batch accepted, or ``None`` for no limit.
    """

    name = "backend"

    def __init__(self, precision: str, input_shape: tuple, max_batch_size: int | None = None):
        self.precision = precision
        self.input_shape = tuple(input_shape)
        self.max_batch_size = max_batch_size
        self.active = False

    @abc.abstractmethod
    def _activate(self) -> None:
        """Load the model and allocate what inference needs."""

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits of one checked, contiguous float32 batch."""

    @abc.abstractmethod
    def _deactivate(self) -> None:
        """Release sessions, engines and device memory."""

    def activate(self) -> "Backend":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def check_input(self, batch: np.ndarray) -> np.ndarray:
        """Validate dtype, rank, channel/spatial dims and batch size; return a contiguous array."""
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
            raise BackendError(f"{self.name} takes a float32 numpy array, got "
                               f"{getattr(batch, 'dtype', type(batch).__name__)}")
        self._check_shape(batch.shape)
        return np.ascontiguousarray(batch)

    def _check_shape(self, shape: tuple) -> None:
        """An NCHW ``shape`` against ``input_shape`` and ``max_batch_size``."""
        if len(shape) != 4 or any(e is not None and e != g for e, g in zip(self.input_shape[1:], shape[1:])):
            raise BackendError(f"{self.name} expects input of shape {self.input_shape}, got {tuple(shape)}")
        if shape[0] < 1 or (self.max_batch_size and shape[0] > self.max_batch_size):
            raise BackendError(f"batch of {shape[0]} is outside 1..{self.max_batch_size} for {self.name}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) float32 for a (N, 3, H, W) float32 batch."""
        self._check_active()
        return np.asarray(self._infer(self.check_input(batch)), dtype=np.float32)

    def infer_uint8(self, crops: np.ndarray, mean, std) -> np.ndarray:
        """Logits (N, classes) float32 for (N, H, W, 3) uint8 crops, normalised where the model runs.

        The serving path hands over uint8 pixels (a quarter of float32's bytes) and the backend
        computes ``(x / 255 - mean) / std``. This default does it on the host with
        :func:`core.preprocess.normalize`, bit for bit the float path; GPU backends override
        :meth:`_infer_uint8` to upload uint8 and normalise on the device.
        """
        self._check_active()
        if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
            raise BackendError(f"{self.name} infer_uint8 takes (N, H, W, 3) uint8 crops, got "
                               f"{getattr(crops, 'shape', None)} {getattr(crops, 'dtype', type(crops).__name__)}")
        self._check_shape((crops.shape[0], 3, crops.shape[1], crops.shape[2]))
        return np.asarray(self._infer_uint8(np.ascontiguousarray(crops), mean, std), dtype=np.float32)

    def _infer_uint8(self, crops: np.ndarray, mean, std) -> np.ndarray:
        return self._infer(normalize(crops, mean, std))

    def _check_active(self) -> None:
        if not self.active:
            raise BackendError(f"{self.name} backend is not active; use it as a context manager or call activate()")

    def describe(self) -> dict:
        return {"backend": self.name, "precision": self.precision, "input_shape": list(self.input_shape),
                "max_batch_size": self.max_batch_size}
