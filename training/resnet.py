"""The network zoo: ResNets and their plain twins (He et al. 2015, "Deep Residual Learning").

ImageNet ResNet-18/34/50/101/152 (paper Table 1) use torchvision's module names and shapes,
so a torchvision ``.pth`` loads with ``strict=True``. CIFAR ResNet-20/32/44/56/110 follow
paper section 4.2 (depth 6n+2, 16/32/64 channels). Every depth has a plain twin: the same
layers without shortcuts (section 4.1), the baseline that shows the degradation problem.

Shortcut options (section 3.3):
    "A": parameter-free; identity, with stride-2 subsampling and zero-padded extra channels
         where the shape changes. Adds no state_dict keys. CIFAR default.
    "B": 1x1 projection (conv + BN, ``downsample.0`` / ``downsample.1``) only where the shape
         changes, identity elsewhere. ImageNet default and torchvision's layout.
    "C": 1x1 projection on every block.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from training.names import SHORTCUTS  # re-exported: the CLI reads it without torch


@dataclass(frozen=True)
class ArchInfo:
    """What one architecture is, without building it."""

    name: str  # e.g. "resnet20", "plain34"
    family: str  # "imagenet" or "cifar"
    depth: int
    residual: bool  # False for plain twins
    native_input_size: int  # 224 for imagenet, 32 for cifar
    default_shortcut: str  # "B" for imagenet, "A" for cifar; ignored by plain nets


# depth -> (block, blocks per stage); paper Table 1.
_IMAGENET_LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                    152: ("bottleneck", (3, 8, 36, 3))}
_CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # 6n+2, paper Table 6


def _make_archs() -> dict[str, ArchInfo]:
    archs: dict[str, ArchInfo] = {}
    for family, depths, size, shortcut in (("imagenet", tuple(_IMAGENET_LAYERS), 224, "B"),
                                           ("cifar", _CIFAR_DEPTHS, 32, "A")):
        for prefix, residual in (("resnet", True), ("plain", False)):
            for d in depths:
                name = f"{prefix}{d}"
                archs[name] = ArchInfo(name, family, d, residual, size, shortcut)
    return archs


ARCHS: dict[str, ArchInfo] = _make_archs()


def canonical_arch(name: str) -> str:
    """Normalise an architecture name to its key in :data:`ARCHS`.

    Args:
        name: e.g. ``"ResNet-20"``, ``"resnet20"``, ``"plain_20"``; case, hyphens and
            underscores are ignored.

    Returns:
        The canonical name, e.g. ``"resnet20"``.

    Raises:
        ConfigError: unknown name; the message suggests the closest known one.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key in ARCHS:
        return key
    # difflib ties are common ("resnet21" is as close to resnet18/20/32 as to each other);
    # break them by depth, so the suggestion is the nearest network the user likely meant.
    digits = re.sub(r"\D", "", key)

    def score(cand: str) -> tuple[float, int]:
        ratio = difflib.SequenceMatcher(None, key, cand).ratio()
        return ratio, -abs(ARCHS[cand].depth - int(digits)) if digits else 0

    best = max(ARCHS, key=score)
    hint = f" (did you mean {best!r}?)" if score(best)[0] >= 0.6 else ""
    raise ConfigError(f"unknown architecture {name!r}{hint}; run `resdeploy models` to list them")


class ShortcutA(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the new channels (section 3.3).

    The zero channels are split evenly, ``(out - in) // 2`` before the existing ones and the
    rest after, as in the common CIFAR reimplementations. No parameters, no buffers.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_before or self.pad_after:
            x = F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # No bias: BN follows every conv (section 3.4) and its shift makes a bias redundant.
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int, option: str,
              residual: bool) -> nn.Module | None:
    """The shortcut module of one block; ``None`` means identity (or none, for plain nets)."""
    if not residual:
        return None
    changes = stride != 1 or in_ch != out_ch
    if option == "C" or (option == "B" and changes):
        return nn.Sequential(_conv(in_ch, out_ch, 1, stride), nn.BatchNorm2d(out_ch))
    if option == "A" and changes:
        return ShortcutA(in_ch, out_ch, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (paper Fig. 2 left); output ``relu(F(x) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, shortcut: str, residual: bool):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, out_ch, 3)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, shortcut, residual)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (paper Fig. 5 right).

    The stride sits on the 3x3 conv as in torchvision ("ResNet v1.5"); the paper puts it on
    the first 1x1. This costs ~0.3 GFLOPs on ResNet-50 (4.1 vs 3.8 G) and gains accuracy.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, shortcut: str, residual: bool):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, shortcut, residual)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(nn.Module):
    """A residual (or plain) network: stem, stages ``layer1..``, global average pool, ``fc``.

    ``family="imagenet"``: 7x7/2 conv, BN, ReLU, 3x3/2 max pool, four stages of 64..512
    planes. ``family="cifar"``: 3x3 conv to 16 channels, BN, ReLU, three stages of 16/32/64.
    """

    def __init__(self, family: str, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...],
                 num_classes: int, shortcut: str, residual: bool, zero_init_residual: bool = False):
        super().__init__()
        if family == "imagenet":
            widths, in_ch = (64, 128, 256, 512), 64
            self.conv1 = nn.Conv2d(3, in_ch, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(in_ch)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            widths, in_ch = (16, 32, 64), 16
            self.conv1 = _conv(3, in_ch, 3)
            self.bn1 = nn.BatchNorm2d(in_ch)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity()  # section 4.2: no pooling in the CIFAR stem
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(layers)))
        for i, (name, planes, blocks) in enumerate(zip(self.stage_names, widths, layers)):
            stride = 1 if i == 0 else 2  # each later stage halves the map, doubles the width
            stage = []
            for j in range(blocks):
                stage.append(block(in_ch, planes, stride if j == 0 else 1, shortcut, residual))
                in_ch = planes * block.expansion
            setattr(self, name, nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # any input size works
        self.fc = nn.Linear(in_ch, num_classes)  # PyTorch's default init, as torchvision

        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al. 2015b ("Delving deep"), as section 3.4
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017 ("Accurate, Large Minibatch SGD", section 5.1): zero the last
            # BN gamma of each residual branch so every block starts as identity(+ReLU).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(arch: str, num_classes: int | None = None, shortcut: str | None = None,
                zero_init_residual: bool = False) -> nn.Module:
    """Build any architecture in :data:`ARCHS`, He-initialised.

    Args:
        arch: architecture name, any spelling :func:`canonical_arch` accepts.
        num_classes: classifier outputs; default 1000 (imagenet family) or 10 (cifar).
        shortcut: "A", "B" or "C" (see module docstring); ``None`` for the family default.
            Validated but ignored by plain nets, which have no shortcuts.
        zero_init_residual: zero the last BN of each residual branch (Goyal et al. 2017).

    Returns:
        The network, in training mode, on the current default device.

    Raises:
        ConfigError: unknown arch, bad shortcut, ``num_classes < 1``, or
            ``zero_init_residual`` on a plain net (it would zero the whole signal path).
    """
    info = ARCHS[canonical_arch(arch)]
    if num_classes is None:
        num_classes = 1000 if info.family == "imagenet" else 10
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    option = info.default_shortcut if shortcut is None else str(shortcut).upper()
    if option not in SHORTCUTS:
        raise ConfigError(f"unknown shortcut option {shortcut!r}; choose one of "
                          f"{', '.join(SHORTCUTS)} (A: zero-pad, B: projection where shapes "
                          "change, C: projection everywhere)")
    if zero_init_residual and not info.residual:
        raise ConfigError(f"zero_init_residual needs residual blocks; {info.name} is a plain net "
                          "and would output a constant. Drop the option or use "
                          f"resnet{info.depth}")
    if info.family == "imagenet":
        kind, layers = _IMAGENET_LAYERS[info.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
    else:
        n = (info.depth - 2) // 6
        block, layers = BasicBlock, (n, n, n)
    return ResNet(info.family, block, layers, num_classes, option, info.residual, zero_init_residual)


def _builder(name: str) -> Callable[..., nn.Module]:
    info = ARCHS[name]
    what = (f"{info.family} ResNet-{info.depth}" if info.residual
            else f"{info.family} plain-{info.depth}, ResNet-{info.depth} without shortcuts")

    def build(**kwargs: Any) -> nn.Module:
        return build_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"Build the {what}.\n\n    Keyword arguments (num_classes, shortcut, "
                     "zero_init_residual) go to :func:`build_model`.\n    ")
    return build


# Builders, one per entry of ARCHS (written out so that they can be imported and grepped).
resnet18, resnet34, resnet50 = _builder("resnet18"), _builder("resnet34"), _builder("resnet50")
resnet101, resnet152 = _builder("resnet101"), _builder("resnet152")
resnet20, resnet32, resnet44 = _builder("resnet20"), _builder("resnet32"), _builder("resnet44")
resnet56, resnet110 = _builder("resnet56"), _builder("resnet110")
plain18, plain34, plain50 = _builder("plain18"), _builder("plain34"), _builder("plain50")
plain101, plain152 = _builder("plain101"), _builder("plain152")
plain20, plain32, plain44 = _builder("plain20"), _builder("plain32"), _builder("plain44")
plain56, plain110 = _builder("plain56"), _builder("plain110")
