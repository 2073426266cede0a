"""Export: BN folding, ONNX parity, FP16/INT8 artifacts, the accuracy gate, atomic artifact dirs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import DIGITS_PRECISIONS, ROOT

from backends.onnxruntime import OnnxRuntimeBackend
from core.errors import ArtifactError
from core.manifest import read_manifest, sha256_file, verify_file
from export.fold import count_batchnorm, fold_batchnorm
from export.onnx_export import batch_dim, export_fp32, op_counts
from export.quantize import inspect_int8
from resdeploy.cli import main
from training.checkpoint import restore_model
from training.resnet import build_model

PRECISIONS = DIGITS_PRECISIONS  # the digits_artifacts fixture (conftest.py) exports these


def _parity(model, onnx_path: Path, size: int) -> float:
    """The largest |ONNX - PyTorch| logit difference relative to the largest |PyTorch| logit: float32
    rounding grows with the logits' scale, which differs by orders of magnitude between models."""
    worst = 0.0
    with OnnxRuntimeBackend(onnx_path, providers=["CPUExecutionProvider"]) as b:
        for n in (1, 7):
            x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                ref = model(x).numpy()
            worst = max(worst, float(np.abs(b.infer(x.numpy()) - ref).max() / np.abs(ref).max()))
    return worst


def test_digits_fp32_has_no_batchnorm_and_matches_pytorch(digits_run: Path, digits_artifacts: Path):
    proto = onnx.load(str(digits_artifacts / "model.fp32.onnx"))
    assert op_counts(proto).get("BatchNormalization", 0) == 0
    assert isinstance(batch_dim(proto), str)  # symbolic
    onnx.checker.check_model(proto, full_check=True)
    model = restore_model(digits_run / "best.pt").model
    assert _parity(model, digits_artifacts / "model.fp32.onnx", 32) <= 1e-5  # measured 2e-7


def test_random_init_resnet50_folds_and_matches_pytorch(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("resnet50")
    # Realistic BN statistics (a fresh net's are mean 0 / var 1, which leaves activations unnormalised).
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 224, 224))
    model.eval()
    folded = fold_batchnorm(model)
    assert count_batchnorm(model) == 53 and count_batchnorm(folded) == 0
    path = export_fp32(folded, tmp_path / "r50.onnx", 224)
    assert op_counts(onnx.load(str(path))).get("BatchNormalization", 0) == 0
    assert not list(tmp_path.glob("*.data"))  # self-contained: no external-data sidecar
    assert _parity(model, path, 224) <= 1e-4  # measured 3e-5 (50 layers: more rounding than ResNet-20)


def test_every_precision_loads_in_ort_cpu_and_is_within_budget(digits_artifacts: Path):
    m = read_manifest(digits_artifacts)
    assert [a.precision for a in m.entries("onnx")] == PRECISIONS
    assert [a.kind for a in m.artifacts] == ["onnx"] * len(PRECISIONS) + ["pytorch"]  # reference last
    raw = json.loads((digits_artifacts / "manifest.json").read_text())
    for a in raw["artifacts"]:
        assert {"precision", "file", "sha256", "top1", "top5", "top1_agreement", "max_logit_diff"} <= a.keys()
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    for a in m.artifacts:
        assert a.within_budget, a
        if a.kind != "onnx":  # model.pt: tests/test_torch_backend_and_bento.py
            continue
        with OnnxRuntimeBackend(verify_file(digits_artifacts, a), a.precision,
                                providers=["CPUExecutionProvider"]) as b:
            assert b.infer(x).shape == (3, 10)
    fp32 = m.find("fp32")
    assert fp32.top1_agreement >= 99.9 and fp32.max_logit_diff <= 1e-3
    ref = m.eval["pytorch_fp32"]["top1"]
    assert m.find("fp16").top1 >= 0.995 * ref
    assert m.find("int8").top1 >= 0.99 * ref and m.find("int8-cpu").top1 >= 0.99 * ref


def _independent_preprocess(images: np.ndarray, pre: dict) -> np.ndarray:
    """NHWC uint8 -> NCHW float32 from the recorded numbers alone, written here without core.preprocess:
    shorter side to ``resize`` (PIL bilinear, torchvision's rounding), centre ``crop``, /255, -mean, /std."""
    from PIL import Image

    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
    out = []
    for im in images:
        img = Image.fromarray(im)
        w, h = img.size
        if min(w, h) != pre["resize"]:
            s = pre["resize"]
            img = img.resize((s, int(s * h / w)) if w <= h else (int(s * w / h), s), Image.BILINEAR)
        a = np.asarray(img, np.float32)
        top, left = int(round((a.shape[0] - pre["crop"]) / 2)), int(round((a.shape[1] - pre["crop"]) / 2))
        a = a[top:top + pre["crop"], left:left + pre["crop"]] / 255.0
        out.append(((a - mean) / std).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def test_artifacts_classify_the_true_labels_with_the_checkpoints_preprocessing(digits_run: Path,
                                                                                 digits_artifacts: Path):
    """Not the gate's own numbers read back: each ONNX file run directly in ONNX Runtime on the digits
    test images, preprocessed here from the checkpoint's recorded numbers, against the true labels."""
    from training.data import load_digits_dataset

    ckpt = torch.load(digits_run / "best.pt", weights_only=True)
    pre = ckpt["preprocess"]
    digits = load_digits_dataset()
    # The checkpoint's mean/std are the training images' channel statistics (computed here, in [0, 1]).
    x = digits.train.images.reshape(-1, 3).astype(np.float64) / 255.0
    assert pre["mean"] == pytest.approx(x.mean(0).tolist(), rel=1e-3)
    assert pre["std"] == pytest.approx(x.std(0).tolist(), rel=1e-3)
    manifest = json.loads((digits_artifacts / "manifest.json").read_text())
    for key in ("mean", "std", "resize", "crop", "input_size", "interpolation"):
        assert manifest["preprocess"][key] == pre[key], key  # exported as trained

    images, labels = digits.test.images, digits.test.labels
    assert manifest["eval"]["dataset"] == "digits" and manifest["eval"]["images"] == len(labels)
    batch = _independent_preprocess(images, pre)
    one_image = 100.0 / len(labels)  # an int8 logit tie may break the other way: at most one image
    onnx_entries = [a for a in manifest["artifacts"] if a["file"].endswith(".onnx")]
    assert [a["precision"] for a in onnx_entries] == PRECISIONS
    for a in onnx_entries:
        opts = ort.SessionOptions()
        if a["precision"] == "int8":
            # The TensorRT form (int8 activations): TensorRT accumulates in int32, ORT's fused S8S8 CPU
            # kernels overflow on x86 without VNNI (82.8% here); unfused Q/DQ is its exact arithmetic.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(digits_artifacts / a["file"]), opts, providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
        top1 = 100.0 * float(np.mean(logits.argmax(1) == labels))
        # Implied for any network the suite accepts: PyTorch FP32 >= 95% on these images
        # (tests/test_training.py) and every flavour >= 99% of it (its gate budget) make 94.05%.
        assert top1 >= 90.0, (a["precision"], top1)
        assert top1 == pytest.approx(a["top1"], abs=one_image + 1e-9), (a["precision"], top1, a["top1"])


def test_fp16_computes_in_half_with_float_io(digits_artifacts: Path):
    proto = onnx.load(str(digits_artifacts / "model.fp16.onnx"))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == f32
    assert proto.graph.output[0].type.tensor_type.elem_type == f32
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert conv_weights and all(i.data_type == f16 for i in proto.graph.initializer if i.name in conv_weights)


def test_int8_is_the_tensorrt_form(digits_artifacts: Path):
    facts = inspect_int8(digits_artifacts / "model.int8.onnx")
    assert facts["conv_weights"] == 19 and facts["per_channel_axis0"] == 19
    assert facts["nonzero_zero_points"] == 0 and facts["zero_point_types"] == ["int8"]
    assert facts["adds"] == 9 and facts["adds_with_dq_inputs"] == 9  # Q/DQ on the residual input too
    assert facts["quantized_bias"] == 0


def test_int8_cpu_fuses_into_qlinearconv(digits_artifacts: Path, tmp_path: Path):
    """ORT's CPU kernels only fuse the U8S8 form: every Conv must become a QLinearConv."""
    facts = inspect_int8(digits_artifacts / "model.int8-cpu.onnx")
    assert "uint8" in facts["zero_point_types"] and facts["per_channel_axis0"] == 19
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(digits_artifacts / "model.int8-cpu.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = op_counts(onnx.load(str(tmp_path / "opt.onnx")))
    assert ops.get("QLinearConv", 0) == 19 and ops.get("Conv", 0) == 0, ops


def test_manifest_hashes_match_and_tampering_is_caught(digits_artifacts: Path, tmp_path: Path):
    m = read_manifest(digits_artifacts)
    for entry in [*m.artifacts, m.labels, m.calibration]:
        assert sha256_file(digits_artifacts / entry.file) == entry.sha256
        assert (digits_artifacts / entry.file).stat().st_size == entry.bytes
    assert json.loads((digits_artifacts / "labels.json").read_text()) == [str(i) for i in range(10)]
    assert m.versions["onnxruntime"] == ort.__version__ and m.versions["tensorrt"] is None
    copy = tmp_path / "copy"
    shutil.copytree(digits_artifacts, copy)
    with open(copy / "model.int8-cpu.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        verify_file(copy, m.find("int8-cpu"))


def _snapshot(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def test_interrupted_export_leaves_previous_dir_intact(digits_run: Path, digits_artifacts: Path, tmp_path: Path):
    out = tmp_path / "digits"
    shutil.copytree(digits_artifacts, out)
    before = _snapshot(out)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "resdeploy", "export", str(digits_run / "best.pt"), "--out", str(out),
                             "--calib-data", "digits", "--calib-images", "64", "--calib-method", "minmax"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while not list(tmp_path.glob(".digits.tmp-*/model.fp32.onnx")) and proc.poll() is None:
            assert time.monotonic() < end, "export never started writing"
            time.sleep(0.02)
        assert proc.poll() is None, "the export finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no .tmp-/.old- leftovers


def test_reexport_reuses_calibration_and_replaces_dir(digits_run: Path, digits_artifacts: Path, tmp_path: Path, capsys):
    out = tmp_path / "digits"
    shutil.copytree(digits_artifacts, out)
    old = read_manifest(out)
    assert main(["export", str(digits_run / "best.pt"), "--out", str(out), "--precisions", "fp32,int8-cpu",
                 "--calib-data", "digits", "--no-progress"]) == 0
    assert "calibration tensors reused" in capsys.readouterr().err
    new = read_manifest(out)
    assert [a.precision for a in new.entries("onnx")] == ["fp32", "int8-cpu"]
    assert not (out / "model.fp16.onnx").exists()  # the directory was replaced, not merged
    assert new.calibration.sha256 == old.calibration.sha256


def test_sabotaged_calibration_fails_the_gate(digits_run: Path, tmp_path: Path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "const" / split / "x").mkdir(parents=True)
        Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / "const" / split / "x" / "grey.png")
    out = tmp_path / "out"
    code = main(["export", str(digits_run / "best.pt"), "--out", str(out), "--precisions", "fp32,int8-cpu",
                 "--calib-data", str(tmp_path / "const"), "--eval-data", "digits", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "over accuracy budget: int8-cpu" in captured.err and "OVER BUDGET" in captured.out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["const"]
    # Accepting the drop installs it and says so in the manifest.
    assert main(["export", str(digits_run / "best.pt"), "--out", str(out), "--precisions", "fp32,int8-cpu",
                 "--calib-data", str(tmp_path / "const"), "--eval-data", "digits", "--accept-accuracy-drop",
                 "--no-progress"]) == 0
    m = read_manifest(out)
    assert m.accepted_accuracy_drop and not m.find("int8-cpu").within_budget


@pytest.mark.parametrize("extra, expect", [
    (["--precisions", "fp16,int8"], "must include fp32"),
    (["--precisions", "fp32,bf16"], "unknown precision(s) 'bf16'"),
    (["--calib-method", "kl"], "invalid choice: 'kl'"),
    (["--eval-data", "/no/such/dir"], "dataset '/no/such/dir' not found"),
    (["--labels", "/no/labels.json"], "--labels /no/labels.json not found"),
])
def test_export_bad_input_is_one_line(digits_run: Path, tmp_path: Path, capsys, extra, expect):
    try:
        code = main(["export", str(digits_run / "best.pt"), "--out", str(tmp_path / "o"), *extra])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and expect in err, err
    assert not (tmp_path / "o").exists()


def test_int8_of_a_foreign_checkpoint_needs_calibration_data(digits_run: Path, tmp_path: Path, capsys):
    from training.checkpoint import extract_state_dict, read_checkpoint

    bare = tmp_path / "bare.pth"
    torch.save(extract_state_dict(read_checkpoint(digits_run / "best.pt")), bare)
    assert main(["export", str(bare), "--arch", "resnet20", "--out", str(tmp_path / "o")]) == 2
    assert "need calibration images: pass --calib-data" in capsys.readouterr().err


def test_trt_without_tensorrt_fails_fast(digits_run: Path, tmp_path: Path):
    from export.tensorrt import tensorrt_status

    usable, _ = tensorrt_status()
    if usable:
        pytest.skip("TensorRT and a GPU are present here; the fail-fast path does not apply")
    from conftest import run_cli

    r = run_cli("export", str(digits_run / "best.pt"), "--out", str(tmp_path / "o"), "--trt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install 'resdeploy[gpu]'" in r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
    # Before any work, whatever the machine's speed: the checkpoint is not even opened, so a missing
    # one still gets the TensorRT answer, not "not found".
    r = run_cli("export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--trt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install 'resdeploy[gpu]'" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_each_calibration_method_gives_its_own_ranges(digits_artifacts: Path, tmp_path: Path):
    """ORT's quantize_static alone makes entropy byte-identical to minmax (128 bins for 128
    quantized bins leave one KL candidate); our calibrator must not."""
    from export.quantize import quantize_int8

    m = read_manifest(digits_artifacts)
    calib = np.load(digits_artifacts / m.calibration.file)[:32]
    digests = {}
    for method in ("minmax", "entropy", "percentile"):
        out = tmp_path / f"{method}.onnx"
        info = quantize_int8(digits_artifacts / "model.fp32.onnx", out, "int8-cpu", calib, method, tmp_path)
        assert info["images"] == 32 and info["method"] == method
        digests[method] = sha256_file(out)
    assert len(set(digests.values())) == 3, digests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entropy.onnx", "minmax.onnx", "percentile.onnx"]


def test_tied_logits_go_to_the_lowest_class_everywhere():
    """int8 logits are quantised, so exact ties happen (one digits test image: classes 4 and 7 at
    5.427495). The gate, the evaluator and the service must all break them the same way as argmax."""
    import numpy as np

    from core.scores import top_k
    from export.gate import Tally
    from training.evaluate import topk_accuracy

    logits = np.zeros((64, 10), np.float32)
    logits[:, 4] = logits[:, 7] = 5.427495  # 64 rows: numpy's default introsort is not stable here
    labels = np.full(64, 4)
    t = Tally()
    t.add(logits, labels, logits)
    assert t.row()["top1"] == 100.0 == topk_accuracy(logits, labels)[1]
    assert top_k(logits[0].astype(np.float64), 2, [str(i) for i in range(10)])[0]["index"] == 4
