"""Shared helpers for the bench scripts: machine info, percentiles, result tables and files.

Every bench prints one table for people and writes JSON/CSV for machines, with the hardware and
library versions in the result (airbench's header; timm ``validate.py --results-file``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from core.machine import cpu_model_and_flags

def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken optional dependency: report None
        return None
    return str(getattr(mod, "__version__", "unknown"))


def machine_info() -> dict[str, Any]:
    """The hardware and library versions a benchmark ran on (no hostname).

    Returns:
        ``cpu_model``, ``cpu_flags`` (``core.machine.CPU_FLAGS``: AVX2/AVX-512/VNNI/AMX), ``cpu_cores``
        (logical, usable by this process), ``platform``, ``python``, the versions of torch,
        onnxruntime, onnx and numpy (None if not installed), ``gpu`` (CUDA device name or None)
        and ``ort_providers``.
    """
    model, flags = cpu_model_and_flags()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_cores": cores,
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "numpy": _version("numpy"),
        "gpu": None,
        "ort_providers": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - torch absent or CUDA broken: no GPU to report
        pass
    try:
        import onnxruntime as ort

        info["ort_providers"] = list(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        pass
    return info


def machine_header(info: dict[str, Any], threads: int | None = None) -> str:
    """One line naming the machine, for the top of a printed table."""
    parts = [f"CPU: {info.get('cpu_model')} ({info.get('cpu_cores')} cores"]
    parts[0] += f", {threads} threads used)" if threads is not None else ")"
    if info.get("cpu_flags"):
        parts.append("flags: " + " ".join(info["cpu_flags"]))
    parts.append(f"GPU: {info.get('gpu') or 'none'}")
    vers = ", ".join(f"{k} {info.get(k)}" for k in ("torch", "onnxruntime", "onnx", "numpy"))
    parts.append(vers)
    return " | ".join(parts)


def percentiles(ms_list: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of a list of latencies in milliseconds.

    Uses linear interpolation between order statistics (numpy's default), so a short run
    still gives a p99 between its two slowest samples.

    Raises:
        ValueError: if the list is empty.
    """
    xs = sorted(float(x) for x in ms_list)
    if not xs:
        raise ValueError("percentiles() needs at least one latency")

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "mean_ms": sum(xs) / len(xs),
    }


def write_results(
    rows: Sequence[dict[str, Any]],
    json_path: str | os.PathLike | None,
    csv_path: str | os.PathLike | None,
    meta: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
) -> None:
    """Write ``{"machine", "meta", "rows"}`` as JSON and the rows as CSV.

    Args:
        rows: One dict per measurement; CSV columns are the union of keys, in first-seen order.
        json_path: Where the JSON goes (parents created); None to skip.
        csv_path: Where the CSV goes (parents created); None to skip.
        meta: The resolved configuration of the run (flags, model, notes).
        machine: ``machine_info()`` result; computed if None.
    """
    rows = [dict(r) for r in rows]
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"machine": machine or machine_info(), "meta": meta or {}, "rows": rows}
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if csv_path is not None:
        path = Path(csv_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]]) -> str:
    """A plain-text table; numbers right-aligned.

    Args:
        rows: Dicts to print.
        columns: Keys, or ``(key, header)`` pairs to print under a friendlier header.
    """
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    cells = [[_cell(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h) in enumerate(cols)]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) and rows
               for k, _ in cols]
    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    out = [line([h for _, h in cols]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def positive_ints(text: str) -> list[int] | None:
    """The integers of a comma-separated flag value such as ``1,10,32``, in order; ``None`` when
    one is not an integer, is below 1, or there is none (the caller names the flag)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        return None
    return values if values and min(values) >= 1 else None


def run_reporting_errors(prog: str, work: Callable[[], int]) -> int:
    """``work()``'s exit status; a :class:`core.errors.ResdeployError` becomes one line on stderr
    and exit 2, Ctrl-C exit 130 (the ``resdeploy`` command's convention)."""
    from core.errors import ResdeployError

    try:
        return work()
    except (ResdeployError, KeyboardInterrupt) as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        message = "interrupted" if interrupted else "error: " + " ".join(str(error).split())
        print(f"{prog}: {message}", file=sys.stderr)
        return 130 if interrupted else 2
