"""KV caches: a paged pool for serving and a contiguous cache for fixed-batch generation.

Dimension letters: L layers, B batch, T new tokens, S cache length (``max_len``), K kv heads,
H head dim, P pages.

Paged cache (serving). Every layer owns a pool of ``P`` pages per kv head; a page holds
``page_size`` consecutive tokens of one sequence. Sequences address their pages through a block
table (built by the block manager), and a token's *slot* is ``page_id * page_size + offset``::

    k_pages[l]  [K, P, page_size, H]        block_tables[s] = [5, 2, 7]   (page_size = 4)

    page 0  [ . . . . ]                      token t of sequence s lives in
    page 2  [ t4 t5 t6 t7 ]  <- s, tokens 4..7    page  block_tables[s][t // 4]
    page 5  [ t0 t1 t2 t3 ]  <- s, tokens 0..3    offset t % 4
    page 7  [ t8 t9 .  .  ]  <- s, tokens 8..9    slot  page * 4 + offset   (t9 -> 7*4+1 = 29)

One page of one kv head, ``[page_size, H]``, is contiguous, so a kernel reads it with one
rectangular copy. Layers lead the layout (``[L, K, P, page_size, H]``) so a scan over layers
slices one layer's pool without a copy.

Contiguous cache (training-style generation). ``[L, B, S, K, H]`` with a length per row; simple
and fast when every row of a fixed batch generates until the end.

JAX clamps (gathers, dynamic slices) or drops (scatters) out-of-range indices silently, so
``check_slot_mapping`` and the checks in ``KVCache.update`` are the only guard against writing
another sequence's memory. They run on the host whenever indices are concrete; under ``jit`` they
cannot, and the traced paths are written so that a bad index is dropped rather than clamped onto
valid data.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MIN_PAGE_SIZE = 8
MAX_PAGE_SIZE = 128
PAD_SLOT = -1  # slot_mapping value of a token that is not written (padding of a bucketed batch)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")


def _check_page_size(page_size: int) -> None:
    _check_positive(page_size=page_size)
    # Powers of two keep slot -> (page, offset) a shift and a mask in kernels; 8 is the smallest
    # tile a GPU kernel loads efficiently, 128 bounds the waste of a sequence's last partial page.
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(
            f"page_size must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}], "
            f"got page_size={page_size}")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_layer_index(layer: Any, num_layers: int) -> None:
    """Range-checks a Python int layer index; a traced one is the caller's responsibility."""
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got layer={layer}")


# ---------------------------------------------------------------------------------------------
# Paged cache
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class PagedKVCache:
    """The paged KV pool of all layers, a pytree (jit, donate and shard it like any array pair).

    Attributes:
      k_pages, v_pages: ``[L, K, P, page_size, H]`` keys and values; page ``p`` of kv head ``k``
        in layer ``l`` is the contiguous block ``k_pages[l, k, p]`` of shape ``[page_size, H]``.
      page_size: tokens per page (static: changing it recompiles).

    Build it with `PagedKVCache.create`; which pages belong to which sequence is the block
    manager's business, not the cache's.
    """

    k_pages: jax.Array
    v_pages: jax.Array
    page_size: int = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, num_layers: int, num_kv_heads: int, num_pages: int, page_size: int,
               head_dim: int, dtype: Any) -> PagedKVCache:
        """A zero-filled pool. Raises ValueError naming the first invalid size."""
        _check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, num_pages=num_pages,
                        head_dim=head_dim)
        _check_page_size(page_size)
        shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
        return cls(k_pages=jnp.zeros(shape, dtype), v_pages=jnp.zeros(shape, dtype),
                   page_size=int(page_size))

    @staticmethod
    def num_pages_for_memory(*, bytes_available: int, num_layers: int, num_kv_heads: int,
                             page_size: int, head_dim: int, dtype: Any) -> int:
        """How many pages (of every layer, keys and values) fit in ``bytes_available`` bytes.

        A page id names one page in each of the ``2 * L * K`` pools, so one page id costs
        ``2 * L * K * page_size * H * itemsize`` bytes. May return 0.
        """
        if not isinstance(bytes_available, (int, np.integer)) or bytes_available < 0:
            raise ValueError(f"bytes_available must be an int >= 0, got {bytes_available=!r}")
        _check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        _check_page_size(page_size)
        bytes_per_page = (2 * num_layers * num_kv_heads * page_size * head_dim
                          * jnp.dtype(dtype).itemsize)
        return int(bytes_available) // bytes_per_page

    @property
    def num_layers(self) -> int:
        return self.k_pages.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_pages.shape[1]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_pages.shape[4]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k_pages.dtype

    @property
    def bytes(self) -> int:
        """Bytes of ``k_pages`` and ``v_pages`` together (from shapes, so valid under jit)."""
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (self.k_pages, self.v_pages))

    def layer(self, i: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(k_pages, v_pages)`` of layer ``i``, each ``[K, P, page_size, H]``.

        A Python int is range-checked; a traced index (inside a scan) is not.
        """
        _check_layer_index(i, self.num_layers)
        return self.k_pages[i], self.v_pages[i]


def check_slot_mapping(slot_mapping: Any, num_pages: int, page_size: int) -> None:
    """Host-side check of a concrete slot mapping; raises ValueError on the first fault.

    Valid slots are ``-1`` (padding, written nowhere) and ``0 <= slot < num_pages * page_size``,
    each non-negative slot at most once: two tokens written to one slot in one step is always a
    scheduler bug, and the scatter would keep an arbitrary one of them.

    Forces a device-to-host copy for a JAX array; the engine calls it on the numpy array it
    builds, before the transfer.
    """
    _check_positive(num_pages=num_pages, page_size=page_size)
    slots = np.asarray(slot_mapping)
    if slots.ndim != 1:
        raise ValueError(f"slot_mapping must be 1-D [T], got shape {slots.shape}")
    if slots.size and not np.issubdtype(slots.dtype, np.integer):
        raise ValueError(f"slot_mapping must hold integers, got dtype {slots.dtype}")
    num_slots = num_pages * page_size
    bad = np.flatnonzero((slots < PAD_SLOT) | (slots >= num_slots))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"slot_mapping[{i}]={int(slots[i])} is outside [-1, {num_slots}) "
            f"(num_pages={num_pages} * page_size={page_size}); {bad.size} bad slot(s) in all")
    written = slots[slots >= 0]
    values, counts = np.unique(written, return_counts=True)
    if np.any(counts > 1):
        slot = int(values[np.argmax(counts > 1)])
        where = np.flatnonzero(slots == slot).tolist()
        raise ValueError(
            f"slot_mapping writes slot {slot} from tokens {where}: two tokens in one slot "
            "is a scheduler bug")


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k_new: jax.Array, v_new: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes the K/V of ``T`` new tokens of one layer into their slots.

    Args:
      k_pages, v_pages: ``[K, P, page_size, H]`` one layer's pool.
      k_new, v_new: ``[T, K, H]`` the new tokens (a flattened ragged batch); cast to the pool's
        dtype (round to nearest) before writing.
      slot_mapping: ``[T]`` int, ``slot = page_id * page_size + offset_in_page``; ``-1`` skips
        the token (padding).

    Returns:
      The updated ``(k_pages, v_pages)``; every slot not named in ``slot_mapping`` is bitwise
      unchanged.

    Traceable under jit (see `write_kv_donated` for the in-place version). When ``slot_mapping``
    is concrete (numpy, a list, or a JAX array outside a trace) it first goes through
    `check_slot_mapping`. Under a trace nothing can be checked, and any slot outside
    ``[0, P * page_size)`` -- not only ``-1`` -- is dropped, never clamped or wrapped onto another
    slot.
    """
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [K, P, page_size, H], got "
                         f"{k_pages.shape=} and {v_pages.shape=}")
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    if (k_new.ndim != 3 or v_new.shape != k_new.shape
            or k_new.shape[1:] != (num_kv_heads, head_dim)):
        raise ValueError(f"k_new and v_new must both be [T, K={num_kv_heads}, H={head_dim}], got "
                         f"{k_new.shape=} and {v_new.shape=}")
    num_tokens = k_new.shape[0]
    if np.shape(slot_mapping) != (num_tokens,):
        raise ValueError(f"slot_mapping must be [T={num_tokens}], got shape "
                         f"{np.shape(slot_mapping)}")
    if _is_concrete(slot_mapping):
        check_slot_mapping(slot_mapping, num_pages, page_size)
    slots = jnp.asarray(slot_mapping, jnp.int32)
    num_slots = num_pages * page_size
    # jnp indexing wraps negative indices (numpy semantics: -1 is the last slot), so padding must
    # be moved out of range before mode="drop" can drop it. Each skipped token gets its own
    # out-of-range index, which keeps the indices unique and lets XLA scatter without atomics.
    slots = jnp.where((slots < 0) | (slots >= num_slots),
                      num_slots + jnp.arange(num_tokens, dtype=jnp.int32), slots)

    def scatter(pages, new):
        flat = pages.reshape(num_kv_heads, num_slots, head_dim)  # free: pages are contiguous
        new = jnp.swapaxes(new, 0, 1).astype(pages.dtype)  # [K, T, H]
        flat = flat.at[:, slots].set(new, mode="drop", unique_indices=True)
        return flat.reshape(pages.shape)

    return scatter(k_pages, k_new), scatter(v_pages, v_new)


# Donating the pools lets XLA update them in place on GPU (no copy of the whole pool per step).
# The donated arrays are invalid after the call; on CPU donation may be ignored.
write_kv_donated = jax.jit(write_kv, donate_argnums=(0, 1))


# ---------------------------------------------------------------------------------------------
# Contiguous cache
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """A contiguous KV cache for a fixed batch, a pytree.

    Attributes:
      k, v: ``[L, B, S, K, H]``, ``S = max_len``.
      lengths: ``[B]`` int32, the number of valid positions of each row (positions
        ``0 .. lengths[b] - 1``); what lies beyond is stale or zero and attention must mask it.

    Protocol for one forward step of ``T`` tokens::

        positions = cache.lengths                                 # [B], where row b writes
        for l in range(L):                                        # or a scan over layers
            cache = cache.update(l, k_new, v_new, positions)      # writes, lengths untouched
            k, v = cache.layer(l)                                 # attend with lengths + T
        cache = cache.advance(T)                                  # or per-row counts [B]

    `update` leaves ``lengths`` alone because it runs once per layer with the same positions;
    `advance` moves them once per step. Per-row counts let a right-padded prefill of ragged
    prompts advance each row by its own prompt length.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int,
               head_dim: int, dtype: Any) -> KVCache:
        """A zero-filled cache with all lengths 0. Raises ValueError naming an invalid size."""
        _check_positive(num_layers=num_layers, batch=batch, max_len=max_len,
                        num_kv_heads=num_kv_heads, head_dim=head_dim)
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def bytes(self) -> int:
        """Bytes of ``k`` and ``v`` together (``lengths`` is negligible and not counted)."""
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (self.k, self.v))

    def layer(self, i: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(k, v)`` of layer ``i``, each ``[B, S, K, H]``."""
        _check_layer_index(i, self.num_layers)
        return self.k[i], self.v[i]

    def update(self, layer: int | jax.Array, k_new: jax.Array, v_new: jax.Array,
               positions: jax.Array) -> KVCache:
        """Writes ``k_new, v_new [B, T, K, H]`` of one layer at rows ``positions[b] + 0..T-1``.

        Values are cast to the cache dtype; ``lengths`` is unchanged (see the class docstring).
        With concrete ``positions`` any write outside ``[0, max_len)`` raises ValueError. Under a
        trace it cannot be checked, and the out-of-range tokens are dropped (never clamped onto
        valid positions, as ``lax.dynamic_update_slice`` would do).
        """
        _check_layer_index(layer, self.num_layers)
        expected = (self.batch, self.num_kv_heads, self.head_dim)
        if (k_new.ndim != 4 or v_new.shape != k_new.shape
                or (k_new.shape[0],) + k_new.shape[2:] != expected):
            raise ValueError(
                f"k_new and v_new must both be [B={self.batch}, T, K={self.num_kv_heads}, "
                f"H={self.head_dim}], got {k_new.shape=} and {v_new.shape=}")
        num_tokens = k_new.shape[1]
        if np.shape(positions) != (self.batch,):
            raise ValueError(f"positions must be [B={self.batch}], got shape "
                             f"{np.shape(positions)}")
        if _is_concrete(positions):
            pos = np.asarray(positions)
            bad = np.flatnonzero((pos < 0) | (pos + num_tokens > self.max_len))
            if bad.size:
                b = int(bad[0])
                raise ValueError(
                    f"positions[{b}]={int(pos[b])} with T={num_tokens} new tokens writes "
                    f"outside [0, max_len={self.max_len})")
        # One scatter of [B, T] rows of [K, H] straight into the 5-D cache. A vmap over B of
        # lax.dynamic_update_slice would batch into the same scatter but over a transposed copy
        # of the whole cache (B moved to the front and back), twice per layer per step.
        rows = (jnp.asarray(positions, jnp.int32)[:, None]
                + jnp.arange(num_tokens, dtype=jnp.int32))  # [B, T]
        # Negative indices would wrap to the end of the row; send them out of range instead.
        rows = jnp.where(rows < 0, self.max_len, rows)
        batch_ids = jnp.arange(self.batch, dtype=jnp.int32)[:, None]  # [B, 1]

        def scatter(cache, new):
            return cache.at[layer, batch_ids, rows].set(new.astype(cache.dtype), mode="drop")

        return self.replace(k=scatter(self.k, k_new), v=scatter(self.v, v_new))

    def advance(self, num_tokens: int | jax.Array) -> KVCache:
        """Adds ``num_tokens`` (an int, or ``[B]`` per-row counts) to ``lengths``.

        With concrete values, a negative count or a length beyond ``max_len`` raises ValueError.
        """
        if np.ndim(num_tokens) not in (0, 1) or (np.ndim(num_tokens) == 1
                                                 and np.shape(num_tokens) != (self.batch,)):
            raise ValueError(f"num_tokens must be a scalar or [B={self.batch}], got shape "
                             f"{np.shape(num_tokens)}")
        if _is_concrete(num_tokens) and _is_concrete(self.lengths):
            counts = np.broadcast_to(np.asarray(num_tokens), (self.batch,))
            new = np.asarray(self.lengths) + counts
            bad = np.flatnonzero((counts < 0) | (new > self.max_len))
            if bad.size:
                b = int(bad[0])
                raise ValueError(
                    f"advancing row {b} by num_tokens={int(counts[b])} from "
                    f"lengths[{b}]={int(new[b] - counts[b])} leaves it outside "
                    f"[0, max_len={self.max_len}]")
        return self.replace(lengths=self.lengths + jnp.asarray(num_tokens, jnp.int32))
