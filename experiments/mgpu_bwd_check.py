"""Backward-only timing of the Hopper (Mosaic GPU) attention backward, its block-size
variants, our Triton backward and cuDNN's backward, in one process.

Question (issues 4 and 7): which MosaicBackwardBlockSizes should be the default at each head
dim, and how far is the backward alone from cuDNN's? bench_attention times forward +
backward; this isolates the backward, where the train step's gap to cuDNN is.

Run (on the GPU machine, from the repo root; ~4 minutes):
    PYTHONPATH=. python experiments/mgpu_bwd_check.py [--configs SUBSTR] [--out PATH]
Every impl gets the same (q, k, v, out, lse, d_out): out and lse from our Triton forward.
cuDNN: the vjp closure of `jax.nn.dot_product_attention` (its own residuals), jitted; only
its backward kernels run. FLOPs of a backward = 2.5 x the forward's (5 matmuls of 4:
4 B N T S H x 2.5, halved for causal), the convention bench_attention uses.
Prints one line per (config, impl), a table, and writes JSON {device, jax, date, rows}.
--tiny: one small config in interpret mode (CPU; the tests run it).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from experiments.bench_attention import rel_err, time_fn
from experiments.mgpu_check import CONFIGS as FORWARD_CONFIGS
from experiments.mgpu_check import (
    _error_text,
    chosen,
    chosen_variants,
    launched_as_default,
    parse_args,
    unpack,
)
from experiments.results import write_results
from pallas_kernels.flash_attention import flash_attention, flash_attention_backward
from pallas_kernels.flash_attention_mgpu_bwd import (
    MosaicBackwardBlockSizes,
    flash_attention_mgpu_backward,
)

# The forward check's configs (name, B, T, N, H, causal), less one short causal row.
CONFIGS = [c for c in FORWARD_CONFIGS if c[0] != "b16 s1024 h16 d128 causal"]
TINY = [("b1 s128 h1 d64 causal (interpret)", 1, 128, 1, 64, True)]

B = MosaicBackwardBlockSizes
# Tried besides the default, per head dim. At H = 128 a dK/dV consumer holds dK, dV [64, 128]
# f32 (128 registers per thread) plus S^T and dP^T [64, block_q_dkv]: block_q_dkv = 64 is the
# most that fits in 240 registers, so the variants move the dQ tile and the stage counts.
VARIANTS = {
    # Around the session 6 default (64-query dK/dV steps, 128-key dQ steps, 2 stages each).
    128: {
        "session 5 tiles": B(block_k_dq=64, num_stages_dkv=2, num_stages_dq=2),
        "dkv st3": B(block_k_dq=128, num_stages_dkv=3, num_stages_dq=2),
        "dq bk64 st3": B(block_k_dq=64, num_stages_dkv=2, num_stages_dq=3),
        "regs 232/40": B(block_k_dq=128, num_stages_dkv=2, num_stages_dq=2,
                         consumer_registers=232, producer_registers=40),
    },
    # Around the session 7 default (128-query dK/dV steps with 4 stages, 128-key dQ steps
    # with 3).
    64: {
        "session 5 tiles": B(block_q_dkv=64, block_k_dq=64, num_stages_dkv=3, num_stages_dq=3),
        "session 6 tiles": B(block_q_dkv=128, block_k_dq=128, num_stages_dkv=3,
                             num_stages_dq=3),
        "delta in dq kernel": B(block_q_dkv=128, block_k_dq=128, num_stages_dkv=4,
                                num_stages_dq=3, delta_in_dq_kernel=True),
        "dq st4": B(block_q_dkv=128, block_k_dq=128, num_stages_dkv=4, num_stages_dq=4),
        # One kernel, dQ through TMA reduce-add (session 7): the consumers split the rows.
        "fused": B(block_q_dkv=128, num_stages_dkv=2, fused_dq=True),
        # Session 13: the paired products (the default where K + V overflow the L2) with the
        # stage counts and delta placement that came next on those rows without them.
        "paired dq st4": B(block_q_dkv=128, block_k_dq=128, num_stages_dkv=4,
                           num_stages_dq=4, overlap=True),
        "paired delta in dq kernel": B(block_q_dkv=128, block_k_dq=128, num_stages_dkv=4,
                                       num_stages_dq=3, delta_in_dq_kernel=True,
                                       overlap=True),
    },
}
# H = 128: the consumers split the head dim of each step's dQ tile.
VARIANTS[128]["fused"] = B(block_q_dkv=64, num_stages_dkv=2, fused_dq=True)
# Session 9: each default with the products' order flipped (overlap: S with dP, dV with dK,
# P under dP; the default has it at H = 128, not at H = 64).
for _H in VARIANTS:
    _default = B.default_for(q_len=4096, kv_len=4096, head_dim=_H, causal=True)
    VARIANTS[_H]["no overlap" if _default.overlap else "overlap"] = dataclasses.replace(
        _default, overlap=not _default.overlap)
    # Session 10: both kernels launched head by head (a head's tiles share its K/V, or its
    # Q/dO, in L2).
    VARIANTS[_H]["head-major"] = dataclasses.replace(_default, head_major=True)
    VARIANTS[_H]["tile-major"] = dataclasses.replace(_default, head_major=False)
TIMING = {"min_time": 0.2, "samples": 7}
TINY_TIMING = {"min_time": 0.0, "min_iters": 1, "samples": 1}


def _inputs(B_, T, N, K, H, causal, interpret):
    keys = jax.random.split(jax.random.key(0), 4)
    q, d_out = (jax.random.normal(key, (B_, T, N, H), jnp.bfloat16) for key in keys[:2])
    k, v = (jax.random.normal(key, (B_, T, K, H), jnp.bfloat16) for key in keys[2:])
    out, lse = flash_attention(q, k, v, causal=causal, interpret=interpret)
    return q, k, v, out, lse, d_out


def _triton(causal, interpret):
    return jax.jit(lambda q, k, v, o, lse, g: flash_attention_backward(
        q, k, v, o, lse, g, jnp.zeros_like(lse), causal=causal, interpret=interpret))


def _cudnn_args(causal, q, k, v, d_out):
    """cuDNN's backward alone: the vjp closure of its forward (run here, inside the row's
    error handling, so that a cuDNN failure costs only its own row)."""
    _, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"), q, k, v)
    return vjp, d_out


def _mosaic(causal, block_sizes, interpret):
    return jax.jit(lambda q, k, v, o, lse, g: flash_attention_mgpu_backward(
        q, k, v, o, lse, g, None, causal=causal, block_sizes=block_sizes,
        interpret=interpret))


def run_config(cfg, *, interpret=False, with_variants=True, only=""):
    """only: run just the variants whose name contains one of its comma-separated parts."""
    name, B_, T, N, K, H, causal = unpack(cfg)
    q, k, v, out, lse, d_out = _inputs(B_, T, N, K, H, causal, interpret)
    flops = 2.5 * 4 * B_ * N * T * T * H * (0.5 if causal else 1.0)
    ours = (q, k, v, out, lse, d_out)
    # impl -> (jitted fn, a function giving its arguments), giving (dq, dk, dv)
    runs = {"triton": (_triton(causal, interpret), lambda: ours)}
    if not interpret:
        runs["cudnn"] = (jax.jit(lambda vjp, g: vjp(g)),
                         lambda: _cudnn_args(causal, q, k, v, d_out))
    runs["mosaic"] = (_mosaic(causal, None, interpret), lambda: ours)
    if with_variants and not interpret:
        for variant, bs in chosen_variants(VARIANTS.get(H, {}), only).items():
            bs = launched_as_default(variant, bs, cfg, B.default_for)
            runs[f"mosaic [{variant}]"] = (_mosaic(causal, bs, interpret), lambda: ours)
    rows, grads = [], {}
    for impl, (fn, make_args) in runs.items():
        row = {"config": name, "impl": impl, "ms": None, "tflops": None}
        rows.append(row)
        try:
            args = make_args()
            t0 = time.perf_counter()
            grads[impl] = jax.block_until_ready(fn(*args))
            row["first_call_s"] = time.perf_counter() - t0
            row["ms"] = time_fn(fn, *args, **(TINY_TIMING if interpret else TIMING))
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            if impl != "triton" and "triton" in grads:
                row["rel_err_vs_triton"] = max(rel_err(a, b) for a, b in
                                               zip(grads[impl], grads["triton"]))
            err = f"  err {row['rel_err_vs_triton']:.1e}" if "rel_err_vs_triton" in row else ""
            print(f"{name:28s} {impl:28s} {row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s"
                  f"{err}", flush=True)
        except Exception as e:  # noqa: BLE001 -- one failure must not stop the others
            row["error"] = _error_text(e)
            print(f"{name:28s} {impl:28s} ERROR\n{row['error']}", flush=True)
        if impl != "triton":  # keep one reference set of gradients in memory, not all
            grads.pop(impl, None)
    return rows


def print_table(rows):
    configs = list(dict.fromkeys(r["config"] for r in rows))
    print("\nbackward TFLOP/s (err = failed); ratio = best mosaic / cudnn")
    for c in configs:
        mine = [r for r in rows if r["config"] == c]
        cudnn = next((r["tflops"] for r in mine if r["impl"] == "cudnn"), None)
        best = max((r for r in mine if r["impl"].startswith("mosaic") and r["tflops"]),
                   key=lambda r: r["tflops"], default=None)
        cells = "  ".join(f"{r['impl']}={'err' if r['tflops'] is None else round(r['tflops'])}"
                          for r in mine)
        ratio = f"{best['tflops'] / cudnn:.2f} ({best['impl']})" if best and cudnn else "-"
        print(f"{c}: {cells}\n    best mosaic / cudnn: {ratio}")


def main(argv=None):
    args = parse_args(argv, __doc__, "mgpu_bwd_check.json")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    start, rows = time.perf_counter(), []
    for cfg in TINY if args.tiny else CONFIGS:
        if chosen(cfg[0], args.configs):
            rows += run_config(cfg, interpret=args.tiny, with_variants=not args.no_variants,
                               only=args.variants)
            write_results(args.out, rows)  # after every config: a cut run keeps what it did
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return write_results(args.out, rows)


if __name__ == "__main__":
    main()
