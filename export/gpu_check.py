"""Check TensorRT engines against ONNX Runtime on a GPU host, and time them.

    python -m export.gpu_check DIR [--precisions fp16,int8] [--eval-data digits] [--iters 50] [--json OUT]

For each precision: use the artifact directory's engine when its stamp matches this host, else build
one into a temporary directory; run the eval images through TensorRT and through ONNX Runtime (CPU,
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
import time
from pathlib import Path

import numpy as np

from export.tensorrt import ENGINE_PRECISIONS, TIMING_CACHE, build_engine, engine_file_name, gpu_info, tensorrt_status
from resdeploy.errors import ArtifactError, ConfigError, ResdeployError
from serving.backends.tensorrt import check_engine_stamp

TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}  # atol = rtol, applied to mean |diff| of logits


def _precisions(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in ENGINE_PRECISIONS]
    if bad or not out:
        hint = " ('int8-cpu' is ONNX Runtime-only; check TensorRT with 'int8')" if "int8-cpu" in bad else ""
        raise argparse.ArgumentTypeError(f"bad precision(s) {bad or text!r}; choose from "
                                         f"{list(ENGINE_PRECISIONS)}, comma-separated{hint}")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="artifact directory (manifest.json, ONNX files, optional engines)")
    p.add_argument("--precisions", type=_precisions, default=["fp16", "int8"], help="default: fp16,int8")
    p.add_argument("--eval-data", default=None, help="dataset for inputs and top-1 (default: the manifest's "
                   "'dataset', else digits)")
    p.add_argument("--limit", type=int, default=1000, help="at most this many eval images (default 1000)")
    p.add_argument("--iters", type=int, default=50, help="timed iterations per batch size (default 50)")
    p.add_argument("--max-batch", type=int, default=32, help="max batch of engines built here (default 32)")
    p.add_argument("--int8-max-drop", type=float, default=0.01,
                   help="allowed top-1 drop of int8 vs ONNX Runtime fp32, as a fraction (default 0.01)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p


def _eval_set(name: str, manifest: dict, limit: int):
    """(inputs float32 NCHW, labels, class count) through the artifact's own preprocessing."""
    from serving.preprocess import PreprocessConfig, preprocess
    from training.data import load_dataset

    cfg = PreprocessConfig.from_dict(manifest["preprocess"])
    split = load_dataset(name).test
    n = min(len(split), limit)
    x = np.concatenate([preprocess(split.image(i), cfg, "center") for i in range(n)])
    labels = np.asarray(split.labels[:n])
    if labels.max() >= manifest["num_classes"]:
        raise ConfigError(f"--eval-data {name} has labels up to {labels.max()} but the model has "
                          f"{manifest['num_classes']} classes; pass the dataset the model was trained on")
    return x, labels, cfg.crop


def _run(backend, x: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([backend.infer(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def _median_ms(backend, batch: np.ndarray, iters: int) -> float:
    for _ in range(max(3, iters // 5)):  # warm-up: lazy allocations, clocks
        backend.infer(batch)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        backend.infer(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _engine_for(directory: Path, manifest: dict, precision: str, onnx_path: Path, host: tuple, tmp: Path,
                input_size: int, max_batch: int):
    """(engine path, stamp, source): the directory's engine if it fits this host, else a fresh build."""
    from serving.artifacts import find_artifact, verify_file

    try:
        entry = find_artifact(manifest, precision, "engine")
    except ArtifactError:
        entry, source = None, "built"
    if entry is not None:
        stamp = entry.get("stamp", entry)
        try:
            check_engine_stamp(stamp, *host)
            return verify_file(directory, entry), stamp, "manifest"
        except ArtifactError as e:
            print(f"gpu_check: {precision}: not using the directory's engine: {e}", file=sys.stderr)
            source = "rebuilt"
    path = tmp / engine_file_name(precision)
    stamp = build_engine(onnx_path, path, precision=precision, input_size=input_size, max_batch=max_batch,
                         timing_cache=tmp / TIMING_CACHE)
    return path, stamp, source


def check(args) -> dict:
    import onnxruntime
    import tensorrt

    from serving.artifacts import find_artifact, read_manifest, verify_file
    from serving.backends.onnxruntime import OnnxRuntimeBackend
    from serving.backends.tensorrt import TensorRTBackend

    manifest = read_manifest(args.dir)
    gpu_name, cc = gpu_info(0)
    host = (tensorrt.__version__, gpu_name, cc)
    data = args.eval_data or manifest.get("dataset") or "digits"
    x, labels, size = _eval_set(data, manifest, args.limit)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for p in args.precisions:
            onnx_path = verify_file(args.dir, find_artifact(manifest, p, "onnx"))
            engine, stamp, source = _engine_for(args.dir, manifest, p, onnx_path, host, Path(tmp), size,
                                                args.max_batch)
            ref_path = verify_file(args.dir, find_artifact(manifest, "fp32", "onnx")) if p == "int8" else onnx_path
            with OnnxRuntimeBackend(ref_path, "fp32" if p == "int8" else p, providers=["CPUExecutionProvider"]) as ort:
                ref = _run(ort, x, 64)
            with TensorRTBackend(engine, p, stamp) as trt_backend:
                got = _run(trt_backend, x, trt_backend.max_batch_size)
                b10 = min(10, trt_backend.max_batch_size)
                ms1 = _median_ms(trt_backend, x[:1], args.iters)
                ms10 = _median_ms(trt_backend, np.resize(x, (b10, *x.shape[1:])), args.iters)
            r = {"precision": p, "engine": source, "engine_bytes": stamp.get("bytes"),
                 "top1_tensorrt": float(np.mean(got.argmax(1) == labels)),
                 "top1_onnxruntime": float(np.mean(ref.argmax(1) == labels)),
                 "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                 "timed_batch": b10, "latency_ms_b1": round(ms1, 4), "latency_ms_b10": round(ms10, 4),
                 "images_per_s_b10": round(b10 / ms10 * 1e3, 1)}
            if p == "int8":
                r["metric"] = "top-1 drop vs ORT fp32"
                r["value"] = r["top1_onnxruntime"] - r["top1_tensorrt"]
                r["limit"] = args.int8_max_drop
            else:
                tol = TOLERANCE[p]
                r["metric"] = "mean |logit diff|"
                r["value"] = float(np.mean(np.abs(got - ref)))
                r["limit"] = tol + tol * float(np.mean(np.abs(ref)))
            r["passed"] = bool(r["value"] <= r["limit"])
            results.append(r)
    return {"gpu_name": gpu_name, "compute_capability": cc, "tensorrt_version": tensorrt.__version__,
            "onnxruntime_version": onnxruntime.__version__, "artifact_dir": str(args.dir), "eval_data": data,
            "images": int(len(x)), "iters": args.iters, "results": results,
            "passed": all(r["passed"] for r in results)}


def _table(report: dict) -> str:
    lines = [f"GPU {report['gpu_name']} (compute capability {report['compute_capability']}), "
             f"TensorRT {report['tensorrt_version']}, ONNX Runtime {report['onnxruntime_version']} (CPU reference); "
             f"{report['images']} {report['eval_data']} images",
             f"{'precision':<9} {'engine':<12} {'check':<24} {'value':>9} {'limit':>9} {'ok':<4} "
             f"{'top1 trt':>8} {'top1 ort':>8} {'b1 ms':>8} {'b10 ms':>8}"]
    for r in report["results"]:
        lines.append(f"{r['precision']:<9} {r['engine'][:12]:<12} {r['metric']:<24} {r['value']:>9.4g} "
                     f"{r['limit']:>9.4g} {'yes' if r['passed'] else 'NO':<4} {r['top1_tensorrt']:>8.4f} "
                     f"{r['top1_onnxruntime']:>8.4f} {r['latency_ms_b1']:>8.3f} {r['latency_ms_b10']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    usable, reason = tensorrt_status()
    if not usable:
        print(f"gpu_check: cannot run: {' '.join(reason.split())}", file=sys.stderr)
        return 2
    if args.iters < 1 or args.limit < 1 or args.max_batch < 1:
        print("gpu_check: --iters, --limit and --max-batch must be >= 1", file=sys.stderr)
        return 2
    try:
        report = check(args)
    except ResdeployError as e:
        print(f"gpu_check: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
