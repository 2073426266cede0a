"""Datasets: the embedded offline default (scikit-learn digits), CIFAR-10 and ImageFolder trees.

``load_dataset(spec)`` takes ``digits``, ``cifar10`` (looked up under ``--data-root``, downloaded
only with ``--download``), or a directory: a ``cifar-10-batches-py`` folder (or its parent) or an
ImageFolder root with ``train/`` and ``val/`` (or ``test/``) holding one sub-folder per class.

Small datasets live in memory as uint8 NHWC arrays (augmented in batches on the training device);
ImageFolder splits are lists of files decoded by the shared serving code.
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

from resdeploy.errors import DatasetError
from serving.preprocess import PreprocessConfig, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
DIGITS_SIZE = 32
DIGITS_SEED = 0


@dataclass
class Split:
    """One split: in-memory uint8 images (N, H, W, 3) or image file paths, with int labels."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB PIL, exactly as a client would upload it."""
        if self.images is not None:
            return Image.fromarray(self.images[i])
        return decode_image(self.paths[i])

    def subset(self, n: int) -> "Split":
        """The first ``n`` items (smoke tests, quick runs)."""
        return Split(self.labels[:n], None if self.images is None else self.images[:n],
                     None if self.paths is None else self.paths[:n])


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


def _list_images(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for idx, c in enumerate(classes):
        d = folder / c
        if not d.is_dir():
            continue
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [idx] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def load_image_folder(root: Path, input_size: int = 224) -> Dataset:
    """ImageFolder layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``."""
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    train_dir = root / "train"
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    if not classes or test_dir is None:
        raise DatasetError(f"{root} is not an ImageFolder tree: expected train/<class>/ and val/<class>/ "
                           "(or test/<class>/) sub-folders with JPEG/PNG images")
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise DatasetError(f"{test_dir} has classes missing from train/: {', '.join(unknown[:5])}")
    tr_paths, tr_labels = _list_images(root / "train", classes)
    te_paths, te_labels = _list_images(test_dir, classes)
    if not tr_paths or not te_paths:
        raise DatasetError(f"{root}: found {len(tr_paths)} training and {len(te_paths)} test images "
                           f"(extensions {', '.join(IMAGE_EXTENSIONS)}); both must be non-empty")
    pre = PreprocessConfig.imagenet(input_size)
    return Dataset(root.name, classes, Split(tr_labels, paths=tr_paths), Split(te_labels, paths=te_paths), pre)


def load_dataset(spec: str, *, data_root: str | Path = "data", download: bool = False,
                 input_size: int = 224) -> Dataset:
    """Resolve a ``--dataset`` value to a :class:`Dataset`.

    Args:
        spec: ``digits``, ``cifar10`` or a directory (CIFAR-10 python batches or ImageFolder).
        data_root: where ``cifar10`` is looked for and downloaded to.
        download: allow downloading CIFAR-10 (never done implicitly).
        input_size: network input for ImageFolder data (its preprocessing default).

    Raises:
        DatasetError: unknown name, missing directory or unrecognised layout.
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
                           "or a directory (ImageFolder with train/ and val/, or cifar-10-batches-py)")
    for root in (path, path / "cifar-10-batches-py"):
        if (root / "data_batch_1").exists() and (root / "test_batch").exists():
            return load_cifar10(root)
    if (path / "train").is_dir():
        return load_image_folder(path, input_size)
    raise DatasetError(f"{path} is neither a cifar-10-batches-py directory nor an ImageFolder tree "
                       "(train/<class>/*.jpg and val/<class>/*.jpg)")
