"""CUDA from Python through one small interface, for TensorRT: cuda-python first, pycuda second.

TensorRT's Python API takes device pointers and a stream handle as plain ints; the rest (devices,
page-locked host buffers, device memory, async copies, streams) comes from a CUDA binding.
cuda-python (``pip install cuda-python``) has wheels for every platform and is what NVIDIA's
TensorRT samples use (samples/python/common_runtime.py); pycuda has no Linux wheels (it compiles
against a CUDA toolkit) but is used where installed. :func:`load_binding` picks one.

Device pointers are ints everywhere; streams are opaque objects (:meth:`CudaBinding.stream_handle`
gives the int TensorRT's ``execute_async_v3`` takes). Nothing is imported until a binding is made.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes

import numpy as np

from core.errors import BackendError, first_line

INSTALL_HINT = ("pip install 'resdeploy[gpu]' on a host with an NVIDIA GPU and driver "
                "(TensorRT 10 or 11 and cuda-python; pycuda also works where installed)")


class CudaError(RuntimeError):
    """A CUDA call returned an error code; the message names the call and the error."""


class CudaBinding(abc.ABC):
    """Devices, page-locked host buffers, device memory, async copies and streams.

    Allocations, copies and streams need the device current on the calling thread: use them
    inside ``with binding.device(i):``, which any thread may enter (a serving worker thread need
    not be the one that allocated).
    """

    name = "cuda"

    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of visible CUDA devices."""

    @abc.abstractmethod
    def device_name(self, device_id: int) -> str:
        """Marketing name, e.g. ``NVIDIA H100 80GB HBM3``."""

    @abc.abstractmethod
    def capability(self, device_id: int) -> tuple[int, int]:
        """Compute capability ``(major, minor)``."""

    @abc.abstractmethod
    def device(self, device_id: int) -> contextlib.AbstractContextManager:
        """Make ``device_id`` (its primary context) current on the calling thread for a ``with`` block."""

    def release(self, device_id: int) -> None:
        """Let go of what :meth:`device` holds for ``device_id`` once nothing on it is left in use."""

    @abc.abstractmethod
    def pinned_empty(self, shape: tuple, dtype) -> np.ndarray:
        """An uninitialised page-locked host array; free it with :meth:`free_pinned`."""

    @abc.abstractmethod
    def free_pinned(self, array: np.ndarray) -> None:
        """Free an array :meth:`pinned_empty` returned (the array itself, not a view of it)."""

    @abc.abstractmethod
    def malloc(self, nbytes: int) -> int:
        """Device memory of ``nbytes``; returns its address."""

    @abc.abstractmethod
    def free(self, ptr: int) -> None:
        """Free an address :meth:`malloc` returned."""

    @abc.abstractmethod
    def stream(self):
        """A new stream; destroy it with :meth:`destroy_stream`."""

    @abc.abstractmethod
    def stream_handle(self, stream) -> int:
        """The stream's handle as an int (what ``execute_async_v3`` takes)."""

    @abc.abstractmethod
    def htod_async(self, dst: int, src: np.ndarray, stream) -> None:
        """Queue a copy of contiguous page-locked ``src`` to device address ``dst`` on ``stream``."""

    @abc.abstractmethod
    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        """Queue a copy of ``dst.nbytes`` from device address ``src`` into contiguous page-locked ``dst``."""

    @abc.abstractmethod
    def synchronize(self, stream) -> None:
        """Wait until all work queued on ``stream`` is done."""

    @abc.abstractmethod
    def destroy_stream(self, stream) -> None:
        """Destroy a stream made by :meth:`stream`."""


def _address(array: np.ndarray) -> int:
    if not array.flags.c_contiguous:
        raise ValueError(f"CUDA copies need a C-contiguous array, got strides {array.strides}")
    return array.ctypes.data


class CudaPythonBinding(CudaBinding):
    """NVIDIA's cuda-python, runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6).

    Every call returns ``(error, *results)``; a failed call raises :class:`CudaError` naming it.
    The runtime API uses each device's primary context, as TensorRT does, so :meth:`device` is
    ``cudaSetDevice`` (the device stays current after the block) and there is nothing to release.

    Raises:
        ImportError: cuda-python is not installed.
    """

    name = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self._rt = cudart
        self._pinned: dict[int, int] = {}  # address -> bytes, of what pinned_empty handed out

    def _call(self, name: str, *args):
        """``cudart.<name>(*args)`` without its error code: the one result, a tuple of several, or None."""
        err, *results = getattr(self._rt, name)(*args)
        if err != self._rt.cudaError_t.cudaSuccess:
            try:
                code_name = self._rt.cudaGetErrorName(err)[1]
                code_name = code_name.decode() if isinstance(code_name, bytes) else str(code_name)
            except Exception:
                code_name = str(err)
            raise CudaError(f"{name} failed: {code_name} (CUDA error {int(getattr(err, 'value', err))})")
        return results[0] if len(results) == 1 else tuple(results) or None

    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount"))

    def _properties(self, device_id: int):
        return self._call("cudaGetDeviceProperties", device_id)

    def device_name(self, device_id: int) -> str:
        name = self._properties(device_id).name
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return name.split("\x00", 1)[0].strip()

    def capability(self, device_id: int) -> tuple[int, int]:
        prop = self._properties(device_id)
        return int(prop.major), int(prop.minor)

    @contextlib.contextmanager
    def device(self, device_id: int):
        self._call("cudaSetDevice", device_id)
        yield

    def pinned_empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        count = int(np.prod(shape))
        ptr = int(self._call("cudaMallocHost", max(1, count * dtype.itemsize)))
        self._pinned[ptr] = count * dtype.itemsize
        # A numpy view of the page-locked block, as in NVIDIA's common_runtime.HostDeviceMem, but through
        # a ctypes byte array so that any dtype (float16 too) comes out exactly as asked.
        block = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(ptr)
        return np.frombuffer(block, dtype, count=count).reshape(shape)

    def free_pinned(self, array: np.ndarray) -> None:
        ptr = array.ctypes.data
        if self._pinned.get(ptr) != array.nbytes:
            raise ValueError("free_pinned takes an array pinned_empty returned (not a view of one, not twice)")
        del self._pinned[ptr]
        self._call("cudaFreeHost", ptr)

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", int(nbytes)))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def stream(self):
        return self._call("cudaStreamCreate")

    def stream_handle(self, stream) -> int:
        return int(stream)

    def htod_async(self, dst: int, src: np.ndarray, stream) -> None:
        self._call("cudaMemcpyAsync", dst, _address(src), src.nbytes,
                   self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        self._call("cudaMemcpyAsync", _address(dst), src, dst.nbytes,
                   self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def synchronize(self, stream) -> None:
        self._call("cudaStreamSynchronize", stream)

    def destroy_stream(self, stream) -> None:
        self._call("cudaStreamDestroy", stream)


class PycudaBinding(CudaBinding):
    """pycuda's driver API; its failures raise ``pycuda.driver.Error`` naming the call.

    :meth:`device` retains the device's primary context once (the context the CUDA runtime, and so
    TensorRT, uses) and pushes/pops it around each block; :meth:`release` detaches it. Device
    allocations are kept here by address, since pycuda frees one when its object is collected.

    Raises:
        ImportError: pycuda is not installed.
    """

    name = "pycuda"

    def __init__(self):
        import pycuda.driver

        self._cuda = pycuda.driver
        self._contexts: dict[int, object] = {}
        self._allocations: dict[int, object] = {}

    def _device(self, device_id: int):
        self._cuda.init()  # idempotent
        return self._cuda.Device(device_id)

    def device_count(self) -> int:
        self._cuda.init()
        return int(self._cuda.Device.count())

    def device_name(self, device_id: int) -> str:
        return str(self._device(device_id).name()).strip()

    def capability(self, device_id: int) -> tuple[int, int]:
        major, minor = self._device(device_id).compute_capability()
        return int(major), int(minor)

    @contextlib.contextmanager
    def device(self, device_id: int):
        if device_id not in self._contexts:
            self._contexts[device_id] = self._device(device_id).retain_primary_context()
        self._contexts[device_id].push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def release(self, device_id: int) -> None:
        context = self._contexts.pop(device_id, None)
        if context is not None:
            context.detach()

    def pinned_empty(self, shape: tuple, dtype) -> np.ndarray:
        return self._cuda.pagelocked_empty(tuple(shape), np.dtype(dtype))

    def free_pinned(self, array: np.ndarray) -> None:
        owner = array  # the HostAllocation behind the array (its numpy base)
        while owner is not None and not hasattr(owner, "free"):
            owner = getattr(owner, "base", None)
        if owner is not None:
            owner.free()

    def malloc(self, nbytes: int) -> int:
        allocation = self._cuda.mem_alloc(int(nbytes))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def stream(self):
        return self._cuda.Stream()

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def htod_async(self, dst: int, src: np.ndarray, stream) -> None:
        _address(src)
        self._cuda.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        _address(dst)
        self._cuda.memcpy_dtoh_async(dst, src, stream)

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def destroy_stream(self, stream) -> None:
        pass  # pycuda destroys a stream when its object is collected


def load_binding() -> CudaBinding:
    """cuda-python's binding if it imports, else pycuda's.

    Raises:
        BackendError: neither imports; names each import failure and what to install.
    """
    failures = []
    for binding in (CudaPythonBinding, PycudaBinding):
        try:
            return binding()
        except (ImportError, OSError) as e:  # OSError: a wheel without its shared library
            failures.append(f"{binding.name}: {type(e).__name__}: {first_line(e)}")
    raise BackendError(f"TensorRT needs a CUDA binding and neither cuda-python nor pycuda imports "
                       f"({'; '.join(failures)}): {INSTALL_HINT}")
