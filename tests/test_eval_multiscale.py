"""``resdeploy eval --tta multiscale`` (issue #14): the paper's fully-convolutional multi-scale testing.

He et al. 2015, Sec. 3.4: the whole image (no crop) is resized so its shorter side is each of
{224, 256, 384, 480, 640}, the network (global average pooling makes any size valid) scores each,
and the softmax is averaged over scales. For the 32-pixel digits net the scales are scaled by
32/224, worked out here by hand: 224*32/224 = 32, 256/7 = 36.57 -> 37, 384/7 = 54.86 -> 55,
480/7 = 68.57 -> 69, 640/7 = 91.43 -> 91.

The expectation is computed in this file with Pillow, numpy and torch directly on the checkpoint's
network, and checked against the real CLI's JSON (top-1 against the true labels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bounds import min_correct
from conftest import run_cli
from PIL import Image

SCALES = (32, 37, 55, 69, 91)  # the paper's shorter sides * 32/224, rounded (module docstring)
LIMIT = 30  # test images evaluated by the CLI and here


@pytest.fixture(scope="module")
def checkpoint(digits_run: Path):
    from training.checkpoint import restore_model

    restored = restore_model(digits_run / "best.pt")
    return restored.model.eval(), restored.preprocess


@pytest.fixture(scope="module")
def digits_test():
    from training.data import load_dataset

    return load_dataset("digits").test


def _per_scale_probs(model: torch.nn.Module, image: np.ndarray, mean, std) -> np.ndarray:
    """Softmax of the whole image at every scale in SCALES: (len(SCALES), classes) float64."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    probs = []
    for side in SCALES:
        img = Image.fromarray(image)
        assert img.size == (32, 32)  # square: both sides become `side`
        resized = np.asarray(img.resize((side, side), Image.Resampling.BILINEAR))
        x = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            logits = model((x - m) / s)
        assert logits.shape == (1, 10)
        probs.append(torch.softmax(logits.double(), 1)[0].numpy())
    return np.stack(probs)


def _multiscale_probs(model: torch.nn.Module, image: np.ndarray, mean, std) -> np.ndarray:
    """The paper's multi-scale score: the per-scale softmax averaged over scales, (classes,)."""
    return _per_scale_probs(model, image, mean, std).mean(axis=0)


def test_eval_multiscale_cli_matches_an_independent_computation(digits_run: Path, checkpoint, digits_test,
                                                                tmp_path: Path):
    model, pre = checkpoint
    assert (pre.input_size, pre.interpolation) == (32, "bilinear")
    out = tmp_path / "eval.json"
    r = run_cli("eval", str(digits_run / "best.pt"), "--dataset", "digits", "--tta", "multiscale",
                "--limit", str(LIMIT), "--json", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert (res["tta"], res["n"], res["dataset"]) == ("multiscale", LIMIT, "digits")

    labels = digits_test.labels[:LIMIT]
    per_scale = np.stack([_per_scale_probs(model, digits_test.images[i], pre.mean, pre.std) for i in range(LIMIT)])
    # The network and labels are sound: its native single view (scale 32, the whole image) is ~97%; the
    # floor is the one for any network the suite accepts (tests/bounds.py: 23 of 30), not for this one.
    assert (per_scale[:, 0].argmax(1) == labels).sum() >= min_correct(LIMIT)
    # No floor on the multi-scale figure itself: this net only ever saw 32x32 digits (no scale
    # augmentation, unlike the paper's ImageNet nets), and from 55 px up it calls every digit a 1,
    # so the scale average scores ~7% (issue #14's report). What is checked is that the CLI counts
    # the images counted here against the true labels: same images, network and scales. The two float32
    # computations round differently (~1e-7 on a probability, test below), which can decide a near-tie
    # either way: one image of slack, far less than a wrong image set, scale set or label map moves it.
    probs = per_scale.mean(axis=1)
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    ours1 = 100.0 * float((top5[:, 0] == labels).mean())
    ours5 = 100.0 * float((top5 == labels[:, None]).any(1).mean())
    one_image = 100.0 / LIMIT + 1e-6
    assert res["top1"] == pytest.approx(ours1, abs=one_image), (res, ours1)
    assert res["top5"] == pytest.approx(ours5, abs=one_image), (res, ours5)
    assert res["top1_error"] == pytest.approx(100 - res["top1"], abs=1e-3)

def test_multiscale_probabilities_of_one_image(checkpoint, digits_test):
    """The per-image probabilities behind the CLI (training.evaluate.predict_probs, multiscale) for one
    image, against the hand computation: the softmax of each whole-image scale, averaged."""
    from training.evaluate import predict_probs

    model, pre = checkpoint
    # An image whose scales disagree, so that a dropped scale, an extra one or a centre crop in
    # place of the whole image moves the average by more than the tolerance below (a digit every
    # scale calls at 0.9999 would not show it).
    for i in range(LIMIT):
        per_scale = _per_scale_probs(model, digits_test.images[i], pre.mean, pre.std)
        want = per_scale.mean(axis=0)
        leave_one_out = [np.delete(per_scale, j, axis=0).mean(axis=0) for j in range(len(SCALES))]
        if min(np.abs(p - want).max() for p in [*leave_one_out, per_scale[0]]) > 1e-3:
            break
    else:
        pytest.fail(f"no image among the first {LIMIT} whose scales disagree by 1e-3")
    got = predict_probs(model, digits_test.take(np.array([i])), pre, "multiscale")[0]
    # Same float32 network on the same pixels: the only differences are float32 normalisation
    # order ((x/255 - m)/s here vs the library's in-place ops) and softmax in float32 vs float64
    # here, ~1e-7 on probabilities. 1e-5 is far below what a dropped or extra scale moves here (>1e-3,
    # by the choice of image).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
