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

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention import (
    DecodeBlockSizes, split_kv_call, decode_attention_reference)

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
