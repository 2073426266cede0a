"""Accuracy of every backend x precision of an artifact directory against the PyTorch FP32 reference.

    python bench/accuracy.py artifacts/digits --dataset digits [--limit N] [--json OUT]

Every row sees the same images, preprocessed once per TTA mode with exactly the serving code
(``serving.preprocess.preprocess`` with the manifest's constants), and scores them the way the
service does: softmax per crop, probabilities averaged over the crops (in float64). Rows:

* ``pytorch`` ``fp32``: the unfolded ``model.pt`` on the CPU, the reference every other row is
  compared with;
* ``pytorch-cuda`` ``fp32`` / ``fp16``: the same ``model.pt`` on the GPU (fp32 with PyTorch's default
  cuDNN TF32 setting, fp16 by ``model.half()``), only where torch sees a CUDA GPU;
* ``onnxruntime`` on the CPU provider, one row per ONNX file in the manifest (fp32, fp16, int8,
  int8-cpu: int8 is TensorRT's symmetric form, which ORT runs too, only slower, and on x86 CPUs
  without VNNI less accurately: its fused u8s8 kernels saturate where TensorRT does not, so the
  export gate judges that file by its exact Q/DQ semantics instead, docs/design.md#int8);
* ``tensorrt``, one row per engine in the manifest, when TensorRT and a matching GPU are usable
  (otherwise the reason is printed and the rows are left out, never replaced by something else);

each for ``center`` and ``ten_crop``. ``delta_top1`` (percentage points), ``top1_agreement`` (%) and
``max_logit_diff`` (max |logit| difference over all crops) compare with PyTorch FP32 on the same TTA.
Every artifact file is sha256-checked against the manifest before it is loaded.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs as `python bench/accuracy.py` from anywhere

import argparse  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from resdeploy.cli import OneLineParser  # noqa: E402
from resdeploy.errors import ArtifactError, BackendError, ResdeployError  # noqa: E402
from serving.artifacts import read_manifest, verify_file  # noqa: E402
from serving.preprocess import TTA_MODES, PreprocessConfig, preprocess  # noqa: E402

from bench.common import format_table, machine_header, machine_info, write_results  # noqa: E402

PROG = "bench/accuracy.py"
DEFAULT_JSON = os.path.join("bench", "results", "accuracy.json")
COLUMNS = ["backend", "precision", "tta", "top1", "top5", "delta_top1", "top1_agreement",
           "max_logit_diff", "n"]


# --------------------------------------------------------------------------- data

def select_images(split, limit: int | None, seed: int):
    """The evaluated images: all of ``split``, or a seeded random ``limit`` of them (sorted indices)."""
    from training.data import Split

    if limit is None or limit >= len(split):
        return split
    idx = np.sort(np.random.default_rng(seed).choice(len(split), size=limit, replace=False))
    return Split(split.labels[idx], None if split.images is None else split.images[idx],
                 None if split.paths is None else [split.paths[i] for i in idx])


def iter_batches(split, cfg: PreprocessConfig, tta: str, batch_images: int):
    """Yield ``(crops, n_crops)``: (k * n_crops, 3, c, c) float32 for k images at a time."""
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # Pillow releases the GIL
        for start in range(0, len(split), batch_images):
            idx = range(start, min(start + batch_images, len(split)))
            crops = list(pool.map(lambda i: preprocess(split.image(i), cfg, tta), idx))
            yield np.concatenate(crops), crops[0].shape[0]


# --------------------------------------------------------------------------- backends

def _tensorrt_skip_reason() -> str | None:
    """Why TensorRT engines cannot run here, or None when TensorRT, pycuda and a GPU are present."""
    try:
        import importlib

        importlib.import_module("tensorrt")
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device visible"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def load_backends(directory: Path, manifest: dict, threads: int | None, log) -> list:
    """``[(backend, precision, activated Backend)]``, the PyTorch reference first.

    Raises:
        ArtifactError: no ``model.pt`` entry, a missing file or a hash mismatch.
        BackendError: the reference or an ONNX file cannot be loaded (an artifact that should run).
    """
    from serving.backends.onnxruntime import OnnxRuntimeBackend
    from training.torch_backend import TorchBackend

    entries = manifest["artifacts"]
    ref = next((e for e in entries if e.get("kind") == "pytorch" and e["precision"] == "fp32"), None)
    if ref is None:
        raise ArtifactError(f"{directory} has no PyTorch reference (model.pt) in its manifest; "
                            "re-export it with `resdeploy export`")
    weights = verify_file(directory, ref)
    out = [("pytorch", "fp32", TorchBackend(weights, manifest, device="cpu").activate())]
    import torch

    if torch.cuda.is_available():
        for half in (False, True):
            b = TorchBackend(weights, manifest, device="cuda", half=half)
            out.append(("pytorch-cuda", b.precision, b.activate()))
    else:
        log("pytorch-cuda: skipped (torch.cuda.is_available() is False)")
    for e in entries:
        if e.get("kind", "onnx") == "onnx":
            b = OnnxRuntimeBackend(verify_file(directory, e), e["precision"], ["CPUExecutionProvider"], threads)
            out.append(("onnxruntime", e["precision"], b.activate()))
    engines = [e for e in entries if e.get("kind") == "engine"]
    if not engines:
        log("tensorrt: skipped (no engines in the manifest; export with --trt on a GPU host)")
        return out
    reason = _tensorrt_skip_reason()
    if reason:
        log(f"tensorrt: skipped {len(engines)} engine(s): TensorRT not usable here ({reason})")
        return out
    from serving.backends.tensorrt import TensorRTBackend

    for e in engines:
        try:
            b = TensorRTBackend(verify_file(directory, e), e["precision"], e).activate()
        except (BackendError, ArtifactError) as err:  # e.g. an engine built for another GPU
            log(f"tensorrt {e['precision']}: skipped ({err})")
            continue
        out.append(("tensorrt", e["precision"], b))
    return out


def infer(backend, batch: np.ndarray) -> np.ndarray:
    """Logits of ``batch``, split into chunks no larger than the backend's ``max_batch_size``."""
    step = backend.max_batch_size or len(batch)
    return np.concatenate([backend.infer(batch[i:i + step]) for i in range(0, len(batch), step)])


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- evaluation

def evaluate(backends: list, split, cfg: PreprocessConfig, ttas: list[str], batch_images: int = 64,
             progress: bool = False) -> list[dict]:
    """One row per backend x precision x TTA; ``backends[0]`` is the reference."""
    from tqdm import tqdm

    rows = []
    labels = np.asarray(split.labels)
    for tta in ttas:
        probs = [[] for _ in backends]
        max_diff = [0.0] * len(backends)
        bar = tqdm(total=len(split), desc=tta, unit="img", disable=not progress, leave=False)
        for crops, n_crops in iter_batches(split, cfg, tta, batch_images):
            ref_logits = None
            for j, (_, _, b) in enumerate(backends):
                logits = infer(b, crops)
                if ref_logits is None:
                    ref_logits = logits
                max_diff[j] = max(max_diff[j], float(np.max(np.abs(logits.astype(np.float64) - ref_logits))))
                p = softmax64(logits)
                probs[j].append(p.reshape(-1, n_crops, p.shape[1]).mean(axis=1))
            bar.update(len(crops) // n_crops)
        bar.close()
        ref_pred = None
        ref_top1 = None
        for j, (name, precision, _) in enumerate(backends):
            p = np.concatenate(probs[j])
            k = min(5, p.shape[1])
            topk = np.argsort(-p, axis=1, kind="stable")[:, :k]
            pred = topk[:, 0]
            top1 = 100.0 * float(np.mean(pred == labels))
            top5 = 100.0 * float(np.mean((topk == labels[:, None]).any(axis=1)))
            if ref_pred is None:
                ref_pred, ref_top1 = pred, top1
            rows.append({"backend": name, "precision": precision, "tta": tta,
                         "top1": round(top1, 4), "top5": round(top5, 4),
                         "delta_top1": round(top1 - ref_top1, 4),
                         "top1_agreement": round(100.0 * float(np.mean(pred == ref_pred)), 4),
                         "max_logit_diff": float(f"{max_diff[j]:.3g}"), "n": int(len(labels))})
    return rows


# --------------------------------------------------------------------------- reporting

def table(rows: list[dict]) -> str:
    """The printed table; logit differences in scientific notation (1e-5 would print as 0.000)."""
    shown = [r | {"max_logit_diff": f"{r['max_logit_diff']:.2e}",
                  "delta_top1": f"{r['delta_top1']:+.2f}"} for r in rows]
    return format_table(shown, COLUMNS)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Top-1/top-5 of every backend and precision of an artifact "
                      "directory vs the PyTorch FP32 reference, with the serving preprocessing.")
    p.add_argument("directory", metavar="DIR", help="artifact directory written by `resdeploy export`")
    p.add_argument("--dataset", required=True, metavar="D",
                   help="digits, cifar10 or a directory (CIFAR-10 batches or ImageFolder); its test split is used")
    p.add_argument("--data-root", default="data", help="where cifar10 lives (default: data)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate a seeded random subset of N test images (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default: 0)")
    p.add_argument("--tta", default=",".join(TTA_MODES),
                   help=f"comma-separated TTA modes from {', '.join(TTA_MODES)} (default: both)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--batch-images", type=int, default=64, help="images per inference batch (default: 64)")
    p.add_argument("--json", default=DEFAULT_JSON, metavar="OUT", help=f"results file (default: {DEFAULT_JSON})")
    p.add_argument("--csv", default=None, metavar="OUT", help="also write the rows as CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluate every backend x precision x TTA; print the table, write the JSON. Returns the exit status."""
    args = build_parser().parse_args(argv)
    err = lambda msg: print(f"{PROG}: error: {msg}", file=sys.stderr)  # noqa: E731
    skipped: list[str] = []  # printed now, recorded in the JSON's meta

    def log(msg: str) -> None:
        skipped.append(msg)
        print(msg, file=sys.stderr, flush=True)

    ttas = [t.strip() for t in args.tta.split(",") if t.strip()]
    bad = [t for t in ttas if t not in TTA_MODES]
    if bad or not ttas:
        err(f"unknown --tta {','.join(bad) or repr(args.tta)}; choose from {', '.join(TTA_MODES)}")
        return 2
    for flag, value in (("--limit", args.limit), ("--batch-images", args.batch_images)):
        if value is not None and value <= 0:
            err(f"{flag} must be a positive integer, got {value}")
            return 2
    if args.threads < 0:
        err(f"--threads must be >= 0 (0: ONNX Runtime's default), got {args.threads}")
        return 2
    directory = Path(args.directory)
    t0 = time.perf_counter()
    try:
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory {directory} does not exist; create one with "
                                "`resdeploy export CKPT --arch A --out DIR`")
        manifest = read_manifest(directory)
        cfg = PreprocessConfig.from_dict(manifest["preprocess"])
        from training.data import load_dataset

        data = load_dataset(args.dataset, data_root=args.data_root, input_size=cfg.input_size)
        if len(data.classes) != manifest["num_classes"]:
            raise ResdeployError(f"dataset {args.dataset!r} has {len(data.classes)} classes but the model in "
                                 f"{directory} has {manifest['num_classes']}; pass the dataset it was trained on")
        split = select_images(data.test, args.limit, args.seed)
        backends = load_backends(directory, manifest, args.threads or None, log)
        try:
            rows = evaluate(backends, split, cfg, ttas, args.batch_images,
                            progress=not args.no_progress and sys.stderr.isatty())
        finally:
            for _, _, b in backends:
                b.deactivate()
    except ResdeployError as e:
        err(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    machine = machine_info()
    meta = {"artifacts": str(directory.resolve()), "arch": manifest["arch"], "dataset": args.dataset,
            "split": "test", "images": len(split), "limit": args.limit, "seed": args.seed, "tta": ttas,
            "preprocess": cfg.to_dict(), "reference": "pytorch fp32",
            "onnxruntime_providers": ["CPUExecutionProvider"],
            "tta_scoring": "softmax per crop, averaged over crops (float64)",
            "skipped": skipped, "seconds": round(time.perf_counter() - t0, 2)}
    print(f"accuracy: {manifest['arch']} from {directory} on {args.dataset} test "
          f"({len(split)} images{f', seeded subset {args.seed}' if args.limit and len(split) < len(data.test) else ''})")
    print(machine_header(machine, args.threads or None))
    print(table(rows))
    write_results(rows, args.json, args.csv, meta, machine)
    print(f"wrote {args.json}" + (f" and {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
