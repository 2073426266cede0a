"""``resdeploy predict``: classify files offline into Parquet, JSONL or CSV (predict/)."""

from __future__ import annotations

import argparse

from resdeploy.cliargs import non_negative, positive

EPILOG = """examples:
  resdeploy predict artifacts/digits photos/ --out preds.parquet
  resdeploy predict artifacts/digits list.txt 'scans/**/*.png' --out preds.csv --tta center --top-k 3
  resdeploy predict artifacts/r50 /data/archive --out preds.parquet --engine ray --num-actors 2
  resdeploy predict artifacts/r50 /data/archive --out preds.parquet --engine ray \\
      --ray-address ray://head:10001 --num-actors 8 --gpus-per-actor 1 --backend tensorrt --precision fp16

Interrupted? Re-run the same command: finished shards (OUT.parts/) are kept and skipped.
The Ray engine needs the extra: pip install 'resdeploy[cpu,ray]' (GPU hosts: [gpu,ray])."""


def cmd_predict(args) -> int:
    from predict.run import PredictOptions, run_predict

    opts = PredictOptions(
        artifacts=args.artifacts, inputs=args.inputs, out=args.out, backend=args.backend, precision=args.precision,
        tta=args.tta, top_k=args.top_k, engine=args.engine, workers=args.workers, max_batch=args.max_batch,
        threads=args.threads, shard_size=args.shard_size, max_pixels=args.max_pixels, overwrite=args.overwrite,
        keep_shards=args.keep_shards, progress=args.progress, num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor, ray_address=args.ray_address,
        device_id=args.device)
    summary = run_predict(opts)
    if args.summary_json:
        from core.fsutil import write_json_atomic

        write_json_atomic(args.summary_json, summary)
    return 0


def register(sub) -> None:
    """Add ``predict`` to the ``resdeploy`` parser."""
    from core.flavours import NUMBER_FORMATS
    from core.preprocess import TTA_MODES
    from serving.config import BACKENDS

    p = sub.add_parser("predict", help="classify image files offline (folders, lists, globs) into Parquet/JSONL/CSV",
                       description="Classify every file the INPUTs name with a verified artifact: one row per "
                                   "file (top-k indices, labels, probabilities, TTA, the artifact's sha256, or "
                                   "an error), the same answers as the service's /classify.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", metavar="ARTIFACT_DIR", help="a directory written by `resdeploy export`")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="an image folder (recursive), a path list (.txt/.lst, one path per line), a quoted glob "
                        "('photos/**/*.jpg') or an image file")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="result file: .parquet (default for no extension), .jsonl or .csv")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="as RESDEPLOY_BACKEND for the service")
    p.add_argument("--precision", choices=NUMBER_FORMATS, default="fp32", help="as RESDEPLOY_PRECISION")
    p.add_argument("--tta", choices=TTA_MODES, default="ten_crop", help="test-time crops (default ten_crop, as /classify)")
    p.add_argument("--top-k", type=positive(int), help="classes per row (default min(5, classes))")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: decode processes + one batched model here (default); ray: Ray Data (extra [ray])")
    p.add_argument("--max-batch", type=positive(int), default=40, help="crops per model call (default 40)")
    p.add_argument("--threads", type=non_negative(int), default=0, help="ONNX Runtime threads (0 = its default)")
    p.add_argument("--shard-size", type=positive(int), default=1000,
                   help="files per output shard, the unit of resuming (default 1000)")
    p.add_argument("--max-pixels", type=positive(int), default=40_000_000,
                   help="larger images become error rows (default 40,000,000, as the service)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and discard unfinished shards")
    p.add_argument("--keep-shards", action="store_true", help="keep OUT.parts/ after the merge")
    p.add_argument("--summary-json", metavar="FILE", help="also write the run's summary (rows, images/s, ...) here")
    p.add_argument("--device", type=non_negative(int), default=0, help="GPU index for the local engine")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("local engine")
    g.add_argument("--workers", type=non_negative(int),
                   help="decode processes (default half the CPUs, at least 1; 0 = decode in this process)")
    g = p.add_argument_group("ray engine (the extra [ray])")
    g.add_argument("--num-actors", type=positive(int), default=1, help="model actors, each holding one backend")
    g.add_argument("--cpus-per-actor", type=positive(float), default=1.0,
                   help="CPUs reserved per actor (also its ONNX Runtime threads; default 1)")
    g.add_argument("--gpus-per-actor", type=non_negative(float), default=0.0, help="GPUs per actor (default 0)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this cluster (e.g. ray://head:10001 or auto); default: start a local one")
    p.set_defaults(func=cmd_predict)
