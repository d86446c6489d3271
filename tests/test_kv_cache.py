"""Tests of fastattn.kv_cache: slot writes, block-table read-back, validation, pytree-ness.

Expected values are built with numpy directly from the documented layout (slot = page * page_size
+ offset; pages ``[K, P, page_size, H]``), sharing no code with the module. Comparisons are bitwise
(on the raw bits, so NaN-poisoned slots compare too).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastattn.kv_cache import (
    KVCache,
    PagedKVCache,
    check_slot_mapping,
    write_kv,
    write_kv_donated,
)
from tests.tolerance import assert_bitwise_equal


def _write_jit(*args):
    return jax.jit(write_kv)(*args)


def _write_donated(k_pages, v_pages, *rest):
    # Donation is a no-op on CPU and says so in a warning; the results must be the same.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated.*")
        return write_kv_donated(k_pages, v_pages, *rest)


WRITERS = {"eager": write_kv, "jit": _write_jit, "donated": _write_donated}


def _random_pages(rng, shape, dtype, nan_fraction=0.1):
    """Random pages with some NaN-poisoned entries (stale data that must survive untouched)."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < nan_fraction] = np.nan
    return jnp.asarray(x, dtype)


# ---------------------------------------------------------------------------------------------
# write_kv
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("pages_dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_writes_named_slots_only(writer, pages_dtype):
    rng = np.random.default_rng(0)
    K, P, page_size, H, T = 3, 12, 8, 40, 29
    num_slots = P * page_size
    k_pages = _random_pages(rng, (K, P, page_size, H), pages_dtype)
    v_pages = _random_pages(rng, (K, P, page_size, H), pages_dtype)
    # Slots drawn from pages in a random order, never the pool's last slot: a -1 that wrapped
    # around (numpy indexing) would land exactly there.
    page_order = rng.permutation(P)
    candidates = (page_order[:, None] * page_size + np.arange(page_size)).ravel()
    candidates = candidates[candidates != num_slots - 1]
    slots = rng.choice(candidates, size=T, replace=False).astype(np.int32)
    padding = rng.random(T) < 0.3
    padding[[0, -1]] = True
    slots[padding] = -1
    k_new = jnp.asarray(rng.standard_normal((T, K, H)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((T, K, H)), jnp.float32)

    expected_k = np.asarray(k_pages).reshape(K, num_slots, H).copy()
    expected_v = np.asarray(v_pages).reshape(K, num_slots, H).copy()
    for t in np.flatnonzero(~padding):
        expected_k[:, slots[t]] = np.asarray(k_new[t].astype(pages_dtype))
        expected_v[:, slots[t]] = np.asarray(v_new[t].astype(pages_dtype))

    out_k, out_v = WRITERS[writer](k_pages, v_pages, k_new, v_new, jnp.asarray(slots))
    assert out_k.dtype == pages_dtype and out_k.shape == (K, P, page_size, H)
    assert_bitwise_equal(out_k, expected_k.reshape(K, P, page_size, H))
    assert_bitwise_equal(out_v, expected_v.reshape(K, P, page_size, H))


@pytest.mark.parametrize("writer", WRITERS)
def test_write_kv_all_padding_changes_nothing(writer):
    rng = np.random.default_rng(1)
    shape = (2, 4, 8, 16)
    k_pages = _random_pages(rng, shape, jnp.float32)
    v_pages = _random_pages(rng, shape, jnp.float32)
    expected_k, expected_v = np.asarray(k_pages), np.asarray(v_pages)
    new = jnp.full((5, 2, 16), 7.0)
    out_k, out_v = WRITERS[writer](k_pages, v_pages, new, new, jnp.full((5,), -1, jnp.int32))
    assert_bitwise_equal(out_k, expected_k)
    assert_bitwise_equal(out_v, expected_v)


def test_write_kv_under_jit_drops_every_out_of_range_slot():
    # Under a trace nothing can be validated; a bad slot must vanish, not wrap or clamp onto a
    # valid one (the first and last slots are the ones a wrap or a clamp would hit).
    shape = (1, 2, 8, 4)
    pages = jnp.zeros(shape)
    new = jnp.ones((4, 1, 4))
    slots = jnp.array([-5, -1, 16, 1000], jnp.int32)
    out_k, out_v = jax.jit(write_kv)(pages, pages, new, new, slots)
    assert_bitwise_equal(out_k, np.zeros(shape, np.float32))
    assert_bitwise_equal(out_v, np.zeros(shape, np.float32))


def test_write_kv_validates_concrete_slots():
    pages = jnp.zeros((1, 2, 8, 4))
    new = jnp.ones((2, 1, 4))
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]=16"):
        write_kv(pages, pages, new, new, np.array([0, 16], np.int32))
    with pytest.raises(ValueError, match="slot 3"):
        write_kv(pages, pages, new, new, jnp.array([3, 3], jnp.int32))


def test_write_kv_rejects_mismatched_shapes():
    pages = jnp.zeros((2, 4, 8, 16))
    new = jnp.ones((3, 2, 16))
    slots = jnp.array([0, 1, 2], jnp.int32)
    with pytest.raises(ValueError, match="k_new and v_new"):
        write_kv(pages, pages, jnp.ones((3, 1, 16)), jnp.ones((3, 1, 16)), slots)
    with pytest.raises(ValueError, match="k_pages and v_pages"):
        write_kv(pages, jnp.zeros((2, 4, 8, 8)), new, new, slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        write_kv(pages, pages, new, new, slots[:2])


def test_write_by_slot_then_gather_by_block_table_gives_dense_sequences():
    """Decode-style writes (one token per sequence per step) read back through block tables."""
    rng = np.random.default_rng(2)
    K, page_size, H = 2, 8, 24
    lengths = [5, 17, 33]  # a partial first page, a partial third page, one token past 4 pages
    pages_per_seq = [-(-n // page_size) for n in lengths]
    P = sum(pages_per_seq) + 3  # three pages nobody owns
    owned = rng.permutation(P)
    block_tables = np.full((len(lengths), max(pages_per_seq)), -1, np.int32)
    start = 0
    for s, n in enumerate(pages_per_seq):
        block_tables[s, :n] = owned[start:start + n]
        start += n
    free_pages = owned[start:]

    dense_k = [rng.standard_normal((n, K, H)).astype(np.float32) for n in lengths]
    dense_v = [rng.standard_normal((n, K, H)).astype(np.float32) for n in lengths]
    poison = jnp.full((K, P, page_size, H), jnp.nan)
    k_pages, v_pages = poison, poison + 0
    write = jax.jit(write_kv)
    for step in range(max(lengths)):
        slots = np.full(len(lengths), -1, np.int32)
        k_new = np.zeros((len(lengths), K, H), np.float32)
        v_new = np.zeros((len(lengths), K, H), np.float32)
        for s, n in enumerate(lengths):
            if step < n:
                slots[s] = block_tables[s, step // page_size] * page_size + step % page_size
                k_new[s], v_new[s] = dense_k[s][step], dense_v[s][step]
        check_slot_mapping(slots, P, page_size)
        k_pages, v_pages = write(k_pages, v_pages, jnp.asarray(k_new), jnp.asarray(v_new),
                                 jnp.asarray(slots))

    k_np, v_np = np.asarray(k_pages), np.asarray(v_pages)
    for s, n in enumerate(lengths):
        table = block_tables[s, :pages_per_seq[s]]
        # [K, pages, page_size, H] -> [pages * page_size, K, H], cut to the sequence length
        gathered_k = k_np[:, table].reshape(K, -1, H).transpose(1, 0, 2)
        gathered_v = v_np[:, table].reshape(K, -1, H).transpose(1, 0, 2)
        assert_bitwise_equal(gathered_k[:n], dense_k[s])
        assert_bitwise_equal(gathered_v[:n], dense_v[s])
        # The tail of the last page was never written: still the NaN it started with.
        assert np.isnan(gathered_k[n:]).all() and np.isnan(gathered_v[n:]).all()
    assert np.isnan(k_np[:, free_pages]).all() and np.isnan(v_np[:, free_pages]).all()


# ---------------------------------------------------------------------------------------------
# check_slot_mapping
# ---------------------------------------------------------------------------------------------


def test_check_slot_mapping_accepts_valid_slots_with_padding():
    check_slot_mapping(np.array([-1, 0, 31, -1, 7], np.int32), num_pages=4, page_size=8)
    check_slot_mapping(jnp.array([-1, -1], jnp.int32), num_pages=4, page_size=8)
    check_slot_mapping(np.zeros((0,), np.int32), num_pages=4, page_size=8)


@pytest.mark.parametrize("slots, message", [
    ([0, 32], r"slot_mapping\[1\]=32 is outside \[-1, 32\)"),
    ([5, -1, -2], r"slot_mapping\[2\]=-2"),
    ([4, -1, 9, 4], r"slot 4 from tokens \[0, 3\]"),
    ([[0, 1]], "1-D"),
    ([0.0, 1.0], "integers"),
])
def test_check_slot_mapping_rejects(slots, message):
    with pytest.raises(ValueError, match=message):
        check_slot_mapping(np.array(slots), num_pages=4, page_size=8)


# ---------------------------------------------------------------------------------------------
# PagedKVCache
# ---------------------------------------------------------------------------------------------

_CACHE_SIZES = {"num_layers": 2, "num_kv_heads": 4, "num_pages": 10, "page_size": 16,
                "head_dim": 64, "dtype": jnp.bfloat16}


@pytest.mark.parametrize("field, value", [
    ("page_size", 12), ("page_size", 256), ("page_size", 4), ("page_size", 0),
    ("num_pages", 0), ("num_layers", 0), ("num_kv_heads", -1), ("head_dim", 0),
])
def test_paged_cache_create_rejects(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        PagedKVCache.create(**{**_CACHE_SIZES, field: value})


def test_paged_cache_shapes_and_bytes():
    cache = PagedKVCache.create(**_CACHE_SIZES)
    assert cache.k_pages.shape == cache.v_pages.shape == (2, 4, 10, 16, 64)
    assert (cache.num_layers, cache.num_kv_heads, cache.num_pages, cache.page_size,
            cache.head_dim) == (2, 4, 10, 16, 64)
    assert cache.bytes == 2 * (2 * 4 * 10 * 16 * 64) * 2
    assert cache.bytes == cache.k_pages.nbytes + cache.v_pages.nbytes
    k1, v1 = cache.layer(1)
    assert k1.shape == v1.shape == (4, 10, 16, 64)
    with pytest.raises(ValueError, match="layer=2"):
        cache.layer(2)


def test_num_pages_for_memory():
    sizes = {k: v for k, v in _CACHE_SIZES.items() if k != "num_pages"}
    per_page = 2 * 2 * 4 * 16 * 64 * 2  # k and v, layers, kv heads, page_size, head_dim, bf16
    assert PagedKVCache.num_pages_for_memory(bytes_available=10 * per_page + per_page - 1,
                                             **sizes) == 10
    assert PagedKVCache.num_pages_for_memory(bytes_available=per_page - 1, **sizes) == 0
    assert PagedKVCache.num_pages_for_memory(
        bytes_available=per_page, **{**sizes, "dtype": jnp.float32}) == 0
    n = PagedKVCache.num_pages_for_memory(bytes_available=123_456, **sizes)
    assert PagedKVCache.create(num_pages=n, **sizes).bytes <= 123_456
    assert PagedKVCache.create(num_pages=n + 1, **sizes).bytes > 123_456
    with pytest.raises(ValueError, match="bytes_available"):
        PagedKVCache.num_pages_for_memory(bytes_available=-1, **sizes)
    with pytest.raises(ValueError, match="page_size=24"):
        PagedKVCache.num_pages_for_memory(bytes_available=10**9, **{**sizes, "page_size": 24})


def test_paged_cache_is_a_pytree():
    cache = PagedKVCache.create(**{**_CACHE_SIZES, "dtype": jnp.float32})
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 2 and leaves[0] is cache.k_pages and leaves[1] is cache.v_pages

    @jax.jit
    def write_layer(cache, k_new, v_new, slots):
        # A traced layer index, as inside a scan over layers.
        layer = jnp.int32(1)
        k, v = write_kv(*cache.layer(layer), k_new, v_new, slots)
        return cache.replace(k_pages=cache.k_pages.at[layer].set(k),
                             v_pages=cache.v_pages.at[layer].set(v))

    new = jnp.ones((2, 4, 64))
    out = write_layer(cache, new, 2 * new, jnp.array([17, -1], jnp.int32))
    assert isinstance(out, PagedKVCache) and out.page_size == 16
    np.testing.assert_array_equal(out.k_pages[1, :, 1, 1], np.ones((4, 64)))
    np.testing.assert_array_equal(out.v_pages[1, :, 1, 1], np.full((4, 64), 2.0))
    assert float(jnp.abs(out.k_pages).sum()) == 4 * 64


# ---------------------------------------------------------------------------------------------
# KVCache
# ---------------------------------------------------------------------------------------------


def _contiguous(dtype=jnp.float32):
    cache = KVCache.create(num_layers=3, batch=3, max_len=12, num_kv_heads=2, head_dim=8,
                           dtype=dtype)
    rng = np.random.default_rng(3)
    return cache.replace(k=_random_pages(rng, cache.k.shape, dtype),
                         v=_random_pages(rng, cache.v.shape, dtype))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kv_cache_update_writes_the_right_rows(jit, dtype):
    cache = _contiguous(dtype)
    rng = np.random.default_rng(4)
    T, layer = 4, 1
    positions = np.array([0, 5, 8], np.int32)  # the last row ends exactly at max_len
    k_new = jnp.asarray(rng.standard_normal((3, T, 2, 8)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((3, T, 2, 8)), jnp.float32)
    expected_k, expected_v = np.asarray(cache.k).copy(), np.asarray(cache.v).copy()
    for b, p in enumerate(positions):
        expected_k[layer, b, p:p + T] = np.asarray(k_new[b].astype(dtype))
        expected_v[layer, b, p:p + T] = np.asarray(v_new[b].astype(dtype))

    update = KVCache.update
    if jit:
        update = jax.jit(update, static_argnums=1)
    out = update(cache, layer, k_new, v_new, jnp.asarray(positions))
    assert_bitwise_equal(out.k, expected_k)
    assert_bitwise_equal(out.v, expected_v)
    np.testing.assert_array_equal(out.lengths, cache.lengths)


def test_kv_cache_update_rejects_out_of_range_positions():
    cache = _contiguous()
    new = jnp.ones((3, 4, 2, 8))
    with pytest.raises(ValueError, match=r"positions\[1\]=9 with T=4"):
        cache.update(0, new, new, jnp.array([0, 9, 0], jnp.int32))
    with pytest.raises(ValueError, match=r"positions\[2\]=-1"):
        cache.update(0, new, new, np.array([0, 0, -1], np.int32))
    with pytest.raises(ValueError, match="layer=3"):
        cache.update(3, new, new, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="k_new and v_new"):
        cache.update(0, new[:, :, :1], new[:, :, :1], np.zeros(3, np.int32))


def test_kv_cache_update_under_jit_drops_out_of_range_tokens():
    # lax.dynamic_update_slice would clamp the start to max_len - T and overwrite valid rows.
    cache = _contiguous()
    new = jnp.full((3, 4, 2, 8), 7.0)
    out = jax.jit(lambda c, p: c.update(2, new, new, p))(cache, jnp.array([10, 0, -3], jnp.int32))
    expected = np.asarray(cache.k).copy()
    expected[2, 0, 10:12] = 7.0
    expected[2, 1, 0:4] = 7.0
    expected[2, 2, 0:1] = 7.0
    assert_bitwise_equal(out.k, expected)


def test_kv_cache_advance():
    cache = _contiguous()
    cache = cache.advance(5)
    np.testing.assert_array_equal(cache.lengths, [5, 5, 5])
    cache = cache.advance(jnp.array([1, 0, 7], jnp.int32))
    np.testing.assert_array_equal(cache.lengths, [6, 5, 12])
    assert cache.lengths.dtype == jnp.int32
    with pytest.raises(ValueError, match="row 2 by num_tokens=1"):
        cache.advance(1)
    with pytest.raises(ValueError, match="row 0 by num_tokens=-1"):
        cache.advance(np.array([-1, 0, 0]))
    traced = jax.jit(lambda c: c.advance(1))(cache.replace(lengths=jnp.zeros(3, jnp.int32)))
    np.testing.assert_array_equal(traced.lengths, [1, 1, 1])


def test_kv_cache_create_and_pytree():
    with pytest.raises(ValueError, match="max_len=0"):
        KVCache.create(num_layers=1, batch=1, max_len=0, num_kv_heads=1, head_dim=8,
                       dtype=jnp.float32)
    cache = KVCache.create(num_layers=2, batch=3, max_len=16, num_kv_heads=2, head_dim=8,
                           dtype=jnp.bfloat16)
    assert cache.k.shape == (2, 3, 16, 2, 8) and cache.lengths.shape == (3,)
    assert cache.bytes == 2 * 2 * 3 * 16 * 2 * 8 * 2
    assert len(jax.tree.leaves(cache)) == 3
    k0, v0 = cache.layer(0)
    assert k0.shape == v0.shape == (3, 16, 2, 8)
