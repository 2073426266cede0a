"""training/checkpoint.py: importing foreign layouts, mismatch messages, safe reads, atomic writes.

Every checkpoint here is a real file written with torch.save (or pickle) into tmp_path and read
back through the real code; networks are small (ResNet-20/32, one ResNet-18 on a 64x64 input).
"""

from __future__ import annotations

import pickle

import pytest
import torch
from payloads import CreatesMarker, RunsShell
from torch import nn

from core.errors import CheckpointError
from core.preprocess import PreprocessConfig
from training.checkpoint import FORMAT, CheckpointMismatchError, read_checkpoint, restore_model, save_atomic
from training.resnet import build_model


def seeded_model(arch: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """A model whose every tensor differs from a freshly built one, BN statistics included.

    Random running stats make eval-mode logits depend on them, so a restore that dropped or
    mixed up any buffer could not give identical logits by luck.
    """
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(123)
    return model.eval()


def fixed_input(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(42))


def assert_same_network(restored: nn.Module, original: nn.Module, size: int) -> None:
    assert not restored.training, "restore_model must return the network in eval mode"
    got, want = restored.state_dict(), original.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = fixed_input(size)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), original(x), rtol=0, atol=0)


def dataparallel_cifar(sd: dict) -> dict:
    """The layout of common CIFAR code under nn.DataParallel: ``module.`` and ``linear``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("fc."):
            k = "linear." + k[len("fc."):]
        out["module." + k] = v
    return out


def without_num_batches_tracked(sd: dict) -> dict:
    """What checkpoints saved before PyTorch 0.4.1 hold (torchvision's ImageNet .pth among them)."""
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


# --- importing foreign layouts -----------------------------------------------------------------

@pytest.mark.parametrize("old_bn", [False, True], ids=["bn-v2", "no-num_batches_tracked"])
def test_dataparallel_cifar_checkpoint_gives_identical_logits(tmp_path, old_bn):
    original = seeded_model("resnet20")
    sd = original.state_dict()
    if old_bn:
        sd = without_num_batches_tracked(sd)
    foreign = dataparallel_cifar(sd)
    assert "module.linear.weight" in foreign and "module.conv1.weight" in foreign
    assert not any(k.startswith("module.fc.") for k in foreign)
    path = tmp_path / "model_best.th"
    torch.save({"epoch": 200, "best_prec1": 91.7, "state_dict": foreign}, path)

    r = restore_model(path, "resnet20")

    assert (r.arch, r.num_classes, r.shortcut) == ("resnet20", 10, "A")
    if old_bn:  # absent counters load as 0, as nn.BatchNorm2d itself does for old state_dicts
        assert int(r.model.bn1.num_batches_tracked) == 0
        original.apply(lambda m: m.num_batches_tracked.zero_() if isinstance(m, nn.BatchNorm2d) else None)
    assert_same_network(r.model, original, 32)


def test_model_wrapped_checkpoint_gives_identical_logits(tmp_path):
    original = seeded_model("resnet20", num_classes=4, seed=3)
    path = tmp_path / "wrapped.pt"
    torch.save({"model": original.state_dict(), "epoch": 3}, path)

    r = restore_model(path, "ResNet-20")  # any spelling canonical_arch accepts

    assert (r.arch, r.num_classes) == ("resnet20", 4)  # inferred from fc.weight
    assert_same_network(r.model, original, 32)


@pytest.mark.parametrize("old_bn", [False, True], ids=["bn-v2", "no-num_batches_tracked"])
def test_bare_torchvision_resnet18_state_dict_infers_num_classes(tmp_path, old_bn):
    original = seeded_model("resnet18", num_classes=7, seed=5)
    sd = original.state_dict()
    if old_bn:
        sd = without_num_batches_tracked(sd)
        original.apply(lambda m: m.num_batches_tracked.zero_() if isinstance(m, nn.BatchNorm2d) else None)
    path = tmp_path / "resnet18-custom.pth"
    torch.save(sd, path)

    r = restore_model(path, "resnet18")

    assert (r.arch, r.num_classes, r.shortcut) == ("resnet18", 7, "B")
    assert r.model.fc.weight.shape == (7, 512)
    assert_same_network(r.model, original, 64)


def test_foreign_checkpoint_without_arch_asks_for_it(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(seeded_model("resnet20").state_dict(), path)
    with pytest.raises(CheckpointError, match="--arch"):
        restore_model(path)


# --- mismatches --------------------------------------------------------------------------------

def test_deeper_checkpoint_as_shallower_arch_lists_unexpected_keys(tmp_path):
    path = tmp_path / "r32.pth"
    torch.save(seeded_model("resnet32").state_dict(), path)

    with pytest.raises(CheckpointMismatchError) as info:
        restore_model(path, "resnet20")

    e = info.value
    assert isinstance(e, CheckpointError)
    assert e.unexpected and not e.missing and not e.shapes
    assert all(k.startswith(("layer1.3.", "layer1.4.", "layer2.3.", "layer2.4.", "layer3.3.", "layer3.4."))
               for k in e.unexpected)
    msg = str(e)
    assert "resnet20" in msg and f"{len(e.unexpected)} unexpected keys" in msg
    assert e.unexpected[0] in msg and "more)" in msg  # the first few names, then a count
    assert "--arch" in msg


def test_shallower_checkpoint_as_deeper_arch_lists_missing_keys(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(seeded_model("resnet20").state_dict(), path)

    with pytest.raises(CheckpointMismatchError) as info:
        restore_model(path, "resnet32")

    e = info.value
    assert e.missing and not e.unexpected and not e.shapes
    assert f"{len(e.missing)} missing keys" in str(e) and e.missing[0] in str(e)


def test_num_classes_conflict_names_fc_weight_and_both_shapes(tmp_path):
    path = tmp_path / "r20-10.pth"
    torch.save(seeded_model("resnet20", num_classes=10).state_dict(), path)

    with pytest.raises(CheckpointMismatchError) as info:
        restore_model(path, "resnet20", num_classes=5)

    e = info.value
    assert ("fc.weight", (10, 64), (5, 64)) in e.shapes
    assert ("fc.bias", (10,), (5,)) in e.shapes
    assert not e.missing and not e.unexpected
    msg = str(e)
    assert "fc.weight checkpoint [10, 64] vs model [5, 64]" in msg
    assert "shape conflicts" in msg and "--num-classes" in msg


def own_checkpoint(arch: str, *, preprocess: PreprocessConfig | None = None,
                   classes: list[str] | None = None, num_classes: int = 10, seed: int = 0) -> tuple[dict, nn.Module]:
    model = seeded_model(arch, num_classes=num_classes, seed=seed)
    ckpt = {"format": FORMAT, "arch": arch, "shortcut": "A", "num_classes": num_classes,
            "model": model.state_dict(), "epoch": 5, "best_top1": 98.6,
            "history": [{"epoch": 5, "test_top1": 98.6}], "config": {"lr": 0.1, "epochs": 5}}
    if preprocess is not None:
        ckpt["preprocess"] = preprocess.to_dict()
    if classes is not None:
        ckpt["classes"] = classes
    return ckpt, model


def test_own_checkpoint_with_other_arch_says_which_arch_to_pass(tmp_path):
    ckpt, _ = own_checkpoint("resnet32")
    path = save_atomic(ckpt, tmp_path / "best.pt")

    with pytest.raises(CheckpointError) as info:
        restore_model(path, arch="resnet20")

    assert not isinstance(info.value, CheckpointMismatchError)  # caught before building anything
    assert "--arch resnet32" in str(info.value) and str(path) in str(info.value)
    assert restore_model(path, arch="ResNet-32").arch == "resnet32"  # same arch, other spelling: fine


# --- what our own checkpoints carry ------------------------------------------------------------

def test_restore_returns_recorded_preprocess_classes_and_meta(tmp_path):
    pre = PreprocessConfig(input_size=32, resize=32, crop=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    classes = ["ant", "bee", "cat"]
    ckpt, original = own_checkpoint("resnet20", preprocess=pre, classes=classes, num_classes=3, seed=7)
    path = save_atomic(ckpt, tmp_path / "run" / "best.pt")

    r = restore_model(path)  # the arch comes from the checkpoint

    assert r.arch == "resnet20" and r.num_classes == 3 and r.shortcut == "A"
    assert isinstance(r.preprocess, PreprocessConfig) and r.preprocess == pre
    assert r.classes == classes
    assert r.meta == {"epoch": 5, "best_top1": 98.6, "config": {"lr": 0.1, "epochs": 5}}
    assert_same_network(r.model, original, 32)


def test_restore_without_recorded_preprocess_or_classes_gives_none(tmp_path):
    ckpt, _ = own_checkpoint("resnet20")
    path = save_atomic(ckpt, tmp_path / "best.pt")
    r = restore_model(path)
    assert r.preprocess is None and r.classes is None

    foreign = tmp_path / "foreign.pth"
    torch.save(seeded_model("resnet20").state_dict(), foreign)
    r = restore_model(foreign, "resnet20")
    assert r.preprocess is None and r.classes is None and r.meta == {}


# --- reading safely ----------------------------------------------------------------------------

class PlainObject:
    """No side effect, but not a tensor container either."""

    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("payload", [CreatesMarker, RunsShell])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_read_checkpoint_refuses_code_and_never_runs_it(tmp_path, payload, writer):
    # The payload does work when unpickled without a guard; otherwise this test proves nothing.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(payload(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    obj = {"model": {"w": torch.zeros(2)}, "x": payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # what torch.load expects of a legacy file

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "weights_only" in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        restore_model(path, "resnet20")
    assert not marker.exists()


def test_read_checkpoint_refuses_a_pickled_class_instance(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"x": PlainObject(), "w": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(path)


def test_read_checkpoint_missing_path(tmp_path):
    path = tmp_path / "nope" / "best.pt"
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)
    with pytest.raises(CheckpointError):  # a directory is not a checkpoint either
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n" * 10, b"PK\x03\x04" + b"\x00" * 64],
                         ids=["empty", "text", "broken-zip"])
def test_read_checkpoint_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_read_checkpoint_refuses_a_non_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="Tensor"):
        read_checkpoint(path)


# --- atomic writes -----------------------------------------------------------------------------

def test_save_atomic_writes_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "last.pt"
    obj = {"format": FORMAT, "w": torch.arange(6.0).reshape(2, 3), "epoch": 2}
    assert save_atomic(obj, str(path)) == path
    back = read_checkpoint(path)
    assert back["epoch"] == 2 and torch.equal(back["w"], obj["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


class InterruptedSave:
    """Raises KeyboardInterrupt while being pickled: Ctrl-C in the middle of torch.save."""

    def __reduce__(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("poison, error", [(lambda: (lambda x: x), Exception),
                                           (InterruptedSave, KeyboardInterrupt)],
                         ids=["unpicklable-lambda", "keyboard-interrupt"])
def test_save_atomic_failure_keeps_previous_file_and_leaves_no_temp(tmp_path, poison, error):
    path = tmp_path / "best.pt"
    save_atomic({"w": torch.ones(1000), "epoch": 1}, path)
    before = path.read_bytes()

    with pytest.raises(error):
        save_atomic({"w": torch.zeros(1000), "epoch": 2, "bad": poison()}, path)

    assert path.read_bytes() == before
    assert read_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.glob(".*.tmp")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
