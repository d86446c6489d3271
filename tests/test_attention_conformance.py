"""One conformance suite for the `fastattn.attention` contract, run against every
implementation (the Pallas kernels in interpret mode on CPU). STYLE.md 11-13, RELIABILITY.md 1-6."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastattn
from pallas_kernels.flash_attention import BlockSizes, flash_attention

from tests.attention_cases import (
    LONELY_KV_SEGMENT, Case, cotangents, make_inputs, reference_results,
    value_and_grads)
from tests.tolerance import assert_within_policy

IMPLEMENTATIONS = ["pallas", "xla", "reference"]

# Small tiles so that a few dozen rows already span several tiles in every kernel, and
# uneven q / k tiles so that the tile-range arithmetic is not symmetric by accident.
SMALL_TILES = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                         block_q_dq=16, block_k_dq=32, num_warps=4)

CASES = [
    # lengths, T != S both ways
    Case(1, 1, 1, 2, 1, 64),
    Case(2, 17, 17, 4, 2, 40),
    Case(1, 97, 97, 2, 2, 80, causal=True),
    Case(1, 113, 113, 2, 1, 96, dtype="bfloat16", causal=True),
    Case(1, 17, 97, 4, 1, 32, causal=True),
    Case(1, 97, 17, 2, 1, 32, causal=True),  # early rows see no key at all
    Case(1, 3, 113, 8, 1, 111),  # MQA 8:1, odd head dim
    Case(1, 113, 2, 4, 4, 64),
    # GQA ratios
    Case(1, 33, 45, 8, 4, 32, dtype="float16", causal=True),
    Case(1, 40, 40, 16, 1, 32, dtype="bfloat16"),
    # windows and softcap
    Case(1, 70, 70, 2, 1, 64, window=(9, 0)),
    Case(1, 50, 80, 2, 1, 64, causal=True, window=(20, None)),
    Case(1, 60, 45, 2, 2, 48, window=(5, 11)),
    Case(1, 48, 48, 2, 1, 64, window=(None, 3)),
    Case(1, 64, 64, 2, 1, 64, causal=True, softcap=5.0, dtype="bfloat16"),
    Case(1, 37, 53, 4, 2, 64, softcap=2.0, scale=0.3),
    # packed sequences (with a query segment that no key has, and a key nobody sees)
    Case(2, 45, 45, 2, 1, 32, segments=True),
    Case(2, 40, 66, 4, 2, 64, causal=True, segments=True, dtype="bfloat16"),
    Case(1, 66, 66, 2, 1, 32, window=(7, 7), segments=True, softcap=4.0),
    # head dims up to 256
    Case(1, 24, 24, 2, 1, 256, causal=True, dtype="bfloat16"),
]


def _call(impl, case, q, k, v, segment_ids, block_sizes=SMALL_TILES):
    def fn(q_, k_, v_):
        return fastattn.attention(q_, k_, v_, segment_ids=segment_ids, return_lse=True,
                                  implementation=impl, block_sizes=block_sizes, **case.options)
    return fn


def _check_against_oracle(impl, case, block_sizes=SMALL_TILES):
    q, k, v, seg = make_inputs(case)
    do, dlse = cotangents(case)
    (out, lse), grads = jax.tree.map(
        np.asarray, value_and_grads(_call(impl, case, q, k, v, seg, block_sizes), q, k, v, do, dlse))
    (o_out, o_lse), o_grads = reference_results(case, q, k, v, seg, do, dlse, "float64")
    (l_out, l_lse), l_grads = reference_results(case, q, k, v, seg, do, dlse, case.dtype)

    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (case.B, case.N, case.T)
    assert_within_policy("out", out, o_out, l_out, dtype=case.dtype, factor=2)
    assert_within_policy("lse", lse, o_lse, l_lse, dtype=case.dtype, factor=2)
    for name, g, o_g, l_g in zip(("dq", "dk", "dv"), grads, o_grads, l_grads):
        assert np.all(np.isfinite(g)), f"{name} has non-finite entries"
        assert_within_policy(name, g, o_g, l_g, dtype=case.dtype, factor=3)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_matches_float64_oracle(impl, case):
    _check_against_oracle(impl, case)


def test_pallas_default_tiles_long_ragged_sequence():
    _check_against_oracle("pallas", Case(1, 1025, 1023, 2, 1, 64, dtype="bfloat16", causal=True),
                          block_sizes=None)


@pytest.mark.parametrize("causal", [False, True])
def test_pallas_packed_documents_skip_and_unmask_whole_tiles(causal):
    """Long packed documents: most tiles lie inside one document (run without a mask) or
    across two (skipped); only boundary tiles are masked. Every kernel (forward, dK/dV, dQ)
    against the float64 oracle, with NaN keys in a document no query of the test reads."""
    lengths = [70, 10, 80]  # documents of 160 tokens; tiles of 16 / 32 rows
    ids = np.repeat(np.arange(len(lengths)), lengths)[None]
    case = Case(1, 160, 160, 4, 2, 32, causal=causal, segments=True)
    q, k, v, _ = make_inputs(case)
    seg = (jnp.asarray(ids, jnp.int32), jnp.asarray(ids, jnp.int32))
    do, dlse = cotangents(case)
    (out, lse), grads = jax.tree.map(
        np.asarray, value_and_grads(_call("pallas", case, q, k, v, seg), q, k, v, do, dlse))
    (o_out, o_lse), o_grads = reference_results(case, q, k, v, seg, do, dlse, "float64")
    (l_out, l_lse), l_grads = reference_results(case, q, k, v, seg, do, dlse, case.dtype)
    assert_within_policy("out", out, o_out, l_out, dtype=case.dtype, factor=2)
    assert_within_policy("lse", lse, o_lse, l_lse, dtype=case.dtype, factor=2)
    for name, g, o_g, l_g in zip(("dq", "dk", "dv"), grads, o_grads, l_grads):
        assert_within_policy(name, g, o_g, l_g, dtype=case.dtype, factor=3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [
    Case(1, 20, 6, 2, 1, 32, causal=True),  # T > S: the first 14 rows see no key
    Case(2, 30, 30, 2, 2, 32, segments=True),  # last row's segment has no key
    Case(1, 8, 40, 2, 1, 32, window=(0, None), causal=True, segments=True),
], ids=str)
def test_rows_that_see_no_key(impl, case):
    q, k, v, seg = make_inputs(case)
    do, dlse = cotangents(case)
    (out, lse), (dq, dk, dv) = jax.tree.map(
        np.asarray, value_and_grads(_call(impl, case, q, k, v, seg), q, k, v, do, dlse))
    (o_out, o_lse), _ = reference_results(case, q, k, v, seg, do, dlse, "float64")
    empty = np.isneginf(o_lse)  # [B, N, T]
    assert empty.any(), "the case must contain rows that see no key"
    empty_btn = np.transpose(empty, (0, 2, 1))
    assert np.all(out[empty_btn] == 0)
    assert np.all(np.isneginf(lse[empty])) and np.all(np.isfinite(lse[~empty]))
    assert np.all(dq[empty_btn] == 0)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [
    Case(2, 40, 52, 4, 2, 32, segments=True),  # key 0 has a segment no query has
    Case(1, 24, 70, 2, 1, 32, causal=True, window=(10, None)),  # keys < 36 are outside every window
], ids=str)
def test_nan_in_unseen_keys_does_not_leak(impl, case):
    q, k, v, seg = make_inputs(case)
    do, dlse = cotangents(case)
    if case.segments:
        unseen = np.asarray(seg[1]) == LONELY_KV_SEGMENT  # [B, S]
    else:
        unseen = np.zeros((case.B, case.S), bool)
        unseen[:, : case.S - case.T - case.window[0]] = True
    poison = jnp.asarray(unseen)[:, :, None, None]
    k_bad = jnp.where(poison, jnp.nan, k)
    v_bad = jnp.where(poison, jnp.inf, v)
    clean = value_and_grads(_call(impl, case, q, k, v, seg), q, k, v, do, dlse)
    dirty = value_and_grads(_call(impl, case, q, k_bad, v_bad, seg), q, k_bad, v_bad, do, dlse)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nan_in_queries_that_see_no_key_does_not_leak(impl):
    case = Case(1, 40, 12, 2, 1, 32, causal=True)  # T > S: rows 0..27 see no key
    q, k, v, seg = make_inputs(case)
    do, dlse = cotangents(case)
    empty = (jnp.arange(case.T) + case.S - case.T < 0)[None, :, None, None]
    q_bad = jnp.where(empty, jnp.nan, q)
    do_bad = jnp.where(empty, jnp.nan, do)
    (out, lse), (dq, dk, dv) = value_and_grads(_call(impl, case, q, k, v, seg), q, k, v, do, dlse)
    (out2, lse2), (dq2, dk2, dv2) = value_and_grads(
        _call(impl, case, q_bad, k, v, seg), q_bad, k, v, do_bad, dlse)
    for a, b in ((out, out2), (lse, lse2), (dk, dk2), (dv, dv2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The empty rows' own query gradient is 0 whatever their (poisoned) inputs were.
    np.testing.assert_array_equal(np.asarray(dq2)[:, : case.T - case.S], 0)


def test_pallas_backward_matches_its_reference_switch():
    """backward="reference" (the debugging switch) differentiates the reference instead."""
    case = Case(1, 45, 61, 4, 2, 32, causal=True, softcap=3.0)
    q, k, v, _ = make_inputs(case)
    do, dlse = cotangents(case)
    grads = {}
    for backward in ("pallas", "reference"):
        fn = lambda q_, k_, v_, backward=backward: flash_attention(
            q_, k_, v_, causal=True, softcap=3.0, block_sizes=SMALL_TILES, interpret=True,
            backward=backward)
        grads[backward] = value_and_grads(fn, q, k, v, do, dlse)[1]
    for a, b in zip(grads["pallas"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_two_runs_are_bitwise_equal(impl):
    case = Case(2, 50, 70, 4, 2, 48, causal=True, dtype="bfloat16")
    q, k, v, seg = make_inputs(case)
    do, dlse = cotangents(case)
    first = value_and_grads(_call(impl, case, q, k, v, seg), q, k, v, do, dlse)
    second = value_and_grads(_call(impl, case, q, k, v, seg), q, k, v, do, dlse)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_implementations_under_jit_and_without_lse():
    case = Case(1, 33, 33, 2, 1, 32, causal=True)
    q, k, v, _ = make_inputs(case)
    outs = {impl: jax.jit(lambda q_, k_, v_, impl=impl: fastattn.attention(
        q_, k_, v_, causal=True, implementation=impl))(q, k, v) for impl in IMPLEMENTATIONS}
    for impl, out in outs.items():
        assert out.shape == q.shape
        np.testing.assert_allclose(out, outs["reference"], atol=1e-5, err_msg=impl)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU default")
def test_default_implementation_on_cpu_is_xla():
    q = jnp.ones((1, 4, 2, 8))
    assert fastattn.default_implementation(q) == "xla"


def _shapes(T, S, H, dtype=jnp.bfloat16, N=4, K=2):
    return (jax.ShapeDtypeStruct((2, T, N, H), dtype), jax.ShapeDtypeStruct((2, S, K, H), dtype))


@pytest.mark.parametrize("hopper, T, S, H, dtype, options, want", [
    (True, 1024, 1024, 128, jnp.bfloat16, dict(causal=True), "pallas_mosaic_bwd"),
    (True, 512, 1024, 128, jnp.float16, dict(causal=True), "pallas_mosaic_bwd"),
    (True, 1024, 1024, 128, jnp.bfloat16, dict(sliding_window=(256, 0)), "pallas_mosaic_bwd"),
    (True, 1024, 1024, 128, jnp.bfloat16, dict(causal=True, softcap=30.0), "pallas_mosaic_bwd"),
    (True, 2048, 2048, 64, jnp.bfloat16, dict(causal=True), "pallas_mosaic_bwd"),  # train step
    (True, 1024, 1024, 128, jnp.bfloat16, dict(causal=True, segment_ids=True), "pallas"),
    (True, 4096, 4096, 128, jnp.bfloat16, {}, "pallas_mosaic_bwd"),  # long, no mask
    # No mask, short or at H = 64: Mosaic since the head-major launch (session 10)
    (True, 1024, 1024, 128, jnp.bfloat16, {}, "pallas_mosaic_bwd"),
    (True, 1024, 1024, 128, jnp.bfloat16, dict(sliding_window=(256, None)), "pallas_mosaic_bwd"),
    (True, 4096, 4096, 64, jnp.bfloat16, {}, "pallas_mosaic_bwd"),
    (True, 1024, 1024, 256, jnp.bfloat16, dict(causal=True), "pallas"),  # no Mosaic backward
    (True, 1000, 1000, 128, jnp.bfloat16, dict(causal=True), "pallas"),  # not a tile multiple
    (True, 1024, 1024, 128, jnp.float32, dict(causal=True), "pallas"),  # Mosaic: 16-bit only
    (False, 1024, 1024, 128, jnp.bfloat16, dict(causal=True), "pallas"),  # not a Hopper GPU
])
def test_default_implementation_on_gpus(monkeypatch, hopper, T, S, H, dtype, options, want):
    """The rule behind implementation=None on a GPU (the BENCHMARKS.md measurements): the
    Hopper kernels where they were measured faster and take the inputs, else Triton."""
    from fastattn import _attention

    monkeypatch.setattr(_attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(_attention, "_on_hopper", lambda: hopper)
    q, k = _shapes(T, S, H, dtype)
    if options.pop("segment_ids", False):
        options["segment_ids"] = (jnp.zeros((2, T), jnp.int32), jnp.zeros((2, S), jnp.int32))
    assert fastattn.default_implementation(q, k, **options) == want
    assert fastattn.default_implementation(q) == "pallas"  # without k: Triton or XLA only


def test_models_report_the_attention_they_run(monkeypatch):
    """LlamaConfig.attention_in_use: the rule above on the model's own shapes (the 0.85B train
    step: H = 64, causal, GQA), its packed rows, and an explicit implementation."""
    import dataclasses

    from fastattn import _attention
    from models.llama import LLAMA_0_85B

    monkeypatch.setattr(_attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(_attention, "_on_hopper", lambda: True)
    assert LLAMA_0_85B.attention_in_use(2048) == "pallas_mosaic_bwd"
    assert LLAMA_0_85B.attention_in_use(2048, packed=True) == "pallas"
    assert LLAMA_0_85B.attention_in_use(100) == "pallas"  # not a multiple of 128
    explicit = dataclasses.replace(LLAMA_0_85B, attention_implementation="cudnn")
    assert explicit.attention_in_use(2048) == "cudnn"


def test_triton_tiles_keep_implementation_none_on_triton(monkeypatch):
    """block_sizes (a fastattn.BlockSizes: the Triton kernel's tiles) with implementation=None
    runs the Triton kernel, also where the rule would pick the Hopper pair."""
    from fastattn import _attention

    monkeypatch.setattr(_attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(_attention, "_on_hopper", lambda: True)
    ran = []
    for name in ("pallas", "pallas_mosaic_bwd"):
        monkeypatch.setitem(_attention.IMPLEMENTATIONS, name,
                            lambda c, name=name: ran.append(name) or (c.q, None))
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    fastattn.attention(q, q, q, causal=True)
    fastattn.attention(q, q, q, causal=True, block_sizes=fastattn.BlockSizes(block_q=64))
    assert ran == ["pallas_mosaic_bwd", "pallas"]


# ----------------------------------------------------------------------------- bad input


def _ok():
    q = jnp.ones((2, 8, 4, 16), jnp.float32)
    kv = jnp.ones((2, 12, 2, 16), jnp.float32)
    return q, kv, kv


@pytest.mark.parametrize("mutate, match", [
    (lambda q, k, v: (q[0], k, v), r"q must be a 4-D array"),
    (lambda q, k, v: (q, k[:, :, :, :8], v[:, :, :, :8]), r"disagree on head_dim"),
    (lambda q, k, v: (q, k, v[:, :5]), r"k and v must have the same shape"),
    (lambda q, k, v: (q[:1], k, v), r"disagree on the batch size"),
    (lambda q, k, v: (q[:, :, :3], k, v), r"multiple of kv heads, got N=3 and K=2"),
    (lambda q, k, v: (q.astype(jnp.int32), k, v), r"q must be floating point"),
    (lambda q, k, v: (q.astype(jnp.bfloat16), k, v), r"must share a dtype"),
    (lambda q, k, v: (q[:, :0], k, v), r"every dimension must be >= 1"),
])
def test_bad_shapes_raise(mutate, match):
    with pytest.raises(ValueError, match=match):
        fastattn.attention(*mutate(*_ok()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(causal=1), r"causal must be a bool"),
    (dict(sliding_window=(4,)), r"sliding_window must be \(left, right\)"),
    (dict(sliding_window=(-1, 2)), r"left bound must be an int >= 0 or None, got -1"),
    (dict(sliding_window=(1, 2.5)), r"right bound must be an int >= 0 or None, got 2.5"),
    (dict(softcap=0.0), r"softcap must be a finite number > 0"),
    (dict(softcap=float("nan")), r"softcap must be a finite number > 0"),
    (dict(scale=float("inf")), r"scale must be a finite number"),
    (dict(implementation="cuda"), r"implementation must be None or one of"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), r"segment_ids must be a pair"),
    (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 11), jnp.int32))),
     r"kv_segment_ids must have shape \(2, 12\)"),
    (dict(segment_ids=(jnp.zeros((2, 8)), jnp.zeros((2, 12), jnp.int32))),
     r"q_segment_ids must be integers"),
    (dict(block_sizes=(64, 64)), r"block_sizes must be a BlockSizes"),
    (dict(deterministic="yes"), r"deterministic must be a bool, got deterministic=.yes."),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastattn.attention(*_ok(), **kwargs)


@pytest.mark.parametrize("field, value", [("block_q", 48), ("block_k_dq", 8),
                                          ("num_warps", 3), ("num_stages_dkv", 0)])
def test_bad_block_sizes_raise(field, value):
    with pytest.raises(ValueError, match=f"BlockSizes.{field}={value}"):
        BlockSizes(**{field: value})


def test_implementations_that_cannot_take_the_inputs_raise():
    q, k, v = _ok()
    with pytest.raises(NotImplementedError, match="bfloat16 or float16.*implementation='pallas'"):
        fastattn.attention(q, k, v, implementation="pallas_mosaic")  # f32
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    seg = (jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.int32))
    with pytest.raises(NotImplementedError, match="head_dim in .* got 16"):
        fastattn.attention(q16, k16, v16, segment_ids=seg, implementation="pallas_mosaic")
    with pytest.raises(NotImplementedError, match="pallas_mosaic' does not take block_sizes"):
        fastattn.attention(q16, k16, v16, block_sizes=BlockSizes(),
                           implementation="pallas_mosaic")
    with pytest.raises(NotImplementedError, match="'cudnn' returns no lse"):
        fastattn.attention(q16, k16, v16, return_lse=True, implementation="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="'cudnn' needs an NVIDIA GPU"):
            fastattn.attention(q16, k16, v16, implementation="cudnn")
    big = jnp.ones((1, 4, 1, 264))
    with pytest.raises(NotImplementedError, match="head_dim <= 256"):
        fastattn.attention(big, big, big, implementation="pallas")
    assert fastattn.attention(big, big, big, implementation="xla").shape == big.shape
