"""backends/cuda_binding.py: which binding loads, CUDA error codes, pinned buffers, copies.

On CPU, through stand-ins of cuda-python's runtime module and ``pycuda.driver`` (:class:`FakeCuda`,
also used by tests/test_tensorrt.py): the API surface the bindings call, over one fake GPU whose
device memory is a dict of numpy arrays and whose pinned host memory is real. The ``gpu`` tests run
the real cuda-python binding; they need cuda-python and a visible GPU, not TensorRT.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import threading
import types

import numpy as np
import pytest

from backends.cuda_binding import CudaError, CudaPythonBinding, PycudaBinding, load_binding
from core.errors import BackendError

CUDA_PYTHON_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")
PYCUDA_MODULES = ("pycuda", "pycuda.driver")


class _CudaErrorT(enum.IntEnum):  # cuda-python's cudaError_t, the members used here
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorIllegalAddress = 700


class _Stream:  # cuda-python's cudaStream_t: int() is the handle
    def __init__(self, ptr: int):
        self.ptr = ptr

    def __int__(self):
        return self.ptr


class FakeCuda:
    """One fake GPU ("Fake GPU", compute capability 9.0) behind both bindings' modules.

    Attributes:
        log: counters and switches shared with the test (``freed``, ``freed_host``, ``free_fails``).
        fail: cuda-python call name -> error code that call returns instead of succeeding.
        mem: device address -> numpy uint8 array.
        live: address -> kind ("device", "pinned", cuda-python's "stream") of what is not yet freed.
        ctx_stack: pycuda contexts pushed (the tests' calls stay on one thread or balance pushes).
    """

    def __init__(self, log: dict | None = None):
        self.log = {} if log is None else log
        self.fail: dict[str, int] = {}
        self.mem: dict[int, np.ndarray] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.live: dict[int, str] = {}
        self.ctx_stack: list = []
        self._thread = threading.local()
        self._next = 0x7F00_0000_0000

    def _address(self) -> int:
        self._next += 0x1000
        return self._next

    def on_device(self) -> bool:
        """Whether the calling thread has device 0 current (a pushed pycuda context or cudaSetDevice(0))."""
        return bool(self.ctx_stack) or getattr(self._thread, "device", None) == 0

    def _count(self, key: str) -> None:
        self.log[key] = self.log.get(key, 0) + 1

    # ------------------------------------------------------------ cuda-python
    def cudart(self) -> types.ModuleType:
        rt = types.ModuleType("cuda.bindings.runtime")
        rt.cudaError_t = _CudaErrorT
        rt.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1,
                                                            "cudaMemcpyDeviceToHost": 2})
        ok, err = _CudaErrorT.cudaSuccess, _CudaErrorT

        def api(fn):
            def call(*args):
                if fn.__name__ in self.fail:
                    return _CudaErrorT(self.fail[fn.__name__]), None
                return fn(*args)
            setattr(rt, fn.__name__, call)
            return fn

        @api
        def cudaGetErrorName(code):
            return ok, _CudaErrorT(code).name.encode()

        @api
        def cudaGetDeviceCount():
            return ok, 1

        @api
        def cudaGetDeviceProperties(device):
            if device != 0:
                return err.cudaErrorInvalidDevice, None
            return ok, types.SimpleNamespace(name=b"Fake GPU" + bytes(248), major=9, minor=0)

        @api
        def cudaSetDevice(device):
            if device != 0:
                return (err.cudaErrorInvalidDevice,)
            self._thread.device = device
            return (ok,)

        @api
        def cudaMallocHost(nbytes):
            block = (ctypes.c_ubyte * nbytes)()
            ptr = ctypes.addressof(block)
            self.host[ptr], self.live[ptr] = block, "pinned"
            return ok, ptr

        @api
        def cudaFreeHost(ptr):
            if self.host.pop(ptr, None) is None:
                return (err.cudaErrorInvalidValue,)
            self.live.pop(ptr)
            self._count("freed_host")
            return (ok,)

        @api
        def cudaMalloc(nbytes):
            ptr = self._address()
            self.mem[ptr], self.live[ptr] = np.zeros(nbytes, np.uint8), "device"
            return ok, ptr

        @api
        def cudaFree(ptr):
            self._count("freed")
            if self.log.get("free_fails"):
                return (err.cudaErrorIllegalAddress,)
            del self.mem[ptr], self.live[ptr]
            return (ok,)

        @api
        def cudaStreamCreate():
            stream = _Stream(self._address())
            self.live[int(stream)] = "stream"
            return ok, stream

        @api
        def cudaStreamSynchronize(stream):
            return (ok,) if int(stream) in self.live else (err.cudaErrorInvalidValue,)

        @api
        def cudaStreamDestroy(stream):
            return (ok,) if self.live.pop(int(stream), None) else (err.cudaErrorInvalidValue,)

        @api
        def cudaMemcpyAsync(dst, src, count, kind, stream):
            device = self.mem.get(dst if kind == rt.cudaMemcpyKind.cudaMemcpyHostToDevice else src)
            if device is None or count > device.nbytes or int(stream) not in self.live:
                return (err.cudaErrorInvalidValue,)
            if kind == rt.cudaMemcpyKind.cudaMemcpyHostToDevice:
                device[:count] = np.frombuffer(ctypes.string_at(src, count), np.uint8)
            else:
                ctypes.memmove(dst, device.ctypes.data, count)
            return (ok,)

        return rt

    # ------------------------------------------------------------ pycuda
    def pycuda(self) -> types.ModuleType:
        fake, cuda = self, types.ModuleType("pycuda.driver")

        class DeviceAllocation:
            def __init__(self, nbytes):
                self.ptr = fake._address()
                fake.mem[self.ptr], fake.live[self.ptr] = np.zeros(nbytes, np.uint8), "device"

            def __int__(self):
                return self.ptr

            def free(self):
                fake._count("freed")
                if fake.log.get("free_fails"):
                    raise RuntimeError("cuMemFree failed: an illegal memory access was encountered")
                del fake.mem[self.ptr], fake.live[self.ptr]

        def pagelocked_empty(shape, dtype):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize

            def free(block):
                fake.live.pop(ctypes.addressof(block))
                fake._count("freed_host")

            block = type("HostAllocation", (ctypes.c_ubyte * nbytes,), {"free": free})()
            fake.live[ctypes.addressof(block)] = "pinned"
            return np.ndarray(shape, dtype, buffer=block)  # its base is the allocation, as in pycuda

        class Context:
            def __init__(self):
                self.detached = False

            def push(self):
                fake.ctx_stack.append(self)

            def detach(self):
                self.detached = fake.log["detached"] = True

            @staticmethod
            def pop():
                fake.ctx_stack.pop()

        class Device:
            def __init__(self, i):
                if i != 0:
                    raise RuntimeError("cuDeviceGet failed: invalid device ordinal")

            count = staticmethod(lambda: 1)
            name = lambda self: "Fake GPU"  # noqa: E731
            compute_capability = lambda self: (9, 0)  # noqa: E731
            retain_primary_context = lambda self: Context()  # noqa: E731

        class Stream:
            def __init__(self):
                self.handle = fake._address()

            def synchronize(self):
                pass

        def htod(dst, src, stream):
            fake.mem[int(dst)][:src.nbytes] = np.frombuffer(np.ascontiguousarray(src).tobytes(), np.uint8)

        def dtoh(dst, src, stream):
            dst[...] = fake.mem[int(src)][:dst.nbytes].view(dst.dtype).reshape(dst.shape)

        cuda.init, cuda.Device, cuda.Context, cuda.Stream = (lambda: None), Device, Context, Stream
        cuda.mem_alloc, cuda.pagelocked_empty = DeviceAllocation, pagelocked_empty
        cuda.memcpy_htod_async, cuda.memcpy_dtoh_async = htod, dtoh
        return cuda

    def install(self, monkeypatch, bindings=("cuda-python",)) -> None:
        """Register the stand-ins for ``bindings`` in sys.modules and make the others unimportable."""
        for name in CUDA_PYTHON_MODULES + PYCUDA_MODULES:
            monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
        if "cuda-python" in bindings:
            rt = self.cudart()
            top, sub = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
            top.bindings, sub.runtime = sub, rt
            for name, module in (("cuda", top), ("cuda.bindings", sub), ("cuda.bindings.runtime", rt)):
                monkeypatch.setitem(sys.modules, name, module)
        if "pycuda" in bindings:
            driver, top = self.pycuda(), types.ModuleType("pycuda")
            top.driver = driver
            monkeypatch.setitem(sys.modules, "pycuda", top)
            monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


@pytest.fixture
def fake(monkeypatch) -> FakeCuda:
    f = FakeCuda()
    f.install(monkeypatch, ("cuda-python", "pycuda"))
    return f


# ---------------------------------------------------------------- which binding loads

def test_load_binding_prefers_cuda_python(fake):
    binding = load_binding()
    assert isinstance(binding, CudaPythonBinding) and binding.name == "cuda-python"
    assert (binding.device_count(), binding.device_name(0), binding.capability(0)) == (1, "Fake GPU", (9, 0))


def test_load_binding_takes_the_pre_12_6_cuda_cudart_module(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch, ())
    top = types.ModuleType("cuda")
    top.cudart = fake.cudart()  # `from cuda import cudart`; no cuda.bindings
    monkeypatch.setitem(sys.modules, "cuda", top)
    monkeypatch.setitem(sys.modules, "cuda.cudart", top.cudart)
    assert load_binding().device_name(0) == "Fake GPU"


def test_load_binding_falls_back_to_pycuda(monkeypatch):
    FakeCuda().install(monkeypatch, ("pycuda",))
    binding = load_binding()
    assert isinstance(binding, PycudaBinding) and binding.name == "pycuda"
    assert (binding.device_count(), binding.device_name(0), binding.capability(0)) == (1, "Fake GPU", (9, 0))


def test_load_binding_names_what_to_install_when_neither_imports(monkeypatch):
    FakeCuda().install(monkeypatch, ())
    with pytest.raises(BackendError) as e:
        load_binding()
    msg = str(e.value)
    assert "cuda-python: ModuleNotFoundError" in msg and "pycuda: ModuleNotFoundError" in msg
    assert "pip install 'resdeploy[gpu]'" in msg and len(msg.splitlines()) == 1


# ---------------------------------------------------------------- cuda-python: errors, buffers, copies

@pytest.mark.parametrize("call, code, invoke", [
    ("cudaMalloc", 2, lambda b: b.malloc(64)),
    ("cudaGetDeviceCount", 100, lambda b: b.device_count()),
    ("cudaSetDevice", 101, lambda b: b.device(0).__enter__()),
])
def test_an_error_code_raises_naming_the_call_and_the_error(fake, call, code, invoke):
    fake.fail[call] = code
    with pytest.raises(CudaError, match=rf"^{call} failed: {_CudaErrorT(code).name} \(CUDA error {code}\)$"):
        invoke(CudaPythonBinding())


def test_pinned_buffer_is_a_writable_view_of_the_block_and_is_freed(fake):
    binding = CudaPythonBinding()
    with binding.device(0):
        h = binding.pinned_empty((2, 3), np.float32)
    assert h.shape == (2, 3) and h.dtype == np.float32 and fake.live[h.ctypes.data] == "pinned"
    h[...] = np.arange(6).reshape(2, 3)
    assert bytes(fake.host[h.ctypes.data]) == np.arange(6, dtype=np.float32).tobytes()
    for view in (h[1:], h[:1]):
        with pytest.raises(ValueError, match="not a view"):
            binding.free_pinned(view)
    binding.free_pinned(h)
    assert not fake.live and fake.log["freed_host"] == 1
    with pytest.raises(ValueError, match="not twice"):
        binding.free_pinned(h)


@pytest.mark.parametrize("bindings", [("cuda-python",), ("pycuda",)])
def test_round_trip_through_device_memory_on_a_stream(monkeypatch, bindings):
    fake = FakeCuda()
    fake.install(monkeypatch, bindings)
    binding = load_binding()
    assert binding.name == bindings[0]
    with binding.device(0):
        assert fake.on_device()
        stream = binding.stream()
        h, out = binding.pinned_empty((4, 5), np.float32), binding.pinned_empty((4, 5), np.float32)
        d = binding.malloc(h.nbytes)
        h[...] = np.arange(20, dtype=np.float32).reshape(4, 5)
        out[...] = -1
        binding.htod_async(d, h[:3], stream)  # a leading slice: what the backend copies per batch
        binding.dtoh_async(out[:3], d, stream)
        binding.synchronize(stream)
        assert isinstance(binding.stream_handle(stream), int)
        np.testing.assert_array_equal(out[:3], h[:3])
        assert (out[3] == -1).all()
        with pytest.raises(ValueError, match="C-contiguous"):
            binding.htod_async(d, h[:, :2], stream)
        binding.free(d)
        binding.free_pinned(h)
        binding.free_pinned(out)
        binding.destroy_stream(stream)
    binding.release(0)
    assert not fake.ctx_stack and not fake.live


# ---------------------------------------------------------------- the real cuda-python on a GPU

def _real_cuda_python() -> tuple[bool, str]:
    try:
        binding = CudaPythonBinding()
    except (ImportError, OSError) as e:
        return False, f"cuda-python is not importable ({e})"
    try:
        count = binding.device_count()
    except Exception as e:
        return False, f"cuda-python sees no usable GPU ({e})"
    return (count > 0, f"{count} CUDA devices visible")


_GPU, _GPU_REASON = _real_cuda_python()
needs_gpu = pytest.mark.skipif(not _GPU, reason=_GPU_REASON)


@pytest.mark.gpu
@needs_gpu
def test_real_cuda_python_round_trip():
    binding = load_binding()
    assert binding.name == "cuda-python"
    major, minor = binding.capability(0)
    assert binding.device_name(0) and major >= 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    with binding.device(0):
        stream = binding.stream()
        h_in, h_out = binding.pinned_empty(x.shape, np.float32), binding.pinned_empty(x.shape, np.float32)
        d = binding.malloc(x.nbytes)
        try:
            h_in[...] = x
            h_out[...] = 0
            binding.htod_async(d, h_in[:5], stream)
            binding.dtoh_async(h_out[:5], d, stream)
            binding.synchronize(stream)
            np.testing.assert_array_equal(h_out[:5], x[:5])
            assert not h_out[5:].any()
        finally:
            binding.free(d)
            binding.free_pinned(h_in)
            binding.free_pinned(h_out)
            binding.destroy_stream(stream)


@pytest.mark.gpu
@needs_gpu
def test_real_cuda_python_error_names_the_call():
    binding = CudaPythonBinding()
    with pytest.raises(CudaError, match=r"^cudaSetDevice failed: cudaErrorInvalidDevice \(CUDA error \d+\)$"):
        with binding.device(binding.device_count() + 7):
            pass
