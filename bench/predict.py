"""Offline prediction throughput: ``resdeploy predict``'s engines against the in-process pipeline.

``python bench/predict.py [ARTIFACTS] [--images DIR | --num-images N] [--engines local,ray]`` runs,
``--repeats`` times and interleaved (so a shared machine's slow drifts hit every row alike):

* the yardstick, :func:`bench.loadstats.in_process`'s ``pipeline``: the same files decoded and
  cropped in one thread (``core.preprocess.load_crops``) plus the model on ``--max-batch``-crop
  batches, combined as ``decode ms / cores + model ms`` per image: the rate of this work if the
  cores were shared perfectly and nothing else ran (no process start, no file I/O, no output);
* each engine end to end, through :func:`predict.run.run_predict` as ``resdeploy predict`` calls it:
  worker (or Ray cluster) start, reading the files, decoding, the model, shard and merged output.

Without ``--images`` it writes ``--num-images`` files to a temporary folder: scikit-learn's digits
scans (half PNG, half JPEG), or with ``--photos`` scikit-image's colour sample photos as JPEG
quality 90 (astronaut, coffee, ...; 300-512 px, repeated under new names). Both work offline. Prints a table and writes ``bench/results/predict.json``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import format_table, machine_header, machine_info, write_results  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402

ENGINES = ("local", "ray")


def digits_files(folder: Path, n: int) -> list[Path]:
    """``n`` digits scans as files (test split first, then train, then again with new names)."""
    import numpy as np
    from PIL import Image

    from training.data import load_digits_dataset

    d = load_digits_dataset()
    images = np.concatenate([d.test.images, d.train.images])
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(images[i % len(images)]).save(path, quality=92)
        paths.append(path)
    return paths


def photo_files(folder: Path, n: int) -> list[Path]:
    """``n`` files cycling through scikit-image's colour photos (bench/load.py's ``--photos``)."""
    from bench.load import LoadError, photo_images
    from core.errors import ConfigError

    try:
        photos = photo_images(90)
    except LoadError as e:  # scikit-image missing: one line, as every bench error
        raise ConfigError(str(e)) from None
    paths = []
    for i in range(n):
        name, data, _ = photos[i % len(photos)]
        path = folder / f"{i:06d}_{name}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def run_engine(artifacts: str, folder: Path, engine: str, args, out_dir: Path, repeat: int) -> dict:
    from predict.run import PredictOptions, run_predict

    opts = PredictOptions(artifacts=artifacts, inputs=[str(folder)], out=str(out_dir / f"{engine}{repeat}.parquet"),
                          precision=args.precision, tta=args.tta, engine=engine, max_batch=args.max_batch,
                          threads=args.threads, progress=False, num_actors=args.num_actors, workers=args.workers)
    return run_predict(opts, report=lambda line: print(f"  {line}", flush=True))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="bench/predict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="?", default=str(ROOT / "artifacts" / "digits"),
                   help="artifact directory (default artifacts/digits, from make demo)")
    p.add_argument("--images", help="a folder of images to classify (default: digits scans written to a temp folder)")
    p.add_argument("--num-images", type=int, default=1000, help="files to write without --images (default 1000)")
    p.add_argument("--photos", action="store_true", help="write scikit-image's photos instead of digits scans")
    p.add_argument("--engines", default="local,ray", help="comma-separated, of local and ray (default both; "
                   "ray is skipped with a note when it is not installed)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--tta", default="ten_crop", help="center or ten_crop (default ten_crop)")
    p.add_argument("--max-batch", type=int, default=40, help="crops per model call, as resdeploy predict (default 40)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default 0: its own choice)")
    p.add_argument("--workers", type=int, default=None, help="local engine decode processes (default: predict's)")
    p.add_argument("--num-actors", type=int, default=1, help="Ray model actors (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--seconds", type=float, default=4.0, help="yardstick timing budget per round (default 4)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "predict.json"))
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if not engines or any(e not in ENGINES for e in engines):
        p.error(f"bad --engines {args.engines!r}: choose from {', '.join(ENGINES)}, e.g. local,ray")
    if args.repeats < 1 or args.num_images < 1:
        p.error("--repeats and --num-images must be >= 1")
    if "ray" in engines:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed (pip install -e '.[cpu,ray]'): skipping the ray engine", file=sys.stderr)
            engines.remove("ray")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from bench.loadstats import in_process
    from predict.inputs import expand_inputs

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        if args.images:
            folder = Path(args.images)
        else:
            folder = tmp / "images"
            folder.mkdir()
            (photo_files if args.photos else digits_files)(folder, args.num_images)
        files = expand_inputs([str(folder)])
        data = [Path(f).read_bytes() for f in files]
        print(f"{len(files)} files from {folder}", flush=True)
        rounds: list[dict] = []
        for r in range(args.repeats):
            _, pipe = in_process(args.artifacts, args.precision, args.max_batch, args.tta, data,
                                 seconds=args.seconds, threads=args.threads)
            row = {"round": r + 1, "pipeline": pipe["images_per_s"], "decode_ms": pipe["decode_ms_per_image"],
                   "model_ms": pipe["model_ms_per_image"]}
            print(f"round {r + 1}: in-process pipeline {pipe['images_per_s']:.1f} images/s", flush=True)
            for engine in engines:
                summary = run_engine(args.artifacts, folder, engine, args, tmp, r)
                row[engine] = summary["images_per_s"]
                row[f"{engine}_ratio"] = summary["images_per_s"] / pipe["images_per_s"]
                row[f"{engine}_summary"] = summary
            rounds.append(row)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    rows = [{"run": "in-process pipeline (yardstick)", "images_per_s": med("pipeline"), "vs_pipeline": 1.0,
             "rounds": " / ".join(f"{r['pipeline']:.1f}" for r in rounds)}]
    rows += [{"run": f"resdeploy predict --engine {e}", "images_per_s": med(e), "vs_pipeline": med(f"{e}_ratio"),
              "rounds": " / ".join(f"{r[e]:.1f}" for r in rounds)} for e in engines]
    machine = machine_info()
    versions = {}
    if "ray" in engines:
        import ray

        versions["ray"] = ray.__version__
    meta = {"artifacts": args.artifacts, "files": len(files), "tta": args.tta, "precision": args.precision,
            "max_batch": args.max_batch, "threads": args.threads, "num_actors": args.num_actors,
            "images": args.images or (f"{args.num_images} scikit-image photos (JPEG q90)" if args.photos
                                      else f"{args.num_images} digits scans (PNG/JPEG)"), "rounds": rounds, **versions}
    write_results(rows, Path(args.json), None, meta=meta, machine=machine)
    print(machine_header(machine, args.threads or None))
    print(format_table(rows, [("run", "run"), ("images_per_s", "images/s (median)"), ("vs_pipeline", "vs pipeline"),
                              ("rounds", "each round")]))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from bench.common import run_reporting_errors

    sys.exit(run_reporting_errors("bench/predict.py", main))
