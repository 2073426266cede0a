"""The BentoML service end to end: one real ``bentoml serve`` subprocess on a loopback port.

Batching only happens across a served endpoint and the limits live in the HTTP layer
(docs/design.md), so nothing here is mocked: real images go over HTTP and every answer is checked
against offline inference with the same ONNX file and the same preprocessing code.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from bentoserver import serve
from conftest import ROOT
from PIL import Image

from core.preprocess import decode_image

# Small limits so the 413 cases are cheap to send; both are far above every good image here.
MAX_BYTES = 3_000_000
MAX_PIXELS = 20_000_000
# Warm-up long enough (~10 s on 2 cores) that /readyz is observably 503 before it is 200.
WARMUP_ITERS = 300
PROB_ATOL = 1e-5
PHOTOS = ["astronaut", "chelsea", "coffee", "camera", "rocket"]
DIGITS = [f"digit{i}" for i in range(5)]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@dataclass
class Server:
    url: str
    artifacts: Path
    log: Path
    readyz: list[int] = field(default_factory=list)  # every /readyz answer from the first to the first 200
    livez: list[int] = field(default_factory=list)  # /livez, polled alongside once the server answers

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="module")
def server(digits_artifacts: Path, tmp_path_factory) -> Iterator[Server]:
    """The service with small limits and a long warm-up; records every /readyz and /livez answer."""
    tmp = tmp_path_factory.mktemp("service")
    env = {"RESDEPLOY_WARMUP_ITERS": str(WARMUP_ITERS), "RESDEPLOY_MAX_BYTES": str(MAX_BYTES),
           "RESDEPLOY_MAX_PIXELS": str(MAX_PIXELS)}
    readyz: list[int] = []
    livez: list[int] = []

    def record(client: httpx.Client, code: int) -> None:
        readyz.append(code)
        livez.append(client.get("/livez").status_code)

    with serve(digits_artifacts, tmp, env, on_poll=record, poll_s=0.02) as (url, log):
        yield Server(url, digits_artifacts, log, readyz, livez)


@pytest.fixture(scope="module")
def client(server: Server):
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(digits_artifacts: Path) -> dict:
    return json.loads((digits_artifacts / "manifest.json").read_text())


@pytest.fixture(scope="module")
def labels(digits_artifacts: Path) -> list[str]:
    return json.loads((digits_artifacts / "labels.json").read_text())


def _torchvision_crops(data: bytes, pre: dict, tta: str) -> np.ndarray:
    """The crops written out here from torchvision's definitions, not with core.preprocess:
    Resize(resize) (longer side truncated), CenterCrop / TenCrop(crop) (the flipped image cropped
    again), ToTensor, Normalize. JPEGs at least 4x the resize are DCT-scaled as the service
    documents (libjpeg's largest 1/2, 1/4, 1/8 keeping the shorter side >= 2x resize)."""
    import math

    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    r = pre["resize"]
    if img.format == "JPEG" and min(img.size) >= 4 * r:
        k = 2 * r / min(img.size)
        img.draft(None, (math.ceil(img.size[0] * k - 1e-9), math.ceil(img.size[1] * k - 1e-9)))
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 16-bit grey: 0..65535 scaled to 0..255, round half up (documented)
        img = Image.fromarray(((np.asarray(img).astype(np.int64) + 128) // 257).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # alpha onto white (documented)
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    w, h = img.size
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    a = np.asarray(img)
    c = pre["crop"]

    def five(x):
        hh, ww = x.shape[:2]
        top, left = int(round((hh - c) / 2.0)), int(round((ww - c) / 2.0))
        return [x[:c, :c], x[:c, ww - c:], x[hh - c:, :c], x[hh - c:, ww - c:], x[top:top + c, left:left + c]]

    crops = [five(a)[4]] if tta == "center" else five(a) + five(a[:, ::-1])
    x = np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def offline(digits_artifacts: Path, manifest: dict):
    """Probabilities the service should give, computed without any of its code: the crops by
    :func:`_torchvision_crops`, the model by a bare onnxruntime session on the same file, the
    softmax averaged over the crops by hand."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(digits_artifacts / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(data: bytes, tta: str = "ten_crop") -> np.ndarray:
        logits = session.run(None, {name: _torchvision_crops(data, manifest["preprocess"], tta)})[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).mean(axis=0)

    yield run


@pytest.fixture(scope="module")
def digits_test():
    from training.data import load_dataset

    return load_dataset("digits").test


@pytest.fixture(scope="module")
def samples(digits_test) -> dict[str, bytes]:
    """scikit-image's sample photos (JPEG and PNG, one grayscale) and digits test images (PNG)."""
    import skimage.data

    out = {}
    for name, fmt in zip(PHOTOS, ["JPEG", "PNG", "JPEG", "PNG", "JPEG"]):
        out[name] = _encode(Image.fromarray(getattr(skimage.data, name)()), fmt)
    assert Image.open(io.BytesIO(out["camera"])).mode == "L"
    for i, name in enumerate(DIGITS):
        out[name] = _encode(Image.fromarray(digits_test.images[i]), "PNG")
    return out


def _image(data: bytes, name: str = "x.png") -> dict:
    return {"image": (name, data, "application/octet-stream")}


def _classify(client: httpx.Client, data: bytes, **form) -> dict:
    r = client.post("/classify", files=_image(data), data={k: str(v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    return r.json()


def _assert_top_k(top: list[dict], probs: np.ndarray, labels: list[str], k: int = 5) -> None:
    """Indices in the offline order (ties within 1e-7 may swap) and every probability within 1e-5."""
    got = [e["index"] for e in top]
    want = np.argsort(-probs, kind="stable")[:k].tolist()
    assert len(got) == k == len(set(got)), top
    for e in top:
        assert abs(e["prob"] - probs[e["index"]]) <= PROB_ATOL, (e, probs[e["index"]])
        assert e["label"] == labels[e["index"]]
    if got != want:
        assert np.allclose(probs[got], probs[want], rtol=0, atol=1e-7), (got, want, probs)


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as {(sample name, sorted labels without pid): value}, summed over processes."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid")))
            out[key] = out.get(key, 0.0) + s.value
    return out


def _rejected(client: httpx.Client, reason: str) -> float:
    return _metrics(client).get(("resdeploy_rejected_requests_total", (("reason", reason),)), 0.0)


# 1. Readiness ---------------------------------------------------------------------------------

def test_no_access_log_line_per_request_by_default(server: Server, client: httpx.Client, samples):
    _classify(client, samples["digit1"])
    # RESDEPLOY_ACCESS_LOG is off: BentoML logs each request as "... path=/classify ..." when on.
    assert "path=/classify" not in server.log.read_text(errors="replace")


def test_readyz_is_503_until_warm_and_livez_is_200_throughout(server: Server, client: httpx.Client):
    # How many polls fall in the warm-up depends on the machine; the order does not: 503s, then 200s.
    first_ok = server.readyz.index(200)
    assert set(server.readyz[:first_ok]) <= {503} and set(server.readyz[first_ok:]) == {200}, server.readyz
    assert set(server.livez) == {200}, server.livez
    assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200


# 2. Parity with offline inference -------------------------------------------------------------

@pytest.mark.parametrize("tta", ["ten_crop", "center"])
@pytest.mark.parametrize("name", PHOTOS + DIGITS)
def test_matches_offline_inference(client, samples, offline, labels, manifest, name, tta):
    answer = _classify(client, samples[name], tta=tta)
    probs = offline(samples[name], tta)
    _assert_top_k(answer["top_k"], probs, labels)
    assert answer["top1"] == answer["top_k"][0] and answer["tta"] == tta
    fp32 = next(a for a in manifest["artifacts"] if a["precision"] == "fp32" and a.get("kind", "onnx") == "onnx")
    assert answer["model"] == {"arch": "resnet20", "precision": "fp32", "backend": "onnxruntime",
                               "sha256": fp32["sha256"]}
    t = answer["timing_ms"]
    assert t.keys() == {"preprocess", "inference", "total"} and 0 <= t["preprocess"] <= t["total"]


def test_top_k_option(client, samples, offline, labels):
    answer = _classify(client, samples["digit0"], top_k=10)
    _assert_top_k(answer["top_k"], offline(samples["digit0"]), labels, k=10)
    assert len(_classify(client, samples["digit0"], top_k=1)["top_k"]) == 1


# 3. Concurrency and batching ------------------------------------------------------------------

def _fingerprint_clash(a: tuple[list[int], np.ndarray], b: tuple[list[int], np.ndarray]) -> bool:
    return a[0] == b[0] and np.allclose(a[1], b[1], rtol=1e-3, atol=1e-12)


BURSTS = 2


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, samples, digits_test, offline):
    # 64 distinct uploads whose offline top-5 (indices + probabilities) tell them apart, so a
    # response delivered to the wrong request cannot pass; near-ties in the top 6 are skipped so
    # the exact index order is stable across batch compositions.
    candidates = [samples[n] for n in PHOTOS] + [_encode(Image.fromarray(digits_test.images[i]), "PNG")
                                                 for i in range(10, len(digits_test))]
    uploads, expect = [], []
    for data in candidates:
        probs = offline(data)
        top6 = np.sort(probs)[::-1][:6]
        if np.min(top6[:-1] / np.maximum(top6[1:], 1e-300)) < 1.001:
            continue
        top = np.argsort(-probs, kind="stable")[:5]
        fp = (top.tolist(), probs[top])
        if not any(_fingerprint_clash(fp, other) for other in expect):
            uploads.append(data)
            expect.append(fp)
        if len(uploads) == 64:
            break
    assert len(uploads) == 64
    before = _metrics(client)

    async def send_all():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=120, limits=limits,
                                     trust_env=False) as ac:
            # Two bursts, so the second meets a batcher that has already run (state carried over).
            return [await asyncio.gather(*[ac.post("/classify", files=_image(d)) for d in uploads])
                    for _ in range(BURSTS)]

    for responses in asyncio.run(send_all()):
        assert [r.status_code for r in responses] == [200] * 64, \
            [r.text for r in responses if r.status_code != 200][:3]
        for r, (top, probs) in zip(responses, expect):
            a = r.json()
            assert a["top1"]["index"] == top[0] and abs(a["top1"]["prob"] - probs[0]) <= PROB_ATOL
            assert [e["index"] for e in a["top_k"]] == top
            np.testing.assert_allclose([e["prob"] for e in a["top_k"]], probs, rtol=1e-3, atol=1e-12)

    # The batcher's histograms, aggregated over BentoML's worker processes on /metrics.
    after = _metrics(client)

    def delta(sample: str, le: str | None = None, metric: str = "resdeploy_crops_per_batch") -> float:
        key = (f"{metric}_{sample}", (("le", le),) if le else ())
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches, rows = delta("count"), delta("sum")
    assert rows == BURSTS * 64 * 10, (rows, batches)  # every ten-crop request: 10 rows through the model
    assert delta("bucket", "+Inf") > delta("bucket", "10.0"), "no batch larger than one request"
    assert batches < BURSTS * 64, f"{batches} batches for {BURSTS * 64} requests: nothing was batched"
    # Requests per batch: every request ran exactly once, in as many batches as the rows say.
    assert delta("sum", metric="resdeploy_requests_per_batch") == BURSTS * 64
    assert delta("count", metric="resdeploy_requests_per_batch") == batches


# 4. Bad input ---------------------------------------------------------------------------------

def _png(size=(40, 30), mode="RGB") -> bytes:
    return _encode(Image.new(mode, size, 200 if mode in ("L", "1") else (200, 30, 60)), "PNG")


def _jpeg() -> bytes:
    return _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")


def _chunked_oversize():
    """A multipart body without Content-Length (chunked), larger than the limit."""
    yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
    for _ in range(MAX_BYTES // 100_000 + 5):
        yield b"\0" * 100_000
    yield b"\r\n--b--\r\n"


def _bad_inputs() -> dict[str, tuple]:
    """id: (request kwargs factory, status, reason); bodies are built only for the case that runs."""
    png = _png()
    return {
        "no_files": (lambda: dict(files=[("tta", (None, "center"))]), 400, "missing_image"),
        "misnamed_field": (lambda: dict(files={"file": ("x.png", png)}), 400, "missing_image"),
        "empty_file": (lambda: dict(files=_image(b"")), 400, "empty_image"),
        "text_file": (lambda: dict(files=_image(b"hello, this is not an image\n" * 10, "notes.txt")), (400, 415),
                      "invalid_image"),
        "corrupt_png": (lambda: dict(files=_image(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)), 400, "invalid_image"),
        "truncated_jpeg": (lambda: dict(files=_image(_jpeg()[:1500], "x.jpg")), 400, "invalid_image"),
        "body_over_limit": (lambda: dict(files=_image(os.urandom(3_500_000))), 413, "request_too_large"),
        "chunked_body_over_limit": (lambda: dict(content=_chunked_oversize(), headers={
            "content-type": "multipart/form-data; boundary=b"}), 413, "request_too_large"),
        "decompression_bomb": (lambda: dict(files=_image(_png((12000, 12000), "1"))), 413, "image_too_large"),
        # 131 bytes, 25 kP: resizing the short side to 32 would make it 25.6 MP (over MAX_PIXELS).
        "thin_image": (lambda: dict(files=_image(_png((1, 25_000), "L"))), 413, "image_too_large"),
        "top_k_0": (lambda: dict(files=_image(png), data={"top_k": "0"}), 422, "invalid_top_k"),
        "top_k_11": (lambda: dict(files=_image(png), data={"top_k": "11"}), 422, "invalid_top_k"),
        "top_k_abc": (lambda: dict(files=_image(png), data={"top_k": "abc"}), 422, "invalid_top_k"),
        "tta_five_crop": (lambda: dict(files=_image(png), data={"tta": "five_crop"}), 422, "invalid_tta"),
        "json_body": (lambda: dict(json={"image": "aGVsbG8="}), 415, "unsupported_media_type"),
        "two_images_to_classify": (lambda: dict(files=[("image", ("a.png", png)), ("image", ("b.png", png))]),
                                   413, "too_many_images"),
    }


BAD_INPUTS = ["no_files", "misnamed_field", "empty_file", "text_file", "corrupt_png", "truncated_jpeg",
              "body_over_limit", "chunked_body_over_limit", "decompression_bomb", "thin_image", "top_k_0",
              "top_k_11", "top_k_abc", "tta_five_crop", "json_body", "two_images_to_classify"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_json_4xx_and_the_next_request_succeeds(client, samples, case):
    make, status, reason = _bad_inputs()[case]
    before = _rejected(client, reason)
    r = client.post("/classify", **make())
    assert r.status_code in (status if isinstance(status, tuple) else (status,)), (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body.keys() == {"error", "detail"} and body["error"] == reason and body["detail"], body
    assert _rejected(client, reason) == before + 1
    _classify(client, samples["digit1"])


def test_bad_input_cases_are_all_listed():
    assert sorted(BAD_INPUTS) == sorted(_bad_inputs())


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.requests.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "image/png")
        body = _png()
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_url_in_image_field_is_refused_and_never_fetched(client, samples):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
        with httpx.Client(trust_env=False, timeout=10) as direct:  # the recorder works
            assert direct.get(url).status_code == 200 and _Recorder.requests == ["/cat.png"]
        _Recorder.requests.clear()
        before = _rejected(client, "not_a_file")
        r = client.post("/classify", files=[("image", (None, url))])
        assert r.status_code == 400 and r.json()["error"] == "not_a_file", r.text
        assert "never fetched" in r.json()["detail"]
        assert _rejected(client, "not_a_file") == before + 1
        _classify(client, samples["digit2"])  # the server is done with the bad request by now
        time.sleep(0.2)
        assert _Recorder.requests == []
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


# 5. Image modes -------------------------------------------------------------------------------

def _modes() -> dict[str, bytes]:
    import skimage.data

    rgb = Image.fromarray(skimage.data.chelsea()).resize((90, 60))
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (60, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return {
        "L": _encode(rgb.convert("L"), "PNG"),
        "LA": _encode(Image.merge("LA", (rgb.convert("L"), alpha)), "PNG"),
        "P": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "RGBA": _encode(Image.merge("RGBA", (*rgb.split(), alpha)), "PNG"),
        "CMYK": _encode(rgb.convert("CMYK"), "JPEG"),
        "I;16": _encode(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "PNG"),
        "exif_rotated": _encode(rgb, "JPEG", exif=exif),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "exif_rotated"])
def test_image_modes_are_accepted_like_offline(client, offline, labels, mode):
    data = _modes()[mode]
    opened = Image.open(io.BytesIO(data))
    if mode == "exif_rotated":
        assert opened.size == (90, 60) and decode_image(data).size == (60, 90)  # the tag is applied
    else:
        assert opened.mode == mode or (mode == "I;16" and opened.mode.startswith("I")), opened.mode
    answer = _classify(client, data, tta="center")
    _assert_top_k(answer["top_k"], offline(data, "center"), labels)


# 6. Batch endpoint and model description -------------------------------------------------------

def test_classify_batch_answers_in_order_like_single_calls(client, samples):
    names = ["digit3", "coffee", "digit4"]
    r = client.post("/classify_batch", files=[("image", (f"{n}.img", samples[n])) for n in names],
                    data={"top_k": "3", "tta": "center"})
    assert r.status_code == 200, r.text
    batch = r.json()
    assert isinstance(batch, list) and len(batch) == 3
    for n, got in zip(names, batch):
        single = _classify(client, samples[n], top_k=3, tta="center")
        assert [e["index"] for e in got["top_k"]] == [e["index"] for e in single["top_k"]], n
        np.testing.assert_allclose([e["prob"] for e in got["top_k"]], [e["prob"] for e in single["top_k"]],
                                   rtol=0, atol=PROB_ATOL)
        assert got["tta"] == "center" and got["model"] == single["model"]


def test_model_endpoint_describes_the_artifact(client, manifest, labels):
    r = client.get("/model")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["arch"] == "resnet20" and info["num_classes"] == 10 and info["labels"] == labels
    assert len(labels) == 10
    assert info["precision"] == "fp32" and info["backend"] == "onnxruntime"
    assert info["sha256"] == next(a["sha256"] for a in manifest["artifacts"] if a["file"] == "model.fp32.onnx")
    assert info["preprocess"] == manifest["preprocess"]


# 7. No torch in the serving image -------------------------------------------------------------

def test_service_module_imports_without_torch(digits_artifacts: Path):
    script = ("import sys; sys.modules['torch'] = None\n"
              "import serving.service as s\n"
              "assert sys.modules['torch'] is None\n"
              "print(s.Classifier.name)\n")
    env = os.environ | {"PYTHONPATH": str(ROOT), "RESDEPLOY_ARTIFACTS": str(digits_artifacts),
                        "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["resdeploy"]


def test_a_model_that_fails_to_load_keeps_the_server_unready(digits_artifacts: Path, tmp_path, samples):
    """Readiness, deterministically: the model file no longer matches its manifest hash, so the load
    thread fails; /readyz and v2 ready stay unready, requests get a JSON 503 saying why, /livez is 200."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(digits_artifacts, art)
    with open(art / "model.fp32.onnx", "ab") as f:
        f.write(b"tampered")
    with serve(art, tmp_path, ready=False) as (url, log):
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as c:
            deadline = time.monotonic() + 120
            while "model failed to load" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.1)
            assert c.get("/readyz").status_code == 503 and c.get("/livez").status_code == 200
            assert c.get("/v2/health/ready").status_code == 400
            r = c.post("/classify", files=_image(samples["digit1"]))
            assert r.status_code == 503 and r.json()["error"] == "not_ready"
            assert "model failed to load" in r.json()["detail"] and "sha256" in r.json()["detail"], r.text
