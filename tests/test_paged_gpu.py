"""Paged decode and the ragged paged step on a real GPU: compiled kernels (not interpret mode),
bf16, serving-sized contexts, page sizes 16/32, GQA up to 8:1, ragged lengths, prefill chunks
mixed with decodes, NaN in every unread slot.

Skipped on a CPU (CI: the same kernels run there in interpret mode through
test_paged_attention.py and test_ragged_paged_attention.py); on the GPU machine:
    PYTHONPATH=. python -m pytest -q tests/test_paged_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastattn
from pallas_kernels.paged_attention import (
    RaggedBlockSizes,
    RaggedTile,
    paged_attention_reference,
    ragged_paged_attention_reference,
)
from tests.paging import shuffled_pool
from tests.tolerance import assert_within_policy

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

DECODE_CASES = [  # lengths, page_size, N, K, H, options, block sizes
    ([3000, 1, 15, 16, 17, 0, 2048, 999], 16, 32, 8, 128, {}, None),
    ([4096, 77, 513, 1], 32, 16, 2, 64, {}, None),
    ([1500, 31], 16, 8, 1, 80, dict(softcap=30.0, sliding_window=(256, 0)), None),
    ([2000, 600, 5], 16, 32, 8, 128, {}, fastattn.DecodeBlockSizes(block_k=16, num_splits=4)),
    ([2000, 600, 5], 32, 32, 8, 128, {}, fastattn.DecodeBlockSizes(block_k=256)),
    ([3000, 1, 15, 16, 17, 0, 2048, 999], 16, 32, 8, 128, {},
     fastattn.DecodeBlockSizes(preload_page_ids=True)),
    ([1500, 31, 700], 32, 8, 1, 80, dict(softcap=30.0, sliding_window=(256, 0)),
     fastattn.DecodeBlockSizes(preload_page_ids=True, waves=1, num_stages=3)),
]


@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=lambda c: f"ps{c[1]}-n{c[2]}k{c[3]}h{c[4]}-{len(c[0])}seqs")
def test_paged_decode_compiled_matches_float64_oracle(case):
    lengths, page_size, N, K, H, opts, bs = case
    rng = np.random.default_rng(len(lengths) + page_size + H)
    tables, kp, vp, unread = shuffled_pool(lengths, page_size, rows=len(lengths), K=K, H=H,
                                           spare_pages=7, dtype="bfloat16", rng=rng)
    q = jnp.asarray(rng.standard_normal((len(lengths), N, H)), jnp.bfloat16)
    lens = jnp.asarray(lengths, jnp.int32)
    out, lse = fastattn.paged_attention(q, kp, vp, tables, lens, return_lse=True,
                                        implementation="pallas", block_sizes=bs, **opts)
    window = opts.get("sliding_window")
    ref_opts = dict(softcap=opts.get("softcap"),
                    window_left=None if window is None else window[0])
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, kp, vp)]
        o_out, o_lse = map(np.asarray, paged_attention_reference(*up, tables, lens, **ref_opts))
    l_out, l_lse = map(np.asarray, paged_attention_reference(
        q, kp, vp, tables, lens, compute_dtype=jnp.bfloat16, **ref_opts))
    assert_within_policy("out", np.asarray(out), o_out, l_out, dtype="bfloat16", factor=2)
    assert_within_policy("lse", np.asarray(lse), o_lse, l_lse, dtype="bfloat16", factor=2)
    # NaN / Inf in every free page and partial-page tail changes nothing, bit for bit.
    poison = jnp.asarray(unread)[None, :, :, None]
    dirty = fastattn.paged_attention(q, jnp.where(poison, jnp.nan, kp),
                                     jnp.where(poison, jnp.inf, vp), tables, lens,
                                     return_lse=True, implementation="pallas", block_sizes=bs,
                                     **opts)
    np.testing.assert_array_equal(np.asarray(dirty[0]), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(dirty[1]), np.asarray(lse))


RAGGED_CASES = [  # contexts, new tokens, page_size, N, K, H, options, block sizes
    ([2048, 700, 33, 1, 1000, 517, 64], [512, 1, 33, 1, 64, 1, 17], 16, 32, 8, 128, {}, None),
    ([1024, 300, 2000], [256, 1, 1], 32, 16, 4, 64, dict(sliding_window=(128, 0)), None),
    ([900, 90, 9], [100, 1, 9], 16, 8, 1, 80, dict(softcap=20.0),
     RaggedBlockSizes(decode=RaggedTile(block_q=1, block_k=64, num_stages=3),
                      prefill=RaggedTile(block_q=16, block_k=128, num_warps=8))),
    ([2048, 5, 700, 1, 3000], [1, 1, 1, 1, 1], 16, 32, 8, 128, {}, None),  # decode launch only
    ([1500, 64], [300, 64], 32, 32, 8, 128, {}, None),  # the decode launch idles
]


@pytest.mark.parametrize("case", RAGGED_CASES,
                         ids=lambda c: f"ps{c[2]}-n{c[3]}k{c[4]}h{c[5]}-{len(c[0])}seqs")
def test_ragged_step_compiled_matches_float64_oracle(case):
    ctx, q_lens, page_size, N, K, H, opts, bs = case
    rng = np.random.default_rng(sum(ctx))
    pad_seqs, pad_rows = 2, 5
    tables, kp, vp, unread = shuffled_pool(ctx, page_size, rows=len(ctx) + pad_seqs, K=K, H=H,
                                           spare_pages=9, dtype="bfloat16", rng=rng, unused=-3)
    starts = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)] * pad_seqs]),
                         jnp.int32)
    ctx_a = jnp.asarray(list(ctx) + [0] * pad_seqs, jnp.int32)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + pad_rows, N, H)), jnp.bfloat16)
    n = len(ctx)
    call = dict(implementation="pallas", max_q_len=max(q_lens), block_sizes=bs, **opts)
    out = fastattn.ragged_paged_attention(q, kp, vp, tables, ctx_a, starts, n, **call)
    window = opts.get("sliding_window")
    ref_opts = dict(softcap=opts.get("softcap"),
                    window_left=None if window is None else window[0])
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, kp, vp)]
        oracle = np.asarray(ragged_paged_attention_reference(*up, tables, ctx_a, starts, n,
                                                             **ref_opts))
    low = np.asarray(ragged_paged_attention_reference(q, kp, vp, tables, ctx_a, starts, n,
                                                      **ref_opts))
    assert_within_policy("out", np.asarray(out), oracle, low, dtype="bfloat16", factor=2)
    assert np.all(np.asarray(out)[sum(q_lens):] == 0), "padding rows must be 0"
    poison = jnp.asarray(unread)[None, :, :, None]
    dirty = fastattn.ragged_paged_attention(q, jnp.where(poison, jnp.nan, kp),
                                            jnp.where(poison, jnp.nan, vp), tables, ctx_a,
                                            starts, n, **call)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(out))
