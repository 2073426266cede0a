"""serving/multipart.py against a second implementation (Starlette + python-multipart) on bodies
that httpx encodes, and on malformed bodies that must be refused."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from serving.multipart import FilePart, MultipartError, boundary_of, parse


def _encode(files, data=None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def _starlette_form(body: bytes, ctype: str) -> list[tuple[str, object]]:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def run():
        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", ctype.encode())]}
        form = await Request(scope, receive).form(max_files=100, max_fields=100)
        out = []
        for k, v in form.multi_items():
            out.append((k, (v.filename, await v.read()) if isinstance(v, UploadFile) else v))
        return out

    return asyncio.run(run())


def _ours(body: bytes, ctype: str) -> list[tuple[str, object]]:
    return [(k, (v.filename, v.data) if isinstance(v, FilePart) else v) for k, v in parse(body, ctype, 100).items]


@pytest.mark.parametrize("seed", range(8))
def test_matches_starlette_on_httpx_bodies(seed):
    rng = __import__("random").Random(seed)
    files = [("image", (f"f{i}.jpg", os.urandom(rng.randint(0, 70_000)) + b"\r\n--" * rng.randint(0, 3)))
             for i in range(rng.randint(1, 4))]
    data = {"tta": rng.choice(["center", "ten_crop"]), "top_k": str(rng.randint(1, 9)), "note": "héllo; \"x\""}
    body, ctype = _encode(files, data)
    assert _ours(body, ctype) == _starlette_form(body, ctype)


def test_form_accessors_and_quoted_boundary():
    body = (b'preamble\r\n--a b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            b'Content-Type: image/png\r\n\r\nPNGDATA\r\n--a b\r\nContent-Disposition: form-data; name=top_k\r\n\r\n3'
            b'\r\n--a b--\r\nepilogue')
    form = parse(body, 'multipart/form-data; boundary="a b"', 10)
    assert form.keys() == ["image", "top_k"] and form.get("top_k") == "3" and form.get("tta") is None
    (image,) = form.getlist("image")
    assert image == FilePart("x.png", b"PNGDATA", "image/png")


@pytest.mark.parametrize("ctype, body, match", [
    ("multipart/form-data", b"--b\r\n", "boundary"),
    ("multipart/form-data; boundary=" + "x" * 71, b"", "boundary"),
    ("multipart/form-data; boundary=b", b"no delimiter here", "does not contain"),
    ("multipart/form-data; boundary=b", b"--bXX", "CRLF"),
    ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue', "ends inside"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\nvalue\r\n--b--", "headers"),
    ("multipart/form-data; boundary=b", b"--b\r\nX-Other: 1\r\n\r\nv\r\n--b--", "Content-Disposition"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: attachment; name=a\r\n\r\nv\r\n--b--", "form-data"),
    ("multipart/form-data; boundary=b", b"--b\r\nbroken header\r\n\r\nv\r\n--b--", "malformed part header"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n\xff\r\n--b--", "UTF-8"),
    ("multipart/form-data; boundary=b", b"--b\r\n" + b"H: " + b"x" * 9000 + b"\r\n\r\nv\r\n--b--", "longer than"),
])
def test_malformed_bodies_are_refused(ctype, body, match):
    with pytest.raises(MultipartError, match=match):
        parse(body, ctype, 10)


def test_part_count_is_bounded():
    body, ctype = _encode([("image", (f"{i}.png", b"x")) for i in range(5)])
    assert len(parse(body, ctype, 5).items) == 5
    with pytest.raises(MultipartError, match="more than 4 parts"):
        parse(body, ctype, 4)


def test_boundary_of():
    assert boundary_of('multipart/form-data; charset=utf-8; boundary="q\\"x"') == b'q"x'
    assert boundary_of("multipart/form-data; BOUNDARY=abc") == b"abc"
