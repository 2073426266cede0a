"""bench/load.py (with bench/loadstats.py and bench/soak.py) against a real ``bentoml serve``
subprocess on a loopback port, and the soak summary's arithmetic on hand-made series.

The server fixture mirrors tests/test_service.py's (own process group, killed at teardown,
BENTOML_HOME in a tmp dir) but is this module's own, so the load run's batches are the only ones
in its metrics.
"""

from __future__ import annotations

import io
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
    # The pipeline yardstick: decode + crop of the run's 8 images on one thread, the model on 20-crop batches.
    pipe = doc["meta"]["pipeline"]
    assert pipe["images"] == doc["meta"]["images"] == 8 and pipe["batch_crops"] == 20
    assert pipe["cores"] == len(os.sched_getaffinity(0))
    for key in ("decode_ms_per_image", "decode_cpu_ms_per_image", "model_ms_per_image", "model_cpu_ms_per_image"):
        assert pipe[key] > 0, key
    assert pipe["decoded_images"] >= 8 and pipe["model_calls"] >= 5
    assert pipe["images_per_s"] == pytest.approx(
        1000 / (pipe["decode_ms_per_image"] / pipe["cores"] + pipe["model_ms_per_image"]))
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
        # Per process role: the arbiter plus the service worker(s), named by BentoML's --service-name
        # (one "resdeploy" worker since issue #11, "resdeploy" + "resdeploy_engine" before).
        parts = row["server_cpu_ms_per_req_by_process"]
        assert any(v > 0 for k, v in parts.items() if k != "arbiter"), parts
        assert sum(parts.values()) == pytest.approx(row["server_cpu_ms_per_req"])
        if row["calls_metric"] == "resdeploy_requests_per_batch":  # every request is in exactly one batch
            assert row["mean_calls_per_batch"] * row["batches"] == pytest.approx(12)
        assert row["pct_of_raw"] == pytest.approx(100 * row["images_per_s"] / doc["meta"]["raw"]["images_per_s"])
        assert row["pct_of_pipeline"] == pytest.approx(100 * row["images_per_s"] / pipe["images_per_s"])
        assert row["overhead_cpu_ms_per_req"] == pytest.approx(
            row["server_cpu_ms_per_req"] - pipe["decode_cpu_ms_per_image"] - pipe["model_cpu_ms_per_image"])
    raw = doc["meta"]["raw"]
    assert raw["file"] == "model.fp32.onnx" and raw["sha256"] == doc["meta"]["model"]["sha256"]
    assert raw["batch_crops"] == 20 and raw["calls"] >= 5 and raw["images_per_s"] > 0
    assert len(doc["meta"]["server_pids"]) >= 2  # the arbiter and its worker(s), found by port
    assert "arbiter" in doc["meta"]["server_roles"].values()
    assert out.with_suffix(".png").stat().st_size > 0
    for text in ("resnet20", "CPU:", "% of raw", "% of pipeline", "overhead CPU ms", "pipeline: "):
        assert text in r.stdout, text


@pytest.fixture(scope="module")
def other_model_artifacts(digits_run: Path, tmp_path_factory) -> Path:
    """Another digits ResNet-20: the served checkpoint with every conv/fc weight moved by seeded noise,
    exported (fp32 only) through the real pipeline, so its manifest and its model.fp32.onnx agree
    with each other and differ from the served ones."""
    import torch

    from resdeploy.cli import main

    ckpt = torch.load(digits_run / "best.pt", weights_only=True)
    g = torch.Generator().manual_seed(1)
    ckpt["model"] = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.ndim >= 2
                     else v for k, v in ckpt["model"].items()}
    tmp = tmp_path_factory.mktemp("other_model")
    torch.save(ckpt, tmp / "other.pt")
    out = tmp / "artifacts"
    assert main(["export", str(tmp / "other.pt"), "--arch", "resnet20", "--out", str(out), "--precisions", "fp32",
                 "--calib-data", "digits", "--eval-images", "50", "--no-progress"]) == 0
    return out


def _fp32_sha(directory: Path) -> str:
    doc = json.loads((directory / "manifest.json").read_text())
    return next(a["sha256"] for a in doc["artifacts"] if a["file"] == "model.fp32.onnx")


def _batch_histograms(url: str) -> dict:
    import httpx

    from bench.loadstats import METRICS, parse_histograms

    r = httpx.get(url + "/metrics", timeout=30, trust_env=False)
    r.raise_for_status()
    return parse_histograms(r.text, METRICS)


def test_raw_of_another_model_is_refused_before_any_request(server_url: str, digits_artifacts: Path,
                                                            other_model_artifacts: Path, tmp_path: Path) -> None:
    """--raw must measure the file the server runs: another model's directory is one line naming both
    files and the fix, exit 2, and not one /classify request (warm-up included) and no results."""
    sys.path.insert(0, str(ROOT))
    served, other = _fp32_sha(digits_artifacts), _fp32_sha(other_model_artifacts)
    assert served != other
    before = _batch_histograms(server_url)
    out = tmp_path / "x.json"
    r = _load(server_url, "--concurrency", "1,4", "--requests", "50", "--json", str(out), "--csv",
              str(tmp_path / "x.csv"), "--raw", str(other_model_artifacts))
    assert r.returncode == 2, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stderr.strip().splitlines() == [
        f"load.py: error: --raw {other_model_artifacts} is not the server's model: the server runs "
        f"model.fp32.onnx (sha256 {served[:12]}), its model.fp32.onnx is sha256 {other[:12]}; pass the "
        "directory the server serves (its RESDEPLOY_ARTIFACTS)"]
    assert r.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == []  # no JSON, CSV or plot
    assert _batch_histograms(server_url) == before  # the server ran no batch: no warm-up, no sweep

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


def test_photos_are_sent_as_jpegs(server_url: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from bench import load

    photos = load.photo_images()
    assert len(photos) >= 5 and {"astronaut.jpg", "coffee.jpg", "chelsea.jpg"} <= {n for n, _, _ in photos}
    for name, data, mime in photos:  # real photos, JPEG-encoded in memory
        img = Image.open(io.BytesIO(data))
        assert mime == "image/jpeg" and img.format == "JPEG" and img.mode == "RGB" and min(img.size) >= 256, name
    out = tmp_path / "photos.json"
    r = _load(server_url, "--num-images", "2", "--photos", "--concurrency", "2", "--requests", str(len(photos) + 2),
              "--json", str(out))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    doc = json.loads(out.read_text())
    assert doc["meta"]["photos"] == [n for n, _, _ in photos]
    assert doc["meta"]["images"] == 2 + len(photos)  # 2 random PNGs, then every photo once
    assert doc["rows"][0]["ok"] == doc["rows"][0]["requests"] == len(photos) + 2


def test_photos_without_scikit_image_is_one_line(monkeypatch, capsys) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import load

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(load.LoadError, match="scikit-image"):
        load.photo_images()
    assert load.main(["http://127.0.0.1:1", "--photos"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--photos needs scikit-image" in err[0]


def test_soak_samples_rss_of_every_server_process(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = _load(server_url, "--soak-minutes", "0.1", "--sample-seconds", "1", "--settle-minutes", "0.02",
              "--concurrency", "2,8", "--requests", "1", "--max-growth-pct", "1000", "--json", str(out),
              "--csv", str(tmp_path / "soak.csv"))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    doc = json.loads(out.read_text())
    [row] = doc["rows"]  # one level, the first --concurrency, run for the time (--requests ignored)
    assert row["concurrency"] == 2 and row["stopped_by"] == "time" and row["requests"] > 1
    assert row["elapsed_s"] >= 6 and row["errors"] == {}  # ran for the time (no upper bound: machine speed)
    samples = doc["soak"]["samples"]
    assert samples[0]["t_s"] == 0 and samples[0]["requests"] == 0  # before the load
    assert 6 <= len(samples) <= 9 and samples[-1]["requests"] == row["requests"]
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    # Mid-run samples count issued requests, up to 2 (the clients) still in flight; none in flight at the end.
    assert all(s["errors"] == 0 and s["requests"] - 2 <= s["ok"] <= s["requests"] for s in samples)
    assert samples[-1]["ok"] == samples[-1]["requests"]
    keys = {f"{role}-{pid}" for pid, role in doc["meta"]["server_roles"].items()}
    assert len(keys) >= 2 and any(k.startswith("arbiter-") for k in keys)
    for s in samples:
        assert keys <= s["rss_mb"].keys() and all(mb > 0 for mb in s["rss_mb"].values()), s
    per = doc["soak"]["per_process"]
    assert keys <= per.keys()
    for key in keys:
        p = per[key]
        assert p["rss_start_mb"] > 0 and p["rss_settled_mb"] > 0 and p["rss_end_mb"] > 0
        assert p["settled_at_s"] >= 1.2 and p["growth_after_settle_pct"] == pytest.approx(
            100 * (p["rss_end_mb"] - p["rss_settled_mb"]) / p["rss_settled_mb"])
        assert p["mb_per_min_last_5"] is not None
    assert out.with_suffix(".png").stat().st_size > 0 and (tmp_path / "soak.csv").is_file()
    assert sum(line.startswith("RSS ") for line in r.stdout.splitlines()) == len(per)


def test_soak_fails_on_growth_naming_the_process(server_url: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """A made-up RSS series that grows 2 MB per sample after settling fails --max-growth-pct 5."""
    sys.path.insert(0, str(ROOT))
    from bench import load, soak

    def fake_rss(self) -> dict[str, float]:
        return {"resdeploy-1": 100.0 + 2 * len(self.samples), "arbiter-2": 50.0}

    monkeypatch.setattr(soak.RssSampler, "rss_mb", fake_rss)
    code = load.main([server_url, "--soak-minutes", "0.05", "--sample-seconds", "0.5", "--settle-minutes", "0.01",
                      "--concurrency", "1", "--max-growth-pct", "5", "--json", str(tmp_path / "grow.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert len(err[-1:]) == 1 and "--max-growth-pct 5" in err[-1] and "resdeploy-1" in err[-1]
    assert "arbiter-2" not in err[-1]


def _sample(t_s: float, rss: dict[str, float]) -> dict:
    return {"t_s": t_s, "requests": 0, "ok": 0, "errors": 0, "images_per_s": None, "rss_mb": rss}


def test_soak_summary_arithmetic() -> None:
    sys.path.insert(0, str(ROOT))
    from bench import soak

    # a: 50 MB before the load, 100 MB once settled (t=120 s), then +2 MB a minute to 110 MB.
    # b: a worker that appeared at t=180 s; c: one that was gone before the run settled.
    a = [50, 80, 100, 102, 104, 106, 108, 110]
    samples = [_sample(60.0 * i, {"a-1": mb} | ({"b-2": 200.0 + i} if i >= 3 else {})
                       | ({"c-3": 30.0} if i < 2 else {})) for i, mb in enumerate(a)]
    per = soak.summarize(samples, settle_s=120)
    assert per["a-1"] == {"rss_start_mb": 50, "rss_settled_mb": 100, "settled_at_s": 120, "rss_end_mb": 110,
                          "growth_after_settle_pct": pytest.approx(10.0), "mb_per_min_last_5": pytest.approx(2.0)}
    assert per["b-2"]["rss_start_mb"] == per["b-2"]["rss_settled_mb"] == 203 and per["b-2"]["settled_at_s"] == 180
    assert per["b-2"]["growth_after_settle_pct"] == pytest.approx(100 * 4 / 203)
    assert per["b-2"]["mb_per_min_last_5"] == pytest.approx(1.0)
    assert per["c-3"]["rss_settled_mb"] is None and per["c-3"]["growth_after_settle_pct"] is None
    assert per["c-3"]["mb_per_min_last_5"] is None  # no sample in the last 5 minutes
    # The slope fits only the last 5 minutes: the 50 -> 100 MB warm-up does not count.
    assert soak.summarize(samples, settle_s=0)["a-1"]["growth_after_settle_pct"] == pytest.approx(120.0)
    assert soak.summarize(samples, settle_s=10_000)["a-1"]["rss_settled_mb"] is None
    assert soak.growth_violations(per, 5) == ["a-1 +10.0% (100.0 -> 110.0 MB)"]
    assert soak.growth_violations(per, 10) == []  # more than P% fails, exactly P% passes
    lines = soak.summary_lines(per, 120)
    assert len(lines) == 3 and "+10.0%" in lines[0] and "+2.00 MB/min" in lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--settle-minutes", "1"], "--settle-minutes only applies to a soak run"),
    (["--max-growth-pct", "5"], "--max-growth-pct only applies to a soak run"),
    (["--soak-minutes", "0"], "bad --soak-minutes"),
    (["--soak-minutes", "1", "--sample-seconds", "0"], "bad --sample-seconds"),
    (["--soak-minutes", "1", "--settle-minutes", "-1"], "bad --settle-minutes"),
    (["--soak-minutes", "1", "--max-growth-pct", "5"], "must be shorter than --soak-minutes"),
    (["--raw-batch", "0"], "bad --raw-batch"),
])
def test_bad_soak_flags_are_one_line(flags: list[str], message: str, capsys) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import load

    assert load.main(["http://127.0.0.1:1", *flags]) == 2  # refused before any request
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_combine_averages_per_image_milliseconds_by_hand():
    from bench.loadstats import combine

    def run(decode_ms: float, model_ms: float, raw_ms: float) -> tuple[dict, dict]:
        raw = {"images_per_s": 1000.0 / raw_ms, "cpu_ms_per_image": 2 * raw_ms, "calls": 5, "file": "f"}
        pipeline = {"decode_ms_per_image": decode_ms, "decode_cpu_ms_per_image": decode_ms, "model_ms_per_image": model_ms,
                    "model_cpu_ms_per_image": 2 * model_ms, "model_calls": 10, "decoded_images": 7, "cores": 2,
                    "images_per_s": 1000.0 / (decode_ms / 2 + model_ms)}
        return raw, pipeline

    raw, pipeline = combine([run(2.0, 6.0, 4.0), run(4.0, 8.0, 6.0)])
    assert pipeline["decode_ms_per_image"] == 3.0 and pipeline["model_cpu_ms_per_image"] == 14.0
    assert pipeline["images_per_s"] == pytest.approx(1000.0 / (3.0 / 2 + 7.0))  # 117.647, not the mean of rates
    assert pipeline["runs"] == [pytest.approx(1000 / 7.0), pytest.approx(1000 / 10.0)]
    assert raw["images_per_s"] == pytest.approx(1000.0 / 5.0) and raw["calls"] == 10
    assert combine([run(2.0, 6.0, 4.0)])[1]["images_per_s"] == pytest.approx(1000 / 7.0)
