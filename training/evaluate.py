"""Evaluation with the serving preprocessing: centre crop, 10-crop and multi-scale testing.

* ``center``: resize the shorter side, one centre crop.
* ``ten_crop``: 4 corners + centre and their horizontal flips (He et al. 2015, Sec. 3.4 / Table 3);
  softmax per crop, probabilities averaged.
* ``multiscale``: fully-convolutional testing, the whole image resized so its shorter side is each of
  {224, 256, 384, 480, 640} (scaled for small inputs), softmax averaged over scales (Sec. 3.4).

Every image goes through ``core.preprocess`` exactly as an HTTP upload would.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch import nn

from core.errors import ConfigError, DatasetError
from core.preprocess import PreprocessConfig, multiscale_sizes, preprocess, preprocess_full
from core.scores import top_k_indices
from training.data import Split, is_labelled
from training.names import EVAL_TTA  # re-exported: the CLI reads it without torch


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def iter_crops(split: Split, cfg: PreprocessConfig, tta: str, batch_images: int = 64
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(crops, labels)``: crops (k * n_crops, 3, c, c) float32 for k images at a time.

    Decoding and preprocessing run in a small thread pool (Pillow releases the GIL), exactly as
    serving does them (JPEG draft decoding for ``cfg.resize`` included): the export gate,
    calibration and ``resdeploy eval`` see the pixels the service sees.
    """
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(split), batch_images):
            idx = range(start, min(start + batch_images, len(split)))
            crops = list(pool.map(lambda i: preprocess(split.image(i, cfg.resize), cfg, tta), idx))
            yield np.concatenate(crops), split.labels[idx.start:idx.stop]


@torch.no_grad()
def predict_probs(model: nn.Module, split: Split, cfg: PreprocessConfig, tta: str = "center",
                  device: str | torch.device = "cpu", batch_images: int = 64,
                  progress: bool = False) -> np.ndarray:
    """Class probabilities (N, classes), averaged over the crops or scales of each image.

    Raises:
        ConfigError: unknown ``tta``.
    """
    if tta not in EVAL_TTA:
        raise ConfigError(f"unknown --tta '{tta}'; choose one of {', '.join(EVAL_TTA)}")
    model.eval()
    per_batch = []
    with _progress(len(split), f"eval {tta}", progress) as bar:
        if tta == "multiscale":
            sizes = multiscale_sizes(cfg)
            for i in range(len(split)):
                img = split.image(i)
                probs = sum(torch.softmax(model(torch.from_numpy(preprocess_full(img, cfg, size)).to(device)), 1)
                            for size in sizes) / len(sizes)
                per_batch.append(probs.cpu().numpy())
                bar.update(1)
        else:
            n_crops = 10 if tta == "ten_crop" else 1
            for crops, labels in iter_crops(split, cfg, tta, batch_images):
                probs = torch.softmax(model(torch.from_numpy(crops).to(device)).float(), 1)
                per_batch.append(probs.view(len(labels), n_crops, -1).mean(1).cpu().numpy())
                bar.update(len(labels))
    return np.concatenate(per_batch)


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percentage of images whose label is among the ``k`` most probable classes."""
    order = top_k_indices(probs, max(ks))  # ties: lowest class, as argmax and serving
    return {k: float(100.0 * (order[:, :k] == labels[:, None]).any(1).mean()) for k in ks}


def evaluate(model: nn.Module, split: Split, cfg: PreprocessConfig, tta: str = "center",
             device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Top-1/top-5 accuracy and error (%) of ``model`` on ``split``.

    Returns:
        ``{"top1", "top5", "top1_error", "top5_error", "n", "tta"}``.

    Raises:
        DatasetError: ``split`` has unlabelled images (a flat calibration folder).
    """
    if not is_labelled(split):
        raise DatasetError("accuracy needs labelled images, but these have no classes (a flat folder "
                           "is calibration data only): evaluate on a class tree or a dataset")
    probs = predict_probs(model, split, cfg, tta, device, progress=progress)
    acc = topk_accuracy(probs, split.labels, (1, min(5, probs.shape[1])))
    top5 = acc[min(5, probs.shape[1])]
    return {"top1": round(acc[1], 4), "top5": round(top5, 4), "top1_error": round(100 - acc[1], 4),
            "top5_error": round(100 - top5, 4), "n": len(split), "tta": tta}


def center_tensor(split: Split, cfg: PreprocessConfig) -> torch.Tensor:
    """All centre crops of an in-memory split as one tensor (per-epoch evaluation cache)."""
    return torch.from_numpy(np.concatenate([c for c, _ in iter_crops(split, cfg, "center", 256)]))
