"""What ``resdeploy export`` can be asked for: the option types and their vocabularies.

Light on purpose (no onnx, torch or onnxruntime): the CLI reads the ``choices=`` from here so that
``resdeploy export --help`` stays fast, and the library validates against the same tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.flavours import PRECISIONS

CALIB_METHODS = ("percentile", "entropy", "minmax")
OVERFLOW_FIXES = ("first-layer", "all", "none")  # NNCF's OverflowFix: FIRST_LAYER, ENABLE, DISABLE
SENSITIVITY_MODES = ("auto", "on", "off")


@dataclass
class Int8Options:
    """The INT8 knobs of ``resdeploy export`` (defaults from docs/design.md#int8)."""

    method: str = "percentile"
    overflow_fix: str | None = None  # None: the flavour's default
    keep_float: list[str] = field(default_factory=list)
    fallback: bool = True
    max_float_layers: int = 5
    sensitivity: str = "auto"
    sensitivity_images: int = 500
    progress: bool = False
    budgets: dict | None = None  # overrides export.gate.BUDGETS


@dataclass
class ExportOptions:
    """What ``resdeploy export`` was asked for (written into the manifest as given)."""

    checkpoint: str
    out: str
    arch: str | None = None
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    calib_data: str | None = None
    calib_images: int = 128
    calib_method: str = "percentile"
    eval_data: str | None = None
    eval_images: int = 1000
    labels: str | None = None
    trt: bool = False
    max_batch: int = 40
    workspace_gib: float = 4.0
    accept_accuracy_drop: bool = False
    num_classes: int | None = None
    shortcut: str | None = None
    data_root: str = "data"
    progress: bool | None = None
    preprocess_flags: dict = field(default_factory=dict)
    bento_model: str | None = None
    int8: Int8Options = field(default_factory=Int8Options)
    int8_min_agreement: float | None = None
    report_only: bool = False
