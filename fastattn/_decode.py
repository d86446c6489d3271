"""`fastattn.decode_attention`: validation and implementations of q_len = 1 attention.

On a mesh (`fastattn.sharding.use_mesh` / `jax.set_mesh`) every implementation except the
ragged "reference" runs per shard under `shard_map`, as `fastattn.attention`'s kernels do:
heads split over "model" (query heads [i N/m, (i+1) N/m) with kv heads / pages
[i K/m, (i+1) K/m), so GQA groups stay whole and no communication is needed), and for the
batched decode ops rows over "data" when it divides B. The Pallas kernels are opaque custom
calls XLA cannot partition; the XLA paths run per shard too, so a K-split page pool is never
gathered. "model" must divide K (ValueError otherwise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fastattn import sharding
from pallas_kernels._common import check_scalar_options
from fastattn._xla_paged import ragged_paged_attention_xla
from pallas_kernels.decode_attention import (
    DecodeBlockSizes, decode_attention as _pallas_decode, decode_attention_reference)
from pallas_kernels.paged_attention import (
    RaggedBlockSizes, paged_attention_reference, paged_decode_attention,
    ragged_paged_attention as _pallas_ragged, ragged_paged_attention_reference)

DECODE_IMPLEMENTATIONS = ("pallas", "xla")


def decode_attention(q, k, v, lengths, *, softcap=None, sliding_window=None, scale=None,
                     return_lse=False, implementation=None, block_sizes=None):
    """One new token per sequence attending to its cache: split-KV flash decoding.

    q [B, N, H]; k, v [B, S, K, H] with N % K == 0 (query head n reads kv head n // (N // K));
    lengths [B] int: keys j < lengths[b] are valid, the query sits at position lengths[b] - 1.
    Slots at or past a sequence's length are never read (they may hold anything).
    sliding_window: (left, right) as in `fastattn.attention`; the query sees keys
        lengths[b] - 1 - left .. lengths[b] - 1 (there are no later keys, so right is moot).
    softcap, scale: as in `fastattn.attention`.
    implementation: None (Pallas on a GPU, XLA elsewhere), "pallas" (Triton kernel; interpret
        mode on a CPU), "xla" (plain jnp: at q_len = 1 the scores are only [B, N, S]).
    block_sizes: `DecodeBlockSizes` (tiles and the number of KV splits; speed only).
    Returns out [B, N, H] in q's dtype (and lse [B, N] f32 when asked). lengths[b] = 0 gives
    out 0 and lse -inf.
    """
    _validate(q, k, v, lengths, implementation, block_sizes)
    softcap, scale, window = check_scalar_options(softcap, scale, sliding_window)
    window_left = None if window is None else window[0]
    name = implementation or ("pallas" if jax.default_backend() == "gpu" else "xla")

    def run(q, k, v, lengths):
        if name == "pallas":
            return _pallas_decode(q, k, v, lengths, softcap=softcap, window_left=window_left,
                                  scale=scale, block_sizes=block_sizes,
                                  interpret=jax.default_backend() != "gpu")
        return decode_attention_reference(q, k, v, lengths, softcap=softcap,
                                          window_left=window_left, scale=scale)

    axes = _shard_axes(q.shape[0], k.shape[2])
    if axes is None:
        out, lse = run(q, k, v, lengths)
    else:
        b, h = axes
        out, lse = sharding.per_shard(
            run, (q, k, v, lengths),
            (P(b, h, None), P(b, None, h, None), P(b, None, h, None), P(b)),
            (P(b, h, None), P(b, h)))
    return (out, lse) if return_lse else out


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, softcap=None,
                    sliding_window=None, scale=None, return_lse=False, implementation=None,
                    block_sizes=None):
    """`decode_attention` over a paged KV cache (one layer's pool).

    q [B, N, H]; k_pages, v_pages [K, P, page_size, H]; block_tables [B, pages_per_seq] int:
    token t of sequence b lives in page block_tables[b, t // page_size] at offset
    t % page_size; lengths [B]. Entries of a table past its sequence's last page are never
    read. Checked on the host when concrete (JAX would clamp silently): lengths in
    [0, pages_per_seq * page_size] and every page a length covers in [0, P).
    implementation: None (Pallas on a GPU, XLA elsewhere), "pallas" (Triton kernel, any page
        size: a tile of block_k keys gathers its rows across pages; interpret mode on a CPU),
        "xla" (gathers the pages into dense K/V). Other options as in `decode_attention`.
    """
    _validate_paged(q, k_pages, v_pages, block_tables, lengths, implementation, block_sizes)
    softcap, scale, window = check_scalar_options(softcap, scale, sliding_window)
    window_left = None if window is None else window[0]
    name = implementation or ("pallas" if jax.default_backend() == "gpu" else "xla")

    def run(q, k_pages, v_pages, block_tables, lengths):
        if name == "pallas":
            return paged_decode_attention(
                q, k_pages, v_pages, block_tables, lengths, softcap=softcap,
                window_left=window_left, scale=scale, block_sizes=block_sizes,
                interpret=jax.default_backend() != "gpu")
        return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths,
                                         softcap=softcap, window_left=window_left, scale=scale)

    axes = _shard_axes(q.shape[0], k_pages.shape[0])
    if axes is None:
        out, lse = run(q, k_pages, v_pages, block_tables, lengths)
    else:
        b, h = axes
        out, lse = sharding.per_shard(
            run, (q, k_pages, v_pages, block_tables, lengths),
            (P(b, h, None), P(h), P(h), P(b), P(b)), (P(b, h, None), P(b, h)))
    return (out, lse) if return_lse else out


def ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, query_start,
                           num_seqs, *, softcap=None, sliding_window=None, scale=None,
                           max_q_len=None, implementation=None, block_sizes=None):
    """One engine step mixing prefill chunks and decodes over a paged cache (one layer).

    q [T, N, H]: sequence s owns rows query_start[s] .. query_start[s + 1] - 1 (s < num_seqs);
    they are its newest tokens, already written into the pages, so with q_len_s new tokens
    and context_lens[s] tokens in all, row r sits at position context_lens[s] - q_len_s + r
    and attends causally (bottom-right aligned, as `attention`):

        context of s:  t0 t1 t2 t3 t4 t5 | t6 t7 t8      (context_lens[s] = 9, q_len_s = 3)
        row 0 (t6) sees t0..t6, row 1 (t7) t0..t7, row 2 (t8) t0..t8

    block_tables [S, pages_per_seq], context_lens [S], query_start [S + 1] int; rows of no
    sequence (padding of a bucketed batch) return 0. max_q_len: static bound on any q_len_s
    (None: T); fewer programs when the step is mostly decodes.
    implementation: None ("pallas" on a GPU, "xla" elsewhere), "pallas" (Triton kernel, any
        page size; interpret mode on a CPU), "xla" (plain XLA, traceable: the engine's step
        on a CPU), "reference" (per-sequence dense reference; needs concrete metadata).
    block_sizes: `RaggedBlockSizes` for the kernel (tiles; speed only).
    Metadata is checked on the host when concrete (JAX clamps out-of-range reads silently).
    """
    _validate_ragged(q, k_pages, v_pages, block_tables, context_lens, query_start, num_seqs,
                     max_q_len, implementation)
    if block_sizes is not None and not isinstance(block_sizes, RaggedBlockSizes):
        raise ValueError(f"block_sizes must be a RaggedBlockSizes or None, got {block_sizes!r}")
    softcap, scale, window = check_scalar_options(softcap, scale, sliding_window)
    window_left = None if window is None else window[0]
    name = implementation or ("pallas" if jax.default_backend() == "gpu" else "xla")
    if name == "reference":  # needs concrete metadata: never traced, never per shard
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, block_tables, context_lens, query_start, num_seqs,
            softcap=softcap, window_left=window_left, scale=scale)

    def run(q, k_pages, v_pages, block_tables, context_lens, query_start, num_seqs):
        if name == "xla":
            return ragged_paged_attention_xla(
                q, k_pages, v_pages, block_tables, context_lens, query_start, num_seqs,
                softcap=softcap, window_left=window_left, scale=scale)
        return _pallas_ragged(q, k_pages, v_pages, block_tables, context_lens, query_start,
                              num_seqs, softcap=softcap, window_left=window_left, scale=scale,
                              block_sizes=block_sizes, max_q_len=max_q_len,
                              interpret=jax.default_backend() != "gpu")

    args = (q, k_pages, v_pages, block_tables, context_lens, query_start, num_seqs)
    # The rows of a ragged step belong to different sequences: only heads split ("data" keeps
    # the whole step on every replica).
    axes = _shard_axes(None, k_pages.shape[0])
    if axes is None or axes[1] is None:
        return run(*args)
    h = axes[1]
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    return sharding.per_shard(
        run, (*args[:-1], num_seqs), (P(None, h, None), P(h), P(h), P(), P(), P(), P()),
        P(None, h, None))


def _shard_axes(batch: int | None, kv_heads: int):
    """(batch axis, head axis) to run per shard on under the active mesh, or None when there
    is no mesh or nothing splits. batch None: the rows never split. ValueError when the mesh's
    "model" axis does not divide kv_heads."""
    mesh = sharding.active_mesh()
    if mesh is None:
        return None
    b, h = sharding.attention_axes(mesh, batch=1 if batch is None else batch,
                                   kv_heads=kv_heads)
    if batch is None:
        b = None
    return None if b is None and h is None else (b, h)


def _validate_ragged(q, k_pages, v_pages, block_tables, context_lens, query_start, num_seqs,
                     max_q_len, implementation):
    if implementation not in (None, "pallas", "xla", "reference"):
        raise ValueError(f"implementation must be None, 'pallas', 'xla' or 'reference', got "
                         f"{implementation!r}")
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must be [T, N, H], got q.shape={getattr(q, 'shape', None)}")
    S = getattr(block_tables, "shape", (0,))[0]
    if getattr(context_lens, "shape", None) != (S,) or \
            getattr(query_start, "shape", None) != (S + 1,):
        raise ValueError(f"context_lens must be [S] and query_start [S + 1] for block_tables of "
                         f"{S} rows, got {getattr(context_lens, 'shape', None)} and "
                         f"{getattr(query_start, 'shape', None)}")
    # Page-pool shapes, dtypes and (for the decode rows) tables are the paged decode checks;
    # a [S, N, H] stand-in for q gives them one row per sequence.
    stand_in = jax.ShapeDtypeStruct((S, q.shape[1], q.shape[2]), q.dtype)
    _validate_paged(stand_in, k_pages, v_pages, block_tables, context_lens, None, None)
    if k_pages.dtype != q.dtype:
        raise ValueError(f"q and the pages must share a dtype, got {q.dtype} and {k_pages.dtype}")
    if any(isinstance(x, jax.core.Tracer) for x in (context_lens, query_start, num_seqs)):
        return
    starts, ctx, n = np.asarray(query_start), np.asarray(context_lens), int(num_seqs)
    if not 0 <= n <= S:
        raise ValueError(f"num_seqs={n} must be in [0, {S}]")
    q_lens = np.diff(starts[: n + 1])
    if starts[0] != 0 or np.any(q_lens < 0) or starts[n] > q.shape[0]:
        raise ValueError(f"query_start must rise from 0 to at most T={q.shape[0]}, got "
                         f"{starts[: n + 1].tolist()}")
    over = np.flatnonzero(q_lens > ctx[:n])
    if over.size:
        s = over[0]
        raise ValueError(f"sequence {s} has {q_lens[s]} new tokens but context_lens[{s}]="
                         f"{ctx[s]}: the new tokens must already be in the cache")
    if max_q_len is not None and q_lens.size and q_lens.max() > max_q_len:
        raise ValueError(f"max_q_len={max_q_len} is below a sequence's {q_lens.max()} new tokens")


def _validate_paged(q, k_pages, v_pages, block_tables, lengths, implementation, block_sizes):
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [K, P, page_size, H], got {name}.shape="
                             f"{getattr(x, 'shape', None)}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must have the same shape, got "
                         f"{k_pages.shape=} and {v_pages.shape=}")
    K, P, page_size, H = k_pages.shape
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must be [B, N, H], got q.shape={getattr(q, 'shape', None)}")
    B = q.shape[0]
    if getattr(block_tables, "ndim", None) != 2 or block_tables.shape[0] != B \
            or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be an integer array [B={B}, pages_per_seq], got "
                         f"{getattr(block_tables, 'shape', None)} "
                         f"{getattr(block_tables, 'dtype', None)}")
    # The dense checks see the pool as a [B, S, K, H] cache of S = pages_per_seq * page_size.
    dense = jax.ShapeDtypeStruct((B, block_tables.shape[1] * page_size, K, H), k_pages.dtype)
    _validate(q, dense, dense, lengths, implementation, block_sizes)
    if not isinstance(block_tables, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer):
        tables, host_lengths = np.asarray(block_tables), np.asarray(lengths)
        pages_used = -(-host_lengths // page_size)  # ceil
        for b in range(B):
            used = tables[b, : pages_used[b]]
            bad = np.flatnonzero((used < 0) | (used >= P))
            if bad.size:
                raise ValueError(
                    f"block_tables[{b}, {bad[0]}]={used[bad[0]]} is not a page of the pool "
                    f"[0, P={P}) (sequence {b} has length {host_lengths[b]})")


def _validate(q, k, v, lengths, implementation, block_sizes):
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must be [B, N, H], got q.shape={getattr(q, 'shape', None)}")
    for name, x in (("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, S, K, H], got {name}.shape="
                             f"{getattr(x, 'shape', None)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape=} and {v.shape=}")
    B, N, H = q.shape
    _, S, K, Hk = k.shape
    if k.shape[0] != B or Hk != H:
        raise ValueError(f"{q.shape=} and {k.shape=} disagree on batch size or head_dim")
    if N % K:
        raise ValueError(f"query heads must be a multiple of kv heads, got N={N} and K={K}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share a floating dtype, got {q.dtype=}, {k.dtype=}, "
                         f"{v.dtype=}")
    if getattr(lengths, "shape", None) != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape ({B},), got "
                         f"{getattr(lengths, 'shape', None)} {getattr(lengths, 'dtype', None)}")
    if not isinstance(lengths, jax.core.Tracer):  # concrete: check the values on the host
        host = np.asarray(lengths)
        bad = np.flatnonzero((host < 0) | (host > S))
        if bad.size:
            raise ValueError(f"lengths[{bad[0]}]={host[bad[0]]} is outside [0, S={S}] "
                             "(JAX would clamp the reads silently)")
    if implementation is not None and implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {DECODE_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if block_sizes is not None and not isinstance(block_sizes, DecodeBlockSizes):
        raise ValueError(f"block_sizes must be a DecodeBlockSizes or None, got {block_sizes!r}")
