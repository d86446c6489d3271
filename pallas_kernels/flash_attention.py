"""Tiled online-softmax attention (FlashAttention-2) as Pallas kernels, Triton backend.

Layout and semantics (the `fastattn.attention` contract):

    q [B, T, N, H]   k, v [B, S, K, H]   N % K == 0, query head n reads kv head n // G, G = N // K

Query row i sits at absolute position i + (S - T) (bottom-right alignment, as FlashAttention
>= 2.1), so with T = 3, S = 5 and causal=True the visibility pattern is

         keys j:  0 1 2 3 4
    query 0       x x x . .
    query 1       x x x x .
    query 2       x x x x x

A sliding window (left, right) keeps keys with  i + S - T - left <= j <= i + S - T + right
(either bound may be None = unbounded; causal forces right = 0). Segment ids keep pairs with
q_segment_ids[i] == kv_segment_ids[j]. A row that sees no key returns 0 and lse = -inf.

Kernels:
  forward   grid (T / block_q, B, N): each program keeps one Q tile on chip and streams K/V tiles
            through it with a running max m and sum l (FlashAttention-2, Dao 2023, Alg. 1).
  dK/dV     grid (S / block_k, B, K): one K/V tile, loops over the G query heads of its group and
            over the query tiles that see it; recomputes P = exp(S - lse) (FA-2 Alg. 2).
  dQ        grid (T / block_q, B, N): one Q tile, loops over key tiles; dQ += dS K.
Tiles that every row sees are processed without any mask arithmetic; only tiles on a mask
boundary (causal diagonal, window edges, the ragged end of T or S, segment ids) build a mask.

Masking is always a select, and the operand rows that a tile can not see are zeroed before each
contraction, so NaN/Inf in keys or queries that nobody may read never leaks (0 * NaN is NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    LOG2E, check_tile_fields, dot, exp2, online_softmax_finish, online_softmax_init,
    online_softmax_step)

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes and Triton knobs of the three kernels. Changes speed, never numbers.

    Tiles are powers of two >= 16 (the smallest tile Triton's matrix instructions take).
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_q_dkv: int = 64
    block_k_dkv: int = 128
    num_warps_dkv: int = 8
    num_stages_dkv: int = 3
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps_dq: int = 8
    num_stages_dq: int = 3

    def __post_init__(self):
        check_tile_fields(self)

    @classmethod
    def default_for(cls, *, q_len: int, kv_len: int, head_dim: int, causal: bool) -> "BlockSizes":
        """The per-shape rule, from the H100 sweep in BENCHMARKS.md (experiments/tune_flash.py),
        with tiles shrunk to the sequence lengths."""
        if head_dim <= 64:
            base = (cls(block_q=128, block_k=64, num_warps=4, num_stages=3) if causal else
                    cls(block_q=128, block_k=128, num_warps=4, num_stages=3))
        elif head_dim <= 128:
            base = (cls(block_q=128, block_k=128, num_warps=8, num_stages=3) if causal else
                    cls(block_q=256, block_k=64, num_warps=8, num_stages=3))
        else:  # large head dims: keep the register tile small
            base = cls(
                block_q=64, block_k=32, num_warps=8, num_stages=2,
                block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32,
            )
        return base.fit(q_len=q_len, kv_len=kv_len)

    def fit(self, *, q_len: int, kv_len: int) -> "BlockSizes":
        """Shrinks tiles that are larger than the (power-of-two padded) sequence."""
        q_cap = max(16, pl.next_power_of_2(q_len))
        k_cap = max(16, pl.next_power_of_2(kv_len))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, q_cap), block_k=min(self.block_k, k_cap),
            block_q_dkv=min(self.block_q_dkv, q_cap), block_k_dkv=min(self.block_k_dkv, k_cap),
            block_q_dq=min(self.block_q_dq, q_cap), block_k_dq=min(self.block_k_dq, k_cap),
        )


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of which (query, key) pairs are visible; see the module docstring.

    `lo` / `hi` are the offsets of the visible band around the diagonal in absolute positions:
    query i sees key j iff  i + off + lo <= j <= i + off + hi  with off = S - T (None = no bound).
    """

    lo: int | None
    hi: int | None
    has_segments: bool

    @classmethod
    def make(cls, *, causal: bool, window: tuple[int | None, int | None] | None,
             has_segments: bool) -> "MaskSpec":
        left, right = window if window is not None else (None, None)
        if causal:
            right = 0 if right is None else min(right, 0)
        return cls(lo=None if left is None else -left, hi=right, has_segments=has_segments)

    # The two predicates below say when a masked tile must zero operand rows before a
    # contraction. Zeroing costs a cross-warp reduction per tile, so it is done only where
    # some key is seen by no query at all, or some query sees no key at all: only there can
    # NaN in unread memory meet a 0 probability (0 * NaN = NaN). Everywhere else every
    # loaded key is legitimately seen by some query, exactly as in the reference.

    def some_key_unseen(self, q_len: int, kv_len: int) -> bool:
        # Query 0's window starts at (S - T) + lo; keys before it are seen by nobody.
        return self.has_segments or (self.lo is not None and kv_len - q_len + self.lo > 0)

    def some_row_empty(self, q_len: int, kv_len: int) -> bool:
        # Query 0 sees keys up to (S - T) + hi; if that is negative it sees none.
        return self.has_segments or (self.hi is not None and kv_len - q_len + self.hi < 0)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call; hashable so it can be a custom_vjp nondiff argument."""

    mask: MaskSpec
    scale: float
    softcap: float | None
    block_sizes: BlockSizes
    interpret: bool
    backward: str  # "pallas" or "reference" (debugging: differentiate the reference)


# ----------------------------------------------------------------------------- shared kernel math


def _scores(s_raw, st: _Static):
    """Raw q.k (f32) -> scores in the log2 domain (exp2 is the fast path on GPUs)."""
    if st.softcap is None:
        return s_raw * (st.scale * LOG2E)  # one multiply per score
    s = s_raw * st.scale
    return st.softcap * jnp.tanh(s / st.softcap) * LOG2E


def _softcap_grad(s_log2, st: _Static):
    """d(capped score)/d(scaled score) = 1 - tanh^2, written with the capped score itself."""
    capped = s_log2 / (LOG2E * st.softcap)
    return 1.0 - capped * capped


def _visible(rows, cols, *, q_len, kv_len, mask: MaskSpec, q_seg=None, kv_seg=None):
    """[rows, cols] bool: which (query, key) pairs attend. Shared by all three kernels."""
    ok = (rows[:, None] < q_len) & (cols[None, :] < kv_len)
    diag = cols[None, :] - rows[:, None] - (kv_len - q_len)  # key position relative to query
    if mask.lo is not None:
        ok &= diag >= mask.lo
    if mask.hi is not None:
        ok &= diag <= mask.hi
    if mask.has_segments:
        ok &= q_seg[:, None] == kv_seg[None, :]
    return ok


def _any(x, axis):
    """Boolean any() written as a max, which every Pallas backend lowers."""
    return jnp.max(x.astype(jnp.int32), axis=axis) > 0


def _key_tile(q, k_ref, v_ref, kv_seg_ref, k_start, block_k, *, rows, q_seg, masked,
              st: _Static, q_len, kv_len, head_dim):
    """The key tile at k_start as seen by query tile q [block_q, Hp] (query indices `rows`):
    K, V, log2-domain scores [block_q, block_k], and on masked tiles the visibility mask
    (None on interior tiles, which lie inside [0, S) by construction of _tile_ranges)."""
    k_limit = kv_len if masked else None
    k = _load_rows(k_ref, k_start, block_k, k_limit, head_dim)
    v = _load_rows(v_ref, k_start, block_k, k_limit, head_dim)
    s = _scores(dot(q, k, contract=(1, 1)), st)
    if not masked:
        return k, v, s, None
    kv_seg = (_load_vec(kv_seg_ref, k_start, block_k, kv_len, other=0)
              if st.mask.has_segments else None)
    vis = _visible(rows, k_start + jnp.arange(block_k), q_len=q_len, kv_len=kv_len,
                   mask=st.mask, q_seg=q_seg, kv_seg=kv_seg)
    return k, v, s, vis


def _tile_ranges(start, size, *, n_this, n_other, blk_other, d_lo, d_hi):
    """Which tiles of the other axis a tile [start, start+size) of this axis must visit.

    Along this axis index x sees other-axis indices y with  x + d_lo <= y <= x + d_hi
    (None: unbounded). Returns tile indices (lo, full_lo, full_hi, hi): tiles in
    [full_lo, full_hi) are seen by every x of the tile as far as the band goes (no band
    mask needed), tiles in [lo, full_lo) and [full_hi, hi) straddle a boundary and are
    masked. Segment ids are not known here: `_visit_tiles` classifies each tile by them.
    """
    end = jnp.minimum(start + size, n_this)  # one past the last real index of this tile
    first = jnp.int32(0) if d_lo is None else jnp.clip(start + d_lo, 0, n_other)
    last = jnp.int32(n_other) if d_hi is None else jnp.clip(end - 1 + d_hi + 1, 0, n_other)
    lo = lax.div(first, blk_other)
    hi = jnp.maximum(lax.div(last + blk_other - 1, blk_other), lo)
    full_first = jnp.int32(0) if d_lo is None else jnp.clip(end - 1 + d_lo, 0, n_other)
    full_last = jnp.int32(n_other) if d_hi is None else jnp.clip(start + d_hi + 1, 0, n_other)
    full_lo = jnp.clip(lax.div(full_first + blk_other - 1, blk_other), lo, hi)
    full_hi = jnp.clip(lax.div(full_last, blk_other), full_lo, hi)
    return lo, full_lo, full_hi, hi


def _q_tile_ranges(q_start, block_q, q_len, kv_len, block_k, mask: MaskSpec):
    off = kv_len - q_len
    return _tile_ranges(
        q_start, block_q, n_this=q_len, n_other=kv_len, blk_other=block_k,
        d_lo=None if mask.lo is None else off + mask.lo,
        d_hi=None if mask.hi is None else off + mask.hi)


def _k_tile_ranges(k_start, block_k, q_len, kv_len, block_q, mask: MaskSpec):
    # Key j is seen by queries i with  j - off - hi <= i <= j - off - lo.
    off = kv_len - q_len
    return _tile_ranges(
        k_start, block_k, n_this=kv_len, n_other=q_len, blk_other=block_q,
        d_lo=None if mask.hi is None else -off - mask.hi,
        d_hi=None if mask.lo is None else -off - mask.lo)


def _segment_range(ids):
    """(min, max) of a tile's segment ids: two tiles share no segment when their ranges are
    disjoint, and every pair matches when both ranges are one and the same id. (Rows past
    the array end load as id 0, which can only widen a range: never a wrong skip.)"""
    return jnp.min(ids), jnp.max(ids)


def _visit_tiles(body, carry, ranges, *, tiles_fit: bool, segments=None):
    """Runs `body` over the tiles of `ranges` (from _tile_ranges): unmasked ones first.

    tiles_fit (static) says whether a whole tile fits in the other axis at all; when it does
    not, there are no unmasked tiles, and their loop is not even traced (an unmasked load
    of a tile longer than the array does not trace).

    segments: None, or (this tile's segment-id range, t -> segment-id range of tile t of
    the other axis). Packed sequences make most tiles either wholly inside one document or
    wholly across two: the first run without any mask where the band allows it, the second
    are skipped (document masking), and only tiles that straddle a document boundary pay
    for the segment mask.

        keys:      doc 0     | doc 1      tiles of a query tile in doc 1:
        queries  [##########  .........]    doc 0 only  -> skipped
        in doc 1 [..........  #########]    doc 1 only  -> unmasked (if inside the band)
                                            both        -> masked
    """
    lo, full_lo, full_hi, hi = ranges
    unmasked = functools.partial(body, masked=False)
    masked = functools.partial(body, masked=True)
    if segments is not None:
        (this_lo, this_hi), other_range = segments

        def classified(t, carry, *, band_full):
            other_lo, other_hi = other_range(t)
            shared = (other_hi >= this_lo) & (other_lo <= this_hi)
            with_mask = functools.partial(body, t, masked=True)
            if_shared = lambda c: lax.cond(shared, with_mask, lambda c_: c_, c)
            if not band_full:
                return if_shared(carry)
            one_doc = (this_lo == this_hi) & (other_lo == other_hi) & (this_lo == other_lo)
            return lax.cond(one_doc, functools.partial(body, t, masked=False), if_shared,
                            carry)

        unmasked = functools.partial(classified, band_full=True)
        masked = functools.partial(classified, band_full=False)
    if tiles_fit:
        carry = lax.fori_loop(full_lo, full_hi, unmasked, carry)
    carry = lax.fori_loop(lo, full_lo, masked, carry)
    return lax.fori_loop(full_hi, hi, masked, carry)


def _key_tile_segments(q_seg, kv_seg_ref, block_k, kv_len):
    """`_visit_tiles`' segments argument for a query tile with ids q_seg that visits key
    tiles of block_k keys (None without segment ids)."""
    if q_seg is None:
        return None
    return (_segment_range(q_seg), lambda kb: _segment_range(
        _load_vec(kv_seg_ref, kb * block_k, block_k, kv_len, other=0)))


def _head_index(head):
    # A traced scalar, not a Python int: interpret mode's load rule rejects a plain int index.
    return () if head is None else (jnp.int32(head),)


def _load_rows(ref, start, size, limit, head_dim, *, head=None):
    """Loads rows [start, start+size) of a [rows, Hp] ref (or of head `head` of a
    [rows, G, Hp] ref). Rows >= limit and padded head columns read as 0 and are never touched
    in memory; limit=None for tiles known to lie inside the array (unmasked, faster loads).
    One indexer only: the Triton lowering takes no chained `.at`."""
    mask = None
    if limit is not None:
        mask = (start + jnp.arange(size))[:, None] < limit
    if ref.shape[-1] != head_dim:
        cols = jnp.arange(ref.shape[-1])[None, :] < head_dim
        mask = cols if mask is None else mask & cols
    index = (pl.ds(start, size),) + _head_index(head) + (slice(None),)
    if mask is None:
        return ref[index]
    return plgpu.load(ref.at[index], mask=mask, other=0.0)


def _load_vec(ref, start, size, limit, *, other, head=None):
    rows = start + jnp.arange(size)
    index = _head_index(head) + (pl.ds(start, size),)
    return plgpu.load(ref.at[index], mask=rows < limit, other=other)


def _store_rows(ref, value, start, size, limit, head_dim):
    rows = start + jnp.arange(size)
    mask = rows[:, None] < limit
    if ref.shape[-1] != head_dim:
        mask &= jnp.arange(ref.shape[-1])[None, :] < head_dim
    plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def _compiler_params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _q_block_index(i, num_blocks, mask: MaskSpec):
    # Causal rows at the bottom see the most keys: launch them first so the long programs
    # do not end up as a tail on a few SMs.
    return num_blocks - 1 - i if mask.hi is not None else i


# ----------------------------------------------------------------------------- forward


def _flash_fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *,
                      st: _Static, head_dim: int, q_len: int, kv_len: int, num_q_blocks: int):
    # q_ref [block_q, Hp]; k_ref, v_ref [S, Hp]; q_seg_ref [block_q]; kv_seg_ref [S]
    # o_ref [block_q, Hp]; lse_ref [block_q]
    bs = st.block_sizes
    block_q, block_k = bs.block_q, bs.block_k
    q_start = _q_block_index(pl.program_id(0), num_q_blocks, st.mask) * block_q
    rows = q_start + jnp.arange(block_q)
    q = _load_rows(q_ref, 0, block_q, q_len - q_start, head_dim)
    q_seg = _load_vec(q_seg_ref, 0, block_q, q_len - q_start, other=0) if st.mask.has_segments else None

    def body(kb, carry, *, masked):
        _, v, s, vis = _key_tile(q, k_ref, v_ref, kv_seg_ref, kb * block_k, block_k, rows=rows,
                                 q_seg=q_seg, masked=masked, st=st, q_len=q_len,
                                 kv_len=kv_len, head_dim=head_dim)
        if masked:
            s = jnp.where(vis, s, -jnp.inf)
            if st.mask.some_key_unseen(q_len, kv_len):
                v = jnp.where(_any(vis, 0)[:, None], v, 0)
        # Interior tiles come first (_visit_tiles), so only a masked tile can meet a row
        # that has seen no key yet.
        return online_softmax_step(carry, s, v, may_be_empty=masked, interpret=st.interpret)

    ranges = _q_tile_ranges(q_start, block_q, q_len, kv_len, block_k, st.mask)
    carry = _visit_tiles(body, online_softmax_init(block_q, q_ref.shape[-1]), ranges,
                         tiles_fit=kv_len >= block_k,
                         segments=_key_tile_segments(q_seg, kv_seg_ref, block_k, kv_len))
    out, lse = online_softmax_finish(carry)
    _store_rows(o_ref, out, 0, block_q, q_len - q_start, head_dim)
    plgpu.store(lse_ref, lse, mask=rows < q_len)


def _flash_fwd(q, k, v, q_seg, kv_seg, st: _Static):
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    G = N // K
    Hp = pl.next_power_of_2(H)
    bs = st.block_sizes
    nq = pl.cdiv(T, bs.block_q)
    qi = functools.partial(_q_block_index, num_blocks=nq, mask=st.mask)
    kernel = functools.partial(_flash_fwd_kernel, st=st, head_dim=H, q_len=T, kv_len=S,
                               num_q_blocks=nq)
    return pl.pallas_call(
        kernel,
        grid=(nq, B, N),
        in_specs=[
            pl.BlockSpec((None, bs.block_q, None, Hp), lambda i, b, n: (b, qi(i), n, 0)),
            pl.BlockSpec((None, S, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
            pl.BlockSpec((None, S, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
            pl.BlockSpec((None, bs.block_q), lambda i, b, n: (b, qi(i))),
            pl.BlockSpec((None, S), lambda i, b, n: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bs.block_q, None, Hp), lambda i, b, n: (b, qi(i), n, 0)),
            pl.BlockSpec((None, None, bs.block_q), lambda i, b, n: (b, n, qi(i))),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=_compiler_params(bs.num_warps, bs.num_stages),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(q, k, v, q_seg, kv_seg)


# ----------------------------------------------------------------------------- backward


def _flash_dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                       dk_ref, dv_ref, *, st: _Static, head_dim: int, q_len: int, kv_len: int,
                       group: int):
    # q_ref, do_ref [T, G, Hp]; k_ref, v_ref [block_k, Hp]; lse_ref, delta_ref [G, T]
    # q_seg_ref [T]; kv_seg_ref [block_k]; dk_ref, dv_ref [block_k, Hp]
    bs = st.block_sizes
    block_q, block_k = bs.block_q_dkv, bs.block_k_dkv
    k_start = pl.program_id(0) * block_k
    cols = k_start + jnp.arange(block_k)
    k = _load_rows(k_ref, 0, block_k, kv_len - k_start, head_dim)
    v = _load_rows(v_ref, 0, block_k, kv_len - k_start, head_dim)
    kv_seg = (_load_vec(kv_seg_ref, 0, block_k, kv_len - k_start, other=0)
              if st.mask.has_segments else None)

    def body(qb, carry, *, g, masked):
        dk, dv = carry
        q_start = qb * block_q
        q_limit = q_len if masked else None  # unmasked tiles lie inside [0, T)
        q = _load_rows(q_ref, q_start, block_q, q_limit, head_dim, head=g)
        do = _load_rows(do_ref, q_start, block_q, q_limit, head_dim, head=g)
        lse = _load_vec(lse_ref, q_start, block_q, q_len, other=0.0, head=g) * LOG2E
        delta = _load_vec(delta_ref, q_start, block_q, q_len, other=0.0, head=g)
        s_t = _scores(dot(k, q, contract=(1, 1)), st)  # [block_k, block_q], transposed S
        if masked:
            rows = q_start + jnp.arange(block_q)
            q_seg = (_load_vec(q_seg_ref, q_start, block_q, q_len, other=0)
                     if st.mask.has_segments else None)
            vis_t = _visible(rows, cols, q_len=q_len, kv_len=kv_len, mask=st.mask,
                             q_seg=q_seg, kv_seg=kv_seg).T
            lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows that see nothing: P is 0 anyway
            p_t = jnp.where(vis_t, exp2(s_t - lse[None, :], interpret=st.interpret), 0.0)
            if st.mask.some_row_empty(q_len, kv_len):
                live = _any(vis_t, 0)[:, None]  # query rows of this tile that see a key here
                q = jnp.where(live, q, 0)
                do = jnp.where(live, do, 0)
        else:
            p_t = exp2(s_t - lse[None, :], interpret=st.interpret)
        dv = dv + dot(p_t.astype(do.dtype), do, contract=(1, 0))
        dp_t = dot(v, do, contract=(1, 1))  # [block_k, block_q]
        ds_t = p_t * (dp_t - delta[None, :])
        if st.softcap is not None:
            ds_t = ds_t * _softcap_grad(s_t, st)
        if masked:
            ds_t = jnp.where(vis_t, ds_t, 0.0)
        dk = dk + dot(ds_t.astype(q.dtype), q, contract=(1, 0))
        return dk, dv

    ranges = _k_tile_ranges(k_start, block_k, q_len, kv_len, block_q, st.mask)
    Hp = k_ref.shape[-1]
    carry = (jnp.zeros((block_k, Hp), jnp.float32), jnp.zeros((block_k, Hp), jnp.float32))
    segments = None
    if st.mask.has_segments:
        segments = (_segment_range(kv_seg), lambda qb: _segment_range(
            _load_vec(q_seg_ref, qb * block_q, block_q, q_len, other=0)))
    for g in range(group):  # the G query heads that share this kv head
        carry = _visit_tiles(functools.partial(body, g=g), carry, ranges,
                             tiles_fit=q_len >= block_q, segments=segments)
    dk, dv = carry
    _store_rows(dk_ref, dk * st.scale, 0, block_k, kv_len - k_start, head_dim)
    _store_rows(dv_ref, dv, 0, block_k, kv_len - k_start, head_dim)


def _flash_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                     dq_ref, *, st: _Static, head_dim: int, q_len: int, kv_len: int,
                     num_q_blocks: int):
    # q_ref, do_ref [block_q, Hp]; k_ref, v_ref [S, Hp]; lse_ref, delta_ref [block_q]
    bs = st.block_sizes
    block_q, block_k = bs.block_q_dq, bs.block_k_dq
    q_start = _q_block_index(pl.program_id(0), num_q_blocks, st.mask) * block_q
    rows = q_start + jnp.arange(block_q)
    limit = q_len - q_start
    q = _load_rows(q_ref, 0, block_q, limit, head_dim)
    do = _load_rows(do_ref, 0, block_q, limit, head_dim)
    lse = _load_vec(lse_ref, 0, block_q, limit, other=0.0) * LOG2E
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows that see nothing: P is 0 anyway
    delta = _load_vec(delta_ref, 0, block_q, limit, other=0.0)
    q_seg = _load_vec(q_seg_ref, 0, block_q, limit, other=0) if st.mask.has_segments else None

    def body(kb, dq, *, masked):
        k, v, s, vis = _key_tile(q, k_ref, v_ref, kv_seg_ref, kb * block_k, block_k, rows=rows,
                                 q_seg=q_seg, masked=masked, st=st, q_len=q_len,
                                 kv_len=kv_len, head_dim=head_dim)
        if masked:
            p = jnp.where(vis, exp2(s - lse[:, None], interpret=st.interpret), 0.0)
            if st.mask.some_key_unseen(q_len, kv_len):
                live = _any(vis, 0)[:, None]  # keys of this tile that some row sees
                k = jnp.where(live, k, 0)
                v = jnp.where(live, v, 0)
        else:
            p = exp2(s - lse[:, None], interpret=st.interpret)
        dp = dot(do, v, contract=(1, 1))
        ds = p * (dp - delta[:, None])
        if st.softcap is not None:
            ds = ds * _softcap_grad(s, st)
        if masked:
            ds = jnp.where(vis, ds, 0.0)
        return dq + dot(ds.astype(k.dtype), k, contract=(1, 0))

    ranges = _q_tile_ranges(q_start, block_q, q_len, kv_len, block_k, st.mask)
    dq = jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32)
    dq = _visit_tiles(body, dq, ranges, tiles_fit=kv_len >= block_k,
                      segments=_key_tile_segments(q_seg, kv_seg_ref, block_k, kv_len))
    _store_rows(dq_ref, dq * st.scale, 0, block_q, limit, head_dim)


def _flash_bwd(q, k, v, q_seg, kv_seg, out, lse, do, dlse, st: _Static):
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    G = N // K
    Hp = pl.next_power_of_2(H)
    bs = st.block_sizes
    # delta_i = rowsum(dO * O) (FA-2 Alg. 2 line 4). A cotangent on lse adds P * dlse to dS,
    # which is the same as subtracting it from delta.
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = jnp.where(jnp.isneginf(lse), 0.0, delta - dlse)

    nk = pl.cdiv(S, bs.block_k_dkv)
    dk, dv = pl.pallas_call(
        functools.partial(_flash_dkdv_kernel, st=st, head_dim=H, q_len=T, kv_len=S, group=G),
        grid=(nk, B, K),
        in_specs=[
            pl.BlockSpec((None, T, G, Hp), lambda j, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, bs.block_k_dkv, None, Hp), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, bs.block_k_dkv, None, Hp), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, T, G, Hp), lambda j, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0)),
            pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0)),
            pl.BlockSpec((None, T), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, bs.block_k_dkv), lambda j, b, h: (b, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, bs.block_k_dkv, None, Hp), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, bs.block_k_dkv, None, Hp), lambda j, b, h: (b, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(bs.num_warps_dkv, bs.num_stages_dkv),
        interpret=st.interpret,
        name="flash_attention_dkdv",
    )(q, k, v, do, lse, delta, q_seg, kv_seg)

    nq = pl.cdiv(T, bs.block_q_dq)
    qi = functools.partial(_q_block_index, num_blocks=nq, mask=st.mask)
    dq = pl.pallas_call(
        functools.partial(_flash_dq_kernel, st=st, head_dim=H, q_len=T, kv_len=S,
                          num_q_blocks=nq),
        grid=(nq, B, N),
        in_specs=[
            pl.BlockSpec((None, bs.block_q_dq, None, Hp), lambda i, b, n: (b, qi(i), n, 0)),
            pl.BlockSpec((None, S, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
            pl.BlockSpec((None, S, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
            pl.BlockSpec((None, bs.block_q_dq, None, Hp), lambda i, b, n: (b, qi(i), n, 0)),
            pl.BlockSpec((None, None, bs.block_q_dq), lambda i, b, n: (b, n, qi(i))),
            pl.BlockSpec((None, None, bs.block_q_dq), lambda i, b, n: (b, n, qi(i))),
            pl.BlockSpec((None, bs.block_q_dq), lambda i, b, n: (b, qi(i))),
            pl.BlockSpec((None, S), lambda i, b, n: (b, 0)),
        ],
        out_specs=pl.BlockSpec((None, bs.block_q_dq, None, Hp), lambda i, b, n: (b, qi(i), n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(bs.num_warps_dq, bs.num_stages_dq),
        interpret=st.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, q_seg, kv_seg)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, st: _Static):
    return _flash_fwd(q, k, v, q_seg, kv_seg, st)


def _flash_vjp_fwd(q, k, v, q_seg, kv_seg, st):
    out, lse = _flash_fwd(q, k, v, q_seg, kv_seg, st)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_vjp_bwd(st, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    do, dlse = cotangents
    if st.backward == "reference":
        _, vjp = jax.vjp(lambda q_, k_, v_: _reference_for(q_, k_, v_, q_seg, kv_seg, st),
                         q, k, v)
        dq, dk, dv = vjp((do, dlse))
    else:
        dq, dk, dv = _flash_bwd(q, k, v, q_seg, kv_seg, out, lse, do, dlse, st)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def _reference_for(q, k, v, q_seg, kv_seg, st: _Static):
    window = (None if st.mask.lo is None else -st.mask.lo, st.mask.hi)
    return flash_attention_reference(
        q, k, v, q_seg if st.mask.has_segments else None,
        kv_seg if st.mask.has_segments else None,
        window=window, softcap=st.softcap, scale=st.scale)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "window", "softcap", "scale", "block_sizes", "interpret",
                     "backward"))
def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal=False,
                    window=None, softcap=None, scale=None, block_sizes=None, interpret=False,
                    backward="pallas"):
    """FlashAttention-2 forward and recomputing backward; returns (out [B,T,N,H], lse [B,N,T]).

    Inputs are trusted: `fastattn.attention` validates them. `lse` is the natural-log
    log-sum-exp of each row's scores (-inf for a row that sees no key). `scale` None means
    1/sqrt(H). `window` is (left, right) with None for an unbounded side.
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    if block_sizes is None:
        block_sizes = BlockSizes.default_for(q_len=T, kv_len=S, head_dim=H,
                                             causal=causal or window is not None)
    else:
        block_sizes = block_sizes.fit(q_len=T, kv_len=S)
    has_segments = q_segment_ids is not None
    if not has_segments:  # placeholders the kernels never read
        q_segment_ids = jnp.zeros((B, T), jnp.int32)
        kv_segment_ids = jnp.zeros((B, S), jnp.int32)
    st = _Static(
        mask=MaskSpec.make(causal=causal, window=window, has_segments=has_segments),
        scale=float(1.0 / math.sqrt(H) if scale is None else scale),
        softcap=None if softcap is None else float(softcap),
        block_sizes=block_sizes, interpret=interpret, backward=backward)
    return _flash(q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32), st)


def flash_attention_backward(q, k, v, out, lse, d_out, d_lse, *, causal=False, segment_ids=None,
                             window=None, softcap=None, scale=None, block_sizes=None,
                             interpret=False):
    """(dq, dk, dv) of attention from a forward's out [B,T,N,H] and natural-log lse [B,N,T],
    through this file's recomputing backward kernels: the backward of any forward kernel
    that returns the same (out, lse), e.g. the Mosaic GPU one.

    The mask and score arguments must be the forward's: causal, segment_ids (q_segment_ids
    [B, T], kv_segment_ids [B, S] integers, or None), window ((left, right), None = no bound
    on that side), softcap (float > 0 or None), scale (None: 1 / sqrt(H)); see the module
    docstring. Inputs are trusted (the forward's wrapper validated them). Segment ids get no
    gradient."""
    B, T, N, H = q.shape
    S = k.shape[1]
    if block_sizes is None:
        block_sizes = BlockSizes.default_for(q_len=T, kv_len=S, head_dim=H,
                                             causal=causal or window is not None)
    has_segments = segment_ids is not None
    st = _Static(mask=MaskSpec.make(causal=causal, window=window, has_segments=has_segments),
                 scale=float(1.0 / math.sqrt(H) if scale is None else scale),
                 softcap=None if softcap is None else float(softcap),
                 block_sizes=block_sizes.fit(q_len=T, kv_len=S), interpret=interpret,
                 backward="pallas")
    if has_segments:
        q_seg, kv_seg = (ids.astype(jnp.int32) for ids in segment_ids)
    else:  # placeholders the kernels never read
        q_seg, kv_seg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    return _flash_bwd(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, st)


# ----------------------------------------------------------------------------- reference


def flash_attention_reference(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal=False,
                              window=None, softcap=None, scale=None, compute_dtype=None):
    """Naive attention at HIGHEST precision: the oracle of the tests.

    Computes in `compute_dtype` (None: f32, or f64 when given f64). Running it in the inputs'
    own low precision (compute_dtype=jnp.bfloat16) measures how much error that precision
    alone causes, which the tolerance policy uses as its yardstick (STYLE.md 12).
    Shares no code with the kernels. Returns (out in q.dtype, lse [B, N, T] float32 natural log,
    f64 when computing in f64).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    acc = compute_dtype or (jnp.float64 if q.dtype == jnp.float64 else jnp.float32)
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    out_dtype = q.dtype

    i = jnp.arange(T)[:, None] + (S - T)  # absolute position of each query
    j = jnp.arange(S)[None, :]
    allowed = jnp.ones((T, S), bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    allowed = jnp.broadcast_to(allowed, (B, T, S))
    if q_segment_ids is not None:
        allowed = allowed & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])

    # Queries that see nothing and keys nobody sees are zeroed before any product, so NaN
    # there reaches neither the outputs nor (through autodiff) the gradients.
    live_q = jnp.any(allowed, axis=2)[:, :, None, None]  # [B, T, 1, 1]
    seen_k = jnp.any(allowed, axis=1)[:, :, None, None]  # [B, S, 1, 1]
    q = jnp.where(live_q, q.astype(acc), 0.0).reshape(B, T, K, N // K, H)
    k = jnp.where(seen_k, k.astype(acc), 0.0)
    v = jnp.where(seen_k, v.astype(acc), 0.0)

    s = jnp.einsum("btkgh,bskh->bkgts", q, k, precision=lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    allowed = allowed[:, None, None]  # [B, 1, 1, T, S]
    s = jnp.where(allowed, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.where(allowed, jnp.exp(s - row_max), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgts,bskh->btkgh", p, v, precision=lax.Precision.HIGHEST)
    # Rows that see nothing are 0 by selection, which also stops their output cotangent
    # (NaN or not) from reaching dV through autodiff.
    out = jnp.where(live_q[..., None], out.reshape(B, T, K, N // K, H), 0.0)
    total = total[..., 0]
    lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + row_max[..., 0],
                    -jnp.inf)
    lse_dtype = jnp.float64 if acc == jnp.float64 else jnp.float32
    return out.reshape(B, T, N, H).astype(out_dtype), lse.reshape(B, N, T).astype(lse_dtype)
