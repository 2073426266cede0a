"""bench/predict.py: a short run classifies every file it wrote, its ratios are the rates it
reports divided by hand, and bad flags fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "predict.py"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_short_run_classifies_every_file_and_reports_ratios(digits_artifacts, tmp_path):
    out = tmp_path / "p.json"
    r = _run(str(digits_artifacts), "--num-images", "30", "--repeats", "2", "--engines", "local",
             "--seconds", "0.3", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["files"] == 30 and doc["machine"]["cpu_model"]
    rounds = doc["meta"]["rounds"]
    assert len(rounds) == 2
    for rnd in rounds:
        s = rnd["local_summary"]
        assert (s["rows"], s["images"], s["errors"], s["engine"]) == (30, 30, 0, "local")
        assert s["images_per_s"] == pytest.approx(30 / s["seconds"], rel=0.02)
        assert rnd["local_ratio"] == pytest.approx(rnd["local"] / rnd["pipeline"])
        # the yardstick's formula, by hand: decode spread over the cores, plus the model
        cores = doc["machine"]["cpu_cores"]
        assert rnd["pipeline"] == pytest.approx(1000 / (rnd["decode_ms"] / cores + rnd["model_ms"]))
    runs = [row["run"] for row in doc["rows"]]
    assert runs == ["in-process pipeline (yardstick)", "resdeploy predict --engine local"]
    local = doc["rows"][1]
    assert min(x["local"] for x in rounds) <= local["images_per_s"] <= max(x["local"] for x in rounds)  # the median
    assert "resdeploy predict --engine local" in r.stdout and str(out) in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--engines", "spark"], "bad --engines 'spark'"),
    (["--repeats", "0"], "--repeats and --num-images must be >= 1"),
])
def test_bad_flags_fail_in_one_line(args, message, tmp_path):
    r = _run(*args, "--json", str(tmp_path / "p.json"), timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "p.json").exists()
