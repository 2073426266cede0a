"""Training-time augmentation (He et al. 2015, Sec. 3.4 for ImageNet, Sec. 4.2 for CIFAR).

* CIFAR recipe, batched on the training device for in-memory data: 4-pixel zero padding, a random
  32x32 crop and a random horizontal flip, done as one gather per batch.
* ImageNet recipe, per image with Pillow: shorter side random in [256, 480] (scaled with the input
  size), a random 224 crop, a random flip, mean/std normalisation and AlexNet's PCA colour
  augmentation (Krizhevsky et al. 2012, Sec. 4.1).

Test-time preprocessing is not here: it is the shared ``core.preprocess`` code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.preprocess import PreprocessConfig, decode_image, preprocess, resize_shorter

# Eigen-decomposition of ImageNet RGB pixel covariance (in [0, 1] units), as published with
# AlexNet and used by fb.resnet.torch, which the ResNet authors' recipe follows.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                           [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])


def normalize_batch(x_uint8_nhwc: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), ``(x / 255 - mean) / std`` as at test time."""
    mean = torch.tensor(cfg.mean, device=x_uint8_nhwc.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x_uint8_nhwc.device).view(1, 3, 1, 1)
    x = x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - mean) / std).contiguous()


def cifar_augment(batch: torch.Tensor, cfg: PreprocessConfig, generator: torch.Generator,
                  pad: int | None = None) -> torch.Tensor:
    """Pad, random-crop and random-flip a uint8 NHWC batch, then normalise.

    Padding is black in pixel space, i.e. what a zero-padded image looks like to the serving
    preprocessing. ``pad`` defaults to input/8 (4 pixels at 32x32, the paper's setting);
    ``pad=0`` leaves only the random flip.
    """
    n, h, w, _ = batch.shape
    size = min(cfg.crop, h, w)
    pad = max(1, size // 8) if pad is None else pad
    padded = torch.nn.functional.pad(batch, (0, 0, pad, pad, pad, pad))
    device = batch.device
    top = torch.randint(0, h + 2 * pad - size + 1, (n,), generator=generator).to(device)
    left = torch.randint(0, w + 2 * pad - size + 1, (n,), generator=generator).to(device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    offsets = torch.arange(size, device=device)
    rows = top[:, None] + offsets
    cols = left[:, None] + torch.where(flip[:, None], size - 1 - offsets, offsets)
    crops = padded[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return normalize_batch(crops, cfg)


def pca_lighting(x: torch.Tensor, generator: torch.Generator, alphastd: float = 0.1) -> torch.Tensor:
    """Add ``eigvec @ (alpha * eigval)`` to every pixel of a (3, H, W) image in [0, 1] units."""
    alpha = torch.randn(3, generator=generator) * alphastd
    rgb = PCA_EIGVEC @ (alpha * PCA_EIGVAL)
    return x + rgb.view(3, 1, 1)


class ImageNetTrainTransform:
    """Scale augmentation for file datasets: random shorter side, random crop, flip, PCA colour.

    Args:
        cfg: the network's preprocessing (crop size, mean, std, interpolation).
        scale: shorter-side range at input 224; scaled by ``cfg.crop / 224`` for other inputs.
        pca: apply PCA colour augmentation.
    """

    def __init__(self, cfg: PreprocessConfig, scale: tuple[int, int] = (256, 480), pca: bool = True):
        factor = cfg.crop / 224
        self.cfg, self.pca = cfg, pca
        self.lo, self.hi = max(cfg.crop, round(scale[0] * factor)), max(cfg.crop, round(scale[1] * factor))
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        side = int(torch.randint(self.lo, self.hi + 1, (1,), generator=generator))
        arr = np.asarray(resize_shorter(img, side, self.cfg.interpolation))
        h, w, size = arr.shape[0], arr.shape[1], self.cfg.crop
        top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        crop = arr[top:top + size, left:left + size]
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255.0)
        if self.pca:
            x = pca_lighting(x, generator)
        return (x - self.mean) / self.std


class CenterTransform:
    """No augmentation: exactly the serving centre crop (``--augment none`` on file datasets)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        return torch.from_numpy(preprocess(img, self.cfg, "center")[0])


class FileTrainDataset(torch.utils.data.Dataset):
    """Training view of a file split for a DataLoader: decode, augment, label."""

    def __init__(self, paths, labels, transform: ImageNetTrainTransform, seed: int):
        self.paths, self.labels, self.transform, self.seed = paths, labels, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        # Seeded per (epoch, index) so a resumed run draws the same augmentation as an unbroken one.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + i)
        return self.transform(decode_image(self.paths[i]), generator), int(self.labels[i])
