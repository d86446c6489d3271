"""The Hopper (Mosaic GPU) flash attention forward kernel, `pallas_kernels.flash_attention_mgpu`.

On a CPU (CI): inputs the kernel does not take raise before any GPU work, and a few tiny
shapes run in Mosaic GPU interpret mode (TMA copies, barriers and the warp-specialised
pipeline protocol are simulated; the products there are plain dots, see the module).
On an sm90 GPU: compiled kernel against the f32 reference, several shapes, GQA, causal/full,
head dims 64/128/256, T != S both ways. Run there with
    PYTHONPATH=. python -m pytest -q tests/test_attention_mgpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention_mgpu import (
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


def _check(B, T, S, N, K, H, *, causal, dtype="bfloat16", block_sizes=None, interpret=False,
           seed=0):
    q, k, v = _inputs(B, T, S, N, K, H, dtype, seed)
    out, lse = flash_attention_mgpu(q, k, v, causal=causal, block_sizes=block_sizes,
                                    interpret=interpret)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    o_out, o_lse = flash_attention_reference(q, k, v, causal=causal)  # f32, HIGHEST
    l_out, l_lse = flash_attention_reference(q, k, v, causal=causal,
                                             compute_dtype=jnp.dtype(dtype))
    assert out.shape == (B, T, N, H) and lse.shape == (B, N, T) and lse.dtype == np.float32
    as_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    assert_within_policy("out", out, as_f32(o_out), as_f32(l_out), dtype=dtype, factor=2)
    assert_within_policy("lse", lse, as_f32(o_lse), as_f32(l_lse), dtype=dtype, factor=2)


# ----------------------------------------------------------------------------- CPU

UNSUPPORTED = [
    # (what, shapes (q, k), dtype, block_sizes, error)
    ("float32", ((1, 128, 2, 64), (1, 128, 2, 64)), "float32", None, NotImplementedError),
    ("head dim 96", ((1, 128, 2, 96), (1, 128, 2, 96)), "bfloat16", None, NotImplementedError),
    ("T not a tile multiple", ((1, 100, 2, 64), (1, 128, 2, 64)), "bfloat16", None,
     NotImplementedError),
    ("S not a tile multiple", ((1, 128, 2, 64), (1, 96, 2, 64)), "bfloat16", None,
     NotImplementedError),
    ("S not a multiple of block_k", ((1, 128, 2, 64), (1, 192, 2, 64)), "bfloat16",
     MosaicBlockSizes(block_k=128), NotImplementedError),
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


@pytest.mark.skipif(_on_hopper(), reason="checks the refusal off Hopper")
def test_refuses_without_a_hopper_gpu():
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="Hopper"):
        flash_attention_mgpu(q, q, q, causal=True)


@pytest.mark.parametrize("kw", [{"block_q": 64}, {"block_k": 96}, {"block_k": 320},
                                {"num_stages": 1}, {"consumer_registers": 250},
                                {"consumer_registers": 256, "producer_registers": 24}],
                         ids=str)
def test_block_sizes_validate(kw):
    with pytest.raises(ValueError, match="MosaicBlockSizes"):
        MosaicBlockSizes(**kw)


def test_default_block_sizes_fit_the_shapes():
    for H in (64, 128, 256):
        for S in (128, 192, 4096):
            bs = MosaicBlockSizes.default_for(q_len=128, kv_len=S, head_dim=H, causal=True)
            assert S % bs.block_k == 0
            assert bs.smem_bytes(H, 2) <= 227 * 1024


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


@hopper
@pytest.mark.parametrize("block_sizes", [
    MosaicBlockSizes(block_k=64, num_stages=4),
    MosaicBlockSizes(block_k=128, num_stages=2, consumer_registers=232, producer_registers=40),
    MosaicBlockSizes(block_q=256, block_k=64, num_stages=2),
], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_block_size_variants_compute_the_same(block_sizes, causal):
    _check(1, 1024, 1024, 4, 2, 128, causal=causal, block_sizes=block_sizes)


@hopper
def test_gpu_every_output_written_and_deterministic():
    q, k, v = _inputs(1, 1024, 1024, 4, 2, 128, "bfloat16", seed=3)
    first = flash_attention_mgpu(q, k, v, causal=True)
    second = flash_attention_mgpu(q, k, v, causal=True)
    for a, b in zip(first, second):
        a = np.asarray(jnp.asarray(a, jnp.float32))
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, np.asarray(jnp.asarray(b, jnp.float32)))


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


def test_registry_pallas_mosaic_forward_and_gradients_match_the_reference():
    """fastattn.attention(implementation="pallas_mosaic"): the Mosaic forward (interpret mode
    off a GPU) and the Triton recomputing backward it feeds with its out and lse."""
    import fastattn

    B, T, S, N, K, H = 1, 128, 256, 4, 2, 64  # causal T < S, GQA 2:1
    q, k, v = _inputs(B, T, S, N, K, H, "bfloat16", 3)
    d_out = jax.random.normal(jax.random.PRNGKey(9), (B, T, N, H), jnp.float32)

    def grads(attend):
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * d_out),
                        argnums=(0, 1, 2))(q, k, v)

    got = grads(lambda q, k, v: fastattn.attention(q, k, v, causal=True,
                                                   implementation="pallas_mosaic"))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    oracle = jax.grad(lambda q, k, v: jnp.sum(flash_attention_reference(
        q, k, v, causal=True)[0] * d_out), argnums=(0, 1, 2))(*f32)
    low = grads(lambda q, k, v: flash_attention_reference(
        q, k, v, causal=True, compute_dtype=jnp.bfloat16)[0])
    as_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    for name, g, o, lp in zip(("dq", "dk", "dv"), got, oracle, low):
        assert_within_policy(name, as_f32(g), as_f32(o), as_f32(lp), dtype="bfloat16",
                             factor=2)
