"""PyTorch -> FP32 ONNX with a dynamic batch axis, checked.

Uses the dynamo exporter (torch's default since 2.9; needs onnxscript) and saves one
self-contained file (weights inline: every ResNet is far below protobuf's 2 GiB limit, so there
is no ``.onnx.data`` sidecar to lose). The example batch is 2: exporting with batch 1 can fix the
batch dimension at 1 silently (docs/design.md), so we also assert it came out symbolic.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from core.errors import ExportError, first_line

INPUT_NAME, OUTPUT_NAME = "input", "logits"
OPSET = 20
log = logging.getLogger(__name__)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type of the main graph."""
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def batch_dim(model: onnx.ModelProto) -> str | int:
    """The batch dimension of the first input: a name (symbolic) or a fixed int."""
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_param or d.dim_value


def export_fp32(model: nn.Module, path: str | os.PathLike, input_size: int, opset: int = OPSET) -> Path:
    """Export a BN-folded, eval-mode model to ``path``; check it and return the path.

    Raises:
        ExportError: the exporter failed, the checker rejected the graph, BatchNormalization
            nodes remain, or the batch axis is not symbolic.
    """
    path = Path(path)
    example = torch.randn(2, 3, input_size, input_size)
    # The dynamo exporter warns about torchvision ops it cannot find; we have none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.eval(), (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False)
        program.save(str(path), external_data=False)
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}") from e
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph fails onnx.checker: {first_line(e)}") from e
    ops = op_counts(proto)
    if ops.get("BatchNormalization", 0):
        raise ExportError(f"{ops['BatchNormalization']} BatchNormalization nodes survived folding")
    if not isinstance(batch_dim(proto), str):
        raise ExportError(f"the batch axis came out fixed at {batch_dim(proto)}, not symbolic")
    return path
