"""Every experiment script has a tiny variant that CI runs (STYLE.md 10)."""

import json

import pytest

from experiments import attention_check, bench_attention, cudnn_determinism


def test_attention_check_tiny_all_implementations_agree(capsys):
    rows = attention_check.main(["--tiny"])
    assert [impl for impl, *_ in rows] == ["reference", "xla", "pallas"]
    for impl, err, fwd_ms, bwd_ms in rows:
        assert err < 2e-2, impl  # bf16 inputs against the f32 reference
        assert fwd_ms > 0 and bwd_ms > 0
    assert "all implementations agree" in capsys.readouterr().out


def test_bench_attention_tiny_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    bench_attention.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "jax", "date", "rows"} <= result.keys()
    rows = {(r["config"], r["impl"]): r for r in result["rows"]}
    for phase in ("fwd", "fwd+bwd"):
        ours = rows[(f"{phase}|b1 s256 h2 d64 causal", "fastattn_pallas")]
        assert ours["ms"] > 0 and ours["tflops"] > 0
        assert ours["rel_err"] < 2e-2


def test_cudnn_determinism_tiny_runs_each_flag_set(tmp_path):
    """One child process per XLA flag setting; on a CPU cuDNN's rows are errors, ours are
    timed and bitwise deterministic."""
    out = tmp_path / "det.json"
    cudnn_determinism.main(["--tiny", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["xla_flags"] for r in rows} == {name for name, _ in cudnn_determinism.FLAG_SETS}
    ours = [r for r in rows if r["impl"] == "fastattn"]
    assert len(ours) == len(cudnn_determinism.FLAG_SETS)
    assert all(r["bitwise_deterministic"] is True and r["tflops"] > 0 for r in ours)


def test_chained_timing_runs_every_repeat():
    """bench_attention.chained must run fn `repeats` times: merged or dead runs made decode
    "read" 28 TB/s once. Counted in the compiled program: one sine per run."""
    import jax.numpy as jnp

    def fn(q, big):
        return jnp.sin(q) @ big[:64]

    q, big = jnp.ones((64, 64)), jnp.ones((256, 64))
    hlo = bench_attention.chained(fn, 4).lower(q, big).compile().as_text()
    assert hlo.count(" sine(") == 4
    assert bench_attention.time_fn(fn, q, big, min_time=0.0, min_iters=2, repeats=3) > 0


def test_bench_decode_tiny_writes_json(tmp_path):
    from experiments import bench_decode

    result = bench_decode.main(["--tiny", "--out", str(tmp_path / "decode.json")])
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["fastattn_decode"]["gbps"] > 0 and rows["copy_ceiling"]["gbps"] > 0
    assert rows["fastattn_paged"]["rel_err"] < 2e-2  # same keys via page tables (bf16 rounding)
    ragged = [r for r in result["rows"] if r["config"].startswith("ragged|")]
    assert {r["impl"] for r in ragged} == {"fastattn_ragged", "fastattn_split"}
    assert all(r["tflops"] > 0 for r in ragged)
    assert ragged[0]["rel_err"] < 2e-2  # one mixed step == flash forward + paged decode
    assert rows["xla"]["rel_err"] < 2e-2  # xla against our kernel, bf16


def test_bench_decode_tiny_prefetch_sweep_times_both_ways(capsys):
    """--sweep prefetch: paged decode and the mixed step with page ids read one tile ahead
    and in the step, each next to its yardstick."""
    from experiments import bench_decode

    bench_decode.main(["--tiny", "--sweep", "prefetch"])
    out = capsys.readouterr().out
    assert out.count("x contiguous") == 4  # two tiles, prefetch off and on
    assert "fastattn_ragged[prefetch]:" in out and "x the split's speed" in out


def test_profile_decode_tiny_times_and_traces_the_variants(tmp_path):
    """experiments/profile_decode.py --tiny: each variant reads the same keys (checked
    inside against the contiguous kernel) and gets a bandwidth."""
    from experiments import profile_decode

    results = profile_decode.main(["--tiny", "--variants", "paged in order,paged bk64 st6",
                                   "--trace", str(tmp_path / "tr")])
    gbps = results["gbps"]
    assert {name for _, _, name in gbps} == {"contiguous", "paged in order", "paged bk64 st6"}
    assert all(value > 0 for value in gbps.values())
    # one trace summary per variant (a CPU has no GPU track: the kernel table is empty)
    assert set(results["traces"]) == set(gbps)
    assert all("idle_ms_per_step" in t for t in results["traces"].values())
    with pytest.raises(ValueError, match="--variants: unknown"):
        profile_decode.main(["--tiny", "--variants", "paged shuffled"])


def test_fwd_in_context_tiny_traces_both_contexts(tmp_path):
    """experiments/fwd_in_context.py --tiny: both contexts run and are traced (a CPU has no
    GPU track, so the kernel times are 0 there)."""
    from experiments import fwd_in_context

    result = fwd_in_context.main(["--tiny", "--out", str(tmp_path / "f.json")])
    assert [(r["impl"], r["context"]) for r in result["rows"]] == [
        ("xla", "alone"), ("xla", "after matmuls"), ("xla", "jitted alone")]
    assert json.loads((tmp_path / "f.json").read_text())["rows"] == result["rows"]


def test_demo_tiny_trains_checkpoints_reloads_and_scores(tmp_path, capsys):
    from experiments import demo

    result = demo.main(["--tiny", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert result["step"] == 6  # the reloaded checkpoint is the last step
    assert f"accuracy: {100 * result['accuracy']:.1f}%" in out
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 0
    assert len(result["history"]) == 6 and all(r["loss"] > 0 for r in result["history"])
    metrics = (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if "eval_loss" in m]) == 2


def test_bench_train_tiny_writes_json(tmp_path):
    from experiments import bench_train

    result = bench_train.main(["--tiny", "--impls", "xla,xla+fused_loss,cudnn", "--out",
                               str(tmp_path / "t.json")])
    xla, fused, cudnn = result["rows"]
    assert xla["impl"] == "fastattn_xla" and xla["tokens_per_s"] > 0 and xla["tflops"] > 0
    assert xla["segment_ids"] is True
    assert fused["impl"] == "fastattn_xla+fused_loss" and fused["tokens_per_s"] > 0
    # the same step with the loss computed chunked: the same loss
    assert abs(fused["loss"] - xla["loss"]) < 1e-3 * abs(xla["loss"])
    assert "NVIDIA GPU" in cudnn["error"]  # a CPU: reported, the run goes on
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["ms"] == xla["ms"]


def test_bench_train_tiny_trace_sums_kernel_times(tmp_path):
    """--trace: two more steps under the JAX profiler; the trace is read back (a CPU has no
    GPU track, so the kernel totals are empty there, but the summary is built)."""
    from experiments import bench_train

    result = bench_train.main(["--tiny", "--impls", "xla", "--trace", str(tmp_path / "tr"),
                               "--out", str(tmp_path / "t.json")])
    trace = result["rows"][0]["trace"]
    assert set(trace) >= {"kernel_ms_per_step", "attention_ms_per_step", "top_kernels_ms"}


def test_trace_kernels_sums_gpu_tracks_by_name(tmp_path):
    """A synthetic Chrome trace: X events on the GPU process count, host ones do not."""
    import gzip

    from experiments import trace_kernels

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "flash_attention_fwd_mgpu", "ts": 0.0,
         "dur": 400.0},
        {"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion", "ts": 450.0, "dur": 3000.0},
        {"ph": "X", "pid": 1, "tid": 7, "name": "flash_attention_fwd_mgpu", "ts": 3460.0,
         "dur": 600.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "gemm_fusion", "ts": 0.0, "dur": 9999.0},
    ]
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    times = trace_kernels.kernel_times(tmp_path)
    assert times == {"flash_attention_fwd_mgpu": 1000.0, "gemm_fusion": 3000.0}
    s = trace_kernels.summary(times, steps=2, idle=trace_kernels.idle_before(tmp_path))
    assert s["kernel_ms_per_step"] == 2.0 and s["attention_ms_per_step"] == 0.5
    # idle: 50 us before the gemm, 10 us before the second attention kernel
    assert s["idle_before_ms"] == {"gemm_fusion": 0.025, "flash_attention_fwd_mgpu": 0.005}
    other = trace_kernels.summary({"gemm_fusion": 3000.0, "transpose": 200.0}, steps=2)
    assert trace_kernels.diff(s, other) == {"flash_attention_fwd_mgpu": -0.5,
                                            "transpose": 0.1}


def test_bench_serving_tiny_writes_json(tmp_path):
    from experiments import bench_serving

    result = bench_serving.main(["--tiny", "--hf", "--budgets", "32,64",
                                 "--out", str(tmp_path / "s.json")])
    runs = [(r["impl"], r.get("token_budget")) for r in result["rows"]]
    # continuous once per budget, static at the largest
    assert runs == [("fastattn_continuous", 32), ("fastattn_continuous", 64),
                    ("fastattn_static", 64), ("hf_generate", None)]
    rows = {r["impl"]: r for r in result["rows"]}
    useful = rows["fastattn_continuous"]["output_tokens"]
    for r in result["rows"]:  # every implementation produced the same useful tokens
        assert r["tok_per_s"] > 0 and r["output_tokens"] == useful
    assert rows["fastattn_static"]["preemptions"] == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_bench_fused_tiny_writes_every_op(tmp_path):
    from experiments import bench_fused

    result = bench_fused.main(["--tiny", "--out", str(tmp_path / "fused.json")])
    rows = result["rows"]
    assert not [r for r in rows if "error" in r]
    ops = {r["config"].split("|")[0] for r in rows}
    assert ops == {"add_rmsnorm fwd", "add_rmsnorm fwd+bwd", "rope_write_kv",
                   "linear_ce loss+grads", "swiglu fwd", "swiglu fwd+bwd"}
    for r in rows:  # every fused op agrees with the plain one it is timed against
        assert r["ms"] > 0 and r["rel_err"] < 2e-2, r
    assert {r["impl"] for r in rows} == {"fastattn_fused", "xla"}


def test_bench_scaling_tiny_on_two_fake_devices(tmp_path):
    """Sharded engine, router and data / tensor parallel training agree with one device
    (a subprocess: the device count is fixed before jax starts)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "scaling.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": root}
    subprocess.run([sys.executable, os.path.join(root, "experiments", "bench_scaling.py"),
                    "--tiny", "--parts", "correctness,engine", "--out", str(out)], check=True,
                   env=env, cwd=root, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    checks = [r for r in rows if r["config"] == "correctness"]
    assert len(checks) == 4 and all(r["ok"] for r in checks), checks
    assert {r["impl"] for r in rows if r["config"] != "correctness"} == {
        "1 GPU", "tp2", "router dp2"}


def test_greedy_margin_tiny_measures_the_bf16_flips():
    from experiments import greedy_margin

    r = greedy_margin.main(["--tiny", "--tokens", "16"])
    assert r["gap_median"] > 0 and r["bf16_error_median"] > 0  # bf16 rounds, f32 does not
    assert 0 <= r["argmax_agreement"] <= 1


def test_sass_loops_finds_the_loop_and_orders_its_waits():
    """experiments/sass_loops.py on a hand-written SASS fragment: the predicated branch back
    closes the loop (the unconditional one, a barrier wait's retry path, does not), and the
    skeleton lists the products, the wait and the softmax in program order."""
    from experiments import sass_loops

    body = ["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0"] + ["FMNMX.NAN R2, R2, R3"] * 3 + \
           ["MUFU.EX2 R4, R5"] * 200 + ["@P1 BRA 0x0100"]
    lines = [f"        /*{0x100 + 16 * i:04x}*/                   {text} ;"
             for i, text in enumerate(body)]
    lines.append(f"        /*{0x100 + 16 * len(body):04x}*/  BRA 0x0100 ;")  # a retry path
    text = "\n".join(lines)
    assert sass_loops.loops(sass_loops.parse(text)) == [(0x100, 0x100 + 16 * (len(body) - 1))]
    summary = sass_loops.summarise(text)
    assert summary.count("loop ") == 1
    order = [line.split(None, 1)[1] for line in summary.splitlines()[2:]]
    assert order[0].startswith("HGMMA") and order[1].startswith("WARPGROUP.DEPBAR")
    assert order[2] == "FMNMX (first-last)" and order[3] == "MUFU.EX2 (first-last)"
