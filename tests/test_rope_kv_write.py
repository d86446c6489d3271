"""The fused RoPE + paged KV write (pallas_kernels/rope_kv_write.py), interpret mode on CPU.

What must be bitwise is compared on raw bits (NaN-poisoned slots compare too): the values
written, every slot not written, and skipped tokens. The rotated q and k are not bitwise:
x1 * cos - x2 * sin is two products and a sum, and a compiler may fuse one product into a
fused multiply-add (one rounding fewer). XLA:CPU does so inside the kernel's interpret-mode
loop but not in the unfused path's fusion (measured: about a quarter of f32 outputs differ in
the last bit), and Triton and XLA:GPU decide for themselves on a GPU. So a rotated element may
differ from the unfused path by one f32 rounding of a product (<= 2**-24 * (|x1| + |x2|))
plus one ulp of its output dtype (when that moves it across a rounding boundary); any
real fault (angle, sign, pairing, slot) is off by O(|x|). Pools are NaN-poisoned so a stray
write or a read of an untouched slot shows up.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import RopeScaling, TINY, apply_rope, rope_frequencies
from pallas_kernels.rope_kv_write import (
    RopeWriteBlockSizes,
    rope_write_kv,
    rope_write_kv_reference,
)
from tests.tolerance import assert_bitwise_equal


def _ulp(y, dtype):
    """One unit in the last place of dtype at the magnitude of y (float64 array)."""
    info = jnp.finfo(dtype)
    mag = np.maximum(np.abs(y), float(info.tiny))
    return np.exp2(np.floor(np.log2(mag))) * float(info.eps)


def _assert_rotation_close(actual, expected, x, what):
    """actual, expected: rotations of x [..., H] in the same dtype (see the module docstring)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    x = np.abs(np.asarray(x, np.float64))
    half = x.shape[-1] // 2
    pair = np.concatenate([x[..., :half] + x[..., half:]] * 2, axis=-1)  # |x1| + |x2|
    bound = _ulp(np.maximum(np.abs(a), np.abs(e)), actual.dtype) + 2.0**-24 * pair
    err = np.abs(a - e)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: |error| {err[worst]:.3e} at {worst} exceeds {bound[worst]:.3e} "
        f"({np.mean(a != e):.1%} of elements differ at all)")


def _inv_freq(H, theta=10000.0, llama3=False):
    config = dataclasses.replace(TINY, hidden_size=H * TINY.num_heads, rope_theta=theta,
                                 rope_scaling=RopeScaling() if llama3 else None)
    return rope_frequencies(config)


def _problem(*, T, N, K, H, page_size, P, dtype="float32", pool_dtype="float32", skip=(),
             max_position=4096, seed=0):
    """Random q/k/v, NaN-poisoned pools, slots at random places of a randomly permuted pool
    (tokens in `skip` get -1), random positions."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((T, N, H)), dtype)
    k = jnp.asarray(rng.standard_normal((T, K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((T, K, H)), dtype)

    def pool():
        x = rng.standard_normal((K, P, page_size, H)).astype(np.float32)
        x[rng.random(x.shape) < 0.2] = np.nan
        return jnp.asarray(x, pool_dtype)

    slots = rng.permutation(P * page_size)[:T].astype(np.int32)
    slots[list(skip)] = -1
    positions = rng.integers(0, max_position, T).astype(np.int32)
    return q, k, v, pool(), pool(), slots, positions


def _assert_matches_unfused(got, want, q, k, kp, vp, slots):
    """got, want: (q_rot, k_pages, v_pages) of the kernel and of the unfused reference."""
    _assert_rotation_close(got[0], want[0], q, "q_rot")
    K, P, page_size, H = kp.shape
    flat = lambda pages: np.asarray(pages).reshape(K, P * page_size, H)
    written = (slots >= 0) & (slots < P * page_size)
    _assert_rotation_close(flat(got[1])[:, slots[written]], flat(want[1])[:, slots[written]],
                           np.swapaxes(np.asarray(k, np.float32)[written], 0, 1), "k_pages")
    assert_bitwise_equal(got[2], want[2], "v_pages")
    # Independently of the reference: every slot not written keeps its bits.
    untouched = np.ones(P * page_size, bool)
    untouched[slots[written]] = False
    for name, new, old in (("k_pages", got[1], kp), ("v_pages", got[2], vp)):
        assert_bitwise_equal(flat(new)[:, untouched], flat(old)[:, untouched],
                        f"{name}: an untouched slot changed")


def _check_against_reference(args, inv_freq, block_sizes=None):
    q, k, v, kp, vp, slots, positions = args
    got = rope_write_kv(q, k, v, kp, vp, slots, positions, inv_freq, block_sizes=block_sizes)
    want = rope_write_kv_reference(q, k, v, kp, vp, slots, positions, inv_freq)
    _assert_matches_unfused(got, want, q, k, kp, vp, slots)
    return got


CASES = [  # T, N, K, H, page_size, P, dtype, pool_dtype, block_t
    (13, 4, 2, 64, 8, 5, "float32", "float32", 4),  # T not a multiple of block_t
    (13, 4, 2, 64, 16, 3, "bfloat16", "bfloat16", 8),
    (20, 8, 1, 128, 16, 4, "bfloat16", "bfloat16", 16),  # MQA, 8:1
    (9, 8, 1, 128, 8, 3, "float32", "bfloat16", 4),  # rotate in f32, round to a bf16 pool
    (17, 4, 4, 64, 8, 4, "bfloat16", "float32", 32),  # MHA; block_t > T
    (6, 6, 2, 80, 8, 2, "float16", "float16", 2),  # H/2 = 40: padded half-row tiles, G = 3
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"t{c[0]}-n{c[1]}k{c[2]}h{c[3]}-ps{c[4]}-"
                         f"{c[6]}-to-{c[7]}")
def test_matches_unfused_path(case):
    T, N, K, H, page_size, P, dtype, pool_dtype, block_t = case
    args = _problem(T=T, N=N, K=K, H=H, page_size=page_size, P=P, dtype=dtype,
                    pool_dtype=pool_dtype, skip=(1, T - 1))
    _check_against_reference(args, _inv_freq(H), RopeWriteBlockSizes(block_t=block_t))


def test_large_positions_llama3_frequencies_match_the_model_rope():
    """Positions up to 10**5 with llama3-scaled frequencies; q and k must also match the
    model's own apply_rope (the kernel and the model agree on the convention, not only the
    kernel and its reference)."""
    H = 128
    inv_freq = _inv_freq(H, theta=500000.0, llama3=True)
    args = _problem(T=11, N=4, K=2, H=H, page_size=16, P=2, dtype="bfloat16",
                    pool_dtype="bfloat16", max_position=100_001, seed=3)
    q, k, v, kp, vp, slots, positions = args
    positions[:3] = [100_000, 99_999, 65_537]
    q_rot, k_pages, _ = _check_against_reference((q, k, v, kp, vp, slots, positions), inv_freq)
    _assert_rotation_close(q_rot, apply_rope(q[None], positions[None], inv_freq)[0], q,
                           "q vs model rope")
    k_rot = apply_rope(k[None], positions[None], inv_freq)[0]  # [T, K, H]
    pages, offsets = slots // 16, slots % 16
    _assert_rotation_close(k_pages[:, pages, offsets], jnp.swapaxes(k_rot, 0, 1),
                           jnp.swapaxes(k, 0, 1), "k vs model rope")


def test_all_slots_skipped_leaves_pools_untouched():
    q, k, v, kp, vp, slots, positions = _problem(T=5, N=2, K=1, H=64, page_size=8, P=2,
                                                 dtype="bfloat16", pool_dtype="bfloat16")
    slots[:] = -1
    inv_freq = _inv_freq(64)
    q_rot, k_out, v_out = rope_write_kv(q, k, v, kp, vp, slots, positions, inv_freq)
    assert_bitwise_equal(k_out, kp, "k_pages")
    assert_bitwise_equal(v_out, vp, "v_pages")
    _assert_rotation_close(q_rot, apply_rope(q[None], positions[None], inv_freq)[0], q, "q_rot")


def test_traced_out_of_range_slots_are_skipped_under_jit_with_donation():
    """Under jit the slots can not be checked: any slot outside the pool is dropped (as in
    write_kv), never wrapped or clamped onto a real slot. The pools are donated."""
    q, k, v, kp, vp, slots, positions = _problem(T=6, N=4, K=2, H=64, page_size=8, P=3)
    num_slots = 3 * 8
    slots[[0, 2, 5]] = [num_slots, -5, num_slots + 100]
    inv_freq = _inv_freq(64)
    safe = np.where((slots >= 0) & (slots < num_slots), slots, -1)
    want = rope_write_kv_reference(q, k, v, kp, vp, safe, positions, inv_freq)
    step = jax.jit(rope_write_kv, donate_argnums=(3, 4))
    with warnings.catch_warnings():  # donation is a no-op on CPU and says so
        warnings.filterwarnings("ignore", message=".*donated.*")
        got = step(q, k, v, jnp.array(kp), jnp.array(vp), slots, positions, inv_freq)
    _assert_matches_unfused(got, want, q, k, kp, vp, safe)


def test_deterministic_and_no_tokens():
    args = _problem(T=7, N=4, K=2, H=64, page_size=8, P=2, dtype="bfloat16")
    inv_freq = _inv_freq(64)
    first, second = rope_write_kv(*args, inv_freq), rope_write_kv(*args, inv_freq)
    for a, b in zip(first, second):
        assert_bitwise_equal(a, b, "two runs")
    q, k, v, kp, vp, _, _ = _problem(T=0, N=4, K=2, H=64, page_size=8, P=2)
    empty = np.zeros((0,), np.int32)
    out = rope_write_kv(q, k, v, kp, vp, empty, empty, inv_freq)
    assert out[0].shape == (0, 4, 64)
    assert_bitwise_equal(out[1], kp, "k_pages")


def _bad(**changes):
    q, k, v, kp, vp, slots, positions = _problem(T=4, N=4, K=2, H=64, page_size=8, P=2)
    args = dict(q=q, k_new=k, v_new=v, k_pages=kp, v_pages=vp, slot_mapping=slots,
                positions=positions, inv_freq=_inv_freq(64))
    args.update(changes)
    return args


BAD = {
    "q": _bad(q=jnp.zeros((4, 4, 2, 64))),
    "k_new": _bad(k_new=jnp.zeros((4, 3, 64))),
    "v_new": _bad(v_new=jnp.zeros((5, 2, 64))),
    "head_dim": _bad(q=jnp.zeros((4, 4, 32))),
    "k_pages": _bad(k_pages=jnp.zeros((2, 2, 8, 64, 1))),
    "N=3": _bad(q=jnp.zeros((4, 3, 64))),
    "even head_dim": _bad(q=jnp.zeros((4, 4, 63)), k_new=jnp.zeros((4, 2, 63)),
                          v_new=jnp.zeros((4, 2, 63)), k_pages=jnp.zeros((2, 2, 8, 63)),
                          v_pages=jnp.zeros((2, 2, 8, 63))),
    "slot_mapping": _bad(slot_mapping=np.zeros((3,), np.int32)),
    "positions": _bad(positions=np.zeros((4,), np.float32)),
    "inv_freq": _bad(inv_freq=jnp.zeros((64,))),
    "v_new.dtype": _bad(v_new=jnp.zeros((4, 2, 64), jnp.int32)),
    "slot_mapping\\[2\\]=16 is outside": _bad(slot_mapping=np.array([0, 1, 16, 3], np.int32)),
    "writes slot 1 from tokens": _bad(slot_mapping=np.array([0, 1, 1, -1], np.int32)),
}


@pytest.mark.parametrize("match", BAD)
def test_bad_input_raises_naming_the_field(match):
    with pytest.raises(ValueError, match=match):
        rope_write_kv(**BAD[match])


@pytest.mark.parametrize("bad", [dict(block_t=3), dict(block_t=0), dict(num_warps=3),
                                 dict(num_stages=0)])
def test_block_sizes_validate(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RopeWriteBlockSizes(**bad)
