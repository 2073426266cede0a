"""Latency of every backend and precision against PyTorch eager FP32, measured in one process.

    python bench/latency.py                      # ResNet-50 at 224, random weights, batch 1/10/32
    python bench/latency.py --quick              # ResNet-20 at 32, batch 1/10: a smoke run
    python bench/latency.py --artifacts artifacts/digits --batch-sizes 1,10

Rows (``--backends``, default every one this machine can run):

* ``torch``: eager FP32 on the CPU, the reference of ``speedup_vs_torch``;
* ``torch-cl``: the same network in channels_last memory format;
* ``ort-fp32`` / ``ort-int8-cpu``: ONNX Runtime (CUDA provider if this build has one, else CPU)
  on the BN-folded FP32 file and on the U8S8 INT8 file made for ORT's x86 kernels;
* ``torch-cuda`` (FP32, PyTorch's default cuDNN TF32 setting), ``torch-cuda-fp16``, ``trt-fp16``,
  ``trt-int8``: only where CUDA / TensorRT are usable; host<->device copies are inside the timing;
  elsewhere they are skipped with the reason printed, never replaced by something else.

Without ``--artifacts`` the network has random weights (He init, BN statistics refreshed on random
batches so activations are normalised) and the ONNX files are made in a temporary directory with
the project's own export code; INT8 is calibrated with MinMax on 16 random images, which is fast
and does not change latency (it changes only the scale constants). Every cell runs 3 warm-up
iterations, then timed ones until ``--budget-s`` has passed (at least 3). The numbers describe
this machine only: the header names its CPU, threads and library versions.

Each row also carries the multiply-accumulates it did per second (``gmac_per_s``) and, on the CPU,
that rate as a share of ONNX Runtime's own GEMM rate on this CPU (``pct_of_gemm``, bench/ceiling.py),
and the run prints the largest speed-up over eager such kernels could give: a row near 100 % has
nothing left to gain from the artifact. ``--no-ceiling`` skips that 2-second measurement.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs as `python bench/latency.py` from anywhere

import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import (format_table, machine_header, machine_info, percentiles, positive_ints,  # noqa: E402
                          run_reporting_errors, write_results)
from core.backend import Backend  # noqa: E402
from core.errors import ArtifactError, ConfigError  # noqa: E402
from core.flavours import FP16, FP32, INT8, INT8_CPU, ONNXRUNTIME, PYTORCH, TENSORRT, Flavour  # noqa: E402
from core.manifest import Manifest  # noqa: E402
from core.timing import MIN_ITERS, WARMUP, time_calls  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402

PROG = "bench/latency.py"


@dataclass(frozen=True)
class Row:
    """One kind of row of the table: a runtime running one flavour (its ``precision`` column).

    Attributes:
        name: the ``--backends`` name.
        runtime: ``core.flavours.PYTORCH`` | ``ONNXRUNTIME`` | ``TENSORRT``.
        flavour: what it computes in.
        gpu_only: runs only where CUDA (PyTorch rows) or TensorRT is usable; PyTorch rows run on CUDA.
        channels_last: PyTorch rows: weights and input in channels_last memory format.
    """

    name: str
    runtime: str
    flavour: Flavour
    gpu_only: bool = False
    channels_last: bool = False


ROWS = {row.name: row for row in (
    Row("torch", PYTORCH, FP32),
    Row("torch-cl", PYTORCH, FP32, channels_last=True),
    Row("ort-" + FP32.name, ONNXRUNTIME, FP32),
    Row("ort-" + INT8_CPU.name, ONNXRUNTIME, INT8_CPU),
    Row("torch-cuda", PYTORCH, FP32, gpu_only=True),
    Row("torch-cuda-" + FP16.name, PYTORCH, FP16, gpu_only=True),
    Row("trt-" + FP16.name, TENSORRT, FP16, gpu_only=True),
    Row("trt-" + INT8.name, TENSORRT, INT8, gpu_only=True),
)}
BACKENDS = tuple(ROWS)
TORCH_BACKENDS = tuple(name for name, row in ROWS.items() if row.runtime == PYTORCH)
# 2 s per cell keeps the default run (ResNet-50, 4 CPU backends x 3 batches, plus export and
# quantisation) under 5 minutes on 2 cores; batch 32 cells are ~6 iterations anyway.
DEFAULT_BUDGET_S = 2.0
QUICK = {"arch": "resnet20", "batch_sizes": [1, 10], "budget_s": 0.3}
DEFAULT_JSON = os.path.join("bench", "results", "latency.json")
COLUMNS = [("backend", "backend"), ("precision", "precision"), ("batch_size", "batch"),
           ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
           ("images_per_s", "images/s"), ("speedup_vs_torch", "vs torch"), ("gmac_per_s", "GMAC/s"),
           ("pct_of_gemm", "% GEMM")]
CALIB_IMAGES = 16


@dataclass
class LatencyConfig:
    """The validated flags of one run (:func:`resolve`).

    Attributes:
        backends: the requested rows, in ``--backends`` order; ``explicit_backends`` when the user
            named them (a row that cannot run is then reported, not left out quietly).
        artifacts, manifest: the export directory and its manifest, or ``None`` for a random network.
        ceiling: measure this CPU's GEMM rate (bench/ceiling.py).
    """

    arch: str
    input_size: int
    batch_sizes: list[int]
    backends: list[str]
    explicit_backends: bool
    threads: int
    budget_s: float
    quick: bool
    ceiling: bool
    json: Path
    csv: Path
    png: Path
    artifacts: str | None = None
    manifest: Manifest | None = None


# --------------------------------------------------------------------------- networks and artifacts

def random_model(arch: str, input_size: int, seed: int = 0):
    """He-initialised ``arch`` with BN statistics refreshed on random batches, in eval mode.

    A fresh net's BN statistics are mean 0 / var 1, which leaves activations unnormalised
    (tests/test_export.py does the same before checking fold parity).
    """
    import torch

    from training.resnet import build_model

    torch.manual_seed(seed)
    model = build_model(arch)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the refresh batches
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, input_size, input_size))
    return model.eval()


class Sources:
    """Where each backend's model comes from: a torch module, ONNX files, engines (or why not)."""

    def __init__(self):
        self.model = None  # unfolded torch network, or None
        self.onnx: dict[str, Path] = {}  # precision -> file
        self.engines: dict[str, tuple[Path, dict]] = {}  # precision -> (plan, stamp)
        self.missing: dict[str, str] = {}  # backend -> reason
        self.notes: list[str] = []


def make_random_sources(arch: str, size: int, backends: list[str], batch_sizes: list[int], work: Path,
                        trt_ok: bool) -> Sources:
    """Random-weight network and its ONNX files / engines, made with the project's export code."""
    from export.fold import fold_batchnorm
    from export.onnx_export import export_fp32

    src = Sources()
    start = time.perf_counter()
    src.model = random_model(arch, size)
    src.notes.append(f"{arch} at {size}x{size} with random weights (BN statistics refreshed on random batches)")
    file_rows = [ROWS[name] for name in backends if ROWS[name].runtime != PYTORCH]
    if file_rows:
        src.onnx[FP32.name] = export_fp32(fold_batchnorm(src.model), work / FP32.onnx_file, size)
    wanted = list(dict.fromkeys(row.flavour for row in file_rows if row.runtime == ONNXRUNTIME or trt_ok))
    int8_flavours = [flavour for flavour in wanted if flavour.is_int8]
    if int8_flavours:
        from export.quantize import quantize_int8

        calib = np.random.default_rng(0).standard_normal((CALIB_IMAGES, 3, size, size)).astype(np.float32)
        for flavour in int8_flavours:
            src.onnx[flavour.name] = work / flavour.onnx_file
            quantize_int8(src.onnx[FP32.name], src.onnx[flavour.name], flavour.name, calib, "minmax")
        src.notes.append(f"INT8 calibrated with minmax on {CALIB_IMAGES} random normal images (fast; "
                         "latency does not depend on calibration quality)")
    if FP16 in wanted:
        from export.quantize import convert_fp16

        src.onnx[FP16.name] = convert_fp16(src.onnx[FP32.name], work / FP16.onnx_file)
    if trt_ok:
        build_engines(src, backends, size, max(batch_sizes), work)
    src.notes.append(f"model and artifacts prepared in {time.perf_counter() - start:.1f} s")
    return src


def this_host() -> tuple[str, str, str]:
    """(TensorRT version, GPU name, compute capability) of this host: what an engine's stamp must match."""
    import tensorrt

    from backends.tensorrt import gpu_info

    return (tensorrt.__version__, *gpu_info(0))


def build_engine_file(onnx_path: Path, precision: str, size: int, max_batch: int, work: Path) -> tuple[Path, dict]:
    """``(plan, stamp)`` of the ``precision`` TensorRT engine built from ``onnx_path`` into ``work``
    (its timing cache kept there for the next engine)."""
    from export.tensorrt import TIMING_CACHE, build_engine, engine_file_name

    plan = work / engine_file_name(precision)
    stamp = build_engine(onnx_path, plan, precision=precision, input_size=size, max_batch=max_batch,
                         timing_cache=work / TIMING_CACHE)
    return plan, stamp


def usable_engine(directory: Path, manifest: Manifest, precision: str, host: tuple[str, str, str],
                  log=print) -> tuple[Path, dict] | None:
    """``(plan, stamp)`` of the directory's ``precision`` engine (sha256-checked) when its stamp fits
    ``host`` (:func:`this_host`); else ``None``, and ``log`` says why when the directory has one."""
    from backends.tensorrt import check_engine_stamp
    from core.manifest import verify_file

    if not manifest.has(precision, "engine"):
        return None
    entry = manifest.find(precision, "engine")
    try:
        check_engine_stamp(entry.stamp, *host)
    except ArtifactError as e:
        log(f"{precision}: not using the directory's engine: {e}")
        return None
    return verify_file(directory, entry), entry.stamp


def build_engines(src: Sources, backends: list[str], size: int, max_batch: int, work: Path) -> None:
    """An engine for every TensorRT row that has none yet, from its ONNX file."""
    for row in (ROWS[name] for name in backends if ROWS[name].runtime == TENSORRT):
        precision = row.flavour.name
        if precision in src.engines:
            continue
        if precision not in src.onnx:
            src.missing[row.name] = f"no {precision} ONNX file to build a TensorRT engine from"
            continue
        src.engines[precision] = build_engine_file(src.onnx[precision], precision, size, max_batch, work)


def make_artifact_sources(directory: Path, manifest: Manifest, backends: list[str], batch_sizes: list[int],
                          work: Path, trt_ok: bool) -> Sources:
    """The files of a real export directory, each sha256-checked against its manifest entry."""
    from backends.pytorch import load_weights
    from core.manifest import verify_file

    src = Sources()
    wanted = [ROWS[name] for name in backends]
    if any(row.runtime == PYTORCH for row in wanted):
        if manifest.has(FP32.name, PYTORCH):
            src.model = load_weights(verify_file(directory, manifest.find(FP32.name, PYTORCH)))
        else:
            for name in TORCH_BACKENDS:
                src.missing[name] = (f"{directory} has no model.pt entry in its manifest; re-export with "
                                     "`resdeploy export` to get the PyTorch reference")
    host = this_host() if trt_ok and any(row.runtime == TENSORRT for row in wanted) else None
    for row in (row for row in wanted if row.runtime != PYTORCH):
        precision = row.flavour.name
        if manifest.has(precision):
            src.onnx[precision] = verify_file(directory, manifest.find(precision))
        elif row.runtime == ONNXRUNTIME:
            src.missing[row.name] = f"{directory} has no {precision} ONNX file; export it with --precisions {precision}"
        if row.runtime == TENSORRT and host is not None and precision not in src.engines:
            engine = usable_engine(directory, manifest, precision, host, log=src.notes.append)
            if engine is not None:
                src.engines[precision] = engine
    if host is not None:
        without_engine = [row.name for row in wanted
                          if row.runtime == TENSORRT and row.flavour.name not in src.engines]
        if without_engine:
            src.notes.append("TensorRT engines missing from the directory (or built for another host) were "
                             "built in a temp dir")
            build_engines(src, without_engine, manifest.crop, max(batch_sizes), work)
    src.notes.append(f"artifacts from {directory} ({manifest.arch}, sha256-verified)")
    return src


def make_backend(name: str, src: Sources, size: int, threads: int) -> Backend:
    """The Backend that runs one row, or raise ``LookupError(reason)`` when it cannot run here."""
    if name in src.missing:
        raise LookupError(src.missing[name])
    row = ROWS[name]
    precision = row.flavour.name
    if row.runtime == PYTORCH:
        from backends.pytorch import TorchBackend

        if src.model is None:
            raise LookupError("no PyTorch network")
        return TorchBackend.from_module(src.model, size, device="cuda" if row.gpu_only else "cpu",
                                        half=row.flavour is FP16, channels_last=row.channels_last)
    if row.runtime == ONNXRUNTIME:
        from backends.onnxruntime import OnnxRuntimeBackend, available_providers

        return OnnxRuntimeBackend(src.onnx[precision], precision, providers=available_providers(prefer_gpu=True),
                                  threads=threads)
    from backends.tensorrt import TensorRTBackend

    if precision not in src.engines:
        raise LookupError(f"no {precision} TensorRT engine")
    plan, stamp = src.engines[precision]
    return TensorRTBackend(plan, precision, stamp)


# --------------------------------------------------------------------------- timing

def run_rows(backends: list[str], src: Sources, size: int, batch_sizes: list[int], threads: int,
             budget_s: float, skipped: dict[str, str], log=print) -> list[dict]:
    """Time every backend at every batch size (:func:`core.timing.time_calls`), one row each."""
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal((n, 3, size, size)).astype(np.float32) for n in batch_sizes}
    rows: list[dict] = []
    for name in backends:
        try:
            backend = make_backend(name, src, size, threads)
        except LookupError as e:
            skipped[name] = str(e.args[0])
            log(f"skip {name}: {skipped[name]}")
            continue
        with backend:
            device = getattr(backend, "active_providers", None) or [getattr(backend, "device", "cuda")]
            for batch_size in batch_sizes:
                ms = time_calls(partial(backend.infer, inputs[batch_size]), budget_s)
                stats = percentiles(ms)
                rows.append({"backend": name, "precision": ROWS[name].flavour.name, "batch_size": batch_size,
                             **stats, "images_per_s": batch_size * 1000.0 / stats["p50_ms"],
                             "speedup_vs_torch": None, "iterations": len(ms),
                             "device": ",".join(map(str, device))})
                log(f"  {name:<16} batch {batch_size:>3}: p50 {stats['p50_ms']:.2f} ms ({len(ms)} iterations)")
    torch_p50 = {row["batch_size"]: row["p50_ms"] for row in rows if row["backend"] == "torch"}
    for row in rows:
        if row["batch_size"] in torch_p50:
            row["speedup_vs_torch"] = torch_p50[row["batch_size"]] / row["p50_ms"]
    return rows


# --------------------------------------------------------------------------- ceiling

def model_macs(config: LatencyConfig) -> int:
    """Multiply-accumulates of one image through the benched network (counted on the meta device)."""
    import torch

    from training.flops import count_macs
    from training.resnet import build_model

    manifest = config.manifest
    with torch.device("meta"):
        model = build_model(config.arch, num_classes=manifest.num_classes if manifest else None,
                            shortcut=manifest.shortcut if manifest else None)
    return count_macs(model, config.input_size)


def ceiling_lines(rows: list[dict], macs: int, ceiling: dict | None, config: LatencyConfig) -> dict:
    """Print what kernels at this CPU's GEMM rate could give over eager; return it per batch size."""
    if not ceiling:
        return {}
    from bench.ceiling import best_possible

    print(f"\nCeiling: ONNX Runtime's own GEMM on this CPU ({config.threads} threads) runs "
          f"{ceiling['fp32_gmac_per_s']:.1f} GMAC/s fp32 and {ceiling['int8_gmac_per_s']:.1f} GMAC/s int8 (u8 x s8); "
          f"{config.arch} is {macs / 1e9:.3g} GMAC per image.")
    out = {}
    for row in rows:
        if row["backend"] == "torch":
            best = best_possible(row["p50_ms"], macs, row["batch_size"], ceiling)
            out[str(row["batch_size"])] = {k: round(v, 2) for k, v in best.items()}
            print(f"  batch {row['batch_size']}: kernels at that rate would be at most {best['fp32']:.2f}x (fp32) and "
                  f"{best['int8']:.2f}x (int8) faster than torch eager's {row['p50_ms']:.1f} ms")
    return out


# --------------------------------------------------------------------------- plot

def write_png(rows: list[dict], path: Path, title: str) -> Path:
    """p50 latency against batch size, one line per backend, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(row["backend"] for row in rows):
        points = sorted((row["batch_size"], row["p50_ms"]) for row in rows if row["backend"] == name)
        ax.plot([batch for batch, _ in points], [ms for _, ms in points], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xticks(sorted({row["batch_size"] for row in rows}))
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency (ms, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI

def _batch_sizes(text: str) -> list[int]:
    values = positive_ints(text)
    if values is None:
        raise ConfigError(f"--batch-sizes {text!r}: give positive integers separated by commas, e.g. 1,10,32")
    return sorted(set(values))


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", metavar="DIR", help="bench a real export directory instead of a random network")
    parser.add_argument("--arch", help="architecture (default resnet50; resnet20 with --quick); from the manifest "
                        "with --artifacts")
    parser.add_argument("--input-size", type=int, help="input side (default: 224 for ImageNet archs, 32 for CIFAR)")
    parser.add_argument("--batch-sizes", help="comma list (default 1,10,32; 1,10 with --quick)")
    parser.add_argument("--backends", help=f"comma list of {', '.join(BACKENDS)} (default: every one usable here)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads and ORT intra-op threads (default 2)")
    parser.add_argument("--budget-s", type=float,
                        help=f"timed seconds per backend x batch (default {DEFAULT_BUDGET_S}; "
                        f"{QUICK['budget_s']} with --quick); at least {MIN_ITERS} iterations")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--csv", help="CSV rows (default: next to --json)")
    parser.add_argument("--png", help="latency vs batch size plot (default: next to --json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet20 at 32, batch 1,10, 0.3 s per cell")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip measuring this CPU's GEMM rate (bench/ceiling.py)")
    return parser


def resolve(args) -> LatencyConfig:
    """Validated configuration; raises ConfigError naming the bad flag."""
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be >= 1")
    budget = args.budget_s if args.budget_s is not None else (QUICK["budget_s"] if args.quick else DEFAULT_BUDGET_S)
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--budget-s {budget}: must be a positive number of seconds")
    batch_sizes = (_batch_sizes(args.batch_sizes) if args.batch_sizes is not None
                   else QUICK["batch_sizes"] if args.quick else [1, 10, 32])
    if args.backends is not None:
        names = [name.strip() for name in args.backends.split(",") if name.strip()]
        unknown = [name for name in names if name not in BACKENDS]
        if unknown or not names:
            what = f"unknown {', '.join(unknown)}" if unknown else "no backend named"
            raise ConfigError(f"--backends {args.backends!r}: {what}; choose from {', '.join(BACKENDS)}")
        backends = list(dict.fromkeys(names))
    else:
        backends = list(BACKENDS)
    if args.input_size is not None and args.input_size < 8:
        raise ConfigError(f"--input-size {args.input_size}: must be >= 8")
    from training.resnet import ARCHS, canonical_arch  # after the cheap checks: it imports torch

    manifest = None
    if args.artifacts:
        from core.manifest import read_manifest

        manifest = read_manifest(args.artifacts)
        if args.arch is not None and canonical_arch(args.arch) != canonical_arch(manifest.arch):
            raise ConfigError(f"--arch {args.arch} conflicts with {args.artifacts} ({manifest.arch}); drop --arch")
        if args.input_size is not None and args.input_size != manifest.crop:
            raise ConfigError(f"--input-size {args.input_size} conflicts with {args.artifacts} "
                              f"(crop {manifest.crop}); drop --input-size")
        arch, input_size = manifest.arch, manifest.crop
    else:
        arch = canonical_arch(args.arch or (QUICK["arch"] if args.quick else "resnet50"))
        input_size = args.input_size or ARCHS[arch].native_input_size
    out = Path(args.json)
    return LatencyConfig(arch=arch, input_size=input_size, batch_sizes=batch_sizes, backends=backends,
                         explicit_backends=args.backends is not None, threads=args.threads, budget_s=budget,
                         quick=args.quick, ceiling=not args.no_ceiling, json=out,
                         csv=Path(args.csv) if args.csv else out.with_suffix(".csv"),
                         png=Path(args.png) if args.png else out.with_suffix(".png"),
                         artifacts=args.artifacts, manifest=manifest)


def main(argv: list[str] | None = None) -> int:
    """Bench every backend; print the table, write JSON, CSV and PNG. Returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors(PROG, lambda: _run(resolve(args)))


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _runnable(config: LatencyConfig, cuda_ok: bool, trt_ok: bool, trt_reason: str,
              skipped: dict[str, str]) -> list[str]:
    """The requested rows this host can run; why the others cannot goes into ``skipped``."""
    runnable = []
    for name in config.backends:
        row = ROWS[name]
        why = (None if not row.gpu_only else
               "torch.cuda.is_available() is False" if row.runtime == PYTORCH and not cuda_ok else
               trt_reason if row.runtime == TENSORRT and not trt_ok else None)
        if why is None:
            runnable.append(name)
            continue
        skipped[name] = why  # default list: GPU rows are left out quietly on CPU hosts, but recorded
        if config.explicit_backends:
            print(f"skip {name}: {why}")
    if not config.explicit_backends and skipped:
        why = "no CUDA GPU" if not cuda_ok else "TensorRT not usable"
        print(f"left out ({why}; reasons in the JSON meta): {', '.join(skipped)}")
    return runnable


def _run(config: LatencyConfig) -> int:
    import torch

    from backends.tensorrt import tensorrt_status

    torch.set_num_threads(config.threads)
    skipped: dict[str, str] = {}
    cuda_ok = torch.cuda.is_available()
    trt_ok, trt_reason = tensorrt_status(inference=True)
    backends = _runnable(config, cuda_ok, trt_ok, trt_reason, skipped)

    info = machine_info()
    load_before = _load_average()
    if load_before is not None and load_before >= 1.0:
        # Measured here: with load ~7 on 2 cores, torch's OpenMP barriers made ResNet-20 batch 1
        # 100x slower at 2 threads than at 1; the numbers then describe the contention, not the model.
        print(f"warning: load average {load_before:.1f} before the run: other processes compete for the "
              f"{info['cpu_cores']} cores, so latencies (torch's OpenMP threads especially) will be inflated")
    with tempfile.TemporaryDirectory(prefix="resdeploy-latency-") as tmp:
        if config.artifacts:
            src = make_artifact_sources(Path(config.artifacts), config.manifest, backends, config.batch_sizes,
                                        Path(tmp), trt_ok)
        else:
            print(f"preparing {config.arch} at {config.input_size}x{config.input_size} (random weights) ...",
                  flush=True)
            src = make_random_sources(config.arch, config.input_size, backends, config.batch_sizes, Path(tmp),
                                      trt_ok)
        for note in src.notes:
            print(note)
        rows = run_rows(backends, src, config.input_size, config.batch_sizes, config.threads, config.budget_s,
                        skipped)
    if "torch" not in {row["backend"] for row in rows}:
        print("no torch row: speedup_vs_torch is left empty")
    macs = model_macs(config)
    ceiling = None
    if config.ceiling and any(not ROWS[row["backend"]].gpu_only for row in rows):
        from bench.ceiling import measure

        try:
            ceiling = measure(config.threads, quick=config.quick)
        except Exception as e:  # noqa: BLE001 - a reference measurement must not lose the rows
            print(f"ceiling not measured ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}); "
                  "rows are written without pct_of_gemm")
    from bench.ceiling import annotate

    annotate(rows, macs, ceiling)

    header = machine_header(info, config.threads)
    title = f"{config.arch} {config.input_size}x{config.input_size}, {config.threads} threads"
    print()
    print(f"Latency, {title}; numbers are from this machine only:")
    print(header)
    print(format_table(rows, COLUMNS))
    best = ceiling_lines(rows, macs, ceiling, config)
    meta = {"arch": config.arch, "input_size": config.input_size, "batch_sizes": config.batch_sizes,
            "backends": config.backends, "threads": config.threads, "budget_s": config.budget_s,
            "warmup_iterations": WARMUP, "min_iterations": MIN_ITERS, "quick": config.quick,
            "artifacts": config.artifacts, "weights": "artifacts" if config.artifacts else "random",
            "calibration": None if config.artifacts else f"minmax, {CALIB_IMAGES} random normal images",
            "notes": src.notes, "skipped": skipped, "tensorrt": trt_reason,
            "speedup_reference": "torch eager fp32 p50 at the same batch size, same process",
            "cudnn_tf32": torch.backends.cudnn.allow_tf32 if cuda_ok else None,
            "load_average_1m": {"before": load_before, "after": _load_average()},
            "macs_per_image": macs, "gemm_ceiling": ceiling, "best_possible_speedup": best}
    write_results(rows, config.json, config.csv, meta, machine=info)
    written = [config.json, config.csv]
    if rows:
        written.append(write_png(rows, config.png, f"{title} | {info['cpu_model']}"))
    print(f"\nwrote {', '.join(map(str, written))}")
    if not rows:
        print(f"{PROG}: nothing was measured: every requested backend was skipped (reasons above)",
              file=sys.stderr)
        return 1
    print("next: python bench/accuracy.py ARTIFACT_DIR  (accuracy of the same backends)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
