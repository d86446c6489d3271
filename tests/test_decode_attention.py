"""Split-KV decode attention: every implementation against a float64 oracle (RELIABILITY.md
1-6), unread cache slots poisoned with NaN, bad lengths, and prefill + decode == causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastattn
from pallas_kernels.decode_attention import DecodeBlockSizes, combine_splits, decode_attention_reference
from tests.tolerance import assert_within_policy

IMPLS = ["pallas", "xla"]
SMALL = DecodeBlockSizes(block_k=16, num_splits=3)


def _inputs(B, S, N, K, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, N, H)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    return q, k, v


CASES = [  # B, S, N, K, H, lengths, dtype, options, block sizes
    (3, 100, 8, 2, 40, [0, 1, 100], "float32", {}, SMALL),
    (4, 64, 4, 4, 64, [15, 16, 17, 64], "bfloat16", {}, DecodeBlockSizes(block_k=16)),
    (2, 97, 16, 1, 111, [97, 50], "float32", dict(softcap=5.0), SMALL),
    (2, 120, 32, 2, 128, [119, 33], "bfloat16", dict(sliding_window=(20, 0)), SMALL),
    (1, 113, 8, 8, 32, [113], "float16", dict(scale=0.2), DecodeBlockSizes(block_k=32, num_splits=1)),
    (5, 40, 4, 1, 64, [40, 0, 7, 39, 1], "float32", dict(sliding_window=(3, None)), None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}s{c[1]}n{c[2]}k{c[3]}h{c[4]}-{c[6]}")
def test_matches_float64_oracle(impl, case):
    B, S, N, K, H, lengths, dtype, opts, bs = case
    q, k, v = _inputs(B, S, N, K, H, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = fastattn.decode_attention(q, k, v, lengths, return_lse=True, implementation=impl,
                                         block_sizes=bs, **opts)
    window = opts.get("sliding_window")
    ref_opts = dict(softcap=opts.get("softcap"), scale=opts.get("scale"),
                    window_left=None if window is None else window[0])
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        o_out, o_lse = map(np.asarray, decode_attention_reference(*up, lengths, **ref_opts))
    l_out, l_lse = map(np.asarray, decode_attention_reference(
        q, k, v, lengths, compute_dtype=jnp.dtype(dtype), **ref_opts))
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (B, N)
    assert_within_policy("out", np.asarray(out), o_out, l_out, dtype=dtype, factor=2)
    assert_within_policy("lse", np.asarray(lse), o_lse, l_lse, dtype=dtype, factor=2)
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out)[empty] == 0) and np.all(np.isneginf(np.asarray(lse)[empty]))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_past_each_length_is_never_read(impl):
    B, S, N, K, H = 3, 70, 8, 2, 32
    q, k, v = _inputs(B, S, N, K, H, "bfloat16")
    lengths = jnp.asarray([0, 33, 69], jnp.int32)
    past = (jnp.arange(S)[None, :] >= lengths[:, None])[:, :, None, None]
    k_bad, v_bad = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v)
    clean = fastattn.decode_attention(q, k, v, lengths, return_lse=True, implementation=impl,
                                      block_sizes=SMALL)
    dirty = fastattn.decode_attention(q, k_bad, v_bad, lengths, return_lse=True,
                                      implementation=impl, block_sizes=SMALL)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_empty_partitions_are_ignored_by_the_combine():
    o = jnp.asarray([[[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]])  # [1, J=3, H=2]
    lse = jnp.asarray([[0.0, -jnp.inf, 0.0]])
    out, total = combine_splits(o, lse)
    np.testing.assert_allclose(np.asarray(out), [[2.0, 3.0]])
    np.testing.assert_allclose(np.asarray(total), [np.log(2.0)])
    out, total = combine_splits(o, jnp.full((1, 3), -jnp.inf))
    assert np.all(np.asarray(out) == 0) and np.isneginf(np.asarray(total)).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_then_decode_equals_causal_forward(impl):
    """A 12-token prefill, then 20 decode steps over the growing cache, reproduce one causal
    forward over all 32 tokens (every decode row against the matching forward row)."""
    B, T, N, K, H = 2, 32, 8, 2, 64
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    full = np.asarray(fastattn.attention(q, k, v, causal=True, implementation="reference"))
    cache_k = jnp.zeros_like(k).at[:, :12].set(k[:, :12])
    cache_v = jnp.zeros_like(v).at[:, :12].set(v[:, :12])
    for t in range(12, T):
        cache_k, cache_v = cache_k.at[:, t].set(k[:, t]), cache_v.at[:, t].set(v[:, t])
        lengths = jnp.full((B,), t + 1, jnp.int32)
        step = fastattn.decode_attention(q[:, t], cache_k, cache_v, lengths, implementation=impl,
                                         block_sizes=SMALL)
        np.testing.assert_allclose(np.asarray(step), full[:, t], atol=2e-5, rtol=2e-5)


def test_two_runs_are_bitwise_equal():
    q, k, v = _inputs(2, 90, 8, 2, 64, "bfloat16")
    lengths = jnp.asarray([90, 41], jnp.int32)
    runs = [fastattn.decode_attention(q, k, v, lengths, return_lse=True, implementation="pallas",
                                      block_sizes=SMALL) for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_default_splits_fill_the_gpu_but_not_past_one_tile_per_split():
    assert DecodeBlockSizes().resolve(batch=1, kv_heads=8, kv_len=131072).num_splits == 33
    assert DecodeBlockSizes().resolve(batch=256, kv_heads=8, kv_len=1024).num_splits == 1
    assert DecodeBlockSizes().resolve(batch=1, kv_heads=1, kv_len=100).num_splits == 1
    contiguous = DecodeBlockSizes.default_for(paged=False)
    assert contiguous.resolve(batch=1, kv_heads=8, kv_len=131072).num_splits == 16  # 1 wave
    assert contiguous.resolve(batch=16, kv_heads=8, kv_len=4096).num_splits == 1
    paged = DecodeBlockSizes.default_for(paged=True)
    assert paged.resolve(batch=1, kv_heads=8, kv_len=32768, page_size=16).num_splits == 16
    # b64 x 131072 would be one split per sequence; 32 splits keep 256 pages per split
    assert paged.resolve(batch=64, kv_heads=8, kv_len=131072, page_size=16).num_splits == 32
    assert paged.resolve(batch=64, kv_heads=8, kv_len=131072, page_size=128).num_splits == 4
    with pytest.raises(ValueError, match="waves=0"):
        DecodeBlockSizes(waves=0)


@pytest.mark.parametrize("lengths, match", [
    ([5, 71], r"lengths\[1\]=71 is outside \[0, S=70\]"),
    ([-1, 3], r"lengths\[0\]=-1 is outside"),
])
def test_lengths_out_of_range_raise(lengths, match):
    q, k, v = _inputs(2, 70, 4, 2, 32, "float32")
    with pytest.raises(ValueError, match=match):
        fastattn.decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("mutate, match", [
    (lambda q, k, v, l: (q[None], k, v, l), r"q must be \[B, N, H\]"),
    (lambda q, k, v, l: (q, k[:, :, :1], v, l), r"k and v must have the same shape"),
    (lambda q, k, v, l: (q[:, :3], k, v, l), r"multiple of kv heads"),
    (lambda q, k, v, l: (q, k, v, l.astype(jnp.float32)), r"lengths must be an integer array"),
    (lambda q, k, v, l: (q, k, v, l[:1]), r"lengths must be an integer array of shape \(2,\)"),
])
def test_bad_inputs_raise(mutate, match):
    q, k, v = _inputs(2, 70, 4, 2, 32, "float32")
    with pytest.raises(ValueError, match=match):
        fastattn.decode_attention(*mutate(q, k, v, jnp.asarray([3, 4], jnp.int32)))
