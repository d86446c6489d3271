"""Fused kernels against XLA's own fusion: does each one earn its place?

Question: XLA already fuses element-wise chains, so a hand-fused kernel wins only where XLA
must send an intermediate through HBM (a matmul's output before its activation, the
[tokens, vocab] logits) or launches several kernels where one would do. For the 0.85B model's
shapes, how long does each fused op take next to the plain jnp version compiled by XLA, in
the same process?

    add_rmsnorm       residual add + RMSNorm (models.llama), forward and forward + backward
    rope_write_kv     RoPE on q and k + the paged KV write of one engine step (T new tokens)
    linear_ce         LM head + softmax cross-entropy, loss and both gradients (training),
                      against the training step's plain head (bf16 logits cast to f32, then
                      log-softmax); also the peak temporary memory XLA reports for each
    swiglu            silu(x @ W_gate) * (x @ W_up), forward and forward + backward

Run (GPU): PYTHONPATH=. python experiments/bench_fused.py [--out benchmarks/fused.json]
           [--tiny]   (small shapes, CPU interpret mode; CI)
           [--ops add_rmsnorm,swiglu]   (a subset)
Prints one table (ms per call, fused / xla speed-up, correctness) and writes JSON
{device, jax, date, rows: [{config, impl, ms, rel_err?, temp_mb?, error?}]}, impl in
`fastattn_fused`, `xla`.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from experiments.bench_attention import depending_on, rel_err, time_fn
from experiments.results import write_results
from fastattn import kv_cache
from fastattn._linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from models.llama import apply_rope
from pallas_kernels.fused_rmsnorm import add_rmsnorm, add_rmsnorm_reference
from pallas_kernels.fused_swiglu import swiglu, swiglu_reference
from pallas_kernels.rope_kv_write import rope_write_kv

OPS = ("add_rmsnorm", "rope_write_kv", "linear_ce", "swiglu")
EPS = 1e-5
# Chained runs per timed call for engine-sized problems (bench_attention.chained): they take
# tens of us, the scale of one host dispatch, which back-to-back calls would time instead.
SMALL_REPEATS = 5


def _temp_mb(fn, *args) -> float | None:
    """Peak temporary buffer XLA plans for the compiled fn (None where not reported)."""
    try:
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
        return stats.temp_size_in_bytes / 2**20
    except Exception:  # some backends / versions do not report it
        return None


def _sum_of(fn):
    """A scalar of fn's outputs weighted by fixed random cotangents, for value_and_grad."""
    def loss(*args):
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum(jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size).reshape(o.shape)))
                   for o in outs)
    return loss


def bench_add_rmsnorm(M, D, dtype, interpret):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (M, D), dtype)
    r = jax.random.normal(keys[1], (M, D), dtype)
    w = 1 + 0.1 * jax.random.normal(keys[2], (D,), jnp.float32)
    fused = functools.partial(add_rmsnorm, eps=EPS, interpret=interpret)
    plain = functools.partial(add_rmsnorm_reference, eps=EPS)
    rows = []
    for phase, make in (("fwd", lambda f: f), ("fwd+bwd", lambda f: jax.grad(
            _sum_of(f), argnums=(0, 1, 2)))):
        name = f"add_rmsnorm {phase}|M{M} D{D} {jnp.dtype(dtype).name}"
        want = jax.jit(make(plain))(x, r, w)
        for impl, fn in (("fastattn_fused", make(fused)), ("xla", make(plain))):
            rows.append(_timed(name, impl, jax.jit(fn), (x, r, w), want, _repeats_for(M)))
    return rows


def bench_swiglu(M, D, F, dtype, interpret):
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (M, D), dtype)
    wg, wu = (jax.random.normal(k, (D, F), dtype) * D ** -0.5 for k in keys[1:])
    fused = functools.partial(swiglu, interpret=interpret)

    def plain(x, wg, wu):  # what models.llama.MLP does before down_proj
        return jax.nn.silu(x @ wg) * (x @ wu)

    want_fwd = jax.jit(swiglu_reference)(x, wg, wu)
    rows = []
    for phase, make in (("fwd", lambda f: f), ("fwd+bwd", lambda f: jax.grad(
            _sum_of(f), argnums=(0, 1, 2)))):
        name = f"swiglu {phase}|M{M} D{D} F{F} {jnp.dtype(dtype).name}"
        want = want_fwd if phase == "fwd" else jax.jit(make(plain))(x, wg, wu)
        flops = 2 * 2 * M * D * F * (3 if phase == "fwd+bwd" else 1)
        for impl, fn in (("fastattn_fused", make(fused)), ("xla", make(plain))):
            row = _timed(name, impl, jax.jit(fn), (x, wg, wu), want, _repeats_for(M))
            if row.get("ms"):
                row["tflops"] = flops / row["ms"] / 1e9
            rows.append(row)
    return rows


def bench_linear_ce(N, D, V, dtype):
    keys = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(keys[0], (N, D), dtype)
    w = (jax.random.normal(keys[1], (D, V), jnp.float32) * D ** -0.5).astype(dtype)
    labels = jax.random.randint(keys[2], (N,), 0, V)

    def plain(h, w, labels):  # fastattn.training without the fused loss: a bf16 Dense head,
        logits = (h @ w).astype(jnp.float32)  # its logits cast to f32 for the log-softmax
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0], None

    def loss_of(ce):
        return lambda h, w: jnp.mean(ce(h, w, labels)[0])

    grad_fused = jax.value_and_grad(loss_of(linear_cross_entropy), argnums=(0, 1))
    grad_plain = jax.value_and_grad(loss_of(plain), argnums=(0, 1))
    name = f"linear_ce loss+grads|N{N} D{D} V{V} {jnp.dtype(dtype).name}"
    # The oracle: the f32 reference at HIGHEST precision (not timed).
    want = jax.jit(jax.value_and_grad(loss_of(linear_cross_entropy_reference),
                                      argnums=(0, 1)))(h, w)
    rows = []
    for impl, fn in (("fastattn_fused", grad_fused), ("xla", grad_plain)):
        row = _timed(name, impl, jax.jit(fn), (h, w), want)
        row["temp_mb"] = _temp_mb(fn, h, w)
        rows.append(row)
    return rows


def bench_rope_write_kv(T, N, K, H, P, page_size, dtype, interpret):
    keys = jax.random.split(jax.random.key(4), 5)
    q = jax.random.normal(keys[0], (T, N, H), dtype)
    k_new = jax.random.normal(keys[1], (T, K, H), dtype)
    v_new = jax.random.normal(keys[2], (T, K, H), dtype)
    slots = jax.random.permutation(keys[3], P * page_size)[:T].astype(jnp.int32)
    positions = jax.random.randint(keys[4], (T,), 0, 4096)
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))

    def fused(q, k_new, v_new, k_pages, v_pages):
        return rope_write_kv(q, k_new, v_new, k_pages, v_pages, slots, positions, inv_freq,
                             interpret=interpret)

    def plain(q, k_new, v_new, k_pages, v_pages):  # models.llama's paged path
        q_rot = apply_rope(q[None], positions[None], inv_freq)[0]
        k_rot = apply_rope(k_new[None], positions[None], inv_freq)[0]
        return (q_rot, *kv_cache.write_kv(k_pages, v_pages, k_rot, v_new, slots))

    name = f"rope_write_kv|T{T} N{N} K{K} H{H} pool{P}x{page_size} {jnp.dtype(dtype).name}"

    def new_pools():
        return [jnp.zeros((K, P, page_size, H), dtype) for _ in range(2)]

    def written(out):  # (q rotated, the written slots of both pools)
        return (out[0], *(pages.reshape(K, -1, H)[:, slots] for pages in out[1:]))

    want = written(jax.jit(plain)(q, k_new, v_new, *new_pools()))
    rows = []
    for impl, fn in (("fastattn_fused", fused), ("xla", plain)):
        step = jax.jit(fn, donate_argnums=(3, 4))  # the engine donates the pools
        many = _chained_writes(fn, SMALL_REPEATS)
        state = {"pools": new_pools()}

        def call(q, k_new, v_new):  # threads the donated pools from call to call
            out = many(q, k_new, v_new, *state["pools"])
            state["pools"] = out[1:]
            return out[0]

        try:
            out = step(q, k_new, v_new, *state["pools"])
            state["pools"] = out[1:]
            err = max(rel_err(a, b) for a, b in zip(written(out), want))
            ms = time_fn(call, q, k_new, v_new) / SMALL_REPEATS
            rows.append({"config": name, "impl": impl, "ms": ms, "rel_err": err})
        except Exception as e:  # report and go on with the other rows
            rows.append({"config": name, "impl": impl, "error": str(e)[:2000]})
        print(_line(rows[-1]), flush=True)
    return rows


def _chained_writes(fn, repeats):
    """fn(q, k_new, v_new, k_pages, v_pages) -> (q_rot, k_pages, v_pages) run `repeats` times
    in one jitted call, the pools threaded from run to run (donated: written in place, as in
    the engine) and each run's q made to depend on the last run's output, as
    bench_attention.chained does for stateless calls."""
    def many(q, k_new, v_new, k_pages, v_pages):
        outs = []
        for _ in range(repeats):
            if outs:
                q = depending_on(outs[-1], q)
            q_rot, k_pages, v_pages = fn(q, k_new, v_new, k_pages, v_pages)
            outs.append(q_rot)
        return outs, k_pages, v_pages
    return jax.jit(many, donate_argnums=(3, 4))


def _repeats_for(rows: int) -> int:
    """Chained runs per timed call: engine-sized problems (<= 512 rows) take tens of us, the
    scale of one host dispatch, so they are timed SMALL_REPEATS to a call."""
    return SMALL_REPEATS if rows <= 512 else 1


def _timed(name, impl, fn, args, want, repeats=1) -> dict:
    try:
        got = fn(*args)
        err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        row = {"config": name, "impl": impl, "ms": time_fn(fn, *args, repeats=repeats),
               "rel_err": err}
    except Exception as e:  # report and go on with the other rows
        row = {"config": name, "impl": impl, "error": str(e)[:2000]}
    print(_line(row), flush=True)
    return row


def _line(row) -> str:
    if "error" in row:
        return f"  {row['config']:<52} {row['impl']:<15} ERROR {row['error'][:200]}"
    extra = "".join(f"  {k} {row[k]:.1f}" for k in ("tflops", "temp_mb") if row.get(k))
    return (f"  {row['config']:<52} {row['impl']:<15} {row['ms']:8.3f} ms  "
            f"rel_err {row['rel_err']:.1e}{extra}")


def _summary(rows) -> None:
    print("\nfused vs xla (same run): ms and speed-up")
    by = {}
    for r in rows:
        by.setdefault(r["config"], {})[r["impl"]] = r
    for config, cells in by.items():
        f, x = cells.get("fastattn_fused", {}), cells.get("xla", {})
        if f.get("ms") and x.get("ms"):
            print(f"  {config:<60} {f['ms']:8.3f} {x['ms']:8.3f}  {x['ms'] / f['ms']:5.2f}x")
        else:
            print(f"  {config:<60} (error)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/fused.json")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--ops", default=",".join(OPS))
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    ops = args.ops.split(",")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")
    bf16 = jnp.bfloat16
    # The 0.85B model (shared/TARGETS.md): D 2048, F 5632, V 32000, 32 / 8 heads of 128;
    # training rows 8 x 2048 tokens; an engine step of 512 tokens over a 20k-page pool.
    if args.tiny:
        shapes = dict(add_rmsnorm=[(64, 96, bf16)], swiglu=[(32, 64, 96, bf16)],
                      linear_ce=[(64, 32, 200, bf16)],
                      rope_write_kv=[(16, 4, 2, 64, 16, 8, bf16)])
    else:
        shapes = dict(add_rmsnorm=[(16384, 2048, bf16), (512, 2048, bf16)],
                      swiglu=[(16384, 2048, 5632, bf16), (512, 2048, 5632, bf16)],
                      linear_ce=[(16384, 2048, 32000, bf16), (8192, 4096, 128256, bf16)],
                      rope_write_kv=[(512, 32, 8, 128, 20000, 16, bf16),
                                     (256, 32, 8, 128, 20000, 16, bf16)])
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for op in ops:
        for shape in shapes[op]:
            if op == "add_rmsnorm":
                rows += bench_add_rmsnorm(*shape, interpret)
            elif op == "swiglu":
                rows += bench_swiglu(*shape, interpret)
            elif op == "linear_ce":
                rows += bench_linear_ce(*shape)
            else:
                rows += bench_rope_write_kv(*shape, interpret)
    _summary(rows)
    return write_results(args.out, rows)


if __name__ == "__main__":
    main()
