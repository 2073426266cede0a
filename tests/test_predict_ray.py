"""``resdeploy predict --engine ray`` on a real local Ray cluster sized for CI (the cores this
machine has): the same rows as the local engine, and a clear refusal of an actor pool that would
leave no CPU to decode on."""

from __future__ import annotations

import json

import pytest
from bounds import min_correct
from conftest import run_cli
from imagetree import BAD, bad_files, make_tree

from predict.shards import read_rows

pytest.importorskip("ray.data", reason="Ray Data is the optional extra [ray]: pip install -e '.[cpu,dev,ray]'")


def test_ray_engine_rows_equal_the_local_engine(digits_artifacts, tmp_path):
    root = tmp_path / "photos"
    truth = make_tree(root, 240)
    rows, summaries = {}, {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        r = run_cli("predict", str(digits_artifacts), str(root), "--out", str(out), "--engine", engine,
                    "--shard-size", "64", "--no-progress", "--summary-json", str(tmp_path / f"{engine}.json"),
                    timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"{engine} engine" in r.stdout
        rows[engine] = read_rows(out)
        summaries[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    import ray

    s = summaries["ray"]
    assert (s["engine"], s["images"], s["errors"], s["num_actors"], s["ray_version"]) == ("ray", 240 + len(BAD),
                                                                                       len(BAD), 1, ray.__version__)
    assert "model_s" not in s  # the actors' time is not measured by the driver: no made-up zero
    local, ray = rows["local"], rows["ray"]
    assert [r["path"] for r in ray] == [r["path"] for r in local] == sorted(set(truth) | set(bad_files(root)))
    for a, b in zip(local, ray):
        assert (a["top1"], a["topk_indices"], a["error"], a["sha256"]) == (b["top1"], b["topk_indices"], b["error"],
                                                                          b["sha256"])
        if a["error"] is None:
            assert max(abs(x - y) for x, y in zip(a["topk_probs"], b["topk_probs"])) <= 1e-5
    assert sum(r["error"] is not None for r in ray) == len(BAD)
    # A floor for any network the suite accepts (tests/bounds.py: 214 of 240), whichever CPU trained it.
    assert sum(r["top1"] == truth.get(r["path"]) for r in ray) >= min_correct(len(truth))


def test_an_actor_pool_that_takes_every_cpu_is_refused(digits_artifacts, tmp_path):
    import os

    cpus = len(os.sched_getaffinity(0))
    root = tmp_path / "photos"
    make_tree(root, 4, bad=False)
    r = run_cli("predict", str(digits_artifacts), str(root), "--out", str(tmp_path / "p.csv"), "--engine", "ray",
                "--num-actors", str(cpus), "--no-progress", timeout=300)
    assert r.returncode == 2
    assert f"--num-actors {cpus} x --cpus-per-actor 1 reserve {cpus} of the cluster's {cpus} CPUs" in r.stderr, r.stderr
    assert not (tmp_path / "p.csv").exists()
