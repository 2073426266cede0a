"""Argument types and flag groups shared by the sub-commands (torch-free)."""

from __future__ import annotations

import argparse

from core.errors import ConfigError
from core.preprocess import INTERPOLATIONS


def arch(value: str) -> str:
    from training.resnet import canonical_arch

    try:
        return canonical_arch(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(kind):
    """An argparse type accepting only positive values of ``kind`` (int or float)."""
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not a {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return v
    return parse


def non_negative(kind):
    """An argparse type accepting only values of ``kind`` (int or float) that are >= 0."""
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            v = -1
        if v < 0:
            raise argparse.ArgumentTypeError(f"'{value}' is not a {'whole number' if kind is int else 'number'} >= 0")
        return v
    return parse


def int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma-separated list of integers, e.g. 15,22") from None


def three_floats(value: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in value.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"'{value}' must be three comma-separated numbers (R,G,B in [0,1]), "
                                         "e.g. 0.485,0.456,0.406")
    return vals


def add_preprocess_flags(p: argparse.ArgumentParser) -> None:
    """Preprocessing of imported checkpoints (ours record it; these override)."""
    g = p.add_argument_group("preprocessing (imported checkpoints; overrides what the checkpoint records)")
    g.add_argument("--input-size", type=positive(int), help="network input, e.g. 224")
    g.add_argument("--resize", type=positive(int), help="shorter side before cropping, e.g. 256")
    g.add_argument("--crop", type=positive(int), help="centre/10-crop size, e.g. 224")
    g.add_argument("--mean", type=three_floats, help="R,G,B in [0,1], e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=three_floats, help="R,G,B in [0,1], e.g. 0.229,0.224,0.225")
    g.add_argument("--interpolation", choices=tuple(INTERPOLATIONS))
