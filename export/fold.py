"""Fold BatchNorm into the preceding convolution, in PyTorch, before ONNX export.

For a conv ``y = W x + b`` followed by BN ``z = gamma (y - mu) / sqrt(var + eps) + beta``:
``W' = W * s`` and ``b' = (b - mu) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output
channel. Exporters fold too when they optimise, but the ONNX file is the contract: we fold
explicitly and then assert the graph has no BatchNormalization node (docs/design.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.errors import ExportError


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv computing ``bn(conv(x))`` in eval mode (float64 arithmetic, stored float32)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    fused.weight.copy_(w.to(conv.weight.dtype))
    fused.bias.copy_(((b - bn.running_mean.double()) * scale + bn.bias.double()).to(conv.weight.dtype))
    return fused


def _pairs(module: nn.Module):
    """(conv_name, bn_name) pairs among a module's direct children: convK/bnK or Sequential [conv, bn]."""
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        names = list(children)
        for a, b in zip(names, names[1:]):
            if isinstance(children[a], nn.Conv2d) and isinstance(children[b], nn.BatchNorm2d):
                yield a, b
    for name, child in children.items():
        if isinstance(child, nn.BatchNorm2d) and name.startswith("bn"):
            conv = "conv" + name[2:]
            if isinstance(children.get(conv), nn.Conv2d):
                yield conv, name


def count_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BN folded into its conv (BN -> Identity).

    Raises:
        ExportError: a BatchNorm that does not directly follow a convolution.
    """
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for conv_name, bn_name in list(_pairs(module)):
            setattr(module, conv_name, fuse_conv_bn(getattr(module, conv_name), getattr(module, bn_name)))
            setattr(module, bn_name, nn.Identity())
    left = count_batchnorm(folded)
    if left:
        raise ExportError(f"{left} BatchNorm layers do not follow a convolution and cannot be folded")
    return folded
