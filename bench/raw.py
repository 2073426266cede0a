"""Raw images/s of a served artifact's backend, in process: the yardstick for served throughput.

``python bench/raw.py DIR --backend pytorch --precision fp16 --batch-sizes 1,8,64,256`` loads the
artifact directory the way the service does (serving.engine.load_model: hash-checked, the same
backend options: for PyTorch CUDA fp16, channels_last, CUDA graphs up to the largest batch, pinned
uint8 input normalised on the GPU) and times ``infer_uint8`` on random uint8 crops at each batch
size. No decoding, no HTTP: the rate a server could reach if those cost nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import machine_header, machine_info, percentiles, positive_ints, write_results  # noqa: E402
from core.timing import time_calls  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="bench/raw.py", description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", help="artifact directory (manifest.json)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, tensorrt or pytorch (default auto)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 or int8 (default fp32)")
    p.add_argument("--batch-sizes", default="1,10,40", help="comma-separated crops per call (default 1,10,40)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per batch size (default 2)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "raw.json"))
    args = p.parse_args(argv)
    sizes = positive_ints(args.batch_sizes)
    if sizes is None:
        p.error(f"bad --batch-sizes {args.batch_sizes!r}: expected positive integers, e.g. 1,8,64")

    from serving.engine import load_model

    model = load_model(args.artifacts, args.backend, args.precision, max_batch=max(sizes))
    cfg, rows = model.preprocess, []
    try:
        for n in sizes:
            x = np.random.default_rng(0).integers(0, 256, (n, cfg.crop, cfg.crop, 3), dtype=np.uint8)
            ms = time_calls(partial(model.backend.infer_uint8, x, cfg.mean, cfg.std), args.seconds)
            p50 = percentiles(ms)["p50_ms"]
            rows.append({"batch": n, "p50_ms": p50, "images_per_s": 1000.0 * n / p50, "iterations": len(ms)})
            print(f"batch {n:4d}: p50 {p50:8.3f} ms  {rows[-1]['images_per_s']:9.1f} crops/s", flush=True)
    finally:
        info = model.backend.describe()
        model.backend.deactivate()
    machine = machine_info()
    write_results(rows, Path(args.json), None, meta={"artifacts": args.artifacts, "file": model.entry.file,
                                                     "backend": info, "arch": model.manifest.arch}, machine=machine)
    print(machine_header(machine))
    print(f"{model.manifest.arch} {info}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
