#!/usr/bin/env bash
# The GPU figures of bench/results/, in one short run on a CUDA host (from the repo root):
#   bash bench/gpu.sh                 # writes bench/results/gpu/ ; OUT=DIR to write elsewhere
# Runs the gpu-marked tests, the default latency bench (CPU rows plus torch-cuda / torch-cuda-fp16,
# and TensorRT where it is installed), a GPU-only batch sweep and the accuracy bench of
# ${ARTIFACTS:-artifacts/digits} (PyTorch CUDA fp32/fp16 against PyTorch CPU fp32). Needs torch with
# CUDA, onnx, onnxruntime, onnxscript, scikit-learn, matplotlib; no BentoML. PYTHON picks the interpreter.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
ARTIFACTS=${ARTIFACTS:-artifacts/digits}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
log="$OUT/log.txt"
: >"$log"
status=0
step() { echo "== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=$rc; }
step nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step "$PY" -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ort', onnxruntime.__version__)"
step "$PY" -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_tensorrt.py -q -rs
step "$PY" bench/latency.py --json "$OUT/latency_gpu.json"
step "$PY" bench/latency.py --backends torch-cuda,torch-cuda-fp16 --batch-sizes 1,10,32,64,128,256 \
    --json "$OUT/latency_gpu_sweep.json" --csv /tmp/resdeploy_sweep.csv --png "$OUT/latency_gpu_sweep.png"
if [ -f "$ARTIFACTS/manifest.json" ]; then
  step "$PY" bench/accuracy.py "$ARTIFACTS" --dataset digits --no-progress --json "$OUT/accuracy_gpu.json"
else
  echo "no $ARTIFACTS/manifest.json: accuracy bench skipped (make demo writes it)" | tee -a "$log"
fi
exit $status
