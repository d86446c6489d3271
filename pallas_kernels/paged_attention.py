"""Paged decode attention: split-KV flash decoding over a vLLM-style paged KV cache, and the
ragged paged kernel that serves an engine step mixing prefill chunks and decodes.

    q [B, N, H]   k_pages, v_pages [K, P, page_size, H]   block_tables [B, pages_per_seq]
    lengths [B]

Token t of sequence b lives in page block_tables[b, t // page_size] at offset
t % page_size (see fastattn/kv_cache.py for the picture). The decode kernel is the split-KV
kernel of decode_attention.py; a tile of block_k keys gathers each key's row from the page
its table names, so a tile spans several pages (8 at block_k = 128, page_size = 16) and the
tile size is the kernel's choice, not the page size's. Pages may sit anywhere in the pool, in
any order:

    block_tables[b] = [5, 2, 7, 1, ...]           split 0          |    split 1
    sequence b:       | page 5 | page 2 | page 7 | page 1 | ... |  ...
                      |<------ tile 0: block_k keys ------>|

Only the pages a sequence's length covers are read (table entries past them are never
loaded), and rows past the length inside its last page are masked in the load, so free pages
and stale tails never reach the result. By default each split reads all of its page ids once,
before its key loop, and every tile picks its own from registers
(`DecodeBlockSizes.preload_page_ids`), so no table read delays a tile's K/V loads.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    LOG2E,
    check_tile_fields,
    dot,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_step,
    load_page_ids,
    paged_rows,
)
from pallas_kernels.decode_attention import (
    DecodeBlockSizes,
    decode_attention_reference,
    split_kv_call,
)
from pallas_kernels.flash_attention import flash_attention_reference


@functools.partial(jax.jit, static_argnames=("softcap", "window_left", "scale", "block_sizes",
                                             "interpret"))
def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, softcap=None,
                           window_left=None, scale=None, block_sizes=None, interpret=False):
    """Split-KV decode over pages; returns (out [B, N, H] in q.dtype, lse [B, N] f32).

    Inputs are trusted (`fastattn.paged_attention` validates them); any page size.
    `block_sizes.block_k` keys per tile, gathered across pages. Semantics as
    `decode_attention`.
    """
    B = q.shape[0]
    K, P, page_size, H = k_pages.shape
    kv_len = block_tables.shape[1] * page_size
    bs = (block_sizes or DecodeBlockSizes.default_for(paged=True)).resolve(
        batch=B, kv_heads=K, kv_len=kv_len, page_size=page_size)
    Hp = pl.next_power_of_2(H)
    kv_spec = pl.BlockSpec((None, P, page_size, Hp), lambda j, b, h: (h, 0, 0, 0))
    return split_kv_call(q, k_pages, v_pages, lengths, block_tables, kv_spec=kv_spec,
                          kv_len=kv_len, num_kv_heads=K, block_sizes=bs, softcap=softcap,
                          window_left=window_left, scale=scale, interpret=interpret)


def gather_pages(pages, block_tables):
    """[K, P, page_size, H] pages + [B, pages_per_seq] tables -> dense [B, S, K, H] with
    S = pages_per_seq * page_size (table entries past a sequence's length may be anything:
    they are clipped into range here and masked by length downstream)."""
    K, P, page_size, H = pages.shape
    B, pages_per_seq = block_tables.shape
    dense = pages[:, jnp.clip(block_tables, 0, P - 1)]  # [K, B, pages_per_seq, page_size, H]
    return jnp.transpose(dense, (1, 2, 3, 0, 4)).reshape(B, pages_per_seq * page_size, K, H)


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, softcap=None,
                              window_left=None, scale=None, compute_dtype=None):
    """Gathers the pages into dense K/V and calls the dense decode reference."""
    return decode_attention_reference(
        q, gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables), lengths,
        softcap=softcap, window_left=window_left, scale=scale, compute_dtype=compute_dtype)


# ----------------------------------------------------------------------------- ragged


@dataclasses.dataclass(frozen=True, kw_only=True)
class RaggedTile:
    """The tile and Triton knobs of one launch of the ragged kernel. Changes speed, never
    numbers.

    block_q: new tokens of one sequence per program. The G query heads of a kv head share a
        program, so its query tile is block_q * G rows (padded to a power of two >= 16) and
        each key tile is read once per kv head, not once per query head.
    block_k: keys per loop step, gathered from as many pages as they span.
    prefetch_page_ids: read key tile t + 1's page ids while tile t is processed (as
        DecodeBlockSizes.prefetch_page_ids). Off: the mixed step took 1.27 ms with it and
        1.10 without on an H100 (BENCHMARKS.md, session 6). A decode-only step runs the
        paged decode kernel under its own DecodeBlockSizes: these tiles do not reach it.
    """

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    prefetch_page_ids: bool = False

    def __post_init__(self):
        check_tile_fields(self, smallest={"block_q": 1})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RaggedBlockSizes:
    """Tiles of the ragged paged kernel's two launches. Changes speed, never numbers.

    One query tile cannot suit both kinds of sequence in a step: a decode (one new token)
    fills G rows of a tile, so it wants the smallest one, [max(16, G), H], as the split-KV
    decode kernel uses; a prefill chunk wants large tiles (fewer re-reads of each key tile,
    larger MMAs), as the flash forward uses. So the same kernel body is launched twice, each
    over its own sequences, writing disjoint rows of one output:

        decode:  sequences of at most decode.block_q new tokens, one program each
        prefill: the others (prefill chunks), in tiles of prefill.block_q new tokens

    A step whose max_q_len <= decode.block_q (decode only) runs the decode launch only.
    """

    # The best of experiments/bench_decode.py --sweep ragged on the H100 (session 4,
    # BENCHMARKS.md; the H200's best prefill tile had been (32, 64, 4 warps, 3 stages)).
    decode: RaggedTile = RaggedTile(block_q=1, block_k=128, num_warps=4, num_stages=2)
    prefill: RaggedTile = RaggedTile(block_q=64, block_k=128, num_warps=8, num_stages=2)

    def __post_init__(self):
        for name in ("decode", "prefill"):
            if not isinstance(getattr(self, name), RaggedTile):
                raise ValueError(f"RaggedBlockSizes.{name} must be a RaggedTile, got "
                                 f"{getattr(self, name)!r}")

    def resolve(self, *, max_q_len: int) -> RaggedBlockSizes:
        """No query tile longer than the longest run of new tokens (decode-only steps: 1).
        Rounding up to a power of two keeps every sequence on the launch it had."""
        longest = pl.next_power_of_2(max(1, max_q_len))

        def shrink(tile):
            return dataclasses.replace(tile, block_q=min(tile.block_q, longest))

        return dataclasses.replace(self, decode=shrink(self.decode), prefill=shrink(self.prefill))


def _ragged_kernel(q_ref, k_ref, v_ref, table_ref, ctx_ref, start_ref, nseq_ref, work_seq_ref,
                   work_tile_ref, prior_ref, o_ref, *, scale, softcap, window_left, block_q,
                   block_k, group, page_size, pages_per_seq, head_dim, prefetch, interpret):
    # q_ref, o_ref [T, N, Hp] (every token and head of the step; programs write disjoint
    # (row, head) pairs; o_ref is aliased to prior_ref, zeros for the first launch and its
    # output for the second, so that rows this launch does not own keep what they hold: the
    # other launch's rows, or 0 for rows of no sequence, never uninitialised memory);
    # k_ref, v_ref [P, page_size, Hp] (this kv head's pool); table_ref [S * pages_per_seq]
    # (all block tables, flattened); ctx_ref [S], start_ref [S + 1]; nseq_ref [1];
    # work_seq_ref, work_tile_ref [W]: program w serves query tile work_tile[w] of sequence
    # work_seq[w] (S: nothing to do).
    del prior_ref
    work, kv_head = pl.program_id(0), pl.program_id(1)
    num_slots = ctx_ref.shape[0]
    seq_or_none = jnp.sum(work_seq_ref[pl.ds(work, 1)])
    seq = jnp.minimum(seq_or_none, num_slots - 1)  # keep the loads below in range
    tile = jnp.sum(work_tile_ref[pl.ds(work, 1)])
    first_row = jnp.sum(start_ref[pl.ds(seq, 1)])
    q_len = jnp.sum(start_ref[pl.ds(seq + 1, 1)]) - first_row
    ctx = jnp.sum(ctx_ref[pl.ds(seq, 1)])
    row0 = tile * block_q  # this program's first token within the sequence's new tokens
    live = (seq_or_none < jnp.sum(nseq_ref[...])) & (row0 < q_len)

    @pl.when(live)
    def _():
        hp = q_ref.shape[-1]
        head_ok = jnp.arange(hp)[None, :] < head_dim
        # Tile row i holds new token row0 + i // G of query head kv_head * G + i % G:
        #   i:     0    1    2    3    4    5  ...      (G = 4)
        #   token  r0   r0   r0   r0   r0+1 r0+1
        #   head   4h   4h+1 4h+2 4h+3 4h   4h+1
        i = jnp.arange(max(16, pl.next_power_of_2(block_q * group)))
        tok = row0 + jax.lax.div(i, group)
        row_ok = (i < block_q * group) & (tok < q_len)
        pos = ctx - q_len + tok  # absolute position (the new tokens are the last q_len tokens
        # of the context, already written into the pages)
        rows = ((first_row + tok)[:, None], (kv_head * group + jax.lax.rem(i, group))[:, None],
                jnp.arange(hp)[None, :])
        q_mask = row_ok[:, None] & head_ok
        q = plgpu.load(q_ref.at[rows], mask=q_mask, other=0.0)
        last_key = jnp.minimum(ctx - q_len + row0 + block_q, ctx)  # one past the last seen
        first = 0
        if window_left is not None:
            lowest = jnp.maximum(ctx - q_len + row0 - window_left, 0)
            first = jax.lax.div(lowest, block_k) * block_k

        def tile_keys(t):
            return first + t * block_k + jnp.arange(block_k)

        def page_ids(t, *, masked=True):
            cols = tile_keys(t)
            return load_page_ids(table_ref, cols, cols < last_key if masked else None,
                                 page_size=page_size, table_offset=seq * pages_per_seq)

        def key_tile(t, carry, *, masked):
            if prefetch:  # this tile's page ids came with the carry; read the next tile's
                # now (masked: the next tile may be past the context, or the table's end)
                carry, pages = carry
                next_pages = page_ids(t + 1)
            cols = tile_keys(t)
            col_ok = cols < last_key if masked else None  # None: every key exists
            if masked:
                kv_mask = col_ok[:, None] & head_ok
            else:  # ... and every row sees it
                kv_mask = None if hp == head_dim else head_ok
            index = paged_rows(pages if prefetch else page_ids(t, masked=masked), cols,
                               page_size=page_size, width=hp)
            # Triton takes a fill value only with a mask: unmasked tiles load plainly.
            fill = {} if kv_mask is None else dict(mask=kv_mask, other=0.0)
            k = plgpu.load(k_ref.at[index], **fill)
            v = plgpu.load(v_ref.at[index], **fill)
            s = dot(q, k, contract=(1, 1)) * scale  # [rows, block_k]
            if softcap is not None:
                s = softcap * jnp.tanh(s / softcap)
            if masked:
                vis = col_ok[None, :] & (cols[None, :] <= pos[:, None])  # causal, new tokens
                if window_left is not None:
                    vis &= cols[None, :] >= pos[:, None] - window_left
                s = jnp.where(vis, s * LOG2E, -jnp.inf)
            else:
                s = s * LOG2E
            carry = online_softmax_step(carry, s, v, may_be_empty=masked, interpret=interpret)
            return (carry, next_pages) if prefetch else carry

        n_tiles = jax.lax.div(jnp.maximum(last_key - first, 0) + block_k - 1, block_k)
        # Tiles wholly before the tile's first new token are seen by every row: no mask,
        # no masked loads (a prefill chunk's context is mostly such tiles; flash forward
        # skips the mask there too). With a window every tile keeps its mask.
        n_interior = 0
        if window_left is None:
            n_interior = jnp.minimum(jax.lax.div(ctx - q_len + row0 + 1, block_k), n_tiles)
        carry = online_softmax_init(i.shape[0], hp)
        if prefetch:
            carry = (carry, page_ids(0))
        carry = jax.lax.fori_loop(0, n_interior,
                                  functools.partial(key_tile, masked=False), carry)
        carry = jax.lax.fori_loop(n_interior, n_tiles,
                                  functools.partial(key_tile, masked=True), carry)
        out, _ = online_softmax_finish(carry[0] if prefetch else carry)
        plgpu.store(o_ref.at[rows], out.astype(o_ref.dtype), mask=q_mask)


@functools.partial(jax.jit, static_argnames=("softcap", "window_left", "scale", "block_sizes",
                                             "max_q_len", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, query_start,
                           num_seqs, *, softcap=None, window_left=None, scale=None,
                           block_sizes=None, max_q_len=None, interpret=False):
    """One engine step mixing prefill chunks and decodes over a paged cache.

    q [T, N, H]: the step's new tokens, sequence s owning rows query_start[s] ..
    query_start[s + 1] - 1; they are the last tokens of its context_lens[s] tokens (already
    written into the pages), so row r of sequence s sits at position
    context_lens[s] - q_len_s + r and attends causally. Sequences >= num_seqs are padding.
    max_q_len bounds any sequence's new tokens (static; None = T). Rows of no sequence are 0.
    A program serves block_q new tokens of one sequence for all G query heads of one kv head.
    Two launches of the same kernel (`RaggedBlockSizes`), each on a grid (W, K) over a work
    list built on device from query_start: one entry per (sequence, query tile) that exists.
    A decode-only step (static max_q_len == 1) runs the split-KV paged decode kernel instead
    (it splits long contexts; faster on decodes, BENCHMARKS.md).
    The decode launch takes the decodes (q_len <= decode.block_q), one program each (W = S);
    the prefill launch the chunks, so a step of 248 decodes and 8 prefill chunks of 512
    launches ~8 * 512 / block_q programs per kv head there, not S * 512 / block_q (most of
    which would have nothing to do). The second launch writes into the first's output
    (aliased): disjoint rows, no copy.
    Inputs are trusted (`fastattn.ragged_paged_attention` validates them); any page size.
    """
    T, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    S, pages_per_seq = block_tables.shape
    Hp = pl.next_power_of_2(H)
    max_q_len = max_q_len or T
    bs = (block_sizes or RaggedBlockSizes()).resolve(max_q_len=max_q_len)
    starts = query_start.astype(jnp.int32)
    q_lens = jnp.where(jnp.arange(S) < num_seqs, starts[1:] - starts[:-1], 0)  # [S]
    is_decode = q_lens <= bs.decode.block_q
    metadata = (block_tables.astype(jnp.int32).reshape(-1), context_lens.astype(jnp.int32),
                starts, jnp.asarray(num_seqs, jnp.int32).reshape(1))
    every_row = pl.BlockSpec((T, N, Hp), lambda w, h: (0, 0, 0))
    pool = pl.BlockSpec((None, P, page_size, Hp), lambda w, h: (h, 0, 0, 0))
    whole = lambda n: pl.BlockSpec((n,), lambda w, h: (0,))

    def launch(out, tile, covered, num_programs, name):
        """Runs the kernel on the sequences `covered` [S] in `tile`s, writing into `out`."""
        work_seq, work_tile = _work_list(q_lens, covered, block_q=tile.block_q,
                                         num_programs=num_programs)
        kernel = functools.partial(
            _ragged_kernel, scale=float(1.0 / math.sqrt(H) if scale is None else scale),
            softcap=softcap, window_left=window_left, block_q=tile.block_q,
            block_k=tile.block_k, group=N // K, page_size=page_size,
            pages_per_seq=pages_per_seq, head_dim=H, prefetch=tile.prefetch_page_ids,
            interpret=interpret)
        return pl.pallas_call(
            kernel,
            grid=(num_programs, K),
            in_specs=[every_row, pool, pool, whole(S * pages_per_seq), whole(S), whole(S + 1),
                      whole(1), whole(num_programs), whole(num_programs), every_row],
            out_specs=every_row,
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            compiler_params=plgpu.CompilerParams(num_warps=tile.num_warps,
                                                 num_stages=tile.num_stages),
            interpret=interpret,
            input_output_aliases={9: 0},
            name=name,
        )(q, k_pages, v_pages, *metadata, work_seq, work_tile, out)

    if max_q_len == 1:
        # A decode-only step (static): the split-KV paged decode kernel, which also splits
        # long contexts over programs; it beat this kernel's decode launch on the decode half
        # of the mixed step (0.501 vs 0.572 ms, H200, BENCHMARKS.md). Row starts[s] is
        # sequence s's token; sequences without one get length 0 and their result is dropped.
        has_row = q_lens == 1
        o, _ = paged_decode_attention(
            q[jnp.minimum(starts[:S], T - 1)], k_pages, v_pages, block_tables,
            jnp.where(has_row, context_lens, 0), softcap=softcap, window_left=window_left,
            scale=scale, interpret=interpret)
        return jnp.zeros_like(q).at[jnp.where(has_row, starts[:S], T)].set(o, mode="drop")
    out = launch(jnp.zeros_like(q), bs.decode, is_decode, S, "ragged_paged_attention_decode")
    if max_q_len > bs.decode.block_q:  # static: a decode-only step has no prefill launch
        # W bounds the tiles of any step: sum_s ceil(q_len_s / block_q) <= S + T / block_q,
        # and <= S * ceil(max_q_len / block_q).
        bq = bs.prefill.block_q
        out = launch(out, bs.prefill, ~is_decode,
                     min(S + pl.cdiv(T, bq), S * pl.cdiv(max_q_len, bq)),
                     "ragged_paged_attention_prefill")
    return out


def _work_list(q_lens, covered, *, block_q, num_programs):
    """(sequence, query tile) of each of num_programs programs, [num_programs] each, over the
    sequences `covered` [S] bool with q_lens [S] new tokens; entries past the real work name
    sequence S. num_programs must bound sum over covered s of ceil(q_lens[s] / block_q)."""
    S = q_lens.shape[0]
    tiles = jnp.where(covered, (q_lens + block_q - 1) // block_q, 0)
    ends = jnp.cumsum(tiles)
    w = jnp.arange(num_programs, dtype=jnp.int32)
    # compare_all, not the default binary search: that is a while loop, which XLA's GPU
    # runtime steps from the host (a device->host read per iteration) and which would block
    # the engine step's launch until the device caught up.
    seq = jnp.searchsorted(ends, w, side="right", method="compare_all").astype(
        jnp.int32)  # S past the last tile
    tile = w - (ends - tiles)[jnp.minimum(seq, S - 1)]
    return seq, tile.astype(jnp.int32)


# One compilation per (q_len, context) shape: the op-by-op dense reference costs ~5x more
# compile time per shape, and the tests run it on many ragged shapes.
_dense_reference = jax.jit(flash_attention_reference,
                           static_argnames=("causal", "window", "softcap", "scale"))


def ragged_paged_attention_reference(q, k_pages, v_pages, block_tables, context_lens,
                                     query_start, num_seqs, *, softcap=None, window_left=None,
                                     scale=None):
    """Per sequence (host loop over concrete metadata): gather its pages into dense K/V and
    run the dense causal reference on its new rows. Rows of no sequence are 0."""
    starts, ctx = np.asarray(query_start), np.asarray(context_lens)
    k_dense, v_dense = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    window = None if window_left is None else (window_left, None)
    rows = []  # the sequences own consecutive rows from 0: concatenate, then pad with zeros
    for s in range(int(num_seqs)):
        lo, hi, n = int(starts[s]), int(starts[s + 1]), int(ctx[s])
        if hi > lo:
            o, _ = _dense_reference(q[None, lo:hi], k_dense[s:s + 1, :n], v_dense[s:s + 1, :n],
                                    causal=True, window=window, softcap=softcap, scale=scale)
            rows.append(o[0])
    rows.append(jnp.zeros((q.shape[0] - int(starts[int(num_seqs)]), *q.shape[1:]), q.dtype))
    return jnp.concatenate(rows)
