"""Shared test fixture: a shuffled page pool holding ragged sequences."""

import jax.numpy as jnp
import numpy as np


def shuffled_pool(lengths, page_size, *, rows, K, H, spare_pages, dtype, rng, unused=-7):
    """Block tables over a randomly permuted pool for sequences of `lengths` tokens (plus
    `rows - len(lengths)` empty sequences), random K/V pages, and the [P, page_size] mask of
    slots nobody may read (free pages and the tail of each last page). Table entries past a
    sequence's pages are `unused`, which a kernel must never read."""
    used = [-(-n // page_size) for n in lengths]
    P = sum(used) + spare_pages
    order = rng.permutation(P)
    tables = np.full((rows, max(1, max(used))), unused, np.int32)
    cursor = 0
    for s, n in enumerate(used):
        tables[s, :n] = order[cursor: cursor + n]
        cursor += n
    k_pages = jnp.asarray(rng.standard_normal((K, P, page_size, H)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((K, P, page_size, H)), dtype)
    unread = np.ones((P, page_size), bool)
    for s, n in enumerate(lengths):
        for t in range(n):
            unread[tables[s, t // page_size], t % page_size] = False
    return jnp.asarray(tables), k_pages, v_pages, unread
