"""training/data.py on real data: the embedded digits, CIFAR-10 batch files, image folders.

CIFAR-10 batches are written here in the python format (pickled dicts of a uint8 (n, 3072)
array and a label list); ImageFolder trees hold real PNG/JPEG files written by Pillow, class
trees and flat calibration folders hold scikit-image's sample photographs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from payloads import CreatesMarker, RunsShell
from PIL import Image

from core.errors import DatasetError
from core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from training.data import (
    CIFAR10_CLASSES,
    UNLABELLED,
    Dataset,
    Split,
    is_labelled,
    load_calibration_images,
    load_dataset,
)

# --- digits (embedded) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shapes_and_pixels(digits):
    assert digits.name == "digits" and digits.in_memory
    assert digits.classes == [str(i) for i in range(10)]
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    for split in (digits.train, digits.test):
        assert split.images.dtype == np.uint8 and split.images.shape == (len(split), 32, 32, 3)
        assert split.labels.dtype == np.int64 and split.paths is None
        # grey digits replicated to RGB, ink scaled to the full 0..255 range
        assert np.array_equal(split.images[..., 0], split.images[..., 1])
        assert np.array_equal(split.images[..., 0], split.images[..., 2])
        assert split.images.min() == 0 and split.images.max() >= 250
        assert split.images.flags["C_CONTIGUOUS"]


def test_digits_split_is_stratified(digits):
    from sklearn.datasets import load_digits

    everything = np.bincount(load_digits().target, minlength=10)
    train = np.bincount(digits.train.labels, minlength=10)
    test = np.bincount(digits.test.labels, minlength=10)
    assert np.array_equal(train + test, everything)  # every image used exactly once per class
    assert (train > 0).all() and (test > 0).all()
    assert np.abs(test - 0.2 * everything).max() <= 1  # 80/20 within each class


def test_digits_is_deterministic(digits):
    again = load_dataset("digits")
    for a, b in ((digits.train, again.train), (digits.test, again.test)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert again.preprocess == digits.preprocess


def test_digits_preprocess_and_train_defaults(digits):
    pre = digits.preprocess
    assert isinstance(pre, PreprocessConfig)
    assert (pre.input_size, pre.resize, pre.crop) == (32, 32, 32)
    # the training images' own channel statistics, equal on all three channels (grey)
    x = digits.train.images[..., 0].astype(np.float64) / 255
    assert pre.mean == pytest.approx((x.mean(),) * 3, abs=1e-4)
    assert pre.std == pytest.approx((x.std(),) * 3, abs=1e-4)
    assert pre.mean != IMAGENET_MEAN
    assert digits.train_defaults == {"augment": "flip", "batch_size": 32}


def test_in_memory_split_image_and_subset(digits):
    img = digits.test.image(7)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert np.array_equal(np.asarray(img), digits.test.images[7])

    sub = digits.train.subset(5)
    assert isinstance(sub, Split) and len(sub) == 5 and sub.paths is None
    assert np.array_equal(sub.labels, digits.train.labels[:5])
    assert np.array_equal(sub.images, digits.train.images[:5])
    assert len(digits.train) == 1437  # the original is untouched
    assert len(digits.train.subset(10_000)) == 1437


# --- CIFAR-10 python batches -------------------------------------------------------------------

PER_BATCH = 4


def write_cifar(root: Path, seed: int = 0, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict[str, tuple]:
    """A miniature cifar-10-batches-py: data_batch_1..5 and test_batch, PER_BATCH images each."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [(i * PER_BATCH + j) % 10 for j in range(PER_BATCH)]
        batch = {b"batch_label": f"batch {i}".encode(), b"data": data, b"labels": labels,
                 b"filenames": [f"img_{i}_{j}.png".encode() for j in range(PER_BATCH)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = (data, labels)
    return batches


def raw_pixel(row: np.ndarray, channel: int, r: int, c: int) -> int:
    """CIFAR rows hold the red plane, then green, then blue, each 32x32 row-major."""
    return int(row[channel * 1024 + r * 32 + c])


@pytest.fixture
def cifar(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "data" / "cifar-10-batches-py"
    return root, write_cifar(root)


def check_cifar(ds: Dataset, batches: dict) -> None:
    assert ds.name == "cifar10" and ds.in_memory
    assert ds.classes == CIFAR10_CLASSES
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and ds.classes[-1] == "truck"
    assert ds.train.images.shape == (5 * PER_BATCH, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (PER_BATCH, 32, 32, 3)
    train_rows = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert ds.train.labels.tolist() == train_labels and ds.train.labels.dtype == np.int64
    assert ds.test.labels.tolist() == batches["test_batch"][1]

    # CHW row-major rows become HWC images: spot-check pixels against the raw layout
    for n, ch, r, c in [(0, 0, 0, 0), (0, 2, 31, 31), (3, 1, 5, 17), (7, 0, 17, 5), (19, 2, 0, 31)]:
        assert ds.train.images[n, r, c, ch] == raw_pixel(train_rows[n], ch, r, c), (n, ch, r, c)
    test_row = batches["test_batch"][0][2]
    pil = ds.test.image(2)
    assert pil.mode == "RGB" and pil.size == (32, 32)
    assert pil.getpixel((17, 5)) == tuple(raw_pixel(test_row, ch, 5, 17) for ch in range(3))  # (x, y)
    assert np.array_equal(ds.train.images[..., 1].reshape(len(train_rows), -1), train_rows[:, 1024:2048])

    pre = ds.preprocess
    assert (pre.input_size, pre.resize, pre.crop) == (32, 32, 32)
    want_mean = [train_rows[:, k * 1024:(k + 1) * 1024].mean() / 255 for k in range(3)]
    assert pre.mean == pytest.approx(want_mean, abs=1e-4)


def test_cifar_from_batches_dir_its_parent_and_data_root(cifar):
    root, batches = cifar
    by_dir = load_dataset(str(root))
    by_parent = load_dataset(str(root.parent))
    by_name = load_dataset("cifar10", data_root=root.parent)
    for ds in (by_dir, by_parent, by_name):
        check_cifar(ds, batches)
    assert np.array_equal(by_dir.train.images, by_name.train.images)
    assert by_parent.preprocess == by_name.preprocess


def test_cifar_numpy1_pickles_load(tmp_path):
    """The published batches name numpy.core.multiarray (numpy 1.x), not numpy._core."""
    root = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(root, seed=1, protocol=3)  # protocol 3: GLOBAL "module\nname\n", unframed
    for f in root.iterdir():
        raw = f.read_bytes()
        assert b"cnumpy._core.multiarray\n_reconstruct\n" in raw
        f.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    check_cifar(load_dataset(str(root)), batches)


@pytest.mark.parametrize("payload", [CreatesMarker, RunsShell])
def test_malicious_cifar_batch_is_refused_without_running_it(cifar, tmp_path, payload):
    # The payload does work under a plain pickle.load; otherwise this test proves nothing.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(payload(control)))
    assert control.exists()

    root, _ = cifar
    marker = tmp_path / "marker"
    evil = {b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [0] * PER_BATCH,
            b"filenames": payload(marker)}
    (root / "data_batch_3").write_bytes(pickle.dumps(evil))

    with pytest.raises(DatasetError) as info:
        load_dataset(str(root))
    assert "data_batch_3" in str(info.value) and "refusing" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    b"",
    b"garbage, not a pickle",
    pickle.dumps([1, 2, 3]),  # a pickle, but not a batch dict
    pickle.dumps({b"labels": [0, 1]}),  # no data
    pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),  # not 3x32x32
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}),  # 2 images, 3 labels
], ids=["empty", "garbage", "list", "no-data", "bad-row-size", "label-count"])
def test_malformed_cifar_batch_is_a_dataset_error(cifar, content):
    root, _ = cifar
    (root / "test_batch").write_bytes(content)
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", data_root=root.parent)


def test_cifar10_missing_without_download_says_how_to_get_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", data_root=empty)
    msg = str(info.value)
    assert "--download" in msg and str(empty) in msg and "--data-root" in msg
    assert list(empty.iterdir()) == []  # nothing downloaded or created


# --- ImageFolder -------------------------------------------------------------------------------

def color(label: int, k: int) -> tuple[int, int, int]:
    return (40 + 100 * label, 10 * k, 200 - 20 * k)


def write_image(path: Path, rgb: tuple[int, int, int], size=(20, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, rgb)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """train/{cat,dog} and val/{cat,dog} with PNG and JPEG files, and a few non-images."""
    root = tmp_path / "pets"
    for split, per_class in (("train", 3), ("val", 2)):
        for label, cls in enumerate(["cat", "dog"]):
            for k in range(per_class):
                ext = ".jpg" if k == 1 else ".png"
                write_image(root / split / cls / f"{split}_{cls}_{k}{ext}", color(label, k))
    write_image(root / "train" / "dog" / "extra.JPEG", (0, 0, 255))  # extensions in any case
    write_image(root / "train" / "cat" / "grey.png", (90, 90, 90), mode="L")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def test_image_folder_classes_labels_and_images(folder):
    ds = load_dataset(str(folder), input_size=64)
    assert ds.name == "pets" and not ds.in_memory
    assert ds.classes == ["cat", "dog"]
    train, val = ds.train, ds.test
    assert [p.name for p in train.paths] == ["grey.png", "train_cat_0.png", "train_cat_1.jpg", "train_cat_2.png",
                                             "extra.JPEG", "train_dog_0.png", "train_dog_1.jpg", "train_dog_2.png"]
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and train.labels.dtype == np.int64
    assert [p.name for p in val.paths] == ["val_cat_0.png", "val_cat_1.jpg", "val_dog_0.png", "val_dog_1.jpg"]
    assert val.labels.tolist() == [0, 0, 1, 1]
    assert val.images is None and train.images is None

    for i, path in enumerate(train.paths):
        img = train.image(i)
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (20, 12)
        if path.name.startswith("train_") and path.suffix == ".png":  # lossless: exact colours
            label, k = train.labels[i], int(path.stem[-1])
            assert img.getpixel((5, 5)) == color(label, k)
    assert train.image(0).getpixel((0, 0)) == (90, 90, 90)  # greyscale PNG comes back RGB
    jpeg = np.asarray(val.image(3), dtype=int)  # lossy, but close
    assert np.abs(jpeg - np.array(color(1, 1))).max() <= 8


def test_image_folder_preprocess_is_imagenet_style(folder):
    ds = load_dataset(str(folder), input_size=64)
    assert ds.preprocess == PreprocessConfig.imagenet(64)
    assert (ds.preprocess.input_size, ds.preprocess.resize, ds.preprocess.crop) == (64, 73, 64)
    assert ds.preprocess.mean == IMAGENET_MEAN and ds.preprocess.std == IMAGENET_STD
    default = load_dataset(str(folder))
    assert (default.preprocess.input_size, default.preprocess.resize, default.preprocess.crop) == (224, 256, 224)


def test_image_folder_accepts_test_instead_of_val(folder):
    (folder / "val").rename(folder / "test")
    ds = load_dataset(str(folder))
    assert len(ds.test) == 4 and ds.test.paths[0].parent.parent.name == "test"


def test_image_folder_val_class_missing_from_train(folder):
    write_image(folder / "val" / "horse" / "h.png", (1, 2, 3))
    with pytest.raises(DatasetError) as info:
        load_dataset(str(folder))
    assert "horse" in str(info.value) and "train" in str(info.value)


@pytest.mark.parametrize("layout", ["no-class-dirs", "class-dirs-without-images", "no-val"])
def test_image_folder_empty_or_incomplete_is_a_dataset_error(tmp_path, layout):
    root = tmp_path / "tree"
    (root / "train").mkdir(parents=True)
    write_image(root / "val" / "cat" / "a.png", (1, 2, 3))
    if layout == "class-dirs-without-images":
        (root / "train" / "cat").mkdir()
        (root / "train" / "cat" / "readme.txt").write_text("no images here")
    elif layout == "no-val":
        write_image(root / "train" / "cat" / "a.png", (1, 2, 3))
        for p in sorted((root / "val").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "val").rmdir()
    with pytest.raises(DatasetError) as info:
        load_dataset(str(root))
    assert str(root) in str(info.value)


def test_path_split_subset(folder):
    ds = load_dataset(str(folder))
    sub = ds.train.subset(3)
    assert len(sub) == 3 and sub.images is None
    assert sub.paths == ds.train.paths[:3] and sub.labels.tolist() == ds.train.labels[:3].tolist()
    assert np.array_equal(np.asarray(sub.image(2)), np.asarray(ds.train.image(2)))
    assert len(ds.train) == 8


# --- unknown values ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["imagenet", "CIFAR-10", "nope/data"])
def test_unknown_name_or_missing_path_lists_the_options(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)  # so that no directory of that name can exist
    with pytest.raises(DatasetError) as info:
        load_dataset(spec)
    msg = str(info.value)
    assert f"'{spec}'" in msg
    for option in ("digits", "cifar10", "ImageFolder", "cifar-10-batches-py"):
        assert option in msg


def test_directory_of_unknown_layout_names_it_and_the_layouts(tmp_path):
    root = tmp_path / "photos"
    write_image(root / "a.png", (1, 2, 3))
    write_image(root / "more" / "b.png", (1, 2, 3))
    (root / "data_batch_1").write_bytes(b"")  # half a CIFAR directory is not one
    with pytest.raises(DatasetError) as info:
        load_dataset(str(root))
    msg = str(info.value)
    assert str(root) in msg and "cifar-10-batches-py" in msg and "ImageFolder" in msg


# --- class trees (DIR/<class>/*.jpg) and flat calibration folders, of real photographs ----------

PHOTO_SIZE = (48, 40)  # (width, height) the photos are shrunk to, so that files stay small


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """scikit-image's sample photographs (shipped with the package), shrunk; camera is greyscale."""
    from skimage import data

    return {name: np.asarray(Image.fromarray(getattr(data, name)()).resize(PHOTO_SIZE, Image.BILINEAR))
            for name in ("astronaut", "chelsea", "coffee", "camera", "rocket")}


def save_photo(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# Relative path -> the photo written there. The folder each file sits in is its class.
PHOTO_TREE = {"space/astronaut.png": "astronaut", "cat/chelsea.jpg": "chelsea", "cup/coffee.png": "coffee",
              "space/camera.png": "camera", "space/launch/rocket.jpg": "rocket", "cat/chelsea.png": "chelsea"}


@pytest.fixture
def photo_tree(tmp_path, photos) -> Path:
    root = tmp_path / "val"
    for rel, name in PHOTO_TREE.items():
        save_photo(root / rel, photos[name])
    (root / "cup" / "README.txt").write_text("not an image")
    return root


def test_class_tree_classes_labels_and_pixels(photo_tree, photos):
    ds = load_dataset(str(photo_tree), input_size=64)
    assert ds.name == "val" and not ds.in_memory
    assert ds.classes == ["cat", "cup", "space"]
    test = ds.test
    assert len(test) == 6 and test.images is None and test.labels.dtype == np.int64
    got = {p.relative_to(photo_tree).as_posix(): ds.classes[label] for p, label in zip(test.paths, test.labels)}
    assert got == {rel: rel.split("/")[0] for rel in PHOTO_TREE}  # nested space/launch/ is still space
    assert test.labels.tolist() == [0, 0, 1, 2, 2, 2]  # grouped by class, as torchvision lists them
    assert ds.preprocess == PreprocessConfig.imagenet(64)

    for i, path in enumerate(test.paths):
        img, want = test.image(i), photos[PHOTO_TREE[path.relative_to(photo_tree).as_posix()]]
        assert img.mode == "RGB" and img.size == PHOTO_SIZE
        rgb = np.repeat(want[..., None], 3, -1) if want.ndim == 2 else want
        if path.suffix == ".png":  # lossless
            assert np.array_equal(np.asarray(img), rgb)
        else:
            assert np.abs(np.asarray(img, dtype=int) - rgb).mean() < 8


def test_class_tree_train_is_the_test_images(photo_tree, folder):
    ds = load_dataset(str(photo_tree))
    assert ds.test_is_train
    assert ds.train.paths == ds.test.paths and ds.train.labels.tolist() == ds.test.labels.tolist()
    calib = load_calibration_images(str(photo_tree))
    assert calib.paths == ds.test.paths and is_labelled(calib)
    assert not load_dataset(str(folder)).test_is_train  # a two-split tree keeps its held-out split


def test_class_tree_orders_classes_like_torchvision(tmp_path, photos):
    root = tmp_path / "tree"
    for name in ("apple", "Zebra", "9", "10", "_x"):
        save_photo(root / name / "a.png", photos["coffee"])
    ds = load_dataset(str(root))
    assert ds.classes == ["10", "9", "Zebra", "_x", "apple"]  # plain string order, upper case first
    assert [p.parent.name for p in ds.test.paths] == ds.classes
    assert ds.test.labels.tolist() == [0, 1, 2, 3, 4]


def test_class_tree_empty_class_folder_keeps_its_index(photo_tree, caplog):
    (photo_tree / "bird").mkdir()  # sorts between cat and cup
    ds = load_dataset(str(photo_tree))
    assert ds.classes == ["bird", "cat", "cup", "space"]
    assert sorted(set(ds.test.labels.tolist())) == [1, 2, 3] and len(ds.test) == 6
    assert "bird" in caplog.text and "no images" in caplog.text


def test_train_val_tree_stays_two_splits(tmp_path, photos):
    root = tmp_path / "pets"
    save_photo(root / "train" / "cat" / "a.jpg", photos["chelsea"])
    save_photo(root / "train" / "cup" / "b.png", photos["coffee"])
    save_photo(root / "train" / "cup" / "c.png", photos["coffee"])
    save_photo(root / "val" / "cup" / "d.png", photos["coffee"])
    save_photo(root / "samples" / "e.png", photos["rocket"])  # a stray folder of images is no class
    ds = load_dataset(str(root))
    assert ds.classes == ["cat", "cup"] and not ds.test_is_train
    assert [p.name for p in ds.train.paths] == ["a.jpg", "b.png", "c.png"] and ds.train.labels.tolist() == [0, 1, 1]
    assert [p.name for p in ds.test.paths] == ["d.png"] and ds.test.labels.tolist() == [1]
    assert load_calibration_images(str(root)).paths == ds.train.paths


@pytest.mark.parametrize("split", ["val", "test"])
def test_split_folder_without_train_points_at_it(tmp_path, photos, split):
    root = tmp_path / "imagenet"
    save_photo(root / split / "n01440764" / "a.jpg", photos["chelsea"])
    for load in (load_dataset, load_calibration_images):
        with pytest.raises(DatasetError) as info:
            load(str(root))
        assert str(root / split) in str(info.value) and "train/" in str(info.value)
    assert load_dataset(str(root / split)).classes == ["n01440764"]


def test_flat_folder_is_unlabelled_calibration_data(tmp_path, photos):
    root = tmp_path / "calib"
    written = {"rocket.jpg", "astronaut.png", "camera.PNG", "chelsea.jpeg", "coffee.webp"}
    for name in written:
        save_photo(root / name, photos[name.split(".")[0]])
    (root / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()  # a sub-folder without images is ignored
    split = load_calibration_images(str(root))
    assert [p.name for p in split.paths] == sorted(written)
    assert split.labels.tolist() == [-1] * 5 and UNLABELLED == -1 and split.labels.dtype == np.int64
    assert not is_labelled(split) and split.images is None
    assert all(split.image(i).size == PHOTO_SIZE and split.image(i).mode == "RGB" for i in range(5))
    assert len(split.subset(2)) == 2

    with pytest.raises(DatasetError) as info:
        load_dataset(str(root))
    msg = str(info.value)
    assert str(root) in msg and "flat folder" in msg and "calibration" in msg


def test_evaluate_refuses_unlabelled_images(tmp_path, photos):
    from training.evaluate import evaluate

    save_photo(tmp_path / "a.png", photos["coffee"])
    split = load_calibration_images(str(tmp_path))
    with pytest.raises(DatasetError, match="labelled"):
        evaluate(None, split, PreprocessConfig.imagenet(32))


@pytest.mark.parametrize("load", [load_dataset, load_calibration_images])
@pytest.mark.parametrize("content", ["nothing", "text-only", "empty-sub-folders"])
def test_folder_without_images_names_it_and_the_extensions(tmp_path, load, content):
    root = tmp_path / "shots"
    root.mkdir()
    if content == "text-only":
        (root / "a.txt").write_text("no image")
        (root / "b.gif.bak").write_bytes(b"GIF89a")
    elif content == "empty-sub-folders":
        (root / "cat").mkdir()
        (root / "dog").mkdir()
        (root / "dog" / "notes.md").write_text("no image")
    with pytest.raises(DatasetError) as info:
        load(str(root))
    msg = str(info.value)
    assert str(root) in msg and ".jpg" in msg and ".png" in msg and "no images" in msg


def test_folder_mixing_loose_images_and_classes_is_refused(tmp_path, photos):
    root = tmp_path / "mixed"
    save_photo(root / "loose.png", photos["coffee"])
    save_photo(root / "cat" / "a.png", photos["chelsea"])
    for load in (load_dataset, load_calibration_images):
        with pytest.raises(DatasetError) as info:
            load(str(root))
        assert str(root) in str(info.value) and "mixes 1 loose image file(s)" in str(info.value)


def test_calibration_from_a_named_dataset_is_its_labelled_train_split(digits):
    calib = load_calibration_images("digits")
    assert len(calib) == 1437 and is_labelled(calib)
    assert np.array_equal(calib.images, digits.train.images)
    with pytest.raises(DatasetError, match="not found"):
        load_calibration_images(str(Path("no") / "such" / "dir"))
