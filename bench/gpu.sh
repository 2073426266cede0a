#!/usr/bin/env bash
# The GPU figures of bench/results/gpu/, one short run (under 10 minutes) on a CUDA host, from the
# repo root:   bash bench/gpu.sh          # OUT=DIR to write elsewhere, PYTHON=... the interpreter
#
# 1. the gpu-marked tests: the PyTorch CUDA serving backend, the cuda-python binding, TensorRT
#    where it is installed (skipped with the reason where not);
# 2. a random-init ResNet-50 (BN statistics refreshed) exported with `resdeploy export` (fp32 ONNX
#    + model.pt), since no checkpoint can be downloaded there;
# 3. raw: the backend the service runs (PyTorch CUDA fp16, channels_last, CUDA graphs, uint8 in,
#    normalised on the GPU), images/s by batch size, in process (bench/raw.py);
# 4. served: `bentoml serve` with RESDEPLOY_WORKERS workers on that backend, and bench/load.py at
#    concurrency 8/32/64 (centre crop, scikit-image's photos as JPEG) from CLIENTS load processes on
#    the same host, each level LEVEL_S seconds; the server's CPU per request comes from one client's
#    meter (all of them measure the same server over the same window).
# Needs torch with CUDA, onnx, onnxruntime, onnxscript, bentoml, httpx, psutil, scikit-image.
# Skips the GPU steps, saying why, where no CUDA device is visible.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
WORK=${WORK:-/tmp/resdeploy-gpu}
WORKERS=${WORKERS:-4}
CLIENTS=${CLIENTS:-4}
LEVEL_S=${LEVEL_S:-20}
PORT=${PORT:-3999}
ARCH=${ARCH:-resnet50}
BACKEND=${BACKEND:-pytorch}      # the served backend and precision (DRY_RUN=1 BACKEND=onnxruntime PRECISION=fp32
PRECISION=${PRECISION:-fp16}     # rehearses the whole script on a CPU host)
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=True MPLBACKEND=Agg
log="$OUT/log.txt"
: >"$log"
status=0
step() { echo "== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=$rc; }

step nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step "$PY" -c "import torch, onnxruntime, bentoml; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ort', onnxruntime.__version__, 'bentoml', bentoml.__version__)"
if [ -z "${DRY_RUN:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch: GPU steps skipped" | tee -a "$log"
  exit 0
fi
step "$PY" -m pytest -p no:cacheprovider -m gpu tests/test_torch_backend_cuda.py tests/test_cuda_binding.py \
    tests/test_gpu.py tests/test_tensorrt.py -q -rs

# 2. a ResNet-50 artifact directory (random init: throughput does not depend on the weights)
step "$PY" - "$WORK" "$ARCH" <<'EOF'
import io, sys
from pathlib import Path
import torch
from PIL import Image
from skimage import data
from bench.latency import random_model
work = Path(sys.argv[1])
torch.save(random_model(sys.argv[2], 224).state_dict(), work / "r50.pth")
(work / "photos").mkdir(exist_ok=True)
for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
    if hasattr(data, name):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(work / "photos" / f"{name}.jpg", quality=90)
print("wrote", work / "r50.pth", "and", len(list((work / "photos").iterdir())), "photos")
EOF
step "$PY" -m resdeploy.cli export "$WORK/r50.pth" --arch "$ARCH" --out "$WORK/r50" \
    --precisions fp32 --calib-data "$WORK/photos" --no-progress

# 3. raw rate of the serving backend
step "$PY" bench/raw.py "$WORK/r50" --backend "$BACKEND" --precision "$PRECISION" --batch-sizes ${RAW_BATCHES:-1,8,16,32,64,128,256} \
    --seconds 2 --json "$OUT/raw_resnet50_$PRECISION.json"

# 4. served
RESDEPLOY_ARTIFACTS="$WORK/r50" RESDEPLOY_BACKEND=$BACKEND RESDEPLOY_PRECISION=$PRECISION RESDEPLOY_MAX_BATCH=${MAX_BATCH:-80} \
  RESDEPLOY_WORKERS=$WORKERS RESDEPLOY_DECODE_THREADS=${DECODE_THREADS:-3} \
  setsid "$PY" -m bentoml serve serving.service:Classifier --port "$PORT" >"$OUT/server.log" 2>&1 &
server=$!
for _ in $(seq 1 180); do
  [ "$("$PY" -c "import httpx; print(httpx.get('http://127.0.0.1:$PORT/readyz').status_code)" 2>/dev/null)" = 200 ] && break
  sleep 1
done
echo "== served: $WORKERS workers, $CLIENTS load processes, $LEVEL_S s per level" | tee -a "$log"
for c in 8 32 64; do
  per=$(( (c + CLIENTS - 1) / CLIENTS ))
  pids=()
  for i in $(seq 1 "$CLIENTS"); do
    "$PY" bench/load.py "http://127.0.0.1:$PORT" --concurrency "$per" --tta center --photos --num-images 0 \
      --requests 1000000 --max-seconds "$LEVEL_S" --warmup 4 --json "$WORK/load_c${c}_${i}.json" \
      >"$WORK/load_c${c}_${i}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
done
kill -- -"$server" 2>/dev/null; wait "$server" 2>/dev/null
step "$PY" - "$WORK" "$OUT/load_gpu_resnet50_$PRECISION.json" "$OUT/raw_resnet50_$PRECISION.json" <<'EOF'
import glob, json, sys
work, out, raw_path = sys.argv[1:4]
raw = json.load(open(raw_path))
best_raw = max(r["images_per_s"] for r in raw["rows"])
rows = []
for c in (8, 32, 64):
    docs = [json.load(open(p)) for p in sorted(glob.glob(f"{work}/load_c{c}_*.json"))]
    if not docs:
        continue
    got = [d["rows"][0] for d in docs]
    ok = sum(r["ok"] for r in got)
    elapsed = max(r["elapsed_s"] for r in got)
    first = got[0]
    server_ms = first.get("server_cpu_ms_per_req")
    server_ms_all = None if server_ms is None else server_ms * first["requests"] / max(sum(r["requests"] for r in got), 1)
    rows.append({"concurrency": c, "clients": len(got), "ok": ok, "errors": sum(sum(r["errors"].values()) for r in got),
                 "images_per_s": ok / elapsed, "p50_ms_client0": first["p50_ms"], "p99_ms_client0": first["p99_ms"],
                 "server_cpu_ms_per_req": server_ms_all, "pct_of_best_raw": 100 * ok / elapsed / best_raw})
doc = {"machine": raw["machine"], "raw_best_images_per_s": best_raw, "raw": raw["rows"], "rows": rows,
       "note": "served = bentoml serve, the backend of raw, centre crop, photos as JPEG; clients on the same host"}
json.dump(doc, open(out, "w"), indent=1)
for r in rows:
    print(f"concurrency {r['concurrency']:3d}: {r['images_per_s']:8.1f} images/s served ({r['pct_of_best_raw']:.1f}% of raw "
          f"{best_raw:.0f}), errors {r['errors']}, p50 {r['p50_ms_client0']} ms, server CPU {r['server_cpu_ms_per_req']} ms/request")
EOF
tail -20 "$OUT/server.log" >>"$log"
exit $status
