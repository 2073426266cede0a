"""Image preprocessing shared by every stage: training eval, export calibration, serving.

numpy + Pillow only, never torch: the serving image carries no torch, and one implementation
means the numbers a model was evaluated and calibrated on are the numbers it serves on. The
geometry reproduces torchvision's ``Resize(int)``, ``CenterCrop`` and ``TenCrop`` on PIL images
(torchvision/transforms/functional.py) and ``ToTensor`` + ``Normalize`` bit for bit in float32,
so checkpoints evaluated with a torchvision pipeline score the same here.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from core.errors import ConfigError, PreprocessError

log = logging.getLogger(__name__)

TTA_MODES = ("center", "ten_crop")
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
# Shorter sides of the paper's multi-scale, fully-convolutional testing (He et al. 2015, Sec. 3.4).
PAPER_SCALES = (224, 256, 384, 480, 640)
# Formats we accept from untrusted clients. Pillow would otherwise also try EPS (which shells out
# to Ghostscript), FITS, PSD and dozens of rarely fuzzed parsers; photos come in these.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF")
# decode_image(draft=...) keeps at least this factor between a draft-decoded JPEG's shorter side
# and the resize target, so the resize still filters (antialiases) as it does on full decodes.
DRAFT_FACTOR = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTooLargeError(PreprocessError):
    """An image whose width * height exceeds the decode limit (a decompression bomb guard)."""


class UnsupportedImageError(PreprocessError):
    """Bytes Pillow cannot identify as any accepted format (unknown, or a known one too corrupt to sniff)."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; e.g. {name}=224")
    return int(value)


def _check_interpolation(name: Any) -> None:
    if not isinstance(name, str) or name not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {name!r}; choose one of {sorted(INTERPOLATIONS)}")


def _triple(name: str, value: Any, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(out)) or (positive and min(out) <= 0):
        need = "3 positive finite numbers" if positive else "3 finite numbers"
        raise ConfigError(
            f"{name} must be {need} (RGB, in [0,1] pixel units), got {value!r}; "
            f"e.g. {name}={IMAGENET_STD if positive else IMAGENET_MEAN}"
        )
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing constants that travel with the weights (recorded in manifest.json).

    Attributes:
        input_size: The network's native input side (32 for CIFAR, 224 for ImageNet).
        resize: Shorter side after resizing, before cropping.
        crop: Side of the square crop fed to the network (usually ``input_size``).
        mean: Per-channel RGB mean in [0, 1] units.
        std: Per-channel RGB standard deviation in [0, 1] units.
        interpolation: Resize filter, one of ``INTERPOLATIONS``.
    """

    input_size: int
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Normalise types (JSON gives lists, numpy gives np.int64) so equal configs compare and
        # hash equal and to_dict stays JSON-safe.
        for name in ("input_size", "resize", "crop"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.crop > self.resize:
            raise ConfigError(
                f"crop={self.crop} is larger than resize={self.resize}; the crop is taken from "
                f"the resized image, so set resize >= crop (ImageNet: resize=256, crop=224)"
            )
        object.__setattr__(self, "mean", _triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _triple("std", self.std, positive=True))
        _check_interpolation(self.interpolation)

    def to_dict(self) -> dict:
        """Returns a JSON-safe dict (lists, not tuples) that ``from_dict`` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """Builds a config from ``to_dict`` output; extra keys are ignored (newer manifests).

        Raises:
            ConfigError: If ``d`` is not a mapping, misses a required key or holds a bad value.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"preprocessing config must be a JSON object, got {type(d).__name__}")
        required = [f.name for f in fields(cls) if f.name != "interpolation"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(
                f"preprocessing config lacks {missing}; it needs {required} (+ optional "
                f"interpolation): re-export the artifact or add the keys to manifest.json"
            )
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @classmethod
    def imagenet(cls, input_size: int = 224) -> PreprocessConfig:
        """The standard ImageNet evaluation transform: resize to input/0.875, centre crop."""
        input_size = _positive_int("input_size", input_size)
        return cls(input_size, round(input_size / 0.875), input_size, IMAGENET_MEAN, IMAGENET_STD)


@functools.cache
def _decode_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; Image.open raises KeyError on unregistered formats
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


def decode_image(
    source: bytes | str | os.PathLike, max_pixels: int | None = 40_000_000, draft: int | None = None
) -> Image.Image:
    """Decodes untrusted image bytes or a file into an upright RGB image.

    Args:
        source: Encoded image bytes (bytes, bytearray, memoryview) or a file path.
        max_pixels: Largest width * height accepted, checked from the header before any pixel
            data is decoded. ``None`` disables this check; Pillow's own limit (2 *
            ``Image.MAX_IMAGE_PIXELS``, ~179 MP) still applies.
        draft: The shorter side the caller will resize to (``PreprocessConfig.resize``). A JPEG
            whose shorter side is at least ``DRAFT_FACTOR`` times that is decoded at 1/2, 1/4 or
            1/8 scale in the DCT (libjpeg's scaled decoding), never below ``DRAFT_FACTOR`` times
            ``draft`` on either side; the resize then still downsamples by at least that factor.
            ``None`` decodes every pixel. Evaluation, calibration and serving all pass it (see
            :func:`load_crops`), so a model is judged on the pixels it serves on.

    Returns:
        A loaded RGB ``PIL.Image.Image`` with EXIF orientation applied.

    Raises:
        ImageTooLargeError: If the image has more than ``max_pixels`` pixels.
        PreprocessError: If the input is empty, not an image in ``DECODE_FORMATS``, corrupt or
            truncated (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False: a half-grey image
            would be classified silently).
        FileNotFoundError: If ``source`` is a path that does not exist.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise PreprocessError("cannot decode image: empty input")
        with io.BytesIO(source) as fp:
            return _decode(fp, max_pixels, draft)
    with open(source, "rb") as fp:  # OS errors (missing file) propagate as themselves
        return _decode(fp, max_pixels, draft)


def draft_size(size: tuple[int, int], target: int) -> tuple[int, int] | None:
    """The smallest (w, h) a JPEG of ``size`` may be draft-decoded to for a ``target`` shorter side.

    ``None`` when the image is too small to gain (its shorter side is under ``DRAFT_FACTOR *
    target``). The aspect ratio is kept, so libjpeg's scale (the largest of 1/2, 1/4, 1/8 that
    keeps both sides at or above this) leaves the shorter side at ``DRAFT_FACTOR * target`` or more.
    """
    w, h = size
    floor = DRAFT_FACTOR * target
    if min(w, h) < 2 * floor:  # even 1/2 scale would fall below the floor
        return None
    scale = floor / min(w, h)
    return max(1, math.ceil(w * scale - 1e-9)), max(1, math.ceil(h * scale - 1e-9))


def _decode(fp: io.BufferedIOBase, max_pixels: int | None, draft: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our max_pixels is the policy; Pillow's lower warning threshold is log noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=_decode_formats())  # lazy: parses the header only
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{max_pixels} pixels; send a smaller image or raise max_pixels"
            )
        if draft is not None and img.format == "JPEG":
            target = draft_size(img.size, draft)
            if target is not None:
                img.draft(None, target)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # phones store portraits rotated + a tag
        return _to_rgb(img)
    except PreprocessError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image too large: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise UnsupportedImageError(
            f"cannot decode image: not a supported format (accepted: "
            f"{', '.join(_decode_formats())})"
        ) from e
    except Exception as e:
        # Pillow's parsers raise OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        # on hostile input. Everything that fails here is a bad image, i.e. the client's error.
        raise PreprocessError(f"cannot decode image: {type(e).__name__}: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to RGB; alpha is composited onto white."""
    mode = img.mode
    alpha = (
        mode in ("RGBA", "RGBa", "LA", "La", "PA")
        or "transparency" in img.info  # P, L or RGB with a tRNS colour key
        or (mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    )
    if mode == "RGB" and not alpha:
        return img
    if mode == "I" or mode.startswith("I;16"):
        # Pillow's convert() clips 16-bit values at 255 (most of a 16-bit PNG turns white), so
        # scale the 0..65535 range to 0..255 with round-half-up: round(v / 257).
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((a + 128) // 257).astype(np.uint8)).convert("RGB")
    if mode == "F":
        # Pillow's convention for float images: values are 0..255 intensities, clipped.
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if alpha:
        # Transparent pixels' RGB values are arbitrary (often black, sometimes leftovers of an
        # edit), so dropping alpha would feed the network noise; white is what a browser or
        # viewer shows on a default page.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, P, 1, CMYK (naive conversion, ICC profiles ignored as torchvision does), YCbCr, ...
    return img.convert("RGB")


def resize_shorter(
    img: Image.Image, size: int, interpolation: str = "bilinear"
) -> Image.Image:
    """Resizes so the shorter side is ``size``, keeping the aspect ratio.

    Same output size as torchvision ``Resize(size)`` (``_compute_resized_output_size``): the
    longer side is ``int(size * long / short)``, truncated; an image already at that size is
    returned unchanged.

    Raises:
        ConfigError: If ``size`` is not a positive int or ``interpolation`` is unknown.
    """
    size = _positive_int("size", size)
    _check_interpolation(interpolation)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def _check_crop(arr: np.ndarray, size: int) -> tuple[int, int]:
    size = _positive_int("size", size)
    if arr.ndim < 2:
        raise PreprocessError(f"expected an HWC image array, got shape {arr.shape}")
    h, w = arr.shape[:2]
    if size > h or size > w:
        raise PreprocessError(
            f"crop {size}x{size} does not fit in a {h}x{w} image; resize the shorter side to "
            f"at least {size} first"
        )
    return h, w


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Takes the central ``size`` x ``size`` crop of an HWC array (a view, not a copy).

    Offsets follow torchvision ``center_crop``: ``int(round((h - size) / 2.0))``. Python's
    round() rounds half to even, so a margin of 3 starts at 2 but a margin of 5 also at 2.

    Raises:
        PreprocessError: If ``size`` exceeds the image height or width.
    """
    h, w = _check_crop(arr, size)
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def five_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Returns the four corner crops and the centre crop, stacked as (5, size, size, C).

    Order is torchvision ``five_crop``: top-left, top-right, bottom-left, bottom-right, centre.
    """
    h, w = _check_crop(arr, size)
    corners = [arr[:size, :size], arr[:size, w - size :], arr[h - size :, :size]]
    return np.stack(corners + [arr[h - size :, w - size :], center_crop(arr, size)])


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Returns ``five_crop(arr)`` then ``five_crop`` of the horizontally flipped image.

    This is torchvision ``TenCrop(size, vertical_flip=False)``: it flips the whole image and
    crops again, which differs from flipping each crop when the centre margin is odd (the
    rounding then picks a different column), so we do the same.
    """
    return np.concatenate([five_crop(arr, size), five_crop(arr[:, ::-1], size)])


def normalize(crops: np.ndarray, mean, std) -> np.ndarray:
    """Converts (N, H, W, 3) uint8 crops to a contiguous (N, 3, H, W) float32 batch.

    Computes ``(x / 255 - mean) / std`` in float32 in the same order as torchvision
    ``ToTensor`` + ``Normalize``, so the result matches the PyTorch pipeline bit for bit.

    Raises:
        PreprocessError: If ``crops`` is not (N, H, W, 3) uint8.
        ConfigError: If ``mean`` or ``std`` is not 3 numbers (std positive).
    """
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise PreprocessError(
            f"normalize expects (N, H, W, 3) uint8 crops, got {crops.shape} {crops.dtype}"
        )
    m = np.asarray(_triple("mean", mean, positive=False), np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(_triple("std", std, positive=True), np.float32).reshape(1, 3, 1, 1)
    out = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)
    out /= np.float32(255)
    out -= m
    out /= s
    return out


def crops_uint8(img: Image.Image, cfg: PreprocessConfig, tta: str = "center") -> np.ndarray:
    """The crops of a decoded image as uint8 pixels, before normalisation.

    The image is resized and converted to an array once; every crop is a slice of that array.

    Returns:
        uint8 array of shape (1, crop, crop, 3) or (10, crop, crop, 3).

    Raises:
        ConfigError: If ``tta`` is not one of ``TTA_MODES``.
    """
    if tta not in TTA_MODES:
        raise ConfigError(f"unknown tta {tta!r}; choose one of {list(TTA_MODES)}")
    arr = np.asarray(resize_shorter(_to_rgb(img), cfg.resize, cfg.interpolation))
    if tta == "center":
        return np.ascontiguousarray(center_crop(arr, cfg.crop)[None])
    return np.ascontiguousarray(ten_crop(arr, cfg.crop))


def preprocess(img: Image.Image, cfg: PreprocessConfig, tta: str = "center") -> np.ndarray:
    """Turns a decoded image into the network's input batch: :func:`crops_uint8` + :func:`normalize`.

    Args:
        img: A PIL image (any mode; non-RGB is converted like ``decode_image`` does).
        cfg: The artifact's preprocessing constants.
        tta: ``"center"`` for one centre crop, ``"ten_crop"`` for torchvision's 10 crops.

    Returns:
        float32 array of shape (1, 3, crop, crop) or (10, 3, crop, crop).

    Raises:
        ConfigError: If ``tta`` is not one of ``TTA_MODES``.
    """
    return normalize(crops_uint8(img, cfg, tta), cfg.mean, cfg.std)


def load_crops(data: bytes | str | os.PathLike, cfg: PreprocessConfig, tta: str = "center",
               max_pixels: int | None = 40_000_000) -> np.ndarray:
    """Decode (JPEG draft decoding for ``cfg.resize``) and crop: uint8 (N, crop, crop, 3).

    What serving does with an upload; the float batch is ``normalize(crops, cfg.mean, cfg.std)``.
    """
    return crops_uint8(decode_image(data, max_pixels, draft=cfg.resize), cfg, tta)


def preprocess_full(img: Image.Image, cfg: PreprocessConfig, shorter: int) -> np.ndarray:
    """Prepares an uncropped image for fully-convolutional testing (He et al. 2015, Sec. 3.4).

    The paper resizes the shorter side to each of ``multiscale_sizes`` and averages the
    scores of the whole image; the network's global pooling makes any size valid.

    Returns:
        float32 array of shape (1, 3, H, W) where min(H, W) == ``shorter``.
    """
    arr = np.asarray(resize_shorter(_to_rgb(img), shorter, cfg.interpolation))
    return normalize(arr[None], cfg.mean, cfg.std)


def multiscale_sizes(cfg: PreprocessConfig) -> list[int]:
    """The paper's shorter sides {224, 256, 384, 480, 640} scaled by ``input_size / 224``.

    224 gives the paper's scales; 32 (CIFAR) gives [32, 37, 55, 69, 91].
    """
    scale = cfg.input_size / 224
    return sorted({max(1, round(s * scale)) for s in PAPER_SCALES})


PREPROCESS_FLAGS = ("input_size", "resize", "crop", "mean", "std", "interpolation")


def resolve_preprocess(recorded: "PreprocessConfig | None", fallback: "PreprocessConfig", flags: dict,
                       source: str) -> "PreprocessConfig":
    """The checkpoint's preprocessing (else ``fallback``, with a warning) overridden by ``flags``
    (a dict that may hold any of :data:`PREPROCESS_FLAGS`; ``None`` values are ignored)."""
    given = {k: flags[k] for k in PREPROCESS_FLAGS if flags.get(k) is not None}
    base = recorded
    if base is None:
        base = fallback
        missing = [k for k in ("input_size", "resize", "crop", "mean", "std") if k not in given]
        if missing:
            log.warning("%s records no preprocessing; taking %s from the dataset default (%s). Pass --%s to "
                        "match how it was trained.", source, ", ".join(missing),
                        ", ".join(f"{k}={base.to_dict()[k]}" for k in missing),
                        "/--".join(k.replace("_", "-") for k in missing))
    return PreprocessConfig.from_dict(base.to_dict() | given)
