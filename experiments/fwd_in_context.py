"""Does an attention forward kernel run slower between matmuls than alone? (issue 4)

Question: inside the 0.85B train step our H = 64 Mosaic forward takes 0.50 ms per layer,
against 0.43 ms timed alone, while cuDNN's takes 0.40 in both (BENCHMARKS.md, session 7).
Is that the step's context (the matmuls before it: clocks under load, a cold L2), or the
step's inputs? Here each forward runs (a) alone, back to back, (b) after the step's MLP
matmuls, with the same inputs, and (c) jitted on its own, one call per program, as the
benchmarks time it. A profiler trace gives each kernel's own time.
Run (GPU): PYTHONPATH=. python experiments/fwd_in_context.py [--out FILE]
           --tiny: a small shape in interpret mode / XLA (CPU), for the tests.
           --once: one bare forward per implementation, nothing traced (for ncu).
Prints per implementation the forward kernel's us per call alone and after the matmuls,
and every kernel of the program (what else a call launches: casts, layout changes).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp

import fastattn
from experiments import trace_kernels
from experiments.results import write_results

SHAPE = (8, 2048, 32, 8, 64)  # B, T, N, K, H of the train step's attention
TINY_SHAPE = (1, 128, 2, 1, 64)
MLP = (16384, 2048, 5632)  # tokens, hidden, FFN width of the step's matmuls
TINY_MLP = (128, 64, 128)
CALLS = 10


def _impls(on_gpu):
    names = ("pallas_mosaic_bwd", "cudnn") if on_gpu else ("xla",)
    return {name: (lambda q, k, v, name=name: fastattn.attention(
        q, k, v, causal=True, implementation=name)) for name in names}


def _programs(attend, with_matmuls):
    """CALLS forwards in one jitted program, each after the MLP matmuls or not. Tiny
    dependencies chain them in order (matmuls -> forward -> next matmuls); both contexts run
    the same elementwise ops, so only the matmuls differ."""
    def run(q, k, v, x, w_in, w_out):
        out = q
        for _ in range(CALLS):
            if with_matmuls:  # up and down projections: the step's largest matmuls
                x = (jax.nn.silu(x @ w_in) @ w_out).astype(x.dtype)
            out = attend(q + (x[0, :q.shape[-1]] * 1e-3).astype(q.dtype), k, v)
            x = x + (out[0, 0, 0, 0] * 1e-3).astype(x.dtype)
        return out, x
    return jax.jit(run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--once", action="store_true",
                   help="run each implementation's forward once, untraced, and stop")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"),
                                                  "fwd_in_context.json"))
    args = p.parse_args(argv)
    B, T, N, K, H = TINY_SHAPE if args.tiny else SHAPE
    M, D, F = TINY_MLP if args.tiny else MLP
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (B, T, K, H), jnp.bfloat16) for kk in keys[1:3])
    x = jax.random.normal(keys[3], (M, D), jnp.bfloat16)
    w_in = (jax.random.normal(keys[4], (D, F), jnp.bfloat16) / D ** 0.5).astype(jnp.bfloat16)
    w_out = (jax.random.normal(keys[5], (F, D), jnp.bfloat16) / F ** 0.5).astype(jnp.bfloat16)
    rows = []
    for name, attend in _impls(jax.default_backend() == "gpu").items():
        bare = jax.jit(attend)
        if args.once:  # one launch of each kernel for a profiler that replays it
            jax.block_until_ready(bare(q, k, v))
            rows.append({"impl": name, "context": "once"})
            continue
        for context in ("alone", "after matmuls", "jitted alone"):
            # "jitted alone": one call per program on the program's own parameters, as the
            # benchmarks time it (XLA then fixes the inputs' layout)
            fn = _programs(attend, context == "after matmuls")
            args_ = (q, k, v, x, w_in, w_out)
            if context == "jitted alone":
                fn, args_ = bare, (q, k, v)
            jax.block_until_ready(fn(*args_))  # compile
            with tempfile.TemporaryDirectory() as where:
                with jax.profiler.trace(where, create_perfetto_trace=True):
                    for _ in range(CALLS if context == "jitted alone" else 1):
                        out = fn(*args_)
                    jax.block_until_ready(out)
                times = trace_kernels.kernel_times(where)
            attention = {n: t for n, t in times.items() if trace_kernels.ATTENTION.search(n)}
            row = {"impl": name, "context": context,
                   "attention_us_per_call": sum(attention.values()) / CALLS,
                   "kernels_us": {n: t / CALLS for n, t in sorted(
                       times.items(), key=lambda kv: -kv[1])}}
            rows.append(row)
            print(f"{name:18s} {context:14s} attention kernels "
                  f"{row['attention_us_per_call']:8.1f} us per call; every kernel:",
                  flush=True)
            for kernel, us in row["kernels_us"].items():  # the matmuls too, after them
                print(f"    {us:8.1f} us  {kernel[:90]}")
    return write_results(args.out, rows)


if __name__ == "__main__":
    main()
