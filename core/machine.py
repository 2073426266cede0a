"""What CPU this is: model name and the instruction-set features int8 kernels depend on."""

from __future__ import annotations

import platform
from pathlib import Path

# The CPU features that decide which int8/bf16 kernels ONNX Runtime and PyTorch can use.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """``(model name, the CPU_FLAGS present)`` from /proc/cpuinfo (Linux), else what platform knows."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            present = set(value.split())
            flags = [f for f in CPU_FLAGS if f in present]
        if model and flags:
            break
    return model, flags


def cpu_isa() -> dict:
    """The CPU and whether it has VNNI, as the export gate records it (ONNX Runtime's u8s8 kernels
    saturate without VNNI; docs/design.md, INT8)."""
    model, flags = cpu_model_and_flags()
    return {"model": model, "vnni": "avx512_vnni" in flags or "avx_vnni" in flags, "avx2": "avx2" in flags}
