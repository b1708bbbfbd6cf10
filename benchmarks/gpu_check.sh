#!/usr/bin/env bash
# One command for the device machine (run it with the device tool, carrying .whl):
#   bash benchmarks/gpu_check.sh
# Installs the wheels the image lacks, runs the GPU tests (pytest -m gpu) and the overhead benchmark at
# GPU sizes, and prints a short table last. Logs go to $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"

timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_tbptt.py tests/test_gradient_clipping.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -n 20
tests_rc=${PIPESTATUS[0]}

timeout 300 python3 benchmarks/overhead.py --device cuda --sizes gpu \
  --configs bare,lightning_grad_norm,wandb_watch_all,wandb_watch_all_f1,gradient_monitor,gradient_monitor_all_every_step,gradient_monitor_all_every_step_sampled,bpkit_default \
  2>&1 | tee "$OUT/overhead.log" | tail -n 40

echo "== bpkit GPU check =="
echo "device:    $(head -n 1 "$OUT/device.txt")"
echo "gpu tests: $(grep -E 'passed|failed' "$OUT/gpu_tests.log" | tail -n 1) (exit $tests_rc)"
sed -n '/^| model/,$p' "$OUT/overhead.log" | head -n 30
