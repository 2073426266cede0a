"""``--engine ray``: Ray Data decodes in parallel tasks and runs the backend in an actor pool.

The pipeline is ``from_items(paths) -> map_batches(decode, tasks) -> map_batches(Predictor, actors)``
and the driver streams the results back. Each actor loads the model once (hash-verified, the very
file the driver selected) and keeps it for the run; decode tasks scale with the cluster's CPUs.
Images and crops stay on the workers; only per-image logits (crops x classes floats) come back,
and the driver writes the same shards as the local engine (predict/shards.py), so interruption,
resume and the merge work identically. Ray's own ``read_binary_files`` is not used: one unreadable
file would fail the whole dataset, where here it must become one row with an error.

Ray is an optional extra (``pip install 'resdeploy[cpu,ray]'``) imported only here. Without
``ray_address`` a local cluster starts in this process (and stops with it); with it, the driver
joins that cluster, whose nodes need resdeploy installed and the input paths readable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from predict.local import ShardAssembler
from predict.rows import DecodeSpec, decode_many, result_row
from predict.shards import Shard, ShardPlan
from predict.stats import Progress, RunStats

INSTALL = "pip install 'resdeploy[cpu,ray]' (on GPU hosts: 'resdeploy[gpu,ray]')"
DECODE_TASK_MEMORY = 256 * 2**20  # bytes reserved per decode task


def require_ray():
    """The ``ray`` module with Ray Data, or a one-line ConfigError naming the install command."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate part of the ray package
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray Data, which is not installed here ({e}); install it with: "
                          f"{INSTALL}") from None
    return ray


def _decode_batch(batch: dict, spec: DecodeSpec, crops_per: int) -> dict:
    """Ray task: paths to a fixed-shape crops tensor (zeros for failed files) and an error column."""
    n, size = len(batch["path"]), spec.preprocess.crop
    crops = np.zeros((n, crops_per, size, size, 3), np.uint8)
    errors = []
    for j, (c, err) in enumerate(decode_many([str(p) for p in batch["path"]], spec)):
        if err is None:
            crops[j] = c
        errors.append(err or "")
    return {"i": batch["i"], "crops": crops, "error": np.array(errors, dtype=object)}


class Predictor:
    """Ray actor: one verified backend for the run; crops in, per-crop logits out."""

    def __init__(self, directory: str, runtime: str, file: str, precision: str, threads: int, max_batch: int):
        from core.manifest import read_manifest
        from serving.engine import open_backend

        manifest = read_manifest(directory)
        entry = next(a for a in manifest.artifacts if a.file == file)
        self.cfg = manifest.preprocess_config
        self.backend = open_backend(Path(directory), manifest, runtime, entry, precision, 0, threads, max_batch,
                                    spin=False)  # decode tasks share the node's cores
        self.classes = manifest.num_classes

    def __call__(self, batch: dict) -> dict:
        crops, ok = batch["crops"], np.array([e == "" for e in batch["error"]])
        n, per = crops.shape[:2]
        logits = np.zeros((n, per, self.classes), np.float32)
        if ok.any():
            flat = crops[ok].reshape(-1, *crops.shape[2:])
            logits[ok] = self.backend.infer_uint8(flat, self.cfg.mean, self.cfg.std).reshape(-1, per, self.classes)
        return {"i": batch["i"], "logits": logits, "error": batch["error"]}


def run_ray(directory: Path, runtime: str, entry_file: str, precision: str, labels: list[str], sha256: str,
            plan: ShardPlan, todo: list[Shard], spec: DecodeSpec, k: int, max_batch: int, threads: int,
            num_actors: int, cpus_per_actor: float, gpus_per_actor: float, address: str | None,
            progress: Progress) -> RunStats:
    """Classify every file of the ``todo`` shards on a Ray cluster; return what it took."""
    ray = require_ray()
    crops_per = 10 if spec.tta == "ten_crop" else 1
    per_batch = max(1, max_batch // crops_per)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
    stats = RunStats(engine="ray", workers=num_actors)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts images; Ray's bars count blocks per operator
        ctx.print_on_execution_start = False
        items = [{"i": i, "path": plan.paths[i]} for s in todo for i in range(s.start, s.stop)]
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        if num_actors * cpus_per_actor > cpus - 1:
            raise ConfigError(f"--num-actors {num_actors} x --cpus-per-actor {cpus_per_actor:g} reserve "
                              f"{num_actors * cpus_per_actor:g} of the cluster's {cpus} CPUs, leaving none for the "
                              "decode tasks: lower --num-actors or --cpus-per-actor (e.g. --cpus-per-actor 0.5)")
        if gpus_per_actor and num_actors * gpus_per_actor > resources.get("GPU", 0):
            raise ConfigError(f"--num-actors {num_actors} x --gpus-per-actor {gpus_per_actor:g} need "
                              f"{num_actors * gpus_per_actor:g} GPUs; the cluster has {resources.get('GPU', 0):g}")
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // per_batch, 4 * cpus)))
        # A decode task reserves memory for a batch of decoded photos. That also makes its resources differ
        # from the actors', which keeps Ray from fusing decode into the actor (fused, each actor would
        # decode and infer in turn, the model idle while it decodes).
        ds = ds.map_batches(_decode_batch, fn_kwargs={"spec": spec, "crops_per": crops_per}, batch_size=per_batch,
                            batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY)
        ds = ds.map_batches(Predictor, batch_format="numpy", batch_size=per_batch,
                            compute=ray.data.ActorPoolStrategy(size=num_actors),
                            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                            fn_constructor_kwargs={"directory": str(directory), "runtime": runtime, "file": entry_file,
                                                   "precision": precision, "threads": threads or max(1, int(cpus_per_actor)),
                                                   "max_batch": max_batch})
        assembler = ShardAssembler(plan, todo)
        stats.start()
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, logits, error in zip(out["i"], out["logits"], out["error"]):
                i = int(i)
                err = str(error) or None
                stats.errors += err is not None
                assembler.add(i, result_row(plan.paths[i], None if err else logits, err, k, labels, spec.tta, sha256))
            progress.update(len(out["i"]), errors=stats.errors)
        stats.stop(images=len(items))
        stats.extra = {"ray_version": ray.__version__, "cluster_cpus": cpus, "cpus_per_actor": cpus_per_actor,
                       "gpus_per_actor": gpus_per_actor}
        assert assembler.complete, "every shard should have been written"
        return stats
    finally:
        if started_here:
            ray.shutdown()
