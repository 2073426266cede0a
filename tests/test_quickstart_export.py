"""The quickstart's train + export, on several digits models: every artifact must pass its gate.

`make demo` runs `resdeploy train --arch resnet20 --dataset digits --epochs 10` then
`resdeploy export … --calib-data digits`; CI once stayed green while that export failed on every
model (issue #9). These tests run the same commands with other depths, epochs and seeds, and check
the INT8 files with an evaluation of their own: labels from the dataset, PyTorch for FP32, ONNX
Runtime for the files (the TensorRT form with its exact Q/DQ semantics, int8-cpu with the fused
kernels it is served with), not the numbers the gate wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli

from core.manifest import read_manifest
from training.checkpoint import restore_model
from training.data import load_dataset
from training.evaluate import iter_crops

MATRIX = [  # (arch, epochs, seed, extra train flags): trained models, as users export them
    pytest.param("resnet20", 5, 0, [], id="resnet20-5ep"),  # issue #3's command
    pytest.param("resnet32", 10, 1, [], id="resnet32-10ep-seed1"),
    pytest.param("resnet20", 6, 2, ["--shortcut", "B"], id="resnet20B-6ep-seed2"),
    pytest.param("resnet20", 10, 0, [], id="resnet20-10ep-make-demo", marks=pytest.mark.slow),
    pytest.param("resnet20", 15, 3, ["--shortcut", "B"], id="resnet20B-15ep-seed3", marks=pytest.mark.slow),
]
# Under-trained networks are not in the matrix on purpose: ResNet-32 after 4 epochs (43% top-1) and
# ResNet-56 after 8 (34%) have logits with tiny margins and INT8 noise spread over every layer, so
# they miss the 98% agreement budget even with five float layers and the export refuses them
# (docs/design.md#int8-exportqdqpy-exportint8py). That refusal is the gate working.


def _session(path: Path, fused: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch,epochs,seed,extra", MATRIX)
def test_quickstart_export_passes_every_gate(tmp_path: Path, arch: str, epochs: int, seed: int, extra: list[str]):
    run = tmp_path / "run"
    r = run_cli("train", "--arch", arch, "--dataset", "digits", "--epochs", str(epochs), "--seed", str(seed),
                "--out", str(run), "--no-progress", *extra, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "artifacts"
    r = run_cli("export", str(run / "best.pt"), "--out", str(out), "--calib-data", "digits", "--no-progress",
                timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    m = read_manifest(out)
    assert {a.precision for a in m.entries("onnx")} == {"fp32", "fp16", "int8", "int8-cpu"}

    pre = m.preprocess_config
    xs, ys = zip(*iter_crops(load_dataset("digits").test, pre, "center", 120))
    x, labels = np.concatenate(xs), np.concatenate(ys)
    with torch.no_grad():
        fp32 = restore_model(run / "best.pt").model(torch.from_numpy(x)).numpy().argmax(1)
    fp32_top1 = (fp32 == labels).mean()
    for flavour, fused in (("int8", False), ("int8-cpu", True)):
        s = _session(out / f"model.{flavour}.onnx", fused)
        pred = s.run(None, {s.get_inputs()[0].name: x})[0].argmax(1)
        top1, agreement = (pred == labels).mean(), (pred == fp32).mean()
        assert top1 >= 0.995 * fp32_top1, (flavour, top1, fp32_top1)
        assert agreement >= 0.99, (flavour, agreement)
        q = m.find(flavour).quantization
        assert q["int8_mac_share"] >= 90, q
