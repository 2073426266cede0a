"""HTTP load generator for a running resdeploy service: throughput, latency and batch sizes.

``python bench/load.py http://127.0.0.1:3000 --concurrency 1,8,32`` sends ``POST /classify``
requests (multipart field ``image``) from ``concurrency`` asyncio workers, level by level, each
level bounded by ``--requests`` and ``--max-seconds`` (whichever comes first). Per level it reports
requests/s, images/s (successful requests/s: one image per request), p50/p95/p99 latency, errors by
HTTP status or connection error, and how the server batched: the change of the service's
``resdeploy_crops_per_batch`` (rows per inference batch) and ``resdeploy_requests_per_batch``
(requests per batch; BentoML's ``bentoml_service_adaptive_batch_size`` where only that exists)
histograms read from ``/metrics`` before and after. Images: ``--num-images`` seeded random PNGs,
``--images DIR`` files, ``--photos`` scikit-image's colour sample photos as JPEG quality 90.

Where the time goes (bench/loadstats.py): CPU ms per request of the client (this process) and of
the server's process tree (found by its port, or ``--server-pid``) per process role. With ``--raw
DIR`` two in-process yardsticks, on the artifact the server runs, measured ``--raw-seconds`` each
before the sweep and again after it and averaged (a shared VM drifts by 10-20% within minutes):

* ``raw``: the model alone on random ``--raw-batch``-crop batches; ``pct_of_raw`` = served
  images/s as a share of it;
* ``pipeline``: for the very images the run sends, decode + crop (``core.preprocess.load_crops``,
  one thread: ``decode_ms_per_image``, ``decode_cpu_ms_per_image``) and ``infer_uint8`` on
  ``--raw-batch``-crop batches of those crops (``model_ms_per_image``, ``model_cpu_ms_per_image``)::

      pipeline_images_per_s = 1000 / (decode_ms_per_image / cores + model_ms_per_image)

  with ``cores = len(os.sched_getaffinity(0))``: decoding spreads over the cores, the model already
  uses all of them. ``pct_of_pipeline`` = served images/s as a share of it, and
  ``overhead_cpu_ms_per_req`` = server CPU ms per request - (decode + model CPU ms per image):
  the host CPU the service spends outside decoding and the model (HTTP, multipart, batching).

A ``--raw`` directory that does not hold the file the server reports (``GET /model``: file and
sha256) is refused with exit 2 before any request is sent, warm-up included.

``--soak-minutes M`` (bench/soak.py) runs the first concurrency level for M minutes instead,
sampling the RSS of every server process every ``--sample-seconds``; ``--max-growth-pct P``
fails the run if a process grew more than P% after ``--settle-minutes``.

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
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from bench import soak  # noqa: E402
from bench.common import (format_table, machine_header, machine_info, percentiles, positive_ints,  # noqa: E402
                          write_results)
from bench.httpclient import Connection, encode_post  # noqa: E402
from bench.loadstats import METRICS, batch_fields, parse_histograms, raw_mismatch  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
        ".webp": "image/webp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}
# skimage.data's colour photos and the file each reads from the package's own data folder
PHOTOS = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png", "rocket": "rocket.jpg",
          "immunohistochemistry": "ihc.png", "hubble_deep_field": "hubble_deep_field.jpg", "retina": "retina.jpg"}


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


def photo_images(quality: int = 90) -> list[tuple[str, bytes, str]]:
    """scikit-image's bundled colour photos, JPEG-encoded in memory (no file written, nothing downloaded)."""
    try:
        import skimage
        import skimage.data
    except ImportError as e:
        raise LoadError(f"--photos needs scikit-image (pip install scikit-image): {e}") from None
    from PIL import Image

    data_dir = Path(getattr(skimage.data, "data_dir", ""))
    out = []
    for name, file in PHOTOS.items():
        load = getattr(skimage.data, name, None)
        if load is None or not (data_dir / file).is_file():  # only what ships with the package: never fetch
            continue
        arr = load()
        if arr.ndim != 3 or arr.shape[-1] != 3 or str(arr.dtype) != "uint8":
            continue
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=quality)
        out.append((f"{name}.jpg", buf.getvalue(), "image/jpeg"))
    if not out:
        raise LoadError(f"--photos: scikit-image {skimage.__version__} ships none of {', '.join(PHOTOS)}")
    return out


def make_images(size: int, count: int, seed: int, directory: str | None,
                photos: bool = False) -> list[tuple[str, bytes, str]]:
    """Seeded random RGB PNGs of ``size`` x ``size``, the image files of ``directory`` and the photos."""
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
    if photos:
        images += photo_images()
    if not images:
        raise LoadError("no images: give --num-images > 0, --images DIR or --photos")
    return images


# ---------------------------------------------------------------- load


async def _metrics(client, url: str) -> dict[str, dict] | None:
    try:
        r = await client.get(url + "/metrics")
        r.raise_for_status()
    except Exception as e:  # noqa: BLE001 - metrics are optional: report the level without them
        print(f"warning: GET {url}/metrics failed ({type(e).__name__}: {e}); no batch histogram",
              file=sys.stderr)
        return None
    return parse_histograms(r.text, METRICS)


async def run_level(url: str, images: list, tta: str, concurrency: int, n_requests: float,
                    max_seconds: float, timeout: float, meter=None,
                    ticker: tuple[float, Callable[[float, int, int, int], None]] | None = None) -> dict[str, Any]:
    """One concurrency level: ``concurrency`` workers until ``n_requests`` or ``max_seconds``.

    ``meter`` (a bench.loadstats.CpuMeter) is read just around the requests, /metrics reads excluded.
    ``ticker = (every_s, callback)`` calls ``callback(t_s, requests, ok, errors)`` at the start,
    every ``every_s`` seconds and at the end (soak mode's samples).
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        before = await _metrics(client, url)
        issued, ok, latencies, errors = 0, 0, [], Counter()
        if ticker is not None:
            ticker[1](0.0, 0, 0, 0)
        if meter is not None:
            meter.start()
        t0 = time.perf_counter()
        deadline = t0 + max_seconds

        encoded = [encode_post(url, "/classify", {"image": (name, data, mime)}, {"tta": tta})
                   for name, data, mime in images]

        async def worker() -> None:
            nonlocal issued, ok
            connection = Connection(url, timeout)
            try:
                while issued < n_requests and time.perf_counter() < deadline:
                    raw = encoded[issued % len(encoded)]
                    issued += 1
                    t = time.perf_counter()
                    try:
                        status, body = await connection.request(raw)
                    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                        errors[type(e).__name__] += 1  # refused/reset connections, timeouts, bad responses
                        continue
                    latency_ms = (time.perf_counter() - t) * 1e3
                    if status != 200:
                        errors[str(status)] += 1
                    elif "top1" not in json.loads(body):
                        errors["bad_body"] += 1
                    else:
                        ok += 1
                        latencies.append(latency_ms)
            finally:
                connection.close()

        async def tick(every: float, callback) -> None:
            k = 1
            while t0 + k * every < deadline - 1e-3:
                await asyncio.sleep(max(0.0, t0 + k * every - time.perf_counter()))
                callback(time.perf_counter() - t0, issued, ok, sum(errors.values()))
                k += 1

        ticking = asyncio.create_task(tick(*ticker)) if ticker is not None else None
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = meter.stop(issued, elapsed) if meter is not None else {}
        if ticking is not None:
            ticking.cancel()
            ticker[1](elapsed, issued, ok, sum(errors.values()))
        after = await _metrics(client, url)

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
    return row | batch_fields(before, after)


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics, as bench.common.percentiles does."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def _model_and_warmup(url: str, images: list, tta: str, warmup: int, timeout: float,
                            raw: str | None = None) -> dict:
    """The server's ``GET /model`` answer, then ``warmup`` untimed requests. With ``raw`` (--raw DIR)
    the directory is checked against that answer first: a mismatch raises LoadError before any
    request to /classify is sent."""
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
        model = r.json()
        problem = raw and raw_mismatch(raw, model)
        if problem:
            raise LoadError(problem)
        for i in range(warmup):  # connection set-up and first-call costs stay out of the first level
            name, data, mime = images[i % len(images)]
            await client.post(url + "/classify", files={"image": (name, data, mime)}, data={"tta": tta})
        return model


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
    p.add_argument("--photos", action="store_true", help="also send scikit-image's colour sample photos "
                   "(astronaut, coffee, ...) as JPEG quality 90")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before the first level")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "load.json"), help="results JSON")
    p.add_argument("--csv", help="also write the rows as CSV")
    p.add_argument("--png", help="throughput/p99 plot, RSS plot with --soak-minutes (default: the JSON path "
                   "with .png)")
    p.add_argument("--raw", metavar="DIR", help="artifact directory the server serves: also measure the model "
                   "and the decode+model pipeline in-process (no HTTP) and report served throughput as a share")
    p.add_argument("--raw-batch", type=int, default=40, help="crops per in-process batch for --raw "
                   "(default 40, the service's RESDEPLOY_MAX_BATCH default)")
    p.add_argument("--raw-seconds", type=float, default=5.0, help="seconds each --raw measurement runs, once "
                   "before the sweep and once after (default 5; the two are averaged)")
    p.add_argument("--server-pid", type=int, help="server process for CPU and RSS accounting (default: whoever "
                   "listens on the URL's port, with its children)")
    p.add_argument("--soak-minutes", type=float, metavar="M", help="soak: run the first --concurrency level "
                   "for M minutes (--requests and --max-seconds ignored), sampling server RSS")
    p.add_argument("--sample-seconds", type=float, metavar="S", help="soak: seconds between samples (default 15)")
    p.add_argument("--settle-minutes", type=float, metavar="M", help="soak: RSS growth counts from the first "
                   "sample after M minutes (default 5)")
    p.add_argument("--max-growth-pct", type=float, metavar="P", help="soak: exit 1 if a server process's RSS "
                   "grew more than P%% after settling")
    p.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")
    p.add_argument("--allow-errors", action="store_true", help="exit 0 even if requests failed")
    return p


def check_flags(args) -> None:
    """Raise LoadError for a bad value; fill in the soak defaults."""
    for flag, value in (("--requests", args.requests), ("--max-seconds", args.max_seconds),
                        ("--image-size", args.image_size), ("--timeout", args.timeout),
                        ("--raw-batch", args.raw_batch), ("--raw-seconds", args.raw_seconds)):
        if value <= 0:
            raise LoadError(f"bad {flag} {value}: must be > 0")
    if args.num_images < 0 or args.warmup < 0:
        raise LoadError("--num-images and --warmup must be >= 0")
    if args.raw and not (Path(args.raw) / "manifest.json").is_file():
        raise LoadError(f"--raw {args.raw}: no manifest.json there; pass the artifact directory the "
                        "server was started with (RESDEPLOY_ARTIFACTS)")
    try:
        soak.check_flags(args)
    except ValueError as e:
        raise LoadError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = check_url(args.url, args.allow_remote)
        levels = parse_levels(args.concurrency)
        check_flags(args)
        images = make_images(args.image_size, args.num_images, args.seed, args.images, args.photos)
        model = asyncio.run(_model_and_warmup(url, images, args.tta, args.warmup, args.timeout, args.raw))
    except LoadError as e:
        print(f"load.py: error: {e}", file=sys.stderr)
        return e.exit_code

    from bench.loadstats import CpuMeter, apply_yardsticks, combine, in_process, yardstick_lines

    def measure_in_process() -> tuple[dict, dict]:
        return in_process(args.raw, model["precision"], args.raw_batch, args.tta,
                          [data for _, data, _ in images], model["sha256"], args.raw_seconds)

    runs = []
    if args.raw:  # before the sweep and again after it, averaged: the machine drifts while we measure
        try:
            runs.append(measure_in_process())
        except Exception as e:  # noqa: BLE001 - ResdeployError, a backend failure or another file: one line
            print(f"load.py: error: --raw {args.raw}: {' '.join(str(e).split())}", file=sys.stderr)
            return 2

    meter = CpuMeter(urlsplit(url).port, args.server_pid)
    if not meter.procs:
        if args.soak_minutes:
            print("load.py: error: --soak-minutes needs the server's processes for RSS and none were found "
                  f"listening on port {urlsplit(url).port}; pass --server-pid", file=sys.stderr)
            return 1
        print("load.py: server CPU not measured (process not found; pass --server-pid)", file=sys.stderr)
    sampler = None
    if args.soak_minutes:
        sampler = soak.RssSampler(meter.procs, meter.roles, lambda s: print(soak.progress_line(s), file=sys.stderr))
        levels = levels[:1]
    rows = []
    for c in levels:
        n, seconds = (math.inf, 60 * args.soak_minutes) if sampler else (args.requests, args.max_seconds)
        ticker = (args.sample_seconds, sampler) if sampler else None
        rows.append(asyncio.run(run_level(url, images, args.tta, c, n, seconds, args.timeout, meter, ticker)))
        r = rows[-1]
        print(f"concurrency {c}: {r['ok']}/{r['requests']} ok in {r['elapsed_s']:.1f} s", file=sys.stderr)

    model_info = {k: model.get(k) for k in ("arch", "backend", "precision", "file", "sha256", "num_classes")}
    raw = pipeline = None
    if args.raw:
        try:
            runs.append(measure_in_process())
        except Exception as e:  # noqa: BLE001
            print(f"load.py: error: --raw {args.raw}: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raw, pipeline = combine(runs)
        apply_yardsticks(rows, raw, pipeline)
    machine = machine_info()
    meta = {"url": url, "model": model_info, "tta": args.tta, "concurrency": levels,
            "requests_per_level": None if sampler else args.requests,
            "max_seconds": 60 * args.soak_minutes if sampler else args.max_seconds,
            "image_size": args.image_size, "num_images": args.num_images, "images_dir": args.images,
            "photos": [name for name, _, _ in images if name[:-4] in PHOTOS] if args.photos else [],
            "images": len(images), "image_bytes": sum(len(d) for _, d, _ in images), "seed": args.seed,
            "warmup": args.warmup, "timeout_s": args.timeout,
            "note": "machine is the client's; batch histograms are server-wide deltas per level",
            "raw": raw, "pipeline": pipeline, "server_pids": meter.server_pids,
            "server_roles": {str(pid): name for pid, name in meter.roles.items()},
            "soak_minutes": args.soak_minutes, "sample_seconds": args.sample_seconds,
            "settle_minutes": args.settle_minutes, "max_growth_pct": args.max_growth_pct}
    json_path = Path(args.json)
    png_path = Path(args.png) if args.png else json_path.with_suffix(".png")
    write_results(rows, json_path, args.csv, meta=meta, machine=machine)
    title = (f"{model_info['arch']} {model_info['precision']} {model_info['backend']}, tta={args.tta}\n"
             f"{machine.get('cpu_model')}")
    if sampler:
        soak_lines, grown = soak.finish(sampler.samples, json_path, png_path, f"soak, {levels[0]} clients: " + title,
                                        60 * args.settle_minutes, args.max_growth_pct)
    else:
        plot(rows, png_path, title)

    table = [r | {"errors": _errors_cell(r["errors"])} for r in rows]
    print(machine_header(machine))
    print(f"Model: {model_info['arch']} {model_info['precision']} on {model_info['backend']} "
          f"({model_info['file']}, sha256 {str(model_info['sha256'])[:12]}) at {url}, tta={args.tta}, "
          f"{len(images)} images")
    print(format_table(table, [("concurrency", "clients"), "requests", "ok", "errors",
                               ("requests_per_s", "req/s"), ("images_per_s", "img/s"), ("p50_ms", "p50 ms"),
                               ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), "batches",
                               ("mean_crops_per_batch", "crops/batch"), ("mean_calls_per_batch", "calls/batch"),
                               ("client_cpu_ms_per_req", "client CPU ms"), ("server_cpu_ms_per_req", "server CPU ms"),
                               ("overhead_cpu_ms_per_req", "overhead CPU ms"), ("pct_of_raw", "% of raw"),
                               ("pct_of_pipeline", "% of pipeline")]))
    for r in rows:
        parts = r.get("server_cpu_ms_per_req_by_process") or {}
        if parts:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v >= 0.005)
            print(f"CPU ms per request, {r['concurrency']} clients: client {r['client_cpu_ms_per_req']:.2f}, {shown}")
    for line in yardstick_lines(raw, pipeline) if raw else []:
        print(line)
    for line in soak_lines if sampler else []:
        print(line)
    print(f"wrote {json_path} and {png_path}" + (f" and {args.csv}" if args.csv else ""))
    status = 0
    failed = sum(r["requests"] - r["ok"] for r in rows)
    if failed and not args.allow_errors:
        print(f"load.py: error: {failed} request(s) failed (see errors); pass --allow-errors to accept",
              file=sys.stderr)
        status = 1
    if sampler and grown:
        print(f"load.py: error: RSS grew more than --max-growth-pct {args.max_growth_pct:g} after settling: "
              + "; ".join(grown), file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
