"""The accuracy gate: every artifact measured with ONNX Runtime on CPU against PyTorch FP32.

Budgets (defaults; Polygraphy-style tolerances per precision, the MLPerf 99% rule for INT8):

* fp32: top-1 agreement with PyTorch >= 99.9% and max |logit diff| <= 1e-3
* fp16: top-1 >= 99.5% of PyTorch FP32's, agreement >= 99%
* the int8 flavours: top-1 >= 99% of PyTorch FP32's, agreement >= 98% (``--int8-min-agreement``)

Agreement (same top-1 class as PyTorch FP32) is always judged, so a network whose FP32 top-1 is
0% (random weights) cannot pass vacuously, and data without labels (a folder of calibration
images) still gates every file. Top-1 is judged only where labels exist.

The same preprocessed batches (serving's centre crop) go through PyTorch and every artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.flavours import FLAVOURS
from core.scores import top_k_indices

BUDGETS = {name: f.budget.to_dict() for name, f in FLAVOURS.items()}  # the flavour table's defaults


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

    labelled: bool = True

    def add(self, logits: np.ndarray, labels: np.ndarray, ref: np.ndarray | None) -> None:
        """Count one batch; labels of -1 mark unlabelled images (then only agreement is kept)."""
        k = min(5, logits.shape[1])
        top = top_k_indices(logits, k)  # ties: lowest class, as argmax and serving
        self.labelled = self.labelled and bool((labels >= 0).all())
        self.n += len(labels)
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels[:, None]).any(1).sum())
        if ref is not None:
            self.agree += int((logits.argmax(1) == ref.argmax(1)).sum())
            self.max_diff = max(self.max_diff, float(np.abs(logits - ref).max()))

    def row(self) -> dict:
        pct = (lambda v: round(100 * v / self.n, 4)) if self.labelled else (lambda v: None)
        return {"top1": pct(self.top1), "top5": pct(self.top5),
                "top1_agreement": round(100 * self.agree / self.n, 4), "max_logit_diff": float(f"{self.max_diff:.3g}"),
                "n": self.n}


def measure(ref_logits: np.ndarray, labels: np.ndarray, logits: dict[str, np.ndarray]) -> tuple[dict, dict[str, dict]]:
    """Rows for the PyTorch FP32 reference and every artifact's logits on the same images."""
    ref = Tally()
    ref.add(ref_logits, labels, ref_logits)
    rows = {}
    for p, out in logits.items():
        t = Tally()
        t.add(out, labels, ref_logits)
        rows[p] = t.row()
    return ref.row(), rows


def judge(precision: str, row: dict, ref: dict, budgets: dict | None = None) -> tuple[bool, str]:
    """Whether ``row`` is within its precision's budget, and the rule as text.

    ``budgets`` overrides :data:`BUDGETS` (``--int8-min-agreement``).
    """
    b = (budgets or BUDGETS)[precision]
    rules, ok = [], True
    if "min_top1_ratio" in b and row.get("top1") is not None and ref.get("top1") is not None:
        need = b["min_top1_ratio"] * ref["top1"]
        ok &= row["top1"] >= need - 1e-9
        rules.append(f"top-1 >= {b['min_top1_ratio'] * 100:g}% of FP32 ({need:.2f}%)")
    ok &= row["top1_agreement"] >= b["min_agreement"] - 1e-9
    rules.append(f"agreement >= {b['min_agreement']:g}%")
    if "max_logit_diff" in b:
        ok &= row["max_logit_diff"] <= b["max_logit_diff"]
        rules.append(f"max diff <= {b['max_logit_diff']:g}")
    return bool(ok), " and ".join(rules)


def format_table(ref: dict, rows: dict[str, dict], verdicts: dict[str, tuple[bool, str]]) -> str:
    """Human-readable parity table (one line per artifact, PyTorch FP32 first)."""
    head = f"{'artifact':<16} {'top-1 %':>8} {'top-5 %':>8} {'agree %':>8} {'max |dlogit|':>12}  budget"
    lines = [head, "-" * len(head),
             f"{'pytorch fp32':<16} {_pct(ref['top1'])} {_pct(ref['top5'])} {'-':>8} {'-':>12}  reference"]
    for precision, row in rows.items():
        ok, rule = verdicts[precision]
        lines.append(f"{'onnx ' + precision:<16} {_pct(row['top1'])} {_pct(row['top5'])} {row['top1_agreement']:>8.2f} "
                     f"{row['max_logit_diff']:>12.3g}  {'ok' if ok else 'OVER BUDGET'}: {rule}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return f"{'n/a':>8}" if v is None else f"{v:>8.2f}"
