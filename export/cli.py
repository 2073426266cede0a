"""``resdeploy export``: checkpoint -> verified artifact directory."""

from __future__ import annotations

import argparse
import sys

from resdeploy.cliargs import PREPROCESS_FLAGS, add_preprocess_flags, arch, positive
from serving.artifacts import PRECISIONS


def _precisions(value: str) -> list[str]:
    vals = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in vals if v not in PRECISIONS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {', '.join(map(repr, bad)) or repr(value)}; "
                                         f"choose from {','.join(PRECISIONS)}")
    return vals


def cmd_export(args) -> int:
    from export.pipeline import ExportOptions, run_export

    flags = {k: getattr(args, k) for k in PREPROCESS_FLAGS}
    opts = ExportOptions(
        checkpoint=args.checkpoint, out=args.out, arch=args.arch, precisions=args.precisions,
        calib_data=args.calib_data, calib_images=args.calib_images, calib_method=args.calib_method,
        eval_data=args.eval_data, eval_images=args.eval_images, labels=args.labels, trt=args.trt,
        max_batch=args.max_batch, workspace_gib=args.workspace_gib, accept_accuracy_drop=args.accept_accuracy_drop,
        num_classes=args.num_classes, shortcut=args.shortcut, data_root=args.data_root,
        progress=args.progress, preprocess_flags=flags, bento_model=args.bento_model)
    m = run_export(opts)
    files = ", ".join(a["file"] for a in m["artifacts"])
    print(f"wrote {args.out}: {files}, labels.json, manifest.json ({m['timings_s']['total']:.1f} s)")
    if m.get("bento_model"):
        print(f"saved BentoML model {m['bento_model']}; build the service image with: "
              f"RESDEPLOY_BENTO_MODEL={m['bento_model']} bentoml build")
    if m["accepted_accuracy_drop"]:
        print("warning: some artifacts are over their accuracy budget (accepted with --accept-accuracy-drop)",
              file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``export`` to the ``resdeploy`` parser."""
    p = sub.add_parser("export", help="BN-folded ONNX, FP16, INT8 (and TensorRT engines) behind an accuracy gate")
    p.add_argument("checkpoint", help="a resdeploy checkpoint or an imported state_dict (.pt/.pth)")
    p.add_argument("--arch", type=arch, help="required for checkpoints that do not record it")
    p.add_argument("--out", required=True, help="artifact directory (replaced atomically when complete)")
    p.add_argument("--precisions", type=_precisions, default=list(PRECISIONS),
                   help=f"comma-separated subset of {','.join(PRECISIONS)} (default: all; must include fp32)")
    p.add_argument("--calib-data", help="dataset for INT8 calibration (default: the checkpoint's training data)")
    p.add_argument("--calib-images", type=positive(int), default=128, help="calibration images (default 128)")
    p.add_argument("--calib-method", choices=("percentile", "entropy", "minmax"), default="percentile",
                   help="activation ranges: percentile (99.999th, default), entropy (KL, 2048 bins), minmax")
    p.add_argument("--eval-data", help="dataset whose test split gates accuracy (default: the calibration data)")
    p.add_argument("--eval-images", type=positive(int), default=1000, help="gate on at most N images (default 1000)")
    p.add_argument("--labels", help="class names: a JSON list or one per line (default: the checkpoint's)")
    p.add_argument("--trt", action="store_true", help="also build TensorRT engines (needs TensorRT and a GPU)")
    p.add_argument("--max-batch", type=positive(int), default=40,
                   help="largest engine batch, in crops (default 40: four 10-crop requests)")
    p.add_argument("--workspace-gib", type=positive(float), default=4.0, help="TensorRT builder workspace")
    p.add_argument("--accept-accuracy-drop", action="store_true",
                   help="install artifacts even when over their accuracy budget (recorded in the manifest)")
    p.add_argument("--num-classes", type=positive(int), help="default: from the checkpoint")
    p.add_argument("--shortcut", choices=("A", "B", "C"), help="default: from the checkpoint or the arch")
    p.add_argument("--bento-model", metavar="NAME",
                   help="also store the finished directory in the local BentoML model store as NAME "
                        "(lowercase letters, digits, '-', '_', '.'; e.g. resdeploy-digits)")
    p.add_argument("--data-root", default="data", help="where 'cifar10' is looked for")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    add_preprocess_flags(p)
    p.set_defaults(func=cmd_export)
