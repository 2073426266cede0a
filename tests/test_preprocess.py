"""Tests for core/preprocess.py on real encoded images (made here, no mocks)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError, PreprocessError
from core.preprocess import (
    TTA_MODES,
    ImageTooLargeError,
    PreprocessConfig,
    center_crop,
    crops_uint8,
    decode_image,
    draft_size,
    five_crop,
    load_crops,
    multiscale_sizes,
    normalize,
    preprocess,
    preprocess_full,
    resize_shorter,
    ten_crop,
)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def coord_image(h: int, w: int) -> np.ndarray:
    """HWC uint8 array whose pixel (r, c) holds (r, c, r + c): every crop is identifiable."""
    r, c = np.mgrid[:h, :w]
    return np.stack([r, c, r + c], axis=-1).astype(np.uint8)


def noise_image(h: int = 64, w: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape[-1] == 3
    return arr


CFG32 = PreprocessConfig(
    input_size=32, resize=36, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
)


# --------------------------------------------------------------------------- geometry


def test_ten_crop_matches_hand_computed_crops_and_order():
    h, w, s = 7, 10, 4
    arr = coord_image(h, w)

    # torchvision center_crop: top = int(round((7 - 4) / 2)) = round(1.5) = 2,
    # left = int(round((10 - 4) / 2)) = 3.
    ct, cl = 2, 3
    # (top, left, flipped) of TenCrop's outputs: five crops of the image, then of its mirror.
    boxes = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), (ct, cl)]
    specs = [(t, l, False) for t, l in boxes] + [(t, l, True) for t, l in boxes]

    def expected_crop(top, left, flipped):
        out = np.zeros((s, s, 3), np.uint8)
        for i in range(s):
            for j in range(s):
                r = top + i
                c = w - 1 - (left + j) if flipped else left + j  # mirror[r, c] = img[r, w-1-c]
                out[i, j] = (r, c, r + c)
        return out

    expected = np.stack([expected_crop(*spec) for spec in specs])
    got = ten_crop(arr, s)
    assert got.shape == (10, s, s, 3) and got.dtype == np.uint8
    for k in range(10):
        np.testing.assert_array_equal(got[k], expected[k], err_msg=f"crop {k} {specs[k]}")
    np.testing.assert_array_equal(five_crop(arr, s), expected[:5])

    # Spot values: centre crop starts at (2, 3); the mirrored top-left starts at column 9.
    assert tuple(got[4, 0, 0]) == (2, 3, 5)
    assert tuple(got[5, 0, 0]) == (0, 9, 9)
    assert tuple(got[5, 0, 1]) == (0, 8, 8)


def test_ten_crop_flips_the_image_not_the_crop():
    # With an odd margin (w - s = 3) round(1.5) = 2 picks a different centre in the mirror:
    # mirror centre = original columns [1, 5) reversed, not the mirror of columns [2, 6).
    arr = coord_image(4, 7)
    got = ten_crop(arr, 4)
    np.testing.assert_array_equal(got[4], arr[0:4, 2:6])
    np.testing.assert_array_equal(got[9], arr[0:4, 1:5][:, ::-1])
    assert not np.array_equal(got[9], got[4][:, ::-1])


@pytest.mark.parametrize(
    "h, w, size, top, left",
    [
        (7, 7, 4, 2, 2),  # margin 3: round(1.5) = 2
        (9, 5, 4, 2, 0),  # margin 5: round(2.5) = 2 (half to even); margin 1: round(0.5) = 0
        (6, 8, 4, 1, 2),  # even margins
        (11, 4, 4, 4, 0),  # margin 7: round(3.5) = 4
        (4, 4, 4, 0, 0),
    ],
)
def test_center_crop_rounding(h, w, size, top, left):
    arr = coord_image(h, w)
    np.testing.assert_array_equal(center_crop(arr, size), arr[top : top + size, left : left + size])


def test_crop_larger_than_image_raises():
    arr = coord_image(5, 8)
    for fn in (center_crop, five_crop, ten_crop):
        with pytest.raises(PreprocessError, match="does not fit"):
            fn(arr, 6)


@pytest.mark.parametrize(
    "size_wh, target, expected_wh",
    [
        ((500, 375), 256, (341, 256)),  # int(256 * 500 / 375) = int(341.33)
        ((375, 500), 256, (256, 341)),
        ((333, 500), 256, (256, 384)),  # int(384.38)
        ((640, 480), 32, (42, 32)),
        ((100, 100), 37, (37, 37)),
        ((20, 30), 64, (64, 96)),  # upscaling
    ],
)
def test_resize_shorter_torchvision_sizes(size_wh, target, expected_wh):
    img = Image.new("RGB", size_wh, (1, 2, 3))
    assert resize_shorter(img, target).size == expected_wh


def test_resize_shorter_noop_and_interpolations():
    img = noise_image(256, 341)
    assert resize_shorter(img, 256) is img
    sizes = {resize_shorter(img, 128, mode).size for mode in ("bilinear", "bicubic", "nearest")}
    assert sizes == {(170, 128)}
    with pytest.raises(ConfigError, match="lanczos"):
        resize_shorter(img, 128, "lanczos")


# --------------------------------------------------------------------------- normalize / preprocess


def test_normalize_values_dtype_layout():
    crops = np.zeros((2, 3, 4, 3), np.uint8)
    crops[..., 0] = 0
    crops[..., 1] = 51
    crops[..., 2] = 255
    crops[1, 2, 3] = (255, 0, 102)
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.2, 0.25)
    out = normalize(crops, mean, std)
    assert out.shape == (2, 3, 3, 4) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out[0, 0], -1.0, atol=1e-6)  # (0 - 0.5) / 0.5
    np.testing.assert_allclose(out[0, 1], -0.25, atol=1e-6)  # (0.2 - 0.25) / 0.2
    np.testing.assert_allclose(out[0, 2], 1.0, atol=1e-6)  # (1 - 0.75) / 0.25
    np.testing.assert_allclose(out[1, :, 2, 3], [1.0, -1.25, -1.4], atol=1e-6)
    # Same float32 operation order as torchvision ToTensor + Normalize: bit-exact.
    ref = crops.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    ref = (ref - np.float32(mean).reshape(1, 3, 1, 1)) / np.float32(std).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(out, ref)


def test_normalize_rejects_bad_input():
    with pytest.raises(PreprocessError):
        normalize(np.zeros((4, 4, 3), np.uint8), (0, 0, 0), (1, 1, 1))
    with pytest.raises(PreprocessError):
        normalize(np.zeros((1, 4, 4, 3), np.float32), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ConfigError):
        normalize(np.zeros((1, 4, 4, 3), np.uint8), (0, 0, 0), (1, 0, 1))


def test_preprocess_shapes_and_ten_crop_centre_equals_center_mode():
    img = noise_image(45, 60)
    one = preprocess(img, CFG32)
    ten = preprocess(img, CFG32, tta="ten_crop")
    assert one.shape == (1, 3, 32, 32) and ten.shape == (10, 3, 32, 32)
    assert one.dtype == ten.dtype == np.float32
    assert one.flags.c_contiguous and ten.flags.c_contiguous
    np.testing.assert_array_equal(ten[4], one[0])
    # And the centre crop is exactly resize -> centre crop -> normalize.
    arr = np.asarray(resize_shorter(img, 36))
    np.testing.assert_array_equal(one, normalize(center_crop(arr, 32)[None], CFG32.mean, CFG32.std))
    assert set(TTA_MODES) == {"center", "ten_crop"}


def test_preprocess_converts_non_rgb_and_rejects_unknown_tta():
    gray = Image.new("L", (40, 50), 128)
    out = preprocess(gray, CFG32)
    want = (128 / 255 - np.array(CFG32.mean)) / CFG32.std
    np.testing.assert_allclose(out[0, :, 0, 0], want, atol=1e-6)
    with pytest.raises(ConfigError, match="ten_crop"):
        preprocess(gray, CFG32, tta="five_crop")


def test_preprocess_full_keeps_whole_image():
    img = noise_image(375, 500)
    out = preprocess_full(img, PreprocessConfig.imagenet(), shorter=256)
    assert out.shape == (1, 3, 256, 341) and out.dtype == np.float32


# --------------------------------------------------------------------------- decode_image


def test_decode_png_jpeg_bytes_and_path(tmp_path):
    img = noise_image(30, 40)
    png = encode(img)
    np.testing.assert_array_equal(rgb(decode_image(png)), np.asarray(img))
    np.testing.assert_array_equal(rgb(decode_image(bytearray(png))), np.asarray(img))
    flat = Image.new("RGB", (40, 30), (200, 100, 50))
    jpg = rgb(decode_image(encode(flat, "JPEG", quality=95)))
    assert jpg.shape == (30, 40, 3)
    np.testing.assert_allclose(jpg.astype(int), np.broadcast_to((200, 100, 50), jpg.shape), atol=3)
    path = tmp_path / "x.png"
    path.write_bytes(png)
    np.testing.assert_array_equal(rgb(decode_image(path)), np.asarray(img))
    np.testing.assert_array_equal(rgb(decode_image(str(path))), np.asarray(img))
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "missing.png")


def test_decode_applies_exif_orientation():
    # Four 16x16-aligned quadrants survive JPEG; Orientation=6 means "rotate 90 deg clockwise
    # to display" (EXIF 2.32, Table 6), so a 64x32 (w x h) file displays as 32x64.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:16, :32], arr[:16, 32:] = (255, 0, 0), (0, 255, 0)
    arr[16:, :32], arr[16:, 32:] = (0, 0, 255), (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    out = rgb(decode_image(data))
    assert out.shape == (64, 32, 3)
    expected = np.rot90(arr, k=-1)  # clockwise
    for r, c in [(8, 8), (8, 24), (40, 8), (40, 24), (56, 4)]:
        np.testing.assert_allclose(out[r, c].astype(int), expected[r, c], atol=12)
    assert tuple(expected[8, 24]) == (255, 0, 0)  # the red top-left is now top-right


def _pixels(mode: str, values: list) -> Image.Image:
    """A one-row image of ``mode`` holding ``values`` (ints or per-band tuples)."""
    img = Image.new(mode, (len(values), 1))
    img.putdata(values)
    return img


@pytest.mark.parametrize(
    "img, expected",
    [
        (_pixels("L", [0, 100, 255]), [0, 100, 255]),
        # LA: opaque grey; fully transparent -> white; half alpha -> 100*128/255 + 255*127/255.
        (_pixels("LA", [(100, 255), (100, 0), (100, 128)]), [100, 255, 177]),
        (_pixels("RGBA", [(10, 20, 30, 0), (10, 20, 30, 255)]), [(255,) * 3, (10, 20, 30)]),
        (_pixels("1", [0, 1, 0, 1]), [0, 255, 0, 255]),
    ],
    ids=["L", "LA", "RGBA", "1"],
)
def test_decode_modes_png(img, expected):
    out = rgb(decode_image(encode(img)))
    want = np.array(expected)
    if want.ndim == 1:  # grey levels
        want = np.repeat(want[:, None], 3, axis=1)
    np.testing.assert_allclose(out[0].astype(int), want, atol=1)


def _palette_image(transparency: int | None) -> bytes:
    img = Image.new("P", (3, 1))
    img.putpalette([10, 20, 30, 200, 150, 100, 0, 0, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    return encode(img, transparency=transparency) if transparency is not None else encode(img)


def test_decode_palette_with_and_without_transparency():
    opaque = rgb(decode_image(_palette_image(None)))[0]
    np.testing.assert_array_equal(opaque, [(10, 20, 30), (200, 150, 100), (0, 0, 0)])
    # Index 2 is transparent: its palette colour (black) must not leak through.
    transparent = rgb(decode_image(_palette_image(2)))[0]
    np.testing.assert_array_equal(transparent, [(10, 20, 30), (200, 150, 100), (255, 255, 255)])


def test_decode_rgb_colour_key_transparency():
    img = _pixels("RGB", [(10, 20, 30), (40, 50, 60)])
    out = rgb(decode_image(encode(img, transparency=(10, 20, 30))))
    np.testing.assert_array_equal(out[0], [(255, 255, 255), (40, 50, 60)])


def test_decode_cmyk_tiff():
    img = Image.new("CMYK", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)])
    out = rgb(decode_image(encode(img, "TIFF")))
    np.testing.assert_array_equal(out[0], [(0, 255, 255), (0, 0, 0), (255, 255, 255)])


def test_decode_16bit_int_and_float_are_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    want = [0, 1, 128, 255]  # round(v / 257)
    png16 = Image.fromarray(values)
    assert png16.mode == "I;16"
    np.testing.assert_array_equal(rgb(decode_image(encode(png16)))[0, :, 0], want)
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(rgb(decode_image(encode(big, "TIFF")))[0, :, 1], want)
    i32 = _pixels("I", [-5, 257, 32768, 70000])
    np.testing.assert_array_equal(rgb(decode_image(encode(i32, "TIFF")))[0, :, 2], want)
    # F follows Pillow's convention: 0..255 intensities, rounded and clipped.
    f = _pixels("F", [0.4, 100.6, 300.0, -3.0])
    np.testing.assert_array_equal(rgb(decode_image(encode(f, "TIFF")))[0, :, 0], [0, 101, 255, 0])


def _truncated(fmt: str) -> bytes:
    data = encode(noise_image(64, 64), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is not an image\n" * 4,
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,  # PNG signature, garbage after
        _truncated("PNG"),
        _truncated("JPEG"),
    ],
    ids=["empty", "text", "random", "corrupt-png", "truncated-png", "truncated-jpeg"],
)
def test_decode_bad_input_raises_preprocess_error(data):
    with pytest.raises(PreprocessError, match="cannot decode image") as info:
        decode_image(data)
    assert not isinstance(info.value, ImageTooLargeError)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height 1-bit pixels but holds only a few bytes of data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def _blank_png(width: int, height: int) -> bytes:
    """A valid, complete 1-bit all-black PNG of width x height: a few kB that decode to width * height
    bytes (Pillow's mode "1" holds a byte per pixel), three times that as RGB."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# Run in a fresh interpreter: the peak resident set (VmHWM, reset through /proc/self/clear_refs) sees
# Pillow's pixel buffers, which tracemalloc does not (it traces Python's allocator only).
_PEAK_CHILD = r"""
import json, sys
from pathlib import Path
from core.preprocess import ImageTooLargeError, decode_image

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

PNG_1x1 = bytes.fromhex(sys.argv[1])
cases = [(Path(p).read_bytes(), None if limit == "default" else int(limit))
         for p, limit in zip(sys.argv[2::2], sys.argv[3::2])]
decode_image(PNG_1x1)  # first-call costs (Pillow's plugin imports) before the reset
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
before, outcomes = status("VmRSS"), []
for data, limit in cases:
    try:
        decode_image(data) if limit is None else decode_image(data, max_pixels=limit)
        outcomes.append("decoded")
    except ImageTooLargeError as e:
        outcomes.append(str(e))
print(json.dumps({"growth": status("VmHWM") - before, "outcomes": outcomes}))
"""


def test_too_many_pixels_is_rejected_before_decoding(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    # Real, complete images (no truncation that could stop the decoder early): 25 MP and 49 MP.
    (tmp_path / "25mp.png").write_bytes(_blank_png(5000, 5000))
    (tmp_path / "49mp.png").write_bytes(_blank_png(7000, 7000))
    args = [_blank_png(1, 1).hex(), str(tmp_path / "25mp.png"), "1000000", str(tmp_path / "49mp.png"), "default"]  # default: 40 MP
    r = subprocess.run([sys.executable, "-c", _PEAK_CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "25000000 pixels" in out["outcomes"][0] and "1000000" in out["outcomes"][0], out
    assert "49000000 pixels" in out["outcomes"][1], out
    # By hand: decoding the smaller one would hold 25 MB ("1": a byte per pixel), then 75 MB as RGB.
    # Rejected from the header, the peak may grow by no more than an image at the 1 MP limit as RGB
    # (3 MB), an eighth of the smallest rejected image's own buffer.
    bound = 1_000_000 * 3
    assert out["growth"] < bound, f"peak RSS grew {out['growth']} bytes: the pixel limit came too late"
    assert issubclass(ImageTooLargeError, PreprocessError)  # a client error like any bad image


def test_pillow_decompression_bomb_error_maps_to_too_large():
    # 20000 x 20000 exceeds Pillow's own hard limit even with our check disabled.
    with pytest.raises(ImageTooLargeError, match="400000000"):
        decode_image(_png_header(20000, 20000), max_pixels=None)


def test_real_large_image_limit_boundary():
    data = encode(Image.new("1", (3000, 2000)))  # a few kB on disk, 6 MP
    assert len(data) < 20_000
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=5_999_999)
    small = encode(noise_image(10, 10))
    assert decode_image(small, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageTooLargeError):
        decode_image(small, max_pixels=99)


# --------------------------------------------------------------------------- config


def test_config_round_trip_and_imagenet_defaults():
    cfg = PreprocessConfig.imagenet()
    assert (cfg.input_size, cfg.resize, cfg.crop, cfg.interpolation) == (224, 256, 224, "bilinear")
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    assert PreprocessConfig.imagenet(32).resize == 37  # round(36.57)
    assert PreprocessConfig.imagenet(288).resize == 329
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["mean"] == [0.485, 0.456, 0.406]
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.from_dict({**d, "future_key": 1}) == cfg
    del d["interpolation"]
    assert PreprocessConfig.from_dict(d) == cfg


def test_config_from_dict_missing_key():
    d = PreprocessConfig.imagenet().to_dict()
    del d["std"]
    with pytest.raises(ConfigError, match="std"):
        PreprocessConfig.from_dict(d)
    with pytest.raises(ConfigError):
        PreprocessConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_size": 0}, "input_size"),
        ({"resize": -1}, "resize"),
        ({"crop": 32.0}, "crop"),
        ({"crop": True}, "crop"),
        ({"crop": 40}, "crop=40 is larger than resize=36"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": "abc"}, "std"),
        ({"interpolation": "area"}, "area"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(input_size=32, resize=36, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(ConfigError, match=match):
        PreprocessConfig(**{**base, **kwargs})


def test_multiscale_sizes():
    assert multiscale_sizes(PreprocessConfig.imagenet()) == [224, 256, 384, 480, 640]
    assert multiscale_sizes(CFG32) == [32, 37, 55, 69, 91]
    tiny = PreprocessConfig(1, 1, 1, (0, 0, 0), (1, 1, 1))
    assert multiscale_sizes(tiny) == [1, 2, 3]  # deduplicated, at least 1


# --------------------------------------------------------------------------- JPEG draft decoding


@pytest.mark.parametrize("size, target, expected", [
    ((500, 375), 36, (96, 72)),    # floor 2*36 = 72 on the shorter side: 500 * 72/375 = 96
    ((144, 144), 36, (72, 72)),    # exactly twice the floor: 1/2 scale is allowed
    ((143, 300), 36, None),        # 1/2 scale would give 71 < 72: decode every pixel
    ((100, 100), 36, None),
    ((4032, 3024), 256, (683, 512)),  # a phone photo for an ImageNet model: ceil(4032 * 512/3024)
])
def test_draft_size_by_hand(size, target, expected):
    assert draft_size(size, target) == expected


def _photo_jpegs() -> dict[str, bytes]:
    skimage_data = pytest.importorskip("skimage.data")
    return {name: encode(Image.fromarray(getattr(skimage_data, name)()), "JPEG", quality=90)
            for name in ("astronaut", "coffee", "chelsea", "rocket")}


def test_draft_decoding_scales_by_powers_of_two_and_keeps_the_floor():
    for name, jpg in _photo_jpegs().items():
        full = decode_image(jpg)
        for target in (32, 36, 64):
            small = decode_image(jpg, draft=target)
            # libjpeg's scaled sizes round up: ceil(side / s) for s in 1, 2, 4, 8.
            scaled = {s: tuple(-(-side // s) for side in full.size) for s in (1, 2, 4, 8)}
            assert small.size in scaled.values(), (name, target, full.size, small.size)
            assert min(small.size) >= 2 * target, (name, target, small.size)
            assert small.size != full.size, (name, target)  # these photos are all > 4x every target
        # An ImageNet resize (256) of these photos (shorter side < 1024) changes nothing.
        assert decode_image(jpg, draft=256).size == full.size
        np.testing.assert_array_equal(rgb(decode_image(jpg, draft=256)), rgb(full))


def test_draft_decoding_leaves_png_alone():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 500, 3), dtype=np.uint8))
    png = encode(img)
    np.testing.assert_array_equal(rgb(decode_image(png, draft=32)), np.asarray(img))


def test_draft_decoded_crops_stay_close_to_full_decoding():
    # What draft decoding costs in pixels, on real photos, for a CIFAR-sized model: the crops a
    # model sees differ by under 2 grey levels on average (measured 0.3-1.7; docs/design.md has
    # its accuracy effect). A draft below the 2x floor (1/8 always) gives 2-4x larger errors.
    cfg = PreprocessConfig(32, 36, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for name, jpg in _photo_jpegs().items():
        full = crops_uint8(decode_image(jpg), cfg, "ten_crop").astype(np.float64)
        crops = load_crops(jpg, cfg, "ten_crop").astype(np.float64)
        assert crops.shape == full.shape == (10, 32, 32, 3)
        assert np.abs(crops - full).mean() < 2.0, name
        assert np.abs(crops - full).max() <= 24, name


def test_preprocess_is_normalised_uint8_crops():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    crops = crops_uint8(img, CFG32, "ten_crop")
    assert crops.dtype == np.uint8 and crops.shape == (10, 32, 32, 3) and crops.flags.c_contiguous
    np.testing.assert_array_equal(normalize(crops, CFG32.mean, CFG32.std), preprocess(img, CFG32, "ten_crop"))
