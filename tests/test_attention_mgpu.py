"""The Hopper (Mosaic GPU) flash attention forward kernel, `pallas_kernels.flash_attention_mgpu`.

On a CPU (CI): inputs the kernel does not take raise before any GPU work, and a few tiny
shapes run in Mosaic GPU interpret mode (TMA copies, barriers and the warp-specialised
pipeline protocol are simulated; the products there are plain dots, see the module): plain,
causal, sliding windows (both sides, one side, with causal, T != S, a first tile lo > 0),
softcap and segment ids (packed, with rows that see no key), and gradients through
`fastattn.attention(implementation="pallas_mosaic")`.
On an sm90 GPU: compiled kernel against the f32 reference, several shapes, GQA, causal/full,
windows, softcap, segment ids, head dims 64/128/256, T != S both ways. Run there with
    PYTHONPATH=. python -m pytest -q tests/test_attention_mgpu.py
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention_mgpu import (
    SMEM_BUDGET,
    MosaicBlockSizes,
    check_supported,
    flash_attention_mgpu,
)
from tests.tolerance import assert_within_policy


def _on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")) in ("9.0", "9.0a")


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.dtype(dtype))
    return make(B, T, N, H), make(B, S, K, H), make(B, S, K, H)


LONELY = 99  # a query segment id that no key has


def _packed_segments(B, T, S, seed=0, *, num_segments=4, lonely_rows=5):
    """Packed sequences: sorted random kv ids in [0, num_segments); query i takes the id of
    key i + S - T (its own position when T == S; clipped at 0), so that with causal masks
    and windows some rows reach the start of their segment and some rows' segment starts
    after every key they may see. The first `lonely_rows` rows of each batch row get an id
    that no key has: they see no key at all."""
    rng = np.random.default_rng(seed + 100)
    kv = np.sort(rng.integers(0, num_segments, (B, S)), axis=1)
    q = kv[:, np.clip(np.arange(T) + S - T, 0, S - 1)].copy()
    q[:, :lonely_rows] = LONELY
    return jnp.asarray(q, jnp.int32), jnp.asarray(kv, jnp.int32)


# The reference, jitted (one compile rather than one per op and shape).
_reference = jax.jit(flash_attention_reference,
                     static_argnames=("causal", "window", "softcap", "scale", "compute_dtype"))


def _check(B, T, S, N, K, H, *, causal, window=None, softcap=None, segments=False,
           scale=None, dtype="bfloat16", block_sizes=None, interpret=False, seed=0):
    q, k, v = _inputs(B, T, S, N, K, H, dtype, seed)
    seg = _packed_segments(B, T, S, seed) if segments else None
    out, lse = flash_attention_mgpu(q, k, v, causal=causal, segment_ids=seg, window=window,
                                    softcap=softcap, scale=scale, block_sizes=block_sizes,
                                    interpret=interpret)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    options = {"causal": causal, "window": window, "softcap": softcap, "scale": scale}
    seg_args = seg if seg is not None else (None, None)
    o_out, o_lse = _reference(q, k, v, *seg_args, **options)  # f32, HIGHEST
    l_out, l_lse = _reference(q, k, v, *seg_args, **options, compute_dtype=jnp.dtype(dtype))
    assert out.shape == (B, T, N, H) and lse.shape == (B, N, T) and lse.dtype == np.float32
    as_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    assert_within_policy("out", out, as_f32(o_out), as_f32(l_out), dtype=dtype, factor=2)
    assert_within_policy("lse", lse, as_f32(o_lse), as_f32(l_lse), dtype=dtype, factor=2)
    empty = np.isneginf(as_f32(o_lse))  # [B, N, T]: rows that see no key
    assert np.all(out[np.transpose(empty, (0, 2, 1))] == 0)
    return empty


# ----------------------------------------------------------------------------- CPU

UNSUPPORTED = [
    # (what, shapes (q, k), dtype, block_sizes, error)
    ("float32", ((1, 128, 2, 64), (1, 128, 2, 64)), "float32", None, NotImplementedError),
    ("head dim 96", ((1, 128, 2, 96), (1, 128, 2, 96)), "bfloat16", None, NotImplementedError),
    ("T not a tile multiple", ((1, 100, 2, 64), (1, 128, 2, 64)), "bfloat16", None,
     NotImplementedError),
    ("S shorter than the default key tile", ((1, 128, 2, 64), (1, 96, 2, 64)), "bfloat16", None,
     NotImplementedError),
    ("S shorter than block_k", ((1, 128, 2, 64), (1, 64, 2, 64)), "bfloat16",
     MosaicBlockSizes(block_k=128), NotImplementedError),
    ("S not a multiple of 8", ((1, 128, 2, 64), (1, 300, 2, 64)), "bfloat16",
     MosaicBlockSizes(block_k=128), NotImplementedError),
    ("T not a multiple of block_q with turns", ((1, 192, 2, 64), (1, 256, 2, 64)),
     "bfloat16", MosaicBlockSizes(block_k=64), NotImplementedError),
    ("T not a multiple of a consumer's rows", ((1, 224, 2, 64), (1, 256, 2, 64)),
     "bfloat16", MosaicBlockSizes(block_q=192, block_k=64, consumers=3, pingpong=False),
     NotImplementedError),
    ("N % K", ((1, 128, 3, 64), (1, 128, 2, 64)), "bfloat16", None, ValueError),
    ("head dims disagree", ((1, 128, 2, 64), (1, 128, 2, 128)), "bfloat16", None, ValueError),
    ("too much shared memory", ((1, 128, 2, 256), (1, 1024, 2, 256)), "bfloat16",
     MosaicBlockSizes(block_k=256, num_stages=4), ValueError),
]


@pytest.mark.parametrize("what,shapes,dtype,block_sizes,error", UNSUPPORTED,
                         ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_inputs_raise_before_any_gpu_work(what, shapes, dtype, block_sizes, error):
    (q_shape, k_shape) = shapes
    q = jax.ShapeDtypeStruct(q_shape, jnp.dtype(dtype))  # no arrays: nothing may run
    k = jax.ShapeDtypeStruct(k_shape, jnp.dtype(dtype))
    with pytest.raises(error, match=r"."):
        check_supported(q, k, k, causal=True, block_sizes=block_sizes, require_device=False)
    with pytest.raises(error):
        flash_attention_mgpu(q, k, k, causal=True, block_sizes=block_sizes)


def test_unsupported_message_names_the_fallback():
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="float32.*implementation='pallas'"):
        flash_attention_mgpu(q, q, q, causal=False)


_Q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
_KV = jax.ShapeDtypeStruct((1, 256, 1, 64), jnp.bfloat16)
_IDS = (jax.ShapeDtypeStruct((1, 128), jnp.int32), jax.ShapeDtypeStruct((1, 256), jnp.int32))


@pytest.mark.parametrize("kwargs,match", [
    ({"window": (-1, None)}, r"window left bound must be an int >= 0.*-1"),
    ({"window": (4, 2.5)}, r"window right bound must be an int >= 0.*2\.5"),
    ({"window": (4,)}, r"window must be \(left, right\)"),
    ({"softcap": 0.0}, r"softcap must be a finite number > 0.*0\.0"),
    ({"softcap": float("nan")}, r"softcap must be a finite number > 0"),
    ({"softcap": True}, r"softcap must be a finite number > 0"),
    ({"segment_ids": _IDS[0]}, r"segment_ids must be a pair"),
    ({"segment_ids": (_IDS[0], _IDS[0])}, r"kv_segment_ids must have shape \(1, 256\)"),
    ({"segment_ids": (jax.ShapeDtypeStruct((1, 128), jnp.float32), _IDS[1])},
     r"q_segment_ids must be integers"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_malformed_mask_options_raise_before_any_gpu_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_supported(_Q, _KV, _KV, causal=False, require_device=False, **kwargs)
    with pytest.raises(ValueError, match=match):
        flash_attention_mgpu(_Q, _KV, _KV, causal=False, **kwargs)


def test_segment_ids_count_in_the_shared_memory_budget():
    bs = MosaicBlockSizes(block_k=64, num_stages=4)
    extra = bs.smem_bytes(64, 2, segments=True) - bs.smem_bytes(64, 2)
    assert extra == (128 + 4 * 64) * 4  # int32 ids of the query rows and of each K stage


@pytest.mark.skipif(_on_hopper(), reason="checks the refusal off Hopper")
def test_refuses_without_a_hopper_gpu():
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="Hopper"):
        flash_attention_mgpu(q, q, q, causal=True)


@pytest.mark.parametrize("kw", [{"block_q": 64}, {"block_k": 96}, {"block_k": 320},
                                {"num_stages": 1}, {"consumer_registers": 250},
                                {"consumer_registers": 256, "producer_registers": 24},
                                {"consumers": 5, "block_q": 320, "pingpong": False},
                                {"consumers": 3, "block_q": 192},
                                {"consumers": 4, "block_q": 256},
                                {"consumers": 4, "block_q": 128, "pingpong": False},
                                {"consumers": 4, "block_q": 256, "pingpong": False,
                                 "consumer_registers": 120}],
                         ids=str)
def test_block_sizes_validate(kw):
    with pytest.raises(ValueError, match="MosaicBlockSizes"):
        MosaicBlockSizes(**kw)


def test_consumer_registers_balance_what_the_producer_gives_back():
    """setmaxnreg.inc waits for registers that other warps released: the consumers' raise
    must be covered by the producer's cut from the launch allocation, or the CTA hangs."""
    from pallas_kernels.flash_attention_mgpu import launch_registers, most_consumer_registers
    assert (launch_registers(3), launch_registers(5)) == (168, 96)
    for consumers in (2, 4):
        launch = launch_registers(consumers + 1)
        for producer in (24, 40):
            most = most_consumer_registers(consumers, producer)
            assert consumers * (most - launch) <= launch - producer
            assert consumers * (most + 8 - launch) > launch - producer  # the most
    assert MosaicBlockSizes().consumer_registers == 240  # FA-3's 240 / 24
    four = MosaicBlockSizes(block_q=256, block_k=64, consumers=4, pingpong=False)
    assert four.consumer_registers == 112 and four.rows == 64


def test_launch_grid_orders_the_axes():
    """Mosaic GPU launches the last grid axis fastest: tile-major puts the heads last,
    head-major the tiles."""
    from pallas_kernels.flash_attention_mgpu import launch_grid
    axes = ((8, "q_tile"), (2, "batch"), (16, "head"))
    assert launch_grid(*axes, head_major=False) == ((8, 2, 16), ("q_tile", "batch", "head"))
    assert launch_grid(*axes, head_major=True) == ((2, 16, 8), ("batch", "head", "q_tile"))


def test_default_block_sizes_fit_the_shapes():
    for H, causal in itertools.product((64, 128, 256), (False, True)):
        for T, S in itertools.product((128, 256, 384, 4096), (128, 192, 4096)):
            bs = MosaicBlockSizes.default_for(q_len=T, kv_len=S, head_dim=H, causal=causal)
            assert T % (bs.block_q if bs.pingpong else bs.rows) == 0 and S % bs.block_k == 0
            assert bs.smem_bytes(H, 2) <= 227 * 1024
    # H = 64 takes 256-query tiles where T allows (session 7's H100 variants), four 64-row
    # consumers without turns (session 9's); H = 128 the softmax under PV (session 8's)
    h64 = MosaicBlockSizes.default_for(q_len=2048, kv_len=2048, head_dim=64, causal=True)
    assert (h64.block_q, h64.consumers, h64.pingpong, h64.overlap_softmax) == (
        256, 4, False, False)
    # ... and the softmax under PV without a right bound (session 10), on the persistent
    # grid when the rows are short
    full = functools.partial(MosaicBlockSizes.default_for, head_dim=64, causal=False)
    assert full(q_len=2048, kv_len=2048).overlap_softmax
    # ... in FA-3's 192 x 128 tile of three consumers on rows of more than 1024 keys
    # (session 14), the last query tile short where T is not a multiple of 192
    assert (full(q_len=4096, kv_len=4096).block_q, full(q_len=4096, kv_len=4096).consumers,
            full(q_len=4096, kv_len=4096).block_k) == (192, 3, 128)
    assert full(q_len=1024, kv_len=1024).consumers == 4
    # H = 128 rows of at least 16384 keys without a right bound: 192-key tiles, lse from
    # registers (session 14); not with segment ids, whose ids would not fit next to them
    long = functools.partial(MosaicBlockSizes.default_for, q_len=16384, kv_len=16384,
                             head_dim=128)
    assert (long(causal=False).block_k, long(causal=False).lse_through_smem) == (192, False)
    assert long(causal=True).block_k == long(causal=False, segments=True).block_k == 128
    assert long(causal=False).smem_bytes(128, 2) <= SMEM_BUDGET
    assert not full(q_len=2048, kv_len=2048).persistent
    assert full(q_len=1024, kv_len=1024).persistent
    # Short rows of either head dim, masked or not, run persistent (snake-order shares)
    for H, causal in itertools.product((64, 128), (False, True)):
        assert MosaicBlockSizes.default_for(q_len=1024, kv_len=1024, head_dim=H,
                                            causal=causal).persistent
        assert not MosaicBlockSizes.default_for(q_len=2048, kv_len=2048, head_dim=H,
                                                causal=causal).persistent
    h128 = MosaicBlockSizes.default_for(q_len=2048, kv_len=2048, head_dim=128, causal=True)
    assert (h128.block_q, h128.block_k, h128.pingpong, h128.overlap_softmax) == (
        128, 128, True, True)
    # Launched head by head where K and V overflow the L2 (session 10): 128 MB at b16 s1024
    # h16 d128, not the train step's 32 MB.
    assert not h64.head_major and not h128.head_major
    for H, kv_bytes, head_major in ((128, 128 * 2**20, True), (64, 32 * 2**20, False)):
        assert MosaicBlockSizes.default_for(q_len=1024, kv_len=1024, head_dim=H, causal=True,
                                            kv_bytes=kv_bytes).head_major == head_major


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_check_supported_launches_head_major_when_kv_overflows_l2(backward):
    from pallas_kernels.flash_attention_mgpu_bwd import check_supported_backward
    check = check_supported_backward if backward else check_supported

    def blocks(B, S, K, H):
        q = jax.ShapeDtypeStruct((B, 1024, K, H), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((B, S, K, H), jnp.bfloat16)
        return check(q, k, k, causal=True, require_device=False)

    assert blocks(16, 1024, 16, 128).head_major  # K + V: 128 MiB
    assert not blocks(8, 2048, 8, 64).head_major  # 32 MiB


INTERPRET_CASES = [
    # B, T, S, N, K, H, causal, block_sizes (small: the interpreter is slow)
    (1, 128, 256, 2, 1, 64, False, MosaicBlockSizes(block_k=64, num_stages=2)),
    (1, 256, 512, 4, 2, 64, True, MosaicBlockSizes(block_k=64, num_stages=3)),  # T < S, GQA
    (1, 512, 256, 2, 1, 64, True, MosaicBlockSizes(block_k=64, num_stages=2)),  # rows see none
]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpret mode is the CPU path")
@pytest.mark.parametrize("B,T,S,N,K,H,causal,block_sizes", INTERPRET_CASES, ids=str)
def test_interpret_mode_matches_reference(B, T, S, N, K, H, causal, block_sizes):
    _check(B, T, S, N, K, H, causal=causal, block_sizes=block_sizes, interpret=True)


# Tiles of 64 keys, T and S of 128-256 (the interpreter is slow). Each case says what part of
# the tile-range / pipeline logic it reaches; lo is the CTA's first key tile.
MASK_INTERPRET_CASES = [
    # what, T, S, causal, window, softcap, segments, num_stages
    ("window both sides: masked, full and masked loops, consumer ends differ",
     256, 256, False, (100, 100), None, False, 2),
    ("causal + left window: lo > 0, not a multiple of the depth", 256, 256, True, (40, None),
     None, False, 3),
    ("left window only, T < S: lo > 0, same ends", 128, 256, False, (50, None), None, False,
     3),
    ("right window only, T < S: a shifted diagonal", 128, 256, False, (None, 16), None, False,
     2),
    ("window (0, 0), T < S: one key per row", 128, 256, False, (0, 0), None, False, 2),
    ("window, T > S: the first rows see no key", 256, 128, False, (32, 8), None, False, 2),
    ("softcap", 128, 256, False, None, 2.0, False, 2),
    ("segment ids", 128, 256, False, None, None, True, 2),
    ("segment ids + causal, T > S", 256, 128, True, None, None, True, 2),
    ("segment ids + causal + left window + softcap", 256, 256, True, (64, None), 5.0, True, 3),
]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpret mode is the CPU path")
@pytest.mark.parametrize("what,T,S,causal,window,softcap,segments,num_stages",
                         MASK_INTERPRET_CASES, ids=[c[0] for c in MASK_INTERPRET_CASES])
def test_interpret_mode_masks_match_reference(what, T, S, causal, window, softcap, segments,
                                              num_stages):
    empty = _check(1, T, S, 2, 1, 64, causal=causal, window=window, softcap=softcap,
                   segments=segments, interpret=True,
                   block_sizes=MosaicBlockSizes(block_k=64, num_stages=num_stages))
    if segments or (T > S and window is not None):
        assert empty.any() and not empty.all(), "the case must have rows that see no key"


SCHEDULE_CASES = [
    # what, T, S, causal, window, segments, block_sizes: the scheduling options (overlap,
    # turns, persistent grid) change the order of waits and arrivals (the interpreter checks
    # every barrier) and no number
    ("softmax under PV, causal GQA, consumer ends differ", 256, 256, True, None, False,
     MosaicBlockSizes(block_k=64, num_stages=3, overlap_softmax=True)),
    ("no ping-pong + softmax under PV, 256-query tiles, consumer ends differ", 256, 512,
     True, None, False,
     MosaicBlockSizes(block_q=256, block_k=64, num_stages=4, pingpong=False,
                      overlap_softmax=True)),
    # Four 64-row consumers: three of them stop before the last one and release the rest.
    ("four consumers + softmax under PV, causal, T < S, consumer ends differ", 256, 512,
     True, None, False,
     MosaicBlockSizes(block_q=256, block_k=64, num_stages=3, consumers=4, pingpong=False,
                      overlap_softmax=True)),
    ("four consumers, window + segment ids, head-major", 256, 256, False, (100, 50), True,
     MosaicBlockSizes(block_q=256, block_k=64, num_stages=2, consumers=4, pingpong=False,
                      head_major=True)),
    # Persistent grid: 8 query tiles (2 per head) on INTERPRET_SMS = 3 CTAs, so the ring
    # runs on across tiles of different lengths and the turns are handed over per tile.
    ("persistent, causal GQA, turns, head-major", 256, 256, True, None, False,
     MosaicBlockSizes(block_k=64, num_stages=3, persistent=True, head_major=True)),
    ("persistent, causal, T < S, four consumers + softmax under PV", 512, 1024, True, None,
     False, MosaicBlockSizes(block_q=256, block_k=64, num_stages=4, consumers=4,
                             pingpong=False, overlap_softmax=True, persistent=True)),
    ("persistent, window + segment ids", 256, 512, False, (100, 50), True,
     MosaicBlockSizes(block_k=64, num_stages=2, persistent=True)),
    # Three 64-row consumers (FA-3's H = 64 tile) and T not a multiple of block_q: the last
    # query tile's lower consumers have no rows and only release its key tiles.
    ("three consumers + softmax under PV, causal, T > S, last tile 2 of 3 consumers", 320,
     256, True, None, False,
     MosaicBlockSizes(block_q=192, block_k=128, num_stages=2, consumers=3, pingpong=False,
                      overlap_softmax=True)),
    ("three consumers, window + segment ids, one tile of 1 of 3 consumers", 64, 256, False,
     (100, 50), True,
     MosaicBlockSizes(block_q=192, block_k=64, num_stages=3, consumers=3, pingpong=False)),
    ("persistent, causal, four consumers, last tile 1 of 4 consumers", 320, 320, True, None,
     False, MosaicBlockSizes(block_q=256, block_k=64, num_stages=3, consumers=4,
                             pingpong=False, persistent=True)),
    # S not a multiple of block_k: the last key tile starts at S - block_k and hides the
    # keys of the tile before it.
    ("key tail: S = 400, 128-key tiles, window + segment ids", 128, 400, False,
     (150, 60), True, MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True)),
    ("key tail of 192-key tiles, causal, T < S, turns + softmax under PV, lse from "
     "registers", 128, 320, True, None, False,
     MosaicBlockSizes(block_k=192, num_stages=2, overlap_softmax=True,
                      lse_through_smem=False)),
]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpret mode is the CPU path")
@pytest.mark.parametrize("what,T,S,causal,window,segments,block_sizes", SCHEDULE_CASES,
                         ids=[c[0] for c in SCHEDULE_CASES])
def test_interpret_mode_schedules_match_reference(what, T, S, causal, window, segments,
                                                  block_sizes):
    _check(1, T, S, 4, 2, 64, causal=causal, window=window, segments=segments,
           interpret=True, block_sizes=block_sizes)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpret mode is the CPU path")
def test_interpret_mode_negative_scale_keeps_masked_scores_hidden():
    """A scale <= 0 is applied to every score before the mask (a masked -inf times a
    negative scale would turn into +inf)."""
    _check(1, 128, 256, 2, 1, 64, causal=True, window=(None, 0), scale=-0.1, interpret=True,
           block_sizes=MosaicBlockSizes(block_k=64, num_stages=2))


# ----------------------------------------------------------------------------- Hopper GPU

hopper = pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (Hopper) GPU")

GPU_CASES = [
    # B, T, S, N, K, H, causal, dtype
    (2, 256, 256, 4, 4, 64, False, "bfloat16"),
    (2, 256, 256, 4, 4, 64, True, "bfloat16"),
    (1, 1024, 1024, 8, 2, 128, True, "bfloat16"),  # GQA 4:1
    (1, 1024, 1024, 8, 1, 128, False, "bfloat16"),  # MQA
    (1, 384, 768, 4, 2, 128, True, "float16"),  # T < S: bottom-right diagonal
    (1, 512, 256, 2, 1, 128, True, "bfloat16"),  # T > S: first rows see no key
    (1, 256, 512, 4, 2, 128, False, "float16"),
    (1, 512, 512, 2, 1, 256, True, "bfloat16"),
    (2, 2048, 2048, 4, 4, 128, True, "bfloat16"),  # many steps: the ring wraps often
]


@hopper
@pytest.mark.parametrize("B,T,S,N,K,H,causal,dtype", GPU_CASES, ids=str)
def test_gpu_matches_reference(B, T, S, N, K, H, causal, dtype):
    _check(B, T, S, N, K, H, causal=causal, dtype=dtype)


GPU_MASK_CASES = [
    # B, T, S, N, K, H, causal, window, softcap, segments, dtype
    (1, 1024, 1024, 8, 2, 128, True, (256, None), None, False, "bfloat16"),  # lo > 0
    (1, 1024, 1024, 4, 4, 128, False, (200, 300), None, False, "bfloat16"),  # both sides
    (1, 1024, 1024, 4, 2, 64, False, (300, None), None, False, "float16"),  # left only
    (1, 384, 768, 4, 2, 128, True, (100, None), 30.0, False, "float16"),  # T < S
    (1, 512, 256, 2, 1, 128, False, (64, 0), None, False, "bfloat16"),  # T > S, empty rows
    (1, 1024, 1024, 4, 2, 128, False, None, 20.0, False, "bfloat16"),  # softcap
    (2, 1024, 1024, 4, 2, 128, True, None, None, True, "bfloat16"),  # segments
    (1, 512, 256, 2, 1, 64, True, None, None, True, "bfloat16"),  # segments, T > S
    (1, 1024, 1024, 4, 2, 64, False, None, 50.0, True, "bfloat16"),  # segments, H = 64
    (1, 512, 512, 2, 1, 256, False, (64, 64), 50.0, True, "bfloat16"),  # H = 256
    (2, 2048, 2048, 4, 4, 128, True, (512, None), 30.0, True, "bfloat16"),  # ring wraps
]


@hopper
@pytest.mark.parametrize("B,T,S,N,K,H,causal,window,softcap,segments,dtype", GPU_MASK_CASES,
                         ids=str)
def test_gpu_masks_match_reference(B, T, S, N, K, H, causal, window, softcap, segments,
                                   dtype):
    _check(B, T, S, N, K, H, causal=causal, window=window, softcap=softcap, segments=segments,
           dtype=dtype)


def _short_id(bs: MosaicBlockSizes) -> str:
    """A test id pytest -k can select on: q128-k64-s4-c2-r240-24, then pp (turns), ov
    (softmax under PV), persistent, hm (head-major launch)."""
    flags = [name for name, on in (("pp", bs.pingpong), ("ov", bs.overlap_softmax),
                                   ("persistent", bs.persistent), ("hm", bs.head_major),
                                   ("lse-reg", not bs.lse_through_smem))
             if on]
    return "-".join([f"q{bs.block_q}", f"k{bs.block_k}", f"s{bs.num_stages}",
                     f"c{bs.consumers}", f"r{bs.consumer_registers}-{bs.producer_registers}",
                     *flags])


GPU_MASKS = [{}, {"window": (300, None)},
             {"window": (200, 100), "softcap": 30.0, "segments": True}]


@hopper
@pytest.mark.parametrize("block_sizes", [
    MosaicBlockSizes(block_k=64, num_stages=4),
    MosaicBlockSizes(block_k=128, num_stages=2, consumer_registers=232, producer_registers=40),
    MosaicBlockSizes(block_q=256, block_k=64, num_stages=2),
    MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True),
    MosaicBlockSizes(block_k=128, num_stages=2, pingpong=False),
    MosaicBlockSizes(block_q=256, block_k=64, num_stages=4, pingpong=False,
                     overlap_softmax=True),
    MosaicBlockSizes(block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
                     overlap_softmax=True),
    MosaicBlockSizes(block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False),
    MosaicBlockSizes(block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
                     head_major=True),
    MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True, head_major=True),
    # 192-key tiles (so T = S = 1024 ends in a key tail), which fit next to Q at H = 128
    # only with the lse rows stored from registers
    MosaicBlockSizes(block_k=192, num_stages=2, overlap_softmax=True, lse_through_smem=False),
], ids=_short_id)
@pytest.mark.parametrize("masks", GPU_MASKS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_block_size_variants_compute_the_same(block_sizes, masks, causal):
    if block_sizes.smem_bytes(128, 2, segments=masks.get("segments", False)) > SMEM_BUDGET:
        # 192-key tiles: the segment ids' 2 KB do not fit next to them (our check refuses)
        with pytest.raises(ValueError, match="shared memory"):
            _check(1, 1024, 1024, 4, 2, 128, causal=causal, block_sizes=block_sizes, **masks)
        return
    _check(1, 1024, 1024, 4, 2, 128, causal=causal, block_sizes=block_sizes, **masks)


@hopper
@pytest.mark.parametrize("block_sizes", [
    MosaicBlockSizes(block_q=192, block_k=128, num_stages=4, consumers=3, pingpong=False,
                     overlap_softmax=True),
    MosaicBlockSizes(block_q=192, block_k=128, num_stages=3, consumers=3, pingpong=False,
                     head_major=True),
    MosaicBlockSizes(block_q=192, block_k=64, num_stages=6, consumers=3, pingpong=False,
                     persistent=True),
], ids=_short_id)
@pytest.mark.parametrize("masks", GPU_MASKS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_three_consumers_and_a_ragged_last_tile_compute_the_same(block_sizes, masks,
                                                                     causal):
    """FA-3's H = 64 tile (three 64-row consumers) on T = 1088 = 5 x 192 + 128: the last
    query tile's third consumer has no rows."""
    _check(2, 1088, 1152, 4, 2, 64, causal=causal, block_sizes=block_sizes, **masks)


@hopper
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("masks", GPU_MASKS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_key_tail_computes_the_same(H, masks, causal):
    """S = 1000, not a multiple of the default 128-key tile: the last tile is loaded from
    S - 128 and hides the 24 keys of the tile before it."""
    _check(1, 1024, 1000, 4, 2, H, causal=causal, **masks)


@hopper
@pytest.mark.parametrize("H,block_sizes", [
    (128, MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True, persistent=True)),
    (64, MosaicBlockSizes(block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
                          overlap_softmax=True, persistent=True, head_major=True)),
], ids=["H128 turns", "H64 four consumers head-major"])
@pytest.mark.parametrize("masks", GPU_MASKS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_persistent_grid_computes_the_same(H, block_sizes, masks, causal):
    """More query tiles than an H100 has SMs (132 CTAs): B = 4 and 8 heads of T = 2048 give
    512 tiles of 128 queries (H = 128) or 256 of 256 (H = 64), several per CTA."""
    _check(4, 2048, 2048, 8, 2, H, causal=causal, block_sizes=block_sizes, **masks)


@hopper
@pytest.mark.parametrize("masks", GPU_MASKS, ids=str)
def test_gpu_every_output_written_and_deterministic(masks):
    q, k, v = _inputs(1, 1024, 1024, 4, 2, 128, "bfloat16", seed=3)
    seg = _packed_segments(1, 1024, 1024, 3) if masks.get("segments") else None
    options = {"causal": True, "segment_ids": seg, "window": masks.get("window"),
               "softcap": masks.get("softcap")}
    out, lse = first = flash_attention_mgpu(q, k, v, **options)
    second = flash_attention_mgpu(q, k, v, **options)
    assert np.all(np.isfinite(np.asarray(jnp.asarray(out, jnp.float32))))
    lse = np.asarray(lse)
    assert np.all(np.isfinite(lse) | np.isneginf(lse))  # -inf: rows that see no key
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(jnp.asarray(a, jnp.float32)),
                                      np.asarray(jnp.asarray(b, jnp.float32)))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the tiny variant is the CPU path")
def test_mgpu_check_tiny_writes_json(tmp_path):
    """experiments/mgpu_check.py's tiny variant (STYLE.md 10): interpret mode against the
    Triton kernel, JSON written."""
    import json

    from experiments import mgpu_check

    mgpu_check.main(["--tiny", "--out", str(tmp_path / "mgpu.json")])
    rows = json.loads((tmp_path / "mgpu.json").read_text())["rows"]
    ours = next(r for r in rows if r["impl"] == "mgpu")
    assert "error" not in ours, ours.get("error")
    assert ours["err_vs_pallas"] < 2e-2 and ours["lse_err_vs_pallas"] < 1e-3


@pytest.mark.parametrize("implementation,deterministic", [
    ("pallas_mosaic", True), ("pallas_mosaic_bwd", True), ("pallas_mosaic_bwd", False)])
def test_registry_pallas_mosaic_forward_and_gradients_match_the_reference(
        implementation, deterministic, monkeypatch):
    """fastattn.attention(implementation="pallas_mosaic"): the Mosaic forward (interpret mode
    off a GPU) and the Triton recomputing backward it feeds with its out and lse; and
    "pallas_mosaic_bwd", the same forward with the Mosaic GPU backward, two kernels or, with
    deterministic=False (and its rule's thresholds lowered to this shape), the fused one."""
    import fastattn
    from pallas_kernels import flash_attention_mgpu_bwd as mgpu_bwd

    monkeypatch.setattr(mgpu_bwd, "GPU_L2_BYTES", 0)
    monkeypatch.setattr(mgpu_bwd, "FUSED_MIN_KV_LEN", 128)

    B, T, S, N, K, H = 1, 128, 256, 4, 2, 64  # causal T < S, GQA 2:1
    q, k, v = _inputs(B, T, S, N, K, H, "bfloat16", 3)
    d_out = jax.random.normal(jax.random.PRNGKey(9), (B, T, N, H), jnp.float32)

    def grads(attend):
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * d_out),
                        argnums=(0, 1, 2))(q, k, v)

    got = grads(lambda q, k, v: fastattn.attention(q, k, v, causal=True,
                                                   implementation=implementation,
                                                   deterministic=deterministic))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    oracle = jax.grad(lambda q, k, v: jnp.sum(flash_attention_reference(
        q, k, v, causal=True)[0] * d_out), argnums=(0, 1, 2))(*f32)
    low = grads(lambda q, k, v: flash_attention_reference(
        q, k, v, causal=True, compute_dtype=jnp.bfloat16)[0])
    as_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    for name, g, o, lp in zip(("dq", "dk", "dv"), got, oracle, low):
        assert_within_policy(name, as_f32(g), as_f32(o), as_f32(lp), dtype="bfloat16",
                             factor=2)


def test_registry_pallas_mosaic_masks_and_gradients_match_the_reference():
    """fastattn.attention(implementation="pallas_mosaic") with segment ids, a causal sliding
    window and softcap: forward and the gradients of out and lse (the Triton backward fed
    the same masks) against the reference implementation; rows that see no key give 0, lse
    -inf and finite gradients."""
    import fastattn

    B, T, S, N, K, H = 1, 128, 256, 2, 1, 64
    q, k, v = _inputs(B, T, S, N, K, H, "bfloat16", 5)
    seg = _packed_segments(B, T, S, 5, num_segments=3)
    options = {"causal": True, "sliding_window": (70, None), "softcap": 3.0,
               "segment_ids": seg, "return_lse": True}
    d_out = jax.random.normal(jax.random.PRNGKey(9), (B, T, N, H), jnp.float32)
    d_lse = jax.random.normal(jax.random.PRNGKey(10), (B, N, T), jnp.float32)

    def loss(attend):
        def f(q, k, v):
            out, lse = attend(q, k, v)
            lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows that see no key
            return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * d_lse)
        return f

    def results(attend, *args):
        value = attend(*args)
        return value, jax.grad(loss(attend), argnums=(0, 1, 2))(*args)

    (out, lse), got = results(lambda q, k, v: fastattn.attention(
        q, k, v, implementation="pallas_mosaic", **options), q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (o_out, o_lse), oracle = results(lambda q, k, v: fastattn.attention(
        q, k, v, implementation="reference", **options), *f32)
    (l_out, l_lse), low = results(lambda q, k, v: flash_attention_reference(
        q, k, v, *seg, causal=True, window=(70, None), softcap=3.0,
        compute_dtype=jnp.bfloat16), q, k, v)
    as_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    empty = np.isneginf(as_f32(o_lse))
    assert empty.any() and not empty.all()
    assert np.all(as_f32(out)[np.transpose(empty, (0, 2, 1))] == 0)
    assert_within_policy("out", as_f32(out), as_f32(o_out), as_f32(l_out), dtype="bfloat16",
                         factor=2)
    assert_within_policy("lse", as_f32(lse), as_f32(o_lse), as_f32(l_lse), dtype="bfloat16",
                         factor=2)
    for name, g, o, lp in zip(("dq", "dk", "dv"), got, oracle, low):
        assert np.all(np.isfinite(as_f32(g))), name
        assert_within_policy(name, as_f32(g), as_f32(o), as_f32(lp), dtype="bfloat16",
                             factor=3)


def test_registry_pallas_mosaic_refuses_triton_block_sizes():
    import fastattn

    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="pallas_mosaic' does not take block_sizes"):
        fastattn.attention(q, q, q, implementation="pallas_mosaic",
                           block_sizes=fastattn.BlockSizes())
