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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from resdeploy import __version__
from resdeploy.cliargs import resolve_preprocess
from resdeploy.errors import AccuracyGateError, ConfigError, ExportError
from resdeploy.fsutil import write_json_atomic
from serving.artifacts import INTENDED_BACKENDS, LABELS, MANIFEST, PRECISIONS, SCHEMA_VERSION, sha256_file
from serving.backends.onnxruntime import OnnxRuntimeBackend
from training.checkpoint import restore_model
from training.data import Dataset, Split, load_dataset
from training.evaluate import iter_crops
from training.torch_backend import WEIGHTS_FORMAT

from export import gate, quantize
from export.fold import fold_batchnorm
from export.onnx_export import export_fp32, op_counts

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"


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
    if o.trt and o.precisions == ["int8-cpu"]:
        raise ConfigError("--trt builds engines from fp32/fp16/int8; int8-cpu is for ONNX Runtime only")
    if o.bento_model is not None:
        from export.bento import validate_model_name

        validate_model_name(o.bento_model)


def _labels(o: ExportOptions, recorded: list[str] | None, ds: Dataset, n: int) -> list[str]:
    if o.labels:
        path = Path(o.labels)
        if not path.is_file():
            raise ConfigError(f"--labels {path} not found (a JSON list or a text file with one label per line)")
        text = path.read_text()
        labels = json.loads(text) if text.lstrip().startswith("[") else [s for s in text.splitlines() if s.strip()]
    else:
        labels = recorded or ds.classes
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
        ds = load_dataset(spec, data_root=o.data_root, input_size=pre.input_size)
        split = _shuffled(ds.train, o.calib_images)
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
    eval_spec = o.eval_data or calib_spec or recorded_ds
    if not eval_spec:
        raise ConfigError("pass --eval-data: every artifact's accuracy is measured at export time")
    eval_ds = load_dataset(eval_spec, data_root=o.data_root,
                           input_size=(r.preprocess.input_size if r.preprocess else 224))
    if len(eval_ds.classes) != r.num_classes:
        raise ConfigError(f"--eval-data {eval_spec} has {len(eval_ds.classes)} classes but the network "
                          f"predicts {r.num_classes}; evaluate on the data it was trained for")
    pre = resolve_preprocess(r.preprocess, eval_ds.preprocess, o.preprocess_flags, o.checkpoint)
    labels = _labels(o, r.classes, eval_ds, r.num_classes)

    out = Path(o.out).resolve()
    if out.exists() and (not out.is_dir() or (not (out / MANIFEST).exists() and any(out.iterdir()))):
        raise ConfigError(f"{out} exists and is not an artifact directory; choose another --out")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        manifest = _build(o, r, pre, labels, eval_ds, eval_spec, calib_spec, out, tmp, timings, progress, trt)
        timings["total"] = round(time.perf_counter() - t_start, 2)
        manifest["timings_s"] = timings
        write_json_atomic(tmp / MANIFEST, manifest)
        failed = [a["precision"] for a in manifest["artifacts"] if not a.get("within_budget", True)]
        if failed and not o.accept_accuracy_drop:
            raise AccuracyGateError(f"over accuracy budget: {', '.join(failed)} (table above); nothing was "
                                    f"written to {out}. Fix the calibration data or pass --accept-accuracy-drop")
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if o.bento_model is not None:
        from export.bento import save_bento_model

        # In memory only: the file's hash is what the store's metadata records.
        manifest["bento_model"] = save_bento_model(out, o.bento_model)
    return manifest


def _build(o, r, pre, labels, eval_ds, eval_spec, calib_spec, out, tmp, timings, progress, trt) -> dict:
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
    calibration = None
    if any(p.startswith("int8") for p in o.precisions):
        t = time.perf_counter()
        tensors, calibration = _calibration(o, calib_spec, pre, out, tmp)
        timings["calibration_tensors"] = round(time.perf_counter() - t, 2)
        for p in (p for p in o.precisions if p.startswith("int8")):
            info = quantize.quantize_int8(fp32, tmp / onnx_file(p), p, tensors, o.calib_method, tmp, progress)
            timings[f"quantize_{p}"] = info["seconds"]
            log.info("%s: %s calibration on %d images, %.1f s", p, o.calib_method, info["images"], info["seconds"])
    t = time.perf_counter()
    backends = {p: OnnxRuntimeBackend(tmp / onnx_file(p), p, providers=["CPUExecutionProvider"]).activate()
                for p in o.precisions}
    split = _shuffled(eval_ds.test, o.eval_images)
    ref, rows = gate.measure(r.model, backends, split, pre, progress)
    for b in backends.values():
        b.deactivate()
    timings["accuracy_gate"] = round(time.perf_counter() - t, 2)
    verdicts = {p: gate.judge(p, rows[p], ref) for p in o.precisions}
    print(f"accuracy on {len(split)} {eval_spec} test images (ONNX Runtime CPU vs PyTorch FP32, centre crop):")
    print(gate.format_table(ref, rows, verdicts))
    artifacts = [{"kind": "onnx", "precision": p, **_file_entry(tmp, onnx_file(p)),
                  "backends": INTENDED_BACKENDS[p], **rows[p], "within_budget": verdicts[p][0],
                  "budget": verdicts[p][1]} for p in o.precisions]
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
        "eval": {"dataset": eval_spec, "images": len(split), "tta": "center", "pytorch_fp32": ref,
                 "batch_1_7_max_logit_diff": batch_diff},
        "calibration": calibration, "artifacts": artifacts, "versions": versions,
        "accepted_accuracy_drop": bool(o.accept_accuracy_drop and not all(v[0] for v in verdicts.values())),
        "options": {k: v for k, v in vars(o).items() if k not in ("progress",)},
    }


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
