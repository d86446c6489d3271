"""Tensor parallelism inside one engine (Engine(..., mesh=...)) on fake CPU devices, run by
tests/test_engine_sharded.py in a subprocess: the device count (XLA_FLAGS) must be fixed before
jax starts, and the rest of the suite shares its pytest process with one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/engine_sharding_checks.py CHECK
        CHECK: xla | pallas | errors | ops | router

Each check raises (non-zero exit) on a mismatch and prints one line per case it passed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import fastattn
from fastattn import sharding
from fastattn.engine import Engine, EngineConfig
from fastattn.sampling import SamplingParams
from models import TINY, Llama

# GQA: 8 query heads over 4 kv heads, so model axes 1, 2 and 4 split it and 8 does not.
CONFIG = dataclasses.replace(TINY, num_heads=8, num_kv_heads=4, hidden_size=128,
                             max_position_embeddings=128, dtype="float32")
MODEL = Llama(CONFIG)
PARAMS = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in (5, 17, 33, 9, 1, 24)]
# A small token budget: the longer prompts prefill in chunks, mixed with decodes.
ENGINE = EngineConfig(page_size=8, num_pages=48, token_budget=16, max_num_seqs=4,
                      max_model_len=64)


def _generate(mesh, warmup=False, **config):
    engine = Engine(MODEL, PARAMS, dataclasses.replace(ENGINE, **config), mesh=mesh)
    if warmup:  # every step shape compiled up front, on the mesh too
        engine.warmup()
        compiled = engine._step_fn._cache_size()
    out = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    if warmup:  # ... with the signatures real steps use (placement of fed tokens included)
        assert engine._step_fn._cache_size() == compiled, "a step compiled after warmup()"
    engine.blocks.check_invariants()
    assert engine.blocks.usage == 0
    return engine, out


def _check_meshes(label, meshes, warmup=False, **config):
    _, want = _generate(None, **config)
    for shape in meshes:
        mesh = sharding.make_mesh(*shape)
        engine, got = _generate(mesh, warmup, **config)
        if got != want:
            raise AssertionError(f"{label} mesh={shape}: {got} != one device's {want}")
        for k, v in engine.kv:  # still split on K after the donated steps
            for pages in (k, v):
                assert pages.sharding.is_equivalent_to(
                    jax.sharding.NamedSharding(mesh, P("model")), pages.ndim), pages.sharding
                assert {s.data.shape[0] for s in pages.addressable_shards} == \
                    {CONFIG.num_kv_heads // shape[1]}
        q_proj = engine.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert q_proj.sharding.spec == P(None, "model"), q_proj.sharding
        print(f"ok {label} mesh={shape}")


def check_xla():
    """The default ragged implementation on a CPU ("xla"), per shard, with and without
    async scheduling (and warm-up); a "data" axis only replicates the engine."""
    _check_meshes("xla", [(1, 2), (1, 4), (2, 2)])
    _check_meshes("xla async warm", [(1, 2)], warmup=True)
    _check_meshes("xla sync", [(1, 2)], warmup=True, async_scheduling=False)


def check_pallas():
    """The Pallas ragged kernel (interpret mode on a CPU) per shard. models.Llama asks for the
    default implementation, so the engine's call is redirected to "pallas"."""
    original = fastattn.ragged_paged_attention
    fastattn.ragged_paged_attention = functools.partial(original, implementation="pallas")
    try:
        _check_meshes("pallas", [(1, 2), (1, 4)])
    finally:
        fastattn.ragged_paged_attention = original


def check_errors():
    """K = 4 kv heads do not split over a model axis of 8: a clear error, at construction and
    from the attention op itself."""
    def raises(fn, *words):
        try:
            fn()
        except ValueError as e:
            missing = [w for w in words if w not in str(e)]
            if missing:
                raise AssertionError(f"error {e!r} lacks {missing}") from e
            print(f"ok raises: {e}")
            return
        raise AssertionError(f"{fn} did not raise")

    mesh = sharding.make_mesh(1, 8)
    raises(lambda: Engine(MODEL, PARAMS, ENGINE, mesh=mesh), "K=4", "'model' axis size 8")
    q = jnp.zeros((5, 8, 16))
    pages = jnp.zeros((4, 6, 8, 16))
    tables, ctx = np.zeros((2, 3), np.int32), np.array([3, 2], np.int32)
    starts = np.array([0, 3, 5], np.int32)
    for impl in ("xla", "pallas"):
        with sharding.use_mesh(mesh):
            raises(lambda impl=impl: jax.jit(lambda q, k: fastattn.ragged_paged_attention(
                q, k, k, tables, ctx, starts, 2, implementation=impl))(q, pages),
                "K=4", "'model' axis size 8")
    # The batched decode ops split the same way.
    with sharding.use_mesh(mesh):
        raises(lambda: fastattn.paged_attention(q[:2], pages, pages, tables, ctx,
                                                implementation="xla"), "K=4")
        raises(lambda: fastattn.decode_attention(q[:2], jnp.zeros((2, 8, 4, 16)),
                                                 jnp.zeros((2, 8, 4, 16)), ctx,
                                                 implementation="xla"), "K=4")


def check_ops():
    """paged_attention, decode_attention and ragged_paged_attention per shard on (2, 4)
    equal one device (both implementations)."""
    rng = np.random.default_rng(1)
    N, K, H, ps, Pn = 8, 4, 16, 8, 12
    kp = jnp.asarray(rng.standard_normal((K, Pn, ps, H)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((K, Pn, ps, H)), jnp.float32)
    tables = rng.permutation(Pn)[:8].reshape(4, 2).astype(np.int32)
    lengths = np.array([9, 16, 1, 5], np.int32)
    q = jnp.asarray(rng.standard_normal((4, N, H)), jnp.float32)
    dense_k = jnp.asarray(rng.standard_normal((4, 16, K, H)), jnp.float32)
    rq = jnp.asarray(rng.standard_normal((7, N, H)), jnp.float32)
    starts = jnp.array([0, 4, 5, 7, 7], jnp.int32)
    ctx = jnp.array([9, 16, 2, 0], jnp.int32)
    mesh = sharding.make_mesh(2, 4)
    for impl in ("xla", "pallas"):
        ops = {
            "paged": lambda q, k, v, impl=impl: fastattn.paged_attention(
                q, k, v, tables, lengths, implementation=impl, return_lse=True),
            "decode": lambda q, k, v, impl=impl: fastattn.decode_attention(
                q, dense_k, dense_k * 0.5, lengths, implementation=impl, return_lse=True),
            "ragged": lambda q, k, v, impl=impl: fastattn.ragged_paged_attention(
                rq, k, v, jnp.asarray(tables), ctx, starts, 3, implementation=impl),
        }
        for name, op in ops.items():
            want = jax.jit(op)(q, kp, vp)
            with sharding.use_mesh(mesh):
                fn = jax.jit(op)
                assert "shard_map" in str(jax.make_jaxpr(fn)(q, kp, vp)), name
                got = fn(q, sharding.shard_kv_pages(kp, mesh), sharding.shard_kv_pages(vp, mesh))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
            print(f"ok op {name} {impl}")


def check_router():
    """Data parallel serving: 2 replicas x 2-way tensor parallel on 4 devices, behind the
    router, give the tokens of one single-device engine, and both replicas serve."""
    from fastattn.router import Router

    _, want = _generate(None)
    router = Router.build(MODEL, PARAMS, ENGINE, replicas=2, model_parallel=2)
    devices = [{d.id for d in e.kv[0][0].devices()} for e in router.engines]
    assert devices[0].isdisjoint(devices[1]) and all(len(d) == 2 for d in devices), devices
    got = [c.token_ids for c in router.generate(PROMPTS, GREEDY)]
    if got != want:
        raise AssertionError(f"router: {got} != one device's {want}")
    assert all(m["tokens_generated"] > 0 for m in router.metrics())
    print("ok router 2x2")


if __name__ == "__main__":
    assert jax.device_count() == 8, f"run with 8 devices, got {jax.devices()}"
    for check in sys.argv[1:]:
        globals()[f"check_{check}"]()
