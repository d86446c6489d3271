"""Ragged paged attention in plain XLA: traceable with traced metadata, for backends without
our GPU kernel (the engine's jitted step on a CPU) and as a second, independent check.

Each query row finds its sequence from `query_start`, gathers that sequence's pages into a dense
[C = pages_per_seq * page_size] key range, and attends with the mask

    key j visible to row r of sequence s  <=>  j <= pos(r)  and  j > pos(r) - 1 - window_left
    pos(r) = context_lens[s] - q_len(s) + (r - query_start[s])

Memory is T x C x K x H per layer (every row gathers its sequence's keys), fine for the small
steps a CPU runs; the Pallas kernel is the path on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_paged_attention_xla(q, k_pages, v_pages, block_tables, context_lens, query_start,
                               num_seqs, *, softcap=None, window_left=None, scale=None):
    """Same contract as `fastattn.ragged_paged_attention` (q [T, N, H], pages [K, P, ps, H])."""
    T, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    S, pages_per_seq = block_tables.shape
    C, G = pages_per_seq * page_size, N // K
    scale = H ** -0.5 if scale is None else scale

    rows = jnp.arange(T, dtype=jnp.int32)
    query_start = query_start.astype(jnp.int32)
    # Sequence of each row: the s with query_start[s] <= r < query_start[s + 1].
    # compare_all: no while loop (the GPU runtime would step it from the host).
    seq = jnp.searchsorted(query_start[1:], rows, side="right",
                           method="compare_all").astype(jnp.int32)
    row_valid = seq < jnp.minimum(num_seqs, S)
    seq = jnp.minimum(seq, S - 1)
    ctx = context_lens.astype(jnp.int32)[seq]  # [T]
    pos = ctx - (query_start[seq + 1] - query_start[seq]) + (rows - query_start[seq])  # [T]

    pages = block_tables[seq]  # [T, pages_per_seq]

    def gather(pool):  # -> [T, C, K, H]; keys beyond the context zeroed (NaN-safe)
        dense = pool[:, pages].reshape(K, T, C, H)
        dense = jnp.moveaxis(dense, 0, 2)
        live = jnp.arange(C)[None, :] < ctx[:, None]
        return jnp.where(live[:, :, None, None], dense, 0).astype(jnp.float32)

    k, v = gather(k_pages), gather(v_pages)
    qg = q.astype(jnp.float32).reshape(T, K, G, H)
    s = jnp.einsum("tkgh,tckh->tkgc", qg, k, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    j = jnp.arange(C)[None, :]
    visible = (j <= pos[:, None]) & row_valid[:, None]
    if window_left is not None:
        visible &= j >= pos[:, None] - window_left
    visible = visible[:, None, None, :]
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("tkgc,tckh->tkgh", p, v, precision=jax.lax.Precision.HIGHEST)
    out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1), 0)
    return out.reshape(T, N, H).astype(q.dtype)
