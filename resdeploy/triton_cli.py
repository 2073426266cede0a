"""``resdeploy triton``: a Triton Inference Server model repository from an artifact directory (export/triton.py)."""

from __future__ import annotations

import argparse

from resdeploy.cliargs import non_negative, positive

EPILOG = """examples:
  resdeploy triton artifacts/digits --out triton-repo
  resdeploy triton artifacts/r50 --out /models --name resnet50 --precisions fp16,int8-cpu --max-batch 80
  resdeploy triton artifacts/r50 --out /models --device gpu --instances 2 --overwrite --print-config
  tritonserver --model-repository triton-repo

One model per ONNX Runtime file (onnxruntime_onnx) and per TensorRT engine (tensorrt_plan; export --trt):
NAME for fp32, NAME_<precision> for the other ONNX files, NAME_<precision>_plan for engines.
TensorRT's int8 ONNX and model.pt are skipped. Every file is checked against the manifest's sha256."""


def cmd_triton(args) -> int:
    from export.triton import TritonOptions, write_repository

    opts = TritonOptions(artifacts=args.artifacts, out=args.out, name=args.name, precisions=args.precisions,
                         max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
                         instances=args.instances, device=args.device, overwrite=args.overwrite)
    out, models = write_repository(opts)
    for m in models:
        print(m.summary())
        if args.print_config:
            print(m.pbtxt)
    print(f"wrote {out} ({len(models)} models); serve it with: tritonserver --model-repository {out}")
    return 0


def register(sub) -> None:
    """Add ``triton`` to the ``resdeploy`` parser."""
    from resdeploy.export_cli import _precisions

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository from an artifact directory",
                       description="Write a Triton model repository (config.pbtxt, labels.txt, 1/model.onnx or "
                                   "1/model.plan per model) from a verified artifact directory; built beside "
                                   "--out and moved into place when complete.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", metavar="ARTIFACT_DIR", help="a directory written by `resdeploy export`")
    p.add_argument("--out", required=True, metavar="REPO_DIR", help="the model repository to write")
    p.add_argument("--name", help="the fp32 model's name and the others' prefix (default: the manifest's "
                                  "ARCH_DATASET, e.g. resnet20_digits; letters, digits, '_', '.', '-')")
    p.add_argument("--precisions", type=_precisions, help="comma-separated flavours to write (default: all that qualify)")
    p.add_argument("--max-batch", type=positive(int), default=40,
                   help="max_batch_size, a multiple of 10 and at most an engine's (default 40, as the service)")
    p.add_argument("--max-queue-delay-us", type=non_negative(int), default=2000,
                   help="dynamic batching queue delay in microseconds (default 2000)")
    p.add_argument("--instances", type=positive(int), default=1, help="instances per model (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="instance kind of the ONNX models: auto (KIND_CPU for int8-cpu, else KIND_AUTO; default), "
                        "cpu or gpu; engines are always KIND_GPU")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--print-config", action="store_true", help="also print each config.pbtxt")
    p.set_defaults(func=cmd_triton)
