"""Training-curve figures (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path

from core.fsutil import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure to a temporary name, then rename, so a reader never sees half a PNG."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def save_curves(history: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Loss and top-1 error per epoch (train thin, test bold) for one run."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, [h["train_loss"] for h in history], lw=1, label="train")
    a1.plot(ep, [h["test_loss"] for h in history], lw=2.2, label="test")
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a2.plot(ep, [h["train_top1_error"] for h in history], lw=1, label="train")
    a2.plot(ep, [h["test_top1_error"] for h in history], lw=2.2, label="test")
    a2.set(xlabel="epoch", ylabel="top-1 error (%)", title="error")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    path = _save(fig, Path(path))
    plt.close(fig)
    return path


def save_degradation_figure(runs: dict[str, list[dict]], path: str | os.PathLike, title: str) -> Path:
    """He et al. Fig. 4 layout: plain nets left, ResNets right; thin = train, bold = test error."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    depth_color: dict[str, str] = {}
    for name, hist in runs.items():
        plain = name.startswith("plain")
        depth = name.removeprefix("plain").removeprefix("resnet")
        color = depth_color.setdefault(depth, colors[len(depth_color) % len(colors)])
        ax = axes[0 if plain else 1]
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["train_top1_error"] for h in hist], color=color, lw=0.9, ls="--")
        ax.plot(ep, [h["test_top1_error"] for h in hist], color=color, lw=2.2, label=name)
    for ax, t in zip(axes, ("plain", "ResNet")):
        ax.set(xlabel="epoch", title=t)
        ax.grid(alpha=0.3)
        ax.legend(title="bold: test, dashed: train")
    axes[0].set_ylabel("top-1 error (%)")
    fig.suptitle(title)
    path = _save(fig, Path(path))
    plt.close(fig)
    return path
