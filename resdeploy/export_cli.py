"""``resdeploy export``: checkpoint -> verified artifact directory."""

from __future__ import annotations

import argparse
import sys

from core.flavours import INT8, INT8_CPU, PRECISIONS
from core.preprocess import PREPROCESS_FLAGS
from export.options import CALIB_METHODS, OVERFLOW_FIXES, SENSITIVITY_MODES, ExportOptions, Int8Options
from resdeploy.cliargs import add_preprocess_flags, arch, non_negative, positive


def _precisions(value: str) -> list[str]:
    vals = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in vals if v not in PRECISIONS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {', '.join(map(repr, bad)) or repr(value)}; "
                                         f"choose from {','.join(PRECISIONS)}")
    return vals


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def percentage(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 100:
        raise argparse.ArgumentTypeError(f"'{value}' is not a percentage in [0, 100], e.g. 98")
    return v


def _triton_options(args):
    """``--triton-repo``'s writer options, checked before the export starts: the repository may be
    replaced only when it is one (every entry a model folder with config.pbtxt)."""
    from core.errors import ConfigError
    from export.triton import TritonOptions, check_out, is_model_repository, validate

    if args.trt and args.max_batch < 10:
        raise ConfigError(f"--triton-repo batches in tens: with --trt pass --max-batch >= 10, not {args.max_batch}")
    opts = TritonOptions(artifacts=args.out, out=args.triton_repo, max_batch=max(10, args.max_batch // 10 * 10),
                         overwrite=is_model_repository(args.triton_repo))
    validate(opts)
    check_out(opts.out, opts.artifacts, opts.overwrite, "--triton-repo",
              "it is not a model repository (those are replaced); choose another --triton-repo")
    return opts


def cmd_export(args) -> int:
    from export.pipeline import run_export

    triton = _triton_options(args) if args.triton_repo else None
    flags = {k: getattr(args, k) for k in PREPROCESS_FLAGS}
    opts = ExportOptions(
        checkpoint=args.checkpoint, out=args.out, arch=args.arch, precisions=args.precisions,
        calib_data=args.calib_data, calib_images=args.calib_images, calib_method=args.calib_method,
        eval_data=args.eval_data, eval_images=args.eval_images, labels=args.labels, trt=args.trt,
        max_batch=args.max_batch, workspace_gib=args.workspace_gib, accept_accuracy_drop=args.accept_accuracy_drop,
        num_classes=args.num_classes, shortcut=args.shortcut, data_root=args.data_root,
        progress=args.progress, preprocess_flags=flags, bento_model=args.bento_model,
        int8=Int8Options(overflow_fix=args.overflow_fix, keep_float=args.keep_float, fallback=args.fallback,
                         max_float_layers=args.max_float_layers, sensitivity=args.sensitivity,
                         sensitivity_images=args.sensitivity_images),
        int8_min_agreement=args.int8_min_agreement, report_only=args.report_only)
    result = run_export(opts, report=print)
    if result.sensitivity_report is not None:
        print(f"wrote {result.sensitivity_report} (per-layer INT8 sensitivity; no artifacts were written). Keep "
              f"layers in float with: resdeploy export {args.checkpoint} --out DIR --keep-float NAME,…")
        return 0
    manifest = result.manifest
    files = ", ".join(a.file for a in manifest.artifacts)
    print(f"wrote {args.out}: {files}, labels.json, manifest.json ({manifest.timings_s['total']:.1f} s)")
    if result.bento_model:
        print(f"saved BentoML model {result.bento_model}; build the service image with: "
              f"RESDEPLOY_BENTO_MODEL={result.bento_model} bentoml build")
    if triton is not None:
        from export.triton import write_repository

        repo, models = write_repository(triton)
        print(f"wrote Triton model repository {repo}: {', '.join(m.name for m in models)}")
    if manifest.accepted_accuracy_drop:
        print("warning: some artifacts are over their accuracy budget (accepted with --accept-accuracy-drop)",
              file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``export`` to the ``resdeploy`` parser."""
    from training.names import SHORTCUTS

    p = sub.add_parser("export", help="BN-folded ONNX, FP16, INT8 (and TensorRT engines) behind an accuracy gate")
    p.add_argument("checkpoint", help="a resdeploy checkpoint or an imported state_dict (.pt/.pth)")
    p.add_argument("--arch", type=arch, help="required for checkpoints that do not record it")
    p.add_argument("--out", required=True, help="artifact directory (replaced atomically when complete)")
    p.add_argument("--precisions", type=_precisions, default=list(PRECISIONS),
                   help=f"comma-separated subset of {','.join(PRECISIONS)} (default: all; must include fp32)")
    p.add_argument("--calib-data", help="dataset for INT8 calibration (default: the checkpoint's training data)")
    p.add_argument("--calib-images", type=positive(int), default=128, help="calibration images (default 128)")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default="percentile",
                   help="activation ranges: percentile (99.999th, default), entropy (KL, 2048 bins), minmax")
    g = p.add_argument_group("INT8 accuracy (docs/design.md#int8)")
    g.add_argument("--int8-min-agreement", type=percentage, metavar="PCT",
                   help="an INT8 file must give FP32's top-1 class on at least PCT%% of the gate images (default 98)")
    g.add_argument("--no-fallback", dest="fallback", action="store_false",
                   help="fail instead of keeping the most sensitive layers in float when INT8 misses its budget")
    g.add_argument("--max-float-layers", type=non_negative(int), default=5, metavar="N",
                   help="at most N Conv/Gemm layers in float after the fallback, --keep-float ones included (default 5)")
    g.add_argument("--keep-float", type=_names, default=[], metavar="NAME,…",
                   help="layers always kept in float, by module name (e.g. conv1,fc) or ONNX node name")
    g.add_argument("--overflow-fix", choices=OVERFLOW_FIXES,
                   help="7-bit weights against u8*s8 overflow on x86 CPUs without VNNI "
                        f"(default: first-layer for {INT8_CPU.name}, none for {INT8.name})")
    g.add_argument("--sensitivity", choices=SENSITIVITY_MODES, default="auto",
                   help="per-layer sensitivity: auto (when a flavour misses its budget), on, off")
    g.add_argument("--sensitivity-images", type=positive(int), default=500, metavar="N",
                   help="gate images used per layer for sensitivity (default 500)")
    g.add_argument("--report-only", action="store_true",
                   help="only print and write OUT/sensitivity.json: which layers INT8 hurts; no artifacts")
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
    p.add_argument("--shortcut", choices=SHORTCUTS, help="default: from the checkpoint or the arch")
    p.add_argument("--bento-model", metavar="NAME",
                   help="also store the finished directory in the local BentoML model store as NAME "
                        "(lowercase letters, digits, '-', '_', '.'; e.g. resdeploy-digits)")
    p.add_argument("--triton-repo", metavar="DIR",
                   help="also write a Triton model repository of the result here (as `resdeploy triton OUT "
                        "--out DIR`; an existing repository is replaced)")
    p.add_argument("--data-root", default="data", help="where 'cifar10' is looked for")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    add_preprocess_flags(p)
    p.set_defaults(func=cmd_export)
