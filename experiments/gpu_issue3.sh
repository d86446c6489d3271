#!/usr/bin/env bash
# Issue 3 on the GPU machine, one device call: the decode / paged / ragged tests compiled (not
# interpret mode), the decode benchmark (our kernels and the peers in one process), tile sweeps
# of the paged and ragged kernels. Results -> $OUT. Each step has its own time limit (the whole
# default list takes about 8 minutes on an H100, most of it the benchmark).
# Usage on the GPU machine:  bash experiments/gpu_issue3.sh [tests] [bench] [sweep_paged] [sweep_ragged]
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-out}; mkdir -p "$OUT"
steps=${*:-tests bench sweep_ragged}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6" || echo "")
for step in $steps; do
  start=$SECONDS
  case $step in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" $workers \
             tests/test_paged_gpu.py tests/test_paged_attention.py \
             tests/test_ragged_paged_attention.py tests/test_decode_attention.py \
             > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"; tail -40 "$OUT/tests.txt" ;;
    bench) timeout 330 python3 experiments/bench_decode.py --out "$OUT/decode.json" \
             > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; tail -14 "$OUT/bench.txt" ;;
    sweep_paged|sweep_ragged) timeout 150 python3 experiments/bench_decode.py \
             --sweep "${step#sweep_}" 2>&1 | grep -v "^\s*$" > "$OUT/$step.txt"
             cat "$OUT/$step.txt" ;;
  esac
  echo "== $step took $((SECONDS - start)) s"
done
