"""Softmax and top-k over logits: the one copy the service, the gate and the bench share."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits (the row maximum is subtracted first)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def crop_average(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of one image from its crops' logits (N, classes): the mean of the
    crops' softmax, in float64. What ``/classify`` and ``resdeploy predict`` both report."""
    return softmax(np.asarray(logits, dtype=np.float64)).mean(axis=0)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, best first; ties go to the lower class index,
    as ``argmax`` breaks them."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def top_k(probs: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    """The ``k`` most probable classes of one probability vector, with labels."""
    return [{"index": int(i), "label": labels[i], "prob": float(probs[i])} for i in top_k_indices(probs, k)]
