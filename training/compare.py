"""The degradation experiment (He et al. 2015, Fig. 1 / Fig. 4 / Table 2).

Trains each plain net and its residual twin with the same data, seed, schedule and epochs, then
draws both nets' training and test error curves in the paper's Figure 4 layout (plain left,
ResNet right) and prints a table of final and best errors.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from resdeploy.errors import ConfigError
from resdeploy.fsutil import write_json_atomic
from training.plots import save_degradation_figure
from training.resnet import ARCHS
from training.train import TrainConfig, train

log = logging.getLogger(__name__)


def twin_pairs(depths: list[int]) -> list[tuple[str, str]]:
    """``[(plainD, resnetD), ...]`` for each depth; ConfigError for depths without a twin."""
    pairs = []
    for dpt in depths:
        plain, res = f"plain{dpt}", f"resnet{dpt}"
        if plain not in ARCHS or res not in ARCHS:
            valid = sorted({a.depth for a in ARCHS.values() if not a.residual})
            raise ConfigError(f"no plain/residual pair of depth {dpt}; choose from {valid}")
        pairs.append((plain, res))
    return pairs


def run_compare(depths: list[int], base: TrainConfig) -> dict:
    """Train every pair into ``base.out/<arch>`` and write ``compare.png`` / ``compare.json``.

    Returns:
        ``{"runs": {arch: summary}, "table": [rows], "figure": path}``.
    """
    if base.zero_init_residual:
        raise ConfigError("--zero-init-residual would zero every plain block (they have no shortcut); "
                          "compare plain and residual nets without it")
    out = Path(base.out)
    runs: dict[str, dict] = {}
    for pair in twin_pairs(depths):
        for arch in pair:
            log.info("== training %s", arch)
            sub = out / arch
            resume = base.resume and (sub / "last.pt").exists()
            runs[arch] = train(replace(base, arch=arch, out=str(sub), resume=resume))
    table = [{"arch": a, "final_train_top1_error": r["epochs"][-1]["train_top1_error"],
              "final_test_top1_error": r["epochs"][-1]["test_top1_error"],
              "best_test_top1_error": round(100 - r["best_test_top1"], 4)} for a, r in runs.items()]
    ds = next(iter(runs.values()))["dataset"]
    fig = save_degradation_figure({a: r["epochs"] for a, r in runs.items()}, out / "compare.png",
                                  f"plain vs residual on {ds}, {base.epochs} epochs (bold: test, dashed: train)")
    result = {"dataset": ds, "epochs": base.epochs, "table": table, "figure": str(fig)}
    write_json_atomic(out / "compare.json", result)
    return result


def format_table(rows: list[dict]) -> str:
    """Fixed-width table of a compare result for the terminal."""
    lines = [f"{'arch':<10} {'train err %':>12} {'test err %':>11} {'best test err %':>16}"]
    lines += [f"{r['arch']:<10} {r['final_train_top1_error']:>12.2f} {r['final_test_top1_error']:>11.2f} "
              f"{r['best_test_top1_error']:>16.2f}" for r in rows]
    return "\n".join(lines)
