"""The network zoo (training/resnet.py) and its counting (training/flops.py).

Structural tests build on the meta device (no memory, no compute); forward tests use small
inputs so the whole file stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from training import resnet
from training.flops import count_macs, count_params, format_models_table, models_table
from training.resnet import ARCHS, SHORTCUTS, BasicBlock, Bottleneck, ShortcutA, build_model, canonical_arch

try:  # tests/ may or may not become a package; work either way
    from tests.torchvision_layouts import RESNET18, RESNET50
except ImportError:
    from torchvision_layouts import RESNET18, RESNET50


def meta_model(arch: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_model(arch, **kwargs)


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- registry and names ----------------------------------------------------------------------

def test_archs_registry_order_and_info():
    assert list(ARCHS) == [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "plain18", "plain34", "plain50", "plain101", "plain152",
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "plain20", "plain32", "plain44", "plain56", "plain110",
    ]
    assert SHORTCUTS == ("A", "B", "C")
    for name, info in ARCHS.items():
        assert info.name == name
        assert info.residual == name.startswith("resnet")
        assert str(info.depth) == name.removeprefix("resnet").removeprefix("plain")
        if info.family == "imagenet":
            assert (info.native_input_size, info.default_shortcut) == (224, "B")
        else:
            assert info.family == "cifar" and (info.depth - 2) % 6 == 0
            assert (info.native_input_size, info.default_shortcut) == (32, "A")


@pytest.mark.parametrize("alias,expected", [
    ("ResNet-20", "resnet20"), ("resnet20", "resnet20"), ("RESNET_50", "resnet50"),
    ("plain-20", "plain20"), ("plain20", "plain20"), ("Plain_110", "plain110"),
])
def test_canonical_arch_aliases(alias, expected):
    assert canonical_arch(alias) == expected


def test_canonical_arch_unknown_suggests_closest():
    with pytest.raises(ConfigError) as e:
        canonical_arch("resnet21")
    msg = str(e.value)
    assert "'resnet21'" in msg and "did you mean 'resnet20'" in msg
    assert "run `resdeploy models` to list them" in msg
    with pytest.raises(ConfigError, match="vgg16"):
        build_model("vgg16")


def test_build_model_rejects_bad_options():
    with pytest.raises(ConfigError, match=r"'D'.*A, B, C"):
        build_model("resnet20", shortcut="D")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="num_classes"):
            build_model("resnet20", num_classes=bad)
    with pytest.raises(ConfigError, match="plain20"):
        build_model("plain20", zero_init_residual=True)


def test_builders_exist_and_forward_kwargs():
    for name, info in ARCHS.items():
        with torch.device("meta"):
            default = getattr(resnet, name)()
            custom = getattr(resnet, name)(num_classes=3, shortcut="C")
        assert default.fc.out_features == (1000 if info.family == "imagenet" else 10)
        assert custom.fc.out_features == 3
        if info.residual:
            assert all(b.downsample is not None for b in blocks(custom))


# --- forward passes --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_forward(arch):
    torch.manual_seed(0)
    cifar = ARCHS[arch].family == "cifar"
    model = build_model(arch, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32) if cifar else torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (x.shape[0], 7)
    assert torch.isfinite(y).all()


def test_non_native_input_sizes():
    torch.manual_seed(0)
    with torch.no_grad():
        assert resnet.resnet18(num_classes=5).eval()(torch.randn(1, 3, 97, 131)).shape == (1, 5)
        assert resnet.resnet20(num_classes=4).eval()(torch.randn(2, 3, 40, 40)).shape == (2, 4)


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_cifar_forward_with_each_shortcut(shortcut):
    model = build_model("resnet20", shortcut=shortcut)  # training mode: BN batch statistics
    y = model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert y.shape == (2, 10) and model.conv1.weight.grad is not None


# --- torchvision layout ----------------------------------------------------------------------

@pytest.mark.parametrize("arch,layout", [("resnet18", RESNET18), ("resnet50", RESNET50)])
def test_state_dict_matches_torchvision(arch, layout):
    model = meta_model(arch)
    assert shapes(model) == layout
    assert list(model.state_dict()) == list(layout)  # same order too
    # A torchvision-shaped state_dict loads strictly.
    fake = {k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else None)
            for k, s in layout.items()}
    model.load_state_dict(fake, strict=True, assign=True)


def test_torchvision_param_counts_and_macs():
    r18, r50 = meta_model("resnet18"), meta_model("resnet50")
    assert count_params(r18) == 11_689_512
    assert count_params(r50) == 25_557_032
    assert count_macs(r18, 224) == pytest.approx(1.82e9, rel=0.02)
    assert count_macs(r50, 224) == pytest.approx(4.09e9, rel=0.02)


def test_bottleneck_stride_on_3x3():
    block = meta_model("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


# --- CIFAR nets (paper Table 6) --------------------------------------------------------------

@pytest.mark.parametrize("arch,paper", [("resnet20", "0.27M"), ("resnet32", "0.46M"),
                                        ("resnet44", "0.66M"), ("resnet56", "0.85M"),
                                        ("resnet110", "1.7M")])
def test_cifar_param_counts_match_paper(arch, paper):
    params = count_params(meta_model(arch))
    digits = len(paper) - paper.index(".") - 2
    assert f"{params / 1e6:.{digits}f}M" == paper


def test_cifar_exact_counts_per_option():
    # Option A adds nothing; B adds two 1x1 projections (16->32, 32->64) with their BNs.
    assert count_params(meta_model("resnet20")) == 269_722
    assert count_params(meta_model("plain20")) == 269_722
    assert count_params(meta_model("resnet20", shortcut="B")) == 269_722 + 2_752 == 272_474


# --- shortcuts -------------------------------------------------------------------------------

def test_option_a_shortcut_pads_evenly_and_subsamples():
    x = torch.randn(2, 16, 8, 8)
    sc = ShortcutA(16, 32, stride=2)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    out = sc(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :8], torch.zeros(2, 8, 4, 4))
    assert torch.equal(out[:, 24:], torch.zeros(2, 8, 4, 4))
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])

    odd = ShortcutA(3, 8, stride=1)(torch.ones(1, 3, 5, 5))  # 5 new channels: 2 before, 3 after
    assert odd.shape == (1, 8, 5, 5)
    assert odd[:, :2].abs().sum() == 0 and odd[:, 5:].abs().sum() == 0
    assert torch.equal(odd[:, 2:5], torch.ones(1, 3, 5, 5))


def test_option_a_in_models_adds_no_keys():
    for res, plain in (("resnet20", "plain20"), ("resnet50", "plain50")):
        model = meta_model(res, shortcut="A")
        assert shapes(model) == shapes(meta_model(plain))
        shortcuts = [b.downsample for b in blocks(model) if b.downsample is not None]
        assert shortcuts and all(isinstance(s, ShortcutA) for s in shortcuts)
    cifar = meta_model("resnet20")
    assert [n for n, b in cifar.named_modules() if getattr(b, "downsample", None) is not None] == [
        "layer2.0", "layer3.0"]


def test_option_b_projects_only_where_shape_changes():
    def projected(model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules()
                if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is not None]

    assert projected(meta_model("resnet20", shortcut="B")) == ["layer2.0", "layer3.0"]
    # resnet50's layer1.0 changes channels 64 -> 256 at stride 1, so it projects too.
    assert projected(meta_model("resnet50")) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "resnet50"])
def test_option_c_projects_every_block(arch):
    model = meta_model(arch, shortcut="C")
    for b in blocks(model):
        assert isinstance(b.downsample, nn.Sequential)
        conv, bn = b.downsample
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
        assert isinstance(bn, nn.BatchNorm2d)


# --- plain twins -----------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 50, 20, 110])
def test_plain_twins_differ_only_by_shortcuts(depth):
    plain, res = meta_model(f"plain{depth}", shortcut="C"), meta_model(f"resnet{depth}")
    assert all(b.downsample is None and not b.residual for b in blocks(plain))
    assert not any(isinstance(m, ShortcutA) or "downsample" in n for n, m in plain.named_modules())
    twin = {k: s for k, s in shapes(res).items() if ".downsample." not in k}
    assert shapes(plain) == twin


def test_plain_block_is_relu_of_residual_branch():
    torch.manual_seed(0)
    block = resnet.plain20().layer2[0].eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        assert torch.equal(block(x), torch.relu(branch))


# --- initialisation --------------------------------------------------------------------------

def test_he_init():
    torch.manual_seed(0)
    model = resnet.resnet20()
    w = model.layer3[1].conv1.weight  # fan_out = 64 * 3 * 3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    bound = 1 / math.sqrt(64)  # nn.Linear's default uniform init is kept
    assert model.fc.weight.abs().max() <= bound and model.fc.bias.abs().max() <= bound


def test_zero_init_residual_blocks_start_as_identity_plus_relu():
    torch.manual_seed(0)
    cifar = resnet.resnet20(zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in blocks(cifar))
    x = torch.randn(2, 16, 8, 8)  # negative values too, so the ReLU shows
    with torch.no_grad():
        assert torch.equal(cifar.layer1[1](x), torch.relu(x))  # identity shortcut
        assert torch.equal(cifar.layer2[0](x), torch.relu(cifar.layer2[0].downsample(x)))  # A

    r50 = resnet.resnet50(zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for b in blocks(r50))
    assert all(torch.all(b.bn2.weight == 1) for b in blocks(r50))
    x = torch.randn(1, 256, 7, 7)
    with torch.no_grad():
        assert torch.equal(r50.layer1[1](x), torch.relu(x))


# --- flops -----------------------------------------------------------------------------------

def test_count_macs_real_equals_meta_and_has_no_side_effects():
    model = resnet.resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = count_macs(model, 32)
    assert macs == count_macs(meta_model("resnet20"), 32)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Hand count: stem 32*32*16*27, fc 64*10, 18 3x3 convs of 16/32/64 channels.
    convs = 6 * 32 * 32 * 16 * 16 * 9 + 6 * 16 * 16 * 32 * 32 * 9 + 6 * 8 * 8 * 64 * 64 * 9
    convs += 16 * 16 * 32 * (16 - 32) * 9 + 8 * 8 * 64 * (32 - 64) * 9  # first blocks' conv1
    assert macs == 32 * 32 * 16 * 27 + convs + 64 * 10


def test_models_table():
    rows = models_table()
    assert [r["name"] for r in rows] == list(ARCHS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet50"]["params"] == 25_557_032
    assert by_name["resnet50"]["gflops"] == pytest.approx(4.09, rel=0.02)
    assert by_name["resnet20"] | {"gflops": None} == {
        "name": "resnet20", "family": "cifar", "depth": 20, "residual": True, "shortcut": "A",
        "params": 269_722, "gflops": None, "input_size": 32}
    assert by_name["plain34"]["residual"] is False
    text = format_models_table(rows)
    assert "multiply-adds" in text and "3.8" in text
    assert len(text.splitlines()) == len(rows) + 5  # 2 notes, blank, header, rule
    assert any(line.startswith("resnet152") and "224x224" in line for line in text.splitlines())
