"""Decode benchmark: how close to the HBM copy ceiling does our split-KV decode read the cache?

Question: for one new token per sequence (q_len = 1; 32 query heads on 8 KV heads, H = 128,
bf16) at the TARGETS shapes, what K+V bandwidth does `fastattn.decode_attention` reach, next
to cuDNN and XLA (`jax.nn.dot_product_attention` with T = 1), JAX's shipped Pallas
`decode_attention.gqa`, and a device copy measured in the same run?
Run (GPU): PYTHONPATH=. python experiments/bench_decode.py [--out benchmarks/decode.json]
           [--tiny]   (a small CPU variant for CI)
           [--sweep [decode|paged|ragged]]   (tile sweep of one of our kernels; prints only;
               ragged: the mixed step under 8 prefill-launch tiles, then 3 decode-launch
               tiles, ms and GB/s each, then each half of the step under the fastest next to
               the flash forward / paged decode on the same half; ~1 min on an H100)
               prefetch: paged decode and the mixed step with page ids read one tile ahead
               or not, next to the contiguous decode and the split baseline)
           [--configs 1x32768,16x4096]   (only these B x S rows)
Prints a table of GB/s (K + V bytes read once / time) per implementation and writes JSON
{device, jax, date, rows: [{config, impl, ms, gbps, rel_err?, error?}]}.
`fastattn_paged` and `jax_pallas_paged` read the same keys from a shuffled pool of 16-token
pages through block tables (K + V bytes counted the same; JAX's paged kernel applies no
1/sqrt(H) to the logits, so it is given q pre-scaled, outside the timed call).
Mixed step (`ragged|...` rows): 8 prefill chunks of 512 new tokens + 248 decodes, every
sequence at a 2048-token context, through `fastattn.ragged_paged_attention`, reported as
K + V bandwidth and TFLOP/s, next to `fastattn_split`: the same work as our flash forward on
the chunks plus our paged decode on the decodes, timed apart and summed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os

import jax
import jax.numpy as jnp

import fastattn
from experiments.bench_attention import rel_err, time_fn
from pallas_kernels.paged_attention import RaggedBlockSizes, RaggedTile

CONFIGS = [(1, 131072), (1, 32768), (16, 4096), (64, 4096), (64, 1024), (256, 1024)]  # (B, S)
N, K, H = 32, 8, 128


PAGE_SIZE = 16
# Runs of a kernel per jitted call when timing the decode rows (bench_attention.chained): one
# decode of the small rows takes ~50 us, less than a call's host dispatch, so one run per call
# would time the host. Every decode row (peers and copy ceiling too) is timed the same way;
# the mixed ragged step (~1 ms) is timed call by call.
REPEATS = 5
RAGGED_STEP = (8, 512, 248, 2048)  # prefill chunks, new tokens per chunk, decodes, context
RAGGED_TINY = (2, 32, 6, 64)


def _to_pages(k, v, *, page_size, seed, run=1):
    """The same K/V as a page pool [K, P, page_size, H] and its block tables, runs of `run`
    consecutive pages placed in a random order (run 1: every page shuffled; None: the pages
    in sequence order)."""
    B, S, K, H = k.shape
    per_seq = S // page_size
    if run is None:
        perm = jnp.arange(B * per_seq)
    else:  # perm[i]: the pool slot of page i (sequence-major)
        runs = jax.random.permutation(jax.random.key(seed), B * per_seq // run)
        perm = (runs[:, None] * run + jnp.arange(run)[None, :]).reshape(-1)
    inverse = jnp.argsort(perm)

    def pool(x):  # [B, S, K, H] -> [K, B * per_seq, page_size, H], pages shuffled
        pages = x.reshape(B * per_seq, page_size, K, H).transpose(2, 0, 1, 3)
        return pages[:, inverse]

    return pool(k), pool(v), perm.reshape(B, per_seq).astype(jnp.int32)


def _impls(on_gpu, paged):
    k_pages, v_pages, tables, _ = paged

    def ours(q, k, v, lengths):
        return fastattn.decode_attention(q, k, v, lengths, implementation="pallas")

    def ours_paged(q, k, v, lengths):  # the same keys, read through the page tables
        return fastattn.paged_attention(q, k_pages, v_pages, tables, lengths,
                                        implementation="pallas")

    def dpa(impl):
        return lambda q, k, v, lengths: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation=impl)[:, 0]

    def jax_pallas_gqa(q, k, v, lengths):
        from jax.experimental.pallas.ops.gpu import decode_attention as jdecode
        return jdecode.gqa(q, k, v, kv_seq_len=lengths)

    def jax_pallas_paged(q, k, v, lengths):  # its defaults: 8 pages per tile, 16 splits
        # It applies no 1/sqrt(H) to the logits: `run` passes it q pre-scaled (outside the
        # timed call) as its q.
        from jax.experimental.pallas.ops.gpu import paged_attention as jpaged
        return jpaged.paged_attention(q, k_pages, v_pages, tables, lengths)

    impls = {"fastattn_decode": ours, "fastattn_paged": ours_paged, "xla": dpa("xla")}
    if on_gpu:
        impls.update(cudnn=dpa("cudnn"), jax_pallas_gqa=jax_pallas_gqa,
                     jax_pallas_paged=jax_pallas_paged)
    return impls


def run(configs, out_path, ragged):
    on_gpu = jax.default_backend() == "gpu"
    rows = []
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                  date=datetime.date.today().isoformat(), rows=rows)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)

    def save():  # after every config: a run cut short by a time limit keeps its rows
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    for B, S in configs:
        name = f"b{B} kv{S} hq{N} hkv{K} d{H}"
        q, k, v, lengths, kv_bytes, pool = _decode_problem(B, S, key_seed=B * S)
        paged = (*pool, q * H ** -0.5)
        copy = jax.jit(lambda x, one: x * one)  # reads and writes every byte
        ms = time_fn(copy, k, jnp.ones((), k.dtype), repeats=REPEATS)
        rows.append(dict(config=name, impl="copy_ceiling", ms=ms,
                         gbps=2 * k.size * k.dtype.itemsize / ms / 1e6))
        print(name, "copy_ceiling", {"ms": ms, "gbps": rows[-1]["gbps"]}, flush=True)
        ref = None
        for impl, fn in _impls(on_gpu, paged).items():
            row = dict(config=name, impl=impl)
            args = (paged[3] if impl == "jax_pallas_paged" else q, k, v, lengths)
            try:
                fn = jax.jit(fn)
                out = jax.block_until_ready(fn(*args)).astype(jnp.float32)
                if ref is None:
                    ref = out
                else:
                    row["rel_err"] = rel_err(out, ref)
                row["ms"] = time_fn(fn, *args, repeats=REPEATS)
                row["gbps"] = kv_bytes / row["ms"] / 1e6
            except Exception as e:  # one failing peer must not stop the run
                row["error"] = str(e).splitlines()[0][:200]
            rows.append(row)
            print(name, impl, {k_: v_ for k_, v_ in row.items() if k_ not in ("config", "impl")},
                  flush=True)
        save()
    rows += run_ragged(*ragged)
    save()
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    print(f"\nGB/s of K+V read  ({result['device']}, jax {result['jax']})")
    print(f"{'config':<32}" + "".join(f"{i:>17}" for i in impls))
    for name in dict.fromkeys(r["config"] for r in rows):
        cells = {r["impl"]: r for r in rows if r["config"] == name}
        print(f"{name:<32}" + "".join(_cell(cells, i) for i in impls))
    return result


def run_ragged(chunks, chunk_len, decodes, context, variants=None):
    """One mixed step; returns rows for fastattn_ragged and fastattn_split (and
    fastattn_ragged[name] for each RaggedBlockSizes of `variants` {name: block sizes})."""
    S = chunks + decodes
    name = f"ragged|{chunks}x{chunk_len} prefill + {decodes} decodes ctx{context}"
    q_lens = [chunk_len] * chunks + [1] * decodes
    T = sum(q_lens)
    keys = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(keys[0], (T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (S, context, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (S, context, K, H), jnp.bfloat16)
    k_pages, v_pages, tables = _to_pages(k, v, page_size=PAGE_SIZE, seed=11)
    ctx = jnp.full((S,), context, jnp.int32)
    starts = jnp.asarray([0] + list(jnp.cumsum(jnp.asarray(q_lens)).tolist()), jnp.int32)
    # FLOPs: 4 N H per (query, visible key); a chunk's row r sees context - chunk_len + r + 1.
    pairs = chunks * (chunk_len * (context - chunk_len) + chunk_len * (chunk_len + 1) // 2)
    flops = 4 * N * H * (pairs + decodes * context)
    kv_bytes = 2 * k.size * k.dtype.itemsize
    def ragged_step(bs=None):
        return jax.jit(lambda q, kp, vp: fastattn.ragged_paged_attention(
            q, kp, vp, tables, ctx, starts, S, implementation="pallas", max_q_len=chunk_len,
            block_sizes=bs))

    ragged = ragged_step()
    prefill = jax.jit(lambda q, k, v: fastattn.attention(q, k, v, causal=True,
                                                         implementation="pallas"))
    decode = jax.jit(lambda q, kp, vp: fastattn.paged_attention(
        q, kp, vp, tables[chunks:], ctx[chunks:], implementation="pallas"))
    q_chunks = q[: chunks * chunk_len].reshape(chunks, chunk_len, N, H)
    split_out = jnp.concatenate([prefill(q_chunks, k[:chunks], v[:chunks]).reshape(-1, N, H),
                                 decode(q[chunks * chunk_len:], k_pages, v_pages)])
    rows = []
    timers = [("fastattn_ragged", ragged),
              *((f"fastattn_ragged[{label}]", ragged_step(bs))
                for label, bs in (variants or {}).items()),
              ("fastattn_split", None)]
    for impl, step in timers:
        row = dict(config=name, impl=impl)
        try:
            if step is None:
                row["ms"] = (time_fn(prefill, q_chunks, k[:chunks], v[:chunks])
                             + time_fn(decode, q[chunks * chunk_len:], k_pages, v_pages))
            else:  # one step must equal the two separate kernels
                out = step(q, k_pages, v_pages).astype(jnp.float32)
                ref = split_out.astype(jnp.float32)
                row["rel_err"] = rel_err(out, ref)
                row["ms"] = time_fn(step, q, k_pages, v_pages)
            row["gbps"] = kv_bytes / row["ms"] / 1e6
            row["tflops"] = flops / row["ms"] / 1e9
        except Exception as e:  # report and go on
            row["error"] = str(e).splitlines()[0][:200]
        print(name, impl, {k_: v_ for k_, v_ in row.items() if k_ not in ("config", "impl")},
              flush=True)
        rows.append(row)
    return rows


SWEEP = [  # block_k, num_warps, num_stages
    (64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 3), (256, 4, 2), (256, 8, 2),
    (256, 8, 3), (64, 4, 4),
]
SWEEP_PAGED = [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 3), (256, 4, 2)]
# The ragged kernel's two launches (RaggedBlockSizes): the prefill launch's candidates run with
# the default decode tile, then the decode launch's with the fastest prefill tile.
SWEEP_RAGGED_PREFILL = [  # block_q, block_k, num_warps, num_stages
    (16, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 3),
    (64, 64, 8, 3), (64, 128, 8, 2), (16, 128, 4, 3),
]
SWEEP_RAGGED_DECODE = [(128, 4, 2), (64, 4, 2), (128, 4, 3)]  # block_k, num_warps, num_stages


def sweep(configs, kernel="decode", tiny=False):
    """Times our decode or paged decode kernel under each candidate tile with the default
    splits and half of them (decode: also twice; paged: next to our contiguous decode's
    default on the same keys, the yardstick of its 0.95x target), or the ragged kernel's
    tiles on the mixed step."""
    if kernel == "ragged":
        return sweep_ragged(*(RAGGED_TINY if tiny else RAGGED_STEP))
    if kernel == "prefetch":
        return sweep_prefetch(configs, tiny=tiny)
    for B, S in configs:
        q, k, v, lengths, kv_bytes, (k_pages, v_pages, tables) = _decode_problem(B, S)
        results = []
        if kernel == "paged":  # the contiguous kernel's default: the yardstick of the target
            _time_contiguous(B, S, q, k, v, lengths, kv_bytes)
        for block_k, warps, stages in SWEEP_PAGED if kernel == "paged" else SWEEP:
            default = fastattn.DecodeBlockSizes(block_k=block_k).resolve(
                batch=B, kv_heads=K, kv_len=S).num_splits
            split_choices = sorted({default, max(1, default // 2)} |
                                   (set() if kernel == "paged" else {2 * default}))
            for splits in split_choices:
                bs = fastattn.DecodeBlockSizes(block_k=block_k, num_warps=warps,
                                               num_stages=stages, num_splits=splits)
                if kernel == "paged":
                    fn = jax.jit(lambda q, k, v, n, bs=bs, pool=(k_pages, v_pages, tables):
                                 fastattn.paged_attention(q, *pool, n, implementation="pallas",
                                                          block_sizes=bs))
                else:
                    fn = jax.jit(lambda q, k, v, n, bs=bs: fastattn.decode_attention(
                        q, k, v, n, implementation="pallas", block_sizes=bs))
                try:
                    ms = time_fn(fn, q, k, v, lengths, min_time=0.1, repeats=REPEATS)
                except Exception as e:  # e.g. a tile over the shared-memory limit
                    print(f"   {(block_k, warps, stages, splits)}: {str(e).splitlines()[0][:90]}")
                    continue
                results.append((kv_bytes / ms / 1e6, block_k, warps, stages, splits))
        print(f"{kernel} b{B} kv{S}: best GB/s (block_k, warps, stages, splits):")
        for row in sorted(results, reverse=True)[:6]:
            print(f"   {row[0]:7.0f}  {row[1:]}", flush=True)


def _decode_problem(B, S, *, key_seed=1):
    """(q, k, v, lengths, K + V bytes, (k_pages, v_pages, tables)) of one decode row."""
    keys = jax.random.split(jax.random.key(key_seed), 3)
    q = jax.random.normal(keys[0], (B, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (B, S, K, H), jnp.bfloat16) for kk in keys[1:])
    lengths = jnp.full((B,), S, jnp.int32)
    kv_bytes = 2 * k.size * k.dtype.itemsize
    return q, k, v, lengths, kv_bytes, _to_pages(k, v, page_size=PAGE_SIZE, seed=B + S)


def _time_contiguous(B, S, q, k, v, lengths, kv_bytes):
    """GB/s of our contiguous decode at its default tiles: the yardstick of the paged
    kernel's 0.95x target."""
    contiguous = jax.jit(lambda q, k, v, n: fastattn.decode_attention(
        q, k, v, n, implementation="pallas"))
    ms = time_fn(contiguous, q, k, v, lengths, min_time=0.1, repeats=REPEATS)
    gbps = kv_bytes / ms / 1e6
    print(f"decode (contiguous, default tiles) b{B} kv{S}: {gbps:7.0f} GB/s", flush=True)
    return gbps


PREFETCH_PAGED = [(128, 4, 2), (256, 4, 2)]  # block_k, num_warps, num_stages (default splits)


def sweep_prefetch(configs, tiny=False):
    """Page ids read one key tile ahead (prefetch_page_ids) or in the loop step: the paged
    decode under a few tiles next to our contiguous decode, then the mixed ragged step under
    its default tiles both ways next to the split baseline (flash forward + paged decode)."""
    for B, S in configs:
        q, k, v, lengths, kv_bytes, pool = _decode_problem(B, S)
        yardstick = _time_contiguous(B, S, q, k, v, lengths, kv_bytes)
        for block_k, warps, stages in PREFETCH_PAGED:
            for prefetch in (False, True):
                bs = fastattn.DecodeBlockSizes(block_k=block_k, num_warps=warps,
                                               num_stages=stages, prefetch_page_ids=prefetch)
                fn = jax.jit(lambda q, k, v, n, bs=bs: fastattn.paged_attention(
                    q, *pool, n, implementation="pallas", block_sizes=bs))
                try:
                    gbps = kv_bytes / time_fn(fn, q, k, v, lengths, min_time=0.1,
                                              repeats=REPEATS) / 1e6
                except Exception as e:  # report and go on
                    print(f"   {(block_k, warps, stages, prefetch)}: "
                          f"{str(e).splitlines()[0][:90]}", flush=True)
                    continue
                print(f"   paged b{B} kv{S} {(block_k, warps, stages)} prefetch={prefetch!s:5}"
                      f" {gbps:7.0f} GB/s  {gbps / yardstick:.3f}x contiguous", flush=True)
    default = RaggedBlockSizes()
    ahead = RaggedBlockSizes(
        decode=dataclasses.replace(default.decode, prefetch_page_ids=True),
        prefill=dataclasses.replace(default.prefill, prefetch_page_ids=True))
    rows = run_ragged(*(RAGGED_TINY if tiny else RAGGED_STEP), variants={"prefetch": ahead})
    split = next(r for r in rows if r["impl"] == "fastattn_split").get("ms")
    for r in rows:
        if r.get("ms") and split and r["impl"] != "fastattn_split":
            print(f"   {r['impl']}: {r['ms']:.3f} ms, {split / r['ms']:.3f}x the split's speed "
                  "(target >= 0.9)", flush=True)


def sweep_ragged(chunks, chunk_len, decodes, context):
    """The mixed step of `run_ragged` under each RaggedBlockSizes candidate, printing ms and
    K + V GB/s per candidate as it runs; then, under the fastest, each launch's half of the
    step next to the kernel the split baseline runs on it (flash forward on the chunks alone,
    paged decode on the decodes alone), which says where a remaining gap sits."""
    S = chunks + decodes
    rows_p = chunks * chunk_len  # the chunks' rows come first, then one row per decode
    q_lens = [chunk_len] * chunks + [1] * decodes
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (sum(q_lens), N, H), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (S, context, K, H), jnp.bfloat16) for kk in keys[1:])
    k_pages, v_pages, tables = _to_pages(k, v, page_size=PAGE_SIZE, seed=11)
    ctx = jnp.full((S,), context, jnp.int32)
    kv_bytes = 2 * k.size * k.dtype.itemsize
    chunk_bytes = kv_bytes * chunks // S

    def ragged(bs, seqs=slice(None), max_q_len=chunk_len):
        """A jitted step of the sequences `seqs` (their own rows of q) under tiles bs."""
        lens = q_lens[seqs]
        starts = jnp.cumsum(jnp.asarray([0] + lens, jnp.int32))
        return jax.jit(lambda q, kp, vp: fastattn.ragged_paged_attention(
            q, kp, vp, tables[seqs], ctx[seqs], starts, len(lens), implementation="pallas",
            max_q_len=max_q_len, block_sizes=bs))

    def timed(label, fn, args, nbytes):
        try:
            ms = time_fn(fn, *args, min_time=0.1)
        except Exception as e:  # e.g. a tile over the shared-memory limit
            print(f"   {label}: {str(e).splitlines()[0][:90]}", flush=True)
            return None
        print(f"   {ms:7.3f} ms {nbytes / ms / 1e6:6.0f} GB/s  {label}", flush=True)
        return ms

    print(f"ragged {chunks}x{chunk_len} + {decodes} decodes ctx{context}: ms, K + V GB/s, "
          "tiles (block_q, block_k, warps, stages)")
    step = (q, k_pages, v_pages)
    timings = {}
    for block_q, block_k, warps, stages in SWEEP_RAGGED_PREFILL:
        bs = RaggedBlockSizes(prefill=RaggedTile(block_q=block_q, block_k=block_k,
                                                 num_warps=warps, num_stages=stages))
        timings[bs] = timed(f"prefill {_tile(bs.prefill)} decode {_tile(bs.decode)}",
                            ragged(bs), step, kv_bytes)
    timings = {bs: ms for bs, ms in timings.items() if ms is not None}
    if not timings:
        return
    best_prefill = min(timings, key=timings.get).prefill
    for block_k, warps, stages in SWEEP_RAGGED_DECODE:
        bs = RaggedBlockSizes(prefill=best_prefill, decode=RaggedTile(
            block_q=1, block_k=block_k, num_warps=warps, num_stages=stages))
        if bs not in timings:
            ms = timed(f"prefill {_tile(bs.prefill)} decode {_tile(bs.decode)}", ragged(bs),
                       step, kv_bytes)
            if ms is not None:
                timings[bs] = ms
    best = min(timings, key=timings.get)
    print(f"best {timings[best]:.3f} ms: prefill {_tile(best.prefill)} decode "
          f"{_tile(best.decode)}")
    print("halves of the step under it (the chunks-only step still runs an idle decode launch):")
    prefill = jax.jit(lambda q, k, v: fastattn.attention(
        q.reshape(chunks, chunk_len, N, H), k, v, causal=True, implementation="pallas"))
    decode = jax.jit(lambda q, kp, vp: fastattn.paged_attention(
        q, kp, vp, tables[chunks:], ctx[chunks:], implementation="pallas"))
    chunk_part, decode_part = (q[:rows_p], k_pages, v_pages), (q[rows_p:], k_pages, v_pages)
    halves = [
        timed("ragged, chunks only", ragged(best, slice(None, chunks)), chunk_part,
              chunk_bytes),
        timed("flash forward, chunks", prefill, (q[:rows_p], k[:chunks], v[:chunks]),
              chunk_bytes),
        timed("ragged, decodes only", ragged(best, slice(chunks, None), 1), decode_part,
              kv_bytes - chunk_bytes),
        timed("paged decode, decodes", decode, decode_part, kv_bytes - chunk_bytes),
    ]
    if None not in halves:
        split = halves[1] + halves[3]
        print(f"split (flash forward + paged decode) {split:.3f} ms; best ragged / split "
              f"time {timings[best] / split:.2f} (target <= 1.11: >= 0.9x the split's speed)",
              flush=True)


def _tile(t):
    return (t.block_q, t.block_k, t.num_warps, t.num_stages)


def _cell(cells, impl):
    row = cells.get(impl)
    if row is None:
        return f"{'-':>17}"  # not run for this config
    return f"{row['gbps']:>17.0f}" if row.get("gbps") else f"{'err':>17}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/decode.json")
    parser.add_argument("--tiny", action="store_true", help="one small shape (CPU, CI)")
    parser.add_argument("--sweep", nargs="?", const="decode", choices=["decode", "paged", "ragged", "prefetch"],
                        help="tile sweep of one of our kernels only (default: decode)")
    parser.add_argument("--configs", default=None,
                        help="only these BxS rows, e.g. 1x32768,16x4096 (default: all)")
    args = parser.parse_args(argv)
    configs = [(2, 256)] if args.tiny else CONFIGS
    if args.configs:
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    if args.sweep:
        return sweep(configs, args.sweep, tiny=args.tiny)
    return run(configs, args.out, RAGGED_TINY if args.tiny else RAGGED_STEP)


if __name__ == "__main__":
    main()
