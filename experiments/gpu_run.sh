#!/usr/bin/env bash
# One device call: environment, GPU conformance, tile sweep, full benchmark. Results -> $OUT.
# Usage on the GPU machine:  bash experiments/gpu_run.sh [conformance] [tune] [bench]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-out}; mkdir -p "$OUT"
steps=${*:-conformance tune bench}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
for step in $steps; do
  case $step in
    conformance) python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_attention_gpu.py 2>&1 | tee "$OUT/conformance.txt" | tail -25 ;;
    tune) python3 experiments/tune_flash.py --out "$OUT/tune_flash.json" 2>&1 | tee "$OUT/tune.txt" | grep -v "^ *$" | tail -120 ;;
    bench) python3 experiments/bench_attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.txt" | tail -40 ;;
    fwd|bwd) python3 experiments/bench_attention.py --only "$step" --out "$OUT/attention_$step.json" 2>&1 | tee "$OUT/bench_$step.txt" | tail -30 ;;
  esac
done
