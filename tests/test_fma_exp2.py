"""exp2 with part of the work on the FMA pipe (`pallas_kernels.fma_exp2`): the polynomial
against jnp.exp2, its edge cases, the column split, and the Mosaic GPU kernel lowering with it
(the register-level split only compiles for a GPU; its numbers are checked there by
tests/test_attention_mgpu.py's GPU variants)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fma_exp2
from pallas_kernels import flash_attention_mgpu as mgpu_fwd


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_polynomial_matches_exp2_within_its_bound(jit):
    """Over the whole range a softmax feeds it (x <= 0; below -125 exp2 is denormal or 0),
    jitted too: XLA must not fold the rounding away."""
    x = jnp.linspace(-125.0, 0.0, 400_001, dtype=jnp.float32)
    x = jnp.concatenate([x, -jax.random.uniform(jax.random.key(0), (100_000,)) * 30])
    f = jax.jit(fma_exp2.exp2_poly) if jit else fma_exp2.exp2_poly
    got, want = np.asarray(f(x), np.float64), np.exp2(np.asarray(x, np.float64))
    rel = np.abs(got / want - 1)
    assert rel.max() <= fma_exp2.EXP2_POLY_MAX_REL_ERROR, rel.max()
    assert rel.max() > fma_exp2.EXP2_POLY_MAX_REL_ERROR / 2  # the bound is not loose


def test_polynomial_edges():
    """-inf (a masked score) and everything <= -127 give exactly 0, NaN stays NaN, the tiny
    results are >= 0 and below 2**-126, integers are exact powers of two."""
    x = jnp.array([-jnp.inf, -1e30, -127.0, -126.9, -126.5, jnp.nan, 0.0, -1.0, -10.0, -100.0],
                  jnp.float32)
    got = np.asarray(jax.jit(fma_exp2.exp2_poly)(x))
    np.testing.assert_array_equal(got[:3], 0.0)
    assert np.all((got[3:5] >= 0) & (got[3:5] < 2.0**-126))
    assert np.isnan(got[5])
    np.testing.assert_array_equal(got[6:], np.exp2(np.asarray(x[6:])))


@pytest.mark.parametrize("width,period,expected", [
    (64, 4, [3, 7]), (64, 2, [1, 3, 5, 7]), (128, 8, [7, 15]), (64, 1, list(range(8)))])
def test_poly_columns_pick_whole_groups(width, period, expected):
    cols = fma_exp2.poly_columns(width, period)
    groups = sorted(set(np.nonzero(cols)[0] // fma_exp2.COLUMN_GROUP))
    assert groups == expected
    assert cols.sum() == len(expected) * fma_exp2.COLUMN_GROUP


@pytest.mark.parametrize("period", [0, -1, 2.0, True, 9])
def test_bad_period_raises(period):
    with pytest.raises(ValueError, match="period"):
        fma_exp2.check_period(period, 64)


def test_interpret_split_takes_each_column_from_its_unit():
    x = -jax.random.uniform(jax.random.key(1), (64, 64)) * 20
    got = np.asarray(fma_exp2.exp2_fma_split(x, 4, interpret=True))
    cols = fma_exp2.poly_columns(64, 4)
    np.testing.assert_array_equal(got[:, cols], np.asarray(fma_exp2.exp2_poly(x))[:, cols])
    np.testing.assert_array_equal(got[:, ~cols], np.asarray(jnp.exp2(x))[:, ~cols])


@pytest.mark.parametrize("H,causal", [(64, False), (64, True), (128, False)])
def test_kernel_with_the_split_lowers_for_cuda(H, causal, monkeypatch):
    """The register-level split (inline Mosaic GPU) builds inside the forward kernel, on
    masked and full tiles, for CUDA, on the CPU (the Hopper device check is lifted)."""
    monkeypatch.setattr(mgpu_fwd, "require_hopper", lambda *a, **kw: None)
    B, T, N = 1, 512, 2
    bs = mgpu_fwd.MosaicBlockSizes.default_for(q_len=T, kv_len=T, head_dim=H, causal=causal)
    bs = dataclasses.replace(bs, exp2_fma_period=4)
    z = jnp.zeros((B, T, N, H), jnp.bfloat16)

    def forward(q, k, v):
        return mgpu_fwd.flash_attention_mgpu(q, k, v, causal=causal, block_sizes=bs)[0]

    text = jax.jit(forward).trace(z, z, z).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call" in text
