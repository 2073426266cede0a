"""INT8 with a guarantee: quantize, judge, find the layers that cost accuracy, keep them in float.

For one int8 flavour (``core.flavours.INT8_FLAVOURS``; the forms are in :mod:`export.qdq`):

1. every Conv/Gemm quantized (except ``--keep-float``), judged on the gate images against FP32;
2. per-layer sensitivity (when a flavour misses its budget, or when asked): each layer quantized
   *alone*, its effect on the gate metric (top-1 agreement with FP32, top-1, logit SQNR) and the
   SQNR of its own output against the same layer in float on the same (float) input;
3. fallback: the most sensitive layers go back to float one at a time, most sensitive first,
   re-measured after each, until the budget holds or ``max_float_layers`` is reached.

This is what NNCF's ``quantize_with_accuracy_control`` and Polygraphy's ``debug precision`` do
by hand, inside an export that also gates, hashes and serves the result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from core.errors import ConfigError
from export import qdq
from export.gate import judge
from export.options import Int8Options

log = logging.getLogger(__name__)



@dataclass
class EvalSet:
    """The gate images as the network sees them, their labels (-1: unlabelled) and FP32 logits."""

    x: np.ndarray
    labels: np.ndarray
    ref: np.ndarray

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def subset(self, n: int) -> "EvalSet":
        return self if n >= len(self.x) else EvalSet(self.x[:n], self.labels[:n], self.ref[:n])


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else round(10 * np.log10(max(signal, 1e-30) / noise), 2)


def score(logits: np.ndarray, images: EvalSet) -> dict:
    """Gate-style row: top-1 (labelled data only), agreement with FP32, logit SQNR."""
    pred = logits.argmax(1)
    row = {"top1": round(100 * float((pred == images.labels).mean()), 4) if images.labelled else None,
           "top1_agreement": round(100 * float((pred == images.ref.argmax(1)).mean()), 4),
           "logit_sqnr_db": sqnr_db(images.ref, logits), "n": int(len(images.x))}
    return row


def display_name(layer: qdq.Layer) -> str:
    """``layer1.0.conv1`` for the weight ``layer1.0.conv1.weight`` (the PyTorch module name)."""
    return layer.weight[:-len(".weight")] if layer.weight.endswith(".weight") else layer.name


def resolve_layers(names: list[str], layers: list[qdq.Layer]) -> list[str]:
    """Map user-given layer names (module or ONNX node names) to node names; unknown ones raise."""
    by_name = {display_name(l): l.name for l in layers} | {l.name: l.name for l in layers}
    bad = [n for n in names if n not in by_name]
    if bad:
        raise ConfigError(f"--keep-float {','.join(bad)}: no such Conv/Gemm layer; choose from "
                          f"{', '.join(display_name(l) for l in layers[:8])}, … (--report-only lists every layer)")
    return list(dict.fromkeys(by_name[n] for n in names))


def _evaluate(path: Path, flavour: str, images: EvalSet) -> dict:
    sess = qdq.session(path, fused=qdq.form(flavour).fused_gate)
    return score(qdq.run(sess, images.x)[0], images)


def _with_layer_outputs(src: Path, dst: Path, layer: qdq.Layer, fp32: onnx.ModelProto) -> tuple[str, str] | None:
    """Add the layer's (dequantized) output and a float twin of the layer as graph outputs.

    The twin is the original float node fed the same float input, so the pair compares the layer
    quantized with the layer in float on identical inputs. Returns the two output names, or None
    when the layer's output is not followed by a Q/DQ pair (then only the logits are compared).
    """
    model = onnx.load(str(src))
    nodes = {n.name: n for n in model.graph.node}
    node = nodes.get(layer.name)
    consumers = [n for n in model.graph.node if node is not None and node.output[0] in n.input]
    q = next((n for n in consumers if n.op_type == "QuantizeLinear"), None)
    dq = next((n for n in model.graph.node if q is not None and n.op_type == "DequantizeLinear"
               and n.input[0] == q.output[0]), None)
    original = next((n for n in fp32.graph.node if n.name == layer.name), None)
    if dq is None or original is None:
        return None
    suffix = "__float_twin"
    consts = {i.name: i for i in fp32.graph.initializer if i.name in original.input}
    inputs = [n + suffix if n in consts else n for n in original.input]
    twin = onnx.helper.make_node(original.op_type, inputs, [layer.name + suffix], name=layer.name + suffix)
    twin.attribute.extend(original.attribute)
    for name, init in consts.items():  # the quantized graph may reuse the names (a DQ'd bias)
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = name + suffix
        model.graph.initializer.append(copy)
    model.graph.node.append(twin)
    for name in (dq.output[0], twin.output[0]):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(dst))
    return dq.output[0], twin.output[0]


def sensitivity(prepared: qdq.Prepared, flavour: str, ranges: Path, method: str, images: EvalSet,
                layers: list[qdq.Layer], overflow_fix: str | None, progress: bool = False) -> list[dict]:
    """Each layer quantized alone: effect on the gate metric and SQNR of its own output.

    Returns rows worst first: lowest agreement, then lowest logit SQNR.
    """
    from tqdm import tqdm

    rows = []
    fp32 = prepared.model
    scratch = prepared.work / f".{prepared.tag}.{flavour}.alone.onnx"
    probe = prepared.work / f".{prepared.tag}.{flavour}.alone-probe.onnx"
    try:
        for layer in tqdm(layers, desc=f"sensitivity {flavour}", unit="layer", leave=False, disable=not progress):
            prepared.write(scratch, flavour, ranges, method, only=[layer.name], overflow_fix=overflow_fix)
            names = _with_layer_outputs(scratch, probe, layer, fp32)
            sess = qdq.session(probe if names else scratch, fused=qdq.form(flavour).fused_gate)
            outs = qdq.run(sess, images.x, outputs=[sess.get_outputs()[0].name, *(names or [])])
            row = {"layer": display_name(layer), "node": layer.name, "op": layer.op, "macs": layer.macs,
                   **score(outs[0], images)}
            row["output_sqnr_db"] = sqnr_db(outs[2], outs[1]) if names else None
            if images.labelled:
                row["top1_change"] = 0.0 + round(row["top1"] - 100 * float((images.ref.argmax(1) == images.labels).mean()), 4)
            rows.append(row)
    finally:
        scratch.unlink(missing_ok=True)
        probe.unlink(missing_ok=True)
    return sorted(rows, key=lambda row: (row["top1_agreement"], row["logit_sqnr_db"]))


def format_sensitivity(flavour: str, rows: list[dict], limit: int | None = 12) -> str:
    head = f"{'layer (' + flavour + ')':<24} {'op':<5} {'MMACs':>8} {'agree %':>8} {'top-1 Δ':>8} {'logit dB':>9} {'out dB':>7}"
    lines = [head, "-" * len(head)]
    for row in rows[:limit]:
        change = "-" if row.get("top1_change") is None else f"{row['top1_change']:+.2f}"
        out = "-" if row["output_sqnr_db"] is None else f"{row['output_sqnr_db']:.1f}"
        lines.append(f"{row['layer']:<24} {row['op']:<5} {row['macs'] / 1e6:>8.2f} {row['top1_agreement']:>8.2f} "
                     f"{change:>8} {row['logit_sqnr_db']:>9.1f} {out:>7}")
    if limit is not None and len(rows) > limit:
        lines.append(f"… {len(rows) - limit} more layers in sensitivity.json")
    return "\n".join(lines)


def _better(a: dict, b: dict) -> bool:
    return (a["top1_agreement"], a["logit_sqnr_db"]) > (b["top1_agreement"], b["logit_sqnr_db"])


@dataclass
class _Flavour:
    """One int8 flavour being written: where, from which ranges, judged on which images."""

    prepared: qdq.Prepared
    name: str
    dst: Path
    ranges: Path
    images: EvalSet
    reference: dict  # the FP32 reference's gate row (``top1`` None on unlabelled data)
    options: Int8Options

    def write(self, keep_float: list[str]) -> None:
        self.prepared.write(self.dst, self.name, self.ranges, self.options.method, keep_float=keep_float,
                            overflow_fix=self.options.overflow_fix)

    def measure(self) -> tuple[dict, bool]:
        """The written file's gate row and whether it is within budget."""
        row = _evaluate(self.dst, self.name, self.images)
        return row, judge(self.name, row, self.reference, self.options.budgets)[0]


def _fall_back(flavour: _Flavour, ranked: list[dict], keep: list[str], current: dict,
               steps: list[dict]) -> tuple[dict, bool]:
    """Greedy fallback, most sensitive first; a layer stays float only if that helps.

    Errors spread over many layers (a barely trained network with tiny logit margins) are not
    fixed by any one float layer: a candidate that does not improve agreement (then logit SQNR)
    is put back in INT8 rather than spending float MACs on nothing. Bounded by
    ``max_float_layers`` kept and ``3 * max_float_layers`` tries. ``keep`` grows in place.
    """
    limit = flavour.options.max_float_layers
    ok, written = False, list(keep)
    for candidate in ranked[:3 * limit]:
        if ok or len(keep) >= limit:
            break
        if candidate["node"] in keep:
            continue
        written = [*keep, candidate["node"]]
        flavour.write(written)
        row, ok = flavour.measure()
        kept = ok or _better(row, current)
        steps.append({"float": candidate["layer"], **row, "within_budget": ok, "kept": kept})
        if kept:
            keep.append(candidate["node"])
            current = row
    if written != keep:  # the last try was put back: write the file that was kept
        flavour.write(keep)
    return current, ok


def build(prepared: qdq.Prepared, flavour: str, dst: Path, calib: np.ndarray, images: EvalSet,
          ref_row: dict, opts: Int8Options) -> dict:
    """Quantize ``flavour`` into ``dst`` and, if it misses its budget, fall back layer by layer.

    Args:
        images: the gate images with FP32's logits.
        ref_row: the FP32 reference's gate row (``top1`` may be None for unlabelled data).

    Returns:
        A report: ``before`` and ``after`` rows, ``float_layers``, ``int8_mac_share``, the
        sensitivity rows (if computed), the fallback ``steps`` and ``seconds``.
    """
    start = time.perf_counter()
    layers = prepared.layers()
    keep = resolve_layers(opts.keep_float, layers)
    job = _Flavour(prepared, flavour, dst, prepared.ranges(flavour, calib, opts.method, opts.progress), images,
                   ref_row, opts)
    job.write(keep)
    before, ok = job.measure()
    report = {"method": opts.method, "overflow_fix": opts.overflow_fix or qdq.form(flavour).overflow_fix,
              "before": before, "budget": judge(flavour, before, ref_row, opts.budgets)[1], "steps": [],
              "sensitivity": None, "fallback": False}
    ranked = None
    if opts.sensitivity == "on" or (opts.sensitivity == "auto" and not ok and opts.fallback):
        ranked = sensitivity(prepared, flavour, job.ranges, opts.method, images.subset(opts.sensitivity_images),
                             layers, opts.overflow_fix, opts.progress)
        report["sensitivity"] = ranked
    current = before
    if not ok and opts.fallback and ranked:
        report["fallback"] = True
        current, ok = _fall_back(job, ranked, keep, before, report["steps"])
    names = {layer.name: display_name(layer) for layer in layers}
    total = sum(layer.macs for layer in layers)
    int8_macs = sum(layer.macs for layer in layers if layer.name not in keep)
    report |= {"after": current, "within_budget": ok, "float_layers": [names[n] for n in keep],
               "int8_mac_share": round(100 * int8_macs / max(total, 1), 2),
               "quantizable_layers": len(layers), "seconds": round(time.perf_counter() - start, 2)}
    return report
