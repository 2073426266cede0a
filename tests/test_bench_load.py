"""bench/load.py against a real ``bentoml serve`` subprocess on a loopback port.

The server fixture mirrors tests/test_service.py's (own process group, killed at teardown,
BENTOML_HOME in a tmp dir) but is this module's own, so the load run's batches are the only ones
in its metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bentoserver import serve
from conftest import ROOT

LOAD = ROOT / "bench" / "load.py"


@pytest.fixture(scope="module")
def server_url(digits_artifacts: Path, tmp_path_factory) -> Iterator[str]:
    """``bentoml serve serving.service:Classifier`` on a free loopback port, polled until ready."""
    with serve(digits_artifacts, tmp_path_factory.mktemp("load_service")) as (url, _):
        yield url


def _load(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(LOAD), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_load_sweep(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    r = _load(server_url, "--concurrency", "1,4", "--requests", "12", "--json", str(out))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine", "meta", "rows"}
    assert doc["meta"]["model"]["arch"] == "resnet20"
    assert doc["meta"]["model"]["backend"] == "onnxruntime"
    assert doc["meta"]["model"]["precision"] == "fp32"
    rows = doc["rows"]
    assert [row["concurrency"] for row in rows] == [1, 4]
    for row in rows:
        assert row["errors"] == {} and row["requests"] == 12 and row["ok"] == 12, row
        assert row["images_per_s"] > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["mean_crops_per_batch"] >= 1
        # ten_crop: every request is 10 rows, so the batches hold 120 crops in all.
        assert sum(row["batch_histogram"].values()) == row["batches"] >= 1
        assert row["mean_crops_per_batch"] * row["batches"] == pytest.approx(120)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "resnet20" in r.stdout and "CPU:" in r.stdout


def test_refuses_remote_host_without_traffic(tmp_path: Path, monkeypatch) -> None:
    # Also in-process with httpx made unusable: a refused URL must never reach the network code.
    r = _load("http://example.com", "--json", str(tmp_path / "x.json"), timeout=60)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--allow-remote" in r.stderr
    assert not (tmp_path / "x.json").exists()

    sys.path.insert(0, str(ROOT))
    from bench import load

    monkeypatch.setitem(sys.modules, "httpx", None)
    assert load.main(["http://10.1.2.3:3000", "--json", str(tmp_path / "y.json")]) == 2
    assert load.is_loopback("127.0.0.5") and load.is_loopback("::1") and load.is_loopback("localhost")
    assert not load.is_loopback("example.com") and not load.is_loopback("192.168.0.1")
