"""Fused SwiGLU first half (pallas_kernels/fused_swiglu.py) against a float64 oracle
(tests/tolerance.py): M, D, F off the tiles, the ragged end of D, grouped tile order, gradients
of x, w_gate, w_up through jax.vjp, no [M, F] residuals, determinism, leading dims, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_swiglu import SwigluBlockSizes, swiglu, swiglu_reference
from tests.tolerance import assert_within_policy

# 16-row tiles in groups of 2: M = 33 gives tile rows 0-1 in one group and a short last group.
SMALL = SwigluBlockSizes(block_m=16, block_f=32, block_d=16, num_warps=4, num_stages=2,
                         group_m=2)


def _inputs(x_shape, F, dtype, seed=0):
    rng = np.random.default_rng(seed)
    D = x_shape[-1]
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w_gate = jnp.asarray(rng.standard_normal((D, F)) / np.sqrt(D), dtype)
    w_up = jnp.asarray(rng.standard_normal((D, F)) / np.sqrt(D), dtype)
    return x, w_gate, w_up


def _f64(a):
    return jnp.asarray(np.asarray(a, np.float64))


CASES = [  # x shape [..., D], F, dtype, block sizes
    ((17, 40), 200, "float32", SMALL),      # D = 2.5 chunks: the masked tail of D
    ((33, 96), 72, "bfloat16", SMALL),      # 3 tile rows, F = 2.25 tiles
    ((1, 200), 48, "bfloat16", None),       # decode-like: one row, default tiles
    ((3, 11, 40), 100, "float32", None),    # leading dims, default tiles
    ((33, 64), 40, "float16", SwigluBlockSizes(block_m=32, block_f=16, block_d=64, group_m=8)),
]


def _ids(case):
    x_shape, F, dtype, bs = case
    return f"{'x'.join(map(str, x_shape))}-f{F}-{dtype}-{'small' if bs else 'default'}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_matches_float64_oracle(case):
    x_shape, F, dtype, bs = case
    x, w_gate, w_up = _inputs(x_shape, F, dtype)
    h = swiglu(x, w_gate, w_up, block_sizes=bs)
    with jax.enable_x64(True):
        oracle = np.asarray(swiglu_reference(_f64(x), _f64(w_gate), _f64(w_up)))
    low = np.asarray(swiglu_reference(x, w_gate, w_up))
    assert h.shape == x_shape[:-1] + (F,) and h.dtype == x.dtype
    assert_within_policy("h", np.asarray(h), oracle, low, dtype=dtype, factor=2)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients_match_float64_oracle(case):
    x_shape, F, dtype, bs = case
    x, w_gate, w_up = _inputs(x_shape, F, dtype)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(x_shape[:-1] + (F,)), dtype)
    _, vjp = jax.vjp(lambda *a: swiglu(*a, block_sizes=bs), x, w_gate, w_up)
    got = vjp(ct)
    with jax.enable_x64(True):
        _, vjp64 = jax.vjp(swiglu_reference, _f64(x), _f64(w_gate), _f64(w_up))
        oracle = [np.asarray(g) for g in vjp64(_f64(ct))]
    low = jax.vjp(swiglu_reference, x, w_gate, w_up)[1](ct)
    for name, g, o, lo, a in zip(("x", "w_gate", "w_up"), got, oracle, low, (x, w_gate, w_up)):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        assert_within_policy(f"d_{name}", np.asarray(g), o, np.asarray(lo), dtype=dtype,
                             factor=3)


def test_reference_backward_switch_agrees():
    x, w_gate, w_up = _inputs((9, 40), 24, "float32")
    ct = jnp.ones((9, 24), jnp.float32)
    grads = {}
    for backward in ("xla", "reference"):
        _, vjp = jax.vjp(lambda *a, b=backward: swiglu(*a, backward=b), x, w_gate, w_up)
        grads[backward] = vjp(ct)
    for a, b in zip(grads["xla"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_backward_keeps_no_gate_or_up():
    """The point of the fusion for training: only x and the weights live until the backward,
    never an [M, F] intermediate (the unfused reference keeps several)."""
    M, D, F = 24, 40, 72
    x, w_gate, w_up = _inputs((M, D), F, "bfloat16")
    _, vjp = jax.vjp(lambda *a: swiglu(*a, block_sizes=SMALL), x, w_gate, w_up)
    saved = sorted(leaf.shape for leaf in jax.tree_util.tree_leaves(vjp))
    assert saved == sorted([(M, D), (D, F), (D, F)]), saved
    _, vjp_reference = jax.vjp(swiglu_reference, x, w_gate, w_up)
    assert (M, F) in [leaf.shape for leaf in jax.tree_util.tree_leaves(vjp_reference)]


def test_two_runs_are_bitwise_identical():
    x, w_gate, w_up = _inputs((33, 96), 72, "bfloat16")

    def run():
        h, vjp = jax.vjp(lambda *a: swiglu(*a, block_sizes=SMALL), x, w_gate, w_up)
        return [np.asarray(a) for a in (h, *vjp(h))]

    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


def test_leading_dims_are_rows():
    x, w_gate, w_up = _inputs((2, 3, 5, 40), 48, "float32")
    h = swiglu(x, w_gate, w_up, block_sizes=SMALL)
    flat = swiglu(x.reshape(30, 40), w_gate, w_up, block_sizes=SMALL)
    np.testing.assert_array_equal(np.asarray(h).reshape(30, 48), np.asarray(flat))


BAD = [  # x shape, w_gate shape, w_up shape, dtypes, message fragment
    ((4, 8), (9, 16), (9, 16), ("float32",) * 3, "w_gate.shape=(9, 16)"),
    ((4, 8), (8, 16), (8, 12), ("float32",) * 3, "w_up.shape=(8, 12)"),
    ((4, 8), (8,), (8,), ("float32",) * 3, "w_gate.shape=(8,)"),
    ((4, 8), (8, 16), (8, 16), ("bfloat16", "float32", "float32"), "x.dtype=bfloat16"),
    ((4, 8), (8, 16), (8, 16), ("int32",) * 3, "x.dtype=int32"),
    ((0, 8), (8, 16), (8, 16), ("float32",) * 3, "x.shape=(0, 8)"),
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b[-1])
def test_bad_inputs_raise_naming_the_field(bad):
    xs, gs, us, (xd, gd, ud), fragment = bad
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        swiglu(jnp.zeros(xs, xd), jnp.zeros(gs, gd), jnp.zeros(us, ud))


@pytest.mark.parametrize("kwargs", [dict(block_m=8), dict(block_f=48), dict(block_d=0),
                                    dict(num_warps=3), dict(num_stages=0), dict(group_m=0)])
def test_bad_block_sizes_raise(kwargs):
    with pytest.raises(ValueError, match=f"SwigluBlockSizes.{next(iter(kwargs))}"):
        SwigluBlockSizes(**kwargs)


def test_default_block_sizes():
    big = SwigluBlockSizes.default_for(rows=8192, width=4096, ffw=14336, dtype=jnp.bfloat16)
    assert (big.block_m, big.block_f, big.block_d, big.num_warps, big.num_stages) == (
        128, 128, 64, 8, 3)
    assert SwigluBlockSizes.default_for(rows=8192, width=4096, ffw=14336,
                                        dtype=jnp.float32).block_d == 32
    small = SwigluBlockSizes.default_for(rows=3, width=40, ffw=20, dtype=jnp.bfloat16)
    assert (small.block_m, small.block_f, small.block_d) == (16, 32, 64)
