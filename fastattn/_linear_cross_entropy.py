"""Linear layer + softmax cross-entropy over the vocabulary without the [N, V] logits.

    hidden [N, D]  x  weight [D, V]  (weight_layout="DV", a projection's kernel)
                   or weight [V, D]  (weight_layout="VD", a tied embedding table, read in place)

    logits = hidden @ W                        [N, V], never stored whole
    lse[i] = log sum_v exp(logits[i, v])
    loss[i] = lse[i] - logits[i, labels[i]]    (0 where labels[i] is outside [0, V))

Why: the plain head keeps the f32 logits [N, V] alive for the backward, and autodiff of
log_softmax adds its softmax of the same size. At N = 16384 tokens and V = 128256 each is
8.4 GB, more than the rest of a 1B model's activations together. Here a `lax.scan` visits
`chunk_size` tokens at a time:

    tokens   | chunk 0 | chunk 1 | ... | chunk C-1 (zero rows padded, results dropped) |
    forward  logits_c = h_c @ W  ->  lse_c, loss_c             (only [N] vectors are kept)
    backward logits_c again      ->  p_c = exp(logits_c - lse_c)
             g_c = p_c * (dloss + dlse) - onehot(label) * dloss          [chunk, V], f32
             dh_c = g_c @ W^T,   dW += h_c^T @ g_c   (dW accumulates in f32 over the chunks)

so the peak is a few [chunk_size, V] f32 arrays, and the residuals are only the inputs and
lse [N]. The backward recomputes the logits (one more [N, D] x [D, V] matmul than autodiff of
the plain head: 3 instead of 2 + 1 stored; the same trade as FlashAttention's backward, which
recomputes its scores rather than storing them). The gradient of the softmax cross-entropy
w.r.t. the logits is p - onehot (e.g. Goodfellow et al., Deep Learning, 6.2.2.3); a cotangent
on lse adds p * dlse.

Precision: logits come out of the matmul in `logits_dtype` (f32 accumulation; f32 inputs at
HIGHEST precision, so TF32 never enters); the softmax is f32. In the backward g is rounded to
the inputs' dtype before its two matmuls (what the backward of a bf16 matmul does) and both
accumulate in f32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

WEIGHT_LAYOUTS = ("DV", "VD")
BACKWARDS = ("chunked", "reference")
# A chunk's logits hold at most this many elements (256 MiB in f32) unless chunk_size says
# otherwise; the backward keeps about three arrays of that size alive.
DEFAULT_CHUNK_ELEMENTS = 2**26


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
    """Rows per chunk when none is given: the largest power of two whose [rows, V] logits
    stay within DEFAULT_CHUNK_ELEMENTS (a power of two keeps the matmul tiles full), at
    least 1 and at most num_tokens (one chunk, no padding)."""
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))
    return max(1, min(num_tokens, 1 << (rows.bit_length() - 1)))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call; hashable so it can be a custom_vjp nondiff argument."""

    weight_layout: str  # "DV" or "VD"
    chunk_size: int
    logits_dtype: str
    backward: str  # "chunked" or "reference" (debugging: differentiate the reference)


# ----------------------------------------------------------------------------- shared chunk math


def _matmul(a, b, contract: tuple[int, int], out_dtype):
    """2-D matmul, f32 accumulation; f32 inputs at full f32 precision."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=out_dtype)


def _logits(h, weight, st: _Static):
    """h [C, D] -> logits [C, V] in st.logits_dtype; a [V, D] weight is contracted on its D
    axis directly (no transposed copy of the table)."""
    return _matmul(h, weight, (1, 0 if st.weight_layout == "DV" else 1), st.logits_dtype)


def _is_label(labels, shape):
    """[C, V] bool, True at (i, labels[i]); an all-False row for a label outside [0, V).
    Compare-and-select instead of a gather, so it fuses into the reductions around it."""
    return lax.broadcasted_iota(jnp.int32, shape, 1) == labels[:, None]


def _valid(labels, vocab_size):
    return (labels >= 0) & (labels < vocab_size)


def _chunked(x, chunk_size: int, fill):
    """[N, ...] -> [C, chunk_size, ...], the last chunk padded with `fill`."""
    pad = -x.shape[0] % chunk_size
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(-1, chunk_size, *x.shape[1:])


def _unchunked(x, n: int):
    return x.reshape(-1, *x.shape[2:])[:n]


# ----------------------------------------------------------------------------- forward / backward


def _forward(hidden, weight, labels, st: _Static):
    vocab_size = weight.shape[1 if st.weight_layout == "DV" else 0]

    def chunk(_, xs):
        h, y = xs
        logits = _logits(h, weight, st).astype(jnp.float32)  # [C, V]
        row_max = jnp.max(logits, axis=1)
        lse = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1))
        picked = jnp.sum(jnp.where(_is_label(y, logits.shape), logits, 0.0), axis=1)
        return None, (jnp.where(_valid(y, vocab_size), lse - picked, 0.0), lse)

    xs = (_chunked(hidden, st.chunk_size, 0), _chunked(labels, st.chunk_size, -1))
    _, (loss, lse) = lax.scan(chunk, None, xs)
    n = hidden.shape[0]
    return _unchunked(loss, n), _unchunked(lse, n)


def _backward(hidden, weight, labels, lse, dloss, dlse, st: _Static):
    vocab_size = weight.shape[1 if st.weight_layout == "DV" else 0]
    dtype = hidden.dtype

    def chunk(dw, xs):
        h, y, lse_c, dl, dz = xs
        logits = _logits(h, weight, st).astype(jnp.float32)  # [C, V]
        p = jnp.exp(logits - lse_c[:, None])
        dl = jnp.where(_valid(y, vocab_size), dl, 0.0)  # ignored tokens: no loss gradient
        g = p * (dl + dz)[:, None] - jnp.where(_is_label(y, logits.shape), dl[:, None], 0.0)
        g = g.astype(dtype)
        if st.weight_layout == "DV":
            dh = _matmul(g, weight, (1, 1), jnp.float32)  # [C, V] x [D, V] -> [C, D]
            dw = dw + _matmul(h, g, (0, 0), jnp.float32)  # [C, D] x [C, V] -> [D, V]
        else:
            dh = _matmul(g, weight, (1, 0), jnp.float32)  # [C, V] x [V, D] -> [C, D]
            dw = dw + _matmul(g, h, (0, 0), jnp.float32)  # [C, V] x [C, D] -> [V, D]
        return dw, dh.astype(dtype)

    c = st.chunk_size
    # Padded rows have label -1 and zero cotangents, so their g is exactly 0.
    xs = (_chunked(hidden, c, 0), _chunked(labels, c, -1), _chunked(lse, c, 0),
          _chunked(dloss.astype(jnp.float32), c, 0), _chunked(dlse.astype(jnp.float32), c, 0))
    dw, dh = lax.scan(chunk, jnp.zeros(weight.shape, jnp.float32), xs)
    return _unchunked(dh, hidden.shape[0]), dw.astype(weight.dtype)


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lce(hidden, weight, labels, st: _Static):
    return _forward(hidden, weight, labels, st)


def _lce_fwd(hidden, weight, labels, st):
    loss, lse = _forward(hidden, weight, labels, st)
    return (loss, lse), (hidden, weight, labels, lse)


def _lce_bwd(st, residuals, cotangents):
    hidden, weight, labels, lse = residuals
    dloss, dlse = cotangents
    if st.backward == "reference":
        _, vjp = jax.vjp(lambda h, w: linear_cross_entropy_reference(
            h, w, labels, weight_layout=st.weight_layout), hidden, weight)
        dh, dw = vjp((dloss, dlse))
    else:
        dh, dw = _backward(hidden, weight, labels, lse, dloss, dlse, st)
    return dh, dw, None


_lce.defvjp(_lce_fwd, _lce_bwd)


# ----------------------------------------------------------------------------- public wrapper


@functools.partial(jax.jit, static_argnames=("weight_layout", "chunk_size", "logits_dtype",
                                             "backward"))
def linear_cross_entropy(hidden, weight, labels, *, weight_layout: str = "DV",
                         chunk_size: int | None = None, logits_dtype: Any = jnp.float32,
                         backward: str = "chunked"):
    """Per-token softmax cross-entropy of ``hidden @ W`` against ``labels``, computed
    ``chunk_size`` tokens at a time so that the ``[N, V]`` logits never exist as one array.

    Args:
      hidden: ``[N, D]`` float (flatten batch and time first).
      weight: ``[D, V]`` with ``weight_layout="DV"`` (an output projection's kernel), or
        ``[V, D]`` with ``weight_layout="VD"`` (a tied embedding table, contracted on its D
        axis in place: no transposed copy). Same dtype as ``hidden`` (cast the parameter the
        way the model's own matmuls do: this function never picks a precision for you).
      labels: ``[N]`` int. A label outside ``[0, V)`` (``-1`` for padding or prompt tokens)
        marks an ignored token: its loss is 0 and its loss cotangent is dropped.
      weight_layout: ``"DV"`` or ``"VD"``, see ``weight``.
      chunk_size: tokens per chunk (an int >= 1; values > N act as N); None picks
        `default_chunk_size` (the largest power of two with at most 2**26 logits per chunk,
        256 MiB in f32).
        Changes memory and speed, not the numbers beyond f32 summation order.
      logits_dtype: dtype the logits leave the matmul in (f32 accumulation either way);
        the softmax is computed in f32 regardless. f32 by default.
      backward: ``"chunked"``, or ``"reference"`` (differentiate the materialising reference;
        debugging only).

    Returns:
      ``(loss [N] f32, lse [N] f32)``. ``lse`` is the row's log-sum-exp for every token,
      ignored ones included, and its cotangent flows for every token (a z-loss must apply its
      own mask). Differentiable w.r.t. ``hidden`` and ``weight`` (gradients in their dtypes).

    Raises:
      ValueError naming the argument when shapes, dtypes or options are invalid.
    """
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, D], got {hidden.shape=}")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout=}")
    d_axis = 0 if weight_layout == "DV" else 1
    if weight.ndim != 2 or weight.shape[d_axis] != hidden.shape[1]:
        raise ValueError(f"weight must be [{'D, V' if d_axis == 0 else 'V, D'}] with "
                         f"D={hidden.shape[1]} ({weight_layout=}), got {weight.shape=}")
    if not jnp.issubdtype(hidden.dtype, jnp.floating) or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got "
                         f"{hidden.dtype=} and {weight.dtype=}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N={hidden.shape[0]}], got {labels.shape=}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must hold integers, got {labels.dtype=}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer))
                                   or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size=!r}")
    if not jnp.issubdtype(logits_dtype, jnp.floating):
        raise ValueError(f"logits_dtype must be a floating dtype, got {logits_dtype=}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward=}")
    n, v = hidden.shape[0], weight.shape[1 - d_axis]
    chunk = default_chunk_size(n, v) if chunk_size is None else min(int(chunk_size), max(n, 1))
    st = _Static(weight_layout=weight_layout, chunk_size=chunk,
                 logits_dtype=jnp.dtype(logits_dtype).name, backward=backward)
    # Labels of 2**31 and beyond cannot be in range (V < 2**31); clip before narrowing so a
    # wide out-of-range label can not wrap into the vocabulary.
    labels = jnp.clip(labels, -1, np.iinfo(np.int32).max).astype(jnp.int32)
    return _lce(hidden, weight, labels, st)


# ----------------------------------------------------------------------------- reference


def linear_cross_entropy_reference(hidden, weight, labels, *, weight_layout: str = "DV",
                                   compute_dtype=None):
    """The plain head: materialised logits, log_softmax, the label's log-probability.

    Computes in ``compute_dtype`` (None: f32, or f64 for f64 inputs) at HIGHEST precision;
    running it in the inputs' own low precision measures what that precision alone costs (the
    tolerance policy's yardstick). Shares no code with the chunked version. Returns
    ``(loss [N], lse [N])`` in f32 (f64 when computing in f64); loss is 0 for labels outside
    ``[0, V)``.
    """
    acc = compute_dtype or (jnp.float64 if hidden.dtype == jnp.float64 else jnp.float32)
    w = weight if weight_layout == "DV" else weight.T
    logits = jnp.einsum("nd,dv->nv", hidden.astype(acc), w.astype(acc),
                        precision=lax.Precision.HIGHEST)
    logp = jax.nn.log_softmax(logits, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab_size = logits.shape[1]
    ok = (labels >= 0) & (labels < vocab_size)
    label_logp = jnp.take_along_axis(logp, jnp.where(ok, labels, 0)[:, None], axis=1)[:, 0]
    out = jnp.float64 if acc == jnp.float64 else jnp.float32
    return jnp.where(ok, -label_logp, 0.0).astype(out), lse.astype(out)
