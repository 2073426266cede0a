"""The training loop: the paper's recipe by default (He et al. 2015, Sec. 3.4 and 4.2).

SGD, lr 0.1, momentum 0.9, weight decay 1e-4, lr divided by 10 at milestones (default 50% and 75%
of the epochs, the paper's 32k/48k of 64k CIFAR iterations) or when the test error plateaus.
Every epoch writes ``OUT/last.pt`` (resumable) and, when the test top-1 improves, ``OUT/best.pt``,
both atomically; ``OUT/metrics.json`` and ``OUT/curves.png`` follow each epoch.

Runs on one process, or on several under ``torchrun`` (DDP: gloo on CPU, nccl on CUDA). Each
epoch's shuffling and augmentation are seeded by (seed, epoch, rank), so ``--resume`` after an
interruption replays the interrupted epoch exactly as an unbroken run would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from resdeploy.errors import CheckpointError, ConfigError
from resdeploy.fsutil import write_json_atomic
from training import augment
from training.checkpoint import FORMAT, read_checkpoint, save_atomic
from training.data import Dataset, load_dataset
from training.evaluate import center_tensor, predict_probs, topk_accuracy
from training.plots import save_curves
from training.resnet import ARCHS, build_model, canonical_arch

log = logging.getLogger(__name__)
AUGMENTS = ("auto", "cifar", "flip", "imagenet", "none")
SCHEDULES = ("step", "plateau")


@dataclass
class TrainConfig:
    """Everything that defines a run; written to ``OUT/config.json``."""

    arch: str
    dataset: str = "digits"
    out: str = "runs/exp"
    epochs: int = 30
    batch_size: int | None = None  # None: the dataset's default, else 128 (the paper's CIFAR batch)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: list[int] = field(default_factory=list)  # empty: 50% and 75% of epochs
    plateau_patience: int = 3
    warmup_epochs: int = 0  # Sec. 4.2: ResNet-110 starts at lr/10 until training error < 80%
    shortcut: str | None = None
    zero_init_residual: bool = False
    augment: str = "auto"
    input_size: int = 224  # file datasets only; in-memory data keeps its own size
    data_root: str = "data"
    download: bool = False
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA
    limit: int | None = None  # train on the first N images (smoke runs)
    resume: bool = False
    progress: bool | None = None  # None: when stderr is a terminal

    def validate(self) -> None:
        self.arch = canonical_arch(self.arch)
        for name in ("epochs", "batch_size", "workers", "plateau_patience", "input_size"):
            if getattr(self, name) is not None and getattr(self, name) < (0 if name == "workers" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.momentum >= 0 and self.weight_decay >= 0):
            raise ConfigError(f"--lr must be > 0 and --momentum/--weight-decay >= 0 "
                              f"(got {self.lr}, {self.momentum}, {self.weight_decay})")
        if self.schedule not in SCHEDULES or self.augment not in AUGMENTS:
            raise ConfigError(f"--schedule must be one of {SCHEDULES}, --augment one of {AUGMENTS}")
        if self.milestones and self.schedule != "step":
            raise ConfigError("--milestones only applies to --schedule step; drop one of them")
        if any(not 0 < m < self.epochs for m in self.milestones):
            raise ConfigError(f"--milestones {self.milestones} must lie between 1 and --epochs - 1 ({self.epochs - 1})")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"--limit must be at least 2 images, got {self.limit}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs must be in [0, --epochs), got {self.warmup_epochs}")


def _lr_for_epoch(cfg: TrainConfig, epoch: int) -> float:
    milestones = cfg.milestones or [max(1, round(cfg.epochs * 0.5)), max(1, round(cfg.epochs * 0.75))]
    lr = cfg.lr * 0.1 ** sum(epoch >= m for m in milestones)
    return lr * 0.1 if epoch < cfg.warmup_epochs else lr


class _Dist:
    """Rank/world bookkeeping; a no-op outside torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if device in ("auto", "cuda"):
            self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
            if device == "cuda" and not cuda:
                raise ConfigError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
        else:
            self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t.item())

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _batches(ds: Dataset, cfg: TrainConfig, d: _Dist, epoch: int, aug: str, pre, data):
    """Yield augmented (x, y) batches of this rank's shard for one epoch."""
    n = len(ds.train)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / d.world)  # every rank runs the same number of steps (DDP needs it)
    perm = torch.cat([perm, perm[: per_rank * d.world - n]])[d.rank::d.world]
    bs = max(1, cfg.batch_size // d.world)
    steps = max(1, per_rank // bs)  # drop the last partial batch: a batch of 1 breaks BatchNorm
    g_aug = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 104_729 + d.rank)
    if ds.in_memory:
        x_all, y_all = data
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs].to(x_all.device)
            x = x_all[idx]
            if aug in ("cifar", "flip"):
                x = augment.cifar_augment(x, pre, g_aug, pad=0 if aug == "flip" else None)
            else:
                x = augment.normalize_batch(x, pre)
            yield x, y_all[idx]
    else:
        data.epoch = epoch
        loader = torch.utils.data.DataLoader(
            data, batch_size=bs, sampler=perm[: steps * bs].tolist(), num_workers=cfg.workers,
            pin_memory=d.device.type == "cuda", drop_last=True)
        for x, y in loader:
            yield x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)


def _test_metrics(model: nn.Module, ds: Dataset, pre, cache, device) -> dict:
    if cache is not None:
        model.eval()
        with torch.no_grad():
            probs = torch.cat([torch.softmax(model(cache[i:i + 512]).float(), 1).cpu()
                               for i in range(0, len(cache), 512)]).numpy()
    else:
        probs = predict_probs(model, ds.test, pre, "center", device)
    labels = ds.test.labels
    acc = topk_accuracy(probs, labels, (1, min(5, probs.shape[1])))
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"test_loss": loss, "test_top1_error": 100 - acc[1], "test_top5_error": 100 - acc[min(5, probs.shape[1])]}


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.arch`` on ``cfg.dataset``; returns the metrics summary written to metrics.json.

    Raises:
        ConfigError, DatasetError, CheckpointError: bad options, data or resume state.
    """
    cfg.validate()
    out = Path(cfg.out)
    last = out / "last.pt"
    if last.exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    if cfg.resume and not last.exists():
        raise CheckpointError(f"nothing to resume: {last} does not exist; drop --resume to start a new run")
    d = _Dist(cfg.device)
    try:
        return _train(cfg, d, out, last)
    finally:
        d.close()


def _train(cfg: TrainConfig, d: _Dist, out: Path, last: Path) -> dict:
    ds = load_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download and d.main,
                      input_size=cfg.input_size)
    if ds.test_is_train:
        log.warning("%s is a single class tree: its test accuracy is measured on the training images", ds.name)
    if cfg.limit:
        ds.train = ds.train.subset(cfg.limit)
    pre = ds.preprocess
    if cfg.augment == "auto":
        cfg.augment = ds.train_defaults.get("augment", "cifar" if ds.in_memory else "imagenet")
    if cfg.batch_size is None:
        cfg.batch_size = ds.train_defaults.get("batch_size", 128)
    aug = cfg.augment
    if not ds.in_memory and aug not in ("imagenet", "none"):
        raise ConfigError(f"--augment {aug} works on in-memory datasets only; {ds.name} is a file "
                          "dataset: use --augment imagenet or none")
    family = ARCHS[cfg.arch].family
    if family == "imagenet" and pre.crop < 64 or family == "cifar" and pre.crop > 64:
        log.warning("%s is built for %dpx inputs but %s gives %dpx", cfg.arch,
                    ARCHS[cfg.arch].native_input_size, ds.name, pre.crop)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes=len(ds.classes), shortcut=cfg.shortcut,
                        zero_init_residual=cfg.zero_init_residual).to(d.device)
    shortcut = cfg.shortcut or ARCHS[cfg.arch].default_shortcut
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=0.1, patience=cfg.plateau_patience)
               if cfg.schedule == "plateau" else None)
    history: list[dict] = []
    start, best = 0, -1.0
    if cfg.resume:
        ck = read_checkpoint(last)
        if ck.get("arch") != cfg.arch or ck.get("shortcut") != shortcut:
            raise CheckpointError(f"{last} is a {ck.get('arch')} (shortcut {ck.get('shortcut')}) run; "
                                  f"resume it with --arch {ck.get('arch')} or start a new --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if plateau is not None and ck.get("scheduler"):
            plateau.load_state_dict(ck["scheduler"])
        start, best, history = int(ck["epoch"]), float(ck["best_top1"]), list(ck["history"])
        if d.main:
            log.info("resuming %s from epoch %d of %d", last, start, cfg.epochs)
    net = nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
    amp = cfg.amp if cfg.amp is not None else d.device.type == "cuda"
    # fp16 + loss scaling on CUDA; bf16 (no scaling needed) if --amp is forced on CPU.
    amp_dtype = torch.float16 if d.device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and d.device.type == "cuda")
    if ds.in_memory:
        data = (torch.from_numpy(ds.train.images).to(d.device), torch.from_numpy(ds.train.labels).to(d.device))
        cache = center_tensor(ds.test, pre).to(d.device) if d.main else None
    else:
        tf = augment.ImageNetTrainTransform(pre) if aug == "imagenet" else augment.CenterTransform(pre)
        data = augment.FileTrainDataset(ds.train.paths, ds.train.labels, tf, cfg.seed)
        cache = None
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg) | {"shortcut": shortcut}, indent=2))
        log.info("%s on %s: %d train / %d test images, %d classes, %s, %d process(es), batch %d, %s augmentation",
                 cfg.arch, ds.name, len(ds.train), len(ds.test), len(ds.classes), d.device, d.world,
                 cfg.batch_size, aug)
    loss_fn = nn.CrossEntropyLoss()
    from tqdm import tqdm

    for epoch in range(start, cfg.epochs):
        if plateau is None or epoch < cfg.warmup_epochs:
            lr = _lr_for_epoch(cfg, epoch)
            for gr in opt.param_groups:
                gr["lr"] = lr
        elif epoch == cfg.warmup_epochs and cfg.warmup_epochs:
            for gr in opt.param_groups:
                gr["lr"] = cfg.lr
        net.train()
        t0 = time.perf_counter()
        tot = [0.0, 0.0, 0.0, 0.0]  # loss sum, top1 correct, top5 correct, images
        bar = tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", leave=False,
                   total=len(ds.train), disable=not (progress and d.main))
        for x, y in _batches(ds, cfg, d, epoch, aug, pre, data):
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp):
                logits = net(x)
                loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                top = logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]
                tot = [tot[0] + loss.item() * len(y), tot[1] + top[:, 0].sum().item(),
                       tot[2] + top.any(1).sum().item(), tot[3] + len(y)]
            bar.update(len(y) * d.world)
        bar.close()
        tot = d.sum(tot)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": tot[0] / tot[3],
               "train_top1_error": 100 - 100 * tot[1] / tot[3], "train_top5_error": 100 - 100 * tot[2] / tot[3],
               "seconds": seconds, "images_per_s": tot[3] / seconds}
        if d.main:
            row |= _test_metrics(model, ds, pre, cache, d.device)
        test_err = d.broadcast(row.get("test_top1_error", 0.0))
        if plateau is not None and epoch >= cfg.warmup_epochs:
            plateau.step(test_err)
        if d.main:
            history.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
            improved = 100 - row["test_top1_error"] > best
            best = max(best, 100 - row["test_top1_error"])
            with _sigint_deferred():
                _save(cfg, model, ds, pre, shortcut, epoch + 1, best, history, out, last, opt, plateau,
                      improved, d.world)
            log.info("epoch %d/%d  lr %.4g  loss %.4f  train err %.2f%%  test err %.2f%% (top-5 %.2f%%)  "
                     "%.1f s  %.0f img/s%s", epoch + 1, cfg.epochs, row["lr"], row["train_loss"],
                     row["train_top1_error"], row["test_top1_error"], row["test_top5_error"], seconds,
                     row["images_per_s"], "  *best" if improved else "")
    if d.world > 1:
        # Rank 0 is still writing the last epoch's files; a rank that tore down its gloo group
        # first aborted ("terminate called without an active exception", seen in CI).
        dist.barrier()
    return _summary(cfg, ds, history, best, d.world) if history else {}


def _summary(cfg: TrainConfig, ds: Dataset, history: list[dict], best: float, world: int) -> dict:
    best_row = min(history, key=lambda h: h["test_top1_error"])
    return {"arch": cfg.arch, "dataset": ds.name, "world_size": world, "epochs": history,
            "best_epoch": best_row["epoch"], "best_test_top1": round(best, 4),
            "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 3),
            "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1)}


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until an epoch's files are all written, so they always agree with each other."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _save(cfg, model, ds, pre, shortcut, epoch, best, history, out, last, opt, plateau, improved, world) -> None:
    state = {"format": FORMAT, "arch": cfg.arch, "shortcut": shortcut, "num_classes": len(ds.classes),
             "classes": list(ds.classes), "preprocess": pre.to_dict(), "dataset": ds.name,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "epoch": epoch, "best_top1": best, "history": history, "config": asdict(cfg)}
    if improved:
        save_atomic(state, out / "best.pt")
    save_atomic(state | {"optimizer": opt.state_dict(),
                         "scheduler": plateau.state_dict() if plateau is not None else None}, last)
    summary = _summary(cfg, ds, history, best, world)
    write_json_atomic(out / "metrics.json", summary)
    save_curves(history, out / "curves.png", f"{cfg.arch} on {ds.name}")
