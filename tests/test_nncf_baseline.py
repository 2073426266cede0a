"""bench/nncf_baseline.py without NNCF: its Q/DQ reader on a hand-built graph, and its flags.

The ``run`` step needs NNCF's own virtualenv (see the script's docstring); docs/nncf-baseline.md
records its measurements.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import nncf_baseline as nb


def _qdq_conv_add() -> onnx.ModelProto:
    """input -Q/DQ(int8)-> Conv(DQ int8 per-channel weight) -> Relu -Q/DQ(uint8, zp 3)-> Add(., Identity(input DQ))."""
    w = np.ones((4, 3, 1, 1), np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s_in"), numpy_helper.from_array(np.array(0, np.int8), "z_in"),
        numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "s_w"),
        numpy_helper.from_array(np.zeros(4, np.int8), "z_w"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s_r"), numpy_helper.from_array(np.array(3, np.uint8), "z_r"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s_in", "z_in"], ["q_in"]),
        helper.make_node("DequantizeLinear", ["q_in", "s_in", "z_in"], ["dq_in"]),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w"], axis=0),
        helper.make_node("Conv", ["dq_in", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s_r", "z_r"], ["q_r"]),
        helper.make_node("DequantizeLinear", ["q_r", "s_r", "z_r"], ["dq_r"]),
        helper.make_node("Identity", ["dq_in"], ["x3"]),
        helper.make_node("Add", ["dq_r", "x3"], ["out"]),
    ]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def test_qdq_form_reads_zero_points_per_channel_weights_and_adds():
    f = nb.qdq_form(_qdq_conv_add())
    assert f["opset"] == 20
    assert f["activation_quantizers"] == 2 and f["activation_zero_point_types"] == ["int8", "uint8"]
    assert f["activation_nonzero_zero_points"] == 1
    assert (f["conv_gemm"], f["quantized_weights"], f["per_channel_weights"]) == (1, 1, 1)
    assert f["weight_axes"] == [0] and f["weight_zero_point_types"] == ["int8"]
    assert f["weight_storage"] == ["int8 initializer -> DQ"]
    assert (f["adds"], f["adds_both_inputs_dq"], f["adds_one_input_dq"]) == (1, 0, 1)
    assert f["quantized_op_inputs"] == {"Add[0]": 1, "Conv[0]": 1, "Conv[1]": 1, "Identity[0]": 1}


def test_variants_flag_rejects_unknown_and_repeated():
    assert nb._variants("default,mixed") == ["default", "mixed"]
    for bad in ("default,default", "fast"):
        with pytest.raises(Exception):
            nb._variants(bad)


def test_row_counts_agreement_with_the_fp32_logits():
    ref = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    q = np.array([[1, 0], [1, 0], [1, 0]], np.float32)
    r = nb._row(q, np.array([0, 1, 1]), ref)
    assert r["top1"] == pytest.approx(100 / 3, abs=1e-3) and r["disagreements"] == 1
    assert r["top1_agreement"] == pytest.approx(200 / 3, abs=1e-3) and r["n"] == 3


def test_run_side_imports_without_pillow_or_torch():
    """The NNCF venv has only numpy, onnx, onnxruntime and nncf: the script must load there."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import sys\n"
              "for m in ('PIL', 'torch', 'training', 'export', 'serving', 'backends'): sys.modules[m] = None\n"
              "import runpy\n"
              "sys.argv = ['bench/nncf_baseline.py', 'run', '--help']\n"
              "runpy.run_path('bench/nncf_baseline.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    assert "--variants" in proc.stdout
