"""Where does the paged decode lose to the contiguous one? (issue 3, the two rows short of
0.95x: b1 x 32768 and b16 x 4096).

Question: how much of the paged kernel's gap to the contiguous one is the order of the pages
in the pool (DRAM / TLB locality), and how much the kernel's gathered tile?
Run on the GPU machine (PYTHONPATH=.):
    python experiments/profile_decode.py --time            # GB/s of each variant, one process
    python experiments/profile_decode.py --trace DIR       # every GPU kernel of one call
    XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none \\
        -k regex:decode_attention python experiments/profile_decode.py --once \\
        --rows 1x32768                                     # each variant's kernel, warm
(without the preallocation off, ncu backs up JAX's whole 60 GB pool before every replay)
Variants: `contiguous` and `paged` at their default tiles, the paged one over the
benchmark's pool (16-token pages in a random order); `paged in order`: the same kernel over
a pool whose pages sit in sequence order (the block tables still go through every page);
`paged runs of 4`: pages shuffled in runs of 4 consecutive pages (64 tokens, 16 KB per
head). If the in-order pool reads as fast as the contiguous cache, the gap is the shuffled
pool's DRAM / TLB locality, not the kernel's gather. (Session 7 dropped two variants: the
contiguous tiles on the paged kernel were slower, 2248 vs 2308 GB/s on b1 x 32768, and one
split is 8 programs there.) Session 9 had `paged one wave` / `paged one wave st3`, the
paged kernel with one program per SM (waves=1: one split on b16 x 4096, whose contiguous
decode runs one split and no combine) at 2 or 3 stages; both lost to the default of then.
Session 11 (the paged default is now the contiguous tile with each split's page ids read
before the key loop): `paged two waves`, the earlier paged default; `paged w8`, `paged bk64
st6`, `paged bk64 two waves`: other tiles around the new default.
--tiny: a small row in interpret mode (CPU), for the tests.
"""

from __future__ import annotations

import argparse

import jax

import fastattn
from experiments import trace_kernels
from experiments.bench_attention import rel_err, time_fn
from experiments.bench_decode import PAGE_SIZE, REPEATS, _decode_problem, _to_pages
from pallas_kernels.decode_attention import DecodeBlockSizes

ROWS = [(1, 32768), (16, 4096)]
TRACED_CALLS = 20
TINY_ROWS = [(1, 128)]  # 8 pages: runs of 4 still move
CONTIGUOUS = "contiguous"
VARIANTS = {  # name -> pages shuffled in runs of this many (None: in order), or CONTIGUOUS
    "contiguous": CONTIGUOUS,
    "paged": 1,
    "paged in order": None,
    "paged runs of 4": 4,
    "paged two waves": 1,
    "paged w8": 1,
    "paged bk64 st6": 1,
    "paged bk64 two waves": 1,
}
BLOCK_SIZES = {  # the paged variants not at the paged default tiles
    # the paged default of sessions 3-10: 2 stages, two programs per SM, table read per step
    "paged two waves": DecodeBlockSizes(waves=2, num_stages=2),
    "paged w8": DecodeBlockSizes(preload_page_ids=True, waves=1, num_stages=3, num_warps=8),
    "paged bk64 st6": DecodeBlockSizes(preload_page_ids=True, waves=1, num_stages=6,
                                       block_k=64),
    "paged bk64 two waves": DecodeBlockSizes(preload_page_ids=True, waves=2, num_stages=3,
                                             block_k=64),
}


def _fns(k, v, seed):
    """On a CPU implementation=\"pallas\" runs the kernels in interpret mode."""
    fns = {}
    for name, run in VARIANTS.items():
        if run == CONTIGUOUS:
            fns[name] = jax.jit(lambda q, k, v, n: fastattn.decode_attention(
                q, k, v, n, implementation="pallas"))
        else:
            pool = _to_pages(k, v, page_size=PAGE_SIZE, seed=seed, run=run)
            fns[name] = jax.jit(lambda q, k, v, n, pool=pool, bs=BLOCK_SIZES.get(name):
                                fastattn.paged_attention(q, *pool, n, implementation="pallas",
                                                         block_sizes=bs))
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--once", action="store_true", help="run each variant once (for ncu)")
    p.add_argument("--time", action="store_true", help="GB/s of each variant")
    p.add_argument("--tiny", action="store_true", help="a small row, interpret mode (CPU)")
    p.add_argument("--rows", default="", help="only these B x S rows, e.g. 1x32768")
    p.add_argument("--variants", default="", help="only these variants, comma separated")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help=f"also run each variant {TRACED_CALLS} times under the JAX profiler "
                        "and print every GPU kernel's time per call (trace_kernels)")
    args = p.parse_args(argv)
    rows = TINY_ROWS if args.tiny else ROWS
    if args.rows:
        rows = [tuple(int(x) for x in r.split("x")) for r in args.rows.split(",")]
    keep = set(args.variants.split(",")) if args.variants else set(VARIANTS)
    if keep - set(VARIANTS):
        raise ValueError(f"--variants: unknown {sorted(keep - set(VARIANTS))}; the variants "
                         f"are {list(VARIANTS)}")
    results, traces = {}, {}  # GB/s, and with --trace the kernel summaries, per (B, S, name)
    for B, S in rows:
        q, k, v, lengths, kv_bytes, _ = _decode_problem(B, S)
        fns = {n: f for n, f in _fns(k, v, seed=B + S).items() if n in keep | {"contiguous"}}
        outs = {name: jax.block_until_ready(fn(q, k, v, lengths)) for name, fn in fns.items()}
        reference = outs["contiguous"]
        for name, out in outs.items():  # every variant reads the same keys
            err = rel_err(out, reference)
            assert out.shape == reference.shape and err < 1e-2, (name, out.shape, err)
        if args.once:  # the profiled launches: every variant once more, warm
            for fn in fns.values():
                jax.block_until_ready(fn(q, k, v, lengths))
        if args.trace:
            for name, fn in fns.items():
                where = f"{args.trace}/b{B}_{S}_{name.replace(' ', '_')}"
                with jax.profiler.trace(where, create_perfetto_trace=True):
                    for _ in range(TRACED_CALLS):
                        out = fn(q, k, v, lengths)
                    jax.block_until_ready(out)
                summary = trace_kernels.summary(trace_kernels.kernel_times(where),
                                                steps=TRACED_CALLS,
                                                idle=trace_kernels.idle_before(where))
                traces[(B, S, name)] = summary
                print(f"b{B} kv{S} {name}: kernels {1e3 * summary['kernel_ms_per_step']:.1f} "
                      f"us per call, idle between them {1e3 * summary['idle_ms_per_step']:.1f}")
                for kernel, ms in summary["all_kernels_ms"].items():
                    print(f"    {1e3 * ms:8.2f} us  {kernel[:90]}")
        if args.time or args.tiny:
            for name, fn in fns.items():
                ms = time_fn(fn, q, k, v, lengths, min_time=0.1,
                             repeats=1 if args.tiny else REPEATS,
                             **({"min_iters": 1, "samples": 1} if args.tiny else {}))
                results[(B, S, name)] = kv_bytes / ms / 1e6
                print(f"b{B} kv{S} {name:22s} {ms * 1e3:8.1f} us {results[(B, S, name)]:7.0f} "
                      f"GB/s", flush=True)
    return {"gbps": results, "traces": traces}


if __name__ == "__main__":
    main()
