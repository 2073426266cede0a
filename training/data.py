"""Datasets: the embedded offline default (scikit-learn digits), CIFAR-10 and image folders.

``load_dataset(spec)`` takes ``digits``, ``cifar10`` (looked up under ``--data-root``, downloaded
only with ``--download``), or a directory: a ``cifar-10-batches-py`` folder (or its parent), an
ImageFolder root with ``train/`` and ``val/`` (or ``test/``) holding one sub-folder per class, or a
single class tree ``DIR/<class>/*.jpg`` (torchvision's ImageFolder, e.g. an ImageNet ``val/``).
``load_calibration_images(spec)`` takes all of these and also a flat folder of unlabelled images.
How a directory's layout is told apart: ``training.folders``.

Small datasets live in memory as uint8 NHWC arrays (augmented in batches on the training device);
image-folder splits are lists of files decoded by the shared serving code.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import DatasetError
from core.preprocess import PreprocessConfig, decode_image
from training.folders import (
    IMAGE_EXTENSIONS,
    SPLIT_FOLDERS,
    detect_layout,
    list_class_images,
    list_flat_images,
    sub_folders,
)

log = logging.getLogger(__name__)

UNLABELLED = -1  # the label of every image of an unlabelled (calibration-only) split
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
DIGITS_SIZE = 32
DIGITS_SEED = 0


@dataclass
class Split:
    """One split: in-memory uint8 images (N, H, W, 3) or image file paths, with int labels.

    A label is a class index, or ``UNLABELLED`` (-1) for images of unknown class (a flat
    calibration folder); see :func:`is_labelled`.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int, draft: int | None = None) -> Image.Image:
        """Image ``i`` as RGB PIL, decoded as serving decodes an upload of it (``draft``: the
        resize target, for JPEG draft decoding; see :func:`core.preprocess.decode_image`)."""
        if self.images is not None:
            return Image.fromarray(self.images[i])
        return decode_image(self.paths[i], draft=draft)

    def subset(self, n: int) -> "Split":
        """The first ``n`` items (smoke tests, quick runs)."""
        return self.take(np.arange(min(n, len(self))))

    def sample(self, n: int | None, seed: int = 0) -> "Split":
        """``n`` items drawn with a fixed seed, in their original order; all of them when ``n`` is
        ``None`` or at least ``len(self)``. The export gate, INT8 calibration and the bench all draw
        with this, so the same ``n`` and seed mean the same images everywhere (class-sorted folders
        would skew a plain prefix)."""
        if n is None or n >= len(self):
            return self
        return self.take(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))

    def take(self, idx: np.ndarray) -> "Split":
        """The items at ``idx``."""
        return Split(self.labels[idx], None if self.images is None else self.images[idx],
                     None if self.paths is None else [self.paths[i] for i in idx])


@dataclass
class Dataset:
    """A train/test pair with class names and its default preprocessing."""

    name: str
    classes: list[str]
    train: Split
    test: Split
    preprocess: PreprocessConfig
    # Recipe settings that suit this data better than the generic defaults (see load_digits_dataset).
    train_defaults: dict = field(default_factory=dict)
    # True when test holds the training images themselves (a single class tree): no held-out split.
    test_is_train: bool = False

    @property
    def in_memory(self) -> bool:
        return self.train.images is not None


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 NHWC images (float64 accumulation)."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(round(float(v), 4) for v in x.mean(0)), tuple(round(float(v), 4) for v in x.std(0))


def small_preprocess(images: np.ndarray) -> PreprocessConfig:
    """CIFAR-style preprocessing: no resize, full-image crop, the training set's channel stats.

    The paper subtracts the per-pixel mean (Sec. 4.2); per-channel mean/std is what every
    serving stack can reproduce from three numbers, and it is what we record.
    """
    size = images.shape[1]
    mean, std = channel_stats(images)
    return PreprocessConfig(input_size=size, resize=size, crop=size, mean=mean, std=std)


def load_digits_dataset() -> Dataset:
    """scikit-learn's 1,797 handwritten digits (real scans, shipped with the package).

    8x8 images of 0..16 ink are upsampled bilinearly to 32x32, replicated to RGB, and split
    80/20, stratified by class with a fixed seed, so every machine sees the same split.

    Training defaults differ from CIFAR's (measured on the 2-core dev CPU, ResNet-20, 5 epochs,
    test top-1): the digits fill the whole frame, so the 4-pixel pad-and-crop cuts strokes off
    (pad+crop+flip 85%, flip only 95%, none 99%), and 1,437 images make only 11 steps of 128 per
    epoch, so batches are 32. Flips stay on although digits are chiral: 10-crop testing averages
    mirrored crops, and a net that never saw a mirrored digit would be misled by them.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    small = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR))
                    for im in small])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    labels = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                              random_state=DIGITS_SEED)
    train = Split(labels[tr], images=np.ascontiguousarray(rgb[tr]))
    test = Split(labels[te], images=np.ascontiguousarray(rgb[te]))
    return Dataset("digits", [str(i) for i in range(10)], train, test, small_preprocess(train.images),
                   train_defaults={"augment": "flip", "batch_size": 32})


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain (numpy arrays), nothing callable."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if labels.shape != (len(data),):
            raise ValueError(f"{len(data)} images but labels of shape {labels.shape}")
        return np.ascontiguousarray(data), labels
    except (OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {e}") from e


def load_cifar10(root: Path) -> Dataset:
    """CIFAR-10 from a ``cifar-10-batches-py`` directory (data_batch_1..5, test_batch)."""
    parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(root / "test_batch")
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    train = Split(y, images=x)
    return Dataset("cifar10", list(CIFAR10_CLASSES), train, Split(y_test, images=x_test), small_preprocess(x))


def download_cifar10(data_root: Path) -> Path:
    """Download and unpack CIFAR-10 (python version) under ``data_root``, checking its MD5."""
    data_root.mkdir(parents=True, exist_ok=True)
    archive = data_root / "cifar-10-python.tar.gz"
    if not archive.exists():
        log.info("downloading %s to %s", CIFAR10_URL, archive)
        tmp = archive.with_suffix(".part")
        urllib.request.urlretrieve(CIFAR10_URL, tmp)  # noqa: S310 (fixed https URL)
        tmp.rename(archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    if md5 != CIFAR10_MD5:
        archive.unlink()
        raise DatasetError(f"CIFAR-10 archive checksum {md5} != {CIFAR10_MD5}; deleted it, retry --download")
    with tarfile.open(archive) as tar:
        tar.extractall(data_root, filter="data")
    return data_root / "cifar-10-batches-py"


def load_image_folder(root: Path, input_size: int = 224) -> Dataset:
    """ImageFolder layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``."""
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    train_dir = root / "train"
    classes = sub_folders(train_dir) if train_dir.is_dir() else []
    if not classes or test_dir is None:
        raise DatasetError(f"{root} is not an ImageFolder tree: expected train/<class>/ and val/<class>/ "
                           "(or test/<class>/) sub-folders with JPEG/PNG images")
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise DatasetError(f"{test_dir} has classes missing from train/: {', '.join(unknown[:5])}")
    tr_paths, tr_labels = list_class_images(root / "train", classes)
    te_paths, te_labels = list_class_images(test_dir, classes)
    if not tr_paths or not te_paths:
        raise DatasetError(f"{root}: found {len(tr_paths)} training and {len(te_paths)} test images "
                           f"(extensions {', '.join(IMAGE_EXTENSIONS)}); both must be non-empty")
    pre = PreprocessConfig.imagenet(input_size)
    return Dataset(root.name, classes, Split(tr_labels, paths=tr_paths), Split(te_labels, paths=te_paths), pre)


def load_class_folder(root: Path, input_size: int = 224) -> Dataset:
    """A single class tree ``root/<class>/*.jpg`` (torchvision's ImageFolder), e.g. ImageNet's ``val/``.

    Classes are the sub-folder names, sorted as torchvision sorts them, so label indices match a
    network trained with it; images are found recursively inside each class folder. An empty class
    folder still counts as a class (with a warning), keeping the indices after it in place.

    The tree is one labelled pool with nothing held out: it is the evaluation split ``test``, and
    ``train`` holds the same images (``Dataset.test_is_train``) so that calibration, which draws from
    ``train``, can use it too. Training on it measures accuracy on the training images.

    Raises:
        DatasetError: a sub-folder is named ``val`` or ``test`` (a split folder without ``train/``),
            or the tree holds no images.
    """
    classes = sub_folders(root)
    splits = [c for c in classes if c in SPLIT_FOLDERS]
    if splits:
        raise DatasetError(f"{root} has a {splits[0]}/ folder but no train/: pass --dataset {root / splits[0]} to "
                           f"use it alone as a class tree, or add {root / 'train'}/<class>/ for the two-split layout")
    paths, labels = list_class_images(root, classes)
    if not paths:
        raise DatasetError(f"{root}: no images in its class folders (extensions {', '.join(IMAGE_EXTENSIONS)})")
    empty = [c for i, c in enumerate(classes) if not (labels == i).any()]
    if empty:
        log.warning("%s: %d class folder(s) hold no images (%s); they still count as classes",
                    root, len(empty), ", ".join(empty[:5]))
    pre = PreprocessConfig.imagenet(input_size)
    return Dataset(root.name or root.resolve().name, classes, Split(labels.copy(), paths=list(paths)),
                   Split(labels, paths=paths), pre, test_is_train=True)


ACCEPTED_DIRS = ("a cifar-10-batches-py directory", "an ImageFolder tree (train/<class>/*.jpg with val/<class>/*.jpg "
                 "or test/<class>/*.jpg)", "a class tree (<class>/*.jpg, e.g. ImageNet's val/)")


def _cifar_root(path: Path) -> Path | None:
    """``path`` or its ``cifar-10-batches-py`` sub-folder if either holds CIFAR-10 batches."""
    for root in (path, path / "cifar-10-batches-py"):
        if (root / "data_batch_1").exists() and (root / "test_batch").exists():
            return root
    return None


def _no_layout_error(path: Path, layout: str | None, calibration: bool) -> DatasetError:
    """Why directory ``path`` (with ``detect_layout`` result ``layout``) cannot be read."""
    kinds = ACCEPTED_DIRS + (("a flat folder of images",) if calibration else ())
    accepted = ", ".join(kinds[:-1]) + ", or " + kinds[-1]
    if layout == "flat":
        return DatasetError(f"{path} is a flat folder of images without classes: such a folder is accepted only "
                            f"as calibration data (--calib-data); to evaluate or train, give {accepted}")
    loose = len(list_flat_images(path))
    if loose:
        return DatasetError(f"{path} mixes {loose} loose image file(s) with sub-folders of images, which could be read "
                            f"either way: expected {accepted}")
    return DatasetError(f"{path} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}) and no dataset: "
                        f"expected {accepted}")


def load_dataset(spec: str, *, data_root: str | Path = "data", download: bool = False,
                 input_size: int = 224) -> Dataset:
    """Resolve a ``--dataset`` value to a :class:`Dataset`.

    A directory is read, in this order, as CIFAR-10 batches (in it or in its
    ``cifar-10-batches-py``), as a two-split ImageFolder tree if it has ``train/``, or as a
    single class tree (:func:`load_class_folder`); see ``training.folders`` for how the layouts
    are told apart.

    Args:
        spec: ``digits``, ``cifar10`` or a directory (CIFAR-10 batches, ImageFolder or class tree).
        data_root: where ``cifar10`` is looked for and downloaded to.
        download: allow downloading CIFAR-10 (never done implicitly).
        input_size: network input for image-folder data (its preprocessing default).

    Raises:
        DatasetError: unknown name, missing directory or unrecognised layout (a flat folder of
            images included: it is calibration data only, see :func:`load_calibration_images`).
    """
    if spec == "digits":
        return load_digits_dataset()
    if spec == "cifar10":
        root = Path(data_root) / "cifar-10-batches-py"
        if not (root / "test_batch").exists():
            if not download:
                raise DatasetError(f"CIFAR-10 not found under {Path(data_root)}; pass --download to fetch it "
                                   "(170 MB) or --data-root DIR where cifar-10-batches-py lives")
            root = download_cifar10(Path(data_root))
        return load_cifar10(root)
    path = Path(spec)
    if not path.is_dir():
        raise DatasetError(f"dataset '{spec}' not found: use 'digits' (embedded, offline), 'cifar10', "
                           "or a directory (ImageFolder with train/ and val/, a class tree <class>/*.jpg, "
                           "or cifar-10-batches-py)")
    if (root := _cifar_root(path)) is not None:
        return load_cifar10(root)
    layout = detect_layout(path)
    if layout == "splits":
        return load_image_folder(path, input_size)
    if layout == "classes":
        return load_class_folder(path, input_size)
    raise _no_layout_error(path, layout, calibration=False)


def load_calibration_images(spec: str, *, data_root: str | Path = "data", input_size: int = 224) -> Split:
    """Images to calibrate INT8 activation ranges with: a dataset's training split, or a flat folder.

    Args:
        spec: anything :func:`load_dataset` accepts, or a flat folder ``DIR/*.jpg`` of images of
            no known class. A flat folder is read non-recursively (its sub-folders would be
            indistinguishable from classes), in name order.
        data_root: where ``cifar10`` is looked for (it is never downloaded here).
        input_size: network input for image-folder data, passed to :func:`load_dataset`.

    Returns:
        ``load_dataset(spec).train`` (labelled; for a class tree, the whole tree), or for a flat
        folder a path split whose labels are all ``UNLABELLED`` (-1): see :func:`is_labelled`.

    Raises:
        DatasetError: as :func:`load_dataset`; a folder without images names the extensions
            looked for.
    """
    path = Path(spec)
    if spec not in ("digits", "cifar10") and path.is_dir() and _cifar_root(path) is None:
        layout = detect_layout(path)
        if layout == "flat":
            paths = list_flat_images(path)
            return Split(np.full(len(paths), UNLABELLED, dtype=np.int64), paths=paths)
        if layout is None:
            raise _no_layout_error(path, layout, calibration=True)
    return load_dataset(spec, data_root=data_root, input_size=input_size).train


def is_labelled(split: Split) -> bool:
    """Whether every image of ``split`` has a class (none is ``UNLABELLED``), as accuracy needs."""
    return bool((split.labels != UNLABELLED).all())
