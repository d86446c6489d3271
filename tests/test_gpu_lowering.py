"""Every Pallas GPU kernel lowers for CUDA, checked on the CPU.

The interpret-mode tests check the numbers but not the lowering: Triton's and Mosaic GPU's
lowering rules refuse things the interpreter runs happily (a fill value without a mask, a
layout the hardware lacks), and such a kernel first fails on the GPU, in a benchmark. JAX
lowers for a platform it does not run on (`lower(lowering_platforms=("cuda",))`): the Pallas
kernels become Triton IR / Mosaic GPU MLIR here, no GPU needed. What this cannot see: errors
of the Triton / ptxas compile that XLA runs on the GPU, and anything about speed.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.decode_attention import DecodeBlockSizes, decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.fused_rmsnorm import add_rmsnorm
from pallas_kernels.fused_swiglu import swiglu
from pallas_kernels.paged_attention import (
    RaggedBlockSizes,
    RaggedTile,
    paged_decode_attention,
    ragged_paged_attention,
)
from pallas_kernels.rope_kv_write import rope_write_kv

BF16 = jnp.bfloat16


def lowers_for_cuda(fn, *args):
    """fn(*args) traced and lowered for CUDA; returns the module's text (raises on failure)."""
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "custom_call" in text, "no kernel in the lowered module: interpret mode ran?"
    return text


def zeros(*shape, dtype=BF16):
    return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("causal,window,softcap,segments,T,S,H", [
    (False, None, None, False, 128, 128, 64),
    (True, None, None, False, 128, 256, 128),
    (True, (32, 0), None, False, 200, 200, 64),  # ragged lengths, sliding window
    (False, (16, 16), 30.0, True, 128, 96, 64),
    (True, None, None, True, 256, 256, 96),  # padded head dim
])
def test_flash_attention_forward_and_backward_lower(causal, window, softcap, segments, T, S, H):
    q, k = zeros(2, T, 4, H), zeros(2, S, 2, H)
    seg = (jnp.zeros((2, T), jnp.int32), jnp.zeros((2, S), jnp.int32)) if segments else (None,
                                                                                         None)

    def loss(q, k, v):
        out, _ = flash_attention(q, k, v, *seg, causal=causal, window=window, softcap=softcap)
        return out.astype(jnp.float32).sum()

    lowers_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, k)


@pytest.mark.parametrize("window_left,softcap", [(None, None), (100, 20.0)])
def test_decode_kernels_lower(window_left, softcap):
    B, S, K, H, page = 3, 512, 2, 128, 16
    q, k = zeros(B, 8, H), zeros(B, S, K, H)
    lengths = jnp.full((B,), S, jnp.int32)
    lowers_for_cuda(lambda q, k, v: decode_attention(q, k, v, lengths, window_left=window_left,
                                                      softcap=softcap), q, k, k)
    pages = zeros(K, B * S // page, page, H)
    tables = jnp.zeros((B, S // page), jnp.int32)
    for reading in ({}, dict(prefetch_page_ids=True), dict(preload_page_ids=True)):
        bs = DecodeBlockSizes(**reading)
        lowers_for_cuda(lambda q, kp, vp: paged_decode_attention(
            q, kp, vp, tables, lengths, window_left=window_left, softcap=softcap,
            block_sizes=bs), q, pages, pages)


@pytest.mark.parametrize("max_q_len", [1, 16, 64])  # decode-only, decode launch, both
@pytest.mark.parametrize("window_left,softcap", [(None, None), (8, 5.0)])
def test_ragged_paged_attention_lowers(max_q_len, window_left, softcap):
    T, N, H, K, P, page, S = 64, 4, 64, 2, 16, 16, 4
    pages = zeros(K, P, page, H)
    tables = jnp.zeros((S, 4), jnp.int32)
    ctx = jnp.full((S,), 64, jnp.int32)
    starts = jnp.asarray([0, 16, 32, 48, 64], jnp.int32)
    for prefetch in (False, True):
        tile = functools.partial(RaggedTile, prefetch_page_ids=prefetch)
        bs = RaggedBlockSizes(decode=tile(block_q=1, block_k=128),
                              prefill=tile(block_q=64, block_k=128, num_warps=8))
        lowers_for_cuda(lambda q, kp, vp: ragged_paged_attention(
            q, kp, vp, tables, ctx, starts, S, max_q_len=max_q_len, window_left=window_left,
            softcap=softcap, block_sizes=bs), zeros(T, N, H), pages, pages)


def test_fused_kernels_lower():
    x, w = zeros(64, 256), zeros(256)

    def norm_loss(x, r, w):
        normed, summed = add_rmsnorm(x, r, w, eps=1e-6, interpret=False)
        return (normed.astype(jnp.float32).sum() + summed.astype(jnp.float32).sum())

    lowers_for_cuda(jax.value_and_grad(norm_loss, argnums=(0, 1, 2)), x, x, w)
    w_gate = zeros(256, 512)
    lowers_for_cuda(jax.value_and_grad(lambda x, g, u: swiglu(x, g, u, interpret=False).astype(
        jnp.float32).sum(), argnums=(0, 1, 2)), x, w_gate, w_gate)
    T, N, K, H, P, page = 32, 4, 2, 64, 8, 16
    inv_freq = jnp.ones((H // 2,), jnp.float32)
    slots, positions = jnp.arange(T, dtype=jnp.int32), jnp.arange(T, dtype=jnp.int32)
    lowers_for_cuda(lambda q, kn, vn, kp, vp: rope_write_kv(
        q, kn, vn, kp, vp, slots, positions, inv_freq, interpret=False),
        zeros(T, N, H), zeros(T, K, H), zeros(T, K, H), zeros(K, P, page, H),
        zeros(K, P, page, H))


def _lift_hopper_checks(monkeypatch):
    """The Mosaic kernels' argument checks without their check for a Hopper device (there is
    none here); returns the forward's module."""
    from pallas_kernels import flash_attention_mgpu as mgpu
    from pallas_kernels import flash_attention_mgpu_bwd as mgpu_bwd

    def without_device(check):
        return lambda *a, **kw: check(*a, **{**kw, "require_device": False})

    for module, name in ((mgpu, "check_supported"), (mgpu_bwd, "check_supported_backward")):
        monkeypatch.setattr(module, name, without_device(getattr(module, name)))
    return mgpu


@pytest.mark.parametrize("causal,window,softcap,segments,H,backward", [
    (True, None, None, False, 128, "triton"),
    (False, None, None, False, 64, "triton"),
    (True, None, None, False, 256, "triton"),
    (True, (128, 0), None, False, 128, "triton"),
    (False, (64, 64), 30.0, False, 64, "triton"),
    (True, None, None, True, 128, "triton"),
    (True, (128, 0), 30.0, True, 128, "mosaic"),
    (False, None, None, False, 64, "mosaic"),
])
def test_mosaic_flash_attention_lowers(causal, window, softcap, segments, H, backward,
                                       monkeypatch):
    """The Hopper kernel (Mosaic GPU: wgmma layouts, TMA, barriers) lowers, with either
    backward (Triton, or Mosaic GPU). (Its checks for a Hopper device are lifted: there is
    none here.)"""
    flash_attention_mgpu = _lift_hopper_checks(monkeypatch).flash_attention_mgpu
    T = S = 512
    q, k = zeros(1, T, 4, H), zeros(1, S, 2, H)
    seg = (jnp.zeros((1, T), jnp.int32), jnp.zeros((1, S), jnp.int32)) if segments else None

    def loss(q, k, v):
        out, _ = flash_attention_mgpu(q, k, v, causal=causal, window=window, softcap=softcap,
                                      segment_ids=seg, backward=backward)
        return out.astype(jnp.float32).sum()

    lowers_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, k)


def test_mosaic_forward_key_tail_lowers(monkeypatch):
    """S = 520, not a multiple of the 128- or 192-key tiles: the last key tile starts at
    S - block_k (192-key tiles fit at H = 128 with the lse rows stored from registers)."""
    mgpu = _lift_hopper_checks(monkeypatch)
    q, k = zeros(1, 512, 4, 128), zeros(1, 520, 2, 128)
    for bs in (mgpu.MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True),
               mgpu.MosaicBlockSizes(block_k=192, num_stages=2, overlap_softmax=True,
                                     lse_through_smem=False)):
        lowers_for_cuda(lambda q, k, v: mgpu.flash_attention_mgpu(
            q, k, v, causal=False, block_sizes=bs)[0], q, k, k)


@pytest.mark.parametrize("overlap_softmax,pingpong,persistent,consumers", [
    (True, True, False, 2), (False, False, False, 2), (True, False, False, 2),
    (False, True, True, 2), (True, False, True, 2), (True, False, False, 4),
    (True, False, False, 3)])
@pytest.mark.parametrize("causal,window,segments", [(True, None, False),
                                                    (False, (64, 64), True)])
def test_mosaic_forward_schedules_lower(overlap_softmax, pingpong, persistent, consumers,
                                        causal, window, segments, monkeypatch):
    """The forward's scheduling options lower for the GPU (the softmax under an in-flight
    PV product: a wgmma accumulator read while a later group runs, values out of run_state)."""
    mgpu = _lift_hopper_checks(monkeypatch)
    # Three consumers: 192-query tiles, so T = 512 ends in a ragged tile (2 of 3 consumers).
    bs = mgpu.MosaicBlockSizes(block_q=192 if consumers == 3 else 256, block_k=64,
                               num_stages=4, pingpong=pingpong,
                               overlap_softmax=overlap_softmax, persistent=persistent,
                               consumers=consumers)
    T = S = 512
    q, k = zeros(1, T, 4, 64), zeros(1, S, 2, 64)
    seg = (jnp.zeros((1, T), jnp.int32), jnp.zeros((1, S), jnp.int32)) if segments else None
    lowers_for_cuda(lambda q, k, v: mgpu.flash_attention_mgpu(
        q, k, v, causal=causal, window=window, segment_ids=seg, block_sizes=bs)[0], q, k, k)


@pytest.mark.parametrize("max_q_len", [1, 64], ids=["decode-only", "mixed"])
@pytest.mark.parametrize("filters", [False, True])
def test_engine_step_lowers_without_host_round_trips(max_q_len, filters):
    """The whole jitted engine step, as a GPU would run it (Pallas kernels, not interpret
    mode): no while loop or conditional anywhere in it. XLA's GPU runtime steps those from the
    host — it reads the loop test or the branch index back and waits for it — so one of them
    blocks the step's launch until the device has caught up, and the host can no longer
    prepare step n + 1 while step n runs (measured: a 256-sequence decode step's call took
    5.3 ms and returned with the device already done)."""
    import dataclasses
    from unittest import mock

    from fastattn.engine import Engine, EngineConfig
    from fastattn.sampling import SamplingParams, SamplingTensors
    from models import TINY, Llama

    model = Llama(dataclasses.replace(TINY, max_position_embeddings=256, dtype="bfloat16"))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    engine = Engine(model, params, EngineConfig(  # fusion: what a GPU's default turns on
        page_size=16, num_pages=64, token_budget=64, max_num_seqs=8, max_model_len=128,
        inference_fusion=True))
    args = list(engine._warmup_args(64, max_q_len))  # what warmup() compiles for bucket 64
    if filters:  # a batch whose row samples with top_k and top_p: the sampler's other variant
        args[1] = SamplingTensors.build([SamplingParams(temperature=0.8, top_k=20, top_p=0.9)],
                                        pad_to=8)
    with mock.patch("jax.default_backend", return_value="gpu"):  # the kernels, not interpret
        lowered = engine._step_fn.lower(engine.params, engine.kv, *args, num_logprobs=0,
                                        lowering_platforms=("cuda",))
    model, sampler = (part.as_text() for part in lowered)
    assert "custom_call" in model
    for op in ("stablehlo.while", "stablehlo.case", "stablehlo.if"):
        assert op not in model and op not in sampler, f"{op} in the engine step"
