"""serving/config.py: every RESDEPLOY_* setting read from the environment, bad values refused in one line."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from serving.config import Settings


def _settings(monkeypatch, **env) -> Settings:
    for key in list(__import__("os").environ):
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
