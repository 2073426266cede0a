"""bench/accuracy.py end to end: a real artifact directory, run as a user runs the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "accuracy.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def accuracy_run(digits_artifacts: Path, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench") / "accuracy.json"
    r = _run(str(digits_artifacts), "--dataset", "digits", "--limit", "60", "--json", str(out))
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text())


def test_every_backend_precision_and_tta(accuracy_run):
    r, doc = accuracy_run
    assert set(doc) == {"machine", "meta", "rows"}
    rows = doc["rows"]
    got = sorted((x["backend"], x["precision"], x["tta"]) for x in rows)
    want = sorted([("pytorch", "fp32", t) for t in ("center", "ten_crop")]
                  + [("onnxruntime", p, t) for p in ("fp32", "fp16", "int8", "int8-cpu")
                     for t in ("center", "ten_crop")])
    assert got == want
    assert doc["meta"]["images"] == 60 and doc["meta"]["dataset"] == "digits"
    # The table names the machine and the dataset.
    assert "digits" in r.stdout and "CPU:" in r.stdout and "int8-cpu" in r.stdout


def test_metrics_against_the_reference(accuracy_run):
    rows = accuracy_run[1]["rows"]
    for x in rows:
        assert x["n"] == 60
        assert 0 <= x["top1"] <= 100 and 0 <= x["top5"] <= 100
        assert x["top1"] <= x["top5"]
        assert 0 <= x["top1_agreement"] <= 100 and x["max_logit_diff"] >= 0
        if x["backend"] == "pytorch":
            assert x["delta_top1"] == 0 and x["top1_agreement"] == 100 and x["max_logit_diff"] == 0
        if x["backend"] == "onnxruntime" and x["precision"] == "fp32":
            # BN folding changes the arithmetic only at float32 rounding level.
            assert x["top1_agreement"] == 100 and x["max_logit_diff"] < 1e-3
        ref = next(y for y in rows if y["backend"] == "pytorch" and y["tta"] == x["tta"])
        assert x["delta_top1"] == pytest.approx(x["top1"] - ref["top1"], abs=1e-3)


def test_missing_directory_is_one_line_exit_2(tmp_path):
    r = _run(str(tmp_path / "nope"), "--dataset", "digits", "--json", str(tmp_path / "a.json"), timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "resdeploy export" in lines[0]
    assert not (tmp_path / "a.json").exists()
