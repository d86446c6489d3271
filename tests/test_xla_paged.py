"""The XLA ragged paged attention (the engine's path without our GPU kernel): same oracle,
same poisoning rules as the kernel, and it traces with the metadata as jit arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastattn
from pallas_kernels.paged_attention import ragged_paged_attention_reference
from tests.test_ragged_paged_attention import CASES, _step
from tests.tolerance import assert_within_policy


@functools.partial(jax.jit, static_argnames=("opts",))
def _jitted(q, kp, vp, tables, ctx, starts, n, opts=()):
    return fastattn.ragged_paged_attention(q, kp, vp, tables, ctx, starts, n,
                                           implementation="xla", **dict(opts))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ps{c[2]}-{c[3]}-{len(c[4])}opts")
def test_mixed_step_matches_float64_oracle_under_jit(case):
    ctx, q_lens, page_size, dtype, opts = case
    q, kp, vp, tables, ctx_a, starts, n, _ = _step(ctx, q_lens, page_size, dtype=dtype)
    out = _jitted(q, kp, vp, tables, ctx_a, starts, jnp.int32(n), opts=tuple(opts.items()))
    window = opts.get("sliding_window")
    ref_opts = dict(softcap=opts.get("softcap"), window_left=None if window is None else window[0])
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, kp, vp)]
        oracle = np.asarray(ragged_paged_attention_reference(*up, tables, ctx_a, starts, n,
                                                             **ref_opts))
    low = np.asarray(ragged_paged_attention_reference(q, kp, vp, tables, ctx_a, starts, n,
                                                      **ref_opts))
    assert_within_policy("out", np.asarray(out), oracle, low, dtype=dtype, factor=2)
    assert np.all(np.asarray(out)[int(starts[n]):] == 0), "padding rows must be 0"


def test_nan_in_free_pages_and_tails_changes_nothing():
    q, kp, vp, tables, ctx, starts, n, unread = _step([19, 45, 3], [19, 2, 1], 16)
    poison = jnp.asarray(unread)[None, :, :, None]
    clean = _jitted(q, kp, vp, tables, ctx, starts, n)
    dirty = _jitted(q, jnp.where(poison, jnp.nan, kp), jnp.where(poison, jnp.inf, vp), tables,
                    ctx, starts, n)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))
