"""Cached greedy generation equals re-running the full forward and taking the argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import TINY, Llama
from models.generate import greedy_generate


def _full_forward_greedy(model, params, prompts, n):
    tokens = jnp.asarray(prompts)
    out = []
    for _ in range(n):
        nxt = jnp.argmax(model.apply({"params": params}, tokens)[:, -1], axis=-1)
        out.append(nxt)
        tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
    return np.stack(out, axis=1)


def test_greedy_generate_matches_full_forward_and_stops_at_eos():
    model = Llama(TINY)
    prompts = np.random.default_rng(0).integers(0, TINY.vocab_size, (3, 7))
    params = model.init(jax.random.PRNGKey(1), jnp.asarray(prompts))["params"]
    expected = _full_forward_greedy(model, params, prompts, 6)
    np.testing.assert_array_equal(greedy_generate(model, params, prompts, 6), expected)
    eos = int(expected[0, 2])  # row 0 emits this at step 2: everything after is eos
    got = greedy_generate(model, params, prompts, 6, eos_id=eos)
    assert (got[0, 2:] == eos).all()
    for row in range(3):
        first = np.flatnonzero(expected[row] == eos)
        stop = first[0] if first.size else 6
        np.testing.assert_array_equal(got[row, :stop + 1], expected[row, :stop + 1])


def test_bad_arguments_are_named():
    model = Llama(TINY)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        greedy_generate(model, params, np.zeros((1, 4), np.int32), 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        greedy_generate(model, params, np.zeros((1, 4), np.int32), TINY.max_position_embeddings)
    with pytest.raises(ValueError, match="prompts.shape"):
        greedy_generate(model, params, np.zeros((4,), np.int32), 2)
