"""A folder of real image files for the offline-prediction tests: scikit-learn's digits scans saved as
PNG and JPEG under nested folders, each named with its true class, plus files that are not usable
images (empty, random bytes, text, a truncated PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

BAD = {"empty.png": "empty", "random.jpg": "format", "notes.txt": "format", "truncated.png": "truncated"}


def make_tree(root: Path, n: int, bad: bool = True) -> dict[str, int]:
    """Write ``n`` digit images (test split first, then train) under ``root``; return
    ``{absolute path: true class}`` for the images (bad files have no class)."""
    from training.data import load_digits_dataset

    d = load_digits_dataset()
    images = np.concatenate([d.test.images, d.train.images])[:n]
    labels = np.concatenate([d.test.labels, d.train.labels])[:n]
    truth = {}
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / f"set{i % 3}" / ("png" if i % 2 else "jpeg")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}_class{label}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(img).save(path, quality=92)
        truth[str(path.resolve())] = int(label)
    if bad:
        b = root / "set1" / "bad"
        b.mkdir(parents=True, exist_ok=True)
        (b / "empty.png").write_bytes(b"")
        (b / "random.jpg").write_bytes(np.random.default_rng(0).bytes(700))
        (b / "notes.txt").write_text("a text file, not an image\n")
        png = next(p for p in truth if p.endswith(".png"))
        data = Path(png).read_bytes()
        (b / "truncated.png").write_bytes(data[: len(data) // 2])
    return truth


def bad_files(root: Path) -> list[str]:
    return sorted(str((root / "set1" / "bad" / name).resolve()) for name in BAD)


def hidden(root: Path) -> None:
    """Hidden files and folders, which a folder INPUT skips."""
    (root / ".cache").mkdir(exist_ok=True)
    (root / ".cache" / "x.png").write_bytes(b"")
    (root / ".DS_Store").write_bytes(os.urandom(16))
