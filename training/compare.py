"""The degradation experiment (He et al. 2015, Fig. 1 / Fig. 4 / Table 2).

Trains each plain net and its residual twin with the same data, seed, schedule and epochs, then
draws both nets' training and test error curves in the paper's Figure 4 layout (plain left,
ResNet right) and tabulates their final and best errors.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from core.errors import ConfigError
from core.fsutil import write_json_atomic
from training.plots import save_degradation_figure
from training.resnet import ARCHS
from training.train import TrainConfig, train

log = logging.getLogger(__name__)


def twin_pairs(depths: list[int]) -> list[tuple[str, str]]:
    """``[(plainD, resnetD), ...]`` for each depth; ConfigError for depths without a twin."""
    pairs = []
    for depth in depths:
        plain, residual = f"plain{depth}", f"resnet{depth}"
        if plain not in ARCHS or residual not in ARCHS:
            valid = sorted({spec.depth for spec in ARCHS.values() if not spec.residual})
            raise ConfigError(f"no plain/residual pair of depth {depth}; choose from {valid}")
        pairs.append((plain, residual))
    return pairs


def run_compare(depths: list[int], base: TrainConfig) -> dict:
    """Train every pair into ``base.out/<arch>`` and write ``compare.png`` / ``compare.json``.

    Returns:
        ``{"dataset", "epochs", "table": [one row per arch], "figure": path}``, as in compare.json.
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
    table = [_table_row(arch, summary) for arch, summary in runs.items()]
    dataset = next(iter(runs.values()))["dataset"]
    curves = {arch: summary["epochs"] for arch, summary in runs.items()}
    figure = save_degradation_figure(curves, out / "compare.png", f"plain vs residual on {dataset}, "
                                     f"{base.epochs} epochs (bold: test, dashed: train)")
    result = {"dataset": dataset, "epochs": base.epochs, "table": table, "figure": str(figure)}
    write_json_atomic(out / "compare.json", result)
    return result


def _table_row(arch: str, summary: dict) -> dict:
    final = summary["epochs"][-1]
    return {"arch": arch, "final_train_top1_error": final["train_top1_error"],
            "final_test_top1_error": final["test_top1_error"],
            "best_test_top1_error": round(100 - summary["best_test_top1"], 4)}


def format_table(rows: list[dict]) -> str:
    """Fixed-width table of a compare result for the terminal."""
    lines = [f"{'arch':<10} {'train err %':>12} {'test err %':>11} {'best test err %':>16}"]
    lines += [f"{row['arch']:<10} {row['final_train_top1_error']:>12.2f} {row['final_test_top1_error']:>11.2f} "
              f"{row['best_test_top1_error']:>16.2f}" for row in rows]
    return "\n".join(lines)
