#!/usr/bin/env bash
# One device call for the models/training and engine issues: GPU-compiled tests, training MFU
# (0.85B, T=2048), serving throughput (continuous vs static), the demo. Results -> $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
for step in ${*:-tests train engine demo}; do
  case $step in
    tests) timeout 170 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" ${TESTS:-tests/test_models_paged.py tests/test_engine.py tests/test_train.py tests/test_generate.py} 2>&1 | tee "$OUT/tests.txt" | tail -15 ;;
    train) timeout 150 python3 experiments/bench_train.py --impls ${IMPLS:-pallas,xla} --out "$OUT/train.json" 2>&1 | tee "$OUT/bench_train.txt" | tail -12 ;;
    engine) timeout 220 python3 experiments/bench_engine.py --out "$OUT/engine.json" 2>&1 | tee "$OUT/bench_engine.txt" | tail -12 ;;
    demo) timeout 120 python3 experiments/demo.py --out /tmp/demo 2>&1 | tr '\r' '\n' | grep -v "^train: " | tee "$OUT/demo.txt" | tail -22; cp /tmp/demo/loss.png "$OUT/demo_loss.png" 2>/dev/null ;;
  esac
done
