"""GPU paths: run wherever a CUDA GPU is visible, skip with the reason elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


@needs_cuda
def test_amp_training_on_cuda(tmp_path: Path):
    """Mixed-precision training learns: three epochs on the digits (1437 images) cut the training loss
    well below both its first epoch and ln(10) = 2.30, the loss of a uniform guess over 10 classes.
    On the CPU (AMP off) the same run gives 2.09, 0.87, 0.48; an optimizer step lost to the gradient
    scaler (inf/NaN every step), a scale left on the gradients or a frozen lr stays near 2.3 or diverges."""
    import math

    from training.train import TrainConfig, train

    s = train(TrainConfig(arch="resnet20", out=str(tmp_path), epochs=3, device="cuda", progress=False))
    losses = [e["train_loss"] for e in s["epochs"]]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.5 * math.log(10) and losses[-1] < 0.6 * losses[0], losses
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["config"]["amp"] is None  # auto: on for CUDA
    assert all(v.device.type == "cpu" for v in ck["model"].values())  # saved device-neutral


def _weights(tmp_path: Path, arch: str = "resnet20") -> tuple[Path, int]:
    """A model.pt (TorchBackend's format) of a random net with refreshed BN statistics, and its input side."""
    from backends.pytorch import save_weights
    from bench.latency import random_model

    path = tmp_path / "model.pt"
    save_weights(random_model(arch, 32), path, arch, "A", 10)
    return path, 32


@needs_cuda
def test_torch_backend_cuda_fp32_and_fp16_match_cpu(tmp_path: Path):
    """FP16 parity on the GPU: Polygraphy-style mean tolerance 1e-2 (docs/design.md), top-1 agreement."""
    import numpy as np

    from backends.pytorch import TorchBackend

    path, size = _weights(tmp_path)
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    with TorchBackend(path, size, device="cpu") as cpu:
        ref = cpu.infer(x)
    for half in (False, True):
        with TorchBackend(path, size, device="cuda", half=half) as gpu:
            assert gpu.device.type == "cuda" and gpu.precision == ("fp16" if half else "fp32")
            got = gpu.infer(x)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.mean(np.abs(got - ref)) <= 1e-2 + 1e-2 * np.mean(np.abs(ref))
        assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95
