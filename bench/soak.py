"""Soak mode for bench/load.py: one concurrency level for minutes while the RSS of every server
process is sampled, to see memory that keeps growing once the service has warmed up.

Per process (keyed ``role-pid``: ``arbiter-123``, ``resdeploy-124``; the tree is re-read at every
sample, so a restarted worker shows up as a new key) :func:`summarize` reports

* ``rss_start_mb``: the first sample (taken before the load starts);
* ``rss_settled_mb``: the first sample at or after ``--settle-minutes`` (allocator pools, caches
  and the thread pools have grown by then), None if the run ended first;
* ``rss_end_mb``: the last sample, taken when the load stopped;
* ``growth_after_settle_pct``: ``100 * (end - settled) / settled``;
* ``mb_per_min_last_5``: the least-squares slope of RSS (MB) over minutes, fitted to the samples of
  the last 5 minutes of the run (all of it if shorter); None with fewer than two samples there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.loadstats import role

MB = 1024.0 * 1024.0
SLOPE_WINDOW_S = 300.0
DEFAULTS = {"sample_seconds": 15.0, "settle_minutes": 5.0}


def check_flags(args) -> None:
    """Raise ValueError (one line naming the flag) for bad soak flags; fill in their defaults."""
    given = [flag for flag, value in (("--sample-seconds", args.sample_seconds), ("--settle-minutes",
             args.settle_minutes), ("--max-growth-pct", args.max_growth_pct)) if value is not None]
    if args.soak_minutes is None:
        if given:
            raise ValueError(f"{given[0]} only applies to a soak run: add --soak-minutes M")
        return
    if args.sample_seconds is None:
        args.sample_seconds = DEFAULTS["sample_seconds"]
    if args.settle_minutes is None:
        args.settle_minutes = DEFAULTS["settle_minutes"]
    for flag, value in (("--soak-minutes", args.soak_minutes), ("--sample-seconds", args.sample_seconds)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"bad {flag} {value}: must be > 0")
    for flag, value in (("--settle-minutes", args.settle_minutes), ("--max-growth-pct", args.max_growth_pct)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"bad {flag} {value}: must be >= 0")
    if args.max_growth_pct is not None and args.settle_minutes >= args.soak_minutes:
        raise ValueError(f"--settle-minutes {args.settle_minutes:g} must be shorter than --soak-minutes "
                         f"{args.soak_minutes:g} to judge --max-growth-pct")


class RssSampler:
    """Called as ``sampler(t_s, requests, ok, errors)``; appends one sample to ``self.samples``."""

    def __init__(self, procs: list, roles: dict[int, str], progress=None):
        self.root, self.roles, self.progress = procs[0], dict(roles), progress
        self.samples: list[dict[str, Any]] = []

    def rss_mb(self) -> dict[str, float]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except Exception:  # noqa: BLE001 - the root is gone: nothing left to sample
            return {}
        out = {}
        for p in procs:
            try:
                rss = p.memory_info().rss
            except Exception:  # noqa: BLE001 - exited between listing and reading
                continue
            if p.pid not in self.roles:
                self.roles[p.pid] = role(p)
            out[f"{self.roles[p.pid]}-{p.pid}"] = rss / MB
        return out

    def __call__(self, t_s: float, requests: int, ok: int, errors: int) -> None:
        prev = self.samples[-1] if self.samples else None
        rate = (ok - prev["ok"]) / (t_s - prev["t_s"]) if prev and t_s > prev["t_s"] else None
        sample = {"t_s": t_s, "requests": requests, "ok": ok, "errors": errors, "images_per_s": rate,
                  "rss_mb": self.rss_mb()}
        self.samples.append(sample)
        if self.progress is not None:
            self.progress(sample)


def _slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(t_s, mb)`` points in MB per minute."""
    if len(points) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60.0 * sum((t - mean_t) * (y - mean_y) for t, y in points) / var


def summarize(samples: list[dict], settle_s: float, window_s: float = SLOPE_WINDOW_S) -> dict[str, dict]:
    """The per-process summary of the module docstring, from samples ``{t_s, rss_mb: {key: MB}}``."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for key, mb in s["rss_mb"].items():
            series.setdefault(key, []).append((s["t_s"], mb))
    end_t = samples[-1]["t_s"] if samples else 0.0
    out = {}
    for key, points in series.items():
        settled = next(((t, mb) for t, mb in points if t >= settle_s), None)
        end = points[-1][1]
        out[key] = {
            "rss_start_mb": points[0][1],
            "rss_settled_mb": settled and settled[1],
            "settled_at_s": settled and settled[0],
            "rss_end_mb": end,
            "growth_after_settle_pct": 100.0 * (end - settled[1]) / settled[1] if settled and settled[1] > 0 else None,
            "mb_per_min_last_5": _slope_per_min([(t, mb) for t, mb in points if t >= end_t - window_s]),
        }
    return out


def growth_violations(per_process: dict[str, dict], max_pct: float) -> list[str]:
    """``"KEY +G% (A -> B MB)"`` for every process whose RSS grew more than ``max_pct`` after settling."""
    return [f"{key} +{p['growth_after_settle_pct']:.1f}% ({p['rss_settled_mb']:.1f} -> {p['rss_end_mb']:.1f} MB)"
            for key, p in per_process.items()
            if p["growth_after_settle_pct"] is not None and p["growth_after_settle_pct"] > max_pct]


def summary_lines(per_process: dict[str, dict], settle_s: float) -> list[str]:
    def mb(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = []
    for key, p in per_process.items():
        growth = p["growth_after_settle_pct"]
        slope = p["mb_per_min_last_5"]
        at = "not reached" if p["settled_at_s"] is None else f"at {p['settled_at_s'] / 60:.2f} min"
        lines.append(f"RSS {key}: start {mb(p['rss_start_mb'])} MB, settled {mb(p['rss_settled_mb'])} MB "
                     f"({at}; settle {settle_s / 60:g} min), end {mb(p['rss_end_mb'])} MB, "
                     f"after settling {'-' if growth is None else f'{growth:+.1f}%'}, "
                     f"last 5 min {'-' if slope is None else f'{slope:+.2f}'} MB/min")
    return lines


def plot_rss(samples: list[dict], path: Path, title: str, settle_s: float) -> None:
    """RSS (MB) of each server process over minutes, images/s per interval on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    keys = list(dict.fromkeys(k for s in samples for k in s["rss_mb"]))
    for key in keys:
        pts = [(s["t_s"] / 60, s["rss_mb"][key]) for s in samples if key in s["rss_mb"]]
        ax.plot([t for t, _ in pts], [mb for _, mb in pts], "o-", ms=3, label=key)
    ax.axvline(settle_s / 60, color="grey", ls=":", lw=1, label="settled")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.legend(fontsize=7, loc="upper left")
    ax2 = ax.twinx()
    rate = [(s["t_s"] / 60, s["images_per_s"]) for s in samples if s.get("images_per_s") is not None]
    ax2.plot([t for t, _ in rate], [r if r is not None else math.nan for _, r in rate], "--", color="grey", lw=1)
    ax2.set_ylabel("images/s (dashed)", color="grey")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def progress_line(sample: dict) -> str:
    rate = sample["images_per_s"]
    rss = ", ".join(f"{k} {v:.1f}" for k, v in sample["rss_mb"].items())
    return (f"soak {sample['t_s'] / 60:.2f} min: {sample['ok']}/{sample['requests']} ok, {sample['errors']} errors, "
            f"{'-' if rate is None else f'{rate:.1f}'} images/s; RSS MB: {rss}")


def finish(samples: list[dict], json_path: Path, png_path: Path, title: str, settle_s: float,
           max_growth_pct: float | None) -> tuple[list[str], list[str]]:
    """Add ``soak: {samples, per_process}`` to the results JSON and draw the RSS plot; returns the
    summary lines to print and the :func:`growth_violations` over ``max_growth_pct`` (if given)."""
    per_process = summarize(samples, settle_s)
    doc = json.loads(json_path.read_text())
    doc["soak"] = {"samples": samples, "per_process": per_process}
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    plot_rss(samples, png_path, title, settle_s)
    grown = growth_violations(per_process, max_growth_pct) if max_growth_pct is not None else []
    return summary_lines(per_process, settle_s), grown
