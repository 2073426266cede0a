"""TensorRT path: stamp checks, lazy imports and failure messages on CPU; real engines on a GPU.

The CPU tests also drive ``build_engine`` and ``TensorRTBackend`` through a small fake of the
``tensorrt`` module (the API surface they call, nothing more) on the fake GPU of
tests/test_cuda_binding.py, through cuda-python's module by default and pycuda's where a test asks:
that checks our own logic (profile shapes, no precision flags, atomic writes, timing-cache reuse,
buffer slicing, the device current on the calling thread, cleanup on every path), not TensorRT.
The ``gpu`` tests build and run real engines.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from test_cuda_binding import FakeCuda

from backends.tensorrt import INSTALL_HINT, TensorRTBackend, check_engine_stamp
from core.errors import ArtifactError, BackendError, ExportError
from export.tensorrt import ENGINE_PRECISIONS, build_engine, engine_file_name, require_tensorrt, tensorrt_status

ROOT = Path(__file__).resolve().parents[1]
STAMP = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
         "max_batch": 16, "opt_batch": 10, "input_size": 32, "precision": "fp16"}


def _no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError


# ---------------------------------------------------------------- stamp checks (pure functions)

def test_matching_stamp_is_accepted():
    check_engine_stamp(STAMP, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.mark.parametrize("host, built, here", [
    (("10.14.1.48", "NVIDIA H100 80GB HBM3", "9.0"), "10.13.0.35", "10.14.1.48"),
    (("10.13.0.35", "NVIDIA H200", "9.0"), "NVIDIA H100 80GB HBM3", "NVIDIA H200"),
    (("10.13.0.35", "NVIDIA H100 80GB HBM3", "8.9"), "compute capability 9.0", "compute capability 8.9"),
])
def test_mismatched_stamp_is_refused_naming_both_sides(host, built, here):
    with pytest.raises(ArtifactError) as e:
        check_engine_stamp(STAMP, *host)
    msg = str(e.value)
    assert built in msg and here in msg
    assert "--trt" in msg and "Rebuild" in msg


def test_stamp_without_fields_is_refused():
    with pytest.raises(ArtifactError, match="unknown"):
        check_engine_stamp({}, "10.13.0.35", "NVIDIA H200", "9.0")


# ---------------------------------------------------------------- without tensorrt

def test_status_and_require_explain_how_to_install(monkeypatch):
    _no_tensorrt(monkeypatch)
    usable, reason = tensorrt_status()
    assert not usable and INSTALL_HINT in reason
    with pytest.raises(ExportError, match=r"pip install 'resdeploy\[gpu\]'"):
        require_tensorrt()


def test_build_engine_refuses_int8_cpu_before_touching_tensorrt(monkeypatch, tmp_path):
    _no_tensorrt(monkeypatch)  # the refusal must not depend on TensorRT being importable
    with pytest.raises(ExportError, match="int8-cpu.*ONNX Runtime.*'int8'"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "e.plan", precision="int8-cpu", input_size=32,
                     max_batch=8)
    with pytest.raises(ExportError, match="int8-cpu"):
        engine_file_name("int8-cpu")
    assert [engine_file_name(p) for p in ENGINE_PRECISIONS] == ["model.fp32.plan", "model.fp16.plan",
                                                                 "model.int8.plan"]


def test_build_engine_rejects_bad_batches(tmp_path):
    with pytest.raises(ExportError, match="opt_batch 20 exceeds max_batch 8"):
        build_engine(tmp_path / "m.onnx", tmp_path / "e.plan", precision="fp16", input_size=32, max_batch=8,
                     opt_batch=20)


def test_backend_constructs_without_tensorrt_and_activate_says_what_to_install(monkeypatch, tmp_path):
    _no_tensorrt(monkeypatch)
    plan = tmp_path / "model.fp16.plan"
    plan.write_bytes(b"not an engine")
    backend = TensorRTBackend(plan, "fp16", STAMP)
    assert backend.input_shape == (None, 3, 32, 32) and backend.max_batch_size == 16
    with pytest.raises(BackendError, match=r"TensorRT.*pip install 'resdeploy\[gpu\]'.*cuda-python"):
        backend.activate()
    assert not backend.active
    with pytest.raises(BackendError, match="not active"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_backend_rejects_missing_file_and_incomplete_stamp(tmp_path):
    with pytest.raises(BackendError, match="not found"):
        TensorRTBackend(tmp_path / "nope.plan", "fp16", STAMP)
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"x")
    with pytest.raises(BackendError, match="input_size/max_batch"):
        TensorRTBackend(plan, "fp16", {"tensorrt_version": "10.13.0.35"})


def test_tensorrt_modules_import_without_torch_or_tensorrt(tmp_path):
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"x")
    script = (f"import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
              f"import backends.tensorrt as m, export.tensorrt\n"
              f"b = m.TensorRTBackend({str(plan)!r}, 'int8', {STAMP!r})\n"
              f"print(b.describe()['backend'])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tensorrt"


# ---------------------------------------------------------------- fake tensorrt on a fake GPU (our logic)

class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _fake_tensorrt(log: dict, cuda: FakeCuda) -> types.ModuleType:
    """A minimal stand-in for tensorrt whose engines compute on ``cuda``'s device memory."""
    mem = cuda.mem
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, sev=None: None})
    trt.NetworkDefinitionCreationFlag = _Obj(STRONGLY_TYPED=1)  # TensorRT 10.x's value (11.x: 0, deprecated)
    trt.LayerType = _Obj(CONVOLUTION=1, QUANTIZE=33)
    trt.DataType = _Obj(FLOAT=0, HALF=1)
    trt.MemoryPoolType = _Obj(WORKSPACE=0)
    trt.BuilderFlag = _Obj(TF32=6)  # no FP16/INT8: TensorRT 11 removed them; touching one fails
    trt.TensorIOMode = _Obj(INPUT=1, OUTPUT=2)
    trt.nptype = lambda dt: np.float32

    class Cache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = {6: True}, [], None

        def set_memory_pool_limit(self, pool, size):
            log["workspace"] = size

        def clear_flag(self, f):
            self.flags[f] = False

        def get_flag(self, f):
            return self.flags.get(f, False)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, blob):
            return Cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Network:
        """Layers follow the "ONNX" bytes: b"int8" adds a Quantize layer, b"fp16" half tensors."""

        num_inputs = num_outputs = 1

        def __init__(self):
            self.layers = []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return _Obj(name="input", shape=(-1, 3, log["size"], log["size"]))

    def layer(kind, dtype):
        return _Obj(type=kind, num_outputs=1, get_output=lambda j: _Obj(dtype=dtype))

    class Parser:
        def __init__(self, network, logger):
            self.errors, self.network = [], network

        def parse(self, data, path=None):
            if data.startswith(b"bad"):
                self.errors = ["node 3 (Conv): unsupported", "node 7 (Add): bad type"]
            half = trt.DataType.HALF if b"fp16" in data else trt.DataType.FLOAT
            self.network.layers = [layer(trt.LayerType.CONVOLUTION, half)]
            if b"int8" in data:
                self.network.layers.insert(0, layer(trt.LayerType.QUANTIZE, trt.DataType.FLOAT))
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Builder:
        def __init__(self, logger):
            if log.get("driver_too_old"):
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def create_network(self, flags):
            log["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return _Obj(set_shape=lambda name, mn, opt, mx: log.update(profile=(name, mn, opt, mx)))

        def build_serialized_network(self, network, config):
            log["flags"] = dict(config.flags)
            name, mn, opt, mx = log["profile"]
            return json.dumps({"max": mx[0], "size": mx[2], "classes": 10}).encode()

    class Context:
        def __init__(self):
            self.addr, self.shape = {}, None

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return name not in log.get("reject_address", ())

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)  # the handle, not a binding's stream object
            if "execute_error" in log:
                raise log["execute_error"]
            n = self.shape[0]
            x = mem[self.addr["input"]].view(np.float32)[:int(np.prod(self.shape))].reshape(self.shape)
            logits = np.repeat(x.reshape(n, 3, -1).mean(-1), 4, axis=1)[:, :10]
            mem[self.addr["logits"]].view(np.float32)[:logits.size] = logits.ravel()
            log["on_device_while_running"] = cuda.on_device()
            return True

    class Engine:
        def __init__(self, spec):
            self.spec, self.num_io_tensors = spec, 2

        def get_tensor_name(self, i):
            return ["input", "logits"][i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_profile_shape(self, name, profile):
            s = self.spec["size"]
            return [(1, 3, s, s), (1, 3, s, s), (self.spec["max"], 3, s, s)]

        def get_tensor_shape(self, name):
            return (-1, self.spec["classes"])

        def create_execution_context(self):
            return Context()

    trt.Builder, trt.OnnxParser = Builder, Parser
    def runtime(logger):
        if log.get("driver_too_old"):
            raise TypeError("pybind11::init(): factory function returned nullptr")
        return _Obj(deserialize_cuda_engine=lambda b: Engine(json.loads(bytes(b))))

    trt.Runtime = runtime
    return trt


@pytest.fixture
def fake_gpu(request, monkeypatch) -> dict:
    """Fake TensorRT on a fake GPU reached through cuda-python, or through pycuda where a test
    parametrizes ``fake_gpu`` indirectly with "pycuda"; returns the log both fakes write."""
    binding = getattr(request, "param", "cuda-python")
    log = {"size": 32, "binding": binding}
    cuda = FakeCuda(log)
    cuda.install(monkeypatch, (binding,))
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(log, cuda))
    log.update(ctx_stack=cuda.ctx_stack, live=cuda.live, fail=cuda.fail)
    return log


BOTH_BINDINGS = pytest.mark.parametrize("fake_gpu", ["cuda-python", "pycuda"], indirect=True)


def test_build_with_fake_tensorrt(fake_gpu, tmp_path, caplog):
    onnx = tmp_path / "model.fp16.onnx"
    onnx.write_bytes(b"onnx fp16")
    cache = tmp_path / "timing.cache"
    stamp = build_engine(onnx, tmp_path / "model.fp16.plan", precision="fp16", input_size=32, max_batch=40,
                         workspace_gib=0.5, timing_cache=cache)
    assert fake_gpu["network_flags"] == 1 << 1  # STRONGLY_TYPED
    assert fake_gpu["profile"] == ("input", (1, 3, 32, 32), (10, 3, 32, 32), (40, 3, 32, 32))
    assert fake_gpu["workspace"] == 1 << 29
    assert fake_gpu["flags"] == {6: True}  # no precision flag; TF32 left alone for fp16
    assert {k: stamp[k] for k in ("tensorrt_version", "gpu_name", "compute_capability", "max_batch",
                                  "opt_batch", "input_size", "precision", "tf32")} == {
        "tensorrt_version": "10.99.0", "gpu_name": "Fake GPU", "compute_capability": "9.0", "max_batch": 40,
        "opt_batch": 10, "input_size": 32, "precision": "fp16", "tf32": True}
    assert stamp["bytes"] == (tmp_path / "model.fp16.plan").stat().st_size > 0
    assert cache.read_bytes() == b"+"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    onnx.write_bytes(b"onnx")  # float32 only
    with caplog.at_level(logging.INFO, logger="export.tensorrt"):
        stamp = build_engine(onnx, tmp_path / "model.fp32.plan", precision="fp32", input_size=32, max_batch=4,
                             timing_cache=cache)
    assert "reusing timing cache" in caplog.text and cache.read_bytes() == b"++"
    assert stamp["opt_batch"] == 4 and stamp["tf32"] is False and fake_gpu["flags"] == {6: False}


def test_build_reports_every_parser_error_and_wrong_input(fake_gpu, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"bad")
    with pytest.raises(ExportError, match=r"2 errors.*node 3 \(Conv\).*node 7 \(Add\)"):
        build_engine(bad, tmp_path / "e.plan", precision="fp32", input_size=32, max_batch=4)
    assert not (tmp_path / "e.plan").exists()
    ok = tmp_path / "ok.onnx"
    ok.write_bytes(b"onnx")
    with pytest.raises(ExportError, match=r"not \[batch, 3, 224, 224\]"):
        build_engine(ok, tmp_path / "e.plan", precision="fp32", input_size=224, max_batch=4)


@BOTH_BINDINGS
def test_backend_with_fake_runtime(fake_gpu, tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx int8")
    plan = tmp_path / "model.int8.plan"
    stamp = build_engine(onnx, plan, precision="int8", input_size=32, max_batch=12)
    rng = np.random.default_rng(0)
    with TensorRTBackend(plan, "int8", stamp) as backend:
        assert fake_gpu["ctx_stack"] == []  # activation leaves the thread's context stack as it found it
        assert sorted(fake_gpu["live"].values()) == ["device", "device", "pinned", "pinned"] + (
            ["stream"] if fake_gpu["binding"] == "cuda-python" else [])
        for n in (1, 7, 12):
            x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
            out = backend.infer(x)
            want = np.repeat(x.reshape(n, 3, -1).mean(-1), 4, axis=1)[:, :10]
            np.testing.assert_allclose(out, want, rtol=1e-6)
            assert out.shape == (n, 10) and out.base is None  # a copy, not a view of the pinned buffer
        assert fake_gpu["on_device_while_running"] and fake_gpu["ctx_stack"] == []
        with pytest.raises(BackendError, match="outside 1..12"):
            backend.infer(np.zeros((13, 3, 32, 32), np.float32))

        fake_gpu["on_device_while_running"], result = None, {}  # a worker thread: the device is made current there
        worker = threading.Thread(target=lambda: result.update(out=backend.infer(np.ones((2, 3, 32, 32), np.float32))))
        worker.start()
        worker.join()
        assert fake_gpu["on_device_while_running"] and result["out"].shape == (2, 10)
    assert not fake_gpu["live"] and fake_gpu["freed"] == fake_gpu["freed_host"] == 2
    assert fake_gpu["ctx_stack"] == [] and fake_gpu.get("detached", False) == (fake_gpu["binding"] == "pycuda")

    with pytest.raises(ArtifactError, match=r"Other GPU.*\(engine\) vs Fake GPU.*\(this host\)"):
        TensorRTBackend(plan, "int8", stamp | {"gpu_name": "Other GPU"}).activate()
    with pytest.raises(ArtifactError, match="accepts batches up to 12 but its stamp says 16"):
        TensorRTBackend(plan, "int8", stamp | {"max_batch": 16}).activate()
    assert fake_gpu["ctx_stack"] == []


@pytest.mark.parametrize("content, label, found", [
    (b"onnx", "fp16", "fp32"), (b"onnx", "int8", "fp32"), (b"onnx fp16", "fp32", "fp16"),
    (b"onnx int8", "fp16", "int8"),
])
def test_build_refuses_a_file_whose_types_do_not_match_its_label(fake_gpu, tmp_path, content, label, found):
    """Strong typing builds what the file computes in: a mislabelled file would be stamped wrongly."""
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(content)
    with pytest.raises(ExportError, match=f"labelled {label} but its graph computes in {found}"):
        build_engine(onnx, tmp_path / "e.plan", precision=label, input_size=32, max_batch=4)
    assert not (tmp_path / "e.plan").exists()


def test_int8_engine_builds_from_a_qdq_file(fake_gpu, tmp_path):
    onnx = tmp_path / "model.int8.onnx"
    onnx.write_bytes(b"onnx int8")
    stamp = build_engine(onnx, tmp_path / "model.int8.plan", precision="int8", input_size=32, max_batch=8)
    assert stamp["precision"] == "int8" and fake_gpu["flags"] == {6: True}  # no INT8 flag: the Q/DQ decide


@BOTH_BINDINGS
def test_a_driver_too_old_for_the_wheel_is_named_with_the_fix(fake_gpu, tmp_path):
    onnx = tmp_path / "model.fp32.onnx"
    onnx.write_bytes(b"onnx")
    plan = tmp_path / "model.fp32.plan"
    stamp = build_engine(onnx, plan, precision="fp32", input_size=32, max_batch=4)
    fake_gpu["driver_too_old"] = True
    usable, reason = tensorrt_status()
    assert not usable and "newer CUDA than this host's NVIDIA driver" in reason and "tensorrt-cu12" in reason
    with pytest.raises(ExportError, match="tensorrt-cu12"):
        build_engine(onnx, plan, precision="fp32", input_size=32, max_batch=4)
    with pytest.raises(BackendError, match="tensorrt-cu12"):
        TensorRTBackend(plan, "fp32", stamp).activate()
    assert fake_gpu["ctx_stack"] == [] and not fake_gpu["live"]
    assert fake_gpu.get("detached", False) == (fake_gpu["binding"] == "pycuda")


@BOTH_BINDINGS
def test_runtime_errors_become_backend_errors_and_cleanup_always_runs(fake_gpu, tmp_path):
    onnx = tmp_path / "model.fp32.onnx"
    onnx.write_bytes(b"onnx")
    plan = tmp_path / "model.fp32.plan"
    stamp = build_engine(onnx, plan, precision="fp32", input_size=32, max_batch=4)
    x = np.zeros((2, 3, 32, 32), np.float32)
    backend = TensorRTBackend(plan, "fp32", stamp).activate()
    fake_gpu["reject_address"] = ("logits",)
    with pytest.raises(BackendError, match="rejected the device address of tensor 'logits'"):
        backend.infer(x)
    fake_gpu["reject_address"] = ()
    fake_gpu["execute_error"] = RuntimeError("CUDA error 700: an illegal memory access\nframe 1\nframe 2")
    with pytest.raises(BackendError, match=r"inference failed on a batch of 2: RuntimeError: CUDA error 700: an "
                                           r"illegal memory access$"):
        backend.infer(x)
    assert fake_gpu["ctx_stack"] == []  # popped on every path
    fake_gpu["free_fails"] = True  # a failing device free must not keep the rest allocated, nor the context
    backend.deactivate()
    assert fake_gpu["freed"] == 2 and fake_gpu["freed_host"] == 2 and fake_gpu["ctx_stack"] == []
    assert sorted(fake_gpu["live"].values()) == ["device", "device"]  # what failed to free; the stream is gone
    assert fake_gpu.get("detached", False) == (fake_gpu["binding"] == "pycuda")
    assert not backend.active


def _engine(tmp_path) -> tuple[Path, dict]:
    onnx = tmp_path / "model.fp32.onnx"
    onnx.write_bytes(b"onnx")
    plan = tmp_path / "model.fp32.plan"
    return plan, build_engine(onnx, plan, precision="fp32", input_size=32, max_batch=4)


def test_cuda_error_codes_become_backend_errors_naming_the_call(fake_gpu, tmp_path):
    plan, stamp = _engine(tmp_path)
    fake_gpu["fail"]["cudaMalloc"] = 2
    with pytest.raises(BackendError, match=r"cannot load model.fp32.plan: CudaError: cudaMalloc failed: "
                                           r"cudaErrorMemoryAllocation \(CUDA error 2\)$"):
        TensorRTBackend(plan, "fp32", stamp).activate()
    assert not fake_gpu["live"]  # the stream and pinned buffers made before the failure are freed
    del fake_gpu["fail"]["cudaMalloc"]
    backend = TensorRTBackend(plan, "fp32", stamp).activate()
    fake_gpu["fail"]["cudaMemcpyAsync"] = 700
    with pytest.raises(BackendError, match=r"inference failed on a batch of 2: CudaError: cudaMemcpyAsync failed: "
                                           r"cudaErrorIllegalAddress \(CUDA error 700\)$"):
        backend.infer(np.zeros((2, 3, 32, 32), np.float32))
    fake_gpu["fail"]["cudaSetDevice"] = 101
    with pytest.raises(BackendError, match=r"inference failed on a batch of 1: CudaError: cudaSetDevice failed"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))
    backend.deactivate()  # the device cannot be made current: everything is still freed, nothing raised
    assert not fake_gpu["live"] and not backend.active
    fake_gpu["fail"].clear()
    fake_gpu["fail"]["cudaGetDeviceCount"] = 35
    with pytest.raises(BackendError, match=r"CUDA is not usable here \(cuda-python: cudaGetDeviceCount failed"):
        TensorRTBackend(plan, "fp32", stamp).activate()


def test_tensorrt_without_a_cuda_binding_names_what_to_install(fake_gpu, tmp_path, monkeypatch):
    plan, stamp = _engine(tmp_path)
    FakeCuda().install(monkeypatch, ())  # cuda-python and pycuda both unimportable; tensorrt still there
    usable, reason = tensorrt_status(inference=True)
    assert not usable and "neither cuda-python nor pycuda imports" in reason and INSTALL_HINT in reason
    with pytest.raises(BackendError, match=r"neither cuda-python nor pycuda.*pip install 'resdeploy\[gpu\]'"):
        TensorRTBackend(plan, "fp32", stamp).activate()


# ---------------------------------------------------------------- real TensorRT on a GPU

_USABLE, _REASON = tensorrt_status()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> dict:
    """ResNet-20 (random weights, seeded) as fp32 and fp16 ONNX with input 32, and the PyTorch model
    they were exported from (unfolded: the independent reference the engines are checked against)."""
    if not _USABLE:
        pytest.skip(_REASON)
    import torch

    from export.fold import fold_batchnorm
    from export.onnx_export import export_fp32
    from training.resnet import build_model

    d = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    export_fp32(fold_batchnorm(model), d / "model.fp32.onnx", input_size=32)
    out = {"fp32": d / "model.fp32.onnx", "dir": d, "torch": model}
    try:
        from export.quantize import convert_fp16
    except ImportError:
        pass
    else:
        out["fp16"] = convert_fp16(d / "model.fp32.onnx", d / "model.fp16.onnx")
    return out


def _ort(path, precision):
    from backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, precision, providers=["CPUExecutionProvider"])


@pytest.mark.gpu
@pytest.mark.skipif(not _USABLE, reason=_REASON)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnxruntime(precision, tiny_onnx, tmp_path):
    if precision not in tiny_onnx:
        pytest.skip("no fp16 converter (export.quantize.convert_fp16) in this checkout")
    cache = tiny_onnx["dir"] / "timing.cache"
    plan = tmp_path / engine_file_name(precision)
    stamp = build_engine(tiny_onnx[precision], plan, precision=precision, input_size=32, max_batch=16,
                         timing_cache=cache)
    assert cache.stat().st_size > 0 and stamp["max_batch"] == 16
    if precision == "fp16":  # the fp16 engine is built from the fp16 file, not the fp32 one
        import onnx

        kinds = {t.data_type for t in onnx.load(str(tiny_onnx["fp16"])).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in kinds and tiny_onnx["fp16"] != tiny_onnx["fp32"]
    import torch

    rng = np.random.default_rng(1)
    with TensorRTBackend(plan, precision, stamp) as trt_b, _ort(tiny_onnx[precision], precision) as ort_b:
        for n in (1, 7):
            x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
            with torch.no_grad():
                ref = tiny_onnx["torch"](torch.from_numpy(x)).numpy()  # PyTorch fp32, BN unfolded
            got, ort = trt_b.infer(x), ort_b.infer(x)
            assert got.shape == ort.shape == ref.shape == (n, 10)
            for other in (ref, ort):  # against PyTorch, and against ONNX Runtime on the same file
                if precision == "fp32":  # TF32 off: float32 rounding, relative to the logits' size
                    assert np.abs(got - other).max() <= 1e-3 * max(1.0, float(np.abs(other).max()))
                else:  # Polygraphy-style mean tolerance (docs/design.md)
                    assert np.mean(np.abs(got - other)) <= 1e-2 + 1e-2 * np.mean(np.abs(other))


@pytest.mark.gpu
@pytest.mark.skipif(not _USABLE, reason=_REASON)
def test_timing_cache_is_reused_and_tampered_stamp_refused(tiny_onnx, tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    plan = tmp_path / "model.fp32.plan"
    build_engine(tiny_onnx["fp32"], plan, precision="fp32", input_size=32, max_batch=8, timing_cache=cache)
    first = cache.stat().st_size
    assert first > 0
    with caplog.at_level(logging.INFO, logger="export.tensorrt"):
        stamp = build_engine(tiny_onnx["fp32"], plan, precision="fp32", input_size=32, max_batch=8,
                             timing_cache=cache)
    assert "reusing timing cache" in caplog.text and cache.stat().st_size >= first
    tampered = stamp | {"tensorrt_version": "9.0.0"}
    with pytest.raises(ArtifactError, match="9.0.0"):
        TensorRTBackend(plan, "fp32", tampered).activate()
    with pytest.raises(ArtifactError, match="compute capability 1.0"):
        TensorRTBackend(plan, "fp32", stamp | {"compute_capability": "1.0"}).activate()
