"""A Bento serves the model it was built with (issue #22, serving/bento_model.py).

``bentoml build`` with ``RESDEPLOY_BENTO_MODEL=NAME`` records NAME's exact version in the Bento's
``bento.yaml``; ``bentoml serve <bento>`` and the container serve it with no variable set, the
variable still overrides, and a Bento that names no model or several refuses to start in one line.

Everything BentoML touches lives in a temporary ``BENTOML_HOME``; every server runs in its own
process group, bounded in time, and is killed whatever happens.
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
import tarfile
import time
from pathlib import Path

import bentoserver
import httpx
import pytest
import yaml
from conftest import ROOT
from test_torch_backend_and_bento import BIN, _env, _run

from core.errors import ConfigError
from serving import bento_model
from serving.bento_model import DEFAULT, bento_model_tag, running_bento

MODEL = "my-digits"  # not the default name: a Bento that forgot it would look for resdeploy-digits
OTHER = "other-digits"
# The two stored copies differ only in the manifest's `created`, which GET /model reports: it says
# which of them a server loaded (their files, and so their sha256, are the same).
CREATED = {MODEL: "2001-01-01T00:00:00+00:00", OTHER: "2002-02-02T00:00:00+00:00"}

_STORE = r"""
import json, sys
from export.bento import save_bento_model
print(json.dumps({name: save_bento_model(path, name) for name, path in json.loads(sys.argv[1]).items()}))
"""


# --- the resolution rules, without a server ------------------------------------------------------------

def _fake_bento(root: Path, service_models: list[str], packed: list[str] = ()) -> Path:
    """A Bento directory as ``bentoml build`` lays it out: ``bento.yaml`` beside ``src/``."""
    (root / "src" / "serving").mkdir(parents=True)
    info = {"service": "serving.service:Classifier", "name": "resdeploy", "version": "v1",
            "models": [{"tag": t} for t in packed], "entry_service": "resdeploy",
            "services": [{"name": "resdeploy", "service": "", "models": [{"tag": t, "module": ""}
                                                                          for t in service_models]}]}
    (root / "bento.yaml").write_text(yaml.safe_dump(info))
    return root


def test_outside_a_bento_the_variable_else_the_demo_model():
    assert running_bento() is None  # the checkout's serving/ is not in a Bento
    assert bento_model_tag({}) == DEFAULT == "resdeploy-digits:latest"
    assert bento_model_tag({"RESDEPLOY_BENTO_MODEL": "mine:v2"}) == "mine:v2"
    assert bento_model_tag({"RESDEPLOY_BENTO_MODEL": " "}, bento=None) == DEFAULT  # empty counts as unset


def test_the_bento_is_found_from_the_module_path(tmp_path: Path):
    bento = _fake_bento(tmp_path / "b", ["x:1"])
    assert running_bento(str(bento / "src" / "serving" / "bento_model.py")) == bento
    assert running_bento(str(bento / "src" / "serving" / ".." / "serving" / "bento_model.py")) == bento
    (tmp_path / "c" / "proj" / "serving").mkdir(parents=True)  # a checkout with bento.yaml above it
    (tmp_path / "c" / "bento.yaml").write_text("name: x\n")
    assert running_bento(str(tmp_path / "c" / "proj" / "serving" / "bento_model.py")) is None
    (bento / "bento.yaml").unlink()
    assert running_bento(str(bento / "src" / "serving" / "bento_model.py")) is None


def test_the_variable_overrides_the_bentos_model(tmp_path: Path):
    bento = _fake_bento(tmp_path, [f"{MODEL}:abc"])
    # Chosen without reading the Bento or the model store (neither exists for it here).
    assert bento_model_tag({"RESDEPLOY_BENTO_MODEL": OTHER}, bento=bento) == OTHER


def test_the_bento_records_its_services_model_else_the_packed_ones(tmp_path: Path, monkeypatch):
    checked = []
    monkeypatch.setattr(bento_model, "_check_stored", lambda tag, bento_tag: checked.append((tag, bento_tag)))
    own = _fake_bento(tmp_path / "own", [f"{MODEL}:abc"], packed=["tokenizer:1"])
    assert bento_model_tag({}, bento=own) == f"{MODEL}:abc"  # the service's own reference wins
    packed = _fake_bento(tmp_path / "packed", [], packed=[f"{MODEL}:abc"])  # bentofile `models:` only
    assert bento_model_tag({}, bento=packed) == f"{MODEL}:abc"
    assert checked == [(f"{MODEL}:abc", "resdeploy:v1")] * 2


@pytest.mark.parametrize("service_models, packed, match", [
    ([], [], r"the Bento resdeploy:v1 packs no model .*rebuild it with `RESDEPLOY_BENTO_MODEL=NAME bentoml build`"),
    ([], ["a:1", "b:2"], r"packs several models \(a:1, b:2\) and none is chosen: set RESDEPLOY_BENTO_MODEL"),
])
def test_no_model_or_several_is_one_line_naming_the_fix(tmp_path: Path, service_models, packed, match):
    bento = _fake_bento(tmp_path, service_models, packed)
    with pytest.raises(ConfigError, match=match) as e:
        bento_model_tag({}, bento=bento)
    assert "\n" not in str(e.value)
    (bento / "bento.yaml").write_text("services: [")  # unreadable
    with pytest.raises(ConfigError, match=r"cannot read the Bento's .*bento.yaml .*set RESDEPLOY_BENTO_MODEL") as e:
        bento_model_tag({}, bento=bento)
    assert "\n" not in str(e.value)


def test_a_model_the_store_does_not_hold_is_one_line(tmp_path: Path):
    bento = _fake_bento(tmp_path / "b", ["ghost:abc"])
    code = ("import sys\nfrom serving.bento_model import bento_model_tag\nfrom core.errors import ConfigError\n"
            "try:\n    bento_model_tag({}, bento=sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n")
    r = _run([sys.executable, "-c", code, str(bento)], tmp_path / "empty-home", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [
        "the Bento resdeploy:v1 was built with model ghost:abc, which neither the Bento's models/ nor the BentoML "
        "model store holds: import it (`bentoml models import`) or rebuild, or set "
        "RESDEPLOY_BENTO_MODEL=NAME[:VERSION] (a stored model) or RESDEPLOY_ARTIFACTS=DIR to serve it"], r.stdout


# --- real Bentos, real servers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bentos(digits_artifacts: Path, tmp_path_factory) -> dict:
    """Two copies of the digits artifacts stored as MODEL and OTHER, a Bento built with
    ``RESDEPLOY_BENTO_MODEL=MODEL`` and one built with ``RESDEPLOY_ARTIFACTS`` (it packs no model)."""
    base = tmp_path_factory.mktemp("bento-model")
    home = base / "home"
    copies = {}
    for name in (MODEL, OTHER):
        copies[name] = base / name
        shutil.copytree(digits_artifacts, copies[name])
        manifest = json.loads((copies[name] / "manifest.json").read_text())
        (copies[name] / "manifest.json").write_text(json.dumps(manifest | {"created": CREATED[name]}, indent=2))
    r = _run([sys.executable, "-c", _STORE, json.dumps({k: str(v) for k, v in copies.items()})], home)
    assert r.returncode == 0, r.stderr[-3000:]
    tags = json.loads(r.stdout.strip().splitlines()[-1])

    def build(**extra: str) -> str:
        r = _run([str(BIN / "bentoml"), "build", "-o", "tag"], home, timeout=600, **extra)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return next(s for s in r.stdout.splitlines() if s.startswith("__tag__:")).removeprefix("__tag__:")

    return {"home": home, "tags": tags, "copies": copies, "bento": build(RESDEPLOY_BENTO_MODEL=MODEL),
            "no_model": build(RESDEPLOY_ARTIFACTS=str(copies[OTHER]))}


def _start(target: str, home: Path, workdir: Path, name: str, **extra: str) -> tuple[subprocess.Popen, str, Path]:
    """``bentoml serve TARGET`` with every RESDEPLOY_* stripped (plus ``extra``), no PYTHONPATH and a
    scratch cwd, so that the code that runs is the Bento's own copy; its own process group."""
    port = bentoserver.free_port()
    env = {k: v for k, v in _env(home, **extra).items() if k != "PYTHONPATH"}
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # workers that outlived the arbiter
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, deadline: float) -> None:
    with httpx.Client(base_url=url, timeout=5, trust_env=False) as client:
        while True:
            assert proc.poll() is None, f"bentoml serve exited {proc.returncode}:\n{bentoserver.log_tail(log_path)}"
            assert time.monotonic() < deadline, f"not ready:\n{bentoserver.log_tail(log_path)}"
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.2)


def _coffee_png() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, "PNG")
    return buf.getvalue()


def _exported_dir(bento: str, home: Path, dest: Path) -> Path:
    """``bentoml export`` unpacked: the Bento with its models/, as ``bentoml containerize`` copies it
    to ``$BENTO_PATH`` in the image."""
    archive = dest.with_suffix(".bento")
    r = _run([str(BIN / "bentoml"), "export", bento, str(archive)], home, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    assert (dest / "bento.yaml").is_file() and (dest / "models" / MODEL).is_dir(), sorted(os.listdir(dest))
    return dest


def test_a_bento_serves_its_own_model_without_the_variable(bentos: dict, tmp_path: Path):
    """Three servers of the one Bento, started together: by tag with no RESDEPLOY_* at all; by tag
    with RESDEPLOY_BENTO_MODEL=OTHER (the override); and the exported Bento directory from an empty
    BENTOML_HOME, no variable (the container's case: the models come from the Bento's models/)."""
    home, tags = bentos["home"], bentos["tags"]
    info = yaml.safe_load((home / "bentos" / bentos["bento"].replace(":", "/") / "bento.yaml").read_text())
    assert [m["tag"] for s in info["services"] for m in s["models"]] == [tags[MODEL]]  # recorded, version too
    exported = _exported_dir(bentos["bento"], home, tmp_path / "exported")
    empty_home = tmp_path / "empty-home"
    manifest = json.loads((bentos["copies"][MODEL] / "manifest.json").read_text())
    fp32 = next(a for a in manifest["artifacts"] if a["precision"] == "fp32" and a["kind"] == "onnx")
    image = _coffee_png()
    servers = {}
    try:
        servers["no variable"] = _start(bentos["bento"], home, tmp_path, "plain")
        servers["override"] = _start(bentos["bento"], home, tmp_path, "override", RESDEPLOY_BENTO_MODEL=OTHER)
        servers["container"] = _start(str(exported), empty_home, tmp_path, "container")
        deadline = time.monotonic() + bentoserver.READY_TIMEOUT_S  # a hang guard, not a speed target
        answers = {}
        for case, (proc, url, log_path) in servers.items():
            _wait_ready(proc, url, log_path, deadline)
            with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
                model = client.get("/model")
                assert model.status_code == 200, (case, model.text)
                r = client.post("/classify", files={"image": ("coffee.png", image, "image/png")})
                assert r.status_code == 200, (case, r.text)
                answers[case] = (model.json(), r.json())
    finally:
        for proc, _, _ in servers.values():
            _stop(proc)
    for case, (model, result) in answers.items():
        assert model["sha256"] == fp32["sha256"] and result["model"]["sha256"] == fp32["sha256"], case
        assert (model["file"], model["backend"]) == ("model.fp32.onnx", "onnxruntime"), case
        assert result["top1"]["label"] and len(result["top_k"]) == 5, (case, result)
    assert {case: model["created"] for case, (model, _) in answers.items()} == {
        "no variable": CREATED[MODEL], "override": CREATED[OTHER], "container": CREATED[MODEL]}
    assert not list((empty_home / "models").rglob("model.yaml"))  # the container case used the Bento's models/


def test_a_bento_that_packs_no_model_refuses_to_start_in_one_line(bentos: dict, tmp_path: Path):
    """Built with RESDEPLOY_ARTIFACTS (so it packs no model), served with neither variable: the
    server exits at import with one line naming the fix, instead of restarting a worker forever."""
    proc, _, log_path = _start(bentos["no_model"], bentos["home"], tmp_path, "no-model")
    try:
        proc.wait(timeout=120)  # a hang guard only: it fails at import, before listening
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running:\n{bentoserver.log_tail(log_path)}")
    finally:
        _stop(proc)
    out = log_path.read_text(errors="replace")
    lines = [s for s in out.splitlines() if s.strip()]
    assert proc.returncode != 0 and lines, out[-3000:]
    assert lines[-1] == (f"resdeploy: the Bento {bentos['no_model']} packs no model (was it built with "
                         "RESDEPLOY_ARTIFACTS set?): rebuild it with `RESDEPLOY_BENTO_MODEL=NAME bentoml build` and "
                         "no RESDEPLOY_ARTIFACTS, or set RESDEPLOY_BENTO_MODEL=NAME[:VERSION] (a stored model) or "
                         "RESDEPLOY_ARTIFACTS=DIR to serve it"), out[-3000:]
    assert "Traceback" not in out and "Uvicorn running" not in out, out[-3000:]
