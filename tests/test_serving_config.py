"""serving/config.py: every RESDEPLOY_* setting read from the environment, bad values refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bentoserver import free_port
from conftest import ROOT

from core.errors import ConfigError
from serving.config import Settings


def _settings(monkeypatch, **env) -> Settings:
    for key in list(os.environ):
        if key.startswith("RESDEPLOY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings.from_env()


def test_defaults(monkeypatch):
    s = _settings(monkeypatch)
    assert (s.backend, s.precision, s.max_batch, s.workers, s.gpus, s.decode_threads) == ("auto", "fp32", 40, 1, 1, 0)
    assert s.access_log is False and s.trace is False  # per-request costs are opt-in


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)])
def test_flags(monkeypatch, value, expected):
    s = _settings(monkeypatch, RESDEPLOY_ACCESS_LOG=value, RESDEPLOY_TRACE=value)
    assert s.access_log is expected and s.trace is expected


@pytest.mark.parametrize("env, match", [
    ({"RESDEPLOY_ACCESS_LOG": "maybe"}, r"RESDEPLOY_ACCESS_LOG='maybe': use 1 or 0"),
    ({"RESDEPLOY_WORKERS": "0"}, r"RESDEPLOY_WORKERS=0 must be >= 1"),
    ({"RESDEPLOY_GPUS": "two"}, r"RESDEPLOY_GPUS='two' is not an integer"),
    ({"RESDEPLOY_MAX_BATCH": "45"}, r"multiple of 10"),
    ({"RESDEPLOY_DECODE_THREADS": "-1"}, r"RESDEPLOY_DECODE_THREADS=-1 must be >= 0"),
])
def test_bad_values_name_the_variable(monkeypatch, env, match):
    with pytest.raises(ConfigError, match=match):
        _settings(monkeypatch, **env)


def test_request_timeout_outlasts_the_queueing_budget(monkeypatch):
    assert _settings(monkeypatch).timeout_s == 90  # 60 s budget + 30
    assert _settings(monkeypatch, RESDEPLOY_MAX_LATENCY_MS="500").timeout_s == 30
    with pytest.raises(ConfigError, match=r"RESDEPLOY_TIMEOUT_S=30 must exceed RESDEPLOY_MAX_LATENCY_MS=60000"):
        _settings(monkeypatch, RESDEPLOY_TIMEOUT_S="30")


# --- the real server: `bentoml serve` refuses bad values before it listens ------------------------------

BAD_AT_START = {  # variable=value -> the fix the message must name
    "RESDEPLOY_MAX_BATCH=25": "RESDEPLOY_MAX_BATCH=25 must be a multiple of 10",
    "RESDEPLOY_BACKEND=cuda9": "RESDEPLOY_BACKEND='cuda9': choose one of auto, tensorrt, onnxruntime, pytorch",
    "RESDEPLOY_MODEL_NAME=a b": "RESDEPLOY_MODEL_NAME='a b': use letters, digits, '_', '.' and '-' only",
}


def test_bentoml_serve_refuses_bad_settings_at_start_up(tmp_path):
    """One real ``bentoml serve serving.service:Classifier`` per bad value, all three at once (each
    fails at import, before any model is read). Each must exit non-zero on its own, before
    listening, and print one line naming the variable and the fix, with no traceback (BentoML does
    not catch an import error: before the service turned it into SystemExit, that line ended a
    ~55-line traceback through click, bentoml's loader and importlib).
    """
    # RESDEPLOY_ARTIFACTS names no directory: the settings must be refused before it is looked at, and
    # a check that went missing ends the process (ArtifactError) instead of leaving it serving.
    procs = {}
    for i, setting in enumerate(BAD_AT_START):
        key, value = setting.split("=", 1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESDEPLOY_")} | {
            "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(tmp_path / f"home{i}"), "BENTOML_DO_NOT_TRACK": "True",
            "RESDEPLOY_ARTIFACTS": str(tmp_path / "no-such-dir"), key: value}
        procs[setting] = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "serving.service:Classifier", "--host", "127.0.0.1",
             "--port", str(free_port())], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
    try:
        for setting, proc in procs.items():
            out, _ = proc.communicate(timeout=120)  # a hang guard only: it fails at import
            lines = [s for s in out.splitlines() if s.strip()]
            assert proc.returncode != 0, out[-3000:]
            assert lines, "no output at all"
            last = lines[-1]
            assert last.startswith("resdeploy: ") and BAD_AT_START[setting] in last, out[-3000:]
            assert "Traceback" not in out, out[-3000:]
            assert "Starting production" not in out and "Uvicorn running" not in out  # never served
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
