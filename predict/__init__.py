"""Offline batch classification: ``resdeploy predict ARTIFACT_DIR INPUT… --out FILE``.

The other half of deployment next to the HTTP service: label a folder, a list or a glob of images
with a verified artifact and write one row per input (Parquet, JSONL or CSV). Same artifact
selection, preprocessing and probabilities as ``/classify``; torch-free like serving/.

* inputs.py   -- INPUT… (folders, path lists, globs) to one sorted list of files
* rows.py     -- decode one file into crops (or an error), logits to a result row
* shards.py   -- the shard plan, atomic shard files, resume and the final merge
* local.py    -- the default engine: decode processes feeding one batched backend
* ray_engine.py -- ``--engine ray``: Ray Data tasks decode, an actor pool runs the backend
* run.py      -- what the CLI calls: plan, run an engine, merge, summarise

docs/design.md#offline-prediction says how the work is split and why.
"""
