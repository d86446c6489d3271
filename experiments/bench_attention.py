"""Attention benchmark: how fast is fastattn vs. cuDNN, XLA and JAX's Pallas mha?

Question: on the team's TARGETS (bf16, 16k tokens per batch, T=S in {1k,4k,16k},
(N=16,H=128) and (N=32,H=64), causal and full; fwd and fwd+bwd for H=128), what
TFLOP/s does `fastattn.attention` reach, in one process next to its peers, and
does its output (and dq) match cuDNN (relative L2 error, flagged when > 2e-2)?

Run (from the repo root):
    PYTHONPATH=. python experiments/bench_attention.py [--only fwd|bwd|all]
        [--configs SUBSTR] [--impls fastattn,cudnn,...] [--out PATH]
        [--block-sizes '{"block_q": 128, "block_k": 64}'] [--tiny]

Prints one line per (config, impl) as it goes, then a table with one row per
config: TFLOP/s per impl ("!" = rel_err > 2e-2, "err" = failed, "skip" = not
run), plus ours/cudnn and ours/jax_pallas_mha (ours = the best of fastattn,
fastattn_pallas and the Hopper kernels fastattn_mosaic / fastattn_mosaic_bwd).
Writes JSON {device, jax, date, rows: [{config, impl, ms, tflops, rel_err?, error?,
skipped?}]} to --out. The reference for rel_err is cudnn, or xla where cudnn did not
run (e.g. --tiny on CPU).
"""

import argparse
import datetime
import functools
import inspect
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp

import fastattn

IMPLS = ["cudnn", "xla", "fastattn", "fastattn_nondet", "fastattn_pallas", "fastattn_mosaic",
         "fastattn_mosaic_bwd", "jax_pallas_mha"]
# fastattn_nondet: fastattn.attention(deterministic=False), the default path allowed a backward
# that is not bitwise deterministic (as cuDNN's is not by default); fwd+bwd rows only, and
# not counted in "ours" (the default path promises determinism).
# fastattn_mosaic*: the Hopper forward with the Triton backward / with the Mosaic GPU backward
# (implementation "pallas_mosaic" / "pallas_mosaic_bwd"); on a CPU they would run interpreted.
GPU_ONLY = {"cudnn", "jax_pallas_mha", "fastattn_mosaic", "fastattn_mosaic_bwd"}
OURS = ["fastattn", "fastattn_pallas", "fastattn_mosaic", "fastattn_mosaic_bwd"]
XLA_SCORES_LIMIT = 16e9  # bytes of f32 scores above which the xla peer OOMs
ERR_FLAG = 2e-2


def chained(fn, repeats: int):
    """One jitted call that runs fn(*args) `repeats` times in a row. Its time / repeats is the
    device time of one run: calls from Python cost ~20-80 us of host dispatch each, more than
    a ~50 us decode kernel, so back-to-back Python calls would time the host, not the kernel.

    Run i + 1 must not be merged with run i (same inputs: XLA's CSE would), so its smallest
    floating-point input x (pass the one fn reads, e.g. q, as an argument, not a closure) is
    made to depend on run i's output: `x + (d != d)` with d one element of that output —
    zero unless d is NaN, which XLA cannot assume. That is one tiny fused kernel per run
    (~2 us on a [B, N, H] query, the same for every implementation timed; keep x small).
    Every run's output is returned, so none is dead code. (An optimization barrier alone did
    not do it: on the CPU XLA drops the barrier and merged the runs, and a version that
    returned only the last output lost the other runs on the GPU: decode "read" 28 TB/s.)"""
    def many(*args):
        outs = [fn(*args)]
        floats = [i for i, x in enumerate(args) if jnp.issubdtype(x.dtype, jnp.floating)]
        i = min(floats, key=lambda i: args[i].size * args[i].dtype.itemsize)
        for _ in range(repeats - 1):
            args = (*args[:i], depending_on(outs[-1], args[i]), *args[i + 1:])
            outs.append(fn(*args))
        return outs
    return jax.jit(many)


def depending_on(out, x):
    """x + 0 that XLA cannot compute before `out` exists: (d != d) with d one element of out is
    0 unless d is NaN, which the compiler cannot rule out (see `chained`)."""
    d = jnp.ravel(jax.tree_util.tree_leaves(out)[0])[0]
    return x + (d != d).astype(x.dtype)


def time_fn(fn, *args, min_time=0.3, min_iters=10, samples=7, repeats=1):
    """Median per-call ms of `fn(*args)`.

    Calls are issued back to back (JAX dispatches asynchronously, so the GPU never waits on
    Python) and the clock stops when the last result is ready; per-call time = batch time /
    calls. The median over `samples` batches is reported. Timing each call up to
    block_until_ready instead would add the dispatch and sync latency (tens of us) to every
    kernel and understate sub-millisecond ones. repeats > 1: each call runs fn that many
    times inside one jitted program (`chained`), for kernels shorter than a dispatch.
    """
    if repeats > 1:
        return time_fn(chained(fn, repeats), *args, min_time=min_time, min_iters=min_iters,
                       samples=samples) / repeats
    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = max(time.perf_counter() - t0, 1e-6)
    calls = min(max(1, math.ceil(min_time / samples / est)), 1000)
    times = []
    for _ in range(max(samples, min_iters // calls)):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls)
    return 1e3 * statistics.median(times)


def make_configs(tiny):
    """(name, mode, B, T, N, H, causal); mode is 'fwd' or 'fwd+bwd'."""
    if tiny:
        return [(f"{m}|b1 s256 h2 d64 causal", m, 1, 256, 2, 64, True) for m in ("fwd", "fwd+bwd")]
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for n, h in ((16, 128), (32, 64)):
            if mode == "fwd+bwd" and h != 128:
                continue
            for t in (1024, 4096, 16384):
                b = 16384 // t
                for causal in (True, False):
                    name = f"{mode}|b{b} s{t} h{n} d{h} {'causal' if causal else 'full'}"
                    out.append((name, mode, b, t, n, h, causal))
    return out


def make_attn(impl, causal, head_dim, block_sizes):
    """Returns attn(q, k, v) -> [B, T, N, H] for one implementation."""
    if impl in ("cudnn", "xla"):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl
        )
    if impl == "jax_pallas_mha":
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        params = inspect.signature(pallas_attention.mha).parameters
        kw = {"segment_ids": None, "causal": causal, "sm_scale": 1.0 / math.sqrt(head_dim)}
        kw = {k: v for k, v in kw.items() if k in params}
        return lambda q, k, v: pallas_attention.mha(q, k, v, **kw)
    if impl == "fastattn":
        return lambda q, k, v: fastattn.attention(q, k, v, causal=causal)
    if impl == "fastattn_nondet":
        return lambda q, k, v: fastattn.attention(q, k, v, causal=causal, deterministic=False)
    if impl in ("fastattn_mosaic", "fastattn_mosaic_bwd"):
        name = {"fastattn_mosaic": "pallas_mosaic", "fastattn_mosaic_bwd": "pallas_mosaic_bwd"}
        return lambda q, k, v: fastattn.attention(q, k, v, causal=causal,
                                                  implementation=name[impl])
    kw = {"implementation": "pallas"}
    if block_sizes is not None:
        kw["block_sizes"] = fastattn.BlockSizes(**block_sizes)
    return lambda q, k, v: fastattn.attention(q, k, v, causal=causal, **kw)


def make_step(attn, mode, do):
    """Jitted op to time: the forward, or value-and-grad of sum(out * do)."""
    if mode == "fwd":
        return jax.jit(attn)

    # do is an argument, not a closure: a captured array is a constant XLA would fold.
    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

    return functools.partial(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), do=do)


def rel_err(a, b):
    """Relative L2 error of a against b (b all zero: the absolute error, never NaN)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def run_config(cfg, impls, block_sizes, timing):
    name, mode, b, t, n, h, causal = cfg
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    shape = (b, t, n, h)
    q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in (kq, kk, kv, kd))
    flops = 4 * b * n * t * t * h * (0.5 if causal else 1.0) * (3.5 if mode == "fwd+bwd" else 1.0)
    on_gpu = jax.default_backend() == "gpu"
    rows, ref = [], None
    for impl in impls:
        row = {"config": name, "impl": impl, "ms": None, "tflops": None}
        rows.append(row)
        if impl in GPU_ONLY and not on_gpu:
            row["skipped"] = f"backend is {jax.default_backend()}, not gpu"
        elif impl == "xla" and t * t * b * n * 4 > XLA_SCORES_LIMIT:
            row["skipped"] = "f32 scores > 16 GB (OOM)"
        elif impl == "fastattn_nondet" and mode == "fwd":
            row["skipped"] = "the forward is fastattn's"
        if "skipped" in row:
            print(f"{name:34s} {impl:16s} skipped: {row['skipped']}", flush=True)
            continue
        try:
            step = make_step(make_attn(impl, causal, h, block_sizes), mode, do)
            out = step(q, k, v)
            check = out if mode == "fwd" else out[1][0]  # output, or dq
            check = jax.block_until_ready(check)
            if ref is None and impl in ("cudnn", "xla"):
                ref = check
            elif ref is not None:
                row["rel_err"] = rel_err(check, ref)
            del out
            row["ms"] = time_fn(step, q, k, v, **timing)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            err = f"  rel_err {row['rel_err']:.2e}" if "rel_err" in row else ""
            print(
                f"{name:34s} {impl:16s} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s{err}",
                flush=True,
            )
        except Exception as e:  # one failing impl must not stop the sweep
            msg = (str(e).strip().splitlines() or [""])[0]
            row["error"] = f"{type(e).__name__}: {msg}"
            print(f"{name:34s} {impl:16s} ERROR {row['error']}", flush=True)
    return rows


def print_table(rows, impls):
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["config"], r["impl"]): r for r in rows}
    cols = impls + ["ours/cudnn", "ours/jax_pallas_mha"] + (
        ["nondet/cudnn"] if "fastattn_nondet" in impls else [])
    width = max(len(c) for c in configs) + 2
    print("\nTFLOP/s  (! = rel_err > %.0e, err = failed, skip = not run)" % ERR_FLAG)
    print("config".ljust(width) + "".join(c.rjust(max(len(c), 8) + 2) for c in cols))
    for c in configs:
        cells = []
        for impl in impls:
            r = by.get((c, impl), {})
            if r.get("tflops") is not None:
                cells.append(
                    (f"{r['tflops']:.1f}" if r["tflops"] >= 10 else f"{r['tflops']:.3g}")
                    + ("!" if r.get("rel_err", 0) > ERR_FLAG else "")
                )
            else:
                cells.append("err" if "error" in r else "skip")
        ours = [by.get((c, i), {}).get("tflops") for i in OURS]
        ours = max([x for x in ours if x is not None], default=None)
        for peer in ("cudnn", "jax_pallas_mha"):
            p = by.get((c, peer), {}).get("tflops")
            cells.append(f"{ours / p:.2f}" if ours and p else "-")
        if "fastattn_nondet" in impls:
            nondet = by.get((c, "fastattn_nondet"), {}).get("tflops")
            p = by.get((c, "cudnn"), {}).get("tflops")
            cells.append(f"{nondet / p:.2f}" if nondet and p else "-")
        print(c.ljust(width) + "".join(x.rjust(max(len(h), 8) + 2) for x, h in zip(cells, cols)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["fwd", "bwd", "all"], default="all")
    p.add_argument("--configs", default="", help="keep configs whose name contains this")
    p.add_argument("--out", default="benchmarks/attention.json")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ",".join(IMPLS))
    p.add_argument("--tiny", action="store_true", help="one small config, CPU-friendly")
    p.add_argument(
        "--block-sizes", default=None, help="JSON dict -> BlockSizes for fastattn_pallas"
    )
    args = p.parse_args(argv)

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    impls = [i for i in IMPLS if i in impls]  # references (cudnn, xla) first
    block_sizes = json.loads(args.block_sizes) if args.block_sizes else None
    modes = {"fwd": ["fwd"], "bwd": ["fwd+bwd"], "all": ["fwd", "fwd+bwd"]}[args.only]
    configs = [c for c in make_configs(args.tiny) if c[1] in modes and args.configs in c[0]]
    timing = {"min_time": 0.0, "min_iters": 3} if args.tiny else {}

    print(f"device {jax.devices()[0].device_kind}  jax {jax.__version__}  impls {impls}")
    rows = []
    for cfg in configs:
        rows += run_config(cfg, impls, block_sizes, timing)
    print_table(rows, impls)

    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }
    if block_sizes is not None:
        result["block_sizes"] = block_sizes
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
