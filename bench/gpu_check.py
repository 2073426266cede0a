"""Check TensorRT engines against ONNX Runtime on a GPU host, and time them.

    python -m bench.gpu_check DIR [--precisions fp16,int8] [--eval-data D] [--iters 50] [--json OUT]

For each precision: use the artifact directory's engine when its stamp matches this host, else build
one into a temporary directory; run the eval images (``--eval-data``, by default the data the export
gate measured, ``eval.dataset`` in manifest.json) through TensorRT and through ONNX Runtime (CPU,
the reference every artifact's accuracy was measured with at export time) and compare:

* fp32 / fp16: the same ONNX file on both sides; mean |trt - ort| <= tol + tol * mean |ort| with
  tol 1e-3 (fp32, TF32 off) or 1e-2 (fp16), Polygraphy's Comparator tolerances (docs/design.md);
* int8: top-1 on the eval set against ONNX Runtime on the fp32 file, at most --int8-max-drop lower.

Then TensorRT latency at batch 1 and 10 (median over --iters after warm-up; host<->device copies
included, as a serving call sees them). Exits 0 when every check passes, 1 when one fails, 2 with one
line when TensorRT or a GPU is absent or the directory is unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from backends.tensorrt import gpu_info, tensorrt_status
from bench.common import run_reporting_errors
from bench.latency import build_engine_file, usable_engine
from core.errors import ConfigError
from core.flavours import ENGINE_PRECISIONS, FLAVOURS, FP16, FP32, INT8, TENSORRT, for_runtime
from core.manifest import Manifest, read_manifest, verify_file
from core.timing import time_calls
from resdeploy.cli import OneLineParser

PROG = "python -m bench.gpu_check"
TOLERANCE = {FP32.name: 1e-3, FP16.name: 1e-2}  # atol = rtol, applied to mean |diff| of logits
DEFAULT_PRECISIONS = [FP16.name, INT8.name]


def _precisions(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in ENGINE_PRECISIONS]
    if bad or not names:
        other_runtime = [FLAVOURS[name] for name in bad if name in FLAVOURS]
        hint = "".join(f" ({f.name!r} is {f.runtime_names}-only; check TensorRT with "
                       f"{for_runtime(f.number_format, TENSORRT).name!r})" for f in other_runtime)
        raise argparse.ArgumentTypeError(f"bad precision(s) {bad or text!r}; choose from "
                                         f"{list(ENGINE_PRECISIONS)}, comma-separated{hint}")
    return names


def _parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="artifact directory (manifest.json, ONNX files, optional engines)")
    parser.add_argument("--precisions", type=_precisions, default=DEFAULT_PRECISIONS,
                        help=f"default: {','.join(DEFAULT_PRECISIONS)}")
    parser.add_argument("--eval-data", default=None, help="dataset for inputs and top-1 (default: the one the export "
                        "gate measured, eval.dataset in manifest.json; digits if it records none)")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many eval images, a seeded sample "
                        "(default 1000)")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per batch size (default 50)")
    parser.add_argument("--max-batch", type=int, default=32, help="max batch of engines built here (default 32)")
    parser.add_argument("--int8-max-drop", type=float, default=0.01,
                        help="allowed top-1 drop of int8 vs ONNX Runtime fp32, as a fraction (default 0.01)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return parser


def _eval_set(name: str, manifest: Manifest, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs float32 NCHW, labels): a seeded sample of ``limit`` test images, centre crops through
    the artifact's own preprocessing."""
    from core.preprocess import preprocess
    from training.data import load_dataset

    cfg = manifest.preprocess_config
    split = load_dataset(name, input_size=cfg.input_size).test.sample(limit)
    x = np.concatenate([preprocess(split.image(i, cfg.resize), cfg, "center") for i in range(len(split))])
    labels = np.asarray(split.labels)
    if labels.max() >= manifest.num_classes:
        raise ConfigError(f"--eval-data {name} has labels up to {labels.max()} but the model has "
                          f"{manifest.num_classes} classes; pass the dataset the model was trained on")
    return x, labels


def _logits(backend, x: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([backend.infer(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def _median_ms(backend, batch: np.ndarray, iters: int) -> float:
    """Median of exactly ``iters`` timed calls after ``max(3, iters // 5)`` warm-ups (lazy allocations, clocks)."""
    ms = time_calls(lambda: backend.infer(batch), budget_s=0.0, warmup=max(3, iters // 5), min_iters=iters,
                    max_iters=iters)
    return float(np.median(ms))


def _engine_for(directory: Path, manifest: Manifest, precision: str, onnx_path: Path, host: tuple, work: Path,
                input_size: int, max_batch: int) -> tuple[Path, dict, str]:
    """(engine path, stamp, source): the directory's engine if it fits this host, else a fresh build."""
    engine = usable_engine(directory, manifest, precision, host,
                           log=lambda msg: print(f"gpu_check: {msg}", file=sys.stderr))
    if engine is not None:
        return (*engine, "manifest")
    source = "rebuilt" if manifest.has(precision, "engine") else "built"
    return (*build_engine_file(onnx_path, precision, input_size, max_batch, work), source)


def check(args) -> dict:
    import onnxruntime
    import tensorrt

    from backends.onnxruntime import OnnxRuntimeBackend
    from backends.tensorrt import TensorRTBackend

    manifest = read_manifest(args.dir)
    gpu_name, cc = gpu_info(0)
    host = (tensorrt.__version__, gpu_name, cc)
    data = args.eval_data or manifest.eval_dataset or "digits"
    x, labels = _eval_set(data, manifest, args.limit)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for precision in args.precisions:
            onnx_path = verify_file(args.dir, manifest.find(precision))
            engine, stamp, source = _engine_for(args.dir, manifest, precision, onnx_path, host, Path(tmp),
                                                manifest.crop, args.max_batch)
            # int8 is judged by top-1 against the fp32 file; a float flavour by its own file's logits
            ref_precision = FP32.name if FLAVOURS[precision].is_int8 else precision
            ref_path = verify_file(args.dir, manifest.find(ref_precision)) if ref_precision != precision else onnx_path
            with OnnxRuntimeBackend(ref_path, ref_precision, providers=["CPUExecutionProvider"]) as ort:
                ref = _logits(ort, x, 64)
            with TensorRTBackend(engine, precision, stamp) as trt_backend:
                got = _logits(trt_backend, x, trt_backend.max_batch_size)
                b10 = min(10, trt_backend.max_batch_size)
                ms1 = _median_ms(trt_backend, x[:1], args.iters)
                ms10 = _median_ms(trt_backend, np.resize(x, (b10, *x.shape[1:])), args.iters)
            result = {"precision": precision, "engine": source, "engine_bytes": stamp.get("bytes"),
                      "top1_tensorrt": float(np.mean(got.argmax(1) == labels)),
                      "top1_onnxruntime": float(np.mean(ref.argmax(1) == labels)),
                      "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                      "timed_batch": b10, "latency_ms_b1": round(ms1, 4), "latency_ms_b10": round(ms10, 4),
                      "images_per_s_b10": round(b10 / ms10 * 1e3, 1)}
            if FLAVOURS[precision].is_int8:
                result["metric"] = f"top-1 drop vs ORT {FP32.name}"
                result["value"] = result["top1_onnxruntime"] - result["top1_tensorrt"]
                result["limit"] = args.int8_max_drop
            else:
                tol = TOLERANCE[precision]
                result["metric"] = "mean |logit diff|"
                result["value"] = float(np.mean(np.abs(got - ref)))
                result["limit"] = tol + tol * float(np.mean(np.abs(ref)))
            result["passed"] = bool(result["value"] <= result["limit"])
            results.append(result)
    return {"gpu_name": gpu_name, "compute_capability": cc, "tensorrt_version": tensorrt.__version__,
            "onnxruntime_version": onnxruntime.__version__, "artifact_dir": str(args.dir), "eval_data": data,
            "images": int(len(x)), "iters": args.iters, "results": results,
            "passed": all(result["passed"] for result in results)}


def _table(report: dict) -> str:
    lines = [f"GPU {report['gpu_name']} (compute capability {report['compute_capability']}), "
             f"TensorRT {report['tensorrt_version']}, ONNX Runtime {report['onnxruntime_version']} (CPU reference); "
             f"{report['images']} {report['eval_data']} images",
             f"{'precision':<9} {'engine':<12} {'check':<24} {'value':>9} {'limit':>9} {'ok':<4} "
             f"{'top1 trt':>8} {'top1 ort':>8} {'b1 ms':>8} {'b10 ms':>8}"]
    for result in report["results"]:
        lines.append(f"{result['precision']:<9} {result['engine'][:12]:<12} {result['metric']:<24} "
                     f"{result['value']:>9.4g} {result['limit']:>9.4g} {'yes' if result['passed'] else 'NO':<4} "
                     f"{result['top1_tensorrt']:>8.4f} {result['top1_onnxruntime']:>8.4f} "
                     f"{result['latency_ms_b1']:>8.3f} {result['latency_ms_b10']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    usable, reason = tensorrt_status(inference=True)
    if not usable:
        print(f"gpu_check: cannot run: {' '.join(reason.split())}", file=sys.stderr)
        return 2
    if args.iters < 1 or args.limit < 1 or args.max_batch < 1:
        print("gpu_check: --iters, --limit and --max-batch must be >= 1", file=sys.stderr)
        return 2
    return run_reporting_errors("gpu_check", lambda: _report(args))


def _report(args) -> int:
    report = check(args)
    print(_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
