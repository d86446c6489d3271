"""Training-step throughput and MFU of the 0.85B Llama of shared/TARGETS.md at T = 2048.

Question: how close does one optimizer step (bf16 compute, f32 master weights, AdamW) get to the
          GPU's peak, with our Pallas attention and with the XLA attention path?
Run:      PYTHONPATH=. python experiments/bench_train.py [--impls pallas,xla,cudnn,pallas+fused_loss]
          [--unpacked] [--out FILE]  (cuDNN attention always runs without segment ids)
          --tiny: a seconds-long CPU variant (CI).
Prints:   the measured bf16 matmul ceiling; per implementation: ms per step, tokens/s,
          model TFLOP/s and MFU against the datasheet peak and against that ceiling
          (FLOPs: models.train_flops_per_token = 6 x matmul params + causal attention), and
          writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastattn.data import pack_documents
from fastattn.training import (
    OptimizerConfig, TrainState, make_optimizer, make_train_step, peak_flops)
from experiments import trace_kernels
from experiments.results import write_results
from models import LLAMA_0_85B, TINY, Llama, train_flops_per_token


TRACED_STEPS = 2


def bench(config, seq_len: int, batch_size: int, grad_accum: int, steps: int,
          packed: bool = True, fused_loss: bool = False, trace_dir=None) -> dict:
    """packed: attention gets the rows' segment ids (what packed training runs); False: none
    (each row here is one document, so the masks agree; cuDNN takes no segment ids).
    trace_dir: after the timed steps, TRACED_STEPS more under the JAX profiler, and the
    per-kernel GPU times of one step in the result (`trace`, experiments/trace_kernels.py)."""
    model = Llama(config)
    rng = np.random.default_rng(0)
    docs = rng.integers(0, config.vocab_size, (batch_size, seq_len)).tolist()
    data = pack_documents(docs, seq_len)
    batch = data.batch(0, batch_size, seed=0)
    batch = {k: jnp.asarray(getattr(batch, k)) for k in
             ("tokens", "targets", "weights", "positions", "segment_ids")}
    if not packed:
        batch["segment_ids"] = None
    params = jax.jit(lambda key: model.init(key, batch["tokens"][:1])["params"])(
        jax.random.PRNGKey(0))
    optimizer = make_optimizer(OptimizerConfig(), 1000)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    step = make_train_step(model, optimizer, grad_accum, fused_loss=fused_loss)
    for _ in range(2):  # compile + one warm step
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch_size * seq_len
    flops = train_flops_per_token(config, seq_len) * tokens
    peak = peak_flops()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    traced = {}
    if trace_dir is not None:
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(TRACED_STEPS):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        traced["trace"] = trace_kernels.summary(
            trace_kernels.kernel_times(trace_dir), steps=TRACED_STEPS,
            idle=trace_kernels.idle_before(trace_dir))
    return {**traced, "ms": 1e3 * seconds, "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
            "mfu": (flops / seconds / peak) if peak else None, "params": n_params,
            "loss": float(metrics["loss"])}


def matmul_ceiling(n: int, dtype) -> float:
    """Measured dense matmul throughput (TFLOP/s) of an n x n x n product in `dtype`: the
    practical ceiling MFU is also reported against (the datasheet peak is not reachable)."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    start = time.perf_counter()
    for _ in range(10):
        out = f(a)
    jax.block_until_ready(out)
    return 2 * n ** 3 * 10 / (time.perf_counter() - start) / 1e12


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--impls", default="pallas,xla,cudnn",
                        help="attention implementations ('default': implementation=None, "
                             "fastattn's pick); a name with '+fused_loss' also "
                             "computes the loss chunked (e.g. pallas+fused_loss)")
    parser.add_argument("--unpacked", action="store_true",
                        help="no segment ids for any implementation (cuDNN never gets them)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--out", default="benchmarks/train.json")
    parser.add_argument("--trace", default=None, metavar="DIR",
                        help="also trace two steps per implementation into DIR/<impl> and "
                             "report each kernel's GPU time per step")
    args = parser.parse_args(argv)
    base, seq_len, batch, steps = LLAMA_0_85B, args.seq_len, args.batch, args.steps
    if args.tiny:
        base, seq_len, batch, steps = TINY, 64, 2, 2
    device = jax.devices()[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}; T={seq_len}, {batch} rows/step, "
          f"grad_accum {args.grad_accum}, compute {base.dtype}, master float32")
    ceiling = matmul_ceiling(256 if args.tiny else 8192, base.dtype)
    print(f"measured {base.dtype} matmul ceiling: {ceiling:.1f} TFLOP/s")
    rows = []
    for name in args.impls.split(","):
        impl, _, option = name.partition("+")
        if option not in ("", "fused_loss"):
            raise ValueError(f"--impls: unknown option {option!r} in {name!r}")
        packed = not args.unpacked and impl != "cudnn"  # cuDNN takes no segment ids
        # "default": implementation=None, what fastattn.attention picks for these inputs
        config = dataclasses.replace(base, attention_implementation=None if impl == "default"
                                     else impl)
        try:
            r = bench(config, seq_len, batch, args.grad_accum, steps, packed=packed,
                      fused_loss=option == "fused_loss",
                      trace_dir=None if args.trace is None else f"{args.trace}/{name}")
        except Exception as e:  # e.g. cuDNN off a GPU: report and go on with the others
            rows.append({"config": f"T{seq_len} b{batch}", "impl": name, "error": str(e)[:1500]})
            print(f"  {name:<10} ERROR {str(e).splitlines()[0][:200]}")
            continue
        r["mfu_of_measured_ceiling"] = r["tflops"] / ceiling
        r["segment_ids"] = packed
        r["attention_in_use"] = config.attention_in_use(seq_len, packed=packed)
        rows.append({"config": f"llama {r['params'] / 1e9:.2f}B T{seq_len} b{batch}",
                     "impl": "cudnn" if impl == "cudnn" else f"fastattn_{name}", **r})
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"  {name:<10} {'packed' if packed else 'unpacked':<8} "
              f"{r['ms']:9.1f} ms/step {r['tokens_per_s']:12,.0f} tok/s "
              f"{r['tflops']:8.1f} TFLOP/s  MFU {mfu} (datasheet), "
              f"{100 * r['mfu_of_measured_ceiling']:.1f}% (measured ceiling)")
        if "trace" in r:
            trace_kernels.print_summary(f"  {name} kernels (traced)", r["trace"])
        write_results(args.out, rows, matmul_ceiling_tflops=ceiling)  # a cut run keeps these
    traced = [r for r in rows if "trace" in r]
    for r in traced[1:]:  # which kernels differ from the first implementation's step
        print(f"  kernels of {r['impl']} minus {traced[0]['impl']} (ms per step):")
        for name, ms in trace_kernels.diff(traced[0]["trace"], r["trace"]).items():
            print(f"    {ms:+8.3f}  {name[:100]}")
    return write_results(args.out, rows, matmul_ceiling_tflops=ceiling)


if __name__ == "__main__":
    main()
