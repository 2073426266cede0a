"""Checkpoint -> verified artifact directory.

Order: fold BN -> FP32 ONNX (checked, dynamic batch run at 1 and 7) -> FP16 -> INT8 flavours
(calibrated on serving-preprocessed images, cached) -> accuracy gate on CPU with ONNX Runtime ->
optional TensorRT engines -> the unfolded PyTorch weights (``model.pt``, the reference backend)
-> labels.json + manifest.json. Everything is written into a hidden temporary directory beside
``--out`` and swapped in by rename only when complete and within budget (:mod:`export.install`).
Only then, with ``--bento-model``, is the installed directory copied into the BentoML model store.

The tables people read (the gate, INT8 sensitivity) go to a ``report`` callable: the CLI passes
``print``; a library caller gets them on this module's logger unless it passes its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime
import torch

from backends.onnxruntime import OnnxRuntimeBackend
from backends.pytorch import save_weights
from core import __version__
from core.errors import AccuracyGateError, ConfigError, DatasetError, ExportError
from core.flavours import FLAVOURS, FP32, PRECISIONS, TENSORRT
from core.fsutil import write_json_atomic
from core.machine import cpu_isa
from core.manifest import LABELS, MANIFEST, SCHEMA_VERSION, SENSITIVITY, WEIGHTS_FILE, Manifest, sha256_file
from core.preprocess import PreprocessConfig, resolve_preprocess
from export import gate, int8, qdq, quantize
from export.fold import fold_batchnorm
from export.install import InterruptFlag, install
from export.int8 import EvalSet
from export.onnx_export import export_fp32, op_counts
from export.options import CALIB_METHODS, OVERFLOW_FIXES, SENSITIVITY_MODES, ExportOptions, Int8Options
from training.checkpoint import Restored, restore_model
from training.data import Dataset, Split, load_calibration_images, load_dataset
from training.evaluate import iter_crops

log = logging.getLogger(__name__)

__all__ = ["ExportOptions", "ExportResult", "Int8Options", "run_export"]


@dataclass
class ExportResult:
    """What :func:`run_export` produced.

    Attributes:
        out: the artifact directory (installed, or where ``sensitivity.json`` went).
        manifest: the installed directory's manifest; ``None`` with ``report_only``.
        sensitivity_report: ``--report-only``: the per-layer INT8 table written.
        bento_model: the BentoML model-store tag, with ``--bento-model``.
    """

    out: Path
    manifest: Manifest | None = None
    sensitivity_report: Path | None = None
    bento_model: str | None = None


@dataclass
class _Job:
    """One export in progress: the options, what they resolved to, and where the files go."""

    options: ExportOptions
    restored: Restored
    preprocess: PreprocessConfig
    labels: list[str]
    gate_spec: str
    gate_split: Split
    calib_spec: str | None
    out: Path
    work: Path  # the hidden directory that becomes ``out``
    progress: bool
    report: Callable[[str], None]
    tensorrt: ModuleType | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def int8_precisions(self) -> list[str]:
        return [p for p in self.options.precisions if FLAVOURS[p].is_int8]

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[step] = round(time.perf_counter() - start, 2)


@dataclass
class _Gate:
    """The gate's images with PyTorch FP32's logits, its reference row and the budgets in force."""

    images: EvalSet
    reference: dict
    budgets: dict


def run_export(options: ExportOptions, report: Callable[[str], None] | None = None) -> ExportResult:
    """Export, gate and install one artifact directory.

    Args:
        report: where the gate and sensitivity tables go (default: this module's logger).

    Raises:
        ConfigError, CheckpointError, DatasetError: bad options or inputs (before any work).
        ExportError: a step failed. AccuracyGateError: an artifact is over budget (nothing
        is installed unless ``accept_accuracy_drop``).
    """
    _validate(options)
    start = time.perf_counter()
    job = _prepare(options, report or log.info)
    interrupted = InterruptFlag()
    try:
        job.work.mkdir(parents=True)
        manifest = _build(job)
        if manifest is None:  # --report-only: the table only, beside (or into) --out; no artifacts
            job.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(job.out / SENSITIVITY, json.loads((job.work / SENSITIVITY).read_text()))
            return ExportResult(job.out, sensitivity_report=job.out / SENSITIVITY)
        job.timings["total"] = round(time.perf_counter() - start, 2)
        manifest.timings_s = job.timings
        write_json_atomic(job.work / MANIFEST, manifest.to_dict())
        failed = [a.precision for a in manifest.artifacts if not a.within_budget]
        if failed and not options.accept_accuracy_drop:
            raise AccuracyGateError(f"over accuracy budget: {', '.join(failed)} (table above); nothing was "
                                    f"written to {job.out}. Try more --calib-images, --max-float-layers or "
                                    f"--keep-float (sensitivity table above), or pass --accept-accuracy-drop")
        interrupted.check()  # a library that swallowed the KeyboardInterrupt must not get us to install
        install(job.work, job.out)
    finally:
        interrupted.restore()
        shutil.rmtree(job.work, ignore_errors=True)
    result = ExportResult(job.out, manifest)
    if options.bento_model is not None:
        from export.bento import save_bento_model

        # In memory only: the file's hash is what the store's metadata records.
        result.bento_model = save_bento_model(job.out, options.bento_model)
    return result


# --------------------------------------------------------------------------- options and inputs

def _validate(options: ExportOptions) -> None:
    precisions, int8_options = options.precisions, options.int8
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions or len(set(precisions)) != len(precisions):
        raise ConfigError(f"--precisions {','.join(precisions)}: choose distinct values from {','.join(PRECISIONS)}")
    if FP32.name not in precisions:
        raise ConfigError("--precisions must include fp32: every other artifact is made from it")
    if options.max_batch < 1 or options.calib_images < 1 or options.eval_images < 1 or options.workspace_gib <= 0:
        raise ConfigError("--max-batch, --calib-images, --eval-images and --workspace-gib must be positive")
    if options.calib_method not in CALIB_METHODS:
        raise ConfigError(f"--calib-method {options.calib_method}: choose one of {', '.join(CALIB_METHODS)}")
    if int8_options.sensitivity not in SENSITIVITY_MODES:
        raise ConfigError(f"--sensitivity {int8_options.sensitivity}: choose one of {', '.join(SENSITIVITY_MODES)}")
    if int8_options.overflow_fix is not None and int8_options.overflow_fix not in OVERFLOW_FIXES:
        raise ConfigError(f"--overflow-fix {int8_options.overflow_fix}: choose one of {', '.join(OVERFLOW_FIXES)}")
    if options.int8_min_agreement is not None and not 0 <= options.int8_min_agreement <= 100:
        raise ConfigError(f"--int8-min-agreement {options.int8_min_agreement}: a percentage in [0, 100], e.g. 98")
    int8_names = [name for name, f in FLAVOURS.items() if f.is_int8]
    if options.report_only and not any(p in int8_names for p in precisions):
        raise ConfigError("--report-only reports INT8 layer sensitivity: --precisions must include "
                          + " or ".join(int8_names))
    if options.bento_model is not None:
        from export.bento import validate_model_name

        validate_model_name(options.bento_model)


def _prepare(options: ExportOptions, report: Callable[[str], None]) -> _Job:
    """Everything that can fail on bad input, before any file is written."""
    tensorrt = None
    if options.trt:  # fail fast, before minutes of ONNX work, on hosts without TensorRT or a GPU
        from export import tensorrt

        tensorrt.require_tensorrt()
    restored = restore_model(options.checkpoint, options.arch, num_classes=options.num_classes,
                             shortcut=options.shortcut)
    trained_on = (restored.meta.get("config") or {}).get("dataset")
    needs_calibration = any(FLAVOURS[p].is_int8 for p in options.precisions)
    calib_spec = options.calib_data or (trained_on if needs_calibration else None)
    if needs_calibration and not calib_spec:
        raise ConfigError("int8 artifacts need calibration images: pass --calib-data (a dataset the network "
                          "was trained on, e.g. digits or an ImageFolder directory)")
    input_size = restored.preprocess.input_size if restored.preprocess else 224
    gate_spec, gate_split, eval_dataset = _gate_data(options, calib_spec, trained_on, restored, input_size)
    default_preprocess = eval_dataset.preprocess if eval_dataset else PreprocessConfig.imagenet(input_size)
    preprocess = resolve_preprocess(restored.preprocess, default_preprocess, options.preprocess_flags,
                                    options.checkpoint)
    labels = _labels(options, restored.classes, eval_dataset, restored.num_classes)
    out = Path(options.out).resolve()
    if out.exists() and (not out.is_dir() or (not (out / MANIFEST).exists() and any(out.iterdir()))):
        raise ConfigError(f"{out} exists and is not an artifact directory; choose another --out")
    progress = options.progress if options.progress is not None else sys.stderr.isatty()
    return _Job(options, restored, preprocess, labels, gate_spec, gate_split, calib_spec, out,
                out.parent / f".{out.name}.tmp-{os.getpid()}", progress, report, tensorrt)


def _gate_data(options: ExportOptions, calib_spec: str | None, trained_on: str | None, restored: Restored,
               input_size: int) -> tuple[str, Split, Dataset | None]:
    """The images every artifact is judged on: ``(spec, split, dataset or None when unlabelled)``.

    ``--eval-data`` (labelled) if given; else the calibration data: its held-out split when it is a
    labelled dataset, else the calibration images themselves, unlabelled (a flat folder: only
    agreement with FP32 is judged); else the dataset the checkpoint was trained on.
    """
    spec = options.eval_data or calib_spec or trained_on
    if not spec:
        raise ConfigError("pass --eval-data DIR (labelled images) or --calib-data DIR (a folder of images like "
                          "those the network classifies): every artifact's accuracy is measured at export time")
    try:
        dataset = load_dataset(spec, data_root=options.data_root, input_size=input_size)
    except DatasetError:
        if options.eval_data or spec != calib_spec:
            raise
        log.warning("%s has no labels: every artifact is judged by its agreement with PyTorch FP32 on the "
                    "calibration images (pass --eval-data DIR/<class>/*.jpg to measure top-1 too)", spec)
        return spec, load_calibration_images(spec, data_root=options.data_root, input_size=input_size), None
    if len(dataset.classes) != restored.num_classes:
        raise ConfigError(f"--eval-data {spec} has {len(dataset.classes)} classes but the network "
                          f"predicts {restored.num_classes}; evaluate on the data it was trained for")
    return spec, dataset.test, dataset


def _labels(options: ExportOptions, recorded: list[str] | None, dataset: Dataset | None, n: int) -> list[str]:
    if options.labels:
        path = Path(options.labels)
        if not path.is_file():
            raise ConfigError(f"--labels {path} not found (a JSON list or a text file with one label per line)")
        text = path.read_text()
        labels = json.loads(text) if text.lstrip().startswith("[") else [s for s in text.splitlines() if s.strip()]
    else:
        labels = recorded or (dataset.classes if dataset else [str(i) for i in range(n)])
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} labels for a {n}-class network; pass --labels with {n} entries")
    return [str(v) for v in labels]


# --------------------------------------------------------------------------- the build

def _build(job: _Job) -> Manifest | None:
    """Write every file into ``job.work``; the manifest, or ``None`` with ``report_only``."""
    fp32, batch_diff = _float_files(job)
    gate_run = _gate_images(job)
    calibration, int8_reports = _int8_files(job, fp32, gate_run)
    if job.options.report_only:
        return None
    verdicts = _judge(job, gate_run)
    entries = [_onnx_entry(job, p, row, verdict, int8_reports.get(p)) for p, (row, verdict) in verdicts.items()]
    if job.tensorrt is not None:
        entries += _engines(job)
    entries.append(_weights(job, gate_run.reference))
    write_json_atomic(job.work / LABELS, job.labels)
    return _manifest(job, entries, gate_run, batch_diff, calibration,
                     all(ok for _, (ok, _) in verdicts.values()))


def _float_files(job: _Job) -> tuple[Path, float]:
    """BN-folded FP32 ONNX (checked at batch 1 and 7) and, if asked, FP16."""
    with job.timed("onnx_fp32"):
        fp32 = export_fp32(fold_batchnorm(job.restored.model), job.work / FP32.onnx_file, job.preprocess.crop)
        batch_diff = _check_batches(job.restored.model, fp32, job.preprocess.crop)
    log.info("fp32: %s (%s), batch 1/7 max |diff| vs PyTorch %.2g", fp32.name,
             ", ".join(f"{k} {v}" for k, v in sorted(op_counts(onnx.load(str(fp32))).items())), batch_diff)
    if "fp16" in job.options.precisions:
        with job.timed("onnx_fp16"):
            quantize.convert_fp16(fp32, job.work / FLAVOURS["fp16"].onnx_file)
    return fp32, batch_diff


def _check_batches(model: torch.nn.Module, path: Path, input_size: int) -> float:
    """Run the FP32 file at batch 1 and 7 (the batch axis must really be dynamic)."""
    worst = 0.0
    with OnnxRuntimeBackend(path, FP32.name, providers=["CPUExecutionProvider"]) as backend:
        for n in (1, 7):
            x = torch.randn(n, 3, input_size, input_size, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                expected = model(x).numpy()
            worst = max(worst, float(np.abs(backend.infer(x.numpy()) - expected).max()))
    budget = FP32.budget.max_logit_diff
    if worst > budget:
        raise ExportError(f"FP32 ONNX differs from PyTorch by {worst:.3g} at batch 1/7 (budget {budget:g})")
    return worst


def _gate_images(job: _Job) -> _Gate:
    """The gate images in memory (serving's centre crop) with PyTorch FP32's logits."""
    from tqdm import tqdm

    with job.timed("gate_images"):
        split = job.gate_split.sample(job.options.eval_images)
        images, labels, logits = [], [], []
        model = job.restored.model.eval()
        with tqdm(total=len(split), desc="gate images", unit="img", leave=False, disable=not job.progress) as bar:
            for crops, batch_labels in iter_crops(split, job.preprocess, "center", 50):
                with torch.no_grad():
                    logits.append(model(torch.from_numpy(crops)).numpy())
                images.append(crops)
                labels.append(batch_labels)
                bar.update(len(batch_labels))
        gate_set = EvalSet(np.concatenate(images), np.concatenate(labels), np.concatenate(logits))
        reference, _ = gate.measure(gate_set.ref, gate_set.labels, {})
    return _Gate(gate_set, reference, _budgets(job.options))


def _budgets(options: ExportOptions) -> dict:
    budgets = {p: dict(v) for p, v in gate.BUDGETS.items()}
    if options.int8_min_agreement is not None:
        for name, flavour in FLAVOURS.items():
            if flavour.is_int8:
                budgets[name]["min_agreement"] = options.int8_min_agreement
    return budgets


def _int8_files(job: _Job, fp32: Path, gate_run: _Gate) -> tuple[dict | None, dict[str, dict]]:
    """Calibrate once, then quantize (with sensitivity and fallback) every INT8 flavour asked for."""
    if not job.int8_precisions:
        return None, {}
    with job.timed("calibration_tensors"):
        tensors, calibration = _calibration(job)
    settings = replace(job.options.int8, method=job.options.calib_method, progress=job.progress,
                       budgets=gate_run.budgets,
                       **({"sensitivity": "on", "fallback": False} if job.options.report_only else {}))
    reports = {}
    with qdq.Prepared(fp32, job.work) as prepared:
        for p in job.int8_precisions:
            reports[p] = int8.build(prepared, p, job.work / FLAVOURS[p].onnx_file, tensors, gate_run.images,
                                    gate_run.reference, settings)
            job.timings[f"quantize_{p}"] = reports[p]["seconds"]
            _report_int8(job.report, p, reports[p])
    tables = {p: rep["sensitivity"] for p, rep in reports.items() if rep["sensitivity"]}
    if tables:
        write_json_atomic(job.work / SENSITIVITY, tables)
    return calibration, reports


def _calibration(job: _Job) -> tuple[np.ndarray, dict]:
    """The calibration tensors (cached across re-exports by data, count and preprocessing)."""
    options, spec, preprocess = job.options, job.calib_spec, job.preprocess
    key = quantize.calibration_key(spec, options.calib_images, preprocess.to_dict())
    tensors = quantize.cached_calibration(key, [job.out, job.work], job.work)
    if tensors is None:
        split = load_calibration_images(spec, data_root=options.data_root,
                                        input_size=preprocess.input_size).sample(options.calib_images)
        if len(split) < options.calib_images:
            log.warning("calibration: %s has %d training images, fewer than --calib-images %d",
                        spec, len(split), options.calib_images)
        tensors = np.concatenate([crops for crops, _ in iter_crops(split, preprocess, "center", 64)])
        quantize.save_calibration(key, tensors, job.work)
    source = {"dataset": spec, "images": int(len(tensors)), "method": options.calib_method}
    return tensors, source | _file_entry(job.work, f"{quantize.CALIB_DIR}/{key}.npy")


def _judge(job: _Job, gate_run: _Gate) -> dict[str, tuple[dict, tuple[bool, str]]]:
    """Every ONNX file on ONNX Runtime CPU against PyTorch FP32: ``{precision: (row, verdict)}``."""
    with job.timed("accuracy_gate"):
        logits = {}
        for p in job.options.precisions:
            fused = qdq.form(p).fused_gate if FLAVOURS[p].is_int8 else True
            logits[p] = qdq.run(qdq.session(job.work / FLAVOURS[p].onnx_file, fused=fused), gate_run.images.x)[0]
        _, rows = gate.measure(gate_run.images.ref, gate_run.images.labels, logits)
    verdicts = {p: gate.judge(p, rows[p], gate_run.reference, gate_run.budgets) for p in job.options.precisions}
    kind = "test" if gate_run.images.labelled else "unlabelled"
    job.report(f"accuracy on {len(gate_run.images.labels)} {job.gate_spec} {kind} images "
               "(ONNX Runtime CPU vs PyTorch FP32, centre crop):")
    job.report(gate.format_table(gate_run.reference, rows, verdicts))
    return {p: (rows[p], verdicts[p]) for p in job.options.precisions}


def _report_int8(report: Callable[[str], None], precision: str, result: dict) -> None:
    before, after = result["before"], result["after"]
    if result["sensitivity"]:
        report(f"{precision}: per-layer sensitivity (each layer quantized alone, worst first):")
        report(int8.format_sensitivity(precision, result["sensitivity"]))
    line = f"{precision}: {result['method']} ranges, agreement {before['top1_agreement']:.2f}%"
    if result["fallback"]:
        line += (f" -> {after['top1_agreement']:.2f}% with {len(result['float_layers'])} layer(s) in float "
                 f"({', '.join(result['float_layers'])}); {result['int8_mac_share']:.1f}% of MACs in INT8")
    report(line + f" ({result['seconds']:.1f} s)")


# --------------------------------------------------------------------------- manifest entries

def _file_entry(directory: Path, name: str) -> dict:
    path = directory / name
    return {"file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _onnx_entry(job: _Job, precision: str, row: dict, verdict: tuple[bool, str], int8_report: dict | None) -> dict:
    flavour = FLAVOURS[precision]
    return {"kind": "onnx", "precision": precision, **_file_entry(job.work, flavour.onnx_file),
            "backends": list(flavour.runtimes), **row, "within_budget": verdict[0], "budget": verdict[1],
            **({"quantization": _int8_summary(int8_report)} if int8_report else {})}


def _int8_summary(result: dict) -> dict:
    """What the manifest keeps of an INT8 report (the per-layer table is in sensitivity.json)."""
    keys = ("top1", "top1_agreement", "logit_sqnr_db")
    return {"method": result["method"], "overflow_fix": result["overflow_fix"],
            "float_layers": result["float_layers"], "int8_mac_share": result["int8_mac_share"],
            "quantizable_layers": result["quantizable_layers"], "fallback": result["fallback"],
            "before_fallback": {k: result["before"][k] for k in keys},
            "most_sensitive": [row["layer"] for row in (result["sensitivity"] or [])[:5]],
            "seconds": result["seconds"]}


def _weights(job: _Job, reference: dict) -> dict:
    """``model.pt``: the unfolded network's state_dict, for the ``pytorch`` reference backend.

    The gate's PyTorch FP32 row is its accuracy (it is the reference every budget is judged
    against). Readable with ``torch.load(weights_only=True)``.
    """
    restored = job.restored
    save_weights(restored.model, job.work / WEIGHTS_FILE, restored.arch, restored.shortcut, restored.num_classes)
    return {"kind": "pytorch", "precision": FP32.name, **_file_entry(job.work, WEIGHTS_FILE),
            "backends": ["pytorch"], **reference, "within_budget": True, "budget": "reference"}


def _engines(job: _Job) -> list[dict]:
    entries = []
    for p in (p for p in job.options.precisions if FLAVOURS[p].builds_engine):
        name = job.tensorrt.engine_file_name(p)
        stamp = job.tensorrt.build_engine(job.work / FLAVOURS[p].onnx_file, job.work / name, precision=p,
                                          input_size=job.preprocess.crop, max_batch=job.options.max_batch,
                                          workspace_gib=job.options.workspace_gib,
                                          timing_cache=job.work / "timing.cache")
        job.timings[f"engine_{p}"] = stamp["build_seconds"]
        entries.append({"kind": "engine", "precision": p, **_file_entry(job.work, name), "backends": [TENSORRT],
                        "onnx": FLAVOURS[p].onnx_file, **stamp})
    return entries


def _manifest(job: _Job, entries: list[dict], gate_run: _Gate, batch_diff: float, calibration: dict | None,
              all_within_budget: bool) -> Manifest:
    options, restored, preprocess = job.options, job.restored, job.preprocess
    versions = {"resdeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "tensorrt": next((e["tensorrt_version"] for e in entries if e["kind"] == "engine"), None)}
    return Manifest.from_dict({
        "schema_version": SCHEMA_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": restored.arch, "shortcut": restored.shortcut, "num_classes": restored.num_classes,
        "input_size": preprocess.input_size, "preprocess": preprocess.to_dict(),
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32"},
        "output": {"name": "logits", "dtype": "float32"}, "labels": _file_entry(job.work, LABELS),
        "source": {"checkpoint": Path(options.checkpoint).name, "sha256": sha256_file(options.checkpoint),
                   "epoch": restored.meta.get("epoch")},
        "eval": {"dataset": job.gate_spec, "images": len(gate_run.images.labels), "tta": "center",
                 "labelled": gate_run.images.labelled, "pytorch_fp32": gate_run.reference,
                 "batch_1_7_max_logit_diff": batch_diff, "cpu": cpu_isa()},
        "calibration": calibration, "artifacts": entries, "versions": versions,
        **({"sensitivity": _file_entry(job.work, SENSITIVITY)} if (job.work / SENSITIVITY).exists() else {}),
        "accepted_accuracy_drop": bool(options.accept_accuracy_drop and not all_within_budget),
        "options": {k: (asdict(v) if k == "int8" else v) for k, v in vars(options).items() if k != "progress"},
    }, "the new manifest")
