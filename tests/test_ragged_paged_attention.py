"""Ragged paged attention, the engine's kernel: prefill chunks and decodes in one step over a
shuffled page pool (RELIABILITY.md 1-4), and prefill + 20 decode steps == one causal forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastattn
from pallas_kernels.paged_attention import (
    RaggedBlockSizes,
    RaggedTile,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from tests.paging import shuffled_pool
from tests.tolerance import assert_within_policy


def _step(ctx, q_lens, page_size, *, N=4, K=2, H=32, spare=4, pad_rows=3, pad_seqs=1,
          dtype="float32", seed=0):
    """A step of len(ctx) sequences (plus pad_seqs unused slots and pad_rows padding rows)."""
    rng = np.random.default_rng(seed)
    tables, kp, vp, unread = shuffled_pool(ctx, page_size, rows=len(ctx) + pad_seqs, K=K, H=H,
                                           spare_pages=spare, dtype=dtype, rng=rng, unused=-3)
    starts = np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)] * pad_seqs]).astype(np.int32)
    ctx_all = np.array(list(ctx) + [0] * pad_seqs, np.int32)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + pad_rows, N, H)), dtype)
    return q, kp, vp, tables, jnp.asarray(ctx_all), jnp.asarray(starts), len(ctx), unread


CASES = [  # context lengths, new tokens per sequence, page size, dtype, options
    ([40, 1, 17, 33], [40, 1, 5, 1], 16, "float32", {}),  # a whole prompt, decodes, a chunk
    ([64, 31, 96], [16, 31, 1], 32, "bfloat16", {}),
    ([50, 50], [20, 1], 16, "float32", dict(sliding_window=(8, 0), softcap=3.0)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ps{c[2]}-{c[3]}-{len(c[4])}opts")
def test_mixed_step_matches_float64_oracle(case):
    ctx, q_lens, page_size, dtype, opts = case
    q, kp, vp, tables, ctx_a, starts, n, _ = _step(ctx, q_lens, page_size, dtype=dtype)
    out = fastattn.ragged_paged_attention(q, kp, vp, tables, ctx_a, starts, n,
                                          implementation="pallas", **opts)
    window = opts.get("sliding_window")
    ref_opts = dict(softcap=opts.get("softcap"), window_left=None if window is None else window[0])
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, kp, vp)]
        oracle = np.asarray(ragged_paged_attention_reference(*up, tables, ctx_a, starts, n, **ref_opts))
    # The reference computes in f32 and rounds its output to the inputs' dtype: the yardstick.
    low = np.asarray(ragged_paged_attention_reference(q, kp, vp, tables, ctx_a, starts, n, **ref_opts))
    assert_within_policy("out", np.asarray(out), oracle, low, dtype=dtype, factor=2)
    assert np.all(np.asarray(out)[int(starts[n]):] == 0), "padding rows must be 0"


@pytest.mark.parametrize("bs", [
    RaggedBlockSizes(decode=RaggedTile(block_q=1, block_k=16, num_stages=1),
                     prefill=RaggedTile(block_q=2, block_k=16, num_warps=8, num_stages=3)),
    RaggedBlockSizes(decode=RaggedTile(block_q=2, block_k=32, num_warps=2),
                     prefill=RaggedTile(block_q=8, block_k=32)),
], ids=["d1x16-p2x16", "d2x32-p8x32"])
def test_tiles_and_head_groups_of_any_size(bs):
    """G = 3 query heads per kv head (a tile of block_q * 3 rows, padded), pages of 8 keys
    under key tiles of 16 or 32, query tiles shorter than a chunk, and a decode launch that
    also takes the 2-token sequence when its block_q is 2."""
    q, kp, vp, tables, ctx, starts, n, _ = _step([21, 9, 40, 5], [13, 1, 6, 2], 8, N=6, K=2,
                                                 H=40)
    out = fastattn.ragged_paged_attention(q, kp, vp, tables, ctx, starts, n,
                                          implementation="pallas", block_sizes=bs)
    ref = ragged_paged_attention_reference(q, kp, vp, tables, ctx, starts, n)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


SMALL_TILES = RaggedBlockSizes(decode=RaggedTile(block_q=1, block_k=16, num_warps=2),
                               prefill=RaggedTile(block_q=4, block_k=32, num_warps=8))


def test_decode_and_prefill_launches_share_one_output():
    """The decode launch (q_len 1) and the prefill launch (q_len > 1) each write only their
    own sequences' rows of one aliased output, whichever kinds a step holds and in any order
    (sequences with no new tokens take no program); rows of no sequence stay exactly 0 even
    where q holds NaN; a decode-only step (static max_q_len = 1) runs the split-KV paged
    decode kernel alone. One pool and one T for all steps, so that they share compilations."""
    ctx = [30, 7, 18, 1, 25]
    q, kp, vp, tables, ctx_a, _, _, _ = _step(ctx, [1] * 5, 8, N=8, K=2, pad_rows=19,
                                              pad_seqs=2, seed=3)  # T = 24 rows
    steps = [  # name, new tokens per sequence (num_seqs = its length), max_q_len, launches
        ("interleaved", [1, 7, 1, 1, 9], None, ["decode", "prefill"]),
        ("decode-only", [1, 1, 1, 1, 1], 1, ["paged_decode"]),
        ("decode-only, one idle sequence", [1, 0, 1, 1, 1], 1, ["paged_decode"]),
        ("prefill-only", [0, 7, 2, 0, 9], None, ["decode", "prefill"]),  # decode launch idles
    ]
    for name, q_lens, max_q_len, launches in steps:
        n, used = len(q_lens), sum(q_lens)
        starts = jnp.asarray(np.cumsum([0] + q_lens + [0] * (len(ctx) + 2 - n)), jnp.int32)
        args = (q.at[used:].set(jnp.nan), kp, vp, tables, ctx_a, starts, n)
        out = np.asarray(fastattn.ragged_paged_attention(
            *args, implementation="pallas", max_q_len=max_q_len, block_sizes=SMALL_TILES))
        ref = np.asarray(ragged_paged_attention_reference(*args))
        np.testing.assert_allclose(out[:used], ref[:used], atol=2e-5, rtol=2e-5, err_msg=name)
        assert np.all(out[used:] == 0), f"{name}: rows of no sequence must be 0"
        jaxpr = str(jax.make_jaxpr(lambda *a, m=max_q_len: ragged_paged_attention(
            *a, max_q_len=m, block_sizes=SMALL_TILES, interpret=True))(*args))
        kernels = {"decode": "ragged_paged_attention_decode",
                   "prefill": "ragged_paged_attention_prefill",
                   "paged_decode": "name=paged_decode_attention"}
        assert [kind for kind, kernel in kernels.items() if kernel in jaxpr] == launches, name


def test_block_sizes_are_validated_and_resolved():
    with pytest.raises(ValueError, match=r"RaggedTile.block_q=3 must be a power of two"):
        RaggedTile(block_q=3, block_k=64)
    with pytest.raises(ValueError, match=r"RaggedTile.block_k=8 must be a power of two >= 16"):
        RaggedTile(block_q=1, block_k=8)
    with pytest.raises(ValueError, match=r"RaggedBlockSizes.prefill must be a RaggedTile"):
        RaggedBlockSizes(prefill=(32, 64, 8, 3))
    # No query tile longer than the longest run of new tokens (rounded up to a power of two).
    bs = RaggedBlockSizes(decode=RaggedTile(block_q=2, block_k=64),
                          prefill=RaggedTile(block_q=32, block_k=64)).resolve(max_q_len=5)
    assert (bs.decode.block_q, bs.prefill.block_q) == (2, 8)
    assert RaggedBlockSizes().resolve(max_q_len=1).prefill.block_q == 1


@pytest.mark.parametrize("page_size", [16, 32])
def test_nan_in_free_pages_and_tails_changes_nothing(page_size):
    q, kp, vp, tables, ctx, starts, n, unread = _step([19, 45, 3], [19, 2, 1], page_size,
                                                      dtype="bfloat16")
    poison = jnp.asarray(unread)[None, :, :, None]
    clean = fastattn.ragged_paged_attention(q, kp, vp, tables, ctx, starts, n,
                                            implementation="pallas")
    dirty = fastattn.ragged_paged_attention(q, jnp.where(poison, jnp.nan, kp),
                                            jnp.where(poison, jnp.nan, vp), tables, ctx, starts,
                                            n, implementation="pallas")
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))


@pytest.mark.parametrize("page_size", [8, 32])
def test_prefetched_page_ids_change_no_bit_and_keep_nan_out(page_size):
    """RaggedTile.prefetch_page_ids reads the next key tile's page ids one loop step early,
    also past the context and the table's end (masked): same bits as reading them in the
    step, NaN in every free page and tail included; key tiles of 16 and 32 over pages of 8
    or 32, interior (unmasked) tiles and masked ones."""
    q, kp, vp, tables, ctx, starts, n, unread = _step([70, 45, 3, 33], [19, 2, 1, 1], page_size,
                                                      dtype="bfloat16")
    poison = jnp.asarray(unread)[None, :, :, None]

    def tiles(prefetch):
        return RaggedBlockSizes(
            decode=RaggedTile(block_q=1, block_k=16, prefetch_page_ids=prefetch),
            prefill=RaggedTile(block_q=4, block_k=32, prefetch_page_ids=prefetch))

    plain = fastattn.ragged_paged_attention(q, kp, vp, tables, ctx, starts, n,
                                            implementation="pallas", block_sizes=tiles(False))
    early = fastattn.ragged_paged_attention(q, jnp.where(poison, jnp.nan, kp),
                                            jnp.where(poison, jnp.nan, vp), tables, ctx, starts,
                                            n, implementation="pallas", block_sizes=tiles(True))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(early))


def test_prefill_then_20_decodes_through_pages_equal_one_causal_forward():
    """write_kv into a shuffled pool, a 12-token prefill step, then 20 one-token steps."""
    rng = np.random.default_rng(5)
    T, N, K, H, page_size, P = 32, 4, 2, 32, 16, 7
    q = jnp.asarray(rng.standard_normal((T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((T, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((T, K, H)), jnp.float32)
    full = np.asarray(fastattn.attention(q[None], k[None], v[None], causal=True,
                                         implementation="reference"))[0]
    pages = jnp.asarray([[5, 2]], jnp.int32)
    slots = np.array([int(pages[0, t // page_size]) * page_size + t % page_size for t in range(T)])
    kp = jnp.full((K, P, page_size, H), jnp.nan, jnp.float32)  # never-written slots are NaN
    vp = jnp.full((K, P, page_size, H), jnp.nan, jnp.float32)
    kp, vp = fastattn.write_kv(kp, vp, k[:12], v[:12], jnp.asarray(slots[:12], jnp.int32))
    out = fastattn.ragged_paged_attention(q[:12], kp, vp, pages, jnp.asarray([12]),
                                          jnp.asarray([0, 12]), 1, implementation="pallas")
    np.testing.assert_allclose(np.asarray(out), full[:12], atol=2e-5, rtol=2e-5)
    for t in range(12, T):
        kp, vp = fastattn.write_kv(kp, vp, k[t:t + 1], v[t:t + 1],
                                   jnp.asarray(slots[t:t + 1], jnp.int32))
        out = fastattn.ragged_paged_attention(q[t:t + 1], kp, vp, pages, jnp.asarray([t + 1]),
                                              jnp.asarray([0, 1]), 1, implementation="pallas",
                                              max_q_len=1)
        np.testing.assert_allclose(np.asarray(out)[0], full[t], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("change, match", [
    (dict(starts=[0, 40, 39, 46, 47, 47]), r"query_start must rise from 0"),
    (dict(ctx=[4, 1, 17, 33, 0]), r"sequence 0 has 40 new tokens but context_lens\[0\]=4"),
    (dict(num_seqs=6), r"num_seqs=6 must be in \[0, 5\]"),
    (dict(ctx=[40, 1, 17, 99, 0]), r"lengths\[3\]=99 is outside"),
    (dict(table=(2, 0, 70)), r"block_tables\[2, 0\]=70 is not a page of the pool"),
    (dict(max_q_len=8), r"max_q_len=8 is below a sequence's 40 new tokens"),
])
def test_bad_metadata_raises_before_launch(change, match):
    q, kp, vp, tables, ctx, starts, n, _ = _step([40, 1, 17, 33], [40, 1, 5, 1], 16)
    if "starts" in change:
        starts = jnp.asarray(change["starts"], jnp.int32)
    if "ctx" in change:
        ctx = jnp.asarray(change["ctx"], jnp.int32)
    if "table" in change:
        s, p, value = change["table"]
        tables = tables.at[s, p].set(value)
    n = change.get("num_seqs", n)
    with pytest.raises(ValueError, match=match):
        fastattn.ragged_paged_attention(q, kp, vp, tables, ctx, starts, n,
                                        max_q_len=change.get("max_q_len"))
