"""TorchBackend as a serving backend: uint8 in, normalisation where the model runs, fp16,
channels_last and CUDA graphs.

The CPU tests always run: there the uint8 path runs the same torch ops as on CUDA and must equal
the float path bit for bit. The ``gpu`` tests run wherever torch sees a CUDA GPU and skip with the
reason elsewhere (as tests/test_gpu.py); together they take well under a minute on one GPU.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from backends.pytorch import TorchBackend
from backends.torch_cuda import graph_batch_sizes, padded_batch
from core.errors import BackendError, ConfigError
from core.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize
from training.resnet import BasicBlock, Bottleneck, build_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def varied_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 crops of four kinds (noise, gradients, blocks, stripes), each with
    its own brightness and contrast."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            img = rng.uniform(0, 255, (size, size, 3))
        elif kind == 1:
            w = rng.uniform(-255, 255, (2, 3))
            img = w[0] * xx[..., None] + w[1] * yy[..., None] + rng.uniform(0, 255, 3)
        elif kind == 2:
            cells = int(rng.integers(2, 9))
            low = rng.uniform(0, 255, (cells, cells, 3))
            img = np.repeat(np.repeat(low, -(-size // cells), 0), -(-size // cells), 1)[:size, :size]
        else:
            f = rng.uniform(1, 6, 2)
            img = 127.5 + 127.5 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy)[..., None] + rng.uniform(0, 6.3, 3))
        img = (img - 127.5) * rng.uniform(0.5, 1.5) + 127.5 + rng.uniform(-60, 60)
        out[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out


def random_net(arch: str, size: int, seed: int = 0) -> torch.nn.Module:
    """He-initialised ``arch`` with 10 classes standing in for a trained one, in eval mode.

    BN statistics come from varied crops (as training leaves them), and each residual branch's
    output is halved (a trained ResNet's branches are small beside the identity path). At full
    branch scale a random ResNet-50 piles fp16 rounding up to ~1% of its logit scale and leaves
    many top-2 logits closer than that: no fair yardstick for fp16.
    """
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the statistics of the batch below
    with torch.no_grad():
        model(torch.from_numpy(normalize(varied_crops(16, size, seed + 1), IMAGENET_MEAN, IMAGENET_STD)))
        for block in model.modules():
            if isinstance(block, (BasicBlock, Bottleneck)):
                last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last.weight.mul_(0.5)
                last.bias.mul_(0.5)
    return model.eval()


def cpu_reference(model: torch.nn.Module, size: int, crops: np.ndarray, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD) -> np.ndarray:
    """Logits of the float path on the CPU: host normalisation, eager fp32."""
    with TorchBackend.from_module(model, size, device="cpu") as b:
        return b.infer(normalize(crops, mean, std))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    return random_net("resnet20", 32)


# --- CPU: always run -----------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_uint8_path_equals_the_float_path_on_cpu(resnet20, channels_last):
    crops = varied_crops(7, 32, seed=3)
    with TorchBackend.from_module(resnet20, 32, device="cpu", channels_last=channels_last, max_batch_size=8) as b:
        for mean, std in ((CIFAR_MEAN, CIFAR_STD), (IMAGENET_MEAN, IMAGENET_STD), (CIFAR_MEAN, CIFAR_STD)):
            got = b.infer_uint8(crops, mean, std)  # mean/std change between calls: reloaded each time
            ref = b.infer(normalize(crops, mean, std))
            assert got.dtype == np.float32 and got.shape == (7, 10)
            np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(b.infer_uint8(crops[:1], CIFAR_MEAN, CIFAR_STD),
                                      b.infer(normalize(crops[:1], CIFAR_MEAN, CIFAR_STD)))
    assert not b.active and b.model is None


def test_uint8_path_checks_input_and_stats(resnet20):
    with TorchBackend.from_module(resnet20, 32, device="cpu", max_batch_size=4) as b:
        with pytest.raises(BackendError, match=r"batch of 5 is outside 1\.\.4"):
            b.infer_uint8(varied_crops(5, 32), CIFAR_MEAN, CIFAR_STD)
        with pytest.raises(BackendError, match="uint8 crops"):
            b.infer_uint8(varied_crops(2, 32).astype(np.float32), CIFAR_MEAN, CIFAR_STD)
        with pytest.raises(ConfigError, match="std must be 3 positive"):
            b.infer_uint8(varied_crops(2, 32), CIFAR_MEAN, (0.2, 0.0, 0.2))
        with pytest.raises(ConfigError, match="mean must be 3"):
            b.infer_uint8(varied_crops(2, 32), (0.5, 0.5), CIFAR_STD)
    with pytest.raises(BackendError, match="not active"):
        b.infer_uint8(varied_crops(1, 32), CIFAR_MEAN, CIFAR_STD)


def test_graph_batch_sizes_and_padding():
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(2) == (1, 2)
    assert graph_batch_sizes(3) == (1, 2, 3)
    assert graph_batch_sizes(8) == (1, 2, 4, 8)
    assert graph_batch_sizes(24) == (1, 2, 4, 8, 16, 24)
    assert graph_batch_sizes(33) == (1, 2, 4, 8, 16, 32, 33)
    sizes = (1, 2, 4, 8, 16, 24)
    assert [padded_batch(n, sizes) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 23, 24)] == [1, 2, 4, 4, 8, 8, 16, 16,
                                                                                       24, 24, 24]
    assert padded_batch(3, (8, 1, 4)) == 4  # any order
    for bad in (0, -1, True, 2.0, None):
        with pytest.raises(ValueError, match="positive integer"):
            graph_batch_sizes(bad)
    for n in (0, 25):
        with pytest.raises(ValueError, match="does not fit"):
            padded_batch(n, sizes)


def test_half_on_a_cpu_host_is_refused_with_the_fix(resnet20):
    with pytest.raises(BackendError, match="half precision needs CUDA") as e:
        TorchBackend.from_module(resnet20, 32, device="cpu", half=True)
    assert "fp32" in str(e.value) and "\n" not in str(e.value)
    if not torch.cuda.is_available():  # how the service builds it: device picked by availability
        with pytest.raises(BackendError, match="half precision needs CUDA"):
            TorchBackend(None, 32, 0, max_batch_size=8, half=True, channels_last=True, cuda_graphs=True)


def test_cuda_graphs_on_cpu_are_ignored_with_a_log_line(resnet20, caplog):
    crops = varied_crops(5, 32, seed=4)
    with caplog.at_level(logging.INFO, logger="backends.pytorch"):
        b = TorchBackend.from_module(resnet20, 32, device="cpu", max_batch_size=8, channels_last=True,
                                     cuda_graphs=True)
    assert "cuda_graphs ignored" in caplog.text
    with b, TorchBackend.from_module(resnet20, 32, device="cpu", max_batch_size=8, channels_last=True) as plain:
        d = b.describe()
        assert (d["device"], d["half"], d["channels_last"], d["cuda_graphs"], d["graph_batch_sizes"]) == (
            "cpu", False, True, False, [])
        np.testing.assert_array_equal(b.infer_uint8(crops, CIFAR_MEAN, CIFAR_STD),
                                      plain.infer_uint8(crops, CIFAR_MEAN, CIFAR_STD))


# --- CUDA: run where a GPU is visible ---------------------------------------------------------------

@pytest.fixture
def no_tf32():
    """fp32 comparisons check the backend's arithmetic, not TF32 (cuDNN's default for fp32
    convolutions, a 10-bit mantissa). Only the legacy flag is touched, so reading it stays valid."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def resnet50() -> torch.nn.Module:
    return random_net("resnet50", 224)


NETS = {"resnet20": 32, "resnet50": 224}
BATCH = {"resnet20": 64, "resnet50": 40}  # fp16 top-1 agreement: 95% of these


def _net(request, arch: str) -> torch.nn.Module:
    return request.getfixturevalue(arch)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", sorted(NETS))
def test_cuda_fp32_uint8_path_matches_the_cpu_float_path(request, no_tf32, arch):
    model, size = _net(request, arch), NETS[arch]
    crops = varied_crops(BATCH[arch] // 2, size, seed=5)
    ref = cpu_reference(model, size, crops)
    with TorchBackend.from_module(model, size, device="cuda", max_batch_size=len(crops), channels_last=True) as b:
        d = b.describe()
        assert (d["device"], d["half"], d["cuda_graphs"], d["precision"]) == ("cuda:0", False, False, "fp32")
        assert d["cudnn_tf32"] is False
        got = b.infer_uint8(crops, IMAGENET_MEAN, IMAGENET_STD)
        float_path = b.infer(normalize(crops, IMAGENET_MEAN, IMAGENET_STD))
    scale = max(1.0, float(np.abs(ref).max()))
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3 * scale
    assert (got.argmax(1) == ref.argmax(1)).all()
    # device normalisation is the host's, op for op: the GPU float path on the same kernels agrees
    assert np.abs(got - float_path).max() <= 1e-5 * scale


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("arch", sorted(NETS))
def test_cuda_fp16_matches_cpu_fp32(request, arch, cuda_graphs):
    """The serving configuration: fp16, channels_last, uint8 in; with and without CUDA graphs."""
    model, size = _net(request, arch), NETS[arch]
    crops = varied_crops(BATCH[arch], size, seed=6)
    ref = cpu_reference(model, size, crops)
    with TorchBackend.from_module(model, size, device="cuda", max_batch_size=len(crops), half=True,
                                  channels_last=True, cuda_graphs=cuda_graphs) as b:
        assert b.precision == "fp16" and b.describe()["cuda_graphs"] is cuda_graphs
        got = b.infer_uint8(crops, IMAGENET_MEAN, IMAGENET_STD)
    assert got.dtype == np.float32 and got.shape == ref.shape and np.isfinite(got).all()
    assert np.abs(softmax(got) - softmax(ref)).max() <= 1e-2
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", sorted(NETS))
def test_cuda_graphs_match_eager_for_padded_batches(request, no_tf32, arch):
    model, size, top = _net(request, arch), NETS[arch], 24
    crops = varied_crops(top, size, seed=7)
    kw = dict(device="cuda", max_batch_size=top, channels_last=True)
    with TorchBackend.from_module(model, size, cuda_graphs=True, **kw) as graphs, \
            TorchBackend.from_module(model, size, **kw) as eager:
        d = graphs.describe()
        assert d["cuda_graphs"] is True and d["graph_batch_sizes"] == [1, 2, 4, 8, 16, 24]
        assert eager.describe()["graph_batch_sizes"] == []
        # 17 first: the later, smaller batches run graphs whose padding rows hold its stale crops
        for n, stats in ((17, IMAGENET_STD), (3, IMAGENET_STD), (5, IMAGENET_STD), (24, IMAGENET_STD),
                         (3, CIFAR_STD), (5, IMAGENET_STD)):
            batch = crops[-n:] if n % 2 else crops[:n]
            got = graphs.infer_uint8(batch, IMAGENET_MEAN, stats)  # new std: copied into the graph's input
            ref = eager.infer_uint8(batch, IMAGENET_MEAN, stats)
            assert got.shape == (n, 10)
            assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), (n, stats)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_need_max_batch_size(resnet20, caplog):
    with caplog.at_level(logging.WARNING, logger="backends.pytorch"):
        b = TorchBackend.from_module(resnet20, 32, device="cuda", cuda_graphs=True)
    assert "cuda_graphs turned off" in caplog.text and "max_batch_size" in caplog.text
    with b:  # no limit, no graphs: the staging buffers grow with the batch
        assert b.describe()["cuda_graphs"] is False
        for n in (2, 9, 3):
            assert b.infer_uint8(varied_crops(n, 32), CIFAR_MEAN, CIFAR_STD).shape == (n, 10)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", sorted(NETS))
def test_cuda_backend_activated_on_one_thread_serves_from_another(request, no_tf32, arch):
    """The service activates on one thread and infers on its inference thread."""
    model, size = _net(request, arch), NETS[arch]
    crops = varied_crops(9, size, seed=8)
    b = TorchBackend.from_module(model, size, device="cuda", max_batch_size=16, half=False, channels_last=True,
                                 cuda_graphs=True)
    with ThreadPoolExecutor(1) as activator:
        activator.submit(b.activate).result()
    try:
        main_thread = b.infer_uint8(crops, IMAGENET_MEAN, IMAGENET_STD)
        results = {}

        def serve():
            results["uint8"] = b.infer_uint8(crops, IMAGENET_MEAN, IMAGENET_STD)
            results["float"] = b.infer(normalize(crops, IMAGENET_MEAN, IMAGENET_STD))

        worker = threading.Thread(target=serve)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive() and set(results) == {"uint8", "float"}
    finally:
        b.deactivate()
    scale = max(1.0, float(np.abs(main_thread).max()))
    assert np.abs(results["uint8"] - main_thread).max() <= 1e-6 * scale  # the same graph, replayed
    assert np.abs(results["float"] - main_thread).max() <= 1e-4 * scale
    ref = cpu_reference(model, size, crops)
    assert np.abs(main_thread - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))
