"""GPU paths: run wherever a CUDA GPU is visible, skip with the reason elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


@needs_cuda
def test_amp_training_on_cuda(tmp_path: Path):
    from training.train import TrainConfig, train

    s = train(TrainConfig(arch="resnet20", out=str(tmp_path), epochs=1, limit=256, device="cuda", progress=False))
    assert s["epochs"][0]["train_loss"] > 0
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["config"]["amp"] is None  # auto: on for CUDA
    assert all(v.device.type == "cpu" for v in ck["model"].values())  # saved device-neutral
