"""bench/latency.py: the --quick smoke run writes sane rows, and bad flags fail in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "latency.py"
FIELDS = ("backend", "precision", "batch_size", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "speedup_vs_torch")


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("latency") / "l.json"
    return _run("--quick", "--json", str(out)), out


def test_quick_run_writes_rows_for_every_cpu_backend(quick):
    proc, out = quick
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    machine = doc["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1
    assert machine["torch"] and machine["onnxruntime"] and machine["numpy"]
    assert "hostname" not in machine and os.uname().nodename not in json.dumps(machine)
    assert doc["meta"]["arch"] == "resnet20" and doc["meta"]["input_size"] == 32
    rows = {(r["backend"], r["batch_size"]): r for r in doc["rows"]}
    for backend, precision in (("torch", "fp32"), ("ort-fp32", "fp32"), ("ort-int8-cpu", "int8-cpu")):
        for batch in (1, 10):
            r = rows[(backend, batch)]
            assert set(FIELDS) <= r.keys(), r
            assert r["precision"] == precision
            for k in ("p50_ms", "p90_ms", "p99_ms", "images_per_s", "speedup_vs_torch"):
                assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r)
            assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["images_per_s"] == pytest.approx(batch * 1000 / r["p50_ms"])
            assert r["iterations"] >= 3
    for batch in (1, 10):
        assert rows[("torch", batch)]["speedup_vs_torch"] == 1.0
        ort = rows[("ort-fp32", batch)]
        assert ort["speedup_vs_torch"] == pytest.approx(rows[("torch", batch)]["p50_ms"] / ort["p50_ms"])
    # One table for people, naming the machine.
    assert "numbers are from this machine" in proc.stdout and machine["cpu_model"] in proc.stdout
    assert "minmax" in proc.stdout


def test_quick_run_reports_the_gemm_ceiling(quick):
    """Each CPU row's MAC rate is compared with ORT's own GEMM rate here, and eager's ceiling is printed."""
    proc, out = quick
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    meta, rows = doc["meta"], doc["rows"]
    ceiling = meta["gemm_ceiling"]
    assert ceiling["fp32_gmac_per_s"] > 0 and ceiling["int8_gmac_per_s"] > 0 and ceiling["threads"] == 2
    assert 40_000_000 < meta["macs_per_image"] < 42_000_000  # ResNet-20 at 32: 40.6 M (paper: 41 M)
    for r in rows:
        gmacs = meta["macs_per_image"] * r["batch_size"] / r["p50_ms"] / 1e6
        assert r["gmac_per_s"] == pytest.approx(gmacs)
        kind = "int8" if r["precision"].startswith("int8") else "fp32"
        assert r["pct_of_gemm"] == pytest.approx(100 * gmacs / ceiling[f"{kind}_gmac_per_s"])
    for batch in ("1", "10"):
        torch_ms = next(r["p50_ms"] for r in rows if r["backend"] == "torch" and str(r["batch_size"]) == batch)
        best = meta["best_possible_speedup"][batch]
        work = meta["macs_per_image"] * int(batch) / 1e9
        assert best["int8"] == pytest.approx(torch_ms / 1000 / (work / ceiling["int8_gmac_per_s"]), rel=0.01)
    assert "Ceiling: ONNX Runtime's own GEMM" in proc.stdout


def test_ceiling_helpers_leave_gpu_rows_unrated():
    from bench.ceiling import annotate, best_possible, kind_of

    rows = [{"backend": "ort-int8-cpu", "precision": "int8-cpu", "batch_size": 10, "p50_ms": 100.0},
            {"backend": "torch-cuda-fp16", "precision": "fp16", "batch_size": 10, "p50_ms": 5.0, "device": "cuda"}]
    annotate(rows, 4_000_000_000, {"fp32_gmac_per_s": 100.0, "int8_gmac_per_s": 400.0})
    assert rows[0]["gmac_per_s"] == pytest.approx(400.0) and rows[0]["pct_of_gemm"] == pytest.approx(100.0)
    assert rows[1]["gmac_per_s"] == pytest.approx(8000.0) and rows[1]["pct_of_gemm"] is None
    assert kind_of("fp16") == "fp32" and kind_of("int8") == "int8"
    # 40 GMAC at 100 GMAC/s takes 0.4 s: eager's 0.8 s can be beaten at most 2x by fp32 kernels.
    assert best_possible(800.0, 4_000_000_000, 10, {"fp32_gmac_per_s": 100.0, "int8_gmac_per_s": 400.0}) == \
        pytest.approx({"fp32": 2.0, "int8": 8.0})


def test_ceiling_models_load_in_older_runtimes():
    """onnx 1.23 writes IR 14 by default, which onnxruntime 1.30 refused on a GPU host: pin IR 8."""
    import numpy as np
    import onnx

    from bench.ceiling import gemm_model, gemm_rate

    for int8 in (False, True):
        model, feed = gemm_model(32, 48, 16, int8, np.random.default_rng(0))
        assert model.ir_version == 8 and model.opset_import[0].version == 17
        onnx.checker.check_model(model)
        assert feed["A"].dtype == (np.uint8 if int8 else np.float32)
        assert gemm_rate(64, 64, 64, int8, threads=1, iters=2) > 0


def test_a_failed_ceiling_keeps_the_rows(tmp_path, monkeypatch, capsys):
    """The ceiling is a reference: if it cannot be measured, the timed rows are still written."""
    import bench.ceiling
    from bench import latency

    def broken(*a, **k):
        raise RuntimeError("Unsupported model IR version: 14, max supported IR version: 13")

    monkeypatch.setattr(bench.ceiling, "measure", broken)
    out = tmp_path / "l.json"
    rc = latency.main(["--quick", "--backends", "torch,ort-fp32", "--batch-sizes", "1", "--budget-s", "0.05",
                       "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["gemm_ceiling"] is None and {r["backend"] for r in doc["rows"]} == {"torch", "ort-fp32"}
    assert all(r["pct_of_gemm"] is None and r["gmac_per_s"] > 0 for r in doc["rows"])
    assert "ceiling not measured (RuntimeError: Unsupported model IR version: 14" in capsys.readouterr().out


def test_quick_run_writes_csv_and_png(quick):
    proc, out = quick
    assert proc.returncode == 0, proc.stderr[-2000:]
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith("backend,precision,batch_size,p50_ms")
    assert len(csv_lines) - 1 == len(json.loads(out.read_text())["rows"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, word", [(["--batch-sizes", "0"], "--batch-sizes"),
                                        (["--backends", "torch,tflite"], "tflite"),
                                        (["--threads", "zero"], "--threads")])
def test_bad_flag_is_one_line_and_exit_2(args, word, tmp_path):
    proc = _run(*args, "--json", str(tmp_path / "x.json"), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_artifacts_mode_benches_the_exported_files(digits_artifacts, tmp_path):
    """--artifacts: the manifest's own files (sha256-checked), the arch and crop from the manifest."""
    out = tmp_path / "a.json"
    proc = _run("--artifacts", str(digits_artifacts), "--batch-sizes", "1,4", "--budget-s", "0.1",
                "--backends", "torch,ort-fp32,ort-int8-cpu", "--no-ceiling", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    assert (meta["arch"], meta["input_size"], meta["weights"]) == ("resnet20", 32, "artifacts")
    assert meta["gemm_ceiling"] is None and meta["calibration"] is None
    assert {(r["backend"], r["batch_size"]) for r in doc["rows"]} == {
        (b, n) for b in ("torch", "ort-fp32", "ort-int8-cpu") for n in (1, 4)}
    assert any("sha256-verified" in n for n in meta["notes"])


def test_artifacts_mode_refuses_a_tampered_file(digits_artifacts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(digits_artifacts, bad)
    with open(bad / "model.fp32.onnx", "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = _run("--artifacts", str(bad), "--backends", "ort-fp32", "--batch-sizes", "1", "--budget-s", "0.05",
                "--json", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.fp32.onnx" in lines[0] and "sha256" in lines[0].lower(), proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_rows_are_named_from_the_flavour_table():
    """Every row's precision is a flavour of core.flavours; the names users pass stay the same."""
    from bench import latency
    from core.flavours import FLAVOURS, PYTORCH

    assert list(latency.ROWS) == ["torch", "torch-cl", "ort-fp32", "ort-int8-cpu", "torch-cuda", "torch-cuda-fp16",
                                  "trt-fp16", "trt-int8"]
    for row in latency.ROWS.values():
        assert FLAVOURS[row.flavour.name] is row.flavour
        assert row.runtime == PYTORCH or row.runtime in row.flavour.runtimes, row
    assert latency.TORCH_BACKENDS == ("torch", "torch-cl", "torch-cuda", "torch-cuda-fp16")


def test_resolve_gives_a_typed_config(tmp_path):
    from bench import latency

    config = latency.resolve(latency.build_parser().parse_args(
        ["--quick", "--backends", "torch-cl,torch,torch-cl", "--batch-sizes", "4,1,4",
         "--json", str(tmp_path / "l.json")]))
    assert isinstance(config, latency.LatencyConfig)
    assert (config.arch, config.input_size, config.batch_sizes, config.backends, config.explicit_backends,
            config.budget_s, config.threads) == ("resnet20", 32, [1, 4], ["torch-cl", "torch"], True, 0.3, 2)
    assert (config.csv, config.png) == (tmp_path / "l.csv", tmp_path / "l.png")
    assert config.manifest is None and config.artifacts is None and config.ceiling


def test_torch_rows_run_the_library_backend():
    """torch / torch-cl are backends.pytorch.TorchBackend over the in-memory network, pinned to the CPU."""
    import numpy as np
    import torch

    from backends.pytorch import TorchBackend
    from bench import latency

    src = latency.Sources()
    with pytest.raises(LookupError, match="no PyTorch network"):
        latency.make_backend("torch", src, 8, 1)
    src.model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    for name, channels_last in (("torch", False), ("torch-cl", True)):
        backend = latency.make_backend(name, src, 8, 1)
        assert isinstance(backend, TorchBackend) and backend.channels_last is channels_last
        assert backend.device.type == "cpu" and not backend.half
        with backend:
            assert backend.infer(np.zeros((2, 3, 8, 8), np.float32)).shape == (2, 4)
    src.missing["torch-cl"] = "no model.pt"
    with pytest.raises(LookupError, match="no model.pt"):
        latency.make_backend("torch-cl", src, 8, 1)
