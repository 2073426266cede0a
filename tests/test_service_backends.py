"""``RESDEPLOY_PRECISION=int8`` and ``RESDEPLOY_BACKEND=pytorch`` through the real service (issue #14).

One real ``bentoml serve`` per configuration; real digits test images go over HTTP. Expectations do
not come from the code under test: top-1 against the dataset's true labels, and probabilities
against the file itself run directly (onnxruntime.InferenceSession on model.int8-cpu.onnx; a plain
torch ResNet-20 rebuilt from model.pt), the input normalised by hand from the manifest's mean/std.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from bentoserver import serve
from bounds import min_correct
from PIL import Image

N_IMAGES = 8  # a handful of real test images per server


@pytest.fixture(scope="module")
def digits_images():
    """The first N_IMAGES digits test images (32x32 RGB uint8) and their true labels."""
    from training.data import load_dataset

    test = load_dataset("digits").test
    return test.images[:N_IMAGES], test.labels[:N_IMAGES]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # lossless: the server decodes exactly these pixels
    return buf.getvalue()


def _by_hand(images: np.ndarray, manifest: dict) -> np.ndarray:
    """(x / 255 - mean) / std in NCHW float32, from the manifest's numbers. Digits are 32x32 and
    the manifest's resize and crop are 32, so the one ``tta=center`` crop is the whole image."""
    pre = manifest["preprocess"]
    assert (pre["resize"], pre["crop"]) == (32, 32) and images.shape[1:] == (32, 32, 3)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _classify_all(url: str, images: np.ndarray) -> tuple[dict, list[dict]]:
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        info = c.get("/model")
        assert info.status_code == 200, info.text
        answers = []
        for arr in images:
            r = c.post("/classify", files={"image": ("digit.png", _png(arr), "image/png")},
                       data={"tta": "center", "top_k": "10"})
            assert r.status_code == 200, r.text
            answers.append(r.json())
    return info.json(), answers


def _probs(answer: dict) -> np.ndarray:
    """The full probability vector of one /classify answer (top_k=10 lists every class)."""
    p = np.zeros(10)
    for item in answer["top_k"]:
        p[item["index"]] = item["prob"]
    return p


def _check_top1(answers: list[dict], labels: np.ndarray) -> None:
    got = np.array([a["top1"]["index"] for a in answers])
    # Against the true labels, a floor for any network the suite accepts (tests/bounds.py: 4 of 8), not
    # for the one trained here: which of these 8 it misses depends on the CPU that trained it. Each
    # answer is pinned to the file itself by the probability check below.
    assert (got == labels).sum() >= min_correct(len(labels)), (got.tolist(), labels.tolist())
    assert [a["top1"]["label"] for a in answers] == [str(i) for i in got]  # labels.json is 0..9


def test_int8_precision_serves_the_cpu_int8_file(digits_artifacts: Path, digits_images, tmp_path: Path):
    from backends.onnxruntime import available_providers

    if available_providers() != ["CPUExecutionProvider"]:
        pytest.skip("onnxruntime offers CUDA here: int8 then means model.int8.onnx, not the CPU file")
    images, labels = digits_images
    manifest = json.loads((digits_artifacts / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["precision"] == "int8-cpu")
    assert entry["file"] == "model.int8-cpu.onnx"
    with serve(digits_artifacts, tmp_path, {"RESDEPLOY_PRECISION": "int8", "RESDEPLOY_BACKEND": "onnxruntime",
                                            "RESDEPLOY_WARMUP_ITERS": "1"}) as (url, _):
        info, answers = _classify_all(url, images)
    assert (info["file"], info["backend"], info["precision"]) == ("model.int8-cpu.onnx", "onnxruntime", "int8-cpu"), \
        {k: info[k] for k in ("file", "backend", "precision")}
    assert info["sha256"] == entry["sha256"]
    assert all(a["model"]["precision"] == "int8-cpu" for a in answers)
    _check_top1(answers, labels)

    sess = ort.InferenceSession(str(digits_artifacts / "model.int8-cpu.onnx"), providers=["CPUExecutionProvider"])
    x = _by_hand(images, manifest)
    want = _softmax(np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0]
                                    for i in range(len(x))]))
    # Same file, same provider, same pixels: only where the input is normalised (server: the
    # backend's uint8 path; here: numpy) and the batch composition differ. Measured on the dev CPU:
    # identical (0.0). A 1-ulp input difference could still move a value across a u8 quantisation
    # step, so allow 2e-3. The fp32 file differs from this one by ~1.5e-2 on these images: serving
    # it in place of the int8 one fails here too, not only at /model.
    got = np.stack([_probs(a) for a in answers])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-6)


def test_pytorch_backend_serves_model_pt(digits_artifacts: Path, digits_images, tmp_path: Path):
    from training.resnet import build_model

    images, labels = digits_images
    manifest = json.loads((digits_artifacts / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["kind"] == "pytorch")
    with serve(digits_artifacts, tmp_path, {"RESDEPLOY_BACKEND": "pytorch", "RESDEPLOY_WARMUP_ITERS": "1"}) \
            as (url, _):
        info, answers = _classify_all(url, images)
    assert (info["file"], info["backend"], info["precision"]) == ("model.pt", "pytorch", "fp32"), \
        {k: info[k] for k in ("file", "backend", "precision")}
    assert info["sha256"] == entry["sha256"]
    assert all(a["model"]["backend"] == "pytorch" for a in answers)
    _check_top1(answers, labels)

    obj = torch.load(digits_artifacts / "model.pt", weights_only=True)
    net = build_model(obj["arch"], num_classes=obj["num_classes"], shortcut=obj["shortcut"])
    net.load_state_dict(obj["model"], strict=True)
    with torch.no_grad():
        want = _softmax(net.eval()(torch.from_numpy(_by_hand(images, manifest))).numpy())
    # Same fp32 weights; the server runs channels_last in batches of its own making, so the
    # convolutions sum in another order: measured 1e-7 on these probabilities on the dev CPU; 1e-4
    # leaves room for other CPUs' kernels and still fails a wrongly normalised input or another
    # network (> 1e-2).
    # On a GPU the server runs the net on CUDA, where convolutions may use TF32 (10-bit mantissa):
    # ~1e-3 relative on logits, so probabilities within 1e-2.
    got = np.stack([_probs(a) for a in answers])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 if torch.cuda.is_available() else 1e-4)
