"""Checkpoints: atomic writes, safe reads and import of foreign layouts.

A checkpoint written by ``resdeploy train`` is a plain dict (readable with
``torch.load(..., weights_only=True)``) that carries everything a later stage needs::

    {"format": "resdeploy.checkpoint/1", "arch": "resnet20", "shortcut": "A",
     "num_classes": 10, "classes": [...], "preprocess": {...}, "model": state_dict,
     "epoch": 5, "best_top1": 98.6, "history": [...], "config": {...},
     # last.pt only, for --resume:
     "optimizer": ..., "scheduler": ..., "rng": ...}

Foreign checkpoints are imported too: a bare state_dict (a torchvision ``.pth``), one wrapped
under ``state_dict`` or ``model``, DataParallel/DDP ``module.`` prefixes, and CIFAR code that
names the classifier ``linear``. Preprocessing for those comes from the command line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import CheckpointError, first_line
from core.fsutil import atomic_path
from core.preprocess import PreprocessConfig
from training.resnet import ARCHS, build_model, canonical_arch

log = logging.getLogger(__name__)

FORMAT = "resdeploy.checkpoint/1"


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the requested network."""

    def __init__(self, arch: str, missing: list[str], unexpected: list[str],
                 shapes: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {some(unexpected)}")
        if shapes:
            s = "; ".join(f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes[:3])
            more = f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""
            parts.append(f"{len(shapes)} shape conflicts: {s}{more}")
        super().__init__(
            f"checkpoint does not fit {arch}: " + "; ".join(parts)
            + ". Pass the --arch (and --shortcut / --num-classes) the checkpoint was trained with."
        )


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name in the same directory, fsync, then rename.

    A crash or SIGINT mid-write leaves the previous file intact and no temporary behind.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True`` (never unpickle arbitrary objects).

    Raises:
        CheckpointError: missing file, or not a weights-only readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path; `resdeploy train` "
                              "writes OUT/best.pt and OUT/last.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors all land here
        first = first_line(e)
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]} (only tensor "
                              "state_dicts readable with weights_only=True are accepted)") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint in torchvision naming.

    Unwraps ``state_dict`` / ``model`` containers, strips DataParallel/DDP ``module.`` prefixes
    and renames a ``linear`` classifier (common CIFAR code) to ``fc``.
    """
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("checkpoint holds no tensors under the top level, 'model' or 'state_dict'")
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("linear."):
            k = "fc." + k[len("linear."):]
        out[k] = v
    return out


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists every kind of mismatch."""
    own = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 (torchvision's ImageNet .pth files among them) have
    # no BatchNorm num_batches_tracked; load_state_dict(strict=True) accepts that and counts from
    # 0, so do not report those buffers as missing (eval never reads them).
    state_dict = dict(state_dict)
    for k in own:
        if k.endswith(".num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros_like(own[k])
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = [(k, tuple(state_dict[k].shape), tuple(own[k].shape))
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(arch, missing, unexpected, shapes)
    model.load_state_dict(state_dict, strict=True)


@dataclass
class Restored:
    """A network rebuilt from a checkpoint, with what is known about it."""

    model: nn.Module
    arch: str
    num_classes: int
    shortcut: str | None
    preprocess: PreprocessConfig | None
    classes: list[str] | None
    meta: dict


def restore_model(path: str | os.PathLike, arch: str | None = None, *, num_classes: int | None = None,
                  shortcut: str | None = None) -> Restored:
    """Rebuild the network of a checkpoint (ours or imported) in eval mode on CPU.

    Args:
        path: checkpoint file.
        arch: architecture; required for foreign checkpoints, checked against ours.
        num_classes: classifier size; inferred from ``fc.weight`` when omitted.
        shortcut: shortcut option; taken from the checkpoint when it records one.

    Raises:
        CheckpointError: unreadable checkpoint, wrong architecture or mismatched tensors.
    """
    obj = read_checkpoint(path)
    recorded = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    if arch is None and recorded is None:
        raise CheckpointError(f"{path} does not record its architecture; pass --arch "
                              "(run `resdeploy models` to list them)")
    arch = canonical_arch(arch or recorded)
    if recorded is not None and canonical_arch(recorded) != arch:
        raise CheckpointError(f"{path} was trained as {recorded}, not {arch}; pass --arch {recorded}")
    sd = extract_state_dict(obj)
    if num_classes is None:
        num_classes = obj.get("num_classes") or (sd["fc.weight"].shape[0] if "fc.weight" in sd else None)
    shortcut = shortcut or obj.get("shortcut")
    model = build_model(arch, num_classes=num_classes, shortcut=shortcut)
    load_weights(model, sd, arch)
    model.eval()
    pre = obj.get("preprocess")
    return Restored(
        model=model, arch=arch, num_classes=model.fc.out_features,
        shortcut=shortcut or ARCHS[arch].default_shortcut,
        preprocess=PreprocessConfig.from_dict(pre) if isinstance(pre, dict) else None,
        classes=list(obj["classes"]) if isinstance(obj.get("classes"), list) else None,
        meta={k: obj[k] for k in ("epoch", "best_top1", "config") if k in obj},
    )
