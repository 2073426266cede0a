"""HTTP handlers of the public service: limits, multipart parsing, validation, JSON errors.

BentoML's own image parameters give a 500 for a misnamed field or a corrupt image, have no size
limit and download URLs given in place of a file (docs/design.md), so the public endpoints are a
small Starlette app mounted on the service: every bad input gets a 4xx JSON ``{error, detail}``.
"""

from __future__ import annotations

import json

from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.errors import PreprocessError
from core.preprocess import (
    DECODE_FORMATS,
    TTA_MODES,
    ImageTooLargeError,
    UnsupportedImageError,
    crops_uint8,
    decode_image,
)
from serving import multipart

MAX_TEXT_FIELDS = 16  # top_k, tta and room for clients that send a few extra fields


class HTTPError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_response(e: HTTPError) -> JSONResponse:
    return JSONResponse({"error": e.error, "detail": e.detail}, status_code=e.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPError(413, "request_too_large", f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes, max_files: int) -> multipart.Form:
    """Multipart form of an already-read body (serving/multipart.py)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HTTPError(415, "unsupported_media_type",
                        "send multipart/form-data with the image in a field named 'image' "
                        "(curl -F image=@photo.jpg ...)")
    try:
        # One spare file slot, so that too many images get our own clear message below.
        return multipart.parse(body, ctype, max_parts=max_files + 1 + MAX_TEXT_FIELDS)
    except multipart.MultipartError as e:
        raise HTTPError(400, "bad_multipart", f"cannot parse the multipart body: {e}") from e


async def images_from(form, max_files: int) -> list[bytes]:
    """The bytes of every ``image`` field; URLs and text are refused, never fetched."""
    values = form.getlist("image")
    if not values:
        names = ", ".join(sorted(set(form.keys()))) or "none"
        raise HTTPError(400, "missing_image", f"no 'image' field in the form (fields sent: {names}); "
                        "upload the file as -F image=@file.jpg")
    if len(values) > max_files:
        hint = "; send several images to /classify_batch" if max_files == 1 else ""
        raise HTTPError(413, "too_many_images", f"{len(values)} images; at most {max_files} per request{hint}")
    out = []
    for v in values:
        if not isinstance(v, multipart.FilePart):
            kind = "a URL" if str(v).strip().lower().startswith(("http://", "https://", "ftp://", "file:")) \
                else "a text field"
            raise HTTPError(400, "not_a_file", f"'image' is {kind}, not an uploaded file; URLs are never "
                            "fetched by the server: download the image and upload its bytes")
        data = v.data
        if not data:
            raise HTTPError(400, "empty_image", f"the uploaded file {v.filename!r} is empty")
        out.append(data)
    return out


def options(form, num_classes: int) -> tuple[int, str]:
    """``top_k`` (1..classes, default min(5, classes)) and ``tta`` (ten_crop | center)."""
    raw_k = form.get("top_k")
    k = min(5, num_classes)
    if raw_k is not None:
        try:
            k = int(str(raw_k))
        except ValueError:
            raise HTTPError(422, "invalid_top_k", f"top_k={raw_k!r} is not an integer") from None
        if not 1 <= k <= num_classes:
            raise HTTPError(422, "invalid_top_k", f"top_k={k} must be between 1 and {num_classes}")
    tta = str(form.get("tta") or "ten_crop")
    if tta not in TTA_MODES:
        raise HTTPError(422, "invalid_tta", f"tta={tta!r}: choose one of {', '.join(TTA_MODES)}")
    return k, tta


def decode_and_crop(data: bytes, cfg, tta: str, max_pixels: int):
    """Decode (limits enforced, JPEG draft decoding for ``cfg.resize``) and crop one upload:
    uint8 (N, crop, crop, 3), normalised later where the model runs."""
    try:
        img = decode_image(data, max_pixels=max_pixels, draft=cfg.resize)
    except ImageTooLargeError as e:
        raise HTTPError(413, "image_too_large", str(e)) from e
    except UnsupportedImageError as e:
        fmt = signature_format(data)
        if fmt is None:
            raise HTTPError(415, "invalid_image", str(e)) from e
        # Pillow reports a PNG with a signature but broken chunks as "cannot identify": it is a
        # corrupt upload of a supported format (400), not an unsupported media type (415).
        raise HTTPError(400, "invalid_image", f"cannot decode image: corrupt {fmt} data") from e
    except PreprocessError as e:
        raise HTTPError(400, "invalid_image", str(e)) from e
    # The shorter side is resized to cfg.resize before cropping, so a thin image grows: a 131-byte
    # 1x25000 PNG becomes 32x800000 (25.6 MP, 0.3 s), a 1x19000000 one (under a 20 MP limit) would
    # need ~60 GB. Bound the resized image by the same pixel limit.
    w, h = img.size
    short, long = min(w, h), max(w, h)
    resized = cfg.resize * int(cfg.resize * long / short)
    if resized > max_pixels:
        raise HTTPError(413, "image_too_large", f"image is {w}x{h}: resizing its shorter side to {cfg.resize} "
                        f"gives {resized} pixels, over the limit of {max_pixels}; crop it to a less "
                        "extreme aspect ratio")
    return crops_uint8(img, cfg, tta)


def signature_format(data: bytes) -> str | None:
    """The accepted format whose magic bytes ``data`` starts with (Pillow's own checks), if any."""
    Image.init()
    prefix = data[:16]
    for fmt in DECODE_FORMATS:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is not None and accept(prefix):
            return fmt
    return None


def json_response(obj, status: int = 200) -> Response:
    """``obj`` as JSON (encoded once; NaN and infinities refused, as in JSONResponse)."""
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json")
