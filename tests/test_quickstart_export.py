"""The quickstart's train + export, on several digits models: every artifact must pass its gate.

`make demo` runs `resdeploy train --arch resnet20 --dataset digits --epochs 10` then
`resdeploy export … --calib-data digits`; CI once stayed green while that export failed on every
model (issue #9). These tests run the same commands with other depths, epochs and seeds, and check
the INT8 files with an evaluation of their own, not the numbers the gate wrote: PyTorch FP32 from
the checkpoint, ONNX Runtime on each file (the TensorRT form with its exact Q/DQ semantics, int8-cpu
with the fused kernels it is served with), labels from the dataset (tests/gatecheck.py).

What is asserted is what the product promises, on the images it promises it for: each INT8 file
within its gate budget (core/flavours.py) on the gate's split, the 360 digits test images. Training
is deterministic per CPU but not across CPUs (other SIMD paths round differently), so the model, and
every accuracy figure, differs from one CPU to another; a margin tighter than that budget on a
sample of its own (99.5% of FP32 top-1 on 120 images once, where one image is 0.83%) fails on a
correct product (issue #22: int8 97.78% vs FP32 98.33%, one image, on an AMD Zen 4, while the gate
passed). The budget cannot: the export refuses a file outside it, and the recomputation here must
equal the gate's numbers exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from gatecheck import assert_gate_numbers_are_recomputed

from core.flavours import FLAVOURS
from core.manifest import read_manifest
from training.checkpoint import restore_model
from training.data import load_dataset

MATRIX = [  # (arch, epochs, seed, extra train flags): trained models, as users export them
    pytest.param("resnet20", 5, 0, [], id="resnet20-5ep"),  # issue #3's command
    pytest.param("resnet32", 10, 1, [], id="resnet32-10ep-seed1"),
    pytest.param("resnet20", 6, 2, ["--shortcut", "B"], id="resnet20B-6ep-seed2"),
    pytest.param("resnet20", 10, 0, [], id="resnet20-10ep-make-demo", marks=pytest.mark.slow),
    pytest.param("resnet20", 15, 3, ["--shortcut", "B"], id="resnet20B-15ep-seed3", marks=pytest.mark.slow),
]
# Under-trained networks are not in the matrix on purpose: ResNet-32 after 4 epochs (43% top-1) and
# ResNet-56 after 8 (34%) have logits with tiny margins and INT8 noise spread over every layer, so
# they miss the 98% agreement budget even with five float layers and the export refuses them
# (docs/design.md#int8-exportqdqpy-exportint8py). That refusal is the gate working.


@pytest.mark.parametrize("arch,epochs,seed,extra", MATRIX)
def test_quickstart_export_passes_every_gate(tmp_path: Path, arch: str, epochs: int, seed: int, extra: list[str]):
    run = tmp_path / "run"
    r = run_cli("train", "--arch", arch, "--dataset", "digits", "--epochs", str(epochs), "--seed", str(seed),
                "--out", str(run), "--no-progress", *extra, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "artifacts"
    r = run_cli("export", str(run / "best.pt"), "--out", str(out), "--calib-data", "digits", "--no-progress",
                timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    m = read_manifest(out)
    assert {a.precision for a in m.entries("onnx")} == {"fp32", "fp16", "int8", "int8-cpu"}
    assert m.eval["dataset"] == "digits" and m.eval["images"] == len(load_dataset("digits").test)

    ours = assert_gate_numbers_are_recomputed(out, run / "best.pt")  # identical to the manifest's rows
    ref = ours["pytorch"]
    macs = _layer_macs(restore_model(run / "best.pt").model, m.preprocess_config.crop)
    max_float = m.options["int8"]["max_float_layers"]
    for flavour in ("int8", "int8-cpu"):
        row, budget = ours[flavour], FLAVOURS[flavour].budget
        assert row["top1"] >= budget.min_top1_ratio * ref["top1"] - 1e-9, (flavour, row, ref)
        assert row["top1_agreement"] >= budget.min_agreement - 1e-9, (flavour, row)
        # At most --max-float-layers layers left in float, and the INT8 share of MACs is what remains,
        # counted here on the PyTorch network.
        q = m.find(flavour).quantization
        assert len(q["float_layers"]) <= max_float, q
        share = 100 * (1 - sum(macs[name] for name in q["float_layers"]) / sum(macs.values()))
        assert q["int8_mac_share"] == pytest.approx(share, abs=0.01), (q, share)


def _layer_macs(model: torch.nn.Module, size: int) -> dict[str, int]:
    """Multiply-adds per image of every Conv2d and Linear, by PyTorch module name."""
    macs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            hooks.append(module.register_forward_hook(
                lambda mod, inp, out, name=name, k=per_output: macs.__setitem__(name, out[0].numel() * k)))
        elif isinstance(module, torch.nn.Linear):
            macs[name] = module.in_features * module.out_features
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return macs
