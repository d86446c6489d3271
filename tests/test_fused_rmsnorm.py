"""Fused residual add + RMSNorm (pallas_kernels/fused_rmsnorm.py) against a float64 oracle
(tests/tolerance.py): awkward widths and row counts, residual=None, gradients of x, residual
and weight through jax.vjp, determinism, leading dims, block-size invariance, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_rmsnorm import NormBlockSizes, add_rmsnorm, add_rmsnorm_reference
from tests.tolerance import assert_within_policy

EPS = 1e-5
# Several row blocks, several backward programs, the last with fewer tiles than the others.
SMALL = NormBlockSizes(block_rows=2, num_warps=1, dw_partials=4)


def _inputs(shape, dtype, weight_dtype, residual=True, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 2.0, dtype)
    r = jnp.asarray(rng.standard_normal(shape), dtype) if residual else None
    w = jnp.asarray(1.0 + 0.5 * rng.standard_normal(shape[-1:]), weight_dtype)
    return x, r, w


def _f64(a):
    return None if a is None else jnp.asarray(np.asarray(a, np.float64))


CASES = [  # shape [..., D], dtype, weight dtype, residual?, block sizes
    ((17, 40), "float32", "float32", True, SMALL),
    ((33, 96), "bfloat16", "float32", True, SMALL),
    ((1, 200), "bfloat16", "bfloat16", True, None),
    ((2, 3, 96), "float32", "float32", False, SMALL),
    ((33, 200), "bfloat16", "float32", False, NormBlockSizes(block_rows=8, dw_partials=2)),
    ((5, 1024), "float16", "float32", True, None),
]


def _ids(case):
    shape, dtype, wdtype, residual, _ = case
    return f"{'x'.join(map(str, shape))}-{dtype}-w{wdtype}-{'add' if residual else 'plain'}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_matches_float64_oracle(case):
    shape, dtype, wdtype, residual, bs = case
    x, r, w = _inputs(shape, dtype, wdtype, residual)
    normed, summed = add_rmsnorm(x, r, w, eps=EPS, block_sizes=bs)
    with jax.enable_x64(True):
        o_normed, o_summed = map(np.asarray, add_rmsnorm_reference(_f64(x), _f64(r), _f64(w),
                                                                   eps=EPS))
    l_normed, l_summed = add_rmsnorm_reference(x, r, w, eps=EPS)
    assert normed.shape == summed.shape == x.shape
    assert normed.dtype == summed.dtype == x.dtype
    assert_within_policy("normed", np.asarray(normed), o_normed, np.asarray(l_normed),
                         dtype=dtype, factor=2)
    assert_within_policy("summed", np.asarray(summed), o_summed, np.asarray(l_summed),
                         dtype=dtype, factor=2)
    # The new residual stream is the plain sum rounded to x.dtype, bit for bit.
    np.testing.assert_array_equal(np.asarray(summed), np.asarray(l_summed))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients_match_float64_oracle(case):
    shape, dtype, wdtype, residual, bs = case
    x, r, w = _inputs(shape, dtype, wdtype, residual)
    rng = np.random.default_rng(1)
    cts = (jnp.asarray(rng.standard_normal(shape), dtype),
           jnp.asarray(rng.standard_normal(shape), dtype))
    names = ("x", "residual", "weight") if residual else ("x", "weight")

    def grads(fn, x, r, w, cts):
        if r is None:
            _, vjp = jax.vjp(lambda x_, w_: fn(x_, None, w_, eps=EPS), x, w)
        else:
            _, vjp = jax.vjp(lambda x_, r_, w_: fn(x_, r_, w_, eps=EPS), x, r, w)
        return vjp(cts)

    got = grads(lambda *a, eps: add_rmsnorm(*a, eps=eps, block_sizes=bs), x, r, w, cts)
    with jax.enable_x64(True):
        oracle = [np.asarray(g) for g in grads(add_rmsnorm_reference, _f64(x), _f64(r),
                                               _f64(w), tuple(map(_f64, cts)))]
    low = grads(add_rmsnorm_reference, x, r, w, cts)
    for name, g, o, lo, a in zip(names, got, oracle, low, (x, r, w) if residual else (x, w)):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        assert_within_policy(f"d_{name}", np.asarray(g), o, np.asarray(lo), dtype=dtype,
                             factor=3)


def test_reference_backward_switch_agrees():
    x, r, w = _inputs((9, 40), "float32", "float32")
    ct = (jnp.ones_like(x), jnp.full_like(x, 0.5))
    grads = {}
    for backward in ("pallas", "reference"):
        _, vjp = jax.vjp(lambda *a, b=backward: add_rmsnorm(*a, eps=EPS, backward=b), x, r, w)
        grads[backward] = vjp(ct)
    for a, b in zip(grads["pallas"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_two_runs_are_bitwise_identical():
    x, r, w = _inputs((33, 96), "bfloat16", "float32")

    def run():
        out, vjp = jax.vjp(lambda *a: add_rmsnorm(*a, eps=EPS, block_sizes=SMALL), x, r, w)
        return [np.asarray(a) for a in (*out, *vjp(out))]

    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


def test_block_sizes_do_not_change_rows():
    """Each row is normalised on its own, so the tiling cannot change normed, summed or d_x."""
    x, r, w = _inputs((17, 200), "bfloat16", "float32")
    results = []
    for bs in (SMALL, NormBlockSizes(block_rows=16, num_warps=4, dw_partials=1), None):
        out, vjp = jax.vjp(lambda *a, b=bs: add_rmsnorm(*a, eps=EPS, block_sizes=b), x, r, w)
        d_x, d_r, _ = vjp(out)
        results.append([np.asarray(a) for a in (*out, d_x, d_r)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_leading_dims_are_rows():
    x, r, w = _inputs((2, 3, 5, 96), "float32", "float32")
    normed, summed = add_rmsnorm(x, r, w, eps=EPS, block_sizes=SMALL)
    flat_normed, flat_summed = add_rmsnorm(x.reshape(30, 96), r.reshape(30, 96), w, eps=EPS,
                                           block_sizes=SMALL)
    np.testing.assert_array_equal(np.asarray(normed).reshape(30, 96), np.asarray(flat_normed))
    np.testing.assert_array_equal(np.asarray(summed).reshape(30, 96), np.asarray(flat_summed))


def test_plain_rmsnorm_returns_x_as_summed():
    x, _, w = _inputs((4, 40), "bfloat16", "float32", residual=False)
    normed, summed = add_rmsnorm(x, None, w, eps=EPS)
    assert summed is x or np.array_equal(np.asarray(summed), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(normed),
                                  np.asarray(add_rmsnorm(x, jnp.zeros_like(x), w, eps=EPS)[0]))


def test_reference_is_the_llama_rmsnorm():
    from models.llama import RMSNorm

    x, r, w = _inputs((3, 96), "bfloat16", "float32")
    module = RMSNorm(eps=EPS, dtype="bfloat16")  # the unfused path of the model
    expected = module.apply({"params": {"weight": w}}, x, r)
    for got, want in zip(add_rmsnorm_reference(x, r, w, eps=EPS), expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


BAD = [  # (x shape, residual shape or None, weight shape, dtypes, eps, message fragment)
    ((4, 8), (4, 9), (8,), ("float32", "float32", "float32"), EPS, "residual.shape=(4, 9)"),
    ((4, 8), (4, 8), (9,), ("float32", "float32", "float32"), EPS, "weight.shape=(9,)"),
    ((4, 8), None, (4, 8), ("float32", "float32", "float32"), EPS, "weight.shape=(4, 8)"),
    ((4, 8), (4, 8), (8,), ("float32", "bfloat16", "float32"), EPS, "residual.dtype=bfloat16"),
    ((4, 8), None, (8,), ("int32", "float32", "float32"), EPS, "x.dtype=int32"),
    ((0, 8), None, (8,), ("float32", "float32", "float32"), EPS, "x.shape=(0, 8)"),
    ((4, 8), None, (8,), ("float32", "float32", "float32"), -1.0, "eps=-1.0"),
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b[-1])
def test_bad_inputs_raise_naming_the_field(bad):
    xs, rs, ws, (xd, rd, wd), eps, fragment = bad
    x = jnp.zeros(xs, xd)
    r = None if rs is None else jnp.zeros(rs, rd)
    w = jnp.ones(ws, wd)
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        add_rmsnorm(x, r, w, eps=eps)


@pytest.mark.parametrize("kwargs", [dict(block_rows=3), dict(num_warps=3), dict(dw_partials=0)])
def test_bad_block_sizes_raise(kwargs):
    with pytest.raises(ValueError, match=f"NormBlockSizes.{next(iter(kwargs))}"):
        NormBlockSizes(**kwargs)


def test_default_block_sizes_keep_a_tile_in_registers():
    assert NormBlockSizes.default_for(8192, 4096) == NormBlockSizes(block_rows=1, num_warps=8)
    assert NormBlockSizes.default_for(8192, 8192).block_rows == 1
    assert NormBlockSizes.default_for(8192, 128) == NormBlockSizes(block_rows=32, num_warps=8)
    assert NormBlockSizes.default_for(3, 40).block_rows == 4  # not more rows than there are
