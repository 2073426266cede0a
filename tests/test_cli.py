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


def _top1_by_hand(model, resize: int, crop: int, mean, std) -> float:
    """Top-1 (%) on the digits test split, preprocessed here with PIL and numpy, not core.preprocess."""
    import numpy as np
    from PIL import Image

    from training.data import load_dataset

    test = load_dataset("digits").test
    off = (resize - crop) // 2
    pixels = np.stack([np.asarray(Image.fromarray(a).resize((resize, resize), Image.BILINEAR))
                       [off:off + crop, off:off + crop] for a in test.images])
    x = (pixels.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return 100 * float(np.mean(logits.argmax(1).numpy() == test.labels))


def test_eval_imported_state_dict_needs_and_uses_flags(digits_run: Path, tmp_path: Path, capsys):
    """A bare state_dict carries no preprocessing: flags supply it, and every one of them is used.

    The flags differ from both the run's preprocessing and the dataset default (resize 32, crop 32,
    mean 0.3048, std 0.3235), and the expected top-1 is computed here from the weights by hand.
    """
    from training.resnet import build_model

    weights = extract_state_dict(read_checkpoint(digits_run / "best.pt"))
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}}, bare)
    model = build_model("resnet20", num_classes=10)
    model.load_state_dict(weights)
    model.eval()

    out = tmp_path / "flags.json"
    mean, std = (0.45, 0.5, 0.55), (0.25, 0.3, 0.2)  # per channel, so the order matters too
    assert main(["eval", str(bare), "--arch", "resnet20", "--dataset", "digits", "--resize", "48",
                 "--crop", "40", "--input-size", "40", "--mean", "0.45,0.5,0.55", "--std", "0.25,0.3,0.2",
                 "--json", str(out), "--no-progress"]) == 0
    assert "records no preprocessing" not in capsys.readouterr().err  # every missing value was given
    res = json.loads(out.read_text())
    pre = res["preprocess"]
    assert (pre["resize"], pre["crop"], pre["input_size"]) == (48, 40, 40)
    assert tuple(pre["mean"]) == mean and tuple(pre["std"]) == std
    want = _top1_by_hand(model, 48, 40, mean, std)
    # The flags matter: this checkpoint scores far higher with the preprocessing it was trained with.
    assert _top1_by_hand(model, 32, 32, (0.3048,) * 3, (0.3235,) * 3) >= want + 10
    assert res["n"] == 360 and res["top1"] == pytest.approx(want, abs=100 / 360 + 1e-6)  # 1 image of slack

    # Without the flags the dataset default fills in, with a warning naming what was missing.
    assert main(["eval", str(bare), "--arch", "resnet20", "--dataset", "digits", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "records no preprocessing" in err and "--mean" in err


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


def write_digits_tree(root: Path) -> int:
    """The 360 digits test images as PNG files under root/<digit>/; returns how many were written."""
    from PIL import Image

    from training.data import load_dataset

    test = load_dataset("digits").test
    for i, (pixels, label) in enumerate(zip(test.images, test.labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / str(label) / f"{i:03d}.png")
    return len(test)


def test_eval_on_a_class_tree_matches_the_embedded_split(digits_run: Path, tmp_path: Path, capsys):
    """The same pixels as files in DIR/<class>/ score exactly what the in-memory split scores."""
    tree = tmp_path / "digit-photos"
    assert write_digits_tree(tree) == 360
    on_tree, on_split = tmp_path / "tree.json", tmp_path / "split.json"
    ck = str(digits_run / "best.pt")
    assert main(["eval", ck, "--dataset", str(tree), "--json", str(on_tree), "--no-progress"]) == 0
    assert "resnet20 on digit-photos (360 images" in capsys.readouterr().out
    assert main(["eval", ck, "--dataset", "digits", "--json", str(on_split), "--no-progress"]) == 0
    a, b = json.loads(on_tree.read_text()), json.loads(on_split.read_text())
    assert a["n"] == 360 and a["dataset"] == "digit-photos"
    # The same pixels and network, but the tree is read in class order, so the batches hold other
    # images: a kernel that rounds by batch could decide a near-tie the other way. One image of slack;
    # a misread folder moves a whole class (about 36 images). The floor: the fixture's 95% on these
    # very images (tests/test_training.py) less 18 images, about min_correct(360) (tests/bounds.py).
    one_image = 100 / 360 + 1e-6
    assert (a["top1"], a["top5"]) == (pytest.approx(b["top1"], abs=one_image), pytest.approx(b["top5"], abs=one_image))
    assert a["top1"] >= 90.0
    assert a["preprocess"] == b["preprocess"]  # the checkpoint's own, not the ImageNet default


@pytest.fixture
def photo_tree(tmp_path: Path) -> Path:
    """Two classes of scikit-image sample photos: cat/ (1 image) and space/ (2)."""
    from PIL import Image
    from skimage import data

    root = tmp_path / "photos"
    for rel, name in {"cat/chelsea.jpg": "chelsea", "space/astronaut.jpg": "astronaut",
                      "space/rocket.png": "rocket"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).save(root / rel)
    return root


def test_eval_imported_state_dict_on_a_class_tree_takes_the_imagenet_default(photo_tree, tmp_path, capsys):
    from training.resnet import build_model

    bare = tmp_path / "imported.pth"
    torch.manual_seed(0)
    torch.save(build_model("resnet20", num_classes=2).state_dict(), bare)
    out = tmp_path / "r.json"
    assert main(["eval", str(bare), "--arch", "resnet20", "--dataset", str(photo_tree), "--json", str(out),
                 "--no-progress"]) == 0
    assert "records no preprocessing" in capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["n"] == 3 and res["dataset"] == "photos"
    pre = res["preprocess"]
    assert (pre["input_size"], pre["resize"], pre["crop"]) == (224, 256, 224)
    assert tuple(pre["mean"]) == (0.485, 0.456, 0.406)
    assert 0.0 <= res["top1"] <= 100.0 and res["top5"] == 100.0  # 2 classes: the top 5 hold both


def test_eval_class_tree_with_other_class_count_is_one_line(photo_tree, tmp_path, capsys):
    from training.resnet import build_model

    bare = tmp_path / "three.pth"
    torch.save(build_model("resnet20", num_classes=3).state_dict(), bare)
    err = one_line_error(capsys, ["eval", str(bare), "--arch", "resnet20", "--dataset", str(photo_tree)])
    assert "predicts 3 classes but photos has 2" in err


def test_eval_flat_folder_says_it_is_calibration_data(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    from training.resnet import build_model

    flat = tmp_path / "shots"
    flat.mkdir()
    Image.fromarray(data.coffee()).save(flat / "coffee.jpg")
    bare = tmp_path / "bare.pth"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), bare)
    err = one_line_error(capsys, ["eval", str(bare), "--arch", "resnet20", "--dataset", str(flat)])
    assert str(flat) in err and "calibration" in err


def test_eval_warns_when_the_tree_names_other_classes(digits_run: Path, tmp_path: Path, capsys):
    """Labels follow the folders' sorted order; a checkpoint that recorded other names is warned about."""
    from PIL import Image

    tree = tmp_path / "renamed"
    for k in range(10):
        (tree / f"digit-{k}").mkdir(parents=True)
        Image.new("RGB", (32, 32), (25 * k,) * 3).save(tree / f"digit-{k}" / "a.png")
    assert main(["eval", str(digits_run / "best.pt"), "--dataset", str(tree), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "differ" in err and "digit-0" in err and "records no preprocessing" not in err
