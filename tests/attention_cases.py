"""Shared inputs and oracles for the attention conformance suite."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import flash_attention_reference

# No-key sentinels: a query segment that no key has, a key segment that no query has.
LONELY_Q_SEGMENT = 7
LONELY_KV_SEGMENT = 9


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    dtype: str = "float32"
    causal: bool = False
    window: tuple | None = None
    softcap: float | None = None
    segments: bool = False
    scale: float | None = None

    def __str__(self):
        parts = [f"b{self.B}t{self.T}s{self.S}n{self.N}k{self.K}h{self.H}", self.dtype]
        parts += ["causal"] * self.causal
        parts += [f"win{self.window[0]}_{self.window[1]}"] if self.window else []
        parts += [f"cap{self.softcap:g}"] if self.softcap else []
        parts += ["seg"] * self.segments
        parts += [f"scale{self.scale:g}"] if self.scale else []
        return "-".join(parts)

    @property
    def options(self):
        return dict(causal=self.causal, sliding_window=self.window, softcap=self.softcap,
                    scale=self.scale)

    def reference_options(self):
        return dict(causal=self.causal, window=self.window, softcap=self.softcap, scale=self.scale)


def make_inputs(case: Case, seed: int = 0):
    """Random q, k, v (never zeros), segment ids with an unmatched query and an unseen key."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((case.B, case.T, case.N, case.H)), dtype)
    k = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, case.H)), dtype)
    v = jnp.asarray(rng.standard_normal((case.B, case.S, case.K, case.H)), dtype)
    segment_ids = None
    if case.segments:
        q_seg = np.sort(rng.integers(0, 3, (case.B, case.T)), axis=1)
        kv_seg = np.sort(rng.integers(0, 3, (case.B, case.S)), axis=1)
        q_seg[:, -1] = LONELY_Q_SEGMENT
        kv_seg[:, 0] = LONELY_KV_SEGMENT
        segment_ids = (jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32))
    return q, k, v, segment_ids


def cotangents(case: Case, seed: int = 1):
    rng = np.random.default_rng(seed)
    do = jnp.asarray(rng.standard_normal((case.B, case.T, case.N, case.H)), jnp.dtype(case.dtype))
    dlse = jnp.asarray(rng.standard_normal((case.B, case.N, case.T)), jnp.float32)
    return do, dlse


def value_and_grads(fn, q, k, v, do, dlse):
    """(out, lse) and (dq, dk, dv) for the cotangents (do, dlse), in one jitted call (one
    compile, where op-by-op dispatch compiled every op for every new shape)."""
    def both(q, k, v, do, dlse):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return (out, lse), vjp((do, dlse.astype(lse.dtype)))

    return jax.jit(both)(q, k, v, do, dlse)


def reference_results(case: Case, q, k, v, segment_ids, do, dlse, compute_dtype):
    """The reference's (out, lse) and grads, computed in compute_dtype ("float64" = oracle)."""
    seg = segment_ids if segment_ids is not None else (None, None)
    opts = case.reference_options()
    if compute_dtype == "float64":
        with jax.enable_x64(True):
            up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do, dlse)]
            fn = lambda q_, k_, v_: flash_attention_reference(q_, k_, v_, *seg, **opts)
            res = value_and_grads(fn, *up)
            return jax.tree.map(np.asarray, res)
    fn = lambda q_, k_, v_: flash_attention_reference(
        q_, k_, v_, *seg, compute_dtype=jnp.dtype(compute_dtype), **opts)
    return jax.tree.map(np.asarray, value_and_grads(fn, q, k, v, do, dlse))
