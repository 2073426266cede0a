"""How fast this CPU can multiply matrices, measured with ONNX Runtime: the ceiling of every CPU row.

A speed-up over PyTorch eager cannot exceed ``eager time / (model MACs / fastest MAC rate)``. This
module measures that rate with ONNX Runtime's own kernels (the ones its Conv/QLinearConv use) on a
few GEMM shapes that look like ResNet convolutions after im2col, and keeps the best:

* ``fp32``: ``MatMul`` on float32;
* ``int8``: ``MatMulInteger`` on uint8 x int8 (U8S8, the form ORT's x86 kernels fuse).

So a backend's GMAC/s next to the GEMM rate says whether it is already near what this CPU can do
(nothing left to gain from the artifact) or far from it (the graph or the kernels are the problem).
It is a measured reference, not a theoretical peak: a direct convolution kernel can beat it slightly.
"""

from __future__ import annotations

import time

import numpy as np

from core.flavours import flavour
from core.timing import time_calls

# (M, K, N) GEMMs: ResNet-50 3x3 convs at batch 10 after im2col (28x28x10 rows, 3*3*128 deep, 128
# out; 14x14x10 rows, 3*3*256 deep, 256 out) and a square one.
SHAPES = ((7840, 1152, 128), (1960, 2304, 256), (2048, 2048, 2048))
QUICK_SHAPES = ((1024, 1024, 1024),)


def gemm_model(m: int, k: int, n: int, int8: bool, rng):
    """A one-node ONNX model ``Y = A @ W`` with ``W`` a constant, and its input feed."""
    from onnx import TensorProto, helper, numpy_helper

    if int8:
        w = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "W")
        op, in_type, out_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    else:
        w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")
        op, in_type, out_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
        a = rng.standard_normal((m, k), dtype=np.float32)
    graph = helper.make_graph([helper.make_node(op, ["A", "W"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("A", in_type, [m, k])],
                              [helper.make_tensor_value_info("Y", out_type, [m, n])], [w])
    # IR 8 is what opset 17 needs; onnx's default (its newest IR) is refused by older runtimes
    # (seen: onnx 1.23 writes IR 14, onnxruntime 1.30 reads up to 13).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"A": a}


def _session(m: int, k: int, n: int, int8: bool, threads: int, rng):
    import onnxruntime as ort

    model, feed = gemm_model(m, k, n, int8, rng)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, feed


def gemm_rate(m: int, k: int, n: int, int8: bool, threads: int, iters: int = 5) -> float:
    """Median GMAC/s of one ``(m, k) x (k, n)`` ORT GEMM over ``iters`` runs after 2 warm-ups."""
    sess, feed = _session(m, k, n, int8, threads, np.random.default_rng(0))
    ms = time_calls(lambda: sess.run(None, feed), budget_s=0.0, warmup=2, min_iters=iters, max_iters=iters)
    return m * k * n / (float(np.median(ms)) / 1000.0) / 1e9


def measure(threads: int, quick: bool = False) -> dict:
    """``{"fp32": GMAC/s, "int8": GMAC/s, "shapes": [...], "threads": n, "seconds": s}``, best shape each."""
    t0 = time.perf_counter()
    shapes = QUICK_SHAPES if quick else SHAPES
    rates = {"fp32": 0.0, "int8": 0.0}
    for shape in shapes:
        for kind in rates:
            rates[kind] = max(rates[kind], gemm_rate(*shape, int8=kind == "int8", threads=threads))
    return {"fp32_gmac_per_s": round(rates["fp32"], 1), "int8_gmac_per_s": round(rates["int8"], 1),
            "shapes": [list(s) for s in shapes], "threads": threads,
            "method": "ONNX Runtime MatMul (fp32) / MatMulInteger (u8 x s8), CPU provider, best shape, "
                      "median of 5 runs", "seconds": round(time.perf_counter() - t0, 2)}


def kind_of(precision: str) -> str:
    """Which GEMM rate bounds a row of this precision on the CPU (fp16 runs as fp32 on x86)."""
    return "int8" if flavour(precision).is_int8 else "fp32"


def annotate(rows: list[dict], macs_per_image: int, ceiling: dict | None) -> None:
    """Add ``gmac_per_s`` to every row and ``pct_of_gemm`` to CPU rows (``None`` for GPU rows)."""
    for r in rows:
        r["gmac_per_s"] = macs_per_image * r["batch_size"] / (r["p50_ms"] / 1000.0) / 1e9
        on_cpu = "cuda" not in str(r.get("device", "")).lower() and not r["backend"].startswith(("trt", "torch-cuda"))
        if ceiling and on_cpu:
            r["pct_of_gemm"] = 100.0 * r["gmac_per_s"] / ceiling[f"{kind_of(r['precision'])}_gmac_per_s"]
        else:
            r["pct_of_gemm"] = None


def best_possible(torch_ms: float, macs_per_image: int, batch: int, ceiling: dict) -> dict:
    """Largest speed-up over eager that kernels running at the GEMM rate could give, per kind."""
    work = macs_per_image * batch / 1e9
    return {kind: torch_ms / 1000.0 / (work / ceiling[f"{kind}_gmac_per_s"]) for kind in ("fp32", "int8")}
