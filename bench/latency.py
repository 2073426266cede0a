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
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import format_table, machine_header, machine_info, percentiles, write_results  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402
from resdeploy.errors import ConfigError, ResdeployError  # noqa: E402
from serving.backends.base import Backend  # noqa: E402

PROG = "bench/latency.py"
CPU_BACKENDS = ("torch", "torch-cl", "ort-fp32", "ort-int8-cpu")
GPU_BACKENDS = ("torch-cuda", "torch-cuda-fp16", "trt-fp16", "trt-int8")
BACKENDS = CPU_BACKENDS + GPU_BACKENDS
PRECISION = {"torch": "fp32", "torch-cl": "fp32", "ort-fp32": "fp32", "ort-int8-cpu": "int8-cpu",
             "torch-cuda": "fp32", "torch-cuda-fp16": "fp16", "trt-fp16": "fp16", "trt-int8": "int8"}
TORCH_BACKENDS = ("torch", "torch-cl", "torch-cuda", "torch-cuda-fp16")
WARMUP = 3
MIN_ITERS = 3
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


# --------------------------------------------------------------------------- torch backends

class ModuleBackend(Backend):
    """A torch ``nn.Module`` behind the Backend interface (eager, CPU or CUDA, fp32 or fp16).

    Args:
        model: the unfolded network in eval mode.
        input_size: spatial side of the input.
        device: ``"cpu"`` or ``"cuda"``.
        half: run in float16 (CUDA only: CPU fp16 convolutions are a slow fallback).
        channels_last: convert weights and input to channels_last memory format.
    """

    name = "pytorch"

    def __init__(self, model, input_size: int, device: str = "cpu", half: bool = False,
                 channels_last: bool = False):
        self.source, self.device, self.half, self.channels_last = model, device, half, channels_last
        self.model = None
        super().__init__("fp16" if half else "fp32", (None, 3, input_size, input_size))

    def _activate(self) -> None:
        import copy

        import torch

        model = copy.deepcopy(self.source).eval().to(self.device)
        if self.half:
            model = model.half()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self.half:
                x = x.half()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu().numpy()  # .cpu() synchronises CUDA

    def _deactivate(self) -> None:
        self.model = None

    def describe(self) -> dict:
        return super().describe() | {"device": self.device, "channels_last": self.channels_last}


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
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the refresh batches
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, input_size, input_size))
    return model.eval()


def load_weights(path: Path):
    """The unfolded network of an artifact directory's ``model.pt`` (TorchBackend's format)."""
    import torch

    from resdeploy.errors import BackendError
    from training.resnet import build_model
    from training.torch_backend import WEIGHTS_FORMAT

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
        raise BackendError(f"{path} is not a {WEIGHTS_FORMAT} file; re-export the artifacts")
    model = build_model(obj["arch"], num_classes=obj["num_classes"], shortcut=obj["shortcut"])
    model.load_state_dict(obj["model"], strict=True)
    return model.eval()


# --------------------------------------------------------------------------- artifacts

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
    t0 = time.perf_counter()
    src.model = random_model(arch, size)
    src.notes.append(f"{arch} at {size}x{size} with random weights (BN statistics refreshed on random batches)")
    wants_onnx = [b for b in backends if b.startswith(("ort-", "trt-"))]
    if wants_onnx:
        src.onnx["fp32"] = export_fp32(fold_batchnorm(src.model), work / "model.fp32.onnx", size)
    calib = np.random.default_rng(0).standard_normal((CALIB_IMAGES, 3, size, size)).astype(np.float32)
    flavours = (["int8-cpu"] if "ort-int8-cpu" in backends else []) + (["int8"] if "trt-int8" in backends and trt_ok else [])
    for flavour in flavours:
        from export.quantize import quantize_int8

        quantize_int8(src.onnx["fp32"], work / f"model.{flavour}.onnx", flavour, calib, "minmax")
        src.onnx[flavour] = work / f"model.{flavour}.onnx"
    if flavours:
        src.notes.append(f"INT8 calibrated with minmax on {CALIB_IMAGES} random normal images (fast; "
                         "latency does not depend on calibration quality)")
    if "trt-fp16" in backends and trt_ok:
        from export.quantize import convert_fp16

        src.onnx["fp16"] = convert_fp16(src.onnx["fp32"], work / "model.fp16.onnx")
    if trt_ok:
        build_engines(src, backends, size, max(batch_sizes), work)
    src.notes.append(f"model and artifacts prepared in {time.perf_counter() - t0:.1f} s")
    return src


def build_engines(src: Sources, backends: list[str], size: int, max_batch: int, work: Path) -> None:
    from export.tensorrt import build_engine, engine_file_name

    for b in (b for b in backends if b.startswith("trt-") and PRECISION[b] not in src.engines):
        p = PRECISION[b]
        if p not in src.onnx:
            src.missing[b] = f"no {p} ONNX file to build a TensorRT engine from"
            continue
        plan = work / engine_file_name(p)
        stamp = build_engine(src.onnx[p], plan, precision=p, input_size=size, max_batch=max_batch,
                             timing_cache=work / "timing.cache")
        src.engines[p] = (plan, stamp)


def make_artifact_sources(directory: Path, manifest: dict, backends: list[str], batch_sizes: list[int],
                          work: Path, trt_ok: bool) -> Sources:
    """The files of a real export directory, each sha256-checked against its manifest entry."""
    from serving.artifacts import verify_file

    src = Sources()
    entries = {(a.get("kind", "onnx"), a["precision"]): a for a in manifest["artifacts"]}
    if set(TORCH_BACKENDS) & set(backends):
        ref = entries.get(("pytorch", "fp32"))
        if ref is not None:
            src.model = load_weights(verify_file(directory, ref))
        else:
            for b in TORCH_BACKENDS:
                src.missing[b] = (f"{directory} has no model.pt entry in its manifest; re-export with "
                                  "`resdeploy export` to get the PyTorch reference")
    for b in backends:
        if b.startswith("ort-") or b.startswith("trt-"):
            p = PRECISION[b]
            entry = entries.get(("onnx", p))
            if entry is not None:
                src.onnx[p] = verify_file(directory, entry)
            elif b.startswith("ort-"):
                src.missing[b] = f"{directory} has no {p} ONNX file; export it with --precisions {p}"
        if b.startswith("trt-") and trt_ok and ("engine", PRECISION[b]) in entries:
            e = entries[("engine", PRECISION[b])]
            src.engines[PRECISION[b]] = (verify_file(directory, e), e)
    if trt_ok:
        missing_engines = [b for b in backends if b.startswith("trt-") and PRECISION[b] not in src.engines]
        if missing_engines:
            src.notes.append("TensorRT engines missing from the directory were built in a temp dir")
            build_engines(src, missing_engines, int(manifest["preprocess"]["crop"]), max(batch_sizes), work)
    src.notes.append(f"artifacts from {directory} ({manifest['arch']}, sha256-verified)")
    return src


def make_backend(name: str, src: Sources, size: int, threads: int) -> Backend:
    """The Backend that runs one row, or raise ``LookupError(reason)`` when it cannot run here."""
    if name in src.missing:
        raise LookupError(src.missing[name])
    if name in TORCH_BACKENDS:
        if src.model is None:
            raise LookupError("no PyTorch network")
        if name.startswith("torch-cuda"):
            return ModuleBackend(src.model, size, device="cuda", half=name == "torch-cuda-fp16")
        return ModuleBackend(src.model, size, channels_last=name == "torch-cl")
    p = PRECISION[name]
    if name.startswith("ort-"):
        from serving.backends.onnxruntime import OnnxRuntimeBackend, available_providers

        return OnnxRuntimeBackend(src.onnx[p], p, providers=available_providers(prefer_gpu=True), threads=threads)
    from serving.backends.tensorrt import TensorRTBackend

    if p not in src.engines:
        raise LookupError(f"no {p} TensorRT engine")
    plan, stamp = src.engines[p]
    return TensorRTBackend(plan, p, stamp)


# --------------------------------------------------------------------------- timing

def time_cell(backend: Backend, batch: np.ndarray, budget_s: float) -> list[float]:
    """Milliseconds per ``infer`` call: WARMUP untimed calls, then timed ones for ``budget_s`` (>= MIN_ITERS)."""
    for _ in range(WARMUP):
        backend.infer(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_ITERS or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        backend.infer(batch)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def run_rows(backends: list[str], src: Sources, size: int, batch_sizes: list[int], threads: int,
             budget_s: float, skipped: dict[str, str], log=print) -> list[dict]:
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
            for n in batch_sizes:
                ms = time_cell(backend, inputs[n], budget_s)
                stats = percentiles(ms)
                rows.append({"backend": name, "precision": PRECISION[name], "batch_size": n, **stats,
                             "images_per_s": n * 1000.0 / stats["p50_ms"], "speedup_vs_torch": None,
                             "iterations": len(ms), "device": ",".join(map(str, device))})
                log(f"  {name:<16} batch {n:>3}: p50 {stats['p50_ms']:.2f} ms ({len(ms)} iterations)")
    torch_p50 = {r["batch_size"]: r["p50_ms"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        if r["batch_size"] in torch_p50:
            r["speedup_vs_torch"] = torch_p50[r["batch_size"]] / r["p50_ms"]
    return rows


# --------------------------------------------------------------------------- ceiling

def model_macs(cfg: dict) -> int:
    """Multiply-accumulates of one image through the benched network (counted on the meta device)."""
    import torch

    from training.flops import count_macs
    from training.resnet import build_model

    m = cfg.get("manifest") or {}
    with torch.device("meta"):
        model = build_model(cfg["arch"], num_classes=m.get("num_classes"), shortcut=m.get("shortcut"))
    return count_macs(model, cfg["input_size"])


def ceiling_lines(rows: list[dict], macs: int, ceiling: dict | None, cfg: dict) -> dict:
    """Print what kernels at this CPU's GEMM rate could give over eager; return it per batch size."""
    if not ceiling:
        return {}
    from bench.ceiling import best_possible

    print(f"\nCeiling: ONNX Runtime's own GEMM on this CPU ({cfg['threads']} threads) runs "
          f"{ceiling['fp32_gmac_per_s']:.1f} GMAC/s fp32 and {ceiling['int8_gmac_per_s']:.1f} GMAC/s int8 (u8 x s8); "
          f"{cfg['arch']} is {macs / 1e9:.3g} GMAC per image.")
    out = {}
    for r in rows:
        if r["backend"] == "torch":
            b = best_possible(r["p50_ms"], macs, r["batch_size"], ceiling)
            out[str(r["batch_size"])] = {k: round(v, 2) for k, v in b.items()}
            print(f"  batch {r['batch_size']}: kernels at that rate would be at most {b['fp32']:.2f}x (fp32) and "
                  f"{b['int8']:.2f}x (int8) faster than torch eager's {r['p50_ms']:.1f} ms")
    return out


# --------------------------------------------------------------------------- plot

def write_png(rows: list[dict], path: Path, title: str) -> Path:
    """p50 latency against batch size, one line per backend, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["batch_size"], r["p50_ms"]) for r in rows if r["backend"] == name)
        ax.plot([b for b, _ in pts], [m for _, m in pts], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["batch_size"] for r in rows}))
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

def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--batch-sizes {text!r}: give positive integers separated by commas, e.g. 1,10,32")
    return sorted(set(values))


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", metavar="DIR", help="bench a real export directory instead of a random network")
    p.add_argument("--arch", help="architecture (default resnet50; resnet20 with --quick); from the manifest "
                   "with --artifacts")
    p.add_argument("--input-size", type=int, help="input side (default: 224 for ImageNet archs, 32 for CIFAR)")
    p.add_argument("--batch-sizes", help="comma list (default 1,10,32; 1,10 with --quick)")
    p.add_argument("--backends", help=f"comma list of {', '.join(BACKENDS)} (default: every one usable here)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and ORT intra-op threads (default 2)")
    p.add_argument("--budget-s", type=float, help=f"timed seconds per backend x batch (default {DEFAULT_BUDGET_S}; "
                   f"{QUICK['budget_s']} with --quick); at least {MIN_ITERS} iterations")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--csv", help="CSV rows (default: next to --json)")
    p.add_argument("--png", help="latency vs batch size plot (default: next to --json)")
    p.add_argument("--quick", action="store_true", help="smoke run: resnet20 at 32, batch 1,10, 0.3 s per cell")
    p.add_argument("--no-ceiling", action="store_true", help="skip measuring this CPU's GEMM rate (bench/ceiling.py)")
    return p


def resolve(args) -> dict:
    """Validated configuration; raises ConfigError naming the bad flag."""
    cfg: dict = {"artifacts": args.artifacts, "threads": args.threads, "quick": args.quick,
                 "ceiling": not args.no_ceiling}
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be >= 1")
    budget = args.budget_s if args.budget_s is not None else (QUICK["budget_s"] if args.quick else DEFAULT_BUDGET_S)
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--budget-s {budget}: must be a positive number of seconds")
    cfg["budget_s"] = budget
    cfg["batch_sizes"] = (_positive_ints(args.batch_sizes) if args.batch_sizes is not None
                          else QUICK["batch_sizes"] if args.quick else [1, 10, 32])
    if args.backends is not None:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in names if b not in BACKENDS]
        if bad or not names:
            what = f"unknown {', '.join(bad)}" if bad else "no backend named"
            raise ConfigError(f"--backends {args.backends!r}: {what}; choose from {', '.join(BACKENDS)}")
        cfg["backends"], cfg["explicit_backends"] = list(dict.fromkeys(names)), True
    else:
        cfg["backends"], cfg["explicit_backends"] = list(BACKENDS), False
    if args.input_size is not None and args.input_size < 8:
        raise ConfigError(f"--input-size {args.input_size}: must be >= 8")
    from training.resnet import ARCHS, canonical_arch  # after the cheap checks: it imports torch

    if args.artifacts:
        from serving.artifacts import read_manifest

        manifest = read_manifest(args.artifacts)
        crop = int(manifest["preprocess"]["crop"])
        if args.arch is not None and canonical_arch(args.arch) != canonical_arch(manifest["arch"]):
            raise ConfigError(f"--arch {args.arch} conflicts with {args.artifacts} ({manifest['arch']}); drop --arch")
        if args.input_size is not None and args.input_size != crop:
            raise ConfigError(f"--input-size {args.input_size} conflicts with {args.artifacts} (crop {crop}); "
                              "drop --input-size")
        cfg.update(arch=manifest["arch"], input_size=crop, manifest=manifest)
    else:
        arch = canonical_arch(args.arch or (QUICK["arch"] if args.quick else "resnet50"))
        native = ARCHS[arch].native_input_size
        cfg.update(arch=arch, input_size=args.input_size or native, manifest=None)
    out = Path(args.json)
    cfg["json"], cfg["csv"] = out, Path(args.csv) if args.csv else out.with_suffix(".csv")
    cfg["png"] = Path(args.png) if args.png else out.with_suffix(".png")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Bench every backend; print the table, write JSON, CSV and PNG. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
        return _run(cfg)
    except ResdeployError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _run(cfg: dict) -> int:
    import torch

    from export.tensorrt import tensorrt_status

    torch.set_num_threads(cfg["threads"])
    skipped: dict[str, str] = {}
    cuda_ok = torch.cuda.is_available()
    trt_ok, trt_reason = tensorrt_status()
    backends = []
    for b in cfg["backends"]:
        why = (None if b not in GPU_BACKENDS else
               "torch.cuda.is_available() is False" if b.startswith("torch-cuda") and not cuda_ok else
               trt_reason if b.startswith("trt-") and not trt_ok else None)
        if why is None:
            backends.append(b)
        elif cfg["explicit_backends"]:
            skipped[b] = why
            print(f"skip {b}: {why}")
        else:
            skipped[b] = why  # default list: GPU rows are left out quietly on CPU hosts, but recorded
    if not cfg["explicit_backends"] and skipped:
        why = "no CUDA GPU" if not cuda_ok else "TensorRT not usable"
        print(f"left out ({why}; reasons in the JSON meta): {', '.join(skipped)}")

    info = machine_info()
    load_before = _load_average()
    if load_before is not None and load_before >= 1.0:
        # Measured here: with load ~7 on 2 cores, torch's OpenMP barriers made ResNet-20 batch 1
        # 100x slower at 2 threads than at 1; the numbers then describe the contention, not the model.
        print(f"warning: load average {load_before:.1f} before the run: other processes compete for the "
              f"{info['cpu_cores']} cores, so latencies (torch's OpenMP threads especially) will be inflated")
    with tempfile.TemporaryDirectory(prefix="resdeploy-latency-") as tmp:
        if cfg["artifacts"]:
            src = make_artifact_sources(Path(cfg["artifacts"]), cfg["manifest"], backends, cfg["batch_sizes"],
                                        Path(tmp), trt_ok)
        else:
            print(f"preparing {cfg['arch']} at {cfg['input_size']}x{cfg['input_size']} (random weights) ...",
                  flush=True)
            src = make_random_sources(cfg["arch"], cfg["input_size"], backends, cfg["batch_sizes"], Path(tmp), trt_ok)
        for note in src.notes:
            print(note)
        rows = run_rows(backends, src, cfg["input_size"], cfg["batch_sizes"], cfg["threads"], cfg["budget_s"],
                        skipped)
    if "torch" not in {r["backend"] for r in rows}:
        print("no torch row: speedup_vs_torch is left empty")
    macs = model_macs(cfg)
    ceiling = None
    if cfg["ceiling"] and any(not r["backend"].startswith(("trt", "torch-cuda")) for r in rows):
        from bench.ceiling import measure

        try:
            ceiling = measure(cfg["threads"], quick=cfg["quick"])
        except Exception as e:  # noqa: BLE001 - a reference measurement must not lose the rows
            print(f"ceiling not measured ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}); "
                  "rows are written without pct_of_gemm")
    from bench.ceiling import annotate

    annotate(rows, macs, ceiling)

    header = machine_header(info, cfg["threads"])
    title = f"{cfg['arch']} {cfg['input_size']}x{cfg['input_size']}, {cfg['threads']} threads"
    print()
    print(f"Latency, {title}; numbers are from this machine only:")
    print(header)
    print(format_table(rows, COLUMNS))
    best = ceiling_lines(rows, macs, ceiling, cfg)
    meta = {"arch": cfg["arch"], "input_size": cfg["input_size"], "batch_sizes": cfg["batch_sizes"],
            "backends": cfg["backends"], "threads": cfg["threads"], "budget_s": cfg["budget_s"],
            "warmup_iterations": WARMUP, "min_iterations": MIN_ITERS, "quick": cfg["quick"],
            "artifacts": cfg["artifacts"], "weights": "artifacts" if cfg["artifacts"] else "random",
            "calibration": None if cfg["artifacts"] else f"minmax, {CALIB_IMAGES} random normal images",
            "notes": src.notes, "skipped": skipped, "tensorrt": trt_reason,
            "speedup_reference": "torch eager fp32 p50 at the same batch size, same process",
            "cudnn_tf32": torch.backends.cudnn.allow_tf32 if cuda_ok else None,
            "load_average_1m": {"before": load_before, "after": _load_average()},
            "macs_per_image": macs, "gemm_ceiling": ceiling, "best_possible_speedup": best}
    write_results(rows, cfg["json"], cfg["csv"], meta, machine=info)
    written = [cfg["json"], cfg["csv"]]
    if rows:
        written.append(write_png(rows, cfg["png"], f"{title} | {info['cpu_model']}"))
    print(f"\nwrote {', '.join(map(str, written))}")
    if not rows:
        print(f"{PROG}: nothing was measured: every requested backend was skipped (reasons above)",
              file=sys.stderr)
        return 1
    print("next: python bench/accuracy.py ARTIFACT_DIR  (accuracy of the same backends)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
