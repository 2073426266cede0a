"""``resdeploy triton``: the model repository checked against Triton's own schema (tritonclient's
``model_config_pb2``) and against the ONNX files as ONNX Runtime reads them, not as the writer does.

The digits artifact directory (``digits_artifacts``) has no engines; an engine entry is added to a
copy (a stand-in file: only its bytes and manifest entry matter to the writer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli

pytest.importorskip("tritonclient")
from tritonschema import enum, parse_json, parse_pbtxt  # noqa: E402

from core.errors import ArtifactError  # noqa: E402
from core.manifest import Manifest  # noqa: E402
from export.pbtxt import to_pbtxt  # noqa: E402
from export.triton import TritonOptions, write_repository  # noqa: E402
from resdeploy.export_cli import _triton_options  # noqa: E402

# model -> (ONNX file or engine, platform, instance kind): written by hand, not by the writer.
EXPECTED = {
    "resnet20_digits": ("model.fp32.onnx", "onnxruntime_onnx", "KIND_AUTO"),
    "resnet20_digits_fp16": ("model.fp16.onnx", "onnxruntime_onnx", "KIND_AUTO"),
    "resnet20_digits_int8-cpu": ("model.int8-cpu.onnx", "onnxruntime_onnx", "KIND_CPU"),
}
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(uint8)": "TYPE_UINT8"}
PLAN = b"stand-in TensorRT engine\n" * 40


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_refusal(r, *words: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert err.startswith("resdeploy triton: error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def copy_artifacts(src: Path, dst: Path, edit=None) -> Path:
    """A copy of the artifact directory, its manifest changed by ``edit(raw_dict)`` and kept valid."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    if edit:
        edit(raw)
    (dst / "manifest.json").write_text(json.dumps(Manifest.from_dict(raw).to_dict(), indent=2) + "\n")
    return dst


def with_engine(src: Path, dst: Path, max_batch: int = 40) -> Path:
    """A copy with an fp16 engine entry (the build stamp as export/tensorrt.py writes it)."""
    art = copy_artifacts(src, dst, lambda raw: raw["artifacts"].append({
        "kind": "engine", "precision": "fp16", "file": "model.fp16.plan", "sha256": hashlib.sha256(PLAN).hexdigest(),
        "bytes": len(PLAN), "backends": ["tensorrt"], "onnx": "model.fp16.onnx", "tensorrt_version": "10.9.0",
        "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "max_batch": max_batch, "opt_batch": 10,
        "input_size": 32, "tf32": False, "build_seconds": 1.0}))
    (art / "model.fp16.plan").write_bytes(PLAN)
    return art


@pytest.fixture(scope="module")
def repo(digits_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    r = run_cli("triton", str(digits_artifacts), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_models_are_the_onnx_runtime_flavours_only(repo):
    out, r = repo
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED)
    for name in EXPECTED:
        assert sorted(str(p.relative_to(out / name)) for p in (out / name).rglob("*")) == [
            "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    assert "skipped model.int8.onnx: made for TensorRT" in r.stderr and "skipped model.pt: PyTorch" in r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == list(EXPECTED) and lines[-1].startswith(f"wrote {out}")


def test_configs_parse_with_tritons_schema_and_match_onnx_runtime(repo, digits_artifacts):
    out, _ = repo
    manifest = json.loads((digits_artifacts / "manifest.json").read_text())
    shas = {a["file"]: a["sha256"] for a in manifest["artifacts"]}
    labels = json.loads((digits_artifacts / "labels.json").read_text())
    for name, (file, platform, kind) in EXPECTED.items():
        cfg = parse_pbtxt((out / name / "config.pbtxt").read_text())
        sess = ort.InferenceSession(str(digits_artifacts / file), providers=["CPUExecutionProvider"])
        (i,), (o,) = sess.get_inputs(), sess.get_outputs()
        assert isinstance(i.shape[0], str) and isinstance(o.shape[0], str)  # the dynamic batch axis
        assert (cfg.name, cfg.platform, cfg.max_batch_size) == (name, platform, 40)
        assert [(x.name, x.data_type, list(x.dims)) for x in cfg.input] == [
            (i.name, enum(ORT_TYPES[i.type]), i.shape[1:])] == [("input", enum("TYPE_FP32"), [3, 32, 32])]
        assert cfg.input[0].format == enum("FORMAT_NCHW")
        assert [(x.name, x.data_type, list(x.dims), x.label_filename) for x in cfg.output] == [
            (o.name, enum(ORT_TYPES[o.type]), o.shape[1:], "labels.txt")] == [
            ("logits", enum("TYPE_FP32"), [10], "labels.txt")]
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, enum(kind))]
        sizes = list(cfg.dynamic_batching.preferred_batch_size)
        assert sizes == [10, 20, 40] and all(s % 10 == 0 and s <= cfg.max_batch_size for s in sizes)
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
        assert [(w.batch_size, sorted(w.inputs)) for w in cfg.model_warmup] == [(1, ["input"]), (10, ["input"])]
        assert all(list(w.inputs["input"].dims) == [3, 32, 32] and w.inputs["input"].zero_data
                   for w in cfg.model_warmup)
        assert (out / name / "labels.txt").read_text().splitlines() == labels
        assert sha(out / name / "1" / "model.onnx") == shas[file]


def test_config_dict_and_pbtxt_are_the_same_message(digits_artifacts, tmp_path):
    _, models = write_repository(TritonOptions(digits_artifacts, tmp_path / "repo", name="m", max_batch=100,
                                               instances=2, device="gpu", max_queue_delay_us=0))
    assert [m.name for m in models] == ["m", "m_fp16", "m_int8-cpu"]
    for m in models:
        cfg = parse_pbtxt(m.pbtxt)
        assert parse_json(m.config) == cfg
        assert list(cfg.dynamic_batching.preferred_batch_size) == [10, 20, 40, 80, 100]
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, enum("KIND_GPU"))]


def test_strings_and_maps_are_written_for_the_parser():
    name = 'a "quoted" \\ back\tslash\nnewline é'
    cfg = parse_pbtxt(to_pbtxt({"name": name, "platform": "onnxruntime_onnx",
                                "parameters": {'k"ey': {"string_value": name}}}, comments=["two\nlines"]))
    assert cfg.name == name and cfg.parameters['k"ey'].string_value == name


def test_the_repository_models_run_a_batch_of_ten(repo):
    out, _ = repo
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    for name in EXPECTED:
        cfg = parse_pbtxt((out / name / "config.pbtxt").read_text())
        sess = ort.InferenceSession(str(out / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        batch = x.reshape(10, *cfg.input[0].dims)
        (y,) = sess.run([cfg.output[0].name], {cfg.input[0].name: batch})
        assert y.shape == (10, *cfg.output[0].dims) and np.isfinite(y).all()


def test_an_engine_entry_becomes_a_tensorrt_plan_model(digits_artifacts, tmp_path):
    art = with_engine(digits_artifacts, tmp_path / "art")
    out = tmp_path / "repo"
    r = run_cli("triton", str(art), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPECTED, "resnet20_digits_fp16_plan"])
    model = out / "resnet20_digits_fp16_plan"
    assert sorted(str(p.relative_to(model)) for p in model.rglob("*")) == [
        "1", "1/model.plan", "config.pbtxt", "labels.txt"]
    assert (model / "1" / "model.plan").read_bytes() == PLAN
    cfg = parse_pbtxt((model / "config.pbtxt").read_text())
    sess = ort.InferenceSession(str(art / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    (i,), (o,) = sess.get_inputs(), sess.get_outputs()
    assert (cfg.platform, cfg.max_batch_size) == ("tensorrt_plan", 40)
    assert [(x.name, x.data_type, list(x.dims)) for x in cfg.input] == [(i.name, enum("TYPE_FP32"), i.shape[1:])]
    assert [(x.name, list(x.dims), x.label_filename) for x in cfg.output] == [(o.name, o.shape[1:], "labels.txt")]
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, enum("KIND_GPU"))]


def test_an_engine_built_for_a_smaller_batch_is_refused(digits_artifacts, tmp_path):
    art = with_engine(digits_artifacts, tmp_path / "art", max_batch=20)
    r = run_cli("triton", str(art), "--out", str(tmp_path / "repo"), "--max-batch", "40")
    one_line_refusal(r, "model.fp16.plan", "20")
    assert not (tmp_path / "repo").exists()
    assert run_cli("triton", str(art), "--out", str(tmp_path / "repo"), "--max-batch", "20").returncode == 0


def test_a_tampered_onnx_is_refused_and_nothing_is_left(digits_artifacts, tmp_path):
    art = copy_artifacts(digits_artifacts, tmp_path / "art")
    data = bytearray((art / "model.fp16.onnx").read_bytes())  # fp32 is copied first: a half-built repo exists
    data[len(data) // 2] ^= 0xFF
    (art / "model.fp16.onnx").write_bytes(bytes(data))
    where = tmp_path / "out"
    where.mkdir()
    r = run_cli("triton", str(art), "--out", str(where / "repo"))
    one_line_refusal(r, "model.fp16.onnx", "sha256")
    assert list(where.iterdir()) == []  # no repository, no hidden temporary sibling


def test_an_existing_out_needs_overwrite(digits_artifacts, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_refusal(run_cli("triton", str(digits_artifacts), "--out", str(out)), str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_cli("triton", str(digits_artifacts), "--out", str(out), "--overwrite").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("args, words", [
    (["--name", "bad name/x"], ["--name", "bad name/x"]),
    (["--max-batch", "25"], ["--max-batch 25", "multiple of 10"]),
    (["--precisions", "int8"], ["nothing to write"]),
    (["--precisions", "int9"], ["int9"]),
])
def test_bad_options_are_refused_in_one_line(args, words, digits_artifacts, tmp_path):
    r = run_cli("triton", str(digits_artifacts), "--out", str(tmp_path / "repo"), *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and all(w in r.stderr for w in words), r.stderr
    assert not (tmp_path / "repo").exists()


def test_missing_or_non_artifact_directories_are_refused(digits_artifacts, tmp_path):
    one_line_refusal(run_cli("triton", str(tmp_path / "nope"), "--out", str(tmp_path / "r")), "nope", "does not exist")
    one_line_refusal(run_cli("triton", str(tmp_path), "--out", str(tmp_path / "r")), "not an artifact directory")
    art = copy_artifacts(digits_artifacts, tmp_path / "holder" / "art")
    one_line_refusal(run_cli("triton", str(art), "--out", str(art.parent), "--overwrite"),
                     "would replace the artifact directory")
    assert (art / "manifest.json").is_file()


def test_external_weights_are_refused(digits_artifacts, tmp_path):
    """The manifest hashes the .onnx file only, so weights in a sidecar could not be verified."""
    src = digits_artifacts / "model.fp32.onnx"
    art = copy_artifacts(digits_artifacts, tmp_path / "art")
    onnx.save_model(onnx.load(str(src)), str(art / "model.fp32.onnx"), save_as_external_data=True,
                    location="model.fp32.onnx.data")

    def listed(raw):  # a manifest that hashes the rewritten .onnx: only the sidecar is unverifiable
        entry = next(a for a in raw["artifacts"] if a["file"] == "model.fp32.onnx")
        entry.update(sha256=sha(art / "model.fp32.onnx"), bytes=(art / "model.fp32.onnx").stat().st_size)

    art = copy_artifacts(art, tmp_path / "art2", listed)
    with pytest.raises(ArtifactError, match="model.fp32.onnx keeps weights in external data files"):
        write_repository(TritonOptions(art, tmp_path / "repo", precisions=("fp32",)))
    assert not (tmp_path / "repo").exists()
    assert not list(tmp_path.glob(".repo.tmp-*"))


def test_export_writes_the_repository_too(digits_run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    base = ["export", str(digits_run / "best.pt"), "--arch", "resnet20", "--out", str(tmp_path / "art"),
            "--precisions", "fp32,int8-cpu", "--calib-data", "digits", "--eval-images", "200", "--no-progress"]
    r = run_cli(*base, "--triton-repo", str(busy))  # refused before any work
    assert r.returncode == 2 and "not a model repository" in r.stderr and not (tmp_path / "art").exists(), r.stderr
    assert r.stderr.strip().startswith("resdeploy export: error: --triton-repo") and r.stderr.count("\n") == 1
    r = run_cli(*base, "--triton-repo", str(tmp_path / "repo"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["resnet20_digits", "resnet20_digits_int8-cpu"]
    shas = {a["file"]: a["sha256"] for a in json.loads((tmp_path / "art" / "manifest.json").read_text())["artifacts"]}
    assert sha(tmp_path / "repo" / "resnet20_digits_int8-cpu" / "1" / "model.onnx") == shas["model.int8-cpu.onnx"]
    assert parse_pbtxt((tmp_path / "repo" / "resnet20_digits" / "config.pbtxt").read_text()).max_batch_size == 40
    again = _triton_options(argparse.Namespace(out=str(tmp_path / "art"), triton_repo=str(tmp_path / "repo"),
                                               trt=False, max_batch=40))
    assert again.overwrite  # a model repository is replaced by the next export, anything else refused
