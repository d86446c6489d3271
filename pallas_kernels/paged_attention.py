"""Paged decode attention: split-KV flash decoding over a vLLM-style paged KV cache.

    q [B, N, H]   k_pages, v_pages [K, P, page_size, H]   block_tables [B, pages_per_seq]
    lengths [B]

Token t of sequence b lives in page block_tables[b, t // page_size] at offset
t % page_size (see fastattn/kv_cache.py for the picture). The kernel is the split-KV decode
kernel of decode_attention.py with one tile = one page: each program walks the pages of its
KV partition through the block table, so pages may sit anywhere in the pool, in any order.

    block_tables[b] = [5, 2, 7, ...]          split 0          split 1
    sequence b:       | page 5 | page 2 | page 7 | page 1 | ... |
                        tile 0   tile 1   tile 2   tile 3

Only the pages a sequence's length covers are read, and rows past the length inside its last
page are masked in the load, so free pages and stale tails never reach the result.
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
    dot,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_step,
)
from pallas_kernels.decode_attention import (
    DecodeBlockSizes,
    decode_attention_reference,
    split_kv_call,
)
from pallas_kernels.flash_attention import flash_attention_reference

MIN_KERNEL_PAGE_SIZE = 16  # a page is one matrix-unit tile, and Triton's smallest is 16


@functools.partial(jax.jit, static_argnames=("softcap", "window_left", "scale", "block_sizes",
                                             "interpret"))
def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, softcap=None,
                           window_left=None, scale=None, block_sizes=None, interpret=False):
    """Split-KV decode over pages; returns (out [B, N, H] in q.dtype, lse [B, N] f32).

    Inputs are trusted (`fastattn.paged_attention` validates them); page_size >= 16.
    `block_sizes.block_k` is ignored: a tile is one page. Semantics as `decode_attention`.
    """
    B = q.shape[0]
    K, _, page_size, H = k_pages.shape
    kv_len = block_tables.shape[1] * page_size
    bs = dataclasses.replace(block_sizes or DecodeBlockSizes(), block_k=page_size)
    bs = bs.resolve(batch=B, kv_heads=K, kv_len=kv_len)
    Hp = pl.next_power_of_2(H)
    kv_spec = pl.BlockSpec((None, k_pages.shape[1], page_size, Hp), lambda j, b, h: (h, 0, 0, 0))
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


def _ragged_kernel(q_ref, k_ref, v_ref, table_ref, ctx_ref, start_ref, nseq_ref, zeros_ref, o_ref,
                   *,
                   scale, softcap, window_left, block_q, page_size, head_dim, interpret):
    # q_ref [T, Hp] (this query head, every token of the step); k_ref, v_ref [P, page_size, Hp]
    # (this head's kv pool); table_ref [pages_per_seq]; ctx_ref, start_ref [S + 1] int32;
    # nseq_ref [1]; o_ref [T, Hp] (this query head; programs write disjoint rows), aliased to
    # zeros_ref so that rows no sequence owns read 0 rather than uninitialised memory
    del zeros_ref
    seq, tile = pl.program_id(0), pl.program_id(1)
    first_row = jnp.sum(start_ref[pl.ds(seq, 1)])
    q_len = jnp.sum(start_ref[pl.ds(seq + 1, 1)]) - first_row
    ctx = jnp.sum(ctx_ref[pl.ds(seq, 1)])
    row0 = tile * block_q  # this program's first row within the sequence's new tokens
    live = (seq < jnp.sum(nseq_ref[...])) & (row0 < q_len)

    @pl.when(live)
    def _():
        hp = q_ref.shape[-1]
        head_ok = jnp.arange(hp)[None, :] < head_dim
        rows = row0 + jnp.arange(block_q)  # within the sequence's new tokens
        row_ok = rows < q_len
        pos = ctx - q_len + rows  # absolute position of each query row (the new tokens are
        # the last q_len tokens of the context, already written into the pages)
        q = plgpu.load(q_ref.at[pl.ds(first_row + row0, block_q), :],
                       mask=row_ok[:, None] & head_ok, other=0.0)
        last_key = jnp.minimum(ctx - q_len + row0 + block_q, ctx)  # one past the last seen
        first_page = 0
        if window_left is not None:
            first_page = jax.lax.div(jnp.maximum(ctx - q_len + row0 - window_left, 0), page_size)

        def body(p, carry):
            cols = p * page_size + jnp.arange(page_size)
            page = jnp.sum(table_ref[pl.ds(p, 1)])
            col_ok = cols < ctx
            kv_mask = col_ok[:, None] & head_ok
            k = plgpu.load(k_ref.at[page, :, :], mask=kv_mask, other=0.0)
            v = plgpu.load(v_ref.at[page, :, :], mask=kv_mask, other=0.0)
            s = dot(q, k, contract=(1, 1)) * scale  # [block_q, page_size]
            if softcap is not None:
                s = softcap * jnp.tanh(s / softcap)
            vis = col_ok[None, :] & (cols[None, :] <= pos[:, None])  # causal among new tokens
            if window_left is not None:
                vis &= cols[None, :] >= pos[:, None] - window_left
            s = jnp.where(vis, s * LOG2E, -jnp.inf)
            return online_softmax_step(carry, s, v, may_be_empty=True, interpret=interpret)

        n_pages = jax.lax.div(jnp.maximum(last_key, 0) + page_size - 1, page_size)
        carry = jax.lax.fori_loop(first_page, n_pages, body, online_softmax_init(block_q, hp))
        out, _ = online_softmax_finish(carry)
        plgpu.store(o_ref.at[pl.ds(first_row + row0, block_q), :], out.astype(o_ref.dtype),
                    mask=row_ok[:, None] & head_ok)


@functools.partial(jax.jit, static_argnames=("softcap", "window_left", "scale", "block_q",
                                             "max_q_len", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, block_tables, context_lens, query_start,
                           num_seqs, *, softcap=None, window_left=None, scale=None, block_q=16,
                           max_q_len=None, interpret=False):
    """One engine step mixing prefill chunks and decodes over a paged cache.

    q [T, N, H]: the step's new tokens, sequence s owning rows query_start[s] ..
    query_start[s + 1] - 1; they are the last tokens of its context_lens[s] tokens (already
    written into the pages), so row r of sequence s sits at position
    context_lens[s] - q_len_s + r and attends causally. Sequences >= num_seqs are padding.
    max_q_len bounds any sequence's new tokens (static; None = T). Rows of no sequence are 0.
    Inputs are trusted (`fastattn.ragged_paged_attention` validates them); page_size >= 16.
    """
    T, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    S, pages_per_seq = block_tables.shape
    G = N // K
    Hp = pl.next_power_of_2(H)
    tiles = pl.cdiv(max_q_len or T, block_q)
    kernel = functools.partial(
        _ragged_kernel, scale=float(1.0 / math.sqrt(H) if scale is None else scale),
        softcap=softcap, window_left=window_left, block_q=block_q, page_size=page_size,
        head_dim=H, interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(S, tiles, N),
        in_specs=[
            pl.BlockSpec((T, None, Hp), lambda s, j, n: (0, n, 0)),
            pl.BlockSpec((None, P, page_size, Hp), lambda s, j, n: (n // G, 0, 0, 0)),
            pl.BlockSpec((None, P, page_size, Hp), lambda s, j, n: (n // G, 0, 0, 0)),
            pl.BlockSpec((None, pages_per_seq), lambda s, j, n: (s, 0)),
            pl.BlockSpec((S,), lambda s, j, n: (0,)),
            pl.BlockSpec((S + 1,), lambda s, j, n: (0,)),
            pl.BlockSpec((1,), lambda s, j, n: (0,)),
            pl.BlockSpec((T, None, Hp), lambda s, j, n: (0, n, 0)),
        ],
        out_specs=pl.BlockSpec((T, None, Hp), lambda s, j, n: (0, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        input_output_aliases={7: 0},
        name="ragged_paged_attention",
    )(q, k_pages, v_pages, block_tables.astype(jnp.int32), context_lens.astype(jnp.int32),
      query_start.astype(jnp.int32), jnp.asarray(num_seqs, jnp.int32).reshape(1),
      jnp.zeros_like(q))


def ragged_paged_attention_reference(q, k_pages, v_pages, block_tables, context_lens,
                                     query_start, num_seqs, *, softcap=None, window_left=None,
                                     scale=None):
    """Per sequence (host loop over concrete metadata): gather its pages into dense K/V and
    run the dense causal reference on its new rows. Rows of no sequence are 0."""
    starts, ctx = np.asarray(query_start), np.asarray(context_lens)
    out = jnp.zeros_like(q)
    k_dense, v_dense = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    for s in range(int(num_seqs)):
        lo, hi, n = int(starts[s]), int(starts[s + 1]), int(ctx[s])
        if hi == lo:
            continue
        o, _ = flash_attention_reference(
            q[None, lo:hi], k_dense[s:s + 1, :n], v_dense[s:s + 1, :n], causal=True,
            window=None if window_left is None else (window_left, None), softcap=softcap,
            scale=scale)
        out = out.at[lo:hi].set(o[0])
    return out
