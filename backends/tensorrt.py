"""TensorRT backend: one deserialized engine, one execution context, pinned buffers, one stream.

Imports nothing heavy at module import: ``tensorrt`` and the CUDA binding are imported in
:meth:`TensorRTBackend.activate`, so this module loads on CPU hosts and without torch. The engine's
stamp (TensorRT version, GPU name, compute capability) is checked against this host *before* the
plan is deserialized: a plan from another TensorRT version or GPU is refused with the fix.

Runtime API per NVIDIA's Python samples (samples/python/common_runtime.py): ``set_input_shape``,
``set_tensor_address`` for every I/O tensor, ``execute_async_v3(stream_handle)``. CUDA through
:mod:`backends.cuda_binding` (cuda-python, else pycuda): the device is made current around every
use, since the calling thread (a BentoML worker thread, a test) need not be the one that activated
the backend.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from backends.cuda_binding import INSTALL_HINT, CudaBinding, load_binding
from core.backend import Backend
from core.errors import ArtifactError, BackendError, ResdeployError, first_line

log = logging.getLogger(__name__)


def gpu_info(device_id: int = 0) -> tuple[str, str]:
    """(name, "major.minor") of a CUDA device, through :func:`backends.cuda_binding.load_binding`.

    Raises:
        BackendError: neither cuda-python nor pycuda is importable.
        RuntimeError: the device is not visible, or CUDA fails (no driver, driver too old).
    """
    cuda = load_binding()
    count = cuda.device_count()
    if not 0 <= device_id < count:
        raise RuntimeError(f"CUDA device {device_id} not found ({count} visible)")
    major, minor = cuda.capability(device_id)
    return cuda.device_name(device_id), f"{major}.{minor}"


def driver_mismatch_hint(trt, error: BaseException) -> str | None:
    """The fix, when ``error`` is how a TensorRT wheel built for a newer CUDA than the driver fails.

    Creating a ``Runtime`` or ``Builder`` then raises ``TypeError: pybind11::init(): factory function
    returned nullptr``; plain ``pip install tensorrt`` is the newest CUDA build, so this is common on
    hosts with an older driver. ``None`` for any other error.
    """
    if "nullptr" not in str(error):
        return None
    return (f"TensorRT {getattr(trt, '__version__', '?')} could not initialise CUDA: the wheel was built for a newer "
            "CUDA than this host's NVIDIA driver supports. Install the TensorRT wheel for the driver's CUDA "
            "major version (`nvidia-smi` shows it), e.g. `pip install tensorrt-cu12` for CUDA 12, or update the driver")


def tensorrt_status(inference: bool = False) -> tuple[bool, str]:
    """The one probe of "is TensorRT usable here", and why (not); it never raises.

    Usable means TensorRT imports and creates a runtime, and a CUDA binding (cuda-python or pycuda)
    sees a GPU: building an engine and running one need the same, so ``inference`` changes nothing
    (callers still pass it to say which they mean).

    Returns:
        ``(usable, reason)``; ``reason`` names the TensorRT version and GPU when usable, else what
        is missing and how to install it.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: a wheel without its libnvinfer
        return False, f"TensorRT is not importable ({type(e).__name__}: {e}); {INSTALL_HINT}"
    try:
        name, cc = gpu_info(0)
    except BackendError as e:  # no CUDA binding: the message names what to install
        return False, f"TensorRT {trt.__version__} is installed; {e}"
    except Exception as e:
        return False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is usable ({e}); {INSTALL_HINT}"
    try:
        trt.Runtime(trt.Logger(trt.Logger.WARNING))
    except TypeError as e:
        return False, driver_mismatch_hint(trt, e) or f"TensorRT {trt.__version__} cannot create a runtime ({e})"
    return True, f"TensorRT {trt.__version__} on {name} (compute capability {cc})"


def tensorrt_usable() -> bool:
    """TensorRT, a CUDA binding and a CUDA GPU are all usable (the ``auto`` backend's test)."""
    return tensorrt_status(inference=True)[0]


def check_engine_stamp(stamp: dict, tensorrt_version: str, gpu_name: str, compute_capability: str) -> None:
    """Refuse an engine built for another TensorRT version or GPU.

    Without the version-/hardware-compatible build modes (not used here) a plan is tied to the
    TensorRT version and GPU architecture that built it (TensorRT Support Matrix, "Engine
    Portability"); we compare the full version string and the exact GPU to be safe.

    Raises:
        ArtifactError: naming what the engine was built with, what this host has, and the fix.
    """
    built_trt = str(stamp.get("tensorrt_version", "unknown"))
    built_gpu, built_cc = str(stamp.get("gpu_name", "unknown")), str(stamp.get("compute_capability", "unknown"))
    problems = []
    if built_trt != str(tensorrt_version):
        problems.append(f"TensorRT {built_trt} (engine) vs {tensorrt_version} (this host)")
    if built_cc != str(compute_capability) or built_gpu.strip() != str(gpu_name).strip():
        problems.append(f"GPU {built_gpu}, compute capability {built_cc} (engine) vs "
                        f"{gpu_name}, compute capability {compute_capability} (this host)")
    if problems:
        raise ArtifactError(f"the {stamp.get('precision', '?')} TensorRT engine was built for another host: "
                            + "; ".join(problems) + ". Rebuild it on this host with "
                            "`resdeploy export ... --trt` (engines are tied to their TensorRT version and GPU)")


def _runtime() -> tuple[object, CudaBinding]:
    """(tensorrt, a CUDA binding), or BackendError naming what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        raise BackendError(f"the tensorrt backend needs TensorRT, which is not importable "
                           f"({type(e).__name__}: {e}): {INSTALL_HINT}") from e
    return tensorrt, load_binding()


class TensorRTBackend(Backend):
    """Runs one TensorRT engine built by :func:`export.tensorrt.build_engine`.

    Args:
        engine_path: the ``.plan`` file (hash-verified by the caller when it comes from a manifest).
        precision: ``fp32`` | ``fp16`` | ``int8``: what the engine's ONNX computes in.
        stamp: the dict ``build_engine`` returned (``tensorrt_version``, ``gpu_name``,
            ``compute_capability``, ``input_size``, ``max_batch``, ...).
        device_id: CUDA device (one GPU per serving worker).

    Raises:
        BackendError: missing file or a stamp without ``input_size``/``max_batch``.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, precision: str, stamp: dict, device_id: int = 0):
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise BackendError(f"TensorRT engine not found: {self.engine_path}")
        self.stamp, self.device_id = dict(stamp), int(device_id)
        size, max_batch = self.stamp.get("input_size"), self.stamp.get("max_batch")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (size, max_batch)):
            raise BackendError(f"engine stamp of {self.engine_path.name} lacks a positive input_size/max_batch "
                               f"(got {size!r}/{max_batch!r}); rebuild it with `resdeploy export ... --trt`")
        self._lock = threading.Lock()  # one execution context: one inference at a time
        self._cuda: CudaBinding | None = None
        self._runtime = self._engine = self._context = None
        self._stream = self._h_in = self._h_out = self._d_in = self._d_out = None
        super().__init__(precision, (None, 3, size, size), max_batch)

    def _activate(self) -> None:
        trt, cuda = _runtime()
        try:
            count = cuda.device_count()
            if not 0 <= self.device_id < count:
                raise BackendError(f"CUDA device {self.device_id} does not exist ({count} visible)")
            name, (major, minor) = cuda.device_name(self.device_id), cuda.capability(self.device_id)
        except ResdeployError:
            raise
        except Exception as e:
            raise BackendError(f"CUDA is not usable here ({cuda.name}: {first_line(e)}): {INSTALL_HINT}") from e
        check_engine_stamp(self.stamp, trt.__version__, name, f"{major}.{minor}")
        self._cuda = cuda
        try:
            with cuda.device(self.device_id):
                self._load(trt, cuda)
        except BaseException as e:
            self._release()
            if isinstance(e, (ResdeployError, KeyboardInterrupt)) or not isinstance(e, Exception):
                raise
            raise BackendError(f"TensorRT cannot load {self.engine_path.name}: "
                               f"{driver_mismatch_hint(trt, e) or f'{type(e).__name__}: {first_line(e)}'}") from e
        log.info("TensorRT %s runs %s on %s through %s", trt.__version__, self.engine_path.name, name, cuda.name)

    def _load(self, trt, cuda: CudaBinding) -> None:
        """Deserialize, check I/O, allocate buffers for max_batch (device current)."""
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # TypeError "nullptr": driver too old
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"TensorRT {trt.__version__} cannot deserialize {self.engine_path} "
                               "(corrupt file, or built elsewhere); rebuild it with `resdeploy export ... --trt`")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        ins = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        if len(ins) != 1 or len(outs) != 1:
            raise BackendError(f"{self.engine_path.name} has inputs {ins} and outputs {outs}; expected one each")
        self._in_name, self._out_name = ins[0], outs[0]
        for n in names:
            if np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) != np.float32:
                raise BackendError(f"tensor {n!r} of {self.engine_path.name} is "
                                   f"{self._engine.get_tensor_dtype(n)}, not float32 I/O")
        profile_max = int(self._engine.get_tensor_profile_shape(self._in_name, 0)[2][0])
        if profile_max != self.max_batch_size:
            raise ArtifactError(f"{self.engine_path.name} accepts batches up to {profile_max} but its stamp "
                                f"says {self.max_batch_size}: the manifest does not describe this engine")
        classes = int(self._engine.get_tensor_shape(self._out_name)[1])
        size = self.input_shape[2]
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"cannot create a TensorRT execution context for {self.engine_path.name} "
                               "(out of GPU memory?)")
        # One at a time, so that whatever was allocated before a failure is freed by _release.
        self._stream = cuda.stream()
        self._h_in = cuda.pinned_empty((profile_max, 3, size, size), np.float32)
        self._h_out = cuda.pinned_empty((profile_max, classes), np.float32)
        self._d_in = cuda.malloc(self._h_in.nbytes)
        self._d_out = cuda.malloc(self._h_out.nbytes)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        with self._lock:
            try:
                with self._cuda.device(self.device_id):
                    return self._run(batch)
            except ResdeployError:
                raise
            except Exception as e:  # a CUDA or TensorRT error: the service answers 503 with this line
                raise BackendError(f"TensorRT inference failed on a batch of {n}: "
                                   f"{type(e).__name__}: {first_line(e)}") from e

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One batch through the engine (lock held, device current)."""
        n, cuda, ctx = batch.shape[0], self._cuda, self._context
        self._h_in[:n] = batch
        if not ctx.set_input_shape(self._in_name, tuple(batch.shape)):
            raise BackendError(f"TensorRT rejected input shape {batch.shape}")
        for name, address in ((self._in_name, self._d_in), (self._out_name, self._d_out)):
            if not ctx.set_tensor_address(name, address):
                raise BackendError(f"TensorRT rejected the device address of tensor {name!r}")
        cuda.htod_async(self._d_in, self._h_in[:n], self._stream)
        if not ctx.execute_async_v3(cuda.stream_handle(self._stream)):
            raise BackendError(f"TensorRT execution failed for a batch of {n}")
        cuda.dtoh_async(self._h_out[:n], self._d_out, self._stream)
        cuda.synchronize(self._stream)
        return self._h_out[:n].copy()

    def _free(self, cuda: CudaBinding) -> None:
        """Free buffers and the stream, then drop TensorRT objects, context before engine before runtime.

        Best effort: a failing step is logged and the rest still run.
        """
        steps = [(cuda.free, self._d_in), (cuda.free, self._d_out), (cuda.free_pinned, self._h_in),
                 (cuda.free_pinned, self._h_out), (cuda.destroy_stream, self._stream)]
        self._d_in = self._d_out = self._h_in = self._h_out = self._stream = None
        for step, handle in steps:
            if handle is None:
                continue
            try:
                step(handle)
            except Exception as e:
                log.warning("%s for TensorRT engine %s failed: %s", step.__name__, self.engine_path.name,
                            first_line(e))
        self._context = None
        self._engine = None
        self._runtime = None

    def _release(self) -> None:
        """Free everything with the device current, then let go of it; never raises an Exception
        (failures are logged), so a failed activation reports its own error and deactivation ends."""
        cuda, self._cuda = self._cuda, None
        try:
            with cuda.device(self.device_id):
                self._free(cuda)
        except Exception as e:
            log.warning("releasing TensorRT engine %s on CUDA device %d: %s", self.engine_path.name,
                        self.device_id, first_line(e))
        finally:
            self._free(cuda)  # a no-op unless the device could not be made current
            try:
                cuda.release(self.device_id)
            except Exception as e:
                log.warning("releasing CUDA device %d failed: %s", self.device_id, first_line(e))

    def _deactivate(self) -> None:
        with self._lock:
            self._release()

    def describe(self) -> dict:
        return super().describe() | {"file": self.engine_path.name, "device_id": self.device_id,
                                     "tensorrt_version": self.stamp.get("tensorrt_version"),
                                     "gpu_name": self.stamp.get("gpu_name")}
