"""The PyTorch reference backend (``model.pt``) and the BentoML model store / ``bentoml build`` path.

Everything BentoML touches lives in a temporary ``BENTOML_HOME`` (set only in the environment of
subprocesses), so the user's model store is never written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import bentoserver
import httpx
import numpy as np
import pytest
import torch
from bounds import min_correct
from conftest import ROOT

from backends.onnxruntime import OnnxRuntimeBackend
from backends.pytorch import TorchBackend
from core.errors import ArtifactError, BackendError
from core.manifest import read_manifest, sha256_file, verify_file
from resdeploy.cli import main
from serving.engine import load_model
from training.checkpoint import restore_model

BIN = Path(sys.executable).parent
MODEL_NAME = "resdeploy-test"


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESDEPLOY_")}
    return env | {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(ROOT),
                  "PYTHONUNBUFFERED": "1"} | extra


def _run(args: list[str], home: Path, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=_env(home, **extra), capture_output=True, text=True,
                          timeout=timeout)


# --- model.pt and the pytorch backend ---------------------------------------------------------------

def test_model_pt_is_listed_and_reproduces_the_checkpoint(digits_run: Path, digits_artifacts: Path):
    m = read_manifest(digits_artifacts)
    entry = m.find("fp32", "pytorch")
    assert entry.file == "model.pt" and entry.backends == ["pytorch"] and entry.budget == "reference"
    assert entry.sha256 == sha256_file(digits_artifacts / "model.pt")
    assert entry.top1 == m.eval["pytorch_fp32"]["top1"]
    assert m.artifacts[-1].kind == "pytorch"  # after every onnx entry
    obj = torch.load(digits_artifacts / "model.pt", weights_only=True)
    assert obj["format"] == "resdeploy.weights/1" and (obj["arch"], obj["num_classes"]) == ("resnet20", 10)
    assert any(k.endswith("running_mean") for k in obj["model"])  # unfolded: BN tensors are there

    x = np.random.default_rng(7).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with TorchBackend(verify_file(digits_artifacts, entry), m.crop) as b:
        assert b.input_shape == (None, 3, 32, 32) and b.describe()["file"] == "model.pt"
        got = b.infer(x)
        with torch.no_grad():  # the checkpoint itself, on the backend's device: bit-identical logits
            ref = restore_model(digits_run / "best.pt").model.to(b.device)(torch.from_numpy(x).to(b.device))
        ref = ref.cpu().numpy()
        with pytest.raises(BackendError, match=r"expects input of shape \(None, 3, 32, 32\)"):
            b.infer(np.zeros((1, 3, 28, 28), np.float32))
    assert got.dtype == np.float32 and got.shape == (7, 10)
    np.testing.assert_array_equal(got, ref)
    with OnnxRuntimeBackend(verify_file(digits_artifacts, m.find("fp32")), "fp32",
                            providers=["CPUExecutionProvider"]) as ort_b:
        diff = np.abs(ort_b.infer(x) - got).max()  # BN folded vs unfolded: float rounding, relative to the logits
        assert diff <= 1e-5 * max(1.0, float(np.abs(got).max())), diff
    assert b.model is None and not b.active


def test_torch_backend_device_and_half_are_checked(digits_artifacts: Path):
    m = read_manifest(digits_artifacts)
    path = verify_file(digits_artifacts, m.find("fp32", "pytorch"))
    with pytest.raises(BackendError, match="half precision needs CUDA"):
        TorchBackend(path, m.crop, device="cpu", half=True)
    with pytest.raises(BackendError, match="'tpu'"):
        TorchBackend(path, m.crop, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="is_available"):
            TorchBackend(path, m.crop, device="cuda")
    with TorchBackend(path, m.crop, device="cpu") as b:  # pinned to the CPU even where a GPU exists
        assert b.device.type == "cpu" and b.precision == "fp32"


def test_engine_loads_the_pytorch_backend_and_checks_its_hash(digits_artifacts: Path, tmp_path: Path):
    model = load_model(digits_artifacts, backend="pytorch")
    try:
        assert model.backend.name == "pytorch" and model.entry.kind == "pytorch"
        s = model.summary()
        assert (s["backend"], s["precision"], s["file"]) == ("pytorch", "fp32", "model.pt")
        assert model.backend.infer(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    finally:
        model.backend.deactivate()
    copy = tmp_path / "copy"
    shutil.copytree(digits_artifacts, copy)
    with open(copy / "model.pt", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_model(copy, backend="pytorch")


# --- --bento-model and bentoml build ------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored(digits_run: Path, tmp_path_factory) -> dict:
    """``resdeploy export --bento-model`` in a subprocess, into a temporary BENTOML_HOME."""
    base = tmp_path_factory.mktemp("bento")
    home, out = base / "home", base / "artifacts"
    t0 = time.monotonic()
    r = _run([sys.executable, "-m", "resdeploy", "export", str(digits_run / "best.pt"), "--out", str(out),
              "--precisions", "fp32,int8-cpu", "--calib-data", "digits", "--calib-images", "64",
              "--eval-images", "200", "--no-progress", "--bento-model", MODEL_NAME], home)
    assert r.returncode == 0, r.stderr
    line = next(s for s in r.stdout.splitlines() if s.startswith("saved BentoML model "))
    tag = line.split()[3].rstrip(";")
    return {"home": home, "out": out, "tag": tag, "seconds": time.monotonic() - t0}


_GET = r"""
import json, sys, bentoml
m = bentoml.models.get(sys.argv[1])
print(json.dumps({"tag": str(m.tag), "path": m.path, "labels": m.info.labels, "metadata": m.info.metadata}))
"""


def test_export_stores_the_artifact_directory_as_a_bento_model(stored: dict):
    home, out, tag = stored["home"], stored["out"], stored["tag"]
    assert tag.startswith(f"{MODEL_NAME}:")
    listed = _run([str(BIN / "bentoml"), "models", "list", "-o", "json"], home)
    assert listed.returncode == 0, listed.stderr
    assert tag in [m["tag"] for m in json.loads(listed.stdout)]
    r = _run([sys.executable, "-c", _GET, f"{MODEL_NAME}:latest"], home)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    path = Path(info["path"])
    assert info["tag"] == tag and path.is_relative_to(home)
    assert not (Path(out) / "model.yaml").exists()  # the installed directory is untouched
    m = read_manifest(path)  # manifest.json at the root of the stored model
    for entry in [*m.artifacts, m.labels, m.calibration]:
        verify_file(path, entry)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} <= \
        {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}  # calib/ included
    assert info["metadata"] == {"arch": "resnet20", "num_classes": 10, "precisions": ["fp32", "int8-cpu"],
                                "manifest_sha256": sha256_file(out / "manifest.json"), "schema_version": 1}
    assert info["labels"] == {"project": "resdeploy", "arch": "resnet20"}


def test_bad_bento_model_name_fails_before_any_export_work(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    # The checkpoint does not exist: the name must be rejected before it is even looked for.
    code = main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"),
                 "--bento-model", "Bad Name!"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "--bento-model 'Bad Name!' is not a valid BentoML model name" in err and "lowercase" in err
    # Before any work: the missing checkpoint is never mentioned, nothing is written (no --out, no
    # BENTOML_HOME), whatever the machine's speed.
    assert "missing.pt" not in err and "not found" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def built(stored: dict) -> dict:
    """``bentoml build`` of the service with the stored model, in the same BENTOML_HOME."""
    t0 = time.monotonic()
    r = _run([str(BIN / "bentoml"), "build", "-o", "tag"], stored["home"], timeout=600,
             RESDEPLOY_BENTO_MODEL=f"{MODEL_NAME}:latest")
    assert r.returncode == 0, r.stdout + r.stderr
    bento = next(s for s in r.stdout.splitlines() if s.startswith("__tag__:")).removeprefix("__tag__:")
    return {"tag": bento, "seconds": time.monotonic() - t0}


def test_bentoml_build_packs_the_stored_model(stored: dict, built: dict):
    bento, seconds = built["tag"], built["seconds"]
    got = _run([str(BIN / "bentoml"), "get", bento, "-o", "json"], stored["home"])
    assert got.returncode == 0, got.stderr
    info = json.loads(got.stdout)
    assert info["service"] == "serving.service:Classifier"
    models = {m["tag"] for svc in info["services"] for m in svc["models"]} | {m["tag"] for m in info["models"]}
    assert models == {stored["tag"]}, info
    # The image carries the contract, the runtime backends and the service, and they run without torch.
    src = Path(stored["home"]) / "bentos" / bento.replace(":", "/") / "src"
    tops = {p.relative_to(src).parts[0] for p in src.rglob("*.py")}
    assert tops == {"core", "backends", "serving"}, tops
    assert not (src / "backends" / "pytorch.py").exists()
    code = ("import sys; sys.modules['torch'] = None\nimport core, backends, serving.service\n"
            "import json; print(json.dumps([m.__file__ for m in (core, backends, serving.service)]))")
    env = {k: v for k, v in _env(stored["home"], RESDEPLOY_ARTIFACTS=str(stored["out"])).items() if k != "PYTHONPATH"}
    blocked = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True,
                             timeout=300)
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    assert all(f.startswith(str(src)) for f in json.loads(blocked.stdout.strip().splitlines()[-1])), blocked.stdout
    print(f"bentoml build: {seconds:.1f} s; export --bento-model: {stored['seconds']:.1f} s")


@contextlib.contextmanager
def _serve_bento(bento: str, home: Path, workdir: Path, **extra: str):
    """``bentoml serve BENTO`` (the built Bento, not the checkout's service) until /readyz is 200;
    yields ``(url, log_path)``. No RESDEPLOY_ARTIFACTS: the service takes the model-store model. No PYTHONPATH
    and a scratch cwd, so the code that runs is the Bento's own copy."""
    port = bentoserver.free_port()
    env = {k: v for k, v in _env(home, **extra).items() if k != "PYTHONPATH"}
    log_path = workdir / "bento-serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5, trust_env=False) as client:
            deadline = time.monotonic() + bentoserver.READY_TIMEOUT_S  # a hang guard, not a speed target
            while True:
                assert proc.poll() is None, f"bentoml serve exited {proc.returncode}:\n{bentoserver.log_tail(log_path)}"
                assert time.monotonic() < deadline, f"not ready:\n{bentoserver.log_tail(log_path)}"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        yield url, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived the arbiter
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_the_built_bento_serves_the_stored_model(stored: dict, built: dict, tmp_path: Path):
    from PIL import Image

    from training.data import load_dataset

    test = load_dataset("digits").test
    images, labels = test.images[:12], test.labels[:12]
    manifest = json.loads((Path(stored["out"]) / "manifest.json").read_text())
    fp32 = next(a for a in manifest["artifacts"] if a["precision"] == "fp32" and a["kind"] == "onnx")
    # RESDEPLOY_BENTO_MODEL, set at serve time, overrides the model the Bento recorded (here it names
    # the same one); tests/test_bento_model.py serves a Bento without it.
    with _serve_bento(built["tag"], stored["home"], tmp_path, RESDEPLOY_BENTO_MODEL=stored["tag"]) as (url, _), \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        info = client.get("/model")
        assert info.status_code == 200, info.text
        answers = []
        for arr in images:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            r = client.post("/classify", files={"image": ("digit.png", buf.getvalue(), "image/png")})
            assert r.status_code == 200, r.text
            answers.append(r.json())
    info = info.json()
    # The stored model is the export's directory: the file the service verified and loaded is the
    # manifest's fp32 ONNX entry, byte for byte.
    assert (info["file"], info["backend"], info["precision"]) == ("model.fp32.onnx", "onnxruntime", "fp32"), \
        {k: info[k] for k in ("file", "backend", "precision")}
    assert info["sha256"] == fp32["sha256"] == sha256_file(Path(stored["out"]) / "model.fp32.onnx")
    got = [a["top1"]["index"] for a in answers]
    # The 8-epoch digits net is ~98% top-1, but which digits it misses depends on the CPU that trained
    # it: the floor holds for any network the suite accepts (tests/bounds.py: 7 of 12), and a wrong
    # model or label map (~10%) stays below it.
    assert sum(int(g == t) for g, t in zip(got, labels)) >= min_correct(len(labels)), (got, labels.tolist())
    assert all(a["model"]["sha256"] == fp32["sha256"] for a in answers)
