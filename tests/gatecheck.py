"""The accuracy gate's numbers recomputed without export/ code (tests/test_export_guards.py explains why
the recomputation is exact): PyTorch FP32 from the checkpoint, each ONNX file in a bare ONNX Runtime
session, on the gate's images found from the manifest and preprocessed here from its numbers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from training.checkpoint import restore_model
from training.data import load_dataset

GATE_BATCH = 50  # the gate's batch (export/pipeline.py); measured not to change a bit on Zen 2


def _gate_images(manifest: dict, artifacts: Path) -> tuple[np.ndarray, np.ndarray]:
    """The gate's images (NCHW float32) and true labels, from what the manifest records."""
    ev, pre = manifest["eval"], manifest["preprocess"]
    assert ev["labelled"] and ev["tta"] == "center", ev
    data = load_dataset(ev["dataset"])
    assert json.loads((artifacts / "labels.json").read_text()) == [str(c) for c in data.classes]
    test = data.test
    n = manifest["options"]["eval_images"]
    # Split.sample: every image when n >= len, else n drawn with seed 0, kept in their original order.
    idx = np.arange(len(test)) if n >= len(test) else np.sort(np.random.default_rng(0).permutation(len(test))[:n])
    assert len(idx) == ev["images"], (len(idx), ev["images"])
    images, labels = test.images[idx], np.asarray(test.labels)[idx]
    side = pre["resize"]
    assert images.shape[1:] == (side, side, 3) and pre["crop"] == side == pre["input_size"], (images.shape, pre)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)  # ToTensor, then Normalize
    mean, std = (np.asarray(pre[k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32), labels


def _row(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    """A manifest row computed here: percentages of ``n`` rounded to 4 places, the gap to 3 digits."""
    n = len(labels)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]  # ties: the lowest class, as argmax
    pct = lambda k: round(100 * int(k) / n, 4)  # noqa: E731
    return {"top1": pct((logits.argmax(1) == labels).sum()), "top5": pct((top5 == labels[:, None]).any(1).sum()),
            "top1_agreement": pct((logits.argmax(1) == ref.argmax(1)).sum()),
            "max_logit_diff": float(f"{float(np.abs(logits - ref).max()):.3g}"), "n": n}


def _batched(fn, x: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(x[i:i + GATE_BATCH]) for i in range(0, len(x), GATE_BATCH)])


def assert_gate_numbers_are_recomputed(artifacts: Path, checkpoint: Path) -> dict[str, dict]:
    """Recompute every row the gate wrote into ``artifacts/manifest.json``; assert each is identical.

    Returns ``{precision: row}`` as computed here (``"pytorch"`` for the reference row)."""
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    x, labels = _gate_images(manifest, artifacts)
    model = restore_model(checkpoint).model.eval()
    with torch.no_grad():
        ref = _batched(lambda b: model(torch.from_numpy(b)).numpy(), x)
    ours = {"pytorch": _row(ref, ref, labels)}
    assert manifest["eval"]["pytorch_fp32"] == ours["pytorch"], (manifest["eval"]["pytorch_fp32"], ours["pytorch"])
    for entry in manifest["artifacts"]:
        if entry["kind"] != "onnx":
            continue
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if entry["precision"] == "int8"
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        session = ort.InferenceSession(str(artifacts / entry["file"]), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits = _batched(lambda b: session.run(None, {name: b})[0], x)
        row = ours[entry["precision"]] = _row(logits, ref, labels)
        recorded = {k: entry[k] for k in row}
        assert recorded == row, f"{entry['precision']}: the gate recorded {recorded}, PyTorch FP32 gives {row}"
    return ours
