"""Tests of fastattn._xla_attention against a naive, fully materialised oracle.

The oracle (``_oracle``) computes outputs and hand-derived gradients with the
whole ``[T, S]`` score matrix. Run with numpy float64 it is the reference; its
gradients are themselves checked against finite differences. Run with jnp in
bfloat16/float16 it measures how much error a naive low-precision computation
makes, which sets the tolerance for low-precision inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastattn._xla_attention import xla_attention

F32_TOL = 1e-4  # max abs error relative to max |reference|
LOW_PRECISION_FLOOR = 1e-3  # policy: err <= 2 * err(naive low-prec) + floor


def _visible_np(xp, T, S, q_seg, kv_seg, causal, window_left, window_right):
    """Mask ``[B or 1, 1, T, S]`` written straight from the spec."""
    pos = xp.arange(T)[:, None] + (S - T)
    j = xp.arange(S)[None, :]
    vis = xp.ones((T, S), bool)
    if causal:
        vis = vis & (j <= pos)
    if window_left is not None:
        vis = vis & (j >= pos - window_left)
    if window_right is not None:
        vis = vis & (j <= pos + window_right)
    vis = vis[None, None]
    if q_seg is not None:
        vis = vis & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    return vis


def _oracle(xp, q, k, v, d_out, d_lse, *, q_seg=None, kv_seg=None,
            causal=False, window_left=None, window_right=None, softcap=None,
            scale=None):
    """Naive attention and its gradients in the dtype of the inputs.

    ``xp`` is numpy or jax.numpy. Returns (out, lse, dq, dk, dv) for the
    cotangents ``d_out`` [B, T, N, H] and ``d_lse`` [B, N, T].
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    # A Python float: a numpy scalar would promote low-precision jnp arrays.
    scale = 1.0 / float(np.sqrt(H)) if scale is None else scale
    kr = xp.repeat(k, G, axis=2)
    vr = xp.repeat(v, G, axis=2)
    s = xp.einsum("btnh,bsnh->bnts", q, kr) * scale
    if softcap is not None:
        s = softcap * xp.tanh(s / softcap)
    vis = _visible_np(xp, T, S, q_seg, kv_seg, causal, window_left,
                      window_right)
    masked = xp.where(vis, s, -np.inf)
    m = xp.max(masked, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    e = xp.where(vis, xp.exp(masked - m), 0)
    l = xp.sum(e, axis=-1, keepdims=True)
    l_safe = xp.where(l > 0, l, 1)
    p = e / l_safe
    out = xp.einsum("bnts,bsnh->btnh", p, vr)
    lse = xp.where(l[..., 0] > 0, m[..., 0] + xp.log(l_safe[..., 0]), -np.inf)

    dp = xp.einsum("btnh,bsnh->bnts", d_out, vr)
    delta = xp.einsum("btnh,btnh->bnt", d_out, out)
    ds = p * (dp - delta[..., None] + d_lse[..., None])
    if softcap is not None:
        ds = ds * (1 - (s / softcap) ** 2)
    ds = xp.where(vis, ds, 0) * scale
    dq = xp.einsum("bnts,bsnh->btnh", ds, kr)
    dk = xp.einsum("bnts,btnh->bsnh", ds, q).reshape(B, S, K, G, H).sum(3)
    dv = xp.einsum("bnts,btnh->bsnh", p, d_out).reshape(B, S, K, G, H).sum(3)
    return out, lse, dq, dk, dv


@functools.partial(jax.jit, static_argnames=("opts",))
def _run(q, k, v, q_seg, kv_seg, d_out, d_lse, opts):
    """xla_attention outputs and VJP for cotangents (d_out, d_lse)."""
    def f(q, k, v):
        return xla_attention(q, k, v, q_segment_ids=q_seg,
                             kv_segment_ids=kv_seg, **dict(opts))
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse) + vjp((d_out, d_lse))


def _make_inputs(seed, B, T, S, N, K, H, dtype, segments):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in [(B, T, N, H), (B, S, K, H), (B, S, K, H)])
    d_out = rng.standard_normal((B, T, N, H)).astype(np.float32)
    d_lse = rng.standard_normal((B, N, T)).astype(np.float32)
    # Round through the test dtype so oracle and implementation see the same
    # numbers.
    q, k, v, d_out = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
                      for x in (q, k, v, d_out))
    q_seg = kv_seg = None
    if segments:
        # Packed sequences: sorted ids; the last query row gets an id absent
        # from the keys, so it sees no key at all.
        q_seg = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        kv_seg = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
        q_seg[:, -1] = 7
    return q, k, v, d_out, d_lse, q_seg, kv_seg


def _check_close(name, got, ref, atol):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, name
    assert np.all(np.isfinite(got) == np.isfinite(ref)), name
    assert np.all(got[~np.isfinite(ref)] == ref[~np.isfinite(ref)]), name
    finite = np.isfinite(ref)
    err = np.max(np.abs(got[finite] - ref[finite]), initial=0.0)
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:.3g}"


def _finite_max(x):
    x = np.asarray(x, np.float64)
    return np.max(np.abs(x[np.isfinite(x)]), initial=0.0)


def _opts(**kw):
    return tuple(sorted(kw.items()))


LENGTHS = [(1, 1), (17, 17), (17, 97), (97, 17), (113, 113)]
CONFIGS = {
    "plain": dict(N=2, K=2, H=8),
    "gqa2-causal": dict(N=4, K=2, H=8, causal=True),
    "gqa4-causal-window-softcap": dict(N=4, K=1, H=40, causal=True,
                                       window_left=9, softcap=5.0),
    "gqa2-two-sided-window-segments": dict(N=4, K=2, H=8, window_left=7,
                                           window_right=3, segments=True),
    "gqa4-softcap-segments-scale": dict(N=8, K=2, H=111, softcap=3.0,
                                        scale=0.3, segments=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T,S", LENGTHS)
def test_matches_float64_oracle(T, S, name):
    cfg = dict(CONFIGS[name])
    N, K, H = cfg.pop("N"), cfg.pop("K"), cfg.pop("H")
    segments = cfg.pop("segments", False)
    q, k, v, d_out, d_lse, q_seg, kv_seg = _make_inputs(
        0, 2, T, S, N, K, H, jnp.float32, segments)
    got = _run(q, k, v, q_seg, kv_seg, d_out, d_lse,
               _opts(chunk_size=16, **cfg))
    ref = _oracle(np, *(x.astype(np.float64) for x in (q, k, v, d_out, d_lse)),
                  q_seg=q_seg, kv_seg=kv_seg, **cfg)
    for label, g, r in zip(["out", "lse", "dq", "dk", "dv"], got, ref):
        assert g.dtype == (jnp.float32 if label == "lse" else q.dtype)
        _check_close(label, g, r, F32_TOL * _finite_max(r))


@pytest.mark.parametrize("T,S,name,dtype", [
    (17, 97, "gqa2-causal", jnp.bfloat16),
    (113, 113, "gqa4-softcap-segments-scale", jnp.bfloat16),
    (97, 17, "gqa2-two-sided-window-segments", jnp.bfloat16),
    (113, 113, "gqa4-softcap-segments-scale", jnp.float16),
])
def test_low_precision_within_policy(T, S, name, dtype):
    """err <= 2 * err(naive oracle run in ``dtype``) + 1e-3 * max|ref|."""
    cfg = dict(CONFIGS[name])
    N, K, H = cfg.pop("N"), cfg.pop("K"), cfg.pop("H")
    segments = cfg.pop("segments", False)
    q, k, v, d_out, d_lse, q_seg, kv_seg = _make_inputs(
        1, 2, T, S, N, K, H, dtype, segments)
    low = [jnp.asarray(x, dtype) for x in (q, k, v, d_out)]
    got = _run(*low[:3], q_seg, kv_seg, low[3], d_lse,
               _opts(chunk_size=16, **cfg))
    ref = _oracle(np, *(x.astype(np.float64) for x in (q, k, v, d_out, d_lse)),
                  q_seg=q_seg, kv_seg=kv_seg, **cfg)
    naive = jax.jit(functools.partial(_oracle, jnp, **cfg))(
        *low, jnp.asarray(d_lse, dtype), q_seg=q_seg, kv_seg=kv_seg)
    for label, g, r, n in zip(["out", "lse", "dq", "dk", "dv"], got, ref,
                              naive):
        assert g.dtype == (jnp.float32 if label == "lse" else dtype)
        assert n.dtype == dtype  # the naive run really is low precision
        n = np.asarray(n, np.float64)
        finite = np.isfinite(r)
        naive_err = np.max(np.abs(n[finite] - r[finite]), initial=0.0)
        _check_close(label, g, r, 2 * naive_err
                     + LOW_PRECISION_FLOOR * _finite_max(r))


def test_oracle_gradients_match_finite_differences():
    """The float64 oracle's hand-written backward is the derivative of
    <out, d_out> + <lse, d_lse>."""
    rng = np.random.default_rng(2)
    B, T, S, N, K, H = 1, 3, 5, 4, 2, 3
    cfg = dict(causal=True, window_left=3, softcap=2.0, scale=0.7)
    q, k, v = (rng.standard_normal(s) for s in
               [(B, T, N, H), (B, S, K, H), (B, S, K, H)])
    d_out = rng.standard_normal((B, T, N, H))
    d_lse = rng.standard_normal((B, N, T))

    def loss(q, k, v):
        out, lse = _oracle(np, q, k, v, d_out, d_lse, **cfg)[:2]
        return np.sum(out * d_out) + np.sum(lse * d_lse)

    grads = _oracle(np, q, k, v, d_out, d_lse, **cfg)[2:]
    eps = 1e-6
    for i, (x, g) in enumerate(zip((q, k, v), grads)):
        direction = rng.standard_normal(x.shape)
        args_p = [q, k, v]
        args_m = [q, k, v]
        args_p[i] = x + eps * direction
        args_m[i] = x - eps * direction
        numeric = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        np.testing.assert_allclose(np.sum(g * direction), numeric, rtol=1e-6)


def test_fully_masked_rows():
    """Rows that see no key: out == 0, lse == -inf, zero gradients, and no
    effect on the other rows (checked against the oracle)."""
    T, S, N, K, H = 40, 24, 4, 2, 8
    q, k, v, d_out, d_lse, _, _ = _make_inputs(3, 2, T, S, N, K, H,
                                               jnp.float32, False)
    # Causal with T > S: rows i < T - S see no key; segment id 9 (absent from
    # the keys) additionally hides rows 30..34 of batch 1.
    q_seg = np.zeros((2, T), np.int32)
    q_seg[1, 30:35] = 9
    kv_seg = np.zeros((2, S), np.int32)
    hidden = np.zeros((2, T), bool)
    hidden[:, :T - S] = True
    hidden[1, 30:35] = True
    out, lse, dq, dk, dv = _run(q, k, v, q_seg, kv_seg, d_out, d_lse,
                                _opts(causal=True, chunk_size=16))
    out, lse, dq = (np.asarray(x) for x in (out, lse, dq))
    assert np.all(out[hidden] == 0)
    assert np.all(lse.transpose(0, 2, 1)[hidden] == -np.inf)
    assert np.all(np.isfinite(lse.transpose(0, 2, 1)[~hidden]))
    assert np.all(dq[hidden] == 0)
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(x))
    ref = _oracle(np, *(x.astype(np.float64) for x in (q, k, v, d_out, d_lse)),
                  q_seg=q_seg, kv_seg=kv_seg, causal=True)
    for label, g, r in zip(["out", "lse", "dq", "dk", "dv"],
                           (out, lse, dq, dk, dv), ref):
        _check_close(label, g, r, F32_TOL * _finite_max(r))


@pytest.mark.parametrize("chunk_size", [16, 512])
def test_nan_in_invisible_inputs_is_ignored(chunk_size):
    """NaN/Inf in K/V at keys no query sees, and in q/d_out at rows that see
    no key, change no output or gradient bit."""
    T, S, N, K, H = 20, 45, 4, 2, 8
    q, k, v, d_out, d_lse, _, _ = _make_inputs(4, 2, T, S, N, K, H,
                                               jnp.float32, False)
    # Window: queries sit at positions 25..44 and see keys >= 25 - 6 = 19;
    # segment ids hide keys 30..33 and query rows 0..2 (id 5 is not a key id).
    kv_seg = np.zeros((2, S), np.int32)
    kv_seg[:, 30:34] = 3
    q_seg = np.zeros((2, T), np.int32)
    q_seg[:, :3] = 5
    opts = _opts(causal=True, window_left=6, chunk_size=chunk_size)
    dead_keys = np.r_[0:19, 30:34]
    dead_rows = np.r_[0:3]

    k_bad, v_bad, q_bad, d_out_bad = k.copy(), v.copy(), q.copy(), d_out.copy()
    k_bad[:, dead_keys] = np.nan
    v_bad[:, dead_keys[::2]] = np.inf
    v_bad[:, dead_keys[1::2]] = np.nan
    q_bad[:, dead_rows] = np.nan
    d_out_bad[:, dead_rows] = np.nan

    clean = _run(q, k, v, q_seg, kv_seg, d_out, d_lse, opts)
    dirty = _run(q_bad, k_bad, v_bad, q_seg, kv_seg, d_out_bad, d_lse, opts)
    for label, c, d in zip(["out", "lse", "dq", "dk", "dv"], clean, dirty):
        np.testing.assert_array_equal(np.asarray(c), np.asarray(d),
                                      err_msg=label)
    _, _, dq, dk, dv = (np.asarray(x) for x in dirty)
    assert np.all(dk[:, dead_keys] == 0) and np.all(dv[:, dead_keys] == 0)
    assert np.all(dq[:, dead_rows] == 0)
    for x in dirty:
        assert np.all(~np.isnan(np.asarray(x)))


def test_deterministic():
    """Two independently compiled runs agree bitwise."""
    args = _make_inputs(5, 2, 50, 70, 4, 1, 16, jnp.float32, True)
    q, k, v, d_out, d_lse, q_seg, kv_seg = args
    opts = _opts(causal=True, softcap=4.0, chunk_size=16)
    first = _run(q, k, v, q_seg, kv_seg, d_out, d_lse, opts)
    jax.clear_caches()
    second = _run(q, k, v, q_seg, kv_seg, d_out, d_lse, opts)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grad_of_out_only_under_jit():
    """jax.grad through ``out`` alone (lse unused) under jit with static
    options, default chunk size, matches the oracle with d_lse = 0."""
    q, k, v, d_out, _, q_seg, kv_seg = _make_inputs(6, 1, 30, 30, 2, 1, 8,
                                                     jnp.float32, True)

    @jax.jit
    def loss(q, k, v):
        out, _ = xla_attention(q, k, v, q_segment_ids=q_seg,
                               kv_segment_ids=kv_seg, window_right=0)
        return jnp.sum(out * d_out)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    ref = _oracle(np, *(x.astype(np.float64) for x in (q, k, v, d_out)),
                  np.zeros((1, 2, 30)), q_seg=q_seg, kv_seg=kv_seg,
                  window_right=0)[2:]
    for label, g, r in zip(["dq", "dk", "dv"], grads, ref):
        _check_close(label, g, r, F32_TOL * _finite_max(r))
