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
import torch.distributed as torch_dist
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from core.errors import CheckpointError, ConfigError
from core.fsutil import write_json_atomic
from core.preprocess import PreprocessConfig
from training import augment
from training.checkpoint import FORMAT, read_checkpoint, save_atomic
from training.data import Dataset, load_dataset
from training.evaluate import center_tensor, predict_probs, topk_accuracy
from training.names import AUGMENTS, SCHEDULES  # re-exported: the CLI reads it without torch
from training.plots import save_curves
from training.resnet import ARCHS, build_model, canonical_arch

log = logging.getLogger(__name__)


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
        """Canonicalise ``arch`` and check the options against each other; ConfigError if not."""
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
        if self.world > 1 and not torch_dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch_dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.broadcast(tensor, 0)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@dataclass
class _Run:
    """What a run carries from epoch to epoch; everything a checkpoint is made of."""

    cfg: TrainConfig
    dist: _Dist
    out: Path
    ds: Dataset
    model: nn.Module
    shortcut: str
    optimizer: torch.optim.Optimizer
    plateau: ReduceLROnPlateau | None
    history: list[dict] = field(default_factory=list)
    best: float = -1.0  # best test top-1 accuracy so far (%)
    start_epoch: int = 0

    @property
    def pre(self) -> PreprocessConfig:
        return self.ds.preprocess

    @property
    def last(self) -> Path:
        return self.out / "last.pt"


@dataclass
class _Loop:
    """How one epoch's batches are fed and stepped (not checkpointed)."""

    net: nn.Module  # the model, DDP-wrapped under torchrun
    train_data: tuple[torch.Tensor, torch.Tensor] | augment.FileTrainDataset
    test_cache: torch.Tensor | None  # in-memory test centre crops, on the main rank only
    amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    progress: bool
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)


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
    dist = _Dist(cfg.device)
    try:
        return _train(cfg, dist, out)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: _Dist, out: Path) -> dict:
    """Set up (or resume), then per epoch: lr, one training pass, test, checkpoint and log."""
    run = _setup(cfg, dist, out)
    if cfg.resume:
        _resume(run)
    loop = _make_loop(run)
    _start_output(run)
    for epoch in range(run.start_epoch, cfg.epochs):
        _set_lr(run, epoch)
        row = _train_epoch(run, loop, epoch)
        if dist.main:
            row |= _test_metrics(run, loop.test_cache)
        test_error = dist.broadcast(row.get("test_top1_error", 0.0))
        if run.plateau is not None and epoch >= cfg.warmup_epochs:
            run.plateau.step(test_error)
        if dist.main:
            _record_epoch(run, epoch, row)
    # Rank 0 is still writing the last epoch's files; a rank that tore down its gloo group
    # first aborted ("terminate called without an active exception", seen in CI).
    dist.barrier()
    return _summary(run) if run.history else {}


def _load_data(cfg: TrainConfig, dist: _Dist) -> Dataset:
    """Load the dataset and fill in the options that default per dataset (augment, batch size)."""
    ds = load_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download and dist.main,
                      input_size=cfg.input_size)
    if ds.test_is_train:
        log.warning("%s is a single class tree: its test accuracy is measured on the training images", ds.name)
    if cfg.limit:
        ds.train = ds.train.subset(cfg.limit)
    if cfg.augment == "auto":
        cfg.augment = ds.train_defaults.get("augment", "cifar" if ds.in_memory else "imagenet")
    if cfg.batch_size is None:
        cfg.batch_size = ds.train_defaults.get("batch_size", 128)
    if not ds.in_memory and cfg.augment not in ("imagenet", "none"):
        raise ConfigError(f"--augment {cfg.augment} works on in-memory datasets only; {ds.name} is a file "
                          "dataset: use --augment imagenet or none")
    arch, crop = ARCHS[cfg.arch], ds.preprocess.crop
    if arch.family == "imagenet" and crop < 64 or arch.family == "cifar" and crop > 64:
        log.warning("%s is built for %dpx inputs but %s gives %dpx", cfg.arch, arch.native_input_size, ds.name, crop)
    return ds


def _setup(cfg: TrainConfig, dist: _Dist, out: Path) -> _Run:
    """Data, a freshly seeded model, the optimizer and (for ``--schedule plateau``) its scheduler."""
    ds = _load_data(cfg, dist)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes=len(ds.classes), shortcut=cfg.shortcut,
                        zero_init_residual=cfg.zero_init_residual).to(dist.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    plateau = (ReduceLROnPlateau(optimizer, "min", factor=0.1, patience=cfg.plateau_patience)
               if cfg.schedule == "plateau" else None)
    return _Run(cfg, dist, out, ds, model, cfg.shortcut or ARCHS[cfg.arch].default_shortcut, optimizer, plateau)


def _resume(run: _Run) -> None:
    """Load model, optimizer, scheduler, history and best accuracy from ``last.pt``."""
    checkpoint = read_checkpoint(run.last)
    if checkpoint.get("arch") != run.cfg.arch or checkpoint.get("shortcut") != run.shortcut:
        raise CheckpointError(f"{run.last} is a {checkpoint.get('arch')} (shortcut {checkpoint.get('shortcut')}) "
                              f"run; resume it with --arch {checkpoint.get('arch')} or start a new --out")
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if run.plateau is not None and checkpoint.get("scheduler"):
        run.plateau.load_state_dict(checkpoint["scheduler"])
    run.start_epoch, run.best = int(checkpoint["epoch"]), float(checkpoint["best_top1"])
    run.history = list(checkpoint["history"])
    if run.dist.main:
        log.info("resuming %s from epoch %d of %d", run.last, run.start_epoch, run.cfg.epochs)


def _make_loop(run: _Run) -> _Loop:
    """Wrap the model for DDP, choose mixed precision and stage the training and test data."""
    cfg, ds, device = run.cfg, run.ds, run.dist.device
    net = nn.parallel.DistributedDataParallel(run.model) if run.dist.world > 1 else run.model
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    # fp16 + loss scaling on CUDA; bf16 (no scaling needed) if --amp is forced on CPU.
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    if ds.in_memory:
        train_data = (torch.from_numpy(ds.train.images).to(device), torch.from_numpy(ds.train.labels).to(device))
        test_cache = center_tensor(ds.test, run.pre).to(device) if run.dist.main else None
    else:
        transform = (augment.ImageNetTrainTransform(run.pre) if cfg.augment == "imagenet"
                     else augment.CenterTransform(run.pre))
        train_data = augment.FileTrainDataset(ds.train.paths, ds.train.labels, transform, cfg.seed)
        test_cache = None
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    return _Loop(net, train_data, test_cache, amp, amp_dtype, scaler, progress)


def _start_output(run: _Run) -> None:
    """Create the output folder, write ``config.json`` and log what is about to be trained."""
    if not run.dist.main:
        return
    cfg, ds = run.cfg, run.ds
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.json").write_text(json.dumps(asdict(cfg) | {"shortcut": run.shortcut}, indent=2))
    log.info("%s on %s: %d train / %d test images, %d classes, %s, %d process(es), batch %d, %s augmentation",
             cfg.arch, ds.name, len(ds.train), len(ds.test), len(ds.classes), run.dist.device, run.dist.world,
             cfg.batch_size, cfg.augment)


def _set_lr(run: _Run, epoch: int) -> None:
    """Step schedule (and warm-up) by epoch; under plateau only the end of warm-up is set here."""
    cfg = run.cfg
    if run.plateau is None or epoch < cfg.warmup_epochs:
        lr = _lr_for_epoch(cfg, epoch)
    elif epoch == cfg.warmup_epochs and cfg.warmup_epochs:
        lr = cfg.lr
    else:
        return
    for group in run.optimizer.param_groups:
        group["lr"] = lr


def _train_epoch(run: _Run, loop: _Loop, epoch: int) -> dict:
    """One pass over this rank's shard; returns the epoch's training metrics summed over ranks."""
    from tqdm import tqdm

    cfg, dist = run.cfg, run.dist
    loop.net.train()
    started = time.perf_counter()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 correct, top-5 correct, images
    bar = tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", leave=False,
               total=len(run.ds.train), disable=not (loop.progress and dist.main))
    for x, y in _batches(run, loop.train_data, epoch):
        with torch.autocast(dist.device.type, dtype=loop.amp_dtype, enabled=loop.amp):
            logits = loop.net(x)
            loss = loop.loss_fn(logits, y)
        run.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(run.optimizer)
        loop.scaler.update()
        with torch.no_grad():
            hits = logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]
            sums = [sums[0] + loss.item() * len(y), sums[1] + hits[:, 0].sum().item(),
                    sums[2] + hits.any(1).sum().item(), sums[3] + len(y)]
        bar.update(len(y) * dist.world)
    bar.close()
    loss_sum, top1, top5, images = dist.sum(sums)
    seconds = time.perf_counter() - started
    return {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / images,
            "train_top1_error": 100 - 100 * top1 / images, "train_top5_error": 100 - 100 * top5 / images,
            "seconds": seconds, "images_per_s": images / seconds}


def _shard(run: _Run, epoch: int) -> tuple[torch.Tensor, int, int]:
    """This rank's shuffled image indices for ``epoch``, its per-rank batch size and step count."""
    cfg, dist, n = run.cfg, run.dist, len(run.ds.train)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    per_rank = math.ceil(n / dist.world)  # every rank runs the same number of steps (DDP needs it)
    order = torch.cat([order, order[: per_rank * dist.world - n]])[dist.rank::dist.world]
    batch = max(1, cfg.batch_size // dist.world)
    steps = max(1, per_rank // batch)  # drop the last partial batch: a batch of 1 breaks BatchNorm
    return order, batch, steps


def _batches(run: _Run, train_data, epoch: int):
    """Yield augmented (x, y) batches of this rank's shard for one epoch."""
    cfg, dist = run.cfg, run.dist
    order, batch, steps = _shard(run, epoch)
    if not run.ds.in_memory:
        train_data.epoch = epoch
        loader = torch.utils.data.DataLoader(
            train_data, batch_size=batch, sampler=order[: steps * batch].tolist(), num_workers=cfg.workers,
            pin_memory=dist.device.type == "cuda", drop_last=True)
        for x, y in loader:
            yield x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
        return
    images, labels = train_data
    aug_generator = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 104_729 + dist.rank)
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch].to(images.device)
        if cfg.augment in ("cifar", "flip"):
            pad = 0 if cfg.augment == "flip" else None
            yield augment.cifar_augment(images[idx], run.pre, aug_generator, pad=pad), labels[idx]
        else:
            yield augment.normalize_batch(images[idx], run.pre), labels[idx]


def _test_metrics(run: _Run, cache: torch.Tensor | None) -> dict:
    """Test loss and top-1/top-5 error (%) with the serving centre crop."""
    model, ds = run.model, run.ds
    if cache is not None:
        model.eval()
        with torch.no_grad():
            probs = torch.cat([torch.softmax(model(cache[i:i + 512]).float(), 1).cpu()
                               for i in range(0, len(cache), 512)]).numpy()
    else:
        probs = predict_probs(model, ds.test, run.pre, "center", run.dist.device)
    labels, top5 = ds.test.labels, min(5, probs.shape[1])
    accuracy = topk_accuracy(probs, labels, (1, top5))
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"test_loss": loss, "test_top1_error": 100 - accuracy[1], "test_top5_error": 100 - accuracy[top5]}


def _record_epoch(run: _Run, epoch: int, row: dict) -> None:
    """Main rank: append to the history, write the epoch's files and log the epoch line."""
    run.history.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
    improved = 100 - row["test_top1_error"] > run.best
    run.best = max(run.best, 100 - row["test_top1_error"])
    with _sigint_deferred():
        _save(run, epoch + 1, improved)
    log.info("epoch %d/%d  lr %.4g  loss %.4f  train err %.2f%%  test err %.2f%% (top-5 %.2f%%)  "
             "%.1f s  %.0f img/s%s", epoch + 1, run.cfg.epochs, row["lr"], row["train_loss"],
             row["train_top1_error"], row["test_top1_error"], row["test_top5_error"], row["seconds"],
             row["images_per_s"], "  *best" if improved else "")


def _summary(run: _Run) -> dict:
    """The metrics.json content: per-epoch history, best epoch, mean speed."""
    history = run.history
    best_row = min(history, key=lambda h: h["test_top1_error"])
    return {"arch": run.cfg.arch, "dataset": run.ds.name, "world_size": run.dist.world, "epochs": history,
            "best_epoch": best_row["epoch"], "best_test_top1": round(run.best, 4),
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


def _save(run: _Run, epoch: int, improved: bool) -> None:
    """Write ``best.pt`` (if ``improved``), ``last.pt``, ``metrics.json`` and ``curves.png``."""
    cfg, ds = run.cfg, run.ds
    state = {"format": FORMAT, "arch": cfg.arch, "shortcut": run.shortcut, "num_classes": len(ds.classes),
             "classes": list(ds.classes), "preprocess": run.pre.to_dict(), "dataset": ds.name,
             "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
             "epoch": epoch, "best_top1": run.best, "history": run.history, "config": asdict(cfg)}
    if improved:
        save_atomic(state, run.out / "best.pt")
    save_atomic(state | {"optimizer": run.optimizer.state_dict(),
                         "scheduler": run.plateau.state_dict() if run.plateau is not None else None}, run.last)
    write_json_atomic(run.out / "metrics.json", _summary(run))
    save_curves(run.history, run.out / "curves.png", f"{cfg.arch} on {ds.name}")
