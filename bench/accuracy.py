"""Accuracy of every backend x precision of an artifact directory against the PyTorch FP32 reference.

    python bench/accuracy.py artifacts/digits --dataset digits [--limit N] [--json OUT]

Every row sees the same images, preprocessed once per TTA mode with exactly the serving code
(``core.preprocess.preprocess`` with the manifest's constants), and scores them the way the
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

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import format_table, machine_header, machine_info, run_reporting_errors, write_results  # noqa: E402
from core.errors import ArtifactError, BackendError, ConfigError, DatasetError  # noqa: E402
from core.flavours import FP32, PYTORCH  # noqa: E402
from core.manifest import Manifest, read_manifest, verify_file  # noqa: E402
from core.preprocess import TTA_MODES, PreprocessConfig  # noqa: E402
from core.scores import softmax, top_k_indices  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402

PROG = "bench/accuracy.py"
DEFAULT_JSON = os.path.join("bench", "results", "accuracy.json")
COLUMNS = ["backend", "precision", "tta", "top1", "top5", "delta_top1", "top1_agreement",
           "max_logit_diff", "n"]


# --------------------------------------------------------------------------- backends

def load_backends(directory: Path, manifest: Manifest, threads: int | None, log) -> list:
    """``[(backend, precision, activated Backend)]``, the PyTorch reference first.

    Raises:
        ArtifactError: no ``model.pt`` entry, a missing file or a hash mismatch.
        BackendError: the reference or an ONNX file cannot be loaded (an artifact that should run).
    """
    import torch

    from backends.onnxruntime import OnnxRuntimeBackend
    from backends.pytorch import TorchBackend
    from backends.tensorrt import TensorRTBackend, tensorrt_status

    if not manifest.has(FP32.name, PYTORCH):
        raise ArtifactError(f"{directory} has no PyTorch reference (model.pt) in its manifest; "
                            "re-export it with `resdeploy export`")
    weights = verify_file(directory, manifest.find(FP32.name, PYTORCH))
    loaded = [("pytorch", FP32.name, TorchBackend(weights, manifest.crop, device="cpu").activate())]
    if torch.cuda.is_available():
        for half in (False, True):
            backend = TorchBackend(weights, manifest.crop, device="cuda", half=half)
            loaded.append(("pytorch-cuda", backend.precision, backend.activate()))
    else:
        log("pytorch-cuda: skipped (torch.cuda.is_available() is False)")
    for entry in manifest.entries("onnx"):
        backend = OnnxRuntimeBackend(verify_file(directory, entry), entry.precision, ["CPUExecutionProvider"],
                                     threads)
        loaded.append(("onnxruntime", entry.precision, backend.activate()))
    engines = manifest.entries("engine")
    if not engines:
        log("tensorrt: skipped (no engines in the manifest; export with --trt on a GPU host)")
        return loaded
    usable, reason = tensorrt_status(inference=True)
    if not usable:
        log(f"tensorrt: skipped {len(engines)} engine(s): TensorRT not usable here ({reason})")
        return loaded
    for entry in engines:
        try:
            backend = TensorRTBackend(verify_file(directory, entry), entry.precision, entry.stamp).activate()
        except (BackendError, ArtifactError) as e:  # e.g. an engine built for another GPU
            log(f"tensorrt {entry.precision}: skipped ({e})")
            continue
        loaded.append(("tensorrt", entry.precision, backend))
    return loaded


def infer(backend, batch: np.ndarray) -> np.ndarray:
    """Logits of ``batch``, split into chunks no larger than the backend's ``max_batch_size``."""
    step = backend.max_batch_size or len(batch)
    return np.concatenate([backend.infer(batch[i:i + step]) for i in range(0, len(batch), step)])


# --------------------------------------------------------------------------- evaluation

def evaluate(backends: list, split, cfg: PreprocessConfig, ttas: list[str], batch_images: int = 64,
             progress: bool = False) -> list[dict]:
    """One row per backend x precision x TTA; ``backends[0]`` is the reference.

    Crops come from :func:`training.evaluate.iter_crops` (the serving preprocessing), scored as the
    service scores them: softmax per crop, averaged over each image's crops, in float64.
    """
    from tqdm import tqdm

    from training.evaluate import iter_crops

    rows = []
    labels = np.asarray(split.labels)
    for tta in ttas:
        probs = [[] for _ in backends]
        max_diff = [0.0] * len(backends)
        bar = tqdm(total=len(split), desc=tta, unit="img", disable=not progress, leave=False)
        for crops, batch_labels in iter_crops(split, cfg, tta, batch_images):
            n_crops = len(crops) // len(batch_labels)
            ref_logits = None
            for j, (_, _, backend) in enumerate(backends):
                logits = infer(backend, crops).astype(np.float64)
                if ref_logits is None:
                    ref_logits = logits
                max_diff[j] = max(max_diff[j], float(np.max(np.abs(logits - ref_logits))))
                crop_probs = softmax(logits)
                probs[j].append(crop_probs.reshape(-1, n_crops, crop_probs.shape[1]).mean(axis=1))
            bar.update(len(batch_labels))
        bar.close()
        ref_pred = None
        ref_top1 = None
        for j, (name, precision, _) in enumerate(backends):
            image_probs = np.concatenate(probs[j])
            topk = top_k_indices(image_probs, min(5, image_probs.shape[1]))
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
    shown = [row | {"max_logit_diff": f"{row['max_logit_diff']:.2e}",
                    "delta_top1": f"{row['delta_top1']:+.2f}"} for row in rows]
    return format_table(shown, COLUMNS)


# --------------------------------------------------------------------------- CLI

def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Top-1/top-5 of every backend and precision of an artifact "
                           "directory vs the PyTorch FP32 reference, with the serving preprocessing.")
    parser.add_argument("directory", metavar="DIR", help="artifact directory written by `resdeploy export`")
    parser.add_argument("--dataset", required=True, metavar="D",
                        help="digits, cifar10 or a directory (CIFAR-10 batches or ImageFolder); its test split is used")
    parser.add_argument("--data-root", default="data", help="where cifar10 lives (default: data)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate a seeded random subset of N test images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default: 0)")
    parser.add_argument("--tta", default=",".join(TTA_MODES),
                        help=f"comma-separated TTA modes from {', '.join(TTA_MODES)} (default: both)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: ORT's)")
    parser.add_argument("--batch-images", type=int, default=64, help="images per inference batch (default: 64)")
    parser.add_argument("--json", default=DEFAULT_JSON, metavar="OUT", help=f"results file (default: {DEFAULT_JSON})")
    parser.add_argument("--csv", default=None, metavar="OUT", help="also write the rows as CSV")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _ttas(text: str) -> list[str]:
    ttas = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in ttas if t not in TTA_MODES]
    if unknown or not ttas:
        raise ConfigError(f"unknown --tta {','.join(unknown) or repr(text)}; choose from {', '.join(TTA_MODES)}")
    return ttas


def main(argv: list[str] | None = None) -> int:
    """Evaluate every backend x precision x TTA; print the table, write the JSON. Returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors(PROG, lambda: _run(args))


def _run(args) -> int:
    skipped: list[str] = []  # printed now, recorded in the JSON's meta

    def log(msg: str) -> None:
        skipped.append(msg)
        print(msg, file=sys.stderr, flush=True)

    ttas = _ttas(args.tta)
    for flag, value in (("--limit", args.limit), ("--batch-images", args.batch_images)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: ONNX Runtime's default), got {args.threads}")
    directory = Path(args.directory)
    start = time.perf_counter()
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist; create one with "
                            "`resdeploy export CKPT --arch A --out DIR`")
    manifest = read_manifest(directory)
    cfg = manifest.preprocess_config
    from training.data import load_dataset

    data = load_dataset(args.dataset, data_root=args.data_root, input_size=cfg.input_size)
    if len(data.classes) != manifest.num_classes:
        raise DatasetError(f"dataset {args.dataset!r} has {len(data.classes)} classes but the model in "
                           f"{directory} has {manifest.num_classes}; pass the dataset it was trained on")
    split = data.test.sample(args.limit, args.seed)
    backends = load_backends(directory, manifest, args.threads or None, log)
    try:
        rows = evaluate(backends, split, cfg, ttas, args.batch_images,
                        progress=not args.no_progress and sys.stderr.isatty())
    finally:
        for _, _, backend in backends:
            backend.deactivate()
    machine = machine_info()
    meta = {"artifacts": str(directory.resolve()), "arch": manifest.arch, "dataset": args.dataset,
            "split": "test", "images": len(split), "limit": args.limit, "seed": args.seed, "tta": ttas,
            "preprocess": cfg.to_dict(), "reference": "pytorch fp32",
            "onnxruntime_providers": ["CPUExecutionProvider"],
            "tta_scoring": "softmax per crop, averaged over crops (float64)",
            "skipped": skipped, "seconds": round(time.perf_counter() - start, 2)}
    subset = f", seeded subset {args.seed}" if len(split) < len(data.test) else ""
    print(f"accuracy: {manifest.arch} from {directory} on {args.dataset} test ({len(split)} images{subset})")
    print(machine_header(machine, args.threads or None))
    print(table(rows))
    write_results(rows, args.json, args.csv, meta, machine)
    print(f"wrote {args.json}" + (f" and {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
