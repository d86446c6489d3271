"""The device-side description of one engine step: a flattened ragged batch over the paged cache.

The scheduler picks, per running sequence, how many new tokens this step computes (a whole
prompt, a prefill chunk, or one decode token); the engine flattens them into T rows:

    rows:         [ s0 t0..t39 | s1 t17 | s2 t5..t9 | pad pad ]      T = 48 (a bucket size)
    query_start:  [ 0, 40, 41, 46, 46 ]                              S = 4 slots (1 unused)
    context_lens: [ 40, 18, 10, 0 ]   (tokens in the cache after this step's writes)
    logits_rows:  [ 39, 40, 45, 0 ]   (each sequence's last new row: the one sampled from)

A model's paged forward writes each row's K/V into `slot_mapping` (−1 for padding), then runs
`fastattn.ragged_paged_attention` over the pages and returns logits of `logits_rows` only.
Shapes are fixed per bucket (T, S, pages_per_seq), so the step compiles once per bucket.
"""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class RaggedBatch:
    tokens: jax.Array  # [T] int32 token ids (padding: any valid id)
    positions: jax.Array  # [T] int32 position of each token in its sequence
    slot_mapping: jax.Array  # [T] int32 page_id * page_size + offset, -1 = do not write
    block_tables: jax.Array  # [S, pages_per_seq] int32 (unused entries: any valid page id)
    context_lens: jax.Array  # [S] int32 tokens in the cache after this step (0: unused slot)
    query_start: jax.Array  # [S + 1] int32 first row of each sequence (non-decreasing)
    num_seqs: jax.Array  # int32 scalar: slots in use (the rest are padding)
    logits_rows: jax.Array  # [S] int32 row whose logits each sequence samples from
    max_q_len: int = flax.struct.field(pytree_node=False)  # static bound on new rows per seq
