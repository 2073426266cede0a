"""Image files on disk: which folder layout a directory has, and its image files with their labels.

Three layouts, told apart by :func:`detect_layout` in this order (CIFAR batch directories are
recognised before any of them, by ``training.data``):

* ``splits``: ``DIR/train/<class>/...`` with ``DIR/val/<class>/...`` (or ``test/``). A ``train/``
  sub-folder always means this layout, whatever else ``DIR`` holds.
* ``classes``: ``DIR/<class>/...``, torchvision's ImageFolder (an ImageNet ``val/`` folder, say):
  no loose images in ``DIR``, and at least one image somewhere under its sub-folders.
* ``flat``: loose images directly in ``DIR`` and no sub-folder holding images; unlabelled.

Anything else (nothing, or loose images next to sub-folders of images) has no layout: reading it
either way would silently drop images or invent labels.

Within a class folder images are found recursively, as torchvision does; a flat folder is read
non-recursively (its sub-folders would otherwise be indistinguishable from classes). Files count
as images by extension (any case); they are decoded later, by the serving code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
Layout = Literal["splits", "classes", "flat"]


def is_image(path: Path) -> bool:
    """Whether ``path`` is a file with an image extension (``IMAGE_EXTENSIONS``, any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def sub_folders(root: Path) -> list[str]:
    """Names of the sub-folders of ``root``, sorted as torchvision orders ImageFolder classes."""
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def list_flat_images(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (not in its sub-folders), sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image(p))


def has_images(folder: Path) -> bool:
    """Whether any image lies in ``folder`` or below it (stops at the first one)."""
    return any(is_image(p) for p in folder.rglob("*"))


def list_class_images(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Images under ``folder/<class>/`` (recursively, sorted per class) and their class indices.

    Missing class folders contribute nothing; the label of an image is the index of its class
    in ``classes``.
    """
    paths, labels = [], []
    for idx, c in enumerate(classes):
        d = folder / c
        if not d.is_dir():
            continue
        files = sorted(p for p in d.rglob("*") if is_image(p))
        paths += files
        labels += [idx] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def detect_layout(root: Path) -> Layout | None:
    """The folder layout of directory ``root`` (see the module docstring), or None if it has none."""
    if (root / "train").is_dir():
        return "splits"
    loose = any(is_image(p) for p in root.iterdir())
    filled = any(has_images(root / c) for c in sub_folders(root))
    if filled and not loose:
        return "classes"
    if loose and not filled:
        return "flat"
    return None
