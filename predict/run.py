"""``run_predict``: INPUT… to one result file, with either engine (what ``resdeploy predict`` calls)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError
from core.manifest import read_labels, read_manifest
from core.preprocess import TTA_MODES
from predict.inputs import expand_inputs
from predict.rows import DecodeSpec
from predict.shards import ShardPlan, output_format
from predict.stats import Progress

log = logging.getLogger("resdeploy.predict")
ENGINES = ("local", "ray")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class PredictOptions:
    """Everything one run needs; the CLI's flags map one to one (``resdeploy predict --help``)."""

    artifacts: str
    inputs: list[str]
    out: str
    backend: str = "auto"
    precision: str = "fp32"
    tta: str = "ten_crop"
    top_k: int | None = None  # default min(5, classes), as /classify
    engine: str = "local"
    workers: int | None = None  # local decode processes; default half the CPUs, at least 1
    max_batch: int = 40
    threads: int = 0
    shard_size: int = 1000
    max_pixels: int = 40_000_000
    overwrite: bool = False
    keep_shards: bool = False
    progress: bool = True
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    ray_address: str | None = None
    device_id: int = 0
    extra: dict = field(default_factory=dict)


def run_predict(opts: PredictOptions, report=print) -> dict:
    """Classify every input into ``opts.out``; returns the run's summary (also reported in one line).

    Raises:
        ConfigError / ArtifactError / BackendError: bad options, inputs or artifacts (one line each).
    """
    from serving.engine import load_model, select_artifact

    if opts.engine not in ENGINES:
        raise ConfigError(f"--engine {opts.engine}: choose one of {', '.join(ENGINES)}")
    if opts.tta not in TTA_MODES:
        raise ConfigError(f"--tta {opts.tta}: choose one of {', '.join(TTA_MODES)}")
    output_format(opts.out)
    if opts.engine == "ray":
        from predict.ray_engine import require_ray

        require_ray()  # before any work: the one-line install hint
    directory = Path(opts.artifacts)
    manifest = read_manifest(directory)
    labels = read_labels(directory, manifest)
    k = opts.top_k or min(5, manifest.num_classes)
    if not 1 <= k <= manifest.num_classes:
        raise ConfigError(f"--top-k {k} must be between 1 and {manifest.num_classes} (the model's classes)")
    crops_per = 10 if opts.tta == "ten_crop" else 1
    if opts.max_batch < crops_per:
        raise ConfigError(f"--max-batch {opts.max_batch} is smaller than one image's {crops_per} crops; use >= {crops_per}")
    runtime, entry = select_artifact(manifest, opts.backend, opts.precision)
    paths = expand_inputs(opts.inputs)
    plan = ShardPlan(opts.out, paths, opts.shard_size, {"sha256": entry.sha256, "tta": opts.tta, "top_k": k})
    todo = plan.prepare(opts.overwrite)
    done = len(plan.shards) - len(todo)
    if done:
        log.info("resuming: %d of %d shards already in %s", done, len(plan.shards), plan.parts)
    spec = DecodeSpec(manifest.preprocess_config, opts.tta, opts.max_pixels)
    images = sum(s.stop - s.start for s in todo)
    progress = Progress(images, opts.progress and images > 0, f"predict ({opts.engine})")
    stats = None
    try:
        if todo and opts.engine == "local":
            from predict.local import decode_pool, run_local

            workers = opts.workers if opts.workers is not None else max(1, usable_cpus() // 2)
            pool = decode_pool(workers)  # spawns while the model loads
            try:
                model = load_model(directory, runtime, opts.precision, opts.device_id, opts.threads, opts.max_batch,
                                   spin=workers == 0)  # decode workers need the cores between calls
                try:
                    stats = run_local(model, plan, todo, spec, k, opts.max_batch, pool, workers, progress)
                finally:
                    model.backend.deactivate()
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
        elif todo:
            from predict.ray_engine import run_ray

            stats = run_ray(directory, runtime, entry.file, opts.precision, labels, entry.sha256, plan, todo, spec, k,
                            opts.max_batch, opts.threads, opts.num_actors, opts.cpus_per_actor, opts.gpus_per_actor,
                            opts.ray_address, progress)
    except KeyboardInterrupt:
        kept = sum(s.path.exists() for s in plan.shards)
        plan.discard_if_empty()
        log.warning("interrupted: %d of %d shards are complete in %s; re-run the same command to finish the rest",
                    kept, len(plan.shards), plan.parts)
        raise
    except BaseException:
        plan.discard_if_empty()
        raise
    finally:
        progress.close()
    out = plan.merge(opts.keep_shards)
    summary = {"out": str(out), "rows": len(paths), "shards": len(plan.shards), "resumed_shards": done,
               "file": entry.file, "sha256": entry.sha256, "backend": runtime, "precision": entry.precision,
               "tta": opts.tta, "cpus": usable_cpus(), **(stats.to_dict() if stats else {"engine": opts.engine, "images": 0})}
    rate = f", {stats.images_per_s:.1f} images/s" if stats and stats.seconds else ""
    errors = f", {stats.errors} unreadable" if stats and stats.errors else ""
    report(f"wrote {out}: {len(paths)} rows ({summary['images']} classified this run{errors}{rate}; "
           f"{runtime} {entry.precision} {entry.file}, {opts.engine} engine)")
    return summary
