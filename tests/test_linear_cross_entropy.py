"""Chunked linear + cross-entropy (fastattn/_linear_cross_entropy.py) against the plain head.

The oracle is the materialising reference in float64; the chunked version's error must stay
within the tolerance policy (tests/tolerance.py) of the reference run in the inputs' dtype,
for loss, lse and both gradients. Gradients are taken of a weighted sum of loss and lse with
random per-token weights, so every token's cotangents differ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastattn._linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from tests.tolerance import assert_within_policy


def _problem(N, D, V, *, dtype="float32", layout="DV", ignored=(), seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((N, D)), dtype)
    # Logits of std ~2, so that the softmax is neither flat nor one-hot.
    weight = rng.standard_normal((D, V)) * (2.0 / np.sqrt(D))
    weight = jnp.asarray(weight if layout == "DV" else weight.T, dtype)
    labels = rng.integers(0, V, N).astype(np.int32)
    labels[list(ignored)] = -1
    token_weights = jnp.asarray(rng.uniform(0.5, 2.0, N), jnp.float32)
    lse_weights = jnp.asarray(rng.uniform(-0.5, 0.5, N), jnp.float32)
    return hidden, weight, jnp.asarray(labels), token_weights, lse_weights


def _objective(fn, labels, token_weights, lse_weights):
    """A scalar of (hidden, weight) whose cotangents on loss and lse vary per token."""
    def f(hidden, weight):
        loss, lse = fn(hidden, weight, labels)
        return (jnp.sum(loss * token_weights.astype(loss.dtype))
                + jnp.sum(lse * lse_weights.astype(lse.dtype)))
    return f


def _oracle(hidden, weight, labels, token_weights, lse_weights, layout):
    """(loss, lse, d_hidden, d_weight) of the reference in float64."""
    with jax.enable_x64(True):
        h, w = (jnp.asarray(np.asarray(x, np.float64)) for x in (hidden, weight))
        ref = lambda h_, w_, y: linear_cross_entropy_reference(h_, w_, y, weight_layout=layout)
        loss, lse = ref(h, w, labels)
        f = _objective(ref, labels, jnp.asarray(token_weights, jnp.float64),
                       jnp.asarray(lse_weights, jnp.float64))
        dh, dw = jax.grad(f, argnums=(0, 1))(h, w)
        return tuple(np.asarray(x) for x in (loss, lse, dh, dw))


def _low_precision(hidden, weight, labels, token_weights, lse_weights, layout):
    """The same reference computed in the inputs' own dtype (the policy's yardstick)."""
    ref = lambda h_, w_, y: linear_cross_entropy_reference(h_, w_, y, weight_layout=layout,
                                                           compute_dtype=hidden.dtype)
    loss, lse = ref(hidden, weight, labels)
    dh, dw = jax.grad(_objective(ref, labels, token_weights, lse_weights),
                      argnums=(0, 1))(hidden, weight)
    return loss, lse, dh, dw


CASES = [  # N, D, V, dtype, layout, chunk_size
    (37, 16, 50, "float32", "DV", 8),  # N not a multiple of the chunk
    (64, 32, 96, "float32", "VD", 16),
    (5, 8, 33, "float32", "DV", 1),  # one token per chunk
    (20, 16, 40, "float32", "VD", 100),  # chunk > N
    (48, 64, 256, "bfloat16", "DV", 16),
    (33, 40, 97, "bfloat16", "VD", None),  # default chunk (one chunk at this size)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}d{c[1]}v{c[2]}-{c[3]}-{c[4]}-c{c[5]}")
def test_loss_lse_and_gradients_within_policy(case):
    N, D, V, dtype, layout, chunk = case
    hidden, weight, labels, tw, lw = _problem(N, D, V, dtype=dtype, layout=layout,
                                              ignored=(0, N // 2))
    fn = lambda h, w, y: linear_cross_entropy(h, w, y, weight_layout=layout, chunk_size=chunk)
    loss, lse = fn(hidden, weight, labels)
    dh, dw = jax.grad(_objective(fn, labels, tw, lw), argnums=(0, 1))(hidden, weight)
    assert loss.dtype == lse.dtype == jnp.float32 and loss.shape == lse.shape == (N,)
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype and dw.shape == weight.shape
    oracle = _oracle(hidden, weight, labels, tw, lw, layout)
    low = _low_precision(hidden, weight, labels, tw, lw, layout)
    for name, actual, o, lo, factor in zip(("loss", "lse", "d_hidden", "d_weight"),
                                           (loss, lse, dh, dw), oracle, low, (2, 2, 3, 3)):
        assert_within_policy(name, np.asarray(actual), o, np.asarray(lo), dtype=dtype,
                             factor=factor)


def test_f32_agrees_tightly_with_f32_reference_for_every_chunk_size():
    hidden, weight, labels, tw, lw = _problem(29, 24, 70, ignored=(3,))
    want = linear_cross_entropy_reference(hidden, weight, labels)
    want_grads = jax.grad(_objective(linear_cross_entropy_reference, labels, tw, lw),
                          argnums=(0, 1))(hidden, weight)
    for chunk in (1, 4, 7, 29, 64, None):
        fn = lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=chunk)
        got = fn(hidden, weight, labels)
        grads = jax.grad(_objective(fn, labels, tw, lw), argnums=(0, 1))(hidden, weight)
        for a, b in zip(got + grads, want + want_grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6,
                                       err_msg=f"chunk_size={chunk}")


def test_ignored_labels_give_zero_loss_and_no_loss_gradient():
    N, V = 12, 30
    hidden, weight, labels, tw, _ = _problem(N, 16, V)
    ignored = np.array([0, 5, 6, 11])
    labels = labels.at[ignored].set(jnp.array([-1, V, -100, V + 7], jnp.int32))
    loss, lse = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert np.all(np.asarray(loss)[ignored] == 0.0)
    # lse stays the row's real log-sum-exp, ignored or not.
    np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(
        jnp.dot(hidden, weight, precision="highest"), axis=1)), rtol=1e-6)
    f = lambda h, w: jnp.sum(linear_cross_entropy(h, w, labels, chunk_size=4)[0] * tw)
    dh, dw = jax.grad(f, argnums=(0, 1))(hidden, weight)
    assert np.all(np.asarray(dh)[ignored] == 0.0)
    # Same gradients as if the ignored tokens were not there at all.
    keep = np.setdiff1d(np.arange(N), ignored)
    g = lambda h, w: jnp.sum(linear_cross_entropy(h, w, labels[keep], chunk_size=4)[0] * tw[keep])
    dh_kept, dw_kept = jax.grad(g, argnums=(0, 1))(hidden[keep], weight)
    np.testing.assert_allclose(np.asarray(dh)[keep], np.asarray(dh_kept), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_kept), rtol=1e-5, atol=1e-6)


def test_embedding_layout_equals_projection_layout():
    hidden, weight, labels, tw, lw = _problem(21, 16, 44)
    out = {}
    for layout, w in (("DV", weight), ("VD", weight.T)):
        fn = lambda h, w_, y: linear_cross_entropy(h, w_, y, weight_layout=layout, chunk_size=8)
        out[layout] = fn(hidden, w, labels) + jax.grad(
            _objective(fn, labels, tw, lw), argnums=(0, 1))(hidden, w)
    for a, b in zip(out["DV"][:3], out["VD"][:3]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["DV"][3]), np.asarray(out["VD"][3]).T, rtol=1e-5,
                               atol=1e-6)


def test_grad_under_jit_matches_eager_and_is_deterministic():
    hidden, weight, labels, tw, lw = _problem(40, 32, 64, dtype="bfloat16", layout="VD")
    fn = lambda h, w, y: linear_cross_entropy(h, w, y, weight_layout="VD", chunk_size=16)
    f = _objective(fn, labels, tw, lw)
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    first, second = step(hidden, weight), step(hidden, weight)
    eager = jax.value_and_grad(f, argnums=(0, 1))(hidden, weight)
    for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(second), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32),
                                   rtol=1e-2, atol=1e-3)


def test_reference_backward_switch_agrees():
    hidden, weight, labels, tw, lw = _problem(18, 16, 30, ignored=(2,))
    grads = {}
    for backward in ("chunked", "reference"):
        fn = lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=5, backward=backward)
        grads[backward] = jax.grad(_objective(fn, labels, tw, lw), argnums=(0, 1))(hidden, weight)
    for a, b in zip(grads["chunked"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_bf16_logits_dtype_stays_close():
    hidden, weight, labels, _, _ = _problem(24, 32, 80)
    loss, lse = linear_cross_entropy(hidden, weight, labels, chunk_size=8,
                                     logits_dtype=jnp.bfloat16)
    want_loss, want_lse = linear_cross_entropy_reference(hidden, weight, labels)
    # bf16 logits carry 8 significant bits: |error| <= 2**-8 * |logit| per logit.
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=0.1)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(want_loss), atol=0.1)


def _hlo_texts(fn, hidden, weight, labels):
    f = jax.value_and_grad(lambda h, w: jnp.sum(sum(fn(h, w, labels))), argnums=(0, 1))
    lowered = jax.jit(f).lower(hidden, weight)
    return lowered.as_text(), lowered.compile().as_text()


def test_full_logits_are_never_materialised():
    """Neither the lowered program nor XLA's optimised HLO of forward + backward holds an
    array of the full logits' shape [N, V] (nor the chunks stacked, [C, chunk, V]); the
    plain reference does, which shows that the search finds such arrays."""
    N, D, V, chunk = 64, 32, 96, 16
    hidden, weight, labels, _, _ = _problem(N, D, V)
    full = [f"{N}x{V}x", f"{N // chunk}x{chunk}x{V}x", f"[{N},{V}]", f"[{N // chunk},{chunk},{V}]"]
    reference_text = "".join(_hlo_texts(linear_cross_entropy_reference, hidden, weight, labels))
    assert f"{N}x{V}x" in reference_text and f"[{N},{V}]" in reference_text
    for layout, w in (("DV", weight), ("VD", weight.T)):
        fn = lambda h, w_, y: linear_cross_entropy(h, w_, y, weight_layout=layout,
                                                   chunk_size=chunk)
        text = "".join(_hlo_texts(fn, hidden, w, labels))
        assert f"{chunk}x{V}x" in text  # the chunk's logits are there, at their own size
        for shape in full:
            assert shape not in text, f"{layout}: found an array of shape {shape}"


def test_default_chunk_size():
    assert default_chunk_size(16384, 128256) == 512  # 2**26 // V = 523 -> 512 rows, 256 MB f32
    assert default_chunk_size(16384, 32000) == 2048
    assert default_chunk_size(100, 32000) == 100  # one chunk
    assert default_chunk_size(10, 2**27) == 1


def _bad(**changes):
    hidden, weight, labels, _, _ = _problem(8, 4, 10)
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update(changes)
    return args


BAD = {
    "hidden must be": _bad(hidden=jnp.zeros((8, 4, 1))),
    "weight must be \\[D, V\\]": _bad(weight=jnp.zeros((5, 10))),
    "weight must be \\[V, D\\]": _bad(weight=jnp.zeros((4, 10)), weight_layout="VD"),
    "weight_layout": _bad(weight_layout="VDV"),
    "share one floating dtype": _bad(weight=jnp.zeros((4, 10), jnp.bfloat16)),
    "labels must be \\[N=8\\]": _bad(labels=jnp.zeros((7,), jnp.int32)),
    "labels must hold integers": _bad(labels=jnp.zeros((8,), jnp.float32)),
    "chunk_size": _bad(chunk_size=0),
    "chunk_size=2.0": _bad(chunk_size=2.0),
    "logits_dtype": _bad(logits_dtype=jnp.int32),
    "backward": _bad(backward="pallas"),
}


@pytest.mark.parametrize("match", BAD)
def test_bad_input_raises_naming_the_field(match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(**BAD[match])
