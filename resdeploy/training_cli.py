"""Sub-commands of the training stage: ``models``, ``train``, ``eval`` and ``compare``.

Heavy imports (torch) happen inside the command functions so ``resdeploy --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from core.errors import ConfigError
from core.fsutil import write_json_atomic
from core.preprocess import resolve_preprocess
from resdeploy.cliargs import add_preprocess_flags, arch, int_list, positive

log = logging.getLogger(__name__)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="'digits' (embedded, offline; default), 'cifar10', "
                   "or a directory: ImageFolder (train/ and val/ of class folders), a class tree (DIR/<class>/*.jpg, "
                   "e.g. ImageNet's val/; train and test are then the same images) or cifar-10-batches-py")
    p.add_argument("--data-root", default="data", help="where 'cifar10' is looked for (default: data)")
    p.add_argument("--download", action="store_true", help="allow downloading CIFAR-10 (170 MB, MD5-checked)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: shown when stderr is a terminal)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from training.names import AUGMENTS, SCHEDULES, SHORTCUTS

    _add_data_flags(p)
    p.add_argument("--epochs", type=positive(int), default=30)
    p.add_argument("--batch-size", type=positive(int), help="global, split across DDP ranks "
                   "(default: 128, the paper's; 32 for digits)")
    p.add_argument("--lr", type=positive(float), default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=SCHEDULES, default="step",
                   help="step: lr/10 at --milestones; plateau: lr/10 when test error stops improving")
    p.add_argument("--milestones", type=int_list, default=[], help="epochs, e.g. 15,22 (default: 50%% and 75%%)")
    p.add_argument("--plateau-patience", type=positive(int), default=3)
    p.add_argument("--warmup-epochs", type=int, default=0, help="epochs at lr/10 first (paper: ResNet-110)")
    p.add_argument("--shortcut", choices=SHORTCUTS, help="default: A for CIFAR nets, B for ImageNet nets")
    p.add_argument("--zero-init-residual", action="store_true", help="zero the last BN of each residual block")
    p.add_argument("--augment", choices=AUGMENTS, default="auto",
                   help="auto: the dataset's default (digits: flip), else cifar (pad-crop-flip) for "
                   "in-memory data (CIFAR) and imagenet (scale + colour) for image folders")
    p.add_argument("--input-size", type=positive(int), default=224, help="network input for file datasets")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes for file datasets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--limit", type=positive(int), help="train on the first N images only (smoke runs)")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt from its last complete epoch")


def _config(args, arch: str, out: str):
    from training.train import TrainConfig

    keys = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: getattr(args, k) for k in keys if hasattr(args, k)} | {"arch": arch, "out": out})


def cmd_models(args) -> int:
    from training.flops import format_models_table, models_table

    rows = models_table()
    print(json.dumps(rows, indent=2) if args.json else format_models_table(rows))
    return 0


def cmd_train(args) -> int:
    from training.train import train

    out = args.out or f"runs/{args.arch}-{Path(args.dataset).name}"
    try:
        summary = train(_config(args, args.arch, out))
    except KeyboardInterrupt:
        print(f"resdeploy train: interrupted; {out}/last.pt holds the last complete epoch. Continue with: "
              f"resdeploy train --arch {args.arch} --dataset {args.dataset} --out {out} --resume", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    if summary:
        print(f"best test top-1 {summary['best_test_top1']:.2f}% at epoch {summary['best_epoch']}; "
              f"{summary['seconds_per_epoch']:.1f} s/epoch, {summary['images_per_s']:.0f} train img/s")
    print(f"wrote {out}/best.pt, last.pt, metrics.json, curves.png\n"
          f"next: resdeploy eval {out}/best.pt --arch {args.arch} --dataset {args.dataset} --tta ten_crop")
    return 0


def cmd_eval(args) -> int:
    import torch

    from training.checkpoint import restore_model
    from training.data import load_dataset
    from training.evaluate import evaluate

    restored = restore_model(args.checkpoint, args.arch, num_classes=args.num_classes, shortcut=args.shortcut)
    ds = load_dataset(args.dataset, data_root=args.data_root, download=args.download,
                      input_size=args.input_size or 224)
    if restored.num_classes != len(ds.classes):
        raise ConfigError(f"the checkpoint predicts {restored.num_classes} classes but {ds.name} has "
                          f"{len(ds.classes)}; evaluate it on a dataset with the same classes")
    if restored.classes and list(restored.classes) != ds.classes:
        log.warning("the checkpoint's classes (%s) differ from %s's (%s); labels follow the dataset's order",
                    ", ".join(restored.classes[:4]), ds.name, ", ".join(ds.classes[:4]))
    pre = resolve_preprocess(restored.preprocess, ds.preprocess, vars(args), args.checkpoint)
    split = ds.test.subset(args.limit) if args.limit else ds.test
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    res = evaluate(restored.model.to(device), split, pre, args.tta, device, progress=args.progress is not False
                   and sys.stderr.isatty())
    res |= {"arch": restored.arch, "dataset": ds.name, "checkpoint": str(args.checkpoint), "preprocess": pre.to_dict()}
    print(f"{restored.arch} on {ds.name} ({res['n']} images, {args.tta}): top-1 {res['top1']:.2f}% "
          f"(error {res['top1_error']:.2f}%), top-5 {res['top5']:.2f}% (error {res['top5_error']:.2f}%)")
    if args.json:
        write_json_atomic(args.json, res)
    return 0


def cmd_compare(args) -> int:
    from training.compare import format_table, run_compare

    res = run_compare(args.depths, _config(args, "resnet20", args.out))
    print(format_table(res["table"]))
    print(f"wrote {res['figure']} and {Path(args.out) / 'compare.json'}")
    return 0


def register(sub) -> None:
    """Add the training-stage sub-commands to the ``resdeploy`` parser."""
    from training.names import EVAL_TTA, SHORTCUTS

    p = sub.add_parser("models", help="list every architecture with parameters and GFLOPs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a network (the paper's recipe by default)")
    p.add_argument("--arch", type=arch, required=True, help="e.g. resnet20, resnet50, plain20 (see `models`)")
    p.add_argument("--out", help="run directory (default: runs/ARCH-DATASET)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint with centre, 10-crop or multi-scale testing")
    p.add_argument("checkpoint", help="a resdeploy checkpoint or an imported state_dict (.pt/.pth)")
    p.add_argument("--arch", type=arch, help="required for checkpoints that do not record it")
    p.add_argument("--tta", choices=EVAL_TTA, default="center")
    p.add_argument("--json", help="write {top1, top5, n, tta, ...} here")
    p.add_argument("--num-classes", type=positive(int), help="default: from the checkpoint")
    p.add_argument("--shortcut", choices=SHORTCUTS, help="default: from the checkpoint or the arch")
    add_preprocess_flags(p)
    p.add_argument("--limit", type=positive(int), help="evaluate the first N test images only")
    _add_data_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="degradation experiment: plain nets vs their residual twins")
    p.add_argument("--depths", type=int_list, default=[20], help="comma-separated, e.g. 20,56 (default 20)")
    p.add_argument("--out", default="runs/compare")
    _add_train_flags(p)
    p.set_defaults(func=cmd_compare, epochs=10)
