"""Shared fixtures: one short digits ResNet-20 run reused by the CLI and evaluation tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m resdeploy ARGS`` as a user would, capturing text output."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "resdeploy", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """ResNet-20 trained on the embedded digits for 8 epochs (about 30 s on 2 cores)."""
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("digits") / "run"
    train(TrainConfig(arch="resnet20", dataset="digits", out=str(out), epochs=8, progress=False))
    return out


DIGITS_PRECISIONS = ["fp32", "fp16", "int8", "int8-cpu"]


@pytest.fixture(scope="session")
def digits_artifacts(digits_run: Path, tmp_path_factory) -> Path:
    """An artifact directory (every ONNX precision, labels, manifest) exported from ``digits_run``."""
    from resdeploy.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "digits"
    code = main(["export", str(digits_run / "best.pt"), "--arch", "resnet20", "--out", str(out),
                 "--precisions", ",".join(DIGITS_PRECISIONS), "--calib-data", "digits", "--no-progress"])
    assert code == 0
    return out
