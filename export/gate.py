"""The accuracy gate: every artifact measured with ONNX Runtime on CPU against PyTorch FP32.

Budgets (defaults; Polygraphy-style tolerances per precision, the MLPerf 99% rule for INT8):

* fp32: top-1 agreement with PyTorch >= 99.9% and max |logit diff| <= 1e-3
* fp16: top-1 >= 99.5% of PyTorch FP32's
* int8, int8-cpu: top-1 >= 99% of PyTorch FP32's

The same preprocessed batches (serving's centre crop) go through PyTorch and every artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from serving.backends.base import Backend
from serving.preprocess import PreprocessConfig
from training.data import Split
from training.evaluate import iter_crops

BUDGETS = {
    "fp32": {"min_agreement": 99.9, "max_logit_diff": 1e-3},
    "fp16": {"min_top1_ratio": 0.995},
    "int8": {"min_top1_ratio": 0.99},
    "int8-cpu": {"min_top1_ratio": 0.99},
}


@dataclass
class Tally:
    """Running top-1/top-5 counts, agreement with the reference and the largest logit gap."""

    n: int = 0
    top1: int = 0
    top5: int = 0
    agree: int = 0
    max_diff: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def add(self, logits: np.ndarray, labels: np.ndarray, ref: np.ndarray | None) -> None:
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties: lowest class, as argmax and serving
        self.n += len(labels)
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels[:, None]).any(1).sum())
        if ref is not None:
            self.agree += int((logits.argmax(1) == ref.argmax(1)).sum())
            self.max_diff = max(self.max_diff, float(np.abs(logits - ref).max()))

    def row(self) -> dict:
        return {"top1": round(100 * self.top1 / self.n, 4), "top5": round(100 * self.top5 / self.n, 4),
                "top1_agreement": round(100 * self.agree / self.n, 4), "max_logit_diff": float(f"{self.max_diff:.3g}"),
                "n": self.n}


def measure(model: nn.Module, backends: dict[str, Backend], split: Split, cfg: PreprocessConfig,
            progress: bool = False) -> tuple[dict, dict[str, dict]]:
    """Run PyTorch FP32 and every backend over ``split``; returns (reference row, rows per precision)."""
    from tqdm import tqdm

    ref, tallies = Tally(), {p: Tally() for p in backends}
    model.eval()
    with tqdm(total=len(split), desc="accuracy gate", unit="img", leave=False, disable=not progress) as bar:
        for crops, labels in iter_crops(split, cfg, "center", 50):
            with torch.no_grad():
                r = model(torch.from_numpy(crops)).numpy()
            ref.add(r, labels, r)
            for p, b in backends.items():
                tallies[p].add(b.infer(crops), labels, r)
            bar.update(len(labels))
    return ref.row(), {p: t.row() for p, t in tallies.items()}


def judge(precision: str, row: dict, ref: dict) -> tuple[bool, str]:
    """Whether ``row`` is within its precision's budget, and the rule as text."""
    b = BUDGETS[precision]
    if "min_agreement" in b:
        ok = row["top1_agreement"] >= b["min_agreement"] and row["max_logit_diff"] <= b["max_logit_diff"]
        return ok, f"agreement >= {b['min_agreement']}% and max diff <= {b['max_logit_diff']:g}"
    need = b["min_top1_ratio"] * ref["top1"]
    return row["top1"] >= need - 1e-9, f"top-1 >= {b['min_top1_ratio'] * 100:g}% of FP32 ({need:.2f}%)"


def format_table(ref: dict, rows: dict[str, dict], verdicts: dict[str, tuple[bool, str]]) -> str:
    """Human-readable parity table (one line per artifact, PyTorch FP32 first)."""
    head = f"{'artifact':<16} {'top-1 %':>8} {'top-5 %':>8} {'agree %':>8} {'max |dlogit|':>12}  budget"
    lines = [head, "-" * len(head),
             f"{'pytorch fp32':<16} {ref['top1']:>8.2f} {ref['top5']:>8.2f} {'-':>8} {'-':>12}  reference"]
    for p, r in rows.items():
        ok, rule = verdicts[p]
        lines.append(f"{'onnx ' + p:<16} {r['top1']:>8.2f} {r['top5']:>8.2f} {r['top1_agreement']:>8.2f} "
                     f"{r['max_logit_diff']:>12.3g}  {'ok' if ok else 'OVER BUDGET'}: {rule}")
    return "\n".join(lines)
