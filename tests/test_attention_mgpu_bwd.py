"""The Hopper (Mosaic GPU) flash attention backward, `pallas_kernels.flash_attention_mgpu_bwd`.

Oracle: jax.vjp of the f32 reference (`flash_attention_reference`) with the same cotangents
(d_out and d_lse), under the written tolerance policy (tests/tolerance.py, factor 3 for
gradients), the yardstick being the reference's gradients computed in bfloat16.

On a CPU (CI): unsupported inputs raise before any GPU work; tiny shapes run in Mosaic GPU
interpret mode (TMA copies, barriers and the producer / consumer protocol simulated, the
products plain dots): plain, causal, GQA, T != S both ways, windows, softcap, segment ids with
rows that see no key (their gradients must be exactly 0); and both kernels lower for CUDA
(Mosaic GPU MLIR, wgmma layouts) for bf16, head dims 64 and 128, causal and not.
On an sm90 GPU: the compiled kernels at realistic shapes. Run there with
    PYTHONPATH=. python -m pytest -q tests/test_attention_mgpu_bwd.py
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_mgpu_bwd as mgpu_bwd
from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention_mgpu_bwd import (
    MosaicBackwardBlockSizes,
    check_supported_backward,
    flash_attention_mgpu_backward,
)
from tests.test_attention_mgpu import _on_hopper, _packed_segments
from tests.tolerance import assert_within_policy


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.dtype(dtype))
    return (make(B, T, N, H), make(B, S, K, H), make(B, S, K, H), make(B, T, N, H),
            jnp.asarray(rng.standard_normal((B, N, T)), jnp.float32))


# The reference forward, jitted (one compile rather than one per op and shape).
_reference = jax.jit(flash_attention_reference,
                     static_argnames=("causal", "window", "softcap", "scale", "compute_dtype"))


def _reference_grads(q, k, v, d_out, d_lse, seg, options, compute_dtype=None):
    """(out, lse, (dq, dk, dv)) of the reference through jax.vjp, jitted (one compile rather
    than one per op and shape)."""
    seg_args = seg if seg is not None else (None, None)

    def run(q, k, v, d_out, d_lse, seg_args):
        (out, lse), vjp = jax.vjp(lambda q_, k_, v_: flash_attention_reference(
            q_, k_, v_, *seg_args, compute_dtype=compute_dtype, **options), q, k, v)
        return out, lse, vjp((d_out.astype(out.dtype), d_lse.astype(lse.dtype)))

    return jax.jit(run)(q, k, v, d_out, d_lse, seg_args)


def _check(B, T, S, N, K, H, *, causal, window=None, softcap=None, segments=False, scale=None,
           dtype="bfloat16", block_sizes=None, interpret=False, seed=0, deterministic=True):
    q, k, v, d_out, d_lse = _inputs(B, T, S, N, K, H, dtype, seed)
    seg = _packed_segments(B, T, S, seed, num_segments=3) if segments else None
    options = {"causal": causal, "window": window, "softcap": softcap, "scale": scale}
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _, o_lse, oracle = _reference_grads(*f32, d_out, d_lse, seg, options)
    _, _, low = _reference_grads(q, k, v, d_out, d_lse, seg, options,
                                 compute_dtype=jnp.dtype(dtype))
    # The forward's (out, lse), as the Mosaic GPU forward would hand them over.
    out, lse = _reference(q, k, v, *(seg or (None, None)), **options)
    got = flash_attention_mgpu_backward(q, k, v, out, lse, d_out, d_lse, segment_ids=seg,
                                        block_sizes=block_sizes, interpret=interpret,
                                        deterministic=deterministic, **options)
    as_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    for name, g, want, o, lp in zip(("dq", "dk", "dv"), got, (q, k, v), oracle, low):
        assert g.shape == want.shape and g.dtype == want.dtype, name
        assert np.all(np.isfinite(as_f32(g))), f"{name}: not finite"
        assert_within_policy(name, as_f32(g), as_f32(o), as_f32(lp), dtype=dtype, factor=3)
    empty = np.isneginf(as_f32(o_lse))  # [B, N, T]: rows that see no key
    assert np.all(as_f32(got[0])[np.transpose(empty, (0, 2, 1))] == 0), "dq of an empty row"
    return empty


# ----------------------------------------------------------------------------- CPU

UNSUPPORTED = [
    # (what, q shape, k shape, dtype, block_sizes, error)
    ("float32", (1, 128, 2, 64), (1, 128, 2, 64), "float32", None, NotImplementedError),
    ("head dim 256", (1, 128, 2, 256), (1, 128, 2, 256), "bfloat16", None,
     NotImplementedError),
    ("head dim 96", (1, 128, 2, 96), (1, 128, 2, 96), "bfloat16", None, NotImplementedError),
    ("T not a tile multiple", (1, 192, 2, 64), (1, 128, 2, 64), "bfloat16", None,
     NotImplementedError),
    ("S not a tile multiple", (1, 128, 2, 64), (1, 192, 2, 64), "bfloat16", None,
     NotImplementedError),
    ("N % K", (1, 128, 3, 64), (1, 128, 2, 64), "bfloat16", None, ValueError),
    ("too much shared memory", (1, 256, 2, 128), (1, 256, 2, 128), "bfloat16",
     MosaicBackwardBlockSizes(block_q_dkv=256, num_stages_dkv=4), ValueError),
]


@pytest.mark.parametrize("what,q_shape,k_shape,dtype,block_sizes,error", UNSUPPORTED,
                         ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_inputs_raise_before_any_gpu_work(what, q_shape, k_shape, dtype,
                                                      block_sizes, error):
    q = jax.ShapeDtypeStruct(q_shape, jnp.dtype(dtype))  # no arrays: nothing may run
    k = jax.ShapeDtypeStruct(k_shape, jnp.dtype(dtype))
    with pytest.raises(error, match=r"."):
        check_supported_backward(q, k, k, causal=True, block_sizes=block_sizes,
                                 require_device=False)


def test_unsupported_message_names_the_fallback():
    q = jax.ShapeDtypeStruct((1, 128, 2, 256), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="head_dim.*Triton backward"):
        check_supported_backward(q, q, q, causal=False, require_device=False)


@pytest.mark.skipif(_on_hopper(), reason="checks the refusal off Hopper")
def test_refuses_without_a_hopper_gpu():
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="Hopper"):
        check_supported_backward(q, q, q, causal=True)


@pytest.mark.parametrize("kw", [{"block_k_dkv": 64}, {"block_q_dq": 192},
                                {"block_q_dkv": 96}, {"block_k_dq": 320},
                                {"num_stages_dq": 1}, {"consumer_registers": 250},
                                {"consumer_registers": 240, "producer_registers": 32},
                                {"overlap": True, "fused_dq": True}], ids=str)
def test_block_sizes_validate(kw):
    with pytest.raises(ValueError, match="MosaicBackwardBlockSizes"):
        MosaicBackwardBlockSizes(**kw)


def test_default_block_sizes_fit_shared_memory():
    for H in mgpu_bwd.SUPPORTED_HEAD_DIMS:
        bs = MosaicBackwardBlockSizes.default_for(q_len=4096, kv_len=4096, head_dim=H,
                                                  causal=True)
        for segments in (False, True):
            assert bs.smem_bytes_dkv(H, 2, segments=segments) <= mgpu_bwd.SMEM_BUDGET
            assert bs.smem_bytes_dq(H, 2, segments=segments) <= mgpu_bwd.SMEM_BUDGET


interpret_only = pytest.mark.skipif(jax.default_backend() == "gpu",
                                    reason="interpret mode is the CPU path")

# Tiny shapes under the default tiles: dK/dV key tiles of 128 (two consumers of 64 keys),
# query steps of 64 (H = 128) or 128 (H = 64); dQ query tiles of 128, key steps of 128; 2
# stages at H = 128, 4 (dK/dV) and 3 (dQ) at H = 64 (the last case wraps both rings). Each
# case says what
# it reaches.
INTERPRET_CASES = [
    # what, B, T, S, N, K, causal, window, softcap, segments
    ("plain", 1, 128, 128, 2, 1, False, None, None, False),
    ("GQA 2:1, causal", 1, 128, 128, 2, 1, True, None, None, False),
    ("T < S causal: shifted diagonal, skipped query tiles", 1, 128, 256, 1, 1, True, None,
     None, False),
    ("T > S causal: rows that see no key", 1, 256, 128, 1, 1, True, None, None, False),
    ("window both sides: skipped and masked tiles", 1, 256, 256, 1, 1, False, (40, 20),
     None, False),
    ("causal + left window, GQA", 1, 128, 256, 2, 1, True, (50, None), None, False),
    ("softcap", 1, 128, 128, 2, 1, False, None, 2.0, False),
    ("segment ids with lonely rows", 1, 128, 128, 2, 1, False, None, None, True),
    ("segment ids + causal + softcap, T > S", 1, 256, 128, 1, 1, True, None, 5.0, True),
    ("T = S = 640 causal: the 4-stage dK/dV and 3-stage dQ rings wrap", 1, 640, 640, 1, 1,
     True, None, None, False),
]


@interpret_only
@pytest.mark.parametrize("what,B,T,S,N,K,causal,window,softcap,segments", INTERPRET_CASES,
                         ids=[c[0] for c in INTERPRET_CASES])
def test_interpret_mode_matches_reference_gradients(what, B, T, S, N, K, causal, window,
                                                    softcap, segments):
    empty = _check(B, T, S, N, K, 64, causal=causal, window=window, softcap=softcap,
                   segments=segments, interpret=True)
    if segments or T > S:
        assert empty.any() and not empty.all(), "the case must have rows that see no key"


@interpret_only
def test_interpret_mode_head_dim_128_and_other_tiles():
    _check(1, 256, 256, 2, 1, 128, causal=True, interpret=True,
           block_sizes=MosaicBackwardBlockSizes(block_q_dkv=64, block_k_dkv=256,
                                                block_q_dq=256, block_k_dq=64,
                                                num_stages_dkv=2, num_stages_dq=2))


# The fused backward (fused_dq): one kernel, dQ added into an f32 accumulator. Interpret
# mode has no TMA reductions, so there each key tile writes its own slice (summed after);
# the products, the dS^T exchange between the consumers and their barriers run as on the GPU.
FUSED_64 = MosaicBackwardBlockSizes(block_q_dkv=128, num_stages_dkv=2, fused_dq=True)
FUSED_128 = MosaicBackwardBlockSizes(block_q_dkv=64, num_stages_dkv=2, fused_dq=True)
FUSED_CASES = [
    # what, B, T, S, N, K, H, causal, softcap, segments, block sizes
    ("GQA 2:1 causal, consumers split the query rows", 1, 256, 256, 4, 2, 64, True, None,
     False, FUSED_64),
    ("segment ids + softcap, T > S", 1, 256, 128, 1, 1, 64, True, 5.0, True, FUSED_64),
    ("T = S = 512 causal: the dS buffers and stages wrap", 1, 512, 512, 1, 1, 64, True, None,
     False, FUSED_64),
    ("H = 128, GQA causal, consumers split the head dim", 1, 256, 256, 2, 1, 128, True, None,
     False, FUSED_128),
]


@interpret_only
@pytest.mark.parametrize("what,B,T,S,N,K,H,causal,softcap,segments,bs", FUSED_CASES,
                         ids=[c[0] for c in FUSED_CASES])
def test_interpret_mode_fused_dq_matches_reference_gradients(what, B, T, S, N, K, H, causal,
                                                             softcap, segments, bs):
    _check(B, T, S, N, K, H, causal=causal, softcap=softcap, segments=segments,
           block_sizes=bs, interpret=True)


def test_fused_dq_refuses_tiles_it_cannot_split():
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="fused_dq needs block_q_dkv=128"):
        mgpu_bwd.check_supported_backward(
            q, q, q, causal=True, require_device=False,
            block_sizes=MosaicBackwardBlockSizes(block_q_dkv=64, fused_dq=True))
    # its shared memory is counted: a third stage does not fit next to the dS buffers
    with pytest.raises(ValueError, match="shared memory"):
        mgpu_bwd.check_supported_backward(
            q, q, q, causal=True, require_device=False,
            block_sizes=MosaicBackwardBlockSizes(block_q_dkv=128, num_stages_dkv=3,
                                                 fused_dq=True))


@interpret_only
@pytest.mark.parametrize("in_kernel", [False, True], ids=["delta by XLA", "delta in dQ"])
def test_interpret_mode_delta_either_way(in_kernel):
    """delta = rowsum(dO * O) - dlse computed by XLA before both kernels, or by the dQ
    kernel (run first) for the dK/dV kernel: the same gradients, dlse included."""
    bs = MosaicBackwardBlockSizes(block_q_dkv=128, block_k_dq=128, num_stages_dkv=2,
                                  num_stages_dq=2, delta_in_dq_kernel=in_kernel)
    assert bs.smem_bytes_dq(64, 2) - MosaicBackwardBlockSizes(
        block_k_dq=128, num_stages_dq=2).smem_bytes_dq(64, 2) == (128 * 64 * 2 if in_kernel
                                                                    else 0)
    _check(1, 256, 128, 2, 1, 64, causal=True, softcap=3.0, interpret=True, block_sizes=bs)


# The H = 64 case is the default's shape where K + V overflow the L2: it also launches head
# by head (both kernels find their tile by axis name) and computes delta in the dQ kernel.
OVERLAP_64 = MosaicBackwardBlockSizes(block_q_dkv=128, block_k_dq=128, num_stages_dkv=2,
                                      num_stages_dq=2, overlap=True, head_major=True,
                                      delta_in_dq_kernel=True)
OVERLAP_128 = MosaicBackwardBlockSizes(block_k_dq=128, overlap=True)


@interpret_only
@pytest.mark.parametrize("what,T,S,H,causal,window,softcap,segments,bs", [
    ("GQA causal + window + softcap + segment ids, T > S", 256, 128, 64, True, (100, None),
     3.0, True, OVERLAP_64),
    ("H = 128, T < S causal", 128, 256, 128, True, None, None, False, OVERLAP_128),
], ids=lambda c: c if isinstance(c, str) else None)
def test_interpret_mode_overlap_matches_reference_gradients(what, T, S, H, causal, window,
                                                            softcap, segments, bs):
    """overlap: the score-sized products issued in pairs, P under dP, dV and dK together
    (the order of waits changes, no number)."""
    _check(1, T, S, 2, 1, H, causal=causal, window=window, softcap=softcap,
           segments=segments, interpret=True, block_sizes=bs)


@interpret_only
def test_interpret_mode_negative_scale():
    _check(1, 128, 128, 2, 1, 64, causal=True, scale=-0.1, interpret=True)


@interpret_only
def test_interpret_mode_same_as_the_triton_backward():
    """Swappable with flash_attention_backward: same signature, same numbers (both f32
    accumulations of bf16 products; equal up to summation order)."""
    from pallas_kernels.flash_attention import flash_attention_backward

    q, k, v, d_out, d_lse = _inputs(1, 128, 128, 2, 1, 64, "bfloat16", 7)
    out, lse = flash_attention_reference(q, k, v, causal=True, window=(60, None),
                                         softcap=4.0, scale=0.2)
    kwargs = {"causal": True, "window": (60, None), "softcap": 4.0, "scale": 0.2,
              "interpret": True}
    ours = flash_attention_mgpu_backward(q, k, v, out, lse, d_out, d_lse, **kwargs)
    triton = flash_attention_backward(q, k, v, out, lse, d_out, d_lse, **kwargs)
    for name, a, b in zip(("dq", "dk", "dv"), ours, triton):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=3e-2, rtol=3e-2, err_msg=name)


@pytest.mark.parametrize("mode", ["two kernels", "fused", "overlap"])
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("causal,window,softcap,segments", [
    (False, None, None, False),
    (True, None, None, False),
    (True, (128, None), 30.0, True),
], ids=["plain", "causal", "causal-window-softcap-segments"])
def test_lowers_for_cuda(H, causal, window, softcap, segments, mode, monkeypatch):
    """Both kernels (or the fused one) lower to Mosaic GPU for CUDA, on the CPU
    (tests/test_gpu_lowering.py's method; the Hopper device check is lifted: there is none
    here)."""
    check = mgpu_bwd.check_supported_backward
    monkeypatch.setattr(mgpu_bwd, "check_supported_backward",
                        lambda *a, **kw: check(*a, **{**kw, "require_device": False}))
    B, T, S, N, K = 1, 512, 512, 4, 2
    zeros = lambda *shape, dtype=jnp.bfloat16: jnp.zeros(shape, dtype)
    seg = (zeros(B, T, dtype=jnp.int32), zeros(B, S, dtype=jnp.int32)) if segments else None

    fused = mode == "fused"
    bs = {"two kernels": None, "fused": FUSED_64 if H == 64 else FUSED_128,
          "overlap": OVERLAP_64 if H == 64 else OVERLAP_128}[mode]

    def backward(q, k, v, out, lse, d_out):
        return flash_attention_mgpu_backward(q, k, v, out, lse, d_out, causal=causal,
                                             window=window, softcap=softcap, segment_ids=seg,
                                             interpret=False, block_sizes=bs)

    lowered = jax.jit(backward).trace(
        zeros(B, T, N, H), zeros(B, S, K, H), zeros(B, S, K, H), zeros(B, T, N, H),
        zeros(B, N, T, dtype=jnp.float32), zeros(B, T, N, H)).lower(
            lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("custom_call") >= (1 if fused else 2), "kernels missing from the module"


# ----------------------------------------------------------------------------- Hopper GPU

hopper = pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (Hopper) GPU")

GPU_CASES = [
    # B, T, S, N, K, H, causal, window, softcap, segments
    (2, 1024, 1024, 8, 2, 128, True, None, None, False),  # GQA 4:1
    (1, 1024, 1024, 4, 4, 128, False, None, None, False),
    (2, 1024, 1024, 4, 1, 64, True, None, None, False),  # MQA, H = 64
    (1, 512, 1024, 4, 2, 128, True, None, None, False),  # T < S
    (1, 1024, 512, 4, 2, 64, True, None, None, False),  # T > S: rows see no key
    (1, 1024, 1024, 4, 2, 128, True, (256, None), 30.0, False),  # skipped tiles, softcap
    (1, 1024, 1024, 4, 2, 128, False, (200, 300), None, True),  # segments
    (1, 2048, 2048, 4, 2, 128, True, None, None, True),  # many steps: the rings wrap
]


@hopper
@pytest.mark.parametrize("B,T,S,N,K,H,causal,window,softcap,segments", GPU_CASES, ids=str)
def test_gpu_matches_reference_gradients(B, T, S, N, K, H, causal, window, softcap, segments):
    _check(B, T, S, N, K, H, causal=causal, window=window, softcap=softcap, segments=segments)


@hopper
@pytest.mark.parametrize("B,T,S,N,K,H,causal,window,softcap,segments", GPU_CASES, ids=str)
def test_gpu_fused_dq_matches_reference_gradients(B, T, S, N, K, H, causal, window, softcap,
                                                   segments):
    """The fused backward (TMA reduce-add of dQ, which interpret mode cannot run)."""
    _check(B, T, S, N, K, H, causal=causal, window=window, softcap=softcap, segments=segments,
           block_sizes=FUSED_64 if H == 64 else FUSED_128)


@hopper
@pytest.mark.parametrize("B,T,S,N,K,H,causal,window,softcap,segments",
                         [GPU_CASES[i] for i in (0, 2, 4, 6)], ids=str)
def test_gpu_other_product_order_matches_reference_gradients(B, T, S, N, K, H, causal,
                                                             window, softcap, segments):
    """The default tiles with `overlap` flipped (on at H = 128 by default, off at H = 64)."""
    default = MosaicBackwardBlockSizes.default_for(q_len=T, kv_len=S, head_dim=H,
                                                   causal=causal)
    _check(B, T, S, N, K, H, causal=causal, window=window, softcap=softcap, segments=segments,
           block_sizes=dataclasses.replace(default, overlap=not default.overlap))


@hopper
@pytest.mark.parametrize("B,T,S,N,K,H,causal,window,softcap,segments",
                         [GPU_CASES[i] for i in (0, 6)], ids=str)
def test_gpu_head_major_matches_reference_gradients(B, T, S, N, K, H, causal, window,
                                                    softcap, segments):
    """The default tiles launched head by head."""
    default = MosaicBackwardBlockSizes.default_for(q_len=T, kv_len=S, head_dim=H,
                                                   causal=causal)
    _check(B, T, S, N, K, H, causal=causal, window=window, softcap=softcap, segments=segments,
           block_sizes=dataclasses.replace(default, head_major=True))


@hopper
@pytest.mark.parametrize("B,T,S,N,K,H,causal,window,softcap,segments",
                         [c for c in GPU_CASES if c[5] == 64] + [
                             (1, 1024, 1024, 4, 2, 64, False, (200, 300), 30.0, True)],
                         ids=str)
def test_gpu_h64_default_over_the_l2_matches_reference_gradients(
        B, T, S, N, K, H, causal, window, softcap, segments, monkeypatch):
    """The H = 64 default where K + V overflow the L2 (the L2 taken as 0 here): paired
    products, delta in the dQ kernel, head by head."""
    monkeypatch.setattr(mgpu_bwd, "GPU_L2_BYTES", 0)
    bs = MosaicBackwardBlockSizes.default_for(q_len=T, kv_len=S, head_dim=H, causal=causal,
                                              kv_bytes=1)
    assert bs.overlap and bs.delta_in_dq_kernel and bs.head_major
    _check(B, T, S, N, K, H, causal=causal, window=window, softcap=softcap, segments=segments)


@hopper
def test_gpu_deterministic():
    q, k, v, d_out, d_lse = _inputs(1, 1024, 1024, 4, 2, 128, "bfloat16", 3)
    out, lse = flash_attention_reference(q, k, v, causal=True)
    first = flash_attention_mgpu_backward(q, k, v, out, lse, d_out, d_lse, causal=True)
    second = flash_attention_mgpu_backward(q, k, v, out, lse, d_out, d_lse, causal=True)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@hopper
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_not_deterministic_allows_the_fused_backward(H, monkeypatch):
    """deterministic=False on the GPU, with the rule's thresholds lowered so that this shape
    takes the fused kernel."""
    monkeypatch.setattr(mgpu_bwd, "GPU_L2_BYTES", 0)
    monkeypatch.setattr(mgpu_bwd, "FUSED_MIN_KV_LEN", 1024)
    _check(2, 1024, 1024, 4, 2, H, causal=H == 64, deterministic=False)


@pytest.mark.parametrize("H,T,causal,heads,fused", [
    (128, 16384, False, 16, True), (64, 16384, True, 32, True), (128, 4096, False, 16, True),
    (64, 1024, True, 32, True),
    (128, 16384, True, 16, False),  # causal at H = 128: the two kernels measured faster
    (128, 1024, False, 16, False),  # short rows at H = 128
    (64, 2048, True, 8, False),  # the train step's shape: K/V in L2
])
def test_not_deterministic_takes_the_fused_backward_where_it_measured_faster(H, T, causal,
                                                                             heads, fused):
    B = 16384 // T
    kv = B * T * heads * H * 2 * 2
    pick = lambda **kw: MosaicBackwardBlockSizes.default_for(
        q_len=T, kv_len=T, head_dim=H, causal=causal, kv_bytes=kv, **kw)
    assert pick(deterministic=False).fused_dq == fused
    assert not pick().fused_dq  # the default stays deterministic


@pytest.mark.parametrize("H,kv_mib,overlap", [(64, 128, True), (64, 32, False),
                                               (128, 32, True), (128, 128, True)])
def test_paired_products_where_measured_faster(H, kv_mib, overlap):
    """H = 64 pairs the products only where K + V overflow the L2 (session 13), and there
    computes delta in the dQ kernel (session 14); H = 128 pairs them always (session 9)."""
    bs = MosaicBackwardBlockSizes.default_for(q_len=4096, kv_len=4096, head_dim=H,
                                              causal=True, kv_bytes=kv_mib * 2**20)
    assert bs.overlap == overlap and not bs.fused_dq
    assert bs.delta_in_dq_kernel == (H == 64 and kv_mib > 50)


def test_not_deterministic_reaches_the_block_sizes(monkeypatch):
    monkeypatch.setattr(mgpu_bwd, "GPU_L2_BYTES", 0)
    monkeypatch.setattr(mgpu_bwd, "FUSED_MIN_KV_LEN", 256)
    z = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)
    check = functools.partial(mgpu_bwd.check_supported_backward, z, z, z, causal=True,
                              require_device=False)
    assert check(deterministic=False).fused_dq and not check().fused_dq
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        check(deterministic="no")


@interpret_only
def test_mgpu_bwd_check_tiny_writes_json(tmp_path):
    """experiments/mgpu_bwd_check.py's tiny variant (STYLE.md 10): the Mosaic backward in
    interpret mode against the Triton backward, JSON written."""
    import json

    from experiments import mgpu_bwd_check

    mgpu_bwd_check.main(["--tiny", "--out", str(tmp_path / "bwd.json")])
    rows = json.loads((tmp_path / "bwd.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"triton", "mosaic"}
    ours = next(r for r in rows if r["impl"] == "mosaic")
    assert "error" not in ours, ours.get("error")
    assert ours["ms"] > 0 and ours["rel_err_vs_triton"] < 2e-2
