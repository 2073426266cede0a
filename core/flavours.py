"""The flavour table: every artifact precision resdeploy writes, what it is and who runs it.

"Precision" in a manifest, a file name or ``--precisions`` names a *flavour*: a number format
plus the form that format takes for its runtime. Two flavours share the int8 number format:

* ``int8``: TensorRT's form, symmetric int8 Q/DQ (s8s8) pairs TensorRT fuses into int8 kernels.
* ``int8-cpu``: ONNX Runtime's x86 form, uint8 activations and int8 per-channel weights (u8s8),
  the pattern its CPU kernels fuse.

Everything that needs a list of precisions, a runtime's file or a gate budget reads it here:
the export pipeline, the gate, the service, argparse ``choices=`` and the bench.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from core.errors import ConfigError

ONNXRUNTIME, TENSORRT, PYTORCH = "onnxruntime", "tensorrt", "pytorch"
RUNTIME_NAMES = {ONNXRUNTIME: "ONNX Runtime", TENSORRT: "TensorRT", PYTORCH: "PyTorch"}


@dataclass(frozen=True)
class Budget:
    """How far an artifact may stray from PyTorch FP32 on the gate images (docs/design.md).

    Attributes:
        min_agreement: % of images whose top-1 class equals PyTorch FP32's.
        min_top1_ratio: top-1 at least this fraction of PyTorch FP32's (labelled data only).
        max_logit_diff: largest |logit - PyTorch logit| allowed.
    """

    min_agreement: float
    min_top1_ratio: float | None = None
    max_logit_diff: float | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Flavour:
    """One row of the table.

    Attributes:
        name: the precision key of manifests, file names, flags and the gate.
        number_format: ``fp32`` | ``fp16`` | ``int8`` (what ``RESDEPLOY_PRECISION`` names).
        runtimes: the runtimes the file is made for.
        quantization: the Q/DQ form of an int8 flavour, ``None`` for float ones.
        budget: the gate's default budget.
    """

    name: str
    number_format: str
    runtimes: tuple[str, ...]
    quantization: str | None
    budget: Budget

    @property
    def onnx_file(self) -> str:
        return f"model.{self.name}.onnx"

    @property
    def engine_file(self) -> str:
        return f"model.{self.name}.plan"

    @property
    def runtime_names(self) -> str:
        return " and ".join(RUNTIME_NAMES[r] for r in self.runtimes)

    @property
    def is_int8(self) -> bool:
        return self.number_format == "int8"

    @property
    def builds_engine(self) -> bool:
        return TENSORRT in self.runtimes


FP32 = Flavour("fp32", "fp32", (ONNXRUNTIME, TENSORRT), None, Budget(99.9, max_logit_diff=1e-3))
FP16 = Flavour("fp16", "fp16", (ONNXRUNTIME, TENSORRT), None, Budget(99.0, min_top1_ratio=0.995))
INT8 = Flavour("int8", "int8", (TENSORRT,), "symmetric s8s8 Q/DQ", Budget(98.0, min_top1_ratio=0.99))
INT8_CPU = Flavour("int8-cpu", "int8", (ONNXRUNTIME,), "u8s8 Q/DQ", Budget(98.0, min_top1_ratio=0.99))

FLAVOURS: dict[str, Flavour] = {f.name: f for f in (FP32, FP16, INT8, INT8_CPU)}
PRECISIONS = tuple(FLAVOURS)
INT8_FLAVOURS = tuple(f.name for f in FLAVOURS.values() if f.is_int8)
ENGINE_PRECISIONS = tuple(f.name for f in FLAVOURS.values() if f.builds_engine)
NUMBER_FORMATS = tuple(dict.fromkeys(f.number_format for f in FLAVOURS.values()))


def flavour(name: str) -> Flavour:
    """The row of ``name``.

    Raises:
        ConfigError: an unknown name; the message lists the table.
    """
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ConfigError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}") from None


def for_runtime(number_format: str, runtime: str, cpu_only: bool = False) -> Flavour:
    """The flavour a runtime loads for a number format.

    On ONNX Runtime with only the CPU provider, ``int8`` is the flavour made for ONNX Runtime (its
    x86 kernels fuse that form; they run TensorRT's form only unfused, several times slower). Else
    the flavour named after the number format.

    Raises:
        ConfigError: an unknown number format.
    """
    if number_format not in NUMBER_FORMATS:
        raise ConfigError(f"unknown precision {number_format!r}: choose one of {', '.join(NUMBER_FORMATS)}")
    if runtime == ONNXRUNTIME and cpu_only:
        return next(f for f in FLAVOURS.values() if f.number_format == number_format and ONNXRUNTIME in f.runtimes)
    return FLAVOURS[number_format]
