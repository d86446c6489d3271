#!/usr/bin/env bash
# The measurements still owed (BENCHMARKS.md says which), one step per device call of at most
# 10 minutes. Results and logs -> $OUT.
#   bash experiments/gpu_pending.sh decode     # H100: GPU decode tests + bench_decode's first
#                                              #   three rows (chained timing compiles slowly:
#                                              #   all six rows + the mixed step pass 500 s)
#   bash experiments/gpu_pending.sh decode2    # H100: the other three rows + the mixed step
#   bash experiments/gpu_pending.sh paged      # H100: paged tile / split sweep on the rows short
#                                              #   of 0.95x contiguous (session 5)
#   bash experiments/gpu_pending.sh prefetch   # H100: page ids one tile ahead, paged + ragged
#   bash experiments/gpu_pending.sh ragged     # H100: the mixed-step tile sweep and its halves
#   bash experiments/gpu_pending.sh fused      # H100: bench_fused (engine-sized rows chained)
#   bash experiments/gpu_pending.sh train      # H100: pallas unpacked, pallas_mosaic, cudnn
#   bash experiments/gpu_pending.sh train_bwd  # H100: cudnn, pallas_mosaic_bwd, pallas unpacked
#   bash experiments/gpu_pending.sh profile    # H100: engine step profile, with and without
#                                              #   the dispatch thread
#   bash experiments/gpu_pending.sh serving    # H100: serving: continuous at token budgets 512
#                                              #   and 2048, static, HF generate
#   bash experiments/gpu_pending.sh mosaic     # H100: Hopper kernel's GPU tests + check
#   bash experiments/gpu_pending.sh mosaic_bwd # H100: the Mosaic GPU backward's GPU tests, then
#                                              #   the backward alone: variants, Triton, cuDNN
#   bash experiments/gpu_pending.sh mosaic_bwd_tests  # H100: its GPU tests given the time
#                                              #   its compiles take; train step packed, default
#   bash experiments/gpu_pending.sh attention_bwd  # H100: fwd+bwd vs cuDNN, either backward
#   bash experiments/gpu_pending.sh attention_bwd64  # H100: the same at H = 64, Triton vs Mosaic
#   bash experiments/gpu_pending.sh train_shape  # H100: the train step's attention shape
#                                              #   (H = 64, GQA 32/8, causal T = 2048): Mosaic
#                                              #   forward and backward variants vs cuDNN
#   bash experiments/gpu_pending.sh decode_profile  # H100: paged vs contiguous decode on the
#                                              #   rows short of 0.95x: timings, PTX, ncu
#   bash experiments/gpu_pending.sh decode_train  # H100: paged decode over pools in and out of
#                                              #   order; the train step, cuDNN vs default
#   bash experiments/gpu_pending.sh train_trace  # H100: the train step, cuDNN vs default,
#                                              #   with each kernel's GPU time inside the step
#   bash experiments/gpu_pending.sh decode_ncu  # H100: ncu of the contiguous and the paged
#                                              #   decode (pages in order) on b1 x 32768
#   bash experiments/gpu_pending.sh fused_bwd  # H100: the fused backward's GPU tests (a few),
#                                              #   then it against the two kernels and cuDNN
#   bash experiments/gpu_pending.sh delta      # H100: delta in the dQ kernel or by XLA (H = 64):
#                                              #   GPU tests, backward variants, the train step
#   bash experiments/gpu_pending.sh idle       # H100: the train step traced with cuDNN, the
#                                              #   Mosaic pair, Mosaic + Triton, Triton: which
#                                              #   kernels the GPU sits idle before
#   bash experiments/gpu_pending.sh kernel_diff  # H100: the train step traced with cuDNN and
#                                              #   with ours: every kernel whose time differs
#   bash experiments/gpu_pending.sh decode_trace  # H100: every GPU kernel of one decode call,
#                                              #   contiguous and paged, from a profiler trace
#   bash experiments/gpu_pending.sh fwd64      # H100: the forward's H = 64 variants on both
#                                              #   H = 64 configs
#   bash experiments/gpu_pending.sh fwd_context  # H100: the H = 64 forward alone and after
#                                              #   the step's matmuls, ours and cuDNN's
#   bash experiments/gpu_pending.sh fwd_ncu    # H100: ncu of our H = 64 forward and cuDNN's
#                                              #   at the train step's shape, our SASS
#   bash experiments/gpu_pending.sh bwd_driver # H100: a few Mosaic backward GPU tests (the
#                                              #   one-driver refactor of session 7)
#   bash experiments/gpu_pending.sh fwd_sched  # H100: the forward's scheduling options
#                                              #   (softmax under PV, no ping-pong) at H = 64
#                                              #   and 128, ptxas's report, GPU tests
#   bash experiments/gpu_pending.sh fwd_default  # H100: the forward's GPU tests with the
#                                              #   session 8 defaults, mgpu_check on the d64
#                                              #   configs, the train step cuDNN / default twice
#   bash experiments/gpu_pending.sh fwd64_sweep  # H100: the H = 64 tiles around the session 8
#                                              #   default, on the train step's shape (twice)
#                                              #   and the d64 full row; the mask GPU tests
#   bash experiments/gpu_pending.sh train_pairs  # H100: the forward's mask GPU tests on the
#                                              #   session 8 defaults; the train step cuDNN /
#                                              #   default twice more
#   bash experiments/gpu_pending.sh persistent  # H100: the persistent grid's GPU tests, then
#                                              #   it against the default at H = 64 and 128
#   bash experiments/gpu_pending.sh attention_fwd  # H100: bench_attention's forward rows, the
#                                              #   default path, the Mosaic and Triton kernels
#                                              #   and cuDNN (session 8 defaults)
#   bash experiments/gpu_pending.sh train_pairs3  # H100: the train step cuDNN / default twice
#   bash experiments/gpu_pending.sh sass       # H100: ncu's per-instruction SASS view of
#                                              #   the H = 64 forward, ours and cuDNN's
#   bash experiments/gpu_pending.sh pin        # H100: the softmax pinned before O's wait,
#                                              #   four consumers; A/B against .snap_old
#   bash experiments/gpu_pending.sh pin2       # H100: the same with P_{j-1} kept alive;
#                                              #   the backward's overlap
#   bash experiments/gpu_pending.sh fwd9       # H100: session 9 defaults: H = 64 variants,
#                                              #   bench_attention fwd and fwd+bwd rows
#   bash experiments/gpu_pending.sh train9     # H100: the train step cuDNN / default twice;
#                                              #   the paged decode at one program per SM
#   bash experiments/gpu_pending.sh final9     # H100: train step ABBA; H = 128 forward rows;
#                                              #   the backward's other order, GPU tests
#   bash experiments/gpu_pending.sh order10    # H100: every forward config, its default
#                                              #   launched tile-major and head-major
#   bash experiments/gpu_pending.sh order10b   # H100: the backward head-major; the GPU tests
#                                              #   of head-major launches
#   bash experiments/gpu_pending.sh bench10f   # H100: bench_attention forward rows, session
#                                              #   10 defaults, the Triton pair, cuDNN
#   bash experiments/gpu_pending.sh bench10b   # H100: the same for forward + backward
#   bash experiments/gpu_pending.sh sweep10a   # H100: forward variants in the new launch
#                                              #   order: H = 128 third stage, H = 64 schedules
#   bash experiments/gpu_pending.sh sweep10b   # H100: backward variants at b1 s16384 d128
#   bash experiments/gpu_pending.sh sweep10c   # H100: H = 64 forward defaults A/B, the
#                                              #   fused backward at b1 s16384, GPU tests
#   bash experiments/gpu_pending.sh final10    # H100: bench_attention forward rows with the
#                                              #   final session 10 defaults; GPU tests
#   bash experiments/gpu_pending.sh sweep10d   # H100: tiles for the short causal H = 64 row
#   bash experiments/gpu_pending.sh sweep10e   # H100: snake-order persistent grid on the
#                                              #   causal rows, either launch order
#   bash experiments/gpu_pending.sh final10b   # H100: bench_attention forward and fwd+bwd
#                                              #   rows with the persistent short rows; GPU tests
#   bash experiments/gpu_pending.sh final10c   # H100: stages of the long H = 64 full rows;
#                                              #   the mask and backward GPU tests
#   bash experiments/gpu_pending.sh bwd_tests10  # H100: the backward's default gradient
#                                              #   tests, one line each, as far as time goes
#   bash experiments/gpu_pending.sh fwd_tests10  # H100: the forward's mask and every-output
#                                              #   GPU tests, one line each
#   (preload11, preload11b, addr11, addr11b: session 11 runs of code since changed or taken
#   out, the preload variants' first names and address_order of commits 2b4a449 / d5f034b;
#   their results are in BENCHMARKS.md and benchmarks/sweeps/profile_decode_session11.txt)
#   bash experiments/gpu_pending.sh preload11c # H100: tiles around the new paged default,
#                                              #   pool order; the paged GPU tests
#   bash experiments/gpu_pending.sh tile11     # H100: 64-key tiles, two programs per SM
#   bash experiments/gpu_pending.sh serving11  # H100: bench_serving without HF
#   bash experiments/gpu_pending.sh decode11a  # H100: bench_decode's first three rows (and
#   bash experiments/gpu_pending.sh decode11b  #   the mixed step), then the other three
#   (psmem12, psmem12b, ptx12, pin12, pin12b, pin12c, stages12: session 12 runs of the
#   forward's P in shared memory, pinned softmax, and lse from registers with a third stage
#   at H = 128, all taken out again (commits db9f036, 7f052d3, 4579e6d); their results are
#   in BENCHMARKS.md, session 12 under issue 7)
#   bash experiments/gpu_pending.sh sched64    # H100: the H = 128 schedule at H = 64
#   bash experiments/gpu_pending.sh det13      # H100: cuDNN's backward, deterministic or not,
#                                              #   and its speed under XLA's determinism flags
#   (nondet13: deterministic=False before its rule, every row fused; its results are in
#   BENCHMARKS.md, session 13 under issue 7; nondet13c runs the same benchmark)
#   bash experiments/gpu_pending.sh nondet13b  # H100: the backward alone, fused vs two
#                                              #   kernels, on the long rows, the train step
#   bash experiments/gpu_pending.sh nondet13c  # H100: deterministic=False with its rule: GPU
#                                              #   tests, the other H = 64 rows, fwd+bwd
#   bash experiments/gpu_pending.sh bwd64_13   # H100: the H = 64 backward's variants on the
#                                              #   long rows
#   (fma13, slack13, sums13: session 13 runs of the forward with part of its exp2s on the
#   FMA pipe, with O rescaled only where a row's max moved, and with the row sums from the
#   tensor cores, all taken out again (commits ab545a9, dd870d3, 5909b39); their results are
#   in BENCHMARKS.md, session 13 under issue 7)
#   NCCL_NVLS_ENABLE=0 bash experiments/gpu_pending.sh scaling8b   # several GPUs: the 8B shape
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/env.txt"
# gpu_tests SECONDS FILE EXPR: FILE's tests that -k EXPR selects; the summary goes to $L.
gpu_tests() {
  timeout "$1" python3 -m pytest -q -p no:cacheprovider -o addopts="" "tests/$2" -k "$3" 2>&1 \
    | tail -3 | tee -a "$L"
}
# profile_passes SECONDS PASSES ROWS VARIANTS: profile_decode --time, PASSES times.
profile_passes() {
  for pass in $(seq "$2"); do
    timeout "$1" python3 experiments/profile_decode.py --time --rows "$3" --variants "$4" 2>&1 \
      | grep -v "^\s*$" | tail -12 | tee -a "$L"
  done
}
# bench_half SECONDS HALF: bench_decode's first (a: 1x131072, 1x32768, 16x4096) or second
# (b: 64x4096, 64x1024, 256x1024) three rows, each followed by the mixed ragged step.
bench_half() {
  local rows=1x131072,1x32768,16x4096
  [ "$2" = b ] && rows=64x4096,64x1024,256x1024
  timeout "$1" python3 experiments/bench_decode.py --configs "$rows" \
    --out "$OUT/decode_$2.json" 2>&1 | tee "$OUT/bench_decode_$2.txt" | tail -14
}
for step in "$@"; do
  start=$SECONDS
  case $step in
    decode)
      timeout 60 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" \
        tests/test_paged_gpu.py 2>&1 | tee "$OUT/tests_decode.txt" | tail -3
      bench_half 480 a ;;
    decode2) bench_half 560 b ;;
    paged)
      timeout 500 python3 experiments/bench_decode.py --sweep paged \
        --configs 1x32768,16x4096,64x4096 2>&1 | tee "$OUT/sweep_paged.txt" | tail -24 ;;
    prefetch)
      # Page ids read one key tile ahead or in the step: paged decode on the rows short of
      # 0.95x contiguous, then the mixed ragged step against the split baseline.
      timeout 560 python3 experiments/bench_decode.py --sweep prefetch \
        --configs 1x32768,16x4096,64x4096 2>&1 | tee "$OUT/sweep_prefetch.txt" | tail -20 ;;
    ragged)
      timeout 200 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" \
        tests/test_ragged_paged_attention.py 2>&1 | tail -3
      timeout 200 python3 experiments/bench_decode.py --sweep ragged 2>&1 | grep -v "^\s*$" \
        | tee "$OUT/sweep_ragged.txt" | tail -8 ;;
    fused) timeout 300 python3 experiments/bench_fused.py --out "$OUT/fused.json" 2>&1 \
             | tee "$OUT/bench_fused.txt" | tail -16 ;;
    train)
      timeout 280 python3 experiments/bench_train.py --impls pallas,pallas_mosaic,cudnn \
        --unpacked --out "$OUT/train_unpacked.json" 2>&1 | tee "$OUT/bench_train.txt" | tail -5
      timeout 250 python3 experiments/bench_train.py --impls pallas,pallas_mosaic \
        --out "$OUT/train_packed.json" 2>&1 | tee -a "$OUT/bench_train.txt" | tail -4 ;;
    train_bwd)
      # The Mosaic GPU backward in the train step, cuDNN first (the row the target compares
      # with), then the Triton backward; one document per row, as cuDNN takes no segment ids.
      timeout 560 python3 experiments/bench_train.py --impls cudnn,pallas_mosaic_bwd,pallas \
        --unpacked --out "$OUT/train_bwd.json" 2>&1 | tee "$OUT/bench_train_bwd.txt" | tail -5 ;;
    profile)
      timeout 140 python3 experiments/profile_engine_step.py --pools 20000 --async-only 2>&1 \
        | tee "$OUT/profile_engine.txt" | tail -6
      timeout 140 python3 experiments/profile_engine_step.py --pools 20000 --async-only \
        --no-dispatch-thread 2>&1 | tee "$OUT/profile_engine_no_thread.txt" | tail -6 ;;
    serving)
      timeout 540 python3 experiments/bench_serving.py --hf --out "$OUT/serving.json" 2>&1 \
        | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/serving.txt" | tail -16 ;;
    mosaic)
      timeout 330 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py 2>&1 | tee "$OUT/mgpu_tests.txt" | tail -3
      timeout 230 python3 experiments/mgpu_check.py --out "$OUT/mgpu_check.json" 2>&1 \
        | tee "$OUT/mgpu_check.txt" | tail -25 ;;
    mosaic_bwd)
      # The GPU tests alone (the file's other tests are CPU ones), with a traceback dump if one
      # hangs; then the backward alone, its block-size variants, Triton's and cuDNN's.
      timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        -o faulthandler_timeout=60 --durations=0 tests/test_attention_mgpu_bwd.py \
        -k "gpu_matches or gpu_deterministic" 2>&1 | tee "$OUT/mgpu_bwd_tests.txt" | tail -15
      timeout 330 python3 experiments/mgpu_bwd_check.py --out "$OUT/mgpu_bwd_check.json" 2>&1 \
        | tee "$OUT/mgpu_bwd_check.txt" | tail -20 ;;
    mosaic_bwd_tests)
      timeout 330 python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=0 \
        tests/test_attention_mgpu_bwd.py -k "gpu_matches or gpu_deterministic" 2>&1 \
        | tee "$OUT/mgpu_bwd_tests.txt" | tail -14
      timeout 220 python3 experiments/bench_train.py --impls default,pallas \
        --out "$OUT/train_default_packed.json" 2>&1 | tee "$OUT/bench_train_default.txt" \
        | tail -4 ;;
    attention_bwd)
      timeout 560 python3 experiments/bench_attention.py --only bwd \
        --impls cudnn,fastattn,fastattn_mosaic,fastattn_mosaic_bwd \
        --out "$OUT/attention_bwd.json" 2>&1 | tee "$OUT/bench_attention_bwd.txt" | tail -16 ;;
    attention_bwd64)
      timeout 400 python3 experiments/bench_attention.py --only bwd --configs d64 \
        --impls cudnn,fastattn_pallas,fastattn_mosaic_bwd \
        --out "$OUT/attention_bwd64.json" 2>&1 | tee "$OUT/bench_attention_bwd64.txt" | tail -10 ;;
    train_shape)
      timeout 150 python3 experiments/mgpu_check.py --configs "train step" \
        --out "$OUT/mgpu_check_train.json" 2>&1 | tee "$OUT/mgpu_check_train.txt" | tail -8
      timeout 420 python3 experiments/mgpu_bwd_check.py --configs "train step" \
        --out "$OUT/mgpu_bwd_check_train.json" 2>&1 | tee "$OUT/mgpu_bwd_check_train.txt" \
        | tail -12 ;;
    decode_profile)
      timeout 100 python3 experiments/profile_decode.py --time 2>&1 \
        | tee "$OUT/profile_decode_time.txt"
      rm -rf /tmp/xladump
      XLA_FLAGS=--xla_dump_to=/tmp/xladump timeout 100 python3 experiments/profile_decode.py \
        --once > /dev/null 2>&1
      ptx=$(grep -l decode_attention /tmp/xladump/*.ptx 2>/dev/null)
      echo "ptx files: $(echo $ptx | wc -w)"; [ -n "$ptx" ] && tar czf "$OUT/decode_ptx.tgz" $ptx
      timeout 300 ncu --clock-control none -k regex:decode_attention --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats \
        python3 experiments/profile_decode.py --once > "$OUT/ncu_decode.txt" 2>&1
      grep -E "decode_attention|Duration|DRAM Throughput|Memory Throughput|Registers|Achieved Occ|Stall Long|Warp Cycles Per Issued" \
        "$OUT/ncu_decode.txt" | head -80 ;;
    decode_train)
      timeout 220 python3 experiments/profile_decode.py --time 2>&1 \
        | tee "$OUT/profile_decode_time.txt"
      timeout 360 python3 experiments/bench_train.py --impls cudnn,default --unpacked \
        --out "$OUT/train_default.json" 2>&1 | tee "$OUT/bench_train_default.txt" | tail -5 ;;
    train_trace)
      timeout 500 python3 experiments/bench_train.py --impls cudnn,default --unpacked \
        --trace /tmp/train_trace --out "$OUT/train_trace.json" 2>&1 \
        | tee "$OUT/bench_train_trace.txt" | grep -v "^wrote" | tail -60 ;;
    decode_ncu)
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 ncu --clock-control none \
        -k regex:decode_attention --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats \
        --section SchedulerStats python3 experiments/profile_decode.py --once \
        --rows 1x32768 --variants "paged in order" > "$OUT/ncu_decode.txt" 2>&1
      grep -E "decode_attention|Duration|DRAM Throughput|Registers Per|Achieved Occ|Theoretical Occ|Stall|Warp Cycles Per Issued|Dynamic Shared|Block Limit" \
        "$OUT/ncu_decode.txt" | head -70 ;;
    fused_bwd)
      timeout 170 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" --durations=0 \
        tests/test_attention_mgpu_bwd.py -k "gpu_fused and (2-1024-1024-8-2-128 or 1-1024-512 or 1-2048-2048)" \
        2>&1 | tee "$OUT/fused_tests.txt" | tail -12
      for c in "train step" "b4 s4096 h16 d128 causal" "b1 s16384"; do
        timeout 125 python3 experiments/mgpu_bwd_check.py --configs "$c" --variants fused \
          --out "$OUT/fused_$(echo $c | tr -dc a-z0-9).json" 2>&1 | grep -v "^wrote" \
          | tee -a "$OUT/fused_check.txt" | tail -5
      done ;;
    delta)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" --durations=0 \
        tests/test_attention_mgpu_bwd.py -k "gpu_matches and (2-1024-1024-4-1-64 or 1-1024-512-4-2-64)" \
        2>&1 | tee "$OUT/delta_tests.txt" | tail -6
      timeout 110 python3 experiments/mgpu_bwd_check.py --configs "train step" \
        --variants "delta in dq" --out "$OUT/delta_check.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/delta_check.txt" | tail -4
      timeout 300 python3 experiments/bench_train.py --impls cudnn,default --unpacked \
        --trace /tmp/train_trace --out "$OUT/train_delta.json" 2>&1 \
        | tee "$OUT/bench_train_delta.txt" | grep -E "ms/step|GPU kernels|attention  " ;;
    idle)
      timeout 560 python3 experiments/bench_train.py --impls cudnn,default,pallas_mosaic,pallas \
        --unpacked --trace /tmp/train_trace --out "$OUT/train_idle.json" 2>&1 \
        | tee "$OUT/bench_train_idle.txt" | grep -E "ms/step|GPU kernels|attention  |idle" ;;
    kernel_diff)
      timeout 400 python3 experiments/bench_train.py --impls cudnn,default --unpacked \
        --trace /tmp/train_trace --out "$OUT/train_diff.json" 2>&1 \
        | tee "$OUT/bench_train_diff.txt" | grep -E "ms/step|GPU kernels|minus|^    [+-]" ;;
    decode_trace)
      timeout 200 python3 experiments/profile_decode.py --trace /tmp/decode_trace 2>&1 \
        | tee "$OUT/decode_trace.txt" | grep -v "^wrote" ;;
    fwd64)
      timeout 250 python3 experiments/mgpu_check.py --configs d64 \
        --out "$OUT/mgpu_check_d64.json" 2>&1 | tee "$OUT/mgpu_check_d64.txt" | tail -16 ;;
    fwd_context)
      timeout 200 python3 experiments/fwd_in_context.py --out "$OUT/fwd_in_context.json" \
        2>&1 | tee "$OUT/fwd_in_context.txt" | grep -v "^wrote" ;;
    fwd_ncu)
      mkdir -p /tmp/mdump
      MOSAIC_GPU_DUMP_TO=/tmp/mdump MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTXAS=1 \
        MOSAIC_GPU_DUMP_PTX=1 timeout 120 python3 experiments/fwd_in_context.py --once \
        --out /tmp/once.json > "$OUT/fwd_dump_log.txt" 2>&1
      ls -la /tmp/mdump | head; tar czf "$OUT/fwd_dump.tgz" -C /tmp mdump
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 ncu --clock-control none \
        -k "regex:flash_attention_fwd|fprop" --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        --section InstructionStats --section Occupancy --section LaunchStats \
        python3 experiments/fwd_in_context.py --once --out /tmp/once.json \
        > "$OUT/ncu_fwd.txt" 2>&1
      grep -E "fwd|fprop|Duration|Registers Per|Achieved Occ|Warp Cycles Per Issued|Issued Ipc|Issue Slots|Compute \(SM\)|Block Limit|Dynamic Shared" "$OUT/ncu_fwd.txt" | head -60
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 ncu --clock-control none \
        -k "regex:flash_attention_fwd|fprop" \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
        python3 experiments/fwd_in_context.py --once --out /tmp/once.json \
        > "$OUT/ncu_fwd_metrics.txt" 2>&1
      tail -5 "$OUT/ncu_fwd_metrics.txt" ;;
    bwd_driver)
      timeout 300 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" --durations=0 \
        tests/test_attention_mgpu_bwd.py -k "(gpu_matches and (2-1024-1024-4-1-64 or 1-1024-1024-4-2-128-False)) or (gpu_fused and 2-1024-1024-8-2-128)" \
        2>&1 | tee "$OUT/bwd_driver_tests.txt" | tail -12 ;;
    fwd_sched)
      # ptxas's report (registers, spills, wgmma serialisation warnings) goes to stdout
      MOSAIC_GPU_DUMP_PTXAS=1 timeout 200 python3 experiments/mgpu_check.py --configs "d64" \
        --variants "overlap,pingpong" --out "$OUT/mgpu_check_sched64.json" 2>&1 \
        | grep -v "^wrote" | tee "$OUT/mgpu_check_sched64.txt" | grep -v "ptxas" | tail -10
      timeout 200 python3 experiments/mgpu_check.py --configs "d128" \
        --variants "overlap,pingpong" --out "$OUT/mgpu_check_sched128.json" 2>&1 \
        | grep -v "^wrote" | tee "$OUT/mgpu_check_sched128.txt" | tail -22
      grep -h "C75\|Used\|spill" "$OUT/mgpu_check_sched64.txt" | sort | uniq -c \
        | sort -rn | head -20 | tee "$OUT/ptxas_summary.txt"
      timeout 170 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "variants" 2>&1 | tee "$OUT/sched_tests.txt" \
        | tail -4 ;;
    fwd_default)
      timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "gpu and not variants" 2>&1 \
        | tee "$OUT/fwd_default_tests.txt" | tail -3
      timeout 60 python3 experiments/mgpu_check.py --configs "d64" --no-variants \
        --out "$OUT/mgpu_check_default64.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/mgpu_check_default64.txt" | tail -4
      timeout 340 python3 experiments/bench_train.py --impls cudnn,default,cudnn,default \
        --unpacked --out "$OUT/train_default.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/bench_train_default.txt" | tail -6 ;;
    fwd64_sweep)
      for run in 1 2; do
        timeout 150 python3 experiments/mgpu_check.py --configs "train step" --variants "np" \
          --out "$OUT/mgpu_check_sweep64_train_$run.json" 2>&1 | grep -v "^wrote" \
          | tee "$OUT/mgpu_check_sweep64_train_$run.txt" | tail -11
      done
      timeout 120 python3 experiments/mgpu_check.py --configs "d64 full" --variants "np" \
        --out "$OUT/mgpu_check_sweep64_full.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/mgpu_check_sweep64_full.txt" | tail -11
      timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "gpu_masks or gpu_every or gpu_matches" 2>&1 \
        | tee "$OUT/fwd_default_mask_tests.txt" | tail -3 ;;
    train_pairs)
      timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "gpu_masks or gpu_every" 2>&1 \
        | tee "$OUT/fwd_mask_tests.txt" | tail -3
      timeout 380 python3 experiments/bench_train.py --impls default,cudnn,default,cudnn \
        --unpacked --out "$OUT/train_pairs.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/bench_train_pairs.txt" | tail -6 ;;
    persistent)
      timeout 200 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "persistent_grid" 2>&1 \
        | tee "$OUT/persistent_tests.txt" | tail -3
      timeout 100 python3 experiments/mgpu_check.py --configs "d64" --variants "persistent" \
        --out "$OUT/mgpu_check_persistent64.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/mgpu_check_persistent64.txt" | tail -8
      timeout 150 python3 experiments/mgpu_check.py --configs "d128" --variants "persistent" \
        --out "$OUT/mgpu_check_persistent128.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/mgpu_check_persistent128.txt" | tail -17 ;;
    attention_fwd)
      timeout 420 python3 experiments/bench_attention.py --only fwd \
        --impls cudnn,fastattn,fastattn_mosaic,fastattn_pallas \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/bench_attention_fwd.txt" | tail -18 ;;
    train_pairs3)
      timeout 400 python3 experiments/bench_train.py --impls cudnn,default,cudnn,default \
        --unpacked --out "$OUT/train_pairs3.json" 2>&1 | grep -v "^wrote" \
        | tee "$OUT/bench_train_pairs3.txt" | tail -6 ;;
    sass)
      # Per-instruction view of the H = 64 forward, ours and cuDNN's: ncu's source page
      # (SASS with executed counts and stall samples per instruction), and our cubin's SASS.
      which ncu nvdisasm cuobjdump ptxas 2>&1 | tee "$OUT/tools.txt"
      ls /usr/local/cuda/bin 2>/dev/null | tr '\n' ' ' >> "$OUT/tools.txt"
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 ncu --clock-control none \
        -k "regex:flash_attention_fwd|fprop" --section SourceCounters \
        --section WarpStateStats --section InstructionStats -f -o /tmp/fwd_src \
        python3 experiments/fwd_in_context.py --once --out /tmp/once.json \
        > "$OUT/ncu_src_log.txt" 2>&1
      tail -3 "$OUT/ncu_src_log.txt"
      ncu -i /tmp/fwd_src.ncu-rep --page source --csv --print-source sass \
        > /tmp/sass_src.csv 2> "$OUT/ncu_src_err.txt"
      head -c 300 "$OUT/ncu_src_err.txt"; wc -l /tmp/sass_src.csv
      gzip -c /tmp/sass_src.csv > "$OUT/sass_src.csv.gz"
      ncu -i /tmp/fwd_src.ncu-rep --page details --csv > /tmp/details.csv 2>&1
      gzip -c /tmp/details.csv > "$OUT/details.csv.gz"
      mkdir -p /tmp/mdump
      MOSAIC_GPU_DUMP_TO=/tmp/mdump MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 \
        timeout 120 python3 experiments/fwd_in_context.py --once --out /tmp/once.json \
        > "$OUT/dump_log.txt" 2>&1
      ls -la /tmp/mdump | head -20 | tee "$OUT/dump_ls.txt"
      for f in /tmp/mdump/*.ptx; do
        [ -f "$f" ] || continue
        ptxas -arch=sm_90a -o /tmp/fwd.cubin "$f" 2>> "$OUT/ptxas_err.txt" \
          && (cuobjdump -sass /tmp/fwd.cubin || nvdisasm /tmp/fwd.cubin) \
          > "$OUT/$(basename "$f" .ptx).sass" 2>> "$OUT/ptxas_err.txt"
      done
      ls -la "$OUT" ;;
    pin)
      # Session 9: the softmax pinned before the wait for O (optimization barrier), and four
      # 64-row consumers at the 112 registers the producer gives back. .snap_old is the
      # code before both (the A/B runs in the same call). SASS loops of the new default.
      mkdir -p /tmp/pdump
      MOSAIC_GPU_DUMP_TO=/tmp/pdump MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 \
        timeout 100 python3 experiments/fwd_in_context.py --once --out /tmp/once.json \
        > /tmp/pdump_log.txt 2>&1
      for f in /tmp/pdump/*.ptx; do
        ptxas -arch=sm_90a -o /tmp/pin.cubin "$f" > /tmp/ptxas_pin.txt 2>&1 \
          && cuobjdump -sass /tmp/pin.cubin > /tmp/pin.sass \
          && python3 experiments/sass_loops.py /tmp/pin.sass > "$OUT/pin_loops.txt"
      done
      grep -B2 -A30 "^loop" "$OUT/pin_loops.txt" | grep -E "^loop|DEPBAR|FMNMX|MUFU" | head -20
      timeout 150 python3 experiments/mgpu_check.py --configs "d64" --variants "4 consumers" \
        --out "$OUT/pin_d64.json" 2>&1 | grep -v "^wrote" > "$OUT/pin_d64.txt"
      tail -8 "$OUT/pin_d64.txt"
      (cd ../.snap_old && timeout 80 python3 experiments/mgpu_check.py --configs "d64" \
        --no-variants --out "$OUT/old_d64.json" 2>&1 | grep -v "^wrote" > "$OUT/old_d64.txt")
      tail -4 "$OUT/old_d64.txt"
      timeout 110 python3 experiments/mgpu_check.py --configs "d128" --no-variants \
        --out "$OUT/pin_d128.json" 2>&1 | grep -v "^wrote" > "$OUT/pin_d128.txt"
      tail -7 "$OUT/pin_d128.txt"
      (cd ../.snap_old && timeout 110 python3 experiments/mgpu_check.py --configs "d128" \
        --no-variants --out "$OUT/old_d128.json" 2>&1 | grep -v "^wrote" \
        > "$OUT/old_d128.txt")
      tail -7 "$OUT/old_d128.txt"
      timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "variants and consumers=4" 2>&1 | tail -3 ;;
    pin2)
      # Session 9, second try: the pinned softmax with P_{j-1} kept alive past O's wait; four
      # consumers; the backward's overlap. Few files: logs go to log.txt.
      L="$OUT/log.txt"
      mkdir -p /tmp/p2dump
      MOSAIC_GPU_DUMP_TO=/tmp/p2dump MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 \
        timeout 100 python3 experiments/fwd_in_context.py --once --out /tmp/once.json \
        > /tmp/p2dump_log.txt 2>&1
      for f in /tmp/p2dump/*.ptx; do
        ptxas -arch=sm_90a -o /tmp/p2.cubin "$f" 2>&1 | grep -v "^$" | head -5 | tee -a "$L"
        cuobjdump -sass /tmp/p2.cubin > /tmp/p2.sass \
          && python3 experiments/sass_loops.py /tmp/p2.sass > "$OUT/loops.txt"
      done
      grep -E "^loop|DEPBAR|FMNMX|MUFU" "$OUT/loops.txt" | head -24
      timeout 150 python3 experiments/mgpu_check.py --configs "d64" --variants "4 consumers" \
        --out "$OUT/d64.json" 2>&1 | grep -v "^wrote" >> "$L"
      tail -9 "$L"
      (cd ../.snap_old && timeout 80 python3 experiments/mgpu_check.py --configs "d64" \
        --no-variants --out "$OUT/old_d64.json" 2>&1 | grep -v "^wrote" >> "$L")
      tail -4 "$L"
      timeout 110 python3 experiments/mgpu_check.py --configs "d128" --no-variants \
        --out "$OUT/d128.json" 2>&1 | grep -v "^wrote" >> "$L"
      tail -7 "$L"
      MOSAIC_GPU_DUMP_PTXAS=1 timeout 150 python3 experiments/mgpu_bwd_check.py \
        --configs "d64" --variants "overlap" --out "$OUT/bwd64.json" 2>&1 \
        | grep -v "^wrote" > /tmp/bwd64.txt
      grep -h "C75" /tmp/bwd64.txt | sort | uniq -c | head -5 | tee -a "$L"
      grep -v "ptxas" /tmp/bwd64.txt | tail -6 | tee -a "$L"
      timeout 100 python3 experiments/mgpu_bwd_check.py --configs "b4 s4096 h16 d128" \
        --variants "overlap" --out "$OUT/bwd128.json" 2>&1 | grep -v "^wrote" \
        | tail -6 | tee -a "$L"
      timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "variants and c4" 2>&1 | tail -3 | tee -a "$L"
      timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu_bwd.py -k "gpu_overlap" 2>&1 | tail -3 | tee -a "$L" ;;
    fwd9)
      # Session 9 defaults (H = 64 forward: four consumers; H = 128 backward: overlap):
      # the variants around the new H = 64 default, then bench_attention's rows.
      L="$OUT/log.txt"
      timeout 120 python3 experiments/mgpu_check.py --configs "d64" \
        --variants "4 consumers,session 8" --out "$OUT/d64.json" 2>&1 | grep -v "^wrote" \
        > /tmp/d64.txt
      grep -v "errors" /tmp/d64.txt | tail -12 | tee -a "$L"
      timeout 220 python3 experiments/bench_attention.py --only fwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" | tail -16 | tee -a "$L"
      timeout 330 python3 experiments/bench_attention.py --only bwd --impls cudnn,fastattn \
        --out "$OUT/attention_bwd.json" 2>&1 | grep -v "^wrote" | tail -16 | tee -a "$L" ;;
    train9)
      # Session 9 defaults in the train step, cuDNN / default twice; then the paged decode at
      # one program per SM on the two rows short of 0.95x contiguous.
      L="$OUT/log.txt"
      timeout 400 python3 experiments/bench_train.py --impls cudnn,default,cudnn,default \
        --unpacked --out "$OUT/train9.json" 2>&1 | grep -v "^wrote" | tail -6 | tee -a "$L"
      timeout 150 python3 experiments/profile_decode.py --time \
        --variants "paged,paged one wave,paged one wave st3" 2>&1 | tail -10 | tee -a "$L" ;;
    final9)
      # Session 9's last call: the train step in the order cuDNN, default, default, cuDNN (a
      # drift over the process cancels); the H = 128 forward rows after the pin came out;
      # the backward's other product order on the GPU, as far as time allows.
      L="$OUT/log.txt"
      timeout 420 python3 experiments/bench_train.py --impls cudnn,default,default,cudnn \
        --unpacked --out "$OUT/train_abba.json" 2>&1 | grep -v "^wrote" | tail -6 | tee -a "$L"
      timeout 80 python3 experiments/bench_attention.py --only fwd --configs d128 \
        --impls cudnn,fastattn --out "$OUT/attention_fwd128.json" 2>&1 | grep -v "^wrote" \
        | tail -8 | tee -a "$L"
      timeout 75 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu_bwd.py -k "gpu_other_product_order" 2>&1 | tail -3 \
        | tee -a "$L" ;;
    order10)
      # Session 10: each forward config's default launched tile by tile (as until now) and
      # head by head (a head's query tiles side by side, sharing its K/V in L2), on a grid
      # and persistent; cuDNN and Triton in the same process.
      L="$OUT/log.txt"
      timeout 570 python3 experiments/mgpu_check.py --variants "head-major" \
        --out "$OUT/fwd_order.json" 2>&1 | grep -v "^wrote" > /tmp/fwd_order.txt
      grep -v "errors" /tmp/fwd_order.txt | tail -40 | tee -a "$L" ;;
    order10b)
      # Session 10: the backward head-major on three configs; the head-major GPU tests.
      L="$OUT/log.txt"
      timeout 330 python3 experiments/mgpu_bwd_check.py --variants "head-major" \
        --configs "b16 s1024 h16 d128 full,b4 s4096 h16 d128 full,train step" \
        --out "$OUT/bwd_order.json" 2>&1 | grep -v "^wrote" > /tmp/bwd_order.txt
      grep -v "errors" /tmp/bwd_order.txt | tail -14 | tee -a "$L"
      gpu_tests 120 test_attention_mgpu.py "variants and hm"
      gpu_tests 130 test_attention_mgpu_bwd.py "gpu_head_major" ;;
    bench10f)
      # Session 10 defaults (head-major launch where K + V overflow L2; the Mosaic pair on
      # rows without a mask): bench_attention's forward rows, with the Triton pair and cuDNN.
      L="$OUT/log.txt"
      timeout 570 python3 experiments/bench_attention.py --only fwd \
        --impls cudnn,fastattn,fastattn_pallas --out "$OUT/attention_fwd.json" 2>&1 \
        | grep -v "^wrote" | tail -16 | tee -a "$L" ;;
    bench10b)
      L="$OUT/log.txt"
      timeout 570 python3 experiments/bench_attention.py --only bwd \
        --impls cudnn,fastattn,fastattn_pallas --out "$OUT/attention_fwdbwd.json" 2>&1 \
        | grep -v "^wrote" | tail -10 | tee -a "$L" ;;
    sweep10a)
      # Session 10: forward variants launched in each config's default order: at H = 128 a
      # third K/V stage and the turns / overlap options on the long full rows; at H = 64 the
      # four-consumer schedules and the persistent grid on every bench_attention row.
      L="$OUT/log.txt"
      timeout 250 python3 experiments/mgpu_check.py \
        --configs "b1 s16384 h16 d128 full,b4 s4096 h16 d128" \
        --variants "bk128 st3,no overlap,no-pingpong" --out "$OUT/fwd128.json" 2>&1 \
        | grep -v "^wrote" > /tmp/f128.txt
      grep -v "errors" /tmp/f128.txt | tail -22 | tee -a "$L"
      grep -m3 -A5 "ERROR" /tmp/f128.txt | head -30 | tee -a "$L"
      timeout 320 python3 experiments/mgpu_check.py --configs "h32 d64" \
        --variants "4 consumers np,persistent 4" --out "$OUT/fwd64.json" 2>&1 \
        | grep -v "^wrote" > /tmp/f64.txt
      grep -v "errors" /tmp/f64.txt | tail -38 | tee -a "$L" ;;
    sweep10b)
      # Session 10: the backward's variants on the b1 s16384 d128 rows (fwd+bwd 0.95-0.97x).
      L="$OUT/log.txt"
      timeout 560 python3 experiments/mgpu_bwd_check.py --configs "b1 s16384 h16 d128" \
        --variants "dkv st3,dq bk64 st3,regs,no overlap,tile-major" --out "$OUT/bwd16k.json" 2>&1 | grep -v "^wrote" > /tmp/b16k.txt
      grep -v "errors" /tmp/b16k.txt | tail -12 | tee -a "$L" ;;
    sweep10c)
      # Session 10: the H = 64 forward with the softmax under PV on rows without a mask (the
      # new default) against without, the persistent grid with it, tile-major on the causal
      # rows; the fused backward on b1 s16384 d128; the forward's default-tile GPU tests.
      L="$OUT/log.txt"
      timeout 240 python3 experiments/mgpu_check.py --configs "h32 d64" \
        --variants "4 consumers np bq256 bk64 st4,persistent 4 consumers np-ov,tile-major 4 consumers" \
        --out "$OUT/fwd64.json" 2>&1 | grep -v "^wrote" > /tmp/f64.txt
      grep -v "errors" /tmp/f64.txt | tail -26 | tee -a "$L"
      timeout 150 python3 experiments/mgpu_bwd_check.py --configs "b1 s16384 h16 d128" \
        --variants "fused" --out "$OUT/bwd_fused.json" 2>&1 | grep -v "^wrote" > /tmp/bf.txt
      grep -v "errors" /tmp/bf.txt | tail -6 | tee -a "$L"
      gpu_tests 150 test_attention_mgpu.py "gpu_matches" ;;
    final10)
      # Session 10's last defaults (H = 64 rows without a mask: softmax under PV, persistent
      # when S <= 1024): bench_attention's forward rows; the persistent and default-tile GPU
      # tests of the forward.
      L="$OUT/log.txt"
      timeout 150 python3 experiments/bench_attention.py --only fwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" | tail -15 | tee -a "$L"
      gpu_tests 150 test_attention_mgpu.py "gpu_persistent and H64"
      gpu_tests 250 test_attention_mgpu.py "gpu_matches" ;;
    sweep10d)
      # Session 10: the forward's worst row left (b16 s1024 h32 d64 causal, 0.91x cuDNN):
      # 128-query tiles with two consumers, the session 7 and 8 schedules, two stages.
      L="$OUT/log.txt"
      timeout 200 python3 experiments/mgpu_check.py \
        --configs "b16 s1024 h32 d64 causal,b4 s4096 h32 d64 causal" \
        --variants "bq128,4 consumers np bq256 bk64 st2,session 8 default,no overlap, turns" \
        --out "$OUT/fwd64c.json" 2>&1 | grep -v "^wrote" > /tmp/f64c.txt
      grep -v "errors" /tmp/f64c.txt | tail -20 | tee -a "$L" ;;
    sweep10e)
      # Session 10: the persistent grid with snake-order shares on the causal rows (H = 64
      # and 128), head-major and tile-major; b16 s1024 d64 full's default (persistent) again.
      L="$OUT/log.txt"
      timeout 280 python3 experiments/mgpu_check.py \
        --configs "h32 d64 causal,b16 s1024 h32 d64 full,d128 causal" \
        --variants "persistent 4 consumers np,persistent overlap" \
        --out "$OUT/snake.json" 2>&1 | grep -v "^wrote" > /tmp/snake.txt
      grep -v "errors" /tmp/snake.txt | tail -24 | tee -a "$L"
      gpu_tests 100 test_attention_mgpu.py "gpu_persistent and H64" ;;
    final10b)
      # Session 10's last defaults (the persistent grid with snake shares on rows of at most
      # 1024 keys, H = 64 and 128): bench_attention's forward and forward + backward rows;
      # the forward's persistent, default-tile and mask GPU tests.
      L="$OUT/log.txt"
      timeout 120 python3 experiments/bench_attention.py --only fwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" | tail -15 | tee -a "$L"
      timeout 120 python3 experiments/bench_attention.py --only bwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwdbwd.json" 2>&1 | grep -v "^wrote" | tail -9 | tee -a "$L"
      gpu_tests 90 test_attention_mgpu.py "gpu_persistent and H128"
      gpu_tests 200 test_attention_mgpu.py "gpu_matches or gpu_masks" ;;
    final10c)
      # Session 10: the pipeline depth under the softmax-under-PV default of the long H = 64
      # rows without a mask (0.96x cuDNN); then the forward's mask GPU tests and the
      # backward's default gradient tests, as far as the time goes.
      L="$OUT/log.txt"
      timeout 120 python3 experiments/mgpu_check.py \
        --configs "b4 s4096 h32 d64 full,b1 s16384 h32 d64 full" \
        --variants "4 consumers np-ov st" --out "$OUT/fwd64_stages.json" 2>&1 \
        | grep -v "^wrote" > /tmp/f64s.txt
      grep -v "errors" /tmp/f64s.txt | tail -9 | tee -a "$L"
      gpu_tests 150 test_attention_mgpu.py "gpu_masks"
      gpu_tests 240 test_attention_mgpu_bwd.py "gpu_matches" ;;
    bwd_tests10)
      # The backward's default gradient tests (8 cases, 40-90 s of compiling each), verbose
      # so that a cut run still says which passed.
      timeout 560 python3 -m pytest -v -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu_bwd.py -k "gpu_matches" 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed" \
        | tee "$OUT/log.txt" ;;
    fwd_tests10)
      timeout 420 python3 -m pytest -v -p no:cacheprovider -o addopts="" \
        tests/test_attention_mgpu.py -k "gpu_masks or gpu_every" 2>&1 \
        | grep -E "PASS|FAIL|ERROR|passed|failed" | tee "$OUT/log.txt" ;;
    preload11c)
      # The paged default is now the contiguous tile with preloaded page ids: tiles around
      # it on b1 x 32768, the pool order on both rows, and the paged GPU tests.
      L="$OUT/log.txt"
      profile_passes 200 1 1x32768 "contiguous,paged,paged in order,paged two waves,paged w8,paged bk64 st6,paged bk64 two waves"
      profile_passes 120 1 16x4096 "contiguous,paged,paged in order,paged two waves"
      gpu_tests 200 test_paged_gpu.py "" ;;
    decode11a) bench_half 570 a ;;
    decode11b) bench_half 580 b ;;
    tile11)
      # 64-key tiles at two programs per SM (preloaded page ids) against the new paged
      # default on the two rows short of 0.95x; it led by 3.5% on b1 x 32768 in preload11c.
      L="$OUT/log.txt"
      profile_passes 110 3 1x32768,16x4096 "contiguous,paged,paged bk64 two waves" ;;
    serving11)
      # The engine with the session 11 paged decode default (its decode-only steps run it);
      # no HF run, so that it fits the remaining device time.
      timeout 420 python3 experiments/bench_serving.py --out "$OUT/serving.json" 2>&1 \
        | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/serving.txt" | tail -16 ;;
    sched64)
      # Session 12: the H = 128 default's schedule at H = 64 (two consumers, 128-key tiles,
      # turns, softmax under PV), on the H = 64 rows (timings only: no new kernel code).
      L="$OUT/log.txt"
      timeout 330 python3 experiments/mgpu_check.py --configs "h32 d64" \
        --variants "h128 schedule" --out "$OUT/sched64.json" 2>&1 | grep -v "^wrote" \
        > /tmp/s64.txt
      grep -v "errors" /tmp/s64.txt | tail -25 | tee -a "$L" ;;
    det13)
      # Session 13: is cuDNN's backward as JAX runs it bitwise deterministic, and how fast
      # under XLA's determinism flags (ours is deterministic by default: RELIABILITY 5)?
      timeout 560 python3 -m experiments.cudnn_determinism \
        --out "$OUT/cudnn_determinism.json" 2>&1 | tail -22 ;;
    nondet13b)
      # deterministic=False's GPU tests (fixed), then the backward alone, fused vs two
      # kernels, on the long rows and the train step's shape (where to allow it).
      L="$OUT/log.txt"
      gpu_tests 100 test_attention_mgpu_bwd.py "not_deterministic"
      timeout 420 python3 experiments/mgpu_bwd_check.py --variants fused \
        --configs "s16384,b4 s4096 h16 d128,train" --out "$OUT/bwd_fused.json" 2>&1 \
        | grep -v "^wrote" | tail -16 | tee -a "$L" ;;
    nondet13c)
      # deterministic=False with the measured rule (FUSED_MIN_KV_LEN, K/V over L2, not causal
      # at H = 128): its GPU tests, the rows nondet13b did not measure, fwd+bwd again.
      L="$OUT/log.txt"
      gpu_tests 100 test_attention_mgpu_bwd.py "not_deterministic"
      timeout 200 python3 experiments/mgpu_bwd_check.py --variants fused \
        --configs "b4 s4096 h32 d64,b16 s1024 h32 d64" --out "$OUT/bwd_fused_rest.json" 2>&1 \
        | grep -v "^wrote" | tail -10 | tee -a "$L"
      timeout 260 python3 experiments/bench_attention.py --only bwd \
        --impls cudnn,fastattn,fastattn_nondet --out "$OUT/attention_nondet.json" 2>&1 \
        | grep -v "^wrote" | tail -9 | tee -a "$L" ;;
    bwd64_13)
      # The deterministic backward at H = 64 on the long rows (0.91-0.99x cuDNN in nondet13b/c;
      # its tiles were tuned on the train step's shape, K/V in L2): every variant there.
      timeout 330 python3 experiments/mgpu_bwd_check.py \
        --configs "b4 s4096 h32 d64,b1 s16384 h32 d64" --out "$OUT/bwd64_long.json" 2>&1 \
        | grep -v "^wrote" | grep -v "errors" | tail -44 ;;
    paired13)
      # The H = 64 backward's new default on rows over the L2 (paired products) against
      # the same with 4 dQ stages or delta in the dQ kernel.
      timeout 200 python3 experiments/mgpu_bwd_check.py --variants "paired" \
        --configs "b1 s16384 h32 d64 full,b4 s4096 h32 d64 causal" \
        --out "$OUT/bwd64_paired.json" 2>&1 | grep -v "^wrote" | tail -5 ;;
    three14)
      # Session 14: FA-3's H = 64 tile, three 64-row consumers (192 x 128), on the H = 64
      # rows (full ones short of cuDNN, 0.94-0.99x); its GPU tests first (a ragged last tile).
      L="$OUT/log.txt"
      gpu_tests 150 test_attention_mgpu.py "three_consumers"
      timeout 380 python3 experiments/mgpu_check.py --configs "h32 d64" \
        --variants "3 consumers ov st,3 consumers np st4" --out "$OUT/three64.json" 2>&1 | grep -v "^wrote" \
        > /tmp/t64.txt
      grep -v "errors" /tmp/t64.txt | tail -50 | tee -a "$L" ;;
    three14b)
      # The three-consumer tile as the H = 64 default on rows of > 1024 keys without a right
      # bound: its GPU tests (fixed S), the default against the old one (four consumers), and
      # bench_attention's forward rows.
      L="$OUT/log.txt"
      gpu_tests 120 test_attention_mgpu.py "three_consumers or gpu_matches"
      timeout 160 python3 experiments/mgpu_check.py --configs "h32 d64 full" \
        --variants "4 consumers np-ov bq256 bk64 st4,3 consumers np persistent" \
        --out "$OUT/three64b.json" 2>&1 | grep -v "^wrote" > /tmp/t64.txt
      grep -v "errors" /tmp/t64.txt | tail -12 | tee -a "$L"
      timeout 150 python3 experiments/bench_attention.py --only fwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" | tail -15 | tee -a "$L" ;;
    three14c)
      # The three-consumer GPU tests alone (three14b's pytest ran out of time, no failure).
      L="$OUT/log.txt"
      gpu_tests 200 test_attention_mgpu.py "three_consumers or (gpu_matches and 64)" ;;
    final14)
      # Session 14's defaults (H = 64: three consumers on long full rows forward; delta in
      # the dQ kernel with paired products over the L2 backward): the backward's new GPU
      # tests, the H = 64 backward rows, bench_attention's forward and fwd+bwd rows.
      L="$OUT/log.txt"
      gpu_tests 150 test_attention_mgpu_bwd.py "h64_default"
      timeout 150 python3 experiments/mgpu_bwd_check.py --variants "paired dq st4" \
        --configs "h32 d64 causal,h32 d64 full" --out "$OUT/bwd64_default.json" 2>&1 \
        | grep -v "^wrote" | grep -v "errors" | tail -13 | tee -a "$L"
      timeout 130 python3 experiments/bench_attention.py --only fwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" | tail -15 | tee -a "$L"
      timeout 140 python3 experiments/bench_attention.py --only bwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwdbwd.json" 2>&1 | grep -v "^wrote" | tail -9 | tee -a "$L" ;;
    tail14)
      # The forward's key tail (S not a multiple of block_k) on the GPU; three consumers of
      # 64-key steps on the causal H = 64 rows (0.97-0.99x cuDNN in final14).
      L="$OUT/log.txt"
      gpu_tests 150 test_attention_mgpu.py "key_tail"
      timeout 300 python3 experiments/mgpu_check.py --configs "h32 d64 causal,train" \
        --variants "3 consumers np bk64,3 consumers ov bk64" --out "$OUT/three64c.json" \
        2>&1 | grep -v "^wrote" > /tmp/t64.txt
      grep -v "errors" /tmp/t64.txt | tail -17 | tee -a "$L" ;;
    bk192)
      # 192-key tiles at H = 128 (lse from registers so that two stages fit next to Q; key
      # tails on every row): its GPU tests, then the H = 128 rows against the default.
      L="$OUT/log.txt"
      gpu_tests 120 test_attention_mgpu.py "variants and lse-reg"
      timeout 300 python3 experiments/mgpu_check.py --configs "d128" \
        --variants "lse-reg,bk192" --out "$OUT/bk192.json" 2>&1 | grep -v "^wrote" \
        > /tmp/b192.txt
      grep -v "errors" /tmp/b192.txt | tail -25 | tee -a "$L" ;;
    bk192c)
      # bk192 led on b1 s16384 d128 full only (646.2 vs 627.5, lse-reg 639.1): twice more,
      # each its own process.
      L="$OUT/log.txt"
      for pass in 1 2; do
        timeout 120 python3 experiments/mgpu_check.py --configs "b1 s16384 h16 d128 full" \
          --variants "lse-reg,bk192" --out "$OUT/bk192_pass$pass.json" 2>&1 \
          | grep -v "^wrote" > /tmp/b192.txt
        grep -v "errors" /tmp/b192.txt | tail -6 | tee -a "$L"
      done ;;
    final14b)
      # 192-key tiles as the default on H = 128 rows of >= 16384 keys without a right bound:
      # the 192-key GPU variant tests (segment ids: our ValueError), bench_attention's
      # forward and fwd+bwd rows.
      L="$OUT/log.txt"
      gpu_tests 100 test_attention_mgpu.py "variants and k192"
      timeout 130 python3 experiments/bench_attention.py --only fwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" | tail -15 | tee -a "$L"
      timeout 140 python3 experiments/bench_attention.py --only bwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwdbwd.json" 2>&1 | grep -v "^wrote" | tail -9 | tee -a "$L" ;;
    bk192d)
      # The new H = 128 long-row default (192-key tiles) against the old one (128-key tiles,
      # head-major) and lse-reg, three processes; then bench_attention's forward rows again.
      L="$OUT/log.txt"
      for pass in 1 2 3; do
        timeout 100 python3 experiments/mgpu_check.py --configs "b1 s16384 h16 d128 full" \
          --variants "head-major,lse-reg" --out "$OUT/bk192d_pass$pass.json" 2>&1 \
          | grep -v "^wrote" > /tmp/b192.txt
        grep -v "errors" /tmp/b192.txt | tail -5 | tee -a "$L"
      done
      timeout 130 python3 experiments/bench_attention.py --only fwd --impls cudnn,fastattn \
        --out "$OUT/attention_fwd.json" 2>&1 | grep -v "^wrote" | tail -15 | tee -a "$L" ;;
    tests14)
      # The forward's default-path GPU tests on the session's final defaults.
      L="$OUT/log.txt"
      gpu_tests 330 test_attention_mgpu.py "gpu_matches or gpu_masks or gpu_every" ;;
    paired14)
      # Session 14: delta in the dQ kernel with paired products (+5% and a tie on two rows in
      # paired13) on the other H = 64 rows over the L2, and the two rows again.
      timeout 420 python3 experiments/mgpu_bwd_check.py --variants "paired delta in dq kernel" \
        --configs "h32 d64 causal,h32 d64 full" --out "$OUT/bwd64_delta.json" 2>&1 \
        | grep -v "^wrote" | grep -v "errors" | tail -20 ;;
    scaling8b) timeout 580 python3 experiments/bench_scaling.py --model 8b \
                 --parts correctness,train,engine --out "$OUT/scaling_8b.json" 2>&1 \
                 | grep -v "^wrote" | tail -20 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "== $step took $((SECONDS - start)) s"
done
