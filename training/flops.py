"""Parameter and multiply-accumulate counts, and the table behind ``resdeploy models``.

"FLOPs" here follow the paper (He et al. 2015, Table 1): multiply-adds of the conv and
fully connected layers for one image; BN, ReLU, pooling and the shortcut additions are left
out. Counting runs on the meta device, so even ResNet-152 costs no real compute.
"""

from __future__ import annotations

import torch
from torch import nn

from training.resnet import ARCHS, build_model


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; BN running statistics are buffers, not counted).

    Args:
        model: any module, on any device including meta.

    Returns:
        The total element count of ``model.parameters()``.
    """
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one ``input_size`` square image.

    Runs one forward pass with hooks, in eval mode under ``no_grad`` (so BN running
    statistics are untouched), on the model's device; build the model under
    ``torch.device("meta")`` to count without computing.

    Args:
        model: a network whose first Conv2d takes the image.
        input_size: height and width of the input in pixels.

    Returns:
        The MAC count for batch size 1.
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k  # one k-long dot product per output element
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def _build_for_counting(arch: str, num_classes: int) -> tuple[nn.Module, bool]:
    """The network on the meta device, or on CPU if meta is unsupported; (model, on_meta)."""
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes=num_classes), True
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        return build_model(arch, num_classes=num_classes), False


def models_table() -> list[dict]:
    """One row per architecture in :data:`training.resnet.ARCHS`, in display order.

    Returns:
        Dicts with ``name``, ``family``, ``depth``, ``residual``, ``shortcut`` (the default
        option; ``None`` for plain nets), ``params``, ``gflops`` (MACs / 1e9 at the native
        input size) and ``input_size``. Classifiers have 1000 (imagenet) or 10 (cifar) classes.
    """
    rows = []
    for name, info in ARCHS.items():
        model, on_meta = _build_for_counting(name, 1000 if info.family == "imagenet" else 10)
        try:
            macs = count_macs(model, info.native_input_size)
        except (NotImplementedError, RuntimeError):
            if not on_meta:
                raise
            macs = count_macs(build_model(name, num_classes=model.fc.out_features),
                              info.native_input_size)
        rows.append({
            "name": name,
            "family": info.family,
            "depth": info.depth,
            "residual": info.residual,
            "shortcut": info.default_shortcut if info.residual else None,
            "params": count_params(model),
            "gflops": macs / 1e9,
            "input_size": info.native_input_size,
        })
    return rows


def format_models_table(rows: list[dict]) -> str:
    """Render :func:`models_table` rows as an aligned text table for people.

    Args:
        rows: as returned by :func:`models_table`.

    Returns:
        The table with a header that explains the units, without a trailing newline.
    """
    header = ("arch", "family", "depth", "residual", "shortcut", "params", "GFLOPs", "input")
    body = [(r["name"], r["family"], str(r["depth"]), "yes" if r["residual"] else "no",
             r["shortcut"] or "-", f"{r['params'] / 1e6:.2f}M", f"{r['gflops']:.3f}",
             f"{r['input_size']}x{r['input_size']}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    left = {0, 1, 4}  # text columns left-aligned, numbers right-aligned

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    notes = [
        "GFLOPs are multiply-adds (paper convention) of conv and fc layers for one image at the "
        "native input size; params counted with 1000 (imagenet) or 10 (cifar) classes.",
        "ResNet-50 is ~4.1 G here vs the paper's 3.8 G because torchvision (whose layout we keep) "
        "puts the bottleneck stride on the 3x3 conv, not the first 1x1.",
        "",
    ]
    rule = "  ".join("-" * w for w in widths)
    return "\n".join(notes + [line(header), rule] + [line(b) for b in body])
