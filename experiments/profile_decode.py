"""Where does the paged decode lose to the contiguous one? (issue 3, the two rows short of
0.95x: b1 x 32768 and b16 x 4096).

Question: at the same grid and tiles, how much slower is the gathered read of a shuffled page
pool than the strided read of a contiguous cache, and how much does the split combine add?
Run on the GPU machine (PYTHONPATH=.):
    python experiments/profile_decode.py --time            # GB/s of each variant, one process
    ncu --clock-control none -k regex:decode_attention \\
        python experiments/profile_decode.py --once        # each variant's kernel once, warm
Variants (DecodeBlockSizes): `contiguous` and `paged` at their defaults; `paged as
contiguous`: the paged kernel with the contiguous kernel's tiles, waves and stages (so the
same grid: the difference is the gather); `paged 1 split` (no combine). --tiny: a small row
in interpret mode (CPU), so the tests can run it.
"""

from __future__ import annotations

import argparse

import jax

import fastattn
from experiments.bench_attention import rel_err, time_fn
from experiments.bench_decode import REPEATS, _decode_problem

ROWS = [(1, 32768), (16, 4096)]
TINY_ROWS = [(1, 64)]
CONTIGUOUS = fastattn.DecodeBlockSizes.default_for(paged=False)
PAGED = fastattn.DecodeBlockSizes.default_for(paged=True)
VARIANTS = {  # name -> (paged?, block sizes)
    "contiguous": (False, CONTIGUOUS),
    "paged": (True, PAGED),
    "paged as contiguous": (True, CONTIGUOUS),
    "paged 1 split": (True, fastattn.DecodeBlockSizes(num_splits=1)),
}


def _fns(pool):
    """On a CPU implementation=\"pallas\" runs the kernels in interpret mode."""
    fns = {}
    for name, (paged, bs) in VARIANTS.items():
        if paged:
            fns[name] = jax.jit(lambda q, k, v, n, bs=bs: fastattn.paged_attention(
                q, *pool, n, implementation="pallas", block_sizes=bs))
        else:
            fns[name] = jax.jit(lambda q, k, v, n, bs=bs: fastattn.decode_attention(
                q, k, v, n, implementation="pallas", block_sizes=bs))
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--once", action="store_true", help="run each variant once (for ncu)")
    p.add_argument("--time", action="store_true", help="GB/s of each variant")
    p.add_argument("--tiny", action="store_true", help="a small row, interpret mode (CPU)")
    args = p.parse_args(argv)
    results = {}
    for B, S in TINY_ROWS if args.tiny else ROWS:
        q, k, v, lengths, kv_bytes, pool = _decode_problem(B, S)
        fns = _fns(pool)
        outs = {name: jax.block_until_ready(fn(q, k, v, lengths)) for name, fn in fns.items()}
        reference = outs["contiguous"][0] if isinstance(outs["contiguous"], tuple) \
            else outs["contiguous"]
        for name, out in outs.items():  # every variant reads the same keys
            out = out[0] if isinstance(out, tuple) else out
            err = rel_err(out, reference)
            assert out.shape == reference.shape and err < 1e-2, (name, out.shape, err)
        if args.once:  # the profiled launches: every variant once more, warm
            for fn in fns.values():
                jax.block_until_ready(fn(q, k, v, lengths))
        if args.time or args.tiny:
            for name, fn in fns.items():
                ms = time_fn(fn, q, k, v, lengths, min_time=0.1,
                             repeats=1 if args.tiny else REPEATS,
                             **({"min_iters": 1, "samples": 1} if args.tiny else {}))
                results[(B, S, name)] = kv_bytes / ms / 1e6
                print(f"b{B} kv{S} {name:22s} {ms * 1e3:8.1f} us {results[(B, S, name)]:7.0f} "
                      f"GB/s", flush=True)
    return results


if __name__ == "__main__":
    main()
