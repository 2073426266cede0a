"""Checkpoint -> verified artifact directory.

Order: fold BN -> FP32 ONNX (checked, dynamic batch run at 1 and 7) -> FP16 -> INT8 flavours
(calibrated on serving-preprocessed images, cached) -> accuracy gate on CPU with ONNX Runtime ->
optional TensorRT engines -> the unfolded PyTorch weights (``model.pt``, the reference backend)
-> labels.json + manifest.json. Everything is written into a hidden temporary directory beside
``--out`` and swapped in by rename only when complete and within budget, so a failed or
interrupted export never leaves half an artifact nor damages the previous one. Only then, with
``--bento-model``, is the installed directory copied into the BentoML model store.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from resdeploy import __version__
from resdeploy.cliargs import resolve_preprocess
from resdeploy.errors import AccuracyGateError, ConfigError, DatasetError, ExportError
from resdeploy.fsutil import write_json_atomic
from serving.artifacts import INTENDED_BACKENDS, LABELS, MANIFEST, PRECISIONS, SCHEMA_VERSION, sha256_file
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.preprocess import PreprocessConfig
from training.checkpoint import restore_model
from training.data import Dataset, Split, load_calibration_images, load_dataset
from training.evaluate import iter_crops
from training.torch_backend import WEIGHTS_FORMAT

from export import gate, int8, qdq, quantize
from export.int8 import EvalSet, Int8Options
from export.fold import fold_batchnorm
from export.onnx_export import export_fp32, op_counts

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"
SENSITIVITY = "sensitivity.json"


@dataclass
class ExportOptions:
    """What ``resdeploy export`` was asked for (written into the manifest as given)."""

    checkpoint: str
    out: str
    arch: str | None = None
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    calib_data: str | None = None
    calib_images: int = 128
    calib_method: str = "percentile"
    eval_data: str | None = None
    eval_images: int = 1000
    labels: str | None = None
    trt: bool = False
    max_batch: int = 40
    workspace_gib: float = 4.0
    accept_accuracy_drop: bool = False
    num_classes: int | None = None
    shortcut: str | None = None
    data_root: str = "data"
    progress: bool | None = None
    preprocess_flags: dict = field(default_factory=dict)
    bento_model: str | None = None
    int8: Int8Options = field(default_factory=Int8Options)
    int8_min_agreement: float | None = None
    report_only: bool = False


def onnx_file(precision: str) -> str:
    return f"model.{precision}.onnx"


def _file_entry(directory: Path, name: str) -> dict:
    p = directory / name
    return {"file": name, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def _validate(o: ExportOptions) -> None:
    bad = [p for p in o.precisions if p not in PRECISIONS]
    if bad or not o.precisions or len(set(o.precisions)) != len(o.precisions):
        raise ConfigError(f"--precisions {','.join(o.precisions)}: choose distinct values from {','.join(PRECISIONS)}")
    if "fp32" not in o.precisions:
        raise ConfigError("--precisions must include fp32: every other artifact is made from it")
    if o.max_batch < 1 or o.calib_images < 1 or o.eval_images < 1 or o.workspace_gib <= 0:
        raise ConfigError("--max-batch, --calib-images, --eval-images and --workspace-gib must be positive")
    if o.calib_method not in quantize.CALIB_METHODS:
        raise ConfigError(f"--calib-method {o.calib_method}: choose one of {', '.join(quantize.CALIB_METHODS)}")
    if o.int8.sensitivity not in int8.SENSITIVITY_MODES:
        raise ConfigError(f"--sensitivity {o.int8.sensitivity}: choose one of {', '.join(int8.SENSITIVITY_MODES)}")
    if o.int8.overflow_fix is not None and o.int8.overflow_fix not in qdq.OVERFLOW_FIXES:
        raise ConfigError(f"--overflow-fix {o.int8.overflow_fix}: choose one of {', '.join(qdq.OVERFLOW_FIXES)}")
    if o.int8_min_agreement is not None and not 0 <= o.int8_min_agreement <= 100:
        raise ConfigError(f"--int8-min-agreement {o.int8_min_agreement}: a percentage in [0, 100], e.g. 98")
    if o.report_only and not any(p.startswith("int8") for p in o.precisions):
        raise ConfigError("--report-only reports INT8 layer sensitivity: --precisions must include int8 or int8-cpu")
    if o.trt and o.precisions == ["int8-cpu"]:
        raise ConfigError("--trt builds engines from fp32/fp16/int8; int8-cpu is for ONNX Runtime only")
    if o.bento_model is not None:
        from export.bento import validate_model_name

        validate_model_name(o.bento_model)


def _gate_data(o: ExportOptions, calib_spec: str | None, recorded_ds: str | None, r) -> tuple[str, Split, Dataset | None]:
    """The images every artifact is judged on: ``(spec, split, dataset or None when unlabelled)``.

    ``--eval-data`` (labelled) if given; else the calibration data: its held-out split when it is a
    labelled dataset, else the calibration images themselves, unlabelled (a flat folder: only
    agreement with FP32 is judged); else the dataset the checkpoint was trained on.
    """
    spec = o.eval_data or calib_spec or recorded_ds
    if not spec:
        raise ConfigError("pass --eval-data DIR (labelled images) or --calib-data DIR (a folder of images like "
                          "those the network classifies): every artifact's accuracy is measured at export time")
    size = r.preprocess.input_size if r.preprocess else 224
    try:
        ds = load_dataset(spec, data_root=o.data_root, input_size=size)
    except DatasetError:
        if o.eval_data or spec != calib_spec:
            raise
        log.warning("%s has no labels: every artifact is judged by its agreement with PyTorch FP32 on the "
                    "calibration images (pass --eval-data DIR/<class>/*.jpg to measure top-1 too)", spec)
        return spec, load_calibration_images(spec, data_root=o.data_root, input_size=size), None
    if len(ds.classes) != r.num_classes:
        raise ConfigError(f"--eval-data {spec} has {len(ds.classes)} classes but the network "
                          f"predicts {r.num_classes}; evaluate on the data it was trained for")
    return spec, ds.test, ds


def _labels(o: ExportOptions, recorded: list[str] | None, ds: Dataset | None, n: int) -> list[str]:
    if o.labels:
        path = Path(o.labels)
        if not path.is_file():
            raise ConfigError(f"--labels {path} not found (a JSON list or a text file with one label per line)")
        text = path.read_text()
        labels = json.loads(text) if text.lstrip().startswith("[") else [s for s in text.splitlines() if s.strip()]
    else:
        labels = recorded or (ds.classes if ds else [str(i) for i in range(n)])
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} labels for a {n}-class network; pass --labels with {n} entries")
    return [str(v) for v in labels]


def _shuffled(split: Split, n: int, seed: int = 0) -> Split:
    """``n`` images drawn with a fixed seed (class-sorted folders would skew a plain prefix)."""
    if n >= len(split):
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return Split(split.labels[idx], None if split.images is None else split.images[idx],
                 None if split.paths is None else [split.paths[i] for i in idx])


def _check_batches(model, path: Path, input_size: int) -> float:
    """Run the FP32 file at batch 1 and 7 (the batch axis must really be dynamic)."""
    worst = 0.0
    with OnnxRuntimeBackend(path, "fp32", providers=["CPUExecutionProvider"]) as b:
        for n in (1, 7):
            x = torch.randn(n, 3, input_size, input_size, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                ref = model(x).numpy()
            worst = max(worst, float(np.abs(b.infer(x.numpy()) - ref).max()))
    if worst > gate.BUDGETS["fp32"]["max_logit_diff"]:
        raise ExportError(f"FP32 ONNX differs from PyTorch by {worst:.3g} at batch 1/7 (budget 1e-3)")
    return worst


def _calibration(o: ExportOptions, spec: str, pre, out: Path, tmp: Path) -> tuple[np.ndarray, dict]:
    key = quantize.calibration_key(spec, o.calib_images, pre.to_dict())
    cached = quantize.cached_calibration(key, [out, tmp], tmp)
    if cached is None:
        split = _shuffled(load_calibration_images(spec, data_root=o.data_root, input_size=pre.input_size),
                          o.calib_images)
        if len(split) < o.calib_images:
            log.warning("calibration: %s has %d training images, fewer than --calib-images %d",
                        spec, len(split), o.calib_images)
        cached = np.concatenate([c for c, _ in iter_crops(split, pre, "center", 64)])
        quantize.save_calibration(key, cached, tmp)
    f = f"{quantize.CALIB_DIR}/{key}.npy"
    return cached, {"dataset": spec, "images": int(len(cached)), "method": o.calib_method} | _file_entry(tmp, f)


def run_export(o: ExportOptions) -> dict:
    """Export, gate and install one artifact directory; returns its manifest.

    Raises:
        ConfigError, CheckpointError, DatasetError: bad options or inputs (before any work).
        ExportError: a step failed. AccuracyGateError: an artifact is over budget (nothing
        is installed unless ``accept_accuracy_drop``).
    """
    _validate(o)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    trt = None
    if o.trt:  # fail fast, before minutes of ONNX work, on hosts without TensorRT or a GPU
        from export import tensorrt as trt

        trt.require_tensorrt()
    progress = o.progress if o.progress is not None else sys.stderr.isatty()
    r = restore_model(o.checkpoint, o.arch, num_classes=o.num_classes, shortcut=o.shortcut)
    recorded_ds = (r.meta.get("config") or {}).get("dataset")
    needs_calib = any(p.startswith("int8") for p in o.precisions)
    calib_spec = o.calib_data or (recorded_ds if needs_calib else None)
    if needs_calib and not calib_spec:
        raise ConfigError("int8 artifacts need calibration images: pass --calib-data (a dataset the network "
                          "was trained on, e.g. digits or an ImageFolder directory)")
    eval_spec, gate_split, eval_ds = _gate_data(o, calib_spec, recorded_ds, r)
    default_pre = eval_ds.preprocess if eval_ds else PreprocessConfig.imagenet(
        r.preprocess.input_size if r.preprocess else 224)
    pre = resolve_preprocess(r.preprocess, default_pre, o.preprocess_flags, o.checkpoint)
    labels = _labels(o, r.classes, eval_ds, r.num_classes)

    out = Path(o.out).resolve()
    if out.exists() and (not out.is_dir() or (not (out / MANIFEST).exists() and any(out.iterdir()))):
        raise ConfigError(f"{out} exists and is not an artifact directory; choose another --out")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    interrupted = _InterruptFlag()
    try:
        tmp.mkdir(parents=True)
        manifest = _build(o, r, pre, labels, gate_split, eval_spec, calib_spec, out, tmp, timings, progress, trt)
        if o.report_only:  # the table only: sensitivity.json beside (or into) --out, no artifacts
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / SENSITIVITY, json.loads((tmp / SENSITIVITY).read_text()))
            return manifest | {"report": str(out / SENSITIVITY)}
        timings["total"] = round(time.perf_counter() - t_start, 2)
        manifest["timings_s"] = timings
        write_json_atomic(tmp / MANIFEST, manifest)
        failed = [a["precision"] for a in manifest["artifacts"] if not a.get("within_budget", True)]
        if failed and not o.accept_accuracy_drop:
            raise AccuracyGateError(f"over accuracy budget: {', '.join(failed)} (table above); nothing was "
                                    f"written to {out}. Try more --calib-images, --max-float-layers or --keep-float "
                                    f"(sensitivity table above), or pass --accept-accuracy-drop")
        interrupted.check()  # a library that swallowed the KeyboardInterrupt must not get us to install
        _install(tmp, out)
    finally:
        interrupted.restore()
        shutil.rmtree(tmp, ignore_errors=True)
    if o.bento_model is not None:
        from export.bento import save_bento_model

        # In memory only: the file's hash is what the store's metadata records.
        manifest["bento_model"] = save_bento_model(out, o.bento_model)
    return manifest


def _eval_set(model, split: Split, pre, progress: bool) -> EvalSet:
    """The gate images in memory (serving's centre crop) with PyTorch FP32's logits."""
    from tqdm import tqdm

    xs, labels, refs = [], [], []
    model.eval()
    with tqdm(total=len(split), desc="gate images", unit="img", leave=False, disable=not progress) as bar:
        for crops, y in iter_crops(split, pre, "center", 50):
            with torch.no_grad():
                refs.append(model(torch.from_numpy(crops)).numpy())
            xs.append(crops)
            labels.append(y)
            bar.update(len(y))
    return EvalSet(np.concatenate(xs), np.concatenate(labels), np.concatenate(refs))


def _budgets(o: ExportOptions) -> dict:
    b = {p: dict(v) for p, v in gate.BUDGETS.items()}
    if o.int8_min_agreement is not None:
        for p in ("int8", "int8-cpu"):
            b[p]["min_agreement"] = o.int8_min_agreement
    return b


def _build(o, r, pre, labels, gate_split, eval_spec, calib_spec, out, tmp, timings, progress, trt) -> dict:
    t = time.perf_counter()
    folded = fold_batchnorm(r.model)
    fp32 = export_fp32(folded, tmp / onnx_file("fp32"), pre.crop)
    batch_diff = _check_batches(r.model, fp32, pre.crop)
    timings["onnx_fp32"] = round(time.perf_counter() - t, 2)
    log.info("fp32: %s (%s), batch 1/7 max |diff| vs PyTorch %.2g", fp32.name,
             ", ".join(f"{k} {v}" for k, v in sorted(op_counts(onnx.load(str(fp32))).items())),
             batch_diff)
    if "fp16" in o.precisions:
        t = time.perf_counter()
        quantize.convert_fp16(fp32, tmp / onnx_file("fp16"))
        timings["onnx_fp16"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    split = _shuffled(gate_split, o.eval_images)
    ev = _eval_set(r.model, split, pre, progress)
    ref, _ = gate.measure(ev.ref, ev.labels, {})
    timings["gate_images"] = round(time.perf_counter() - t, 2)
    budgets = _budgets(o)
    calibration, reports = None, {}
    if any(p.startswith("int8") for p in o.precisions):
        t = time.perf_counter()
        tensors, calibration = _calibration(o, calib_spec, pre, out, tmp)
        timings["calibration_tensors"] = round(time.perf_counter() - t, 2)
        opts = replace(o.int8, method=o.calib_method, progress=progress, budgets=budgets,
                       **({"sensitivity": "on", "fallback": False} if o.report_only else {}))
        with qdq.Prepared(fp32, tmp) as prepared:
            for p in (p for p in o.precisions if p.startswith("int8")):
                reports[p] = int8.build(prepared, p, tmp / onnx_file(p), tensors, ev, ref, opts)
                timings[f"quantize_{p}"] = reports[p]["seconds"]
                _log_int8(p, reports[p])
        if any(rep["sensitivity"] for rep in reports.values()):
            write_json_atomic(tmp / SENSITIVITY, {p: rep["sensitivity"] for p, rep in reports.items()
                                                  if rep["sensitivity"]})
    if o.report_only:
        return {"report_only": True, "sensitivity": {p: rep["sensitivity"] for p, rep in reports.items()}}
    t = time.perf_counter()
    logits = {}
    for p in o.precisions:
        fused = qdq.form(p).fused_gate if p.startswith("int8") else True
        logits[p] = qdq.run(qdq.session(tmp / onnx_file(p), fused=fused), ev.x)[0]
    _, rows = gate.measure(ev.ref, ev.labels, logits)
    timings["accuracy_gate"] = round(time.perf_counter() - t, 2)
    verdicts = {p: gate.judge(p, rows[p], ref, budgets) for p in o.precisions}
    print(f"accuracy on {len(split)} {eval_spec} {'test' if ev.labelled else 'unlabelled'} images "
          "(ONNX Runtime CPU vs PyTorch FP32, centre crop):")
    print(gate.format_table(ref, rows, verdicts))
    artifacts = [{"kind": "onnx", "precision": p, **_file_entry(tmp, onnx_file(p)),
                  "backends": INTENDED_BACKENDS[p], **rows[p], "within_budget": verdicts[p][0],
                  "budget": verdicts[p][1], **({"quantization": _summary(reports[p])} if p in reports else {})}
                 for p in o.precisions]
    if trt is not None:
        artifacts += _engines(o, trt, tmp, pre, timings)
    artifacts.append(_weights(r, tmp, ref))
    write_json_atomic(tmp / LABELS, labels)
    versions = {"resdeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "tensorrt": next((a["tensorrt_version"] for a in artifacts if a["kind"] == "engine"), None)}
    return {
        "schema_version": SCHEMA_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": r.arch, "shortcut": r.shortcut, "num_classes": r.num_classes, "input_size": pre.input_size,
        "preprocess": pre.to_dict(), "input": {"name": "input", "layout": "NCHW", "dtype": "float32"},
        "output": {"name": "logits", "dtype": "float32"}, "labels": _file_entry(tmp, LABELS),
        "source": {"checkpoint": Path(o.checkpoint).name, "sha256": sha256_file(o.checkpoint),
                   "epoch": r.meta.get("epoch")},
        "eval": {"dataset": eval_spec, "images": len(split), "tta": "center", "labelled": ev.labelled,
                 "pytorch_fp32": ref, "batch_1_7_max_logit_diff": batch_diff, "cpu": cpu_isa()},
        "calibration": calibration, "artifacts": artifacts, "versions": versions,
        **({"sensitivity": _file_entry(tmp, SENSITIVITY)} if (tmp / SENSITIVITY).exists() else {}),
        "accepted_accuracy_drop": bool(o.accept_accuracy_drop and not all(v[0] for v in verdicts.values())),
        "options": {k: (asdict(v) if k == "int8" else v) for k, v in vars(o).items() if k not in ("progress",)},
    }


def _summary(rep: dict) -> dict:
    """What the manifest keeps of an INT8 report (the per-layer table is in sensitivity.json)."""
    keys = ("top1", "top1_agreement", "logit_sqnr_db")
    return {"method": rep["method"], "overflow_fix": rep["overflow_fix"], "float_layers": rep["float_layers"],
            "int8_mac_share": rep["int8_mac_share"], "quantizable_layers": rep["quantizable_layers"],
            "fallback": rep["fallback"], "before_fallback": {k: rep["before"][k] for k in keys},
            "most_sensitive": [r["layer"] for r in (rep["sensitivity"] or [])[:5]], "seconds": rep["seconds"]}


def _log_int8(p: str, rep: dict) -> None:
    b, a = rep["before"], rep["after"]
    if rep["sensitivity"]:
        print(f"{p}: per-layer sensitivity (each layer quantized alone, worst first):")
        print(int8.format_sensitivity(p, rep["sensitivity"]))
    line = f"{p}: {rep['method']} ranges, agreement {b['top1_agreement']:.2f}%"
    if rep["fallback"]:
        line += (f" -> {a['top1_agreement']:.2f}% with {len(rep['float_layers'])} layer(s) in float "
                 f"({', '.join(rep['float_layers'])}); {rep['int8_mac_share']:.1f}% of MACs in INT8")
    print(line + f" ({rep['seconds']:.1f} s)")


def cpu_isa() -> dict:
    """The CPU the gate ran on and whether it has VNNI (int8-cpu accuracy depends on it)."""
    import platform

    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "")
        flags = next((l for l in text.splitlines() if l.startswith("flags")), "")
    except OSError:
        model = platform.processor()
    return {"model": model or platform.machine(), "vnni": any(f in flags.split() for f in ("avx512_vnni", "avx_vnni")),
            "avx2": "avx2" in flags.split()}


def _weights(r, tmp: Path, ref: dict) -> dict:
    """``model.pt``: the unfolded network's state_dict, for the ``pytorch`` reference backend.

    The gate's PyTorch FP32 row is its accuracy (it is the reference every budget is judged
    against). Readable with ``torch.load(weights_only=True)``.
    """
    sd = {k: v.detach().cpu() for k, v in r.model.state_dict().items()}
    torch.save({"format": WEIGHTS_FORMAT, "arch": r.arch, "shortcut": r.shortcut, "num_classes": r.num_classes,
                "model": sd}, tmp / WEIGHTS_FILE)
    return {"kind": "pytorch", "precision": "fp32", **_file_entry(tmp, WEIGHTS_FILE), "backends": ["pytorch"],
            **ref, "within_budget": True, "budget": "reference"}


def _engines(o, trt, tmp: Path, pre, timings) -> list[dict]:
    entries = []
    for p in (p for p in o.precisions if p != "int8-cpu"):
        name = trt.engine_file_name(p)
        stamp = trt.build_engine(tmp / onnx_file(p), tmp / name, precision=p, input_size=pre.crop,
                                 max_batch=o.max_batch, workspace_gib=o.workspace_gib,
                                 timing_cache=tmp / "timing.cache")
        timings[f"engine_{p}"] = stamp["build_seconds"]
        entries.append({"kind": "engine", "precision": p, **_file_entry(tmp, name), "backends": ["tensorrt"],
                        "onnx": onnx_file(p), **stamp})
    return entries


class _InterruptFlag:
    """Ctrl-C raises KeyboardInterrupt as usual *and* is remembered until the export ends.

    A call into a third-party library may catch the KeyboardInterrupt and carry on; once, a full
    test run saw an export signalled right after writing model.fp32.onnx exit 0 and install. The
    flag is checked again just before the install, so an interrupted export never replaces ``--out``.
    """

    def __init__(self):
        import signal
        import threading

        self.hit, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _install(tmp: Path, out: Path) -> None:
    """Swap the finished directory in; the previous one is kept until the swap succeeded."""
    if not out.exists():
        os.rename(tmp, out)
        return
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)
