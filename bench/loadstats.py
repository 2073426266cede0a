"""Where a served request's time goes, for bench/load.py: CPU time of client and server, how the
server batched, and two in-process yardsticks.

* :class:`CpuMeter` sums user+system CPU seconds of this process (the load client) and of the
  server's process tree (found by the port it listens on, or given by PID) across one level, also
  per server process role (the arbiter, and BentoML's ``--service-name`` of each worker);
* :func:`parse_histograms` / :func:`histogram_delta` read the batch histograms from ``/metrics``;
* :func:`in_process` runs the served artifact in this process, with the serving engine's own
  loader: ``raw`` is the model alone on random ``batch``-crop float batches, ``pipeline`` is what
  the server does per image minus HTTP and batching: decode + crop the very bytes the run sends
  (:func:`core.preprocess.load_crops`, one thread) and ``infer_uint8`` on ``batch``-crop batches of
  those crops (``pipeline_images_per_s`` in bench/load.py's docstring).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core.flavours import flavour
from core.timing import WARMUP, time_calls

CROPS_METRIC = "resdeploy_crops_per_batch"  # serving/service.py: rows (crops) per inference batch
REQUESTS_METRIC = "resdeploy_requests_per_batch"  # serving/service.py: requests per inference batch
BENTO_METRIC = "bentoml_service_adaptive_batch_size"  # BentoML's batching (the two-service layout)
METRICS = (CROPS_METRIC, REQUESTS_METRIC, BENTO_METRIC)
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LE = re.compile(r'(?:^|,)\s*le="([^"]*)"')


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- server processes and CPU


def _server_processes(port: int | None, pid: int | None) -> list:
    """The server's process and all its children (BentoML's arbiter spawns the service workers)."""
    try:
        import psutil
    except ImportError:
        return []
    root = None
    try:
        if pid is not None:
            root = psutil.Process(pid)
        elif port is not None:
            for c in psutil.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                    root = psutil.Process(c.pid)
                    break
        if root is None:
            return []
        while root.parent() is not None and root.parent().pid != 1 and _listens_on(root.parent(), port):
            root = root.parent()
        return [root, *root.children(recursive=True)]
    except (psutil.Error, OSError):  # no permission to list sockets, process gone
        return []


def _listens_on(proc, port: int | None) -> bool:
    try:
        return port is not None and any(c.laddr and c.laddr.port == port for c in proc.net_connections("tcp"))
    except Exception:  # noqa: BLE001 - psutil.AccessDenied and friends: stop climbing
        return False


def role(proc) -> str:
    """BentoML names each worker's service on its command line (``--service-name NAME``)."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return "unknown"
    if "--service-name" in cmd[:-1]:
        return cmd[cmd.index("--service-name") + 1]
    return "arbiter" if any(c == "serve" for c in cmd) else "worker"


def _cpu_seconds(procs: list) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except Exception:  # noqa: BLE001 - a worker that exited mid-level
            continue
    return out


class CpuMeter:
    """CPU seconds of the client (this process) and the server tree between ``start()`` and ``stop()``."""

    def __init__(self, port: int | None, pid: int | None = None):
        self.procs = _server_processes(port, pid)
        self.server_pids = [p.pid for p in self.procs]
        self.roles = {p.pid: role(p) for p in self.procs}

    def start(self) -> None:
        self.c0, self.s0 = time.process_time(), _cpu_seconds(self.procs)

    def stop(self, requests: int, elapsed_s: float) -> dict[str, Any]:
        """Per-request CPU ms of the client, the server and each server process role, and how busy the CPUs were."""
        client = time.process_time() - self.c0
        after = _cpu_seconds(self.procs)
        by_role: dict[str, float] = {}
        for pid, t in after.items():
            name = self.roles.get(pid, "unknown")
            by_role[name] = by_role.get(name, 0.0) + t - self.s0.get(pid, t)
        server = sum(by_role.values()) if self.procs else None
        n = max(requests, 1)
        return {"client_cpu_ms_per_req": 1000.0 * client / n,
                "server_cpu_ms_per_req": None if server is None else 1000.0 * server / n,
                "server_cpu_ms_per_req_by_process": {k: 1000.0 * v / n for k, v in sorted(by_role.items())},
                "cpu_busy_pct": None if server is None else 100.0 * (client + server) / (elapsed_s * usable_cores())}


# ---------------------------------------------------------------- Prometheus histograms


def parse_histograms(text: str, names: tuple[str, ...]) -> dict[str, dict]:
    """``{name: {"buckets": {le: cumulative count}, "sum", "count"}}`` summed over label sets."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        sample, labels, value = m.groups()
        for name in names:
            if not sample.startswith(name):
                continue
            suffix = sample[len(name):]
            if suffix not in ("_bucket", "_sum", "_count"):
                continue
            h = out.setdefault(name, {"buckets": {}, "sum": 0.0, "count": 0.0})
            v = float(value)
            if suffix == "_bucket":
                le = _LE.search(labels or "")
                if le:
                    h["buckets"][le.group(1)] = h["buckets"].get(le.group(1), 0.0) + v
            else:
                h[suffix[1:]] += v
    return out


def _le_key(le: str) -> float:
    return math.inf if le == "+Inf" else float(le)


def histogram_delta(before: dict | None, after: dict | None) -> dict | None:
    """Batches per bucket (not cumulative), batch count and mean size between two snapshots."""
    if not after:
        return None
    before = before or {"buckets": {}, "sum": 0.0, "count": 0.0}
    count = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    per_bucket, prev = {}, 0.0
    for le in sorted(after["buckets"], key=_le_key):
        cum = after["buckets"][le] - before["buckets"].get(le, 0.0)
        label = "+Inf" if le == "+Inf" else f"{_le_key(le):g}"
        per_bucket[label] = int(round(cum - prev))
        prev = cum
    return {"buckets": per_bucket, "batches": int(round(count)),
            "mean": total / count if count > 0 else None}


def batch_fields(before: dict | None, after: dict | None) -> dict[str, Any]:
    """A level's batching from two ``/metrics`` snapshots: crops per batch, and calls (requests) per
    batch from ``resdeploy_requests_per_batch``, or BentoML's histogram where only that exists."""
    before, after = before or {}, after or {}
    crops = histogram_delta(before.get(CROPS_METRIC), after.get(CROPS_METRIC))
    metric = REQUESTS_METRIC if after.get(REQUESTS_METRIC) else BENTO_METRIC
    calls = histogram_delta(before.get(metric), after.get(metric))
    return {"batches": crops and crops["batches"], "mean_crops_per_batch": crops and crops["mean"],
            "batch_histogram": crops and crops["buckets"], "mean_calls_per_batch": calls and calls["mean"],
            "calls_batch_histogram": calls and calls["buckets"], "calls_metric": calls and metric}


# ---------------------------------------------------------------- in-process yardsticks


def _timed(call, seconds: float, units_per_call: float) -> tuple[float, float, int]:
    """(wall ms, process CPU ms) per unit over timed calls of ``call`` (warm-up excluded), and the call count."""
    for _ in range(WARMUP):  # here, not in time_calls: the CPU seconds count only timed calls
        call()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    calls = len(time_calls(call, seconds, warmup=0, min_iters=5))
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    units = calls * units_per_call
    return 1000.0 * wall / units, 1000.0 * cpu / units, calls


def decode_cost(images: list[bytes], cfg, tta: str, seconds: float, max_pixels: int) -> dict[str, Any]:
    """Wall and CPU ms per image of :func:`core.preprocess.load_crops` in this thread (whole passes
    over ``images`` until ``seconds``), and one pass's crops for the model."""
    from core.preprocess import load_crops

    crops = [load_crops(data, cfg, tta, max_pixels) for data in images]  # also the warm-up pass
    done, wall_start, cpu_start = 0, time.perf_counter(), time.thread_time()
    while done == 0 or time.perf_counter() - wall_start < seconds:
        for data in images:
            load_crops(data, cfg, tta, max_pixels)
        done += len(images)
    wall, cpu = time.perf_counter() - wall_start, time.thread_time() - cpu_start
    return {"decode_ms_per_image": 1000.0 * wall / done, "decode_cpu_ms_per_image": 1000.0 * cpu / done,
            "decoded_images": done, "crops": np.concatenate(crops)}


def in_process(directory: str | os.PathLike, precision: str, batch: int, tta: str, images: list[bytes],
               sha256: str | None = None, seconds: float = 3.0, threads: int = 0,
               max_pixels: int = 40_000_000) -> tuple[dict, dict]:
    """``(raw, pipeline)`` for the served artifact run here (see the module docstring).

    Loads through :func:`serving.engine.load_model` (sha256-checked, same backend choice as the
    server's ``auto``), so the file and session options are the ones the engine uses. ``precision``
    is the flavour the server reports (either int8 form included) or its number format. Raises
    ValueError if ``sha256`` (the server's file) is given and the loaded file is another one.
    """
    from serving.engine import load_model

    crops_per_image = 10 if tta == "ten_crop" else 1
    model = load_model(Path(directory), "auto", flavour(precision).number_format, 0, threads)
    try:
        if sha256 is not None and model.entry.sha256 != sha256:
            raise ValueError(f"holds {model.entry.file} (sha256 {model.entry.sha256[:12]}), but the server runs "
                             f"sha256 {sha256[:12]}; pass the directory it serves")
        cfg = model.preprocess
        decode = decode_cost(images, cfg, tta, seconds / 2, max_pixels)  # before any inference: no spinning pool
        rows = decode.pop("crops")
        index = (np.arange(batch)[None, :] + batch * np.arange(-(-len(rows) // batch))[:, None]) % len(rows)
        batches = itertools.cycle([rows[i] for i in index])  # the run's crops, wrapped into full batches

        def infer_next() -> None:
            model.backend.infer_uint8(next(batches), cfg.mean, cfg.std)

        model_ms, model_cpu_ms, model_calls = _timed(infer_next, seconds, batch / crops_per_image)
        cores = usable_cores()
        pipeline = {**decode, "model_ms_per_image": model_ms, "model_cpu_ms_per_image": model_cpu_ms,
                    "model_calls": model_calls, "batch_crops": batch, "cores": cores, "images": len(images),
                    "images_per_s": 1000.0 / (decode["decode_ms_per_image"] / cores + model_ms)}

        x = np.random.default_rng(0).standard_normal((batch, 3, cfg.crop, cfg.crop)).astype(np.float32)
        raw_ms, raw_cpu_ms, raw_calls = _timed(partial(model.backend.infer, x), seconds, batch / crops_per_image)
        raw = {"images_per_s": 1000.0 / raw_ms, "cpu_ms_per_image": raw_cpu_ms, "batch_crops": batch,
               "calls": raw_calls, "file": model.entry.file, "sha256": model.entry.sha256,
               "backend": model.backend.name, "precision": model.backend.precision}
        return raw, pipeline
    finally:
        model.backend.deactivate()


def combine(runs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """One ``(raw, pipeline)`` from several :func:`in_process` runs (load.py measures before and after
    the sweep, so slow drifts of a shared machine pair up with the served figures): per-image
    milliseconds are averaged and the rates recomputed from them."""
    if len(runs) == 1:
        return runs[0]
    raws, pipes = [r for r, _ in runs], [p for _, p in runs]

    def mean(dicts: list[dict], key: str) -> float:
        return sum(d[key] for d in dicts) / len(dicts)

    raw = dict(raws[0], images_per_s=1000.0 / mean([{"ms": 1000.0 / r["images_per_s"]} for r in raws], "ms"),
               cpu_ms_per_image=mean(raws, "cpu_ms_per_image"), calls=sum(r["calls"] for r in raws))
    pipeline = dict(pipes[0])
    for key in ("decode_ms_per_image", "decode_cpu_ms_per_image", "model_ms_per_image", "model_cpu_ms_per_image"):
        pipeline[key] = mean(pipes, key)
    pipeline.update(model_calls=sum(p["model_calls"] for p in pipes), decoded_images=sum(p["decoded_images"] for p in pipes),
                    images_per_s=1000.0 / (pipeline["decode_ms_per_image"] / pipeline["cores"] + pipeline["model_ms_per_image"]),
                    runs=[p["images_per_s"] for p in pipes])
    return raw, pipeline


def raw_mismatch(directory: str | os.PathLike, model: dict) -> str | None:
    """Why ``directory`` cannot be the yardstick of the server whose ``/model`` answer is ``model``
    (it does not list the file and sha256 the server runs), or None; read before any load is sent."""
    from core.errors import ResdeployError
    from core.manifest import read_manifest

    try:
        manifest = read_manifest(directory)
    except ResdeployError as e:
        return f"--raw {directory}: {' '.join(str(e).split())}"
    if any(a.file == model.get("file") and a.sha256 == model.get("sha256") for a in manifest.artifacts):
        return None
    same_file = [a.sha256 for a in manifest.artifacts if a.file == model.get("file")]
    holds = (f"its {model.get('file')} is sha256 {same_file[0][:12]}" if same_file else
             f"it lists only {', '.join(a.file for a in manifest.artifacts) or 'no artifacts'}")
    return (f"--raw {directory} is not the server's model: the server runs {model.get('file')} (sha256 "
            f"{str(model.get('sha256'))[:12]}), {holds}; pass the directory the server serves "
            "(its RESDEPLOY_ARTIFACTS)")


def apply_yardsticks(rows: list[dict], raw: dict, pipeline: dict) -> None:
    """Add ``pct_of_raw``, ``pct_of_pipeline`` and ``overhead_cpu_ms_per_req`` to each row in place."""
    inside = pipeline["decode_cpu_ms_per_image"] + pipeline["model_cpu_ms_per_image"]
    for r in rows:
        r["pct_of_raw"] = 100.0 * r["images_per_s"] / raw["images_per_s"]
        r["pct_of_pipeline"] = 100.0 * r["images_per_s"] / pipeline["images_per_s"]
        if r.get("server_cpu_ms_per_req") is not None:
            r["overhead_cpu_ms_per_req"] = r["server_cpu_ms_per_req"] - inside


def yardstick_lines(raw: dict, pipeline: dict) -> list[str]:
    p = pipeline
    return [f"raw: {raw['images_per_s']:.1f} images/s in-process ({raw['file']}, {raw['batch_crops']}-crop "
            f"batches, {raw['cpu_ms_per_image']:.2f} CPU ms/image)",
            f"pipeline: {p['images_per_s']:.1f} images/s = 1000 / ({p['decode_ms_per_image']:.2f} ms decode / "
            f"{p['cores']} cores + {p['model_ms_per_image']:.2f} ms model) per image over the run's {p['images']} "
            f"images; CPU ms/image: decode {p['decode_cpu_ms_per_image']:.2f} + model {p['model_cpu_ms_per_image']:.2f}; "
            "overhead CPU ms = server CPU ms per request - both; CPU ms are per request"]
