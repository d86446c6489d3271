"""Memory-efficient attention in plain JAX (the "xla" implementation).

The computation is FlashAttention-2 expressed with ``jax.lax`` loops: queries
and keys are cut into chunks, the forward pass keeps an online softmax (running
max, running sum, rescaled accumulator) over key chunks, and the backward pass
recomputes the probabilities chunk by chunk from the saved log-sum-exp. No
``[T, S]`` score matrix is ever materialised; the largest temporary is one
``[chunk, chunk]`` block per (batch, head).

Dimension letters used in einsum strings and comments:
  B batch, T query length, S key length, N query heads, K key/value heads,
  G query heads per key/value head (N = K * G), H head dimension.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class _Config(NamedTuple):
    """Static options of one call (hashable, so usable as a nondiff argument).

    ``seq_q``/``seq_k`` are the true lengths T and S; the arrays handed to the
    custom_vjp function are padded up to multiples of ``chunk_q``/``chunk_k``.
    """

    causal: bool
    window_left: Optional[int]
    window_right: Optional[int]
    softcap: Optional[float]
    scale: float
    seq_q: int
    seq_k: int
    chunk_q: int
    chunk_k: int


def xla_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None,
                  causal=False, window_left=None, window_right=None,
                  softcap=None, scale=None, chunk_size=512):
    """Multi-head attention with grouped-query heads, masking and a custom VJP.

    Args:
      q: ``[B, T, N, H]`` queries.
      k, v: ``[B, S, K, H]`` keys and values, ``N % K == 0``; query head ``n``
        reads key/value head ``n // (N // K)``.
      q_segment_ids, kv_segment_ids: optional int32 ``[B, T]`` / ``[B, S]``
        (both or neither); a query only sees keys of its own segment.
      causal: query row ``i`` (absolute position ``i + S - T``, i.e. queries
        are aligned to the end of the keys) sees keys ``j <= i + S - T``.
      window_left, window_right: if given, row ``i`` only sees keys with
        ``i + S - T - window_left <= j <= i + S - T + window_right``.
      softcap: if given, scores become ``softcap * tanh(scores / softcap)``.
      scale: score multiplier, ``1 / sqrt(H)`` when None.
      chunk_size: block length for queries and keys; memory per (batch, head)
        is O(chunk_size ** 2).

    Scores are ``(q . k) * scale`` accumulated in float32, then soft-capped,
    then masked by selection. The softmax runs over visible keys only.

    Returns:
      ``(out, lse)``: ``out`` ``[B, T, N, H]`` in ``q.dtype`` (``softmax @ v``
      accumulated in float32) and ``lse`` ``[B, N, T]`` float32, the natural
      log of the sum of ``exp(score)`` over visible keys. A row that sees no
      key gets ``out == 0``, ``lse == -inf`` and zero gradients. Keys that no
      query can see never influence any result, even if they hold NaN/Inf.
      Both outputs are differentiable with respect to ``q``, ``k`` and ``v``.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    cfg = _Config(
        causal=bool(causal),
        window_left=None if window_left is None else int(window_left),
        window_right=None if window_right is None else int(window_right),
        softcap=None if softcap is None else float(softcap),
        scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        seq_q=seq_q,
        seq_k=seq_k,
        # A chunk longer than the sequence would only add padding work.
        chunk_q=min(chunk_size, seq_q),
        chunk_k=min(chunk_size, seq_k),
    )
    padded_q = _round_up(seq_q, cfg.chunk_q)
    padded_k = _round_up(seq_k, cfg.chunk_k)
    # Grouped layout: K/V are broadcast over G inside the einsums instead of
    # being repeated in memory.
    q = q.reshape(batch, seq_q, num_kv_heads, groups, head_dim)
    out, lse = _attention(
        cfg,
        _pad_axis1(q, padded_q),
        _pad_axis1(k, padded_k),
        _pad_axis1(v, padded_k),
        _pad_axis1(q_segment_ids, padded_q),
        _pad_axis1(kv_segment_ids, padded_k),
    )
    out = out[:, :seq_q].reshape(batch, seq_q, num_heads, head_dim)
    lse = lse[..., :seq_q].reshape(batch, num_heads, seq_q)
    return out, lse


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _pad_axis1(x, length):
    """Zero-pads axis 1 to ``length``; padded rows/keys are masked by index."""
    if x is None or x.shape[1] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths)


def _split(x, chunk, axis=1):
    """``[..., L, ...]`` (L at ``axis``) -> ``[L // chunk, ..., chunk, ...]``,
    the leading axis being the one scanned over."""
    if x is None:
        return None
    shape = x.shape[:axis] + (x.shape[axis] // chunk, chunk) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge(x, axis=1):
    """Inverse of ``_split``."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _chunk_starts(length, chunk):
    """First index of each chunk, scanned alongside the chunks themselves."""
    return jnp.arange(length // chunk, dtype=jnp.int32) * chunk


def _key_chunks(cfg, k, v, k_seg):
    """Scan inputs over key chunks: (k, v, segment ids or None, start)."""
    return (_split(k, cfg.chunk_k), _split(v, cfg.chunk_k),
            _split(k_seg, cfg.chunk_k), _chunk_starts(k.shape[1], cfg.chunk_k))


def _precision(dtype):
    # float32 inputs must not be silently truncated to bf16/tf32 passes on
    # accelerators; low-precision inputs lose nothing at default precision.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _visible(cfg, q_start, k_start, q_seg, k_seg):
    """Mask of the (query chunk, key chunk) block starting at rows ``q_start``
    and keys ``k_start``: ``[B or 1, chunk_q, chunk_k]`` bool, True where the
    query may attend the key. Padding rows (>= T) and keys (>= S) see nothing.
    ``q_seg``/``k_seg`` are the chunk's ``[B, chunk]`` segment ids or None.
    """
    rows = q_start + jnp.arange(cfg.chunk_q, dtype=jnp.int32)
    keys = (k_start + jnp.arange(cfg.chunk_k, dtype=jnp.int32))[None, :]
    pos = (rows + (cfg.seq_k - cfg.seq_q))[:, None]  # bottom-right alignment
    vis = (rows < cfg.seq_q)[:, None] & (keys < cfg.seq_k)
    if cfg.causal:
        vis &= keys <= pos
    if cfg.window_left is not None:
        vis &= keys >= pos - cfg.window_left
    if cfg.window_right is not None:
        vis &= keys <= pos + cfg.window_right
    vis = vis[None]
    if q_seg is not None:
        vis &= q_seg[:, :, None] == k_seg[:, None, :]
    return vis


def _scores(cfg, qc, kc):
    """Soft-capped scores ``[B, K, G, chunk_q, chunk_k]`` float32 of a block.

    Entries outside the mask may be anything (even NaN); callers select them
    away.
    """
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qc, kc,
                   preferred_element_type=jnp.float32,
                   precision=_precision(qc.dtype)) * cfg.scale
    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    return s


def _keep_rows(seen, x):
    """Zeroes rows ``x[b, i]`` (axis 1) where ``seen[b, i]`` is False.

    Used on operands contracted over T or S: a masked entry of P or dS is an
    exact 0, but 0 * NaN is NaN, so rows that no entry of the block uses must
    be cleared by selection (not multiplication) to keep results bitwise
    independent of their contents.
    """
    seen = seen.reshape(seen.shape + (1,) * (x.ndim - 2))
    return jnp.where(seen, x, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_seg, k_seg):
    """Padded, grouped attention: q ``[B, Tp, K, G, H]``, k/v ``[B, Sp, K, H]``
    -> (out ``[B, Tp, K, G, H]``, lse ``[B, K, G, Tp]``)."""
    return _forward(cfg, q, k, v, q_seg, k_seg)


def _forward(cfg, q, k, v, q_seg, k_seg):
    batch, _, num_kv_heads, groups, head_dim = q.shape

    def query_chunk(args):
        qc, q_seg_c, q_start = args

        def key_step(carry, xs):
            m, l, acc = carry  # running max, running sum, unnormalised out
            kc, vc, k_seg_c, k_start = xs
            vis = _visible(cfg, q_start, k_start, q_seg_c, k_seg_c)
            vis5 = vis[:, None, None]
            s = _scores(cfg, qc, kc)
            m_new = jnp.maximum(
                m, jnp.max(jnp.where(vis5, s, -jnp.inf), axis=-1))
            # Rows with no visible key so far keep m = -inf; shifting them by
            # 0 avoids -inf - -inf = NaN (their p and alpha are 0 anyway).
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.where(vis5, jnp.exp(s - shift[..., None]), 0.0)
            alpha = jnp.exp(m - shift)
            vc = _keep_rows(jnp.any(vis, axis=1), vc)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(vc.dtype), vc,
                            preferred_element_type=jnp.float32,
                            precision=_precision(vc.dtype))
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + pv
            return (m_new, l, acc), None

        stats_shape = (batch, num_kv_heads, groups, cfg.chunk_q)
        init = (jnp.full(stats_shape, -jnp.inf, jnp.float32),
                jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros(stats_shape + (head_dim,), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_step, init,
                                      _key_chunks(cfg, k, v, k_seg))
        # l >= 1 for any row that saw a key (its max contributes exp(0)).
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        out = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
        return jnp.einsum("BKGTH->BTKGH", out).astype(q.dtype), lse

    out, lse = jax.lax.map(query_chunk, (
        _split(q, cfg.chunk_q),
        _split(q_seg, cfg.chunk_q),
        _chunk_starts(q.shape[1], cfg.chunk_q),
    ))
    return _merge(out), _merge(lse, axis=3)


def _attention_fwd(cfg, q, k, v, q_seg, k_seg):
    out, lse = _forward(cfg, q, k, v, q_seg, k_seg)
    return (out, lse), (q, k, v, q_seg, k_seg, out, lse)


def _attention_bwd(cfg, residuals, cotangents):
    """FlashAttention-2 backward: ``P = exp(s - lse)`` recomputed per block,
    ``dS = P * (dP - delta + dlse)`` with ``delta = rowsum(dO * O)``.

    The ``dlse`` term is the gradient of ``lse`` itself (``d lse_i / d s_ij =
    P_ij``). The outer loop over key chunks carries the dQ accumulator; the
    inner loop over query chunks carries that key chunk's dK and dV, whose
    einsums also sum over the G query heads sharing each key/value head.
    """
    q, k, v, q_seg, k_seg, out, lse = residuals
    d_out, d_lse = cotangents
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32),
                       out.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    # Fold dlse in once: dP - delta + dlse = dP - (delta - dlse).
    delta = delta - d_lse
    query_chunks = (
        _split(q, cfg.chunk_q),
        _split(d_out, cfg.chunk_q),
        _split(lse, cfg.chunk_q, axis=3),
        _split(delta, cfg.chunk_q, axis=3),
        _split(q_seg, cfg.chunk_q),
        _chunk_starts(q.shape[1], cfg.chunk_q),
    )

    def key_chunk(dq_acc, xs):
        kc, vc, k_seg_c, k_start = xs

        def query_step(carry, ys):
            dk, dv = carry
            qc, doc, lse_c, delta_c, q_seg_c, q_start = ys
            vis = _visible(cfg, q_start, k_start, q_seg_c, k_seg_c)
            vis5 = vis[:, None, None]
            s = _scores(cfg, qc, kc)
            p = jnp.where(vis5, jnp.exp(s - lse_c[..., None]), 0.0)
            dp = jnp.einsum("BTKGH,BSKH->BKGTS", doc, vc,
                            preferred_element_type=jnp.float32,
                            precision=_precision(doc.dtype))
            ds = p * (dp - delta_c[..., None])
            if cfg.softcap is not None:
                ds = ds * (1.0 - jnp.square(s / cfg.softcap))  # d tanh
            # One select over the whole product: masked entries of s, dp or
            # delta may be non-finite, and p == 0 there does not cancel NaN.
            ds = jnp.where(vis5, ds * cfg.scale, 0.0)

            row_seen = jnp.any(vis, axis=2)
            key_seen = jnp.any(vis, axis=1)
            qc = _keep_rows(row_seen, qc)
            doc = _keep_rows(row_seen, doc)
            kc_kept = _keep_rows(key_seen, kc)
            dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(doc.dtype), doc,
                                 preferred_element_type=jnp.float32,
                                 precision=_precision(doc.dtype))
            dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(qc.dtype), qc,
                                 preferred_element_type=jnp.float32,
                                 precision=_precision(qc.dtype))
            dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds.astype(kc.dtype), kc_kept,
                            preferred_element_type=jnp.float32,
                            precision=_precision(kc.dtype))
            return (dk, dv), dq

        init = (jnp.zeros(kc.shape, jnp.float32),
                jnp.zeros(vc.shape, jnp.float32))
        (dk, dv), dq_parts = jax.lax.scan(query_step, init, query_chunks)
        return dq_acc + dq_parts, (dk, dv)

    dq_init = jnp.zeros(
        (q.shape[1] // cfg.chunk_q, q.shape[0], cfg.chunk_q) + q.shape[2:],
        jnp.float32)
    dq, (dk, dv) = jax.lax.scan(key_chunk, dq_init,
                                _key_chunks(cfg, k, v, k_seg))
    # Segment ids are integer inputs: None stands for their zero cotangent.
    return (_merge(dq).astype(q.dtype), _merge(dk).astype(k.dtype),
            _merge(dv).astype(v.dtype), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
