"""Split-KV flash decoding (Flash-Decoding) as a Pallas kernel, Triton backend.

One new query token per sequence attends to its sequence's cached keys:

    q [B, N, H]   k, v [B, S, K, H]   lengths [B]   (keys j < lengths[b] are valid)

At q_len = 1 a program per (sequence, kv head) would leave most of the GPU idle, so the
KV length is split into `num_splits` partitions that run in parallel; each returns a partial
output and its log-sum-exp, and one combine step rescales them (Dao et al., "Flash-Decoding
for long-context inference", 2023):

    keys  0 ............................................. S
          | split 0 | split 1 | split 2 | split 3 |   (each split: tiles of block_k keys)
            o0,lse0   o1,lse1   o2,lse2   (empty: lse = -inf, ignored by the combine)

    out = sum_j exp(lse_j - lse) * o_j,   lse = log sum_j exp(lse_j)

All G = N / K query heads of one kv head are one [G, H] tile, so K and V are read once.
Keys at or past a sequence's length are never loaded (masked loads), so whatever the cache
holds there (stale or NaN) cannot leak.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    GPU_SMS, LOG2E, check_tile_fields, dot, load_page_ids, online_softmax_finish,
    online_softmax_init, online_softmax_step, paged_rows)


# The longest page-id window DecodeBlockSizes.preload_page_ids holds in registers (one int32
# per slot, spread over the program's threads; the one-hot pick costs tile pages x slots).
MAX_PRELOADED_PAGES = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeBlockSizes:
    """Tiles and Triton knobs of the decode kernel. Changes speed, never numbers.

    num_splits: KV partitions per (sequence, kv head); None: enough for `waves` programs
        per SM (`resolve`).
    prefetch_page_ids (paged only): read tile t + 1's page ids from the block table while
        tile t is processed, so that a tile's K/V addresses are known when its loop step
        starts instead of one dependent table read later. Off: on an H100 it was 2-5% slower
        at 128-key tiles on the TARGETS rows and 2% faster only at 256-key tiles on b64 x
        4096 (BENCHMARKS.md, session 6).
    preload_page_ids (paged only): read all of a split's page ids from the block table once,
        before the key loop (one masked vector load of up to MAX_PRELOADED_PAGES entries),
        and let each tile pick its own from registers, so that no table read sits between a
        tile's loop step and its K/V loads. `resolve` picks enough splits for the window;
        splits spanning more pages (num_splits given) read the table per tile. Not with
        prefetch_page_ids.
    """

    block_k: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 2
    prefetch_page_ids: bool = False
    preload_page_ids: bool = False

    @classmethod
    def default_for(cls, *, paged: bool) -> "DecodeBlockSizes":
        """H100 sweep (experiments/bench_decode.py --sweep, BENCHMARKS.md): the contiguous
        kernel reads fastest with one program per SM and a 3-stage pipeline (b16 x 4096:
        2721 GB/s vs 2640 with 3 splits and 2 stages; b1 x 32768: 16 splits beat 32). The
        paged kernel takes the same tile with its page ids preloaded (session 11: ahead of
        the earlier paged default of 2 stages and two programs per SM, whose K/V loads
        waited on a table read every step, in 5 of 6 paired passes; paged / contiguous
        medians 0.946 on b1 x 32768 and 0.952 on b16 x 4096, against 0.91 and 0.93)."""
        if paged:
            return cls(num_stages=3, waves=1, preload_page_ids=True)
        return cls(num_stages=3, waves=1)

    def __post_init__(self):
        check_tile_fields(self)
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeBlockSizes.num_splits={self.num_splits} must be >= 1")
        if self.waves < 1:
            raise ValueError(f"DecodeBlockSizes.waves={self.waves} must be >= 1")
        if self.prefetch_page_ids and self.preload_page_ids:
            raise ValueError("DecodeBlockSizes: prefetch_page_ids and preload_page_ids are two "
                             "ways to read the page ids; set at most one")

    def resolve(self, *, batch: int, kv_heads: int, kv_len: int,
                page_size: int | None = None) -> "DecodeBlockSizes":
        """Fills in num_splits: enough programs for `waves` per SM, but no split shorter
        than one tile. Paged (page_size given) with preload_page_ids: also enough splits
        that each one's page ids fit the preloaded window (MAX_PRELOADED_PAGES)."""
        block_k = min(self.block_k, max(16, pl.next_power_of_2(kv_len)))
        if self.num_splits is not None:
            splits = self.num_splits
        else:
            wanted = max(1, self.waves * GPU_SMS // (batch * kv_heads))
            if self.preload_page_ids and page_size is not None:
                wanted = max(wanted, pl.cdiv(kv_len, MAX_PRELOADED_PAGES * page_size))
            splits = max(1, min(wanted, pl.cdiv(kv_len, block_k)))
        return dataclasses.replace(self, block_k=block_k, num_splits=splits)


def _split_kv_kernel(q_ref, k_ref, v_ref, len_ref, *refs, scale, softcap, window_left, chunk,
                     block_k, group, head_dim, page_size, prefetch, preload, interpret):
    # q_ref [Gp, Hp] over the G = group real query heads; len_ref [1]
    # o_ref [Gp, Hp] (the final output when there is one split, else this split's f32
    # partial); lse_ref [Gp] f32
    # contiguous (page_size None): k_ref, v_ref [S, Hp]
    # paged: k_ref, v_ref [P, page_size, Hp] (this kv head's pool), block_table_ref
    #        [pages_per_seq]; a tile of block_k keys gathers its rows from the pages they
    #        sit in (block_k / page_size pages per tile when page_size divides block_k)
    # preload: None, or the length of the page-id window read once before the key loop
    paged = page_size is not None
    block_table_ref, o_ref, lse_ref = refs if paged else (None, *refs)
    split = pl.program_id(0)
    length = jnp.sum(len_ref[...])  # a [1] block read as a scalar
    gp, hp = q_ref.shape
    head_ok = jnp.arange(hp)[None, :] < head_dim
    # Padded heads and head dims are masked in every load and store, so no pad or slice
    # kernel runs around this one (at ~5 us each they cost several % of a batched decode).
    tile_ok = (jnp.arange(gp)[:, None] < group) & head_ok
    q = plgpu.load(q_ref, mask=tile_ok, other=0.0)
    begin = split * chunk
    end = jnp.minimum(begin + chunk, length)
    first = begin  # first key this query may see, tile-aligned
    if window_left is not None:
        lowest = length - 1 - window_left
        first = jnp.maximum(begin, jax.lax.div(jnp.maximum(lowest, 0), block_k) * block_k)
    else:
        lowest = 0
    n_tiles = jax.lax.div(jnp.maximum(end - first, 0) + block_k - 1, block_k)

    def tile_keys(t):
        cols = first + t * block_k + jnp.arange(block_k)
        return cols, (cols < end) & (cols >= lowest)

    if preload:  # this split's pages, first_page onwards; slots past its last page hold 0
        first_page = jax.lax.div(first, page_size)
        split_pages = jax.lax.div(end + page_size - 1, page_size) - first_page
        slots = jnp.arange(preload)
        window = plgpu.load(block_table_ref.at[first_page + slots], mask=slots < split_pages,
                            other=0)

    def page_ids(t):
        if preload:
            tile_page = jax.lax.div(first + t * block_k, page_size) - first_page
            return pick_page_ids(window, tile_page, block_k=block_k, page_size=page_size)
        cols, valid = tile_keys(t)
        return load_page_ids(block_table_ref, cols, valid, page_size=page_size)

    def body(t, carry):
        if prefetch:  # this tile's page ids came with the carry; read the next tile's now
            carry, pages = carry
            next_pages = page_ids(t + 1)
        cols, valid = tile_keys(t)
        mask = valid[:, None] & head_ok if hp != head_dim else valid[:, None]
        if paged:
            index = paged_rows(pages if prefetch else page_ids(t), cols, page_size=page_size,
                               width=hp)
        else:
            index = (pl.ds(first + t * block_k, block_k), slice(None))
        k = plgpu.load(k_ref.at[index], mask=mask, other=0.0)
        v = plgpu.load(v_ref.at[index], mask=mask, other=0.0)
        s = dot(q, k, contract=(1, 1)) * scale  # [Gp, block_k]
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(valid[None, :], s * LOG2E, -jnp.inf)
        carry = online_softmax_step(carry, s, v, may_be_empty=True, interpret=interpret)
        return (carry, next_pages) if prefetch else carry

    carry = online_softmax_init(gp, hp)
    if prefetch:
        carry = jax.lax.fori_loop(0, n_tiles, body, (carry, page_ids(0)))[0]
    else:
        carry = jax.lax.fori_loop(0, n_tiles, body, carry)
    out, lse = online_softmax_finish(carry)  # an empty partition: 0, -inf
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=tile_ok)
    plgpu.store(lse_ref, lse, mask=jnp.arange(gp) < group)


def pick_page_ids(window, tile_page, *, block_k: int, page_size: int):
    """Page id of each of a tile's block_k keys [block_k], from the page ids held in
    registers (`window` [W]; the tile's first key sits on page window[tile_page], and when
    page_size < block_k its keys fill pages tile_page, tile_page + 1, ... in order). Two
    one-hot sums, [tile pages, W] then [block_k, tile pages]: registers cannot be indexed by
    a value, and one [block_k, W] select would hold block_k * W / threads registers."""
    slots = jnp.arange(window.shape[0])
    if page_size >= block_k:  # the whole tile on one page
        page = jnp.sum(jnp.where(slots == tile_page, window, 0))
        return jnp.zeros((block_k,), jnp.int32) + page
    pages = block_k // page_size
    tile_pages = jnp.sum(jnp.where((tile_page + jnp.arange(pages))[:, None] == slots[None, :],
                                   window[None, :], 0), axis=1)  # [pages]
    key_page = jax.lax.div(jnp.arange(block_k), page_size)[:, None]
    return jnp.sum(jnp.where(key_page == jnp.arange(pages)[None, :], tile_pages[None, :], 0),
                   axis=1)


def combine_splits(o_parts, lse_parts):
    """Merges partial results along axis -2 of o / -1 of lse: o [..., J, H], lse [..., J].

    Partitions with lse = -inf (they saw no key) get weight 0; if all are empty the result
    is o = 0, lse = -inf.
    """
    top = jnp.max(lse_parts, axis=-1, keepdims=True)
    top = jnp.where(jnp.isneginf(top), 0.0, top)
    w = jnp.where(jnp.isneginf(lse_parts), 0.0, jnp.exp(lse_parts - top))  # [..., J]
    total = jnp.sum(w, axis=-1)
    out = jnp.einsum("...j,...jh->...h", w, o_parts) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top[..., 0], -jnp.inf)
    return out, lse


@functools.partial(jax.jit, static_argnames=("softcap", "window_left", "scale", "block_sizes",
                                             "interpret"))
def decode_attention(q, k, v, lengths, *, softcap=None, window_left=None, scale=None,
                     block_sizes=None, interpret=False):
    """Split-KV decode attention; returns (out [B, N, H] in q.dtype, lse [B, N] f32).

    Inputs are trusted (`fastattn.decode_attention` validates them). The query of sequence b
    sits at position lengths[b] - 1 and sees keys max(0, lengths[b] - 1 - window_left) ..
    lengths[b] - 1 (all valid keys when window_left is None). lengths[b] = 0 gives 0, -inf.
    """
    B, _, H = q.shape
    _, S, K, _ = k.shape
    Hp = pl.next_power_of_2(H)
    bs = (block_sizes or DecodeBlockSizes.default_for(paged=False)).resolve(
        batch=B, kv_heads=K, kv_len=S)
    kv_spec = pl.BlockSpec((None, S, None, Hp), lambda j, b, h: (b, 0, h, 0))
    return split_kv_call(q, k, v, lengths, None, kv_spec=kv_spec, kv_len=S, num_kv_heads=K,
                          block_sizes=bs, softcap=softcap, window_left=window_left,
                          scale=scale, interpret=interpret)


def split_kv_call(q, k, v, lengths, block_tables, *, kv_spec, kv_len, num_kv_heads,
                   block_sizes, softcap, window_left, scale, interpret):
    """Launches the split-KV kernel over (splits, B, K) and merges the partials.
    kv_len is the longest possible sequence (pages_per_seq * page_size when paged, k and v
    then being the [K, P, page_size, H] pools)."""
    B, N, H = q.shape
    K = num_kv_heads
    G = N // K
    Gp = max(16, pl.next_power_of_2(G))  # the smallest tile Triton's matrix units take
    Hp = pl.next_power_of_2(H)
    bs = block_sizes
    chunk = pl.cdiv(pl.cdiv(kv_len, bs.num_splits), bs.block_k) * bs.block_k  # whole tiles
    splits = pl.cdiv(kv_len, chunk)
    paged = block_tables is not None
    single = splits == 1  # one partition: the kernel writes the final output itself
    page_size = k.shape[2] if paged else None
    preload = None
    if paged and bs.preload_page_ids:
        # a split's keys start block_k-aligned, so they touch one page more than chunk /
        # page_size only when a page holds several tiles
        span = pl.cdiv(chunk, page_size) + (page_size > bs.block_k)
        if span <= MAX_PRELOADED_PAGES:
            preload = max(16, pl.next_power_of_2(span))
    kernel = functools.partial(
        _split_kv_kernel, scale=float(1.0 / math.sqrt(H) if scale is None else scale),
        softcap=softcap, window_left=window_left, chunk=chunk, block_k=bs.block_k, group=G,
        head_dim=H, page_size=page_size, prefetch=paged and bs.prefetch_page_ids,
        preload=preload, interpret=interpret)
    in_specs = [pl.BlockSpec((None, None, Gp, Hp), lambda j, b, h: (b, h, 0, 0)), kv_spec, kv_spec,
                pl.BlockSpec((None, 1), lambda j, b, h: (b, 0))]
    inputs = [q.reshape(B, K, G, H), k, v, lengths.astype(jnp.int32).reshape(B, 1)]
    if paged:
        in_specs.append(pl.BlockSpec((None, block_tables.shape[1]), lambda j, b, h: (b, 0)))
        inputs.append(block_tables.astype(jnp.int32))
    if single:
        out_specs = [pl.BlockSpec((None, None, Gp, Hp), lambda j, b, h: (b, h, 0, 0)),
                     pl.BlockSpec((None, None, Gp), lambda j, b, h: (b, h, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, K, G, H), q.dtype),
                     jax.ShapeDtypeStruct((B, K, G), jnp.float32)]
    else:
        out_specs = [pl.BlockSpec((None, None, None, Gp, Hp), lambda j, b, h: (b, h, j, 0, 0)),
                     pl.BlockSpec((None, None, None, Gp), lambda j, b, h: (b, h, j, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, K, splits, G, H), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, splits, G), jnp.float32)]
    out, lse = pl.pallas_call(
        kernel,
        grid=(splits, B, K),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="paged_decode_attention" if paged else "decode_attention",
    )(*inputs)
    if not single:  # [B, K, J, G, H] -> [B, K, G, J, H], then merge the J partials
        out, lse = combine_splits(jnp.swapaxes(out, 2, 3), jnp.swapaxes(lse, 2, 3))
    return out.reshape(B, N, H).astype(q.dtype), lse.reshape(B, N)


def decode_attention_reference(q, k, v, lengths, *, softcap=None, window_left=None, scale=None,
                               compute_dtype=None):
    """Naive decode attention; shares no code with the kernel. Computes in compute_dtype
    (None: f32, or f64 when given f64; the inputs' own dtype measures what that precision
    alone costs, the tolerance policy's yardstick)."""
    B, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    acc = compute_dtype or (jnp.float64 if q.dtype == jnp.float64 else jnp.float32)
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    j = jnp.arange(S)[None, :]
    allowed = j < lengths[:, None]  # [B, S]
    if window_left is not None:
        allowed &= j >= lengths[:, None] - 1 - window_left
    keep = allowed[:, :, None, None]
    k = jnp.where(keep, k.astype(acc), 0.0)  # unread slots may hold anything, NaN included
    v = jnp.where(keep, v.astype(acc), 0.0)
    qg = q.astype(acc).reshape(B, K, N // K, H)
    s = jnp.einsum("bkgh,bskh->bkgs", qg, k, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = allowed[:, None, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(mask, jnp.exp(s - top), 0.0)
    total = jnp.sum(e, axis=-1)
    out = jnp.einsum("bkgs,bskh->bkgh", e, v, precision=jax.lax.Precision.HIGHEST)
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top[..., 0], -jnp.inf)
    lse_dtype = jnp.float64 if acc == jnp.float64 else jnp.float32
    return out.reshape(B, N, H).astype(q.dtype), lse.reshape(B, N).astype(lse_dtype)
