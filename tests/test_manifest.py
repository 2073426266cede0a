"""The typed manifest and the flavour table: the contract every stage reads.

``tests/data/manifest-0.1.0.json`` is a manifest written by resdeploy 0.1.0 (the digits ResNet-20
after 3 epochs, exported on an AMD EPYC Zen 3); it must keep loading, and round-trip unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import flavours
from core.errors import ArtifactError, ConfigError
from core.flavours import FLAVOURS, INT8, INT8_CPU, ONNXRUNTIME, TENSORRT, for_runtime
from core.manifest import Manifest, read_manifest, verify_file
from export import gate

DATA = Path(__file__).parent / "data"
OLD = DATA / "manifest-0.1.0.json"


def _old() -> dict:
    return json.loads(OLD.read_text())


def test_a_0_1_0_manifest_loads_typed():
    m = Manifest.from_dict(_old())
    assert (m.arch, m.num_classes, m.crop, m.eval_dataset) == ("resnet20", 10, 32, "digits")
    assert [(a.kind, a.precision) for a in m.artifacts] == [
        ("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"), ("onnx", "int8-cpu"), ("pytorch", "fp32")]
    assert m.find("int8").top1 == 86.9444 and m.find("fp32", "pytorch").file == "model.pt"
    assert m.labels.file == "labels.json" and m.calibration.extra["images"] == 128
    assert m.find("int8-cpu").quantization["overflow_fix"] == "first-layer"
    assert m.preprocess_config.crop == 32 and not m.has("fp16", "engine")


def test_round_trip_is_exact_to_the_byte():
    text = OLD.read_text()
    again = json.dumps(Manifest.from_dict(json.loads(text)).to_dict(), indent=2) + "\n"
    assert again == text


def test_unknown_keys_survive_and_old_onnx_entries_without_kind_load():
    raw = _old()
    raw["future_key"] = {"a": 1}
    raw["artifacts"][0]["future_field"] = 7
    del raw["artifacts"][1]["kind"]  # the first manifests wrote none for ONNX files
    m = Manifest.from_dict(raw)
    assert m.extra == {"future_key": {"a": 1}} and m.artifacts[0].extra == {"future_field": 7}
    assert m.artifacts[1].kind == "onnx"
    out = m.to_dict()
    assert out["future_key"] == {"a": 1} and out["artifacts"][0]["future_field"] == 7


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(schema_version=2), "schema_version 2"),
    (lambda d: d.pop("schema_version"), "schema_version None"),
    (lambda d: d.pop("preprocess"), "lacks 'preprocess'"),
    (lambda d: d["artifacts"][0].pop("sha256"), "lacks sha256"),
])
def test_bad_manifests_are_refused_with_the_fix(change, match):
    raw = _old()
    change(raw)
    with pytest.raises(ArtifactError, match=match) as e:
        Manifest.from_dict(raw)
    assert "re-export" in str(e.value)


def test_find_names_what_the_directory_has():
    with pytest.raises(ArtifactError, match=r"no engine artifact of precision 'fp16'.*have: fp32 \(onnx\)"):
        Manifest.from_dict(_old()).find("fp16", "engine")


def test_read_manifest_and_verify_file_refuse_bad_directories(tmp_path: Path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        read_manifest(tmp_path)
    m = Manifest.from_dict(_old())
    entry = m.find("fp32")
    with pytest.raises(ArtifactError, match="missing"):
        verify_file(tmp_path, entry)
    entry.file = "../outside.onnx"
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        verify_file(tmp_path, entry)


def test_flavour_table_rows():
    assert flavours.PRECISIONS == ("fp32", "fp16", "int8", "int8-cpu")
    assert flavours.INT8_FLAVOURS == ("int8", "int8-cpu") and flavours.NUMBER_FORMATS == ("fp32", "fp16", "int8")
    assert flavours.ENGINE_PRECISIONS == ("fp32", "fp16", "int8")  # TensorRT never takes the u8s8 form
    assert INT8.runtimes == (TENSORRT,) and INT8_CPU.runtimes == (ONNXRUNTIME,)
    assert [FLAVOURS[p].onnx_file for p in ("fp32", "int8-cpu")] == ["model.fp32.onnx", "model.int8-cpu.onnx"]
    assert INT8.engine_file == "model.int8.plan"
    with pytest.raises(ConfigError, match="choose one of fp32, fp16, int8, int8-cpu"):
        flavours.flavour("int4")


def test_gate_budgets_come_from_the_table_with_the_documented_numbers():
    # The numbers README.md and docs/design.md promise, written out by hand.
    assert gate.BUDGETS == {
        "fp32": {"min_agreement": 99.9, "max_logit_diff": 1e-3},
        "fp16": {"min_agreement": 99.0, "min_top1_ratio": 0.995},
        "int8": {"min_agreement": 98.0, "min_top1_ratio": 0.99},
        "int8-cpu": {"min_agreement": 98.0, "min_top1_ratio": 0.99},
    }


@pytest.mark.parametrize("number_format, runtime, cpu_only, expected", [
    ("int8", ONNXRUNTIME, True, "int8-cpu"),  # ORT's x86 kernels fuse only the u8s8 form
    ("int8", ONNXRUNTIME, False, "int8"),  # ORT with CUDA runs TensorRT's form
    ("int8", TENSORRT, False, "int8"),
    ("fp16", ONNXRUNTIME, True, "fp16"),
    ("fp32", TENSORRT, False, "fp32"),
])
def test_for_runtime_picks_the_file_a_runtime_loads(number_format, runtime, cpu_only, expected):
    assert for_runtime(number_format, runtime, cpu_only).name == expected


def test_for_runtime_refuses_a_flavour_name_as_a_number_format():
    with pytest.raises(ConfigError, match="choose one of fp32, fp16, int8"):
        for_runtime("int8-cpu", ONNXRUNTIME, True)
