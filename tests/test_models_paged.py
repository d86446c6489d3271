"""The model's paged step (the engine's forward): prefill chunks and decodes of several
sequences over a shuffled page pool give the logits of the plain full forward."""

import jax
import jax.numpy as jnp
import numpy as np

import fastattn
from models import TINY, Llama


def _batch(chunks, seqs, tables, page_size, T_pad, S_pad):
    """chunks: [(seq index, first position, n tokens)]; seqs: full token lists."""
    tokens, positions, slots, starts, ctx, rows = [], [], [], [0], [], []
    for s, first, n in chunks:
        for p in range(first, first + n):
            tokens.append(seqs[s][p])
            positions.append(p)
            slots.append(tables[s][p // page_size] * page_size + p % page_size)
        starts.append(starts[-1] + n)
        ctx.append(first + n)
        rows.append(starts[-1] - 1)
    pad_t, pad_s = T_pad - len(tokens), S_pad - len(chunks)
    table_rows = [tables[s] for s, _, _ in chunks] + [[0] * len(tables[0])] * pad_s
    return fastattn.RaggedBatch(
        tokens=jnp.asarray(tokens + [0] * pad_t, jnp.int32),
        positions=jnp.asarray(positions + [0] * pad_t, jnp.int32),
        slot_mapping=jnp.asarray(slots + [-1] * pad_t, jnp.int32),
        block_tables=jnp.asarray(table_rows, jnp.int32),
        context_lens=jnp.asarray(ctx + [0] * pad_s, jnp.int32),
        query_start=jnp.asarray(starts + [starts[-1]] * pad_s, jnp.int32),
        num_seqs=jnp.int32(len(chunks)), logits_rows=jnp.asarray(rows + [0] * pad_s, jnp.int32),
        max_q_len=T_pad)


def test_chunked_prefill_and_decodes_match_the_full_forward():
    model = Llama(TINY)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, TINY.vocab_size, 24).tolist(), rng.integers(0, TINY.vocab_size, 12).tolist()]
    params = model.init(jax.random.PRNGKey(0), jnp.asarray([seqs[0]]))["params"]
    page_size, P = 8, 12
    order = rng.permutation(P).tolist()
    tables = [order[:3], order[3:6]]
    H, K = TINY.head_size, TINY.num_kv_heads
    kv = [(jnp.full((K, P, page_size, H), jnp.nan), jnp.full((K, P, page_size, H), jnp.nan))
          for _ in range(TINY.num_layers)]  # never-written slots are NaN: must not leak
    step = jax.jit(lambda p, b, kv: model.apply({"params": p}, b, kv, method=Llama.paged_step))
    full = [np.asarray(model.apply({"params": params}, jnp.asarray([s])))[0] for s in seqs]
    plan = [  # (seq, first position, tokens) per step: chunked prefill, fused with decodes
        [(0, 0, 13), (1, 0, 9)],
        [(0, 13, 7), (1, 9, 1)],
        [(0, 20, 1), (1, 10, 1)],
        [(1, 11, 1), (0, 21, 3)],
    ]
    for chunks in plan:
        batch = _batch(chunks, seqs, tables, page_size, T_pad=24, S_pad=3)
        logits, kv = step(params, batch, kv)
        for i, (s, first, n) in enumerate(chunks):
            np.testing.assert_allclose(np.asarray(logits[i]), full[s][first + n - 1],
                                       atol=2e-4, rtol=2e-4)
