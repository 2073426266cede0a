"""The command line as users meet it: evaluation output, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from resdeploy.cli import main
from training.checkpoint import extract_state_dict, read_checkpoint


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``main(argv)`` in-process; assert a non-zero exit and exactly one line on stderr."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_eval_ten_crop_json(digits_run: Path, tmp_path: Path):
    out = tmp_path / "r.json"
    r = run_cli("eval", str(digits_run / "best.pt"), "--arch", "resnet20", "--dataset", "digits",
                "--tta", "ten_crop", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["tta"] == "ten_crop" and res["n"] == 360
    assert 90.0 <= res["top1"] <= 100.0 and res["top1"] <= res["top5"]
    assert res["top1_error"] == pytest.approx(100 - res["top1"])
    assert "top-1" in r.stdout


def test_eval_imported_state_dict_needs_and_uses_flags(digits_run: Path, tmp_path: Path, capsys):
    """A bare state_dict carries no preprocessing: flags supply it, and match the recorded run."""
    ck = read_checkpoint(digits_run / "best.pt")
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in extract_state_dict(ck).items()}}, bare)
    pre = ck["preprocess"]
    fmt = lambda v: ",".join(str(x) for x in v)  # noqa: E731
    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    assert main(["eval", str(digits_run / "best.pt"), "--dataset", "digits", "--json", str(ours)]) == 0
    assert main(["eval", str(bare), "--arch", "resnet20", "--dataset", "digits", "--resize", "32",
                 "--crop", "32", "--input-size", "32", "--mean", fmt(pre["mean"]), "--std", fmt(pre["std"]),
                 "--json", str(theirs)]) == 0
    assert json.loads(ours.read_text())["top1"] == json.loads(theirs.read_text())["top1"]


@pytest.mark.parametrize("argv, expect", [
    (["train", "--arch", "resnet21"], "did you mean 'resnet20'"),
    (["train", "--arch", "resnet20", "--epochs", "0"], "--epochs"),
    (["train", "--arch", "resnet20", "--epochs", "ten"], "'ten' is not a int"),
    (["train", "--arch", "resnet20", "--shortcut", "D"], "invalid choice: 'D'"),
    (["train", "--arch", "resnet20", "--dataset", "/no/such/dir"], "dataset '/no/such/dir' not found"),
    (["train", "--arch", "resnet20", "--milestones", "3,99", "--epochs", "5"], "--milestones"),
    (["eval", "/no/such.pt", "--arch", "resnet20"], "checkpoint not found"),
    (["eval", "x.pt", "--tta", "five_crop"], "invalid choice: 'five_crop'"),
    (["eval", "x.pt", "--mean", "0.5,0.5"], "three comma-separated numbers"),
    (["compare", "--depths", "18,21"], "no plain/residual pair of depth 21"),
])
def test_bad_input_is_one_line(capsys, argv, expect):
    assert expect in one_line_error(capsys, argv)


def test_checkpoint_of_another_arch(digits_run: Path, capsys, tmp_path: Path):
    err = one_line_error(capsys, ["eval", str(digits_run / "best.pt"), "--arch", "resnet32"])
    assert "trained as resnet20, not resnet32; pass --arch resnet20" in err
    bare = tmp_path / "bare.pth"
    torch.save(extract_state_dict(read_checkpoint(digits_run / "best.pt")), bare)
    err = one_line_error(capsys, ["eval", str(bare), "--arch", "resnet32", "--dataset", "digits"])
    assert "does not fit resnet32" in err and "missing keys" in err


def test_run_directory_is_never_overwritten_and_resume_needs_a_run(digits_run: Path, capsys, tmp_path: Path):
    err = one_line_error(capsys, ["train", "--arch", "resnet20", "--out", str(digits_run)])
    assert "--resume" in err
    err = one_line_error(capsys, ["train", "--arch", "resnet20", "--out", str(tmp_path / "new"), "--resume"])
    assert "nothing to resume" in err


def test_real_process_exits_2_without_traceback():
    r = run_cli("train", "--arch", "resnet999")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "resdeploy models" in r.stderr


def test_models_lists_every_arch_with_params_and_gflops():
    r = run_cli("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert len(rows) == 20
    assert round(rows["resnet56"]["params"] / 1e6, 2) == 0.85
    assert rows["resnet50"]["gflops"] == pytest.approx(4.09, abs=0.02)
