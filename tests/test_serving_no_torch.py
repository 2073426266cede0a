"""core/, the ONNX Runtime and TensorRT backends and serving/ must import and run without torch (it ships in a lean runtime image).

A subprocess blocks torch with ``sys.modules["torch"] = None`` (any ``import torch`` then
raises ImportError) and imports every module in SERVING_MODULES. Add new serving modules to
that list; nothing else needs to change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVING_MODULES = [
    "core",
    "core.errors",
    "core.fsutil",
    "core.flavours",
    "core.preprocess",
    "core.manifest",
    "core.backend",
    "core.scores",
    "core.timing",
    "backends",
    "backends.onnxruntime",
    "backends.tensorrt",
    "serving",
    "serving.config",
    "serving.engine",
    "serving.http",
    "serving.bento_model",
]

_SCRIPT = r"""
import importlib, io, json, sys, traceback
sys.modules["torch"] = None  # import torch -> ImportError
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc()

smoke = None
if "core.preprocess" not in failed:
    try:
        from PIL import Image
        from core.preprocess import PreprocessConfig, decode_image, preprocess
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, "PNG")
        cfg = PreprocessConfig(32, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        smoke = [list(preprocess(decode_image(buf.getvalue()), cfg, t).shape)
                 for t in ("center", "ten_crop")]
    except Exception:
        failed["preprocess smoke run"] = traceback.format_exc()
print(json.dumps({"failed": failed, "smoke": smoke}))
"""


def test_serving_imports_and_preprocesses_without_torch():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(SERVING_MODULES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failed"], "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())
    assert result["smoke"] == [[1, 3, 32, 32], [10, 3, 32, 32]]
