#!/usr/bin/env bash
# One device call (session 3): decode/paged/ragged GPU tests and benchmark (issue 3), the
# engine's host-phase profile and the serving benchmark (issue 5). Results -> $OUT.
# Usage on the GPU machine:  bash experiments/gpu_session3.sh [decode] [profile] [serving]
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
for step in ${*:-decode profile serving}; do
  start=$SECONDS
  case $step in
    decode) XLA_PYTHON_CLIENT_PREALLOCATE=false bash experiments/gpu_issue3.sh tests bench ;;
    profile) timeout 200 python3 experiments/profile_engine_step.py --pools 20000 --async-only \
               2>&1 | tee "$OUT/profile_engine.txt" | tail -6 ;;
    serving) timeout 300 python3 experiments/bench_serving.py --out "$OUT/serving.json" \
               ${SERVING_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" \
               | tee "$OUT/serving.txt" | tail -25 ;;
  esac
  echo "== $step took $((SECONDS - start)) s"
done
