"""The online softmax's rescale skipped where no row's max moved
(`pallas_kernels.lazy_rescale`): the max rule, an online softmax built on it against the
exact one, and the forward kernel lowering with the per-warp branch (which only a GPU runs;
its numbers are checked there by tests/test_attention_mgpu.py's GPU cases)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_mgpu as mgpu_fwd
from pallas_kernels import lazy_rescale


def test_keep_max_rule():
    inf = jnp.inf
    old = jnp.array([-inf, -inf, 1.0, 1.0, 1.0])
    new = jnp.array([-inf, 3.0, 1.0, 4.0, 9.5])
    np.testing.assert_array_equal(lazy_rescale.keep_max(old, new, 8.0),
                                  [-inf, 3.0, 1.0, 1.0, 9.5])


@pytest.mark.parametrize("slack", [0.0, 0.5, 8.0])
def test_online_softmax_with_a_kept_max_is_exact(slack):
    """Tile by tile as the kernel does it (log2 domain, alpha = 1 where the max was kept),
    on scores that drift upwards so that the max both stays and moves."""
    rng = np.random.default_rng(0)
    rows, keys, tile = 16, 512, 64
    s = (rng.standard_normal((rows, keys)) * 3 + np.linspace(0, 12, keys)).astype(np.float32)
    v = rng.standard_normal((keys, 8)).astype(np.float32)
    m = jnp.full((rows,), -jnp.inf)
    l, acc, kept, moved = jnp.zeros((rows,)), jnp.zeros((rows, 8)), 0, 0
    for j in range(0, keys, tile):
        s_j = jnp.asarray(s[:, j:j + tile])
        m_new = lazy_rescale.keep_max(m, jnp.maximum(m, s_j.max(axis=1)), slack)
        alpha = jnp.where(m_new == m, 1.0, jnp.exp2(m - m_new))
        kept += int(jnp.sum(m_new == m))
        moved += int(jnp.sum(m_new != m))
        p = jnp.exp2(s_j - m_new[:, None])
        assert float(p.max()) <= 2.0 ** slack * (1 + 1e-6)
        l = l * alpha + p.sum(axis=1)
        acc = lazy_rescale.rescale_where_moved(acc, alpha, interpret=True) + p @ v[j:j + tile]
        m = m_new
    if slack > 0:
        assert kept and moved > rows, "the scores must exercise both branches"
    exact = jax.nn.softmax(jnp.asarray(s) * np.log(2), axis=1) @ v
    np.testing.assert_allclose(acc / l[:, None], exact, rtol=2e-5, atol=2e-5)
    lse2 = m + jnp.log2(l)  # what the kernel turns into lse: independent of the kept max
    np.testing.assert_allclose(lse2, np.log2(np.exp2(s.astype(np.float64)).sum(1)), rtol=1e-6)


@pytest.mark.parametrize("slack", [-0.1, 15.5, float("nan"), True, "8"])
def test_bad_slack_raises(slack):
    with pytest.raises(ValueError, match="slack"):
        lazy_rescale.check_slack(slack)


@pytest.mark.parametrize("H,causal", [(64, False), (64, True), (128, False), (128, True)])
def test_kernel_with_the_branch_lowers_for_cuda(H, causal, monkeypatch):
    """The per-warp branch (inline Mosaic GPU: vote.any, scf.if) builds in the forward kernel,
    in both the plain and the softmax-under-PV steps, for CUDA, on the CPU."""
    monkeypatch.setattr(mgpu_fwd, "require_hopper", lambda *a, **kw: None)
    B, T, N = 1, 512, 2
    bs = mgpu_fwd.MosaicBlockSizes.default_for(q_len=T, kv_len=T, head_dim=H, causal=causal)
    bs = dataclasses.replace(bs, rescale_slack=8.0)
    z = jnp.zeros((B, T, N, H), jnp.bfloat16)

    def forward(q, k, v):
        return mgpu_fwd.flash_attention_mgpu(q, k, v, causal=causal, block_sizes=bs)[0]

    text = jax.jit(forward).trace(z, z, z).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call" in text
