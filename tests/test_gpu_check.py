"""bench/gpu_check.py on a CPU host: its flags and exits, and its orchestration with TensorRT's parts
stood in (ONNX Runtime runs behind a TensorRTBackend stand-in, so every check passes); the real
engines are checked on a GPU host by tests/test_tensorrt.py and `make gpu-check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# An engine built on another host: its stamp does not match the stand-in host (TensorRT 10.99.0).
OTHER_HOST_STAMP = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3",
                    "compute_capability": "9.0", "max_batch": 16, "opt_batch": 10, "input_size": 32,
                    "precision": "fp16"}


def test_exits_2_with_one_line_without_tensorrt_or_directory():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "/nonexistent"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check:"), proc.stderr
    assert proc.stdout == ""


def test_rejects_int8_cpu_naming_the_tensorrt_form(capsys):
    from bench.gpu_check import main

    with pytest.raises(SystemExit) as e:
        main(["/nonexistent", "--precisions", "fp16,int8-cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "int8-cpu" in err and "check TensorRT with 'int8'" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- stand-ins

@pytest.fixture
def stand_ins(monkeypatch):
    """A function that installs TensorRT 10.99.0 on a "Fake GPU" (call it after the ONNX export: a
    stand-in tensorrt module confuses torch.export) and returns bench.gpu_check; engines are "built"
    as notes of their ONNX file, which ONNX Runtime runs in place of TensorRT."""
    import bench.gpu_check as gc
    from backends.onnxruntime import OnnxRuntimeBackend

    class StandIn(OnnxRuntimeBackend):
        def __init__(self, engine, precision, stamp):
            super().__init__(Path(stamp["onnx"]), precision, providers=["CPUExecutionProvider"],
                             max_batch_size=stamp["max_batch"])

    def fake_build(onnx_path, engine_path, **kw):
        Path(engine_path).write_bytes(b"plan")
        return {"onnx": str(onnx_path), "bytes": 4, **kw}

    def install():
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.99.0"))
        monkeypatch.setattr(gc, "tensorrt_status", lambda inference=False: (True, "stand-in"))
        monkeypatch.setattr(gc, "gpu_info", lambda device_id=0: ("Fake GPU", "9.0"))
        monkeypatch.setattr("export.tensorrt.build_engine", fake_build)
        monkeypatch.setattr("backends.tensorrt.TensorRTBackend", StandIn)
        return gc

    return install


def _artifacts(directory: Path, num_classes: int, preprocess: dict, artifacts: list[tuple], **manifest) -> None:
    """A random ResNet-20's model.fp32.onnx and a manifest listing ``artifacts`` (file, precision, kind, extra)."""
    import torch

    from core.fsutil import sha256_file, write_json_atomic
    from export.fold import fold_batchnorm
    from export.onnx_export import export_fp32
    from training.resnet import build_model

    torch.manual_seed(0)
    export_fp32(fold_batchnorm(build_model("resnet20", num_classes=num_classes).eval()),
                directory / "model.fp32.onnx", input_size=32)
    entries = [{"file": name, "sha256": sha256_file(directory / name), "precision": precision, "kind": kind, **extra}
               for name, precision, kind, extra in artifacts]
    write_json_atomic(directory / "manifest.json", {"schema_version": 1, "arch": "resnet20",
                                                    "num_classes": num_classes, "preprocess": preprocess,
                                                    "artifacts": entries, **manifest})


def test_orchestration_rebuilds_a_stale_engine(stand_ins, tmp_path, capsys):
    """Every check passes, a stale engine in the manifest is rebuilt, and a table and JSON come out."""
    from training.data import load_dataset

    (tmp_path / "model.fp16.plan").write_bytes(b"stale")
    _artifacts(tmp_path, 10, load_dataset("digits").preprocess.to_dict(),
               [("model.fp32.onnx", "fp32", "onnx", {}), ("model.fp32.onnx", "fp16", "onnx", {}),
                ("model.fp16.plan", "fp16", "engine", OTHER_HOST_STAMP)])
    out = tmp_path / "r.json"
    rc = stand_ins().main([str(tmp_path), "--precisions", "fp32,fp16", "--eval-data", "digits", "--limit", "40",
                           "--iters", "3", "--max-batch", "16", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "not using the directory's engine" in captured.err and "10.13.0.35" in captured.err
    assert "GPU Fake GPU (compute capability 9.0), TensorRT 10.99.0" in captured.out
    report = json.loads(out.read_text())
    assert report["passed"] and report["images"] == 40 and report["eval_data"] == "digits"
    assert [(r["precision"], r["engine"], r["timed_batch"]) for r in report["results"]] == [
        ("fp32", "built", 10), ("fp16", "rebuilt", 10)]
    assert all(r["value"] < 1e-5 and r["top1_agreement"] == 1.0 for r in report["results"])


def test_default_eval_data_is_the_gates_dataset(stand_ins, tmp_path, capsys):
    """Without --eval-data the images come from the data the export gate measured (``eval.dataset``
    in manifest.json): here a 3-class folder, which digits (10 classes) would not fit. gpu_check used
    to read a top-level "dataset" key no manifest has, and so always fell back to digits."""
    from PIL import Image

    from core.preprocess import PreprocessConfig

    data = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("circle", "square", "star")):
        (data / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (label + 1)
            Image.fromarray(pixels, "RGB").save(data / name / f"{i}.png")
    art = tmp_path / "art"
    art.mkdir()
    preprocess = PreprocessConfig(input_size=32, resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    _artifacts(art, 3, preprocess.to_dict(), [("model.fp32.onnx", "fp32", "onnx", {})],
               eval={"dataset": str(data), "images": 12, "labelled": True})
    out = tmp_path / "r.json"
    rc = stand_ins().main([str(art), "--precisions", "fp32", "--iters", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    report = json.loads(out.read_text())
    assert report["eval_data"] == str(data) and report["images"] == 12
    assert f"12 {data} images" in captured.out
