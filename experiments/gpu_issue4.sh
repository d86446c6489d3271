#!/usr/bin/env bash
# One device call for the models/training issue: training MFU (0.85B, T=2048), the demo on the
# GPU, and the training tests compiled on the GPU. Results -> $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import jax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
for step in ${*:-train demo tests}; do
  case $step in
    train) timeout 300 python3 experiments/bench_train.py --out "$OUT/train.json" 2>&1 | tee "$OUT/bench_train.txt" | tail -20 ;;
    demo) timeout 200 python3 experiments/demo.py --out /tmp/demo 2>&1 | tr '\r' '\n' | grep -v "^train: " | tee "$OUT/demo.txt" | tail -25; cp /tmp/demo/loss.png "$OUT/demo_loss.png" 2>/dev/null ;;
    tests) timeout 200 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_train.py tests/test_generate.py 2>&1 | tee "$OUT/tests.txt" | tail -15 ;;
  esac
done
