"""Greedy generation for a fixed batch through the contiguous KV cache (one jitted program:
prefill, then a scan of decode steps). The serving engine (fastattn.Engine) is the path for
mixed-length traffic; this is the simple one for evaluation loops and tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import fastattn


def greedy_generate(model, params, prompts, max_new_tokens: int, *, eos_id: int | None = None,
                    cache_dtype=None) -> np.ndarray:
    """Greedy continuations [B, max_new_tokens] of `prompts` [B, T] (all rows the same length).

    `model` has `prefill` and `decode` methods (models.Llama). After a row emits `eos_id` it
    keeps emitting `eos_id`. `params` is the flax params tree (not the variables dict).
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts.shape={prompts.shape} must be [B, T] with T >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    c = model.config
    B, T = prompts.shape
    if T + max_new_tokens > c.max_position_embeddings:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={c.max_position_embeddings}")
    dtype = cache_dtype or c.dtype
    cache = fastattn.KVCache.create(num_layers=c.num_layers, batch=B,
                                    max_len=T + max_new_tokens, num_kv_heads=c.num_kv_heads,
                                    head_dim=c.head_size, dtype=dtype)
    out = _generate(model, max_new_tokens, -1 if eos_id is None else eos_id,
                    params, jnp.asarray(prompts, jnp.int32), cache)
    return np.asarray(out)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(model, max_new_tokens, eos_id, params, prompts, cache):
    variables = {"params": params}
    logits, cache = model.apply(variables, prompts, cache, method=type(model).prefill)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, done, cache = carry
        logits, cache = model.apply(variables, token[:, None], cache, method=type(model).decode)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        done = done | (token == eos_id)
        nxt = jnp.where(done, eos_id, nxt)
        return (nxt, done, cache), nxt

    done = jnp.zeros(first.shape, bool)
    _, rest = jax.lax.scan(step, (first, done, cache), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)
