"""Paged decode attention (RELIABILITY.md 1-4): random page permutations, page sizes, ragged
contexts, NaN in free pages and partial-page tails, bad tables and lengths, paged == dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastattn
from pallas_kernels.paged_attention import paged_attention_reference
from tests.paging import shuffled_pool
from tests.tolerance import assert_within_policy

SMALL = fastattn.DecodeBlockSizes(num_splits=2)


def _paged_problem(lengths, page_size, *, N=8, K=2, H=64, spare_pages=5, dtype="float32",
                   seed=0):
    """Random q and a shuffled page pool holding each sequence's K/V; returns the pool, the
    block tables (unused entries = -7, which must never be read) and the free-page mask."""
    rng = np.random.default_rng(seed)
    tables, k_pages, v_pages, unread = shuffled_pool(
        lengths, page_size, rows=len(lengths), K=K, H=H, spare_pages=spare_pages, dtype=dtype,
        rng=rng)
    q = jnp.asarray(rng.standard_normal((len(lengths), N, H)), dtype)
    return q, k_pages, v_pages, tables, jnp.asarray(lengths, jnp.int32), unread


CASES = [  # lengths, page_size, N, K, H, dtype, options
    ([0, 1, 15, 16, 17, 40], 16, 8, 2, 64, "float32", {}),
    ([31, 32, 33, 100], 32, 16, 2, 40, "bfloat16", {}),
    ([70, 5], 16, 4, 4, 128, "float32", dict(softcap=4.0, sliding_window=(20, 0))),
    ([64, 63, 1], 16, 8, 1, 111, "float16", dict(scale=0.1)),
]


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ps{c[1]}-n{c[2]}k{c[3]}h{c[4]}-{c[5]}")
def test_matches_float64_oracle(impl, case):
    lengths, page_size, N, K, H, dtype, opts = case
    q, kp, vp, tables, lens, _ = _paged_problem(lengths, page_size, N=N, K=K, H=H, dtype=dtype)
    out, lse = fastattn.paged_attention(q, kp, vp, tables, lens, return_lse=True,
                                        implementation=impl, block_sizes=SMALL, **opts)
    window = opts.get("sliding_window")
    ref_opts = dict(softcap=opts.get("softcap"), scale=opts.get("scale"),
                    window_left=None if window is None else window[0])
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, kp, vp)]
        o_out, o_lse = map(np.asarray, paged_attention_reference(up[0], up[1], up[2], tables,
                                                                  lens, **ref_opts))
    l_out, l_lse = map(np.asarray, paged_attention_reference(
        q, kp, vp, tables, lens, compute_dtype=jnp.dtype(dtype), **ref_opts))
    assert_within_policy("out", np.asarray(out), o_out, l_out, dtype=dtype, factor=2)
    assert_within_policy("lse", np.asarray(lse), o_lse, l_lse, dtype=dtype, factor=2)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("page_size", [16, 32])
def test_nan_in_free_pages_and_partial_tails_changes_nothing(impl, page_size):
    q, kp, vp, tables, lens, unread = _paged_problem([3, 47, 16, 0], page_size, dtype="bfloat16")
    poison = jnp.asarray(unread)[None, :, :, None]
    clean = fastattn.paged_attention(q, kp, vp, tables, lens, return_lse=True,
                                     implementation=impl, block_sizes=SMALL)
    dirty = fastattn.paged_attention(q, jnp.where(poison, jnp.nan, kp),
                                     jnp.where(poison, jnp.inf, vp), tables, lens,
                                     return_lse=True, implementation=impl, block_sizes=SMALL)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("page_size,block_k", [(16, 16), (8, 32), (32, 16), (16, 128)])
@pytest.mark.parametrize("reading", ["prefetch_page_ids", "preload_page_ids"])
def test_page_id_reading_changes_no_bit_and_keeps_nan_out(reading, page_size, block_k):
    """prefetch_page_ids reads tile t + 1's page ids during tile t, preload_page_ids all of a
    split's page ids before the key loop (both also past a sequence's last page, masked):
    the same bits as reading them in the step, with NaN in every free page and partial-page
    tail, a sliding window and splits (a page holding two tiles at 32 / 16; eight pages per
    tile at 16 / 128)."""
    q, kp, vp, tables, lens, unread = _paged_problem([3, 47, 16, 0, 90], page_size,
                                                     dtype="bfloat16")
    poison = jnp.asarray(unread)[None, :, :, None]
    outs = []
    for early, (k, v) in ((False, (kp, vp)), (True, (jnp.where(poison, jnp.nan, kp),
                                                     jnp.where(poison, jnp.nan, vp)))):
        bs = fastattn.DecodeBlockSizes(block_k=block_k, num_splits=3, **{reading: early})
        for window in (None, (21, 0)):
            outs.append(fastattn.paged_attention(q, k, v, tables, lens, return_lse=True,
                                                 implementation="pallas", block_sizes=bs,
                                                 sliding_window=window))
    for plain, early in zip(outs[:2], outs[2:]):
        for a, b in zip(plain, early):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_page_ids_read_one_way():
    with pytest.raises(ValueError, match="prefetch_page_ids and preload_page_ids"):
        fastattn.DecodeBlockSizes(prefetch_page_ids=True, preload_page_ids=True)


def test_paged_equals_contiguous_decode():
    q, kp, vp, tables, lens, _ = _paged_problem([50, 7, 33], 16)
    from pallas_kernels.paged_attention import gather_pages
    dense = fastattn.decode_attention(q, gather_pages(kp, tables), gather_pages(vp, tables),
                                      lens, implementation="pallas", block_sizes=SMALL)
    paged = fastattn.paged_attention(q, kp, vp, tables, lens, implementation="pallas",
                                     block_sizes=SMALL)
    np.testing.assert_allclose(np.asarray(paged), np.asarray(dense), atol=1e-6)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("page_size, block_k", [(8, 16), (8, 64), (32, 16)])
def test_tiles_span_pages_or_part_of_one(impl, page_size, block_k):
    """A key tile gathers its rows from every page it spans (2 or 8 pages of 8), or from part
    of one page (16 keys of a 32-key page), in whatever order the table names them."""
    q, kp, vp, tables, lens, _ = _paged_problem([9, 20, 61], page_size)
    bs = fastattn.DecodeBlockSizes(block_k=block_k, num_splits=2)
    out = fastattn.paged_attention(q, kp, vp, tables, lens, implementation=impl, block_sizes=bs)
    ref, _ = paged_attention_reference(q, kp, vp, tables, lens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)


@pytest.mark.parametrize("change, match", [
    (lambda t, n: (t.at[1, 1].set(99), n), r"block_tables\[1, 1\]=99 is not a page of the pool"),
    (lambda t, n: (t.at[0, 0].set(-1), n), r"block_tables\[0, 0\]=-1 is not a page"),
    (lambda t, n: (t, n.at[0].set(33)), r"lengths\[0\]=33 is outside \[0, S=32\]"),
    (lambda t, n: (t[:1], n), r"block_tables must be an integer array \[B=2"),
])
def test_bad_tables_and_lengths_raise_before_launch(change, match):
    q, kp, vp, tables, lens, _ = _paged_problem([9, 20], 16)
    tables, lens = change(tables, lens)
    with pytest.raises(ValueError, match=match):
        fastattn.paged_attention(q, kp, vp, tables, lens)
