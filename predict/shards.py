"""Shards: how ``resdeploy predict`` survives interruption and writes one result set.

The sorted input list is cut into fixed shards of ``shard_size`` files. Shard *i* holds rows
``[i*size, (i+1)*size)`` and is written whole, to a temporary name renamed into
``OUT.parts/part-00007-of-00042.EXT`` when complete (core.fsutil.atomic_path). ``OUT.parts/_plan.json``
records what the shards are of (the inputs' hash, the artifact's sha256, TTA, top-k, shard size,
format): a re-run of the same command skips the shards that exist; a re-run with anything changed is
refused rather than mixed. When every shard exists they are merged into ``OUT`` (again via a
temporary name) and ``OUT.parts`` is removed unless ``--keep-shards``. Rows are never duplicated or
lost: a shard either exists whole or is redone whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from core.fsutil import atomic_path, write_json_atomic
from predict.rows import COLUMNS

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
PLAN = "_plan.json"  # "_" first: Arrow, pandas and Spark skip it when reading the folder as a table


def output_format(out: str | os.PathLike) -> str:
    """parquet, jsonl or csv from ``out``'s extension (no extension: Parquet)."""
    suffix = Path(out).suffix.lower()
    if suffix == "":
        return "parquet"
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out}: unknown extension {suffix!r}; use .parquet (default), .jsonl or .csv")
    return FORMATS[suffix]


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("top1", pa.int64()), ("label", pa.string()), ("prob", pa.float64()),
                      ("topk_indices", pa.list_(pa.int64())), ("topk_labels", pa.list_(pa.string())),
                      ("topk_probs", pa.list_(pa.float64())), ("tta", pa.string()), ("sha256", pa.string()),
                      ("error", pa.string())])


def _csv_cell(value) -> str:
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value)


def write_rows(path: Path, rows: list[dict], fmt: str) -> None:
    """``rows`` (each with exactly :data:`predict.rows.COLUMNS`) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows, schema=_arrow_schema()), tmp)
        elif fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                w.writerows([_csv_cell(row[c]) for c in COLUMNS] for row in rows)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a result file in any of the three formats (CSV lists decoded, empty cells None)."""
    fmt = output_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for c in COLUMNS:
            v = row[c]
            if v == "":
                row[c] = None
            elif c.startswith("topk_"):
                row[c] = json.loads(v)
            elif c == "top1":
                row[c] = int(v)
            elif c == "prob":
                row[c] = float(v)
    return rows


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int
    path: Path


class ShardPlan:
    """The shards of one run, its ``OUT.parts`` folder and the final merge."""

    def __init__(self, out: str | os.PathLike, paths: list[str], shard_size: int, settings: dict):
        self.out = Path(out)
        self.format = output_format(out)
        self.paths = paths
        self.parts = self.out.with_name(self.out.name + ".parts")
        digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
        self.plan = {"version": 1, "inputs": len(paths), "inputs_sha256": digest, "shard_size": shard_size,
                     "format": self.format, **settings}
        n = -(-len(paths) // shard_size)
        ext = "parquet" if self.format == "parquet" else self.format
        self.shards = [Shard(i, i * shard_size, min(len(paths), (i + 1) * shard_size),
                             self.parts / f"part-{i:05d}-of-{n:05d}.{ext}") for i in range(n)]

    def prepare(self, overwrite: bool) -> list[Shard]:
        """Create or resume ``OUT.parts``; return the shards still to do.

        Raises:
            ConfigError: ``OUT`` exists, or ``OUT.parts`` belongs to a run with other settings
                (either way without ``overwrite``).
        """
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
        elif self.out.exists():
            raise ConfigError(f"{self.out} exists; pass --overwrite to replace it, or choose another --out")
        plan_file = self.parts / PLAN
        if plan_file.exists():
            try:
                old = json.loads(plan_file.read_text())
            except (OSError, ValueError):
                old = {}
            changed = sorted(k for k in self.plan.keys() | old.keys() if old.get(k) != self.plan.get(k))
            if changed:
                raise ConfigError(f"{self.parts} holds an unfinished run with other settings (changed: "
                                  f"{', '.join(changed)}); re-run that command to finish it, or pass --overwrite "
                                  "to start over")
        else:
            self.parts.mkdir(parents=True, exist_ok=True)
            write_json_atomic(plan_file, self.plan)
        return [s for s in self.shards if not s.path.exists()]

    def discard_if_empty(self) -> None:
        """Remove ``OUT.parts`` if no shard was written (a run that failed before its first shard)."""
        if self.parts.is_dir() and not any(s.path.exists() for s in self.shards):
            shutil.rmtree(self.parts, ignore_errors=True)

    def write(self, shard: Shard, rows: list[dict]) -> None:
        if len(rows) != shard.stop - shard.start:
            raise RuntimeError(f"shard {shard.index} has {len(rows)} rows, expected {shard.stop - shard.start}")
        write_rows(shard.path, rows, self.format)

    def merge(self, keep_shards: bool) -> Path:
        """Concatenate every shard, in order, into ``OUT``; remove ``OUT.parts`` unless ``keep_shards``."""
        missing = [s.index for s in self.shards if not s.path.exists()]
        if missing:
            raise RuntimeError(f"cannot merge: shards {missing[:5]} are missing")
        with atomic_path(self.out) as tmp:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                with pq.ParquetWriter(tmp, _arrow_schema()) as w:
                    for s in self.shards:
                        w.write_table(pq.read_table(s.path, schema=_arrow_schema()))
                    if not self.shards:
                        w.write_table(_arrow_schema().empty_table())
            else:
                with open(tmp, "wb") as f:
                    if self.format == "csv":
                        f.write(_csv_header())
                    for s in self.shards:
                        with open(s.path, "rb") as part:
                            if self.format == "csv":
                                part.readline()
                            shutil.copyfileobj(part, f)
        if not keep_shards:
            shutil.rmtree(self.parts, ignore_errors=True)
        return self.out


def _csv_header() -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(COLUMNS)
    return buf.getvalue().encode("utf-8")
