"""HTTP load generator for a running resdeploy service: throughput, latency and batch sizes.

``python bench/load.py http://127.0.0.1:3000 --concurrency 1,8,32`` sends ``POST /classify``
requests (multipart field ``image``) from ``concurrency`` asyncio workers, level by level, each
level bounded by ``--requests`` and ``--max-seconds`` (whichever comes first). Per level it reports
requests/s, images/s (successful requests/s: one image per request), p50/p95/p99 latency, errors by
HTTP status or connection error, and how the server batched: the change of the service's own
``resdeploy_crops_per_batch`` histogram (rows per engine batch) and of BentoML's
``bentoml_service_adaptive_batch_size`` (calls per batch) read from ``/metrics`` before and after.

Where the time goes (bench/loadstats.py): CPU milliseconds per request of the client (this
process) and of the server's process tree (found by its port, or ``--server-pid``), and with
``--raw DIR`` the same artifact run in this process on ``--raw-batch``-crop batches after the sweep:
``pct_of_raw`` is served images/s as a share of that raw rate, and the server's CPU per request
beyond the raw CPU per image is what HTTP, decoding and the hop between the two services cost.

Only loopback hosts are accepted unless ``--allow-remote``: a load test is traffic someone pays for.
The metrics are server-wide, so other clients hitting the same server during a level are counted
in its batch histogram.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncio  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from bench.common import (format_table, machine_header, machine_info, percentiles, positive_ints,  # noqa: E402
                          write_results)
from resdeploy.cli import OneLineParser  # noqa: E402

CROPS_METRIC = "resdeploy_crops_per_batch"  # serving/service.py: rows (crops) per engine batch
BENTO_METRIC = "bentoml_service_adaptive_batch_size"  # BentoML: calls per adaptive batch
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
        ".webp": "image/webp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LE = re.compile(r'(?:^|,)\s*le="([^"]*)"')


class LoadError(Exception):
    """A problem that ends the run before any load is sent: bad flags (exit 2), no service (exit 1)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- configuration


def is_loopback(host: str | None) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (no DNS lookup: nothing leaves the machine)."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_remote: bool) -> str:
    """The base URL without a trailing slash; raises LoadError for a bad or non-loopback one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadError(f"bad URL {url!r}: expected http://HOST:PORT, e.g. http://127.0.0.1:3000")
    if not allow_remote and not is_loopback(parts.hostname):
        raise LoadError(f"refusing to send load to non-loopback host {parts.hostname!r} ({url}); "
                        "only 127.0.0.0/8, localhost and ::1 are allowed unless --allow-remote")
    return url.rstrip("/")


def parse_levels(text: str) -> list[int]:
    levels = positive_ints(text)
    if levels is None:
        raise LoadError(f"bad --concurrency {text!r}: expected positive integers, e.g. 1,8,32")
    return levels


def make_images(size: int, count: int, seed: int, directory: str | None) -> list[tuple[str, bytes, str]]:
    """Seeded random RGB PNGs of ``size`` x ``size`` plus the image files of ``directory``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
        images.append((f"random{i}.png", buf.getvalue(), "image/png"))
    if directory:
        path = Path(directory)
        if not path.is_dir():
            raise LoadError(f"--images {directory!r} is not a directory")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise LoadError(f"--images {directory!r} holds no {'/'.join(sorted(IMAGE_SUFFIXES))} files")
        images += [(p.name, p.read_bytes(), MIME[p.suffix.lower()]) for p in files]
    if not images:
        raise LoadError("no images: give --num-images > 0 or --images DIR")
    return images


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


# ---------------------------------------------------------------- load


async def _metrics(client, url: str) -> dict[str, dict] | None:
    try:
        r = await client.get(url + "/metrics")
        r.raise_for_status()
    except Exception as e:  # noqa: BLE001 - metrics are optional: report the level without them
        print(f"warning: GET {url}/metrics failed ({type(e).__name__}: {e}); no batch histogram",
              file=sys.stderr)
        return None
    return parse_histograms(r.text, (CROPS_METRIC, BENTO_METRIC))


async def run_level(url: str, images: list, tta: str, concurrency: int, n_requests: int,
                    max_seconds: float, timeout: float, meter=None) -> dict[str, Any]:
    """One concurrency level: ``concurrency`` workers until ``n_requests`` or ``max_seconds``.

    ``meter`` (a bench.loadstats.CpuMeter) is read just around the requests, /metrics reads excluded.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        before = await _metrics(client, url)
        issued, ok, latencies, errors = 0, 0, [], Counter()
        if meter is not None:
            meter.start()
        t0 = time.perf_counter()
        deadline = t0 + max_seconds

        async def worker() -> None:
            nonlocal issued, ok
            while issued < n_requests and time.perf_counter() < deadline:
                name, data, mime = images[issued % len(images)]
                issued += 1
                t = time.perf_counter()
                try:
                    r = await client.post(url + "/classify", files={"image": (name, data, mime)},
                                          data={"tta": tta})
                except httpx.HTTPError as e:  # connection refused/reset, timeouts
                    errors[type(e).__name__] += 1
                    continue
                latency_ms = (time.perf_counter() - t) * 1e3
                if r.status_code != 200:
                    errors[str(r.status_code)] += 1
                elif "top1" not in r.json():
                    errors["bad_body"] += 1
                else:
                    ok += 1
                    latencies.append(latency_ms)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = meter.stop(issued, elapsed) if meter is not None else {}
        after = await _metrics(client, url)

    crops = histogram_delta((before or {}).get(CROPS_METRIC), (after or {}).get(CROPS_METRIC))
    bento = histogram_delta((before or {}).get(BENTO_METRIC), (after or {}).get(BENTO_METRIC))
    row: dict[str, Any] = {
        "concurrency": concurrency, "requests": issued, "ok": ok, "errors": dict(errors),
        "elapsed_s": elapsed, "stopped_by": "requests" if issued >= n_requests else "time",
        "requests_per_s": issued / elapsed, "images_per_s": ok / elapsed,
        "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, **cpu,
    }
    if latencies:
        p = percentiles(latencies)
        row.update(p50_ms=p["p50_ms"], p95_ms=_quantile(latencies, 0.95), p99_ms=p["p99_ms"],
                   mean_ms=p["mean_ms"])
    row.update(batches=crops and crops["batches"], mean_crops_per_batch=crops and crops["mean"],
               batch_histogram=crops and crops["buckets"],
               mean_calls_per_batch=bento and bento["mean"], bentoml_batch_histogram=bento and bento["buckets"])
    return row


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics, as bench.common.percentiles does."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def _model_and_warmup(url: str, images: list, tta: str, warmup: int, timeout: float) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        try:
            r = await client.get(url + "/model")
        except httpx.HTTPError as e:
            raise LoadError(f"GET {url}/model failed: {type(e).__name__}: {e} (is the service running?)",
                            exit_code=1) from e
        if r.status_code != 200:
            raise LoadError(f"GET {url}/model answered {r.status_code}: {r.text[:200]} (not ready yet?)",
                            exit_code=1)
        for i in range(warmup):  # connection set-up and first-call costs stay out of the first level
            name, data, mime = images[i % len(images)]
            await client.post(url + "/classify", files={"image": (name, data, mime)}, data={"tta": tta})
        return r.json()


# ---------------------------------------------------------------- output


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(conc, [r["images_per_s"] for r in rows], "o-", color="tab:blue", label="images/s")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images/s", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax2 = ax.twinx()
    ax2.plot(conc, [r["p99_ms"] if r["p99_ms"] is not None else math.nan for r in rows], "s--",
             color="tab:red", label="p99 latency")
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _errors_cell(errors: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="bench/load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="service base URL, e.g. http://127.0.0.1:3000")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--requests", type=int, default=64, help="requests per level at most (default 64)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="seconds per level at most (default 60)")
    p.add_argument("--tta", choices=["ten_crop", "center"], default="ten_crop")
    p.add_argument("--image-size", type=int, default=64, help="side of the random PNGs (default 64)")
    p.add_argument("--num-images", type=int, default=8, help="random PNGs to cycle through (default 8)")
    p.add_argument("--images", metavar="DIR", help="also send the image files of DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before the first level")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "load.json"), help="results JSON")
    p.add_argument("--csv", help="also write the rows as CSV")
    p.add_argument("--png", help="throughput/p99 plot (default: the JSON path with .png)")
    p.add_argument("--raw", metavar="DIR", help="artifact directory the server serves: also measure it "
                   "in-process (no HTTP) and report served throughput as a share of that")
    p.add_argument("--raw-batch", type=int, default=40, help="crops per in-process batch for --raw "
                   "(default 40, the service's RESDEPLOY_MAX_BATCH default)")
    p.add_argument("--server-pid", type=int, help="server process for CPU accounting (default: whoever "
                   "listens on the URL's port, with its children)")
    p.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")
    p.add_argument("--allow-errors", action="store_true", help="exit 0 even if requests failed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = check_url(args.url, args.allow_remote)
        levels = parse_levels(args.concurrency)
        for flag, value in (("--requests", args.requests), ("--max-seconds", args.max_seconds),
                            ("--image-size", args.image_size), ("--timeout", args.timeout)):
            if value <= 0:
                raise LoadError(f"bad {flag} {value}: must be > 0")
        if args.num_images < 0 or args.warmup < 0:
            raise LoadError("--num-images and --warmup must be >= 0")
        if args.raw_batch <= 0:
            raise LoadError(f"bad --raw-batch {args.raw_batch}: must be > 0")
        if args.raw and not (Path(args.raw) / "manifest.json").is_file():
            raise LoadError(f"--raw {args.raw}: no manifest.json there; pass the artifact directory the "
                            "server was started with (RESDEPLOY_ARTIFACTS)")
        images = make_images(args.image_size, args.num_images, args.seed, args.images)
        model = asyncio.run(_model_and_warmup(url, images, args.tta, args.warmup, args.timeout))
    except LoadError as e:
        print(f"load.py: error: {e}", file=sys.stderr)
        return e.exit_code

    from bench.loadstats import CpuMeter, raw_rate

    meter = CpuMeter(urlsplit(url).port, args.server_pid)
    if not meter.procs:
        print("load.py: server CPU not measured (process not found; pass --server-pid)", file=sys.stderr)
    rows = []
    for c in levels:
        rows.append(asyncio.run(run_level(url, images, args.tta, c, args.requests, args.max_seconds,
                                          args.timeout, meter)))
        r = rows[-1]
        print(f"concurrency {c}: {r['ok']}/{r['requests']} ok in {r['elapsed_s']:.1f} s", file=sys.stderr)

    model_info = {k: model.get(k) for k in ("arch", "backend", "precision", "file", "sha256", "num_classes")}
    raw = None
    if args.raw:
        crops = 10 if args.tta == "ten_crop" else 1
        try:
            raw = raw_rate(args.raw, model_info["precision"], args.raw_batch, crops)
        except Exception as e:  # noqa: BLE001 - ResdeployError or a backend failure: report, keep the sweep
            print(f"load.py: error: --raw {args.raw}: {e}", file=sys.stderr)
            return 2
        if raw["sha256"] != model_info["sha256"]:
            print(f"load.py: error: --raw {args.raw} holds {raw['file']} (sha256 {raw['sha256'][:12]}), but the "
                  f"server runs sha256 {str(model_info['sha256'])[:12]}; pass the directory it serves", file=sys.stderr)
            return 2
        for r in rows:
            r["pct_of_raw"] = 100.0 * r["images_per_s"] / raw["images_per_s"]
            if r.get("server_cpu_ms_per_req") is not None:
                r["overhead_cpu_ms_per_req"] = r["server_cpu_ms_per_req"] - raw["cpu_ms_per_image"]
    machine = machine_info()
    meta = {"url": url, "model": model_info, "tta": args.tta, "concurrency": levels,
            "requests_per_level": args.requests, "max_seconds": args.max_seconds,
            "image_size": args.image_size, "num_images": args.num_images, "images_dir": args.images,
            "images": len(images), "seed": args.seed, "warmup": args.warmup, "timeout_s": args.timeout,
            "note": "machine is the client's; batch histograms are server-wide deltas per level",
            "raw": raw, "server_pids": meter.server_pids}
    json_path = Path(args.json)
    png_path = Path(args.png) if args.png else json_path.with_suffix(".png")
    write_results(rows, json_path, args.csv, meta=meta, machine=machine)
    model_line = (f"Model: {model_info['arch']} {model_info['precision']} on {model_info['backend']} "
                  f"({model_info['file']}, sha256 {str(model_info['sha256'])[:12]}) at {url}, tta={args.tta}")
    plot(rows, png_path, f"{model_info['arch']} {model_info['precision']} {model_info['backend']}, "
                         f"tta={args.tta}\n{machine.get('cpu_model')}")

    table = [r | {"errors": _errors_cell(r["errors"])} for r in rows]
    print(machine_header(machine))
    print(model_line)
    print(format_table(table, [("concurrency", "clients"), "requests", "ok", "errors",
                               ("requests_per_s", "req/s"), ("images_per_s", "img/s"), ("p50_ms", "p50 ms"),
                               ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), "batches",
                               ("mean_crops_per_batch", "crops/batch"), ("mean_calls_per_batch", "calls/batch"),
                               ("client_cpu_ms_per_req", "client CPU ms"), ("server_cpu_ms_per_req", "server CPU ms"),
                               ("pct_of_raw", "% of raw")]))
    for r in rows:
        parts = r.get("server_cpu_ms_per_req_by_process") or {}
        if parts:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v >= 0.005)
            print(f"CPU ms per request, {r['concurrency']} clients: client {r['client_cpu_ms_per_req']:.2f}, {shown}")
    if raw:
        print(f"raw: {raw['images_per_s']:.1f} images/s in-process ({raw['file']}, {raw['batch_crops']}-crop "
              f"batches, {raw['cpu_ms_per_image']:.2f} CPU ms/image); CPU ms are per request")
    print(f"wrote {json_path} and {png_path}" + (f" and {args.csv}" if args.csv else ""))
    failed = sum(r["requests"] - r["ok"] for r in rows)
    if failed and not args.allow_errors:
        print(f"load.py: error: {failed} request(s) failed (see errors); pass --allow-errors to accept",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
