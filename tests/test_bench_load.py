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


def test_load_sweep(server_url: str, digits_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    r = _load(server_url, "--concurrency", "1,4", "--requests", "12", "--json", str(out),
              "--raw", str(digits_artifacts), "--raw-batch", "20")
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
        # Where the time went: both sides used CPU, the server (model included) more than the client.
        assert row["client_cpu_ms_per_req"] > 0 and row["server_cpu_ms_per_req"] > row["client_cpu_ms_per_req"]
        assert 0 < row["cpu_busy_pct"] <= 100 * 1.05
        parts = row["server_cpu_ms_per_req_by_process"]  # the two services, named as BentoML names them
        assert {"resdeploy", "resdeploy_engine"} <= parts.keys() and parts["resdeploy_engine"] > 0
        assert sum(parts.values()) == pytest.approx(row["server_cpu_ms_per_req"])
        assert row["pct_of_raw"] == pytest.approx(100 * row["images_per_s"] / doc["meta"]["raw"]["images_per_s"])
        assert row["overhead_cpu_ms_per_req"] == pytest.approx(
            row["server_cpu_ms_per_req"] - doc["meta"]["raw"]["cpu_ms_per_image"])
    raw = doc["meta"]["raw"]
    assert raw["file"] == "model.fp32.onnx" and raw["sha256"] == doc["meta"]["model"]["sha256"]
    assert raw["batch_crops"] == 20 and raw["calls"] >= 5 and raw["images_per_s"] > 0
    assert len(doc["meta"]["server_pids"]) >= 3  # the arbiter and one worker per service, found by port
    assert out.with_suffix(".png").stat().st_size > 0
    assert "resnet20" in r.stdout and "CPU:" in r.stdout and "% of raw" in r.stdout


def test_raw_of_another_model_is_refused(server_url: str, digits_artifacts: Path, tmp_path: Path) -> None:
    """--raw must measure the file the server runs: a different one is one line and exit 2."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(digits_artifacts, other)
    manifest = json.loads((other / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["file"] == "model.fp32.onnx")
    entry["sha256"] = "0" * 64  # the file no longer matches: refused before anything runs
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = _load(server_url, "--concurrency", "1", "--requests", "2", "--json", str(tmp_path / "x.json"),
              "--raw", str(other))
    assert r.returncode == 2 and "--raw" in r.stderr and len(r.stderr.strip().splitlines()) >= 1
    assert "Traceback" not in r.stderr
    r = _load(server_url, "--raw", str(tmp_path / "nowhere"), "--json", str(tmp_path / "y.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "manifest.json" in r.stderr


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


def test_concurrency_levels_are_positive_integers() -> None:
    sys.path.insert(0, str(ROOT))
    from bench import load

    assert load.parse_levels("1,8, 32") == [1, 8, 32]
    for bad in ("0", "1,x", "", ",", "-4"):
        with pytest.raises(load.LoadError, match="--concurrency"):
            load.parse_levels(bad)
    assert load.main(["http://127.0.0.1:1", "--concurrency", "2,0"]) == 2
