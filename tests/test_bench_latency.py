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
