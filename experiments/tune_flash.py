"""Tile sweep for the Pallas flash-attention kernels: which BlockSizes are fastest per shape?

Question: for the benchmark shapes, which (block_q, block_k, num_warps, num_stages) of the
forward kernel, and which tiles of the dK/dV and dQ kernels, run fastest on this GPU? The
answers feed `BlockSizes.default_for`.
Run (GPU): PYTHONPATH=. python experiments/tune_flash.py [--out tune.json] [--quick]
Prints, per shape, each candidate's time and TFLOP/s, best first; writes all rows as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

import fastattn
from experiments.bench_attention import time_fn

FWD_SHAPES = [  # (B, T, N, H, causal)
    (16, 1024, 16, 128, False), (16, 1024, 16, 128, True), (4, 4096, 16, 128, False),
    (4, 4096, 16, 128, True), (1, 16384, 16, 128, False), (16, 1024, 32, 64, False),
    (4, 4096, 32, 64, False), (1, 16384, 32, 64, False),
]
BWD_SHAPES = [(16, 1024, 16, 128, True), (4, 4096, 16, 128, False), (4, 4096, 16, 128, True)]

FWD_CANDIDATES = [  # block_q, block_k, num_warps, num_stages
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4),
    (256, 64, 8, 3), (256, 128, 8, 2), (128, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
    (128, 32, 4, 4), (128, 64, 4, 4),
]
BWD_CANDIDATES = [  # dkdv (block_q, block_k, warps, stages), dq (block_q, block_k, warps, stages)
    ((64, 128, 8, 2), (128, 64, 8, 2)), ((32, 128, 8, 2), (128, 64, 8, 2)),
    ((64, 64, 4, 2), (64, 64, 4, 2)), ((32, 64, 4, 3), (64, 32, 4, 3)),
    ((64, 128, 8, 3), (128, 64, 8, 3)), ((128, 128, 8, 2), (128, 128, 8, 2)),
    ((32, 128, 4, 2), (128, 32, 4, 2)),
]


def _inputs(B, T, N, H):
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in keys]


def _flops(B, T, N, H, causal):
    return 4 * B * N * T * T * H / (2 if causal else 1)


def sweep_forward(shapes, rows):
    for B, T, N, H, causal in shapes:
        q, k, v, _ = _inputs(B, T, N, H)
        for bq, bk, warps, stages in FWD_CANDIDATES:
            bs = fastattn.BlockSizes(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
            fn = jax.jit(lambda q, k, v, bs=bs: fastattn.attention(
                q, k, v, causal=causal, implementation="pallas", block_sizes=bs))
            _record(rows, "fwd", (B, T, N, H, causal), bs, fn, (q, k, v), _flops(B, T, N, H, causal))


def sweep_backward(shapes, rows, forward: fastattn.BlockSizes):
    for B, T, N, H, causal in shapes:
        q, k, v, do = _inputs(B, T, N, H)
        for (dkv_q, dkv_k, dkv_w, dkv_s), (dq_q, dq_k, dq_w, dq_s) in BWD_CANDIDATES:
            bs = dataclasses.replace(
                forward, block_q_dkv=dkv_q, block_k_dkv=dkv_k, num_warps_dkv=dkv_w,
                num_stages_dkv=dkv_s, block_q_dq=dq_q, block_k_dq=dq_k, num_warps_dq=dq_w,
                num_stages_dq=dq_s)

            def loss(q, k, v, do, bs=bs):  # do is an argument: a captured array would be
                out = fastattn.attention(q, k, v, causal=causal, implementation="pallas",
                                         block_sizes=bs)  # constant-folded by XLA
                return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

            fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            _record(rows, "fwd+bwd", (B, T, N, H, causal), bs, fn, (q, k, v, do),
                    3.5 * _flops(B, T, N, H, causal))


def _record(rows, phase, shape, bs, fn, args, flops):
    try:
        ms = time_fn(fn, *args, min_time=0.2, min_iters=5)
        rows.append(dict(phase=phase, shape=shape, block_sizes=dataclasses.asdict(bs), ms=ms,
                         tflops=flops / ms / 1e9))
    except Exception as e:  # a tile that does not compile (shared memory) is a result too
        rows.append(dict(phase=phase, shape=shape, block_sizes=dataclasses.asdict(bs),
                         error=str(e).splitlines()[0][:200]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/tune_flash.json")
    parser.add_argument("--only", choices=["fwd", "bwd", "all"], default="all")
    args = parser.parse_args(argv)
    rows = []
    if args.only in ("fwd", "all"):
        sweep_forward(FWD_SHAPES, rows)
    if args.only in ("bwd", "all"):
        sweep_backward(BWD_SHAPES, rows, fastattn.BlockSizes.default_for(
            q_len=4096, kv_len=4096, head_dim=128, causal=True))
    for phase in ("fwd", "fwd+bwd"):
        for shape in sorted({tuple(r["shape"]) for r in rows if r["phase"] == phase}):
            mine = [r for r in rows if r["phase"] == phase and tuple(r["shape"]) == shape]
            print(f"\n{phase} B,T,N,H,causal={shape}")
            for r in sorted(mine, key=lambda r: r.get("ms", float("inf"))):
                bs = r["block_sizes"]
                keys = (["block_q", "block_k", "num_warps", "num_stages"] if phase == "fwd" else
                        ["block_q_dkv", "block_k_dkv", "num_warps_dkv", "num_stages_dkv",
                         "block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq"])
                tiles = " ".join(str(bs[k]) for k in keys)
                result = f"{r['ms']:8.3f} ms {r['tflops']:6.1f} TFLOP/s" if "ms" in r else r["error"]
                print(f"  {tiles:<28} {result}")
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
