"""NNCF's default post-training quantization of an artifact's FP32 file: the issue #9 baseline.

Issue #9: "each INT8 flavour agrees with FP32 at least as often as NNCF's default PTQ of the same
FP32 file with the same calibration images (measured on the test matrix)". This script measures
the NNCF side and, on the same images, the artifact's own INT8 files. Two steps, because NNCF
lives in its own virtualenv (it is a measurement tool, not a dependency of resdeploy):

1. ``dump`` (the project venv): the accuracy gate's images, exactly as ``export`` sees them (the
   held-out test split drawn with ``training.data.Split.sample`` and the manifest's image count,
   centre crop, serving preprocessing with the manifest's constants) and their labels, into an
   ``.npz``::

       .venv/bin/python bench/nncf_baseline.py dump ART --eval-data digits --npz ART.gate.npz

2. ``run`` (the NNCF venv; imports only numpy, onnx, onnxruntime and nncf): quantizes
   ``ART/model.fp32.onnx`` with ``nncf.quantize`` at its defaults (preset None = PERFORMANCE for a
   CNN, target device ANY, fast bias correction on) on the artifact's own calibration tensors
   (``calib/<key>.npy``, named in manifest.json under "calibration", sha256-checked), one image
   per dataset item and ``subset_size`` = all of them; then runs FP32, the NNCF model(s) and every
   ``model.int8.onnx`` / ``model.int8-cpu.onnx`` in ART with ONNX Runtime on the CPU over the
   gate images and prints top-1 and top-1 agreement with the FP32 ONNX file::

       /work/nncfenv/bin/python bench/nncf_baseline.py run ART --npz ART.gate.npz \\
           --variants default,no_fast_bc,mixed --json ART.nncf.json

   Variants: ``default`` (``nncf.quantize(model, dataset, subset_size=N)``), ``no_fast_bc``
   (``fast_bias_correction=False``: NNCF's slower full BiasCorrection), ``mixed``
   (``preset=QuantizationPreset.MIXED``: asymmetric activations) and ``no_bc``
   (``AdvancedQuantizationParameters(disable_bias_correction=True)``). The Q/DQ form of every
   INT8 graph (activation and weight zero-point types, non-zero zero points, per-channel weight
   scales, quantized biases, residual Adds with dequantized inputs) is read from the ONNX graph
   and reported with it. ``--out DIR`` keeps the NNCF files (``model.nncf-<variant>.onnx``).

The NNCF venv (versions used for docs/nncf-baseline.md)::

    python3 -m venv /work/nncfenv
    /work/nncfenv/bin/pip install nncf==3.4.0 onnx onnxruntime==1.32.0 numpy

As a check that ``dump`` reproduced the gate's images, each artifact file's top-1 is compared
with the top-1 the export gate recorded for it in manifest.json (same ORT CPU provider, so they
should be equal; a difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the NNCF venv has no resdeploy install; core.errors/flavours/fsutil are pure Python

from core.errors import first_line  # noqa: E402
from core.flavours import FP32, INT8, INT8_FLAVOURS  # noqa: E402
from core.fsutil import sha256_file  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402  (argparse and core.errors only)

PROG = "bench/nncf_baseline.py"
VARIANTS = ("default", "no_fast_bc", "mixed", "no_bc")
OWN_FLAVOURS = INT8_FLAVOURS


# --------------------------------------------------------------------------- dump (project venv)

def dump(art: Path, eval_data: str | None, npz: Path, data_root: str) -> int:
    """Write the gate's images (float32 NCHW, serving-preprocessed centre crops) and labels."""
    from core.manifest import read_manifest
    from training.data import load_dataset
    from training.evaluate import iter_crops

    manifest = read_manifest(art)
    gate_dataset = manifest.eval_dataset
    spec = eval_data or gate_dataset
    if spec != gate_dataset:
        print(f"warning: --eval-data {spec} but the gate measured {gate_dataset}", file=sys.stderr)
    pre = manifest.preprocess_config
    ds = load_dataset(spec, data_root=data_root, input_size=pre.input_size)
    n = int(manifest.eval["images"])
    # The gate draws test.sample(--eval-images); when --eval-images >= the split, all of it.
    # The manifest records len(split), which reproduces the same draw either way.
    split = ds.test.sample(n)
    if len(split) != n:
        raise SystemExit(f"{PROG}: the gate saw {n} images but {spec}'s test split gives {len(split)}")
    xs, ys = zip(*iter_crops(split, pre, "center", 50))
    images, labels = np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, images=images, labels=labels, dataset=np.array(spec), preprocess=np.array(json.dumps(
        manifest.preprocess)), artifact=np.array(str(art.resolve())))
    print(f"wrote {npz}: {images.shape} float32 images, {len(labels)} labels ({spec} test split, centre crop)")
    return 0


# --------------------------------------------------------------------------- run (NNCF venv)

def _checked(art: Path, entry: dict) -> Path:
    p = art / entry["file"]
    if not p.is_file() or sha256_file(p) != entry["sha256"]:
        raise SystemExit(f"{PROG}: {p} is missing or does not match its sha256 in manifest.json")
    return p


def _session(model, threads: int, fused: bool = True):
    """ORT CPU session; ``fused=False`` runs the exact Q/DQ semantics (how export judges ``int8``,
    the TensorRT form: TensorRT accumulates in int32, ORT's fused x86 kernels may saturate)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not fused:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    src = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _logits(sess, images: np.ndarray, batch: int = 50) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def _row(logits: np.ndarray, labels: np.ndarray, ref: np.ndarray) -> dict:
    return {"top1": round(100 * float((logits.argmax(1) == labels).mean()), 4),
            "top1_agreement": round(100 * float((logits.argmax(1) == ref.argmax(1)).mean()), 4),
            "disagreements": int((logits.argmax(1) != ref.argmax(1)).sum()),
            "max_logit_diff": float(f"{float(np.abs(logits - ref).max()):.3g}"), "n": int(len(labels))}


def qdq_form(model) -> dict:
    """What a QDQ graph looks like: zero-point types, per-channel weights, biases, residual Adds."""
    from onnx import numpy_helper

    g = model.graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    init.update(consts)
    prod = {o: n for n in g.node for o in n.output}
    weight_names = {n.input[1] for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    bias_names = {n.input[2] for n in g.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2}

    def source(name):  # follow DQ <- Q <- initializer / DQ <- int8 initializer
        dq = prod.get(name)
        return dq if dq is not None and dq.op_type == "DequantizeLinear" else None

    f = {"opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
         "quantize_linear": 0, "dequantize_linear": 0, "activation_zero_point_types": set(),
         "activation_nonzero_zero_points": 0, "activation_quantizers": 0,
         "weight_zero_point_types": set(), "weight_storage": set(), "conv_gemm": 0, "quantized_weights": 0,
         "per_channel_weights": 0, "weight_axes": set(), "weight_nonzero_zero_points": 0, "quantized_bias": 0,
         "adds": 0, "adds_both_inputs_dq": 0, "adds_one_input_dq": 0, "quantized_op_inputs": {}}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            f["quantize_linear"] += 1
        if n.op_type == "DequantizeLinear":
            f["dequantize_linear"] += 1
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            continue
        for i, name in enumerate(n.input):
            dq = source(name)
            if dq is not None:
                key = f"{n.op_type}[{i}]"
                f["quantized_op_inputs"][key] = f["quantized_op_inputs"].get(key, 0) + 1
    seen_act = set()
    for n in g.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            f["conv_gemm"] += 1
            dq = source(n.input[1])
            if dq is not None:
                f["quantized_weights"] += 1
                scale = init.get(dq.input[1])
                zp = init.get(dq.input[2]) if len(dq.input) > 2 else None
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                if scale is not None and scale.size > 1:
                    f["per_channel_weights"] += 1
                    f["weight_axes"].add(axis)
                if zp is not None:
                    f["weight_zero_point_types"].add(str(zp.dtype))
                    f["weight_nonzero_zero_points"] += int(np.any(zp != 0))
                q = prod.get(dq.input[0])
                f["weight_storage"].add("float initializer -> QuantizeLinear -> DQ" if q is not None and
                                        q.op_type == "QuantizeLinear" else
                                        f"{init[dq.input[0]].dtype} initializer -> DQ" if dq.input[0] in init else
                                        "other")
            if len(n.input) > 2 and source(n.input[2]) is not None:
                f["quantized_bias"] += 1
        if n.op_type == "Add":
            f["adds"] += 1
            k = sum(source(i) is not None for i in n.input)
            f["adds_both_inputs_dq"] += int(k == len(n.input))
            f["adds_one_input_dq"] += int(k == 1)
    # Activation quantizers: QuantizeLinear nodes whose input is not a weight or bias initializer.
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in init or n.input[0] in weight_names | bias_names:
            continue
        if n.output[0] in seen_act:
            continue
        seen_act.add(n.output[0])
        f["activation_quantizers"] += 1
        zp = init.get(n.input[2]) if len(n.input) > 2 else None
        if zp is not None:
            f["activation_zero_point_types"].add(str(zp.dtype))
            f["activation_nonzero_zero_points"] += int(np.any(zp != 0))
        else:
            f["activation_zero_point_types"].add("none (uint8, zp 0)")
    for k in ("activation_zero_point_types", "weight_zero_point_types", "weight_storage", "weight_axes"):
        f[k] = sorted(f[k])
    f["quantized_op_inputs"] = dict(sorted(f["quantized_op_inputs"].items()))
    return f


def _nncf_quantize(fp32_model, calib: np.ndarray, input_name: str, variant: str):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda x: {input_name: x})
    kwargs = {"subset_size": len(calib)}
    if variant == "no_fast_bc":
        kwargs["fast_bias_correction"] = False
    elif variant == "mixed":
        kwargs["preset"] = nncf.QuantizationPreset.MIXED
    elif variant == "no_bc":
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(disable_bias_correction=True)
    t0 = time.perf_counter()
    q = nncf.quantize(fp32_model, dataset, **kwargs)
    call = {k: str(v) for k, v in kwargs.items()}
    if "advanced_parameters" in call:
        call["advanced_parameters"] = "AdvancedQuantizationParameters(disable_bias_correction=True)"
    return q, round(time.perf_counter() - t0, 2), call


def run(args) -> int:
    import onnx
    import onnxruntime

    art = Path(args.artifacts)
    # A plain dict, not core.manifest.Manifest: that module imports core.preprocess, which needs
    # Pillow, and the NNCF venv has only numpy, onnx, onnxruntime and nncf.
    manifest = json.loads((art / "manifest.json").read_text())
    entries = {e["precision"]: e for e in manifest["artifacts"] if e.get("kind", "onnx") == "onnx"}
    calib_entry = manifest.get("calibration")
    if not calib_entry:
        raise SystemExit(f"{PROG}: {art}/manifest.json records no calibration tensors (exported without int8?)")
    calib = np.load(_checked(art, calib_entry), allow_pickle=False).astype(np.float32)
    fp32_path = _checked(art, entries[FP32.name])
    data = np.load(args.npz, allow_pickle=False)
    images, labels = data["images"].astype(np.float32), data["labels"]
    gate = manifest.get("eval", {})
    if len(labels) != gate.get("images", len(labels)):
        raise SystemExit(f"{PROG}: {args.npz} has {len(labels)} images, the gate measured {gate.get('images')}")

    fp32_model = onnx.load(str(fp32_path))
    input_name = fp32_model.graph.input[0].name
    ref = _logits(_session(fp32_path, args.threads), images)
    rows = [{"model": f"{FP32.name} ({fp32_path.name})", "kind": FP32.name, **_row(ref, labels, ref),
             "gate_top1": entries[FP32.name].get("top1"), "quantize_s": None}]
    forms = {}
    for flavour in OWN_FLAVOURS:
        if flavour not in entries:
            continue
        path = _checked(art, entries[flavour])
        model = onnx.load(str(path))
        forms[flavour] = qdq_form(model)
        rows.append({"model": f"{flavour} ({path.name})", "kind": flavour,
                     **_row(_logits(_session(path, args.threads, fused=flavour != INT8.name), images), labels, ref),
                     "gate_top1": entries[flavour].get("top1"),
                     "quantize_s": (manifest.get("timings_s") or {}).get(f"quantize_{flavour}")})
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nncf-baseline-"))
    out.mkdir(parents=True, exist_ok=True)
    calls = {}
    for variant in args.variants:
        try:
            q, seconds, kwargs = _nncf_quantize(onnx.load(str(fp32_path)), calib, input_name, variant)
        except Exception as e:  # an NNCF failure is a result too (recorded, not hidden)
            error = f"{type(e).__name__}: {first_line(e)}"
            print(f"nncf {variant} FAILED: {error}", file=sys.stderr)
            calls[variant] = {"error": error}
            rows.append({"model": f"nncf {variant}", "kind": f"nncf-{variant}", "error": error,
                         "gate_top1": None, "quantize_s": None})
            continue
        path = out / f"model.nncf-{variant}.onnx"
        onnx.save(q, str(path))
        forms[f"nncf-{variant}"] = qdq_form(q)
        calls[variant] = kwargs
        rows.append({"model": f"nncf {variant}", "kind": f"nncf-{variant}",
                     **_row(_logits(_session(path, args.threads), images), labels, ref),
                     "gate_top1": None, "quantize_s": seconds})
        rows.append({"model": f"nncf {variant} (exact Q/DQ)", "kind": f"nncf-{variant}-exact",
                     **_row(_logits(_session(path, args.threads, fused=False), images), labels, ref),
                     "gate_top1": None, "quantize_s": seconds})

    mismatched = [r["model"] for r in rows if r["gate_top1"] is not None and abs(r["gate_top1"] - r["top1"]) > 1e-6]
    head = f"{'model':<32} {'top-1 %':>8} {'agree %':>8} {'disagree':>8} {'max|dlogit|':>11} {'gate top-1':>10} {'quant s':>8}"
    print(f"{art}: {manifest.get('arch')} shortcut {manifest.get('shortcut')}, {len(labels)} "
          f"{gate.get('dataset')} test images (centre crop), ORT {onnxruntime.__version__} CPU, "
          f"{len(calib)} calibration images; agreement = same top-1 as model.fp32.onnx")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<32} FAILED: {r['error'][:120]}")
            continue
        g = "-" if r["gate_top1"] is None else f"{r['gate_top1']:.2f}"
        s = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        print(f"{r['model']:<32} {r['top1']:>8.2f} {r['top1_agreement']:>8.2f} {r['disagreements']:>8d} "
              f"{r['max_logit_diff']:>11.3g} {g:>10} {s:>8}")
    if mismatched:
        print(f"WARNING: top-1 differs from the gate's recorded top-1 for {', '.join(mismatched)}: "
              f"the .npz is not the gate's image set")
    for k, f in forms.items():
        print(f"{k}: act zp {f['activation_zero_point_types']} ({f['activation_nonzero_zero_points']}/"
              f"{f['activation_quantizers']} non-zero), weights {f['quantized_weights']}/{f['conv_gemm']} "
              f"(per-channel {f['per_channel_weights']}, axis {f['weight_axes']}, zp {f['weight_zero_point_types']}, "
              f"{', '.join(f['weight_storage'])}), quantized bias {f['quantized_bias']}, Adds with DQ on both "
              f"inputs {f['adds_both_inputs_dq']}/{f['adds']} (one input {f['adds_one_input_dq']})")
    if args.out is None:
        print(f"NNCF models in {out} (pass --out to choose)")
    if args.json:
        import nncf

        result = {"artifacts": str(art.resolve()), "arch": manifest.get("arch"), "shortcut": manifest.get("shortcut"),
                  "eval": {"dataset": gate.get("dataset"), "images": int(len(labels)), "tta": "center"},
                  "calibration": {"file": calib_entry["file"], "images": int(len(calib))},
                  "versions": {"nncf": nncf.__version__, "onnx": onnx.__version__,
                               "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                               "python": sys.version.split()[0]},
                  "threads": args.threads, "nncf_calls": calls, "rows": rows, "qdq_forms": forms,
                  "gate_mismatch": mismatched}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if mismatched or any("error" in r for r in rows) else 0


def _variants(text: str) -> list[str]:
    v = [s for s in text.split(",") if s]
    bad = [s for s in v if s not in VARIANTS]
    if bad or len(set(v)) != len(v):
        raise argparse.ArgumentTypeError(f"choose distinct values from {','.join(VARIANTS)}")
    return v


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    d = sub.add_parser("dump", help="(project venv) write the gate's images and labels to an .npz")
    d.add_argument("artifacts", help="artifact directory (manifest.json)")
    d.add_argument("--eval-data", default=None, help="dataset the gate measured (default: the manifest's)")
    d.add_argument("--data-root", default="data")
    d.add_argument("--npz", required=True)
    r = sub.add_parser("run", help="(NNCF venv) quantize with NNCF and compare on the dumped images")
    r.add_argument("artifacts", help="artifact directory (manifest.json, model.fp32.onnx, calib/)")
    r.add_argument("--npz", required=True, help="the .npz written by `dump`")
    r.add_argument("--variants", type=_variants, default=["default"],
                   help=f"comma-separated NNCF settings to measure, from {','.join(VARIANTS)} (default: default)")
    r.add_argument("--out", default=None, help="directory for the NNCF ONNX files (default: a new temp dir)")
    r.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    r.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.step == "dump":
        return dump(Path(a.artifacts), a.eval_data, Path(a.npz), a.data_root)
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
