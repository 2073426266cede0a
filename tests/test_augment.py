"""Training augmentation (He et al. 2015 Sec. 3.4 / 4.2) and the ImageFolder training path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.preprocess import PreprocessConfig, normalize
from training import augment
from training.train import TrainConfig, train

CFG = PreprocessConfig(input_size=8, resize=8, crop=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _images(n: int, size: int = 8) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(1, 256, (n, size, size, 3), dtype=np.uint8))


def test_cifar_augment_is_a_padded_crop_or_its_mirror():
    x = _images(16)
    out = augment.cifar_augment(x, CFG, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 8, 8) and out.dtype == torch.float32
    pad = 1  # input/8
    padded = np.pad(x.numpy(), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    seen_flip = seen_shift = False
    for i in range(16):
        candidates = {}
        for top in range(2 * pad + 1):
            for left in range(2 * pad + 1):
                crop = padded[i, top:top + 8, left:left + 8]
                candidates[(top, left, False)] = crop
                candidates[(top, left, True)] = crop[:, ::-1]
        match = [k for k, c in candidates.items()
                 if np.allclose(normalize(c[None], CFG.mean, CFG.std)[0], out[i].numpy(), atol=1e-6)]
        assert match, f"sample {i} is no padded crop of its image"
        seen_flip |= any(k[2] for k in match)
        seen_shift |= any(k[:2] != (pad, pad) for k in match)
    assert seen_flip and seen_shift


def test_flip_only_keeps_the_frame_and_is_seeded():
    x = _images(32)
    a = augment.cifar_augment(x, CFG, torch.Generator().manual_seed(3), pad=0)
    b = augment.cifar_augment(x, CFG, torch.Generator().manual_seed(3), pad=0)
    torch.testing.assert_close(a, b)
    plain = augment.normalize_batch(x, CFG)
    mirrored = augment.normalize_batch(x.flip(2), CFG)
    same = [(torch.equal(a[i], plain[i]), torch.equal(a[i], mirrored[i])) for i in range(32)]
    assert all(p or m for p, m in same)
    assert 4 < sum(m for _, m in same) < 28  # about half flipped


def test_pca_lighting_shifts_each_channel_by_a_constant():
    x = torch.rand(3, 5, 5)
    y = augment.pca_lighting(x, torch.Generator().manual_seed(0))
    d = (y - x).flatten(1)
    assert torch.allclose(d, d[:, :1].expand_as(d)) and d.abs().max() > 0


def test_imagenet_transform_scale_range_and_determinism():
    cfg = PreprocessConfig.imagenet(64)
    t = augment.ImageNetTrainTransform(cfg)
    assert (t.lo, t.hi) == (73, 137)  # [256, 480] * 64/224
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    a = t(img, torch.Generator().manual_seed(5))
    b = t(img, torch.Generator().manual_seed(5))
    c = t(img, torch.Generator().manual_seed(6))
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)


def _shape_images(root: Path, per_class: int) -> None:
    """Real PNG/JPEG files: red squares vs blue discs on noise, various sizes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("disc", "square"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                h, w = int(rng.integers(60, 100)), int(rng.integers(60, 100))
                arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                yy, xx = np.mgrid[:h, :w]
                mask = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2) if cls == "disc" \
                    else (abs(yy - h / 2) < h / 3) & (abs(xx - w / 2) < w / 3)
                arr[mask] = (40, 60, 230) if cls == "disc" else (230, 40, 40)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(arr).save(root / split / cls / f"{i}.{ext}")


def test_image_folder_trains_with_imagenet_augmentation(tmp_path: Path):
    _shape_images(tmp_path / "shapes", per_class=8)
    out = tmp_path / "run"
    summary = train(TrainConfig(arch="resnet18", dataset=str(tmp_path / "shapes"), out=str(out), epochs=2,
                                batch_size=8, input_size=64, workers=0, progress=False))
    assert len(summary["epochs"]) == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["augment"] == "imagenet"
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["classes"] == ["disc", "square"]
    assert ck["preprocess"] == PreprocessConfig.imagenet(64).to_dict()
    assert ck["model"]["fc.weight"].shape == (2, 512)


def test_file_dataset_rejects_in_memory_augmentations(tmp_path: Path):
    from core.errors import ConfigError

    _shape_images(tmp_path / "shapes", per_class=2)
    with pytest.raises(ConfigError, match="--augment imagenet or none"):
        train(TrainConfig(arch="resnet18", dataset=str(tmp_path / "shapes"), out=str(tmp_path / "r"),
                          augment="cifar", input_size=64, progress=False))
