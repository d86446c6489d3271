"""Rotary embedding fused into the paged KV write of one engine step, as one Pallas kernel
(Triton backend).

Unfused, a layer's step runs ``apply_rope`` on q and on k (two elementwise passes over
[T, N, H] and [T, K, H]) and then ``write_kv`` (a scatter of k and v into the pools). Fused,
each new token's q, k and v are read once: q comes back rotated, k is rotated on chip and
stored with v straight into its slot.

    q [T, N, H]   k_new, v_new [T, K, H]   k_pages, v_pages [K, P, page_size, H]
    slot_mapping [T]   positions [T]   inv_freq [H / 2]   N % K == 0, G = N // K

Rotation (HF's convention, as ``models.llama.apply_rope``; Su et al. 2021, RoFormer, eq. 34
with the pairs (i, i + H/2) instead of (2i, 2i + 1)):

    angle[t, i] = f32(positions[t]) * inv_freq[i]                       i < H/2, in f32
    x1, x2      = x[..., :H/2], x[..., H/2:]                            upcast to f32
    rot(x)      = [x1 * cos(angle) - x2 * sin(angle),  x2 * cos(angle) + x1 * sin(angle)]

q is returned as rot(q) in q's dtype; keys are rounded as the unfused path rounds them
(rot(k) to k's dtype, then to the pool's dtype) and values are only cast to the pool's dtype.
Token t is written at slot s = slot_mapping[t], i.e. row s % page_size of page s // page_size
(picture in fastattn/kv_cache.py); a slot outside [0, P * page_size), -1 for padding, skips the
token. Nothing else in the pools changes: they are aliased to the outputs, so under a jit that
donates them the write is in place, with no copy of the pool.

Grid (T / block_t, K): a program owns block_t tokens of one kv head. It computes cos and sin
of its tokens once and uses them for the G query heads of its group and for the key, then
copies the value: every new element is read once and written once. A token's key and value
rows land in its page as two contiguous half-rows each (H/2 elements), so the stores scatter
by row but stay vectorised along H.

Rounding: the rotation is two products and a sum per element, and compilers may fuse one
product into a fused multiply-add (XLA:CPU does so in interpret mode, Triton and XLA:GPU as
they see fit). So rotated q and k may differ from the unfused path's in the last f32 bit
before their final rounding (tests/test_rope_kv_write.py bounds it); values, skipped tokens
and every slot not written are bitwise the unfused path's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import check_tile_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeWriteBlockSizes:
    """Tokens per program and Triton knobs of the fused kernel. Changes speed, never numbers.

    block_t: new tokens per program (a power of two); a program's tiles are
        [block_t, next_power_of_2(H / 2)].
    """

    block_t: int = 4
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        check_tile_fields(self, smallest_block=1)

    @classmethod
    def default_for(cls, *, num_tokens: int, head_dim: int) -> RopeWriteBlockSizes:
        """Small tiles of 256 elements (block_t = 4 at H = 128, 8 at H = 64), no more tokens
        than T. An H100 sweep (N = 32, K = 8, bf16, page_size 16, T = 8192 and 32768;
        block_t 4..32 x num_warps 1, 2, 4) had 4 warps on 256-512-element tiles fastest and
        1024-2048-element tiles 1.4-1.8x slower: many small programs hide the latency of the
        scattered page stores better than few large ones."""
        half = pl.next_power_of_2(max(1, head_dim // 2))
        block_t = max(1, min(256 // half, pl.next_power_of_2(max(1, num_tokens))))
        return cls(block_t=block_t)


# ----------------------------------------------------------------------------- kernel


def _rope_write_kv_kernel(slot_ref, pos_ref, inv_freq_ref, q_ref, k_ref, v_ref, k_pages_in_ref,
                          v_pages_in_ref, q_out_ref, k_pages_ref, v_pages_ref, *, block_t: int,
                          num_tokens: int, group: int, head_dim: int):
    # slot_ref, pos_ref [T]; inv_freq_ref [H/2]; q_ref, q_out_ref [T, G, H] (the G query heads
    # of this program's kv head); k_ref, v_ref [T, H]; k_pages_ref, v_pages_ref
    # [P, page_size, H] (this kv head's pools, aliased to k_pages_in_ref, v_pages_in_ref).
    #
    # Every access uses all-array indices and a mask. A masked-off lane's column index is
    # moved to head_dim, out of range: Triton never touches a masked lane, and interpret
    # mode (which stores through a scatter) drops an out-of-range lane instead of writing
    # back what it read, so padding lanes can not collide with real ones.
    del k_pages_in_ref, v_pages_in_ref
    num_pages, page_size, _ = k_pages_ref.shape
    half = head_dim // 2
    t = pl.program_id(0) * block_t + jnp.arange(block_t)
    tok_ok = t < num_tokens
    slot = plgpu.load(slot_ref.at[t], mask=tok_ok, other=-1)
    pos = plgpu.load(pos_ref.at[t], mask=tok_ok, other=0)
    c = jnp.arange(pl.next_power_of_2(half))
    col_ok = c < half
    inv_freq = plgpu.load(inv_freq_ref.at[c], mask=col_ok, other=0.0)
    angle = pos.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [block_t, H/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)

    def rotate(load_half):
        x1 = load_half(0).astype(jnp.float32)
        x2 = load_half(half).astype(jnp.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    def columns(mask, start):
        return jnp.where(mask, start + c[None, :], head_dim)

    rows = t[:, None]
    ok = tok_ok[:, None] & col_ok[None, :]

    def query_head(g, carry):
        heads = jnp.full((block_t, 1), g, jnp.int32)
        y1, y2 = rotate(lambda start: plgpu.load(q_ref.at[rows, heads, columns(ok, start)],
                                                 mask=ok, other=0.0))
        for start, y in ((0, y1), (half, y2)):
            plgpu.store(q_out_ref.at[rows, heads, columns(ok, start)], y.astype(q_out_ref.dtype),
                        mask=ok)
        return carry

    lax.fori_loop(0, group, query_head, 0)

    # Slot -> (page, row in page); skipped tokens (slot outside the pool) store nowhere.
    write = tok_ok & (slot >= 0) & (slot < num_pages * page_size)
    safe_slot = jnp.where(write, slot, 0)
    page = lax.div(safe_slot, page_size)[:, None]
    offset = lax.rem(safe_slot, page_size)[:, None]
    write_ok = write[:, None] & col_ok[None, :]

    y1, y2 = rotate(lambda start: plgpu.load(k_ref.at[rows, columns(ok, start)], mask=ok,
                                             other=0.0))
    for start, y in ((0, y1), (half, y2)):
        # The unfused rounding: apply_rope returns k's dtype, write_kv casts to the pool's.
        y = y.astype(k_ref.dtype).astype(k_pages_ref.dtype)
        plgpu.store(k_pages_ref.at[page, offset, columns(write_ok, start)], y, mask=write_ok)

    for start in (0, half):  # the value, unrotated, in the same two half-rows
        v = plgpu.load(v_ref.at[rows, columns(ok, start)], mask=ok, other=0.0)
        plgpu.store(v_pages_ref.at[page, offset, columns(write_ok, start)],
                    v.astype(v_pages_ref.dtype), mask=write_ok)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _rope_write_kv_call(q, k_new, v_new, k_pages, v_pages, slots, positions, inv_freq, *,
                        block_sizes: RopeWriteBlockSizes, interpret: bool):
    T, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    G = N // K
    bt = block_sizes.block_t
    kernel = functools.partial(_rope_write_kv_kernel, block_t=bt, num_tokens=T, group=G,
                               head_dim=H)
    whole = lambda n: pl.BlockSpec((n,), lambda i, h: (0,))
    q_spec = pl.BlockSpec((T, None, G, H), lambda i, h: (0, h, 0, 0))  # q as [T, K, G, H]
    kv_spec = pl.BlockSpec((T, None, H), lambda i, h: (0, h, 0))
    pool_spec = pl.BlockSpec((None, P, page_size, H), lambda i, h: (h, 0, 0, 0))
    q_rot, k_pages, v_pages = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(T, bt), K),
        in_specs=[whole(T), whole(T), whole(H // 2), q_spec, kv_spec, kv_spec, pool_spec,
                  pool_spec],
        out_specs=[q_spec, pool_spec, pool_spec],
        out_shape=[jax.ShapeDtypeStruct((T, K, G, H), q.dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={6: 1, 7: 2},
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="rope_write_kv",
    )(slots, positions, inv_freq, q.reshape(T, K, G, H), k_new, v_new, k_pages, v_pages)
    return q_rot.reshape(T, N, H), k_pages, v_pages


# ----------------------------------------------------------------------------- public wrapper


def rope_write_kv(q, k_new, v_new, k_pages, v_pages, slot_mapping, positions, inv_freq, *,
                  block_sizes: RopeWriteBlockSizes | None = None, interpret: bool | None = None):
    """Rotates q and k_new by their positions and writes the keys and values into their slots.

    Args:
      q: ``[T, N, H]`` the step's queries (a flattened ragged batch).
      k_new, v_new: ``[T, K, H]`` the step's keys and values (``N % K == 0``).
      k_pages, v_pages: ``[K, P, page_size, H]`` one layer's pools (any page size). Donate
        them in the enclosing jit and they are updated in place.
      slot_mapping: ``[T]`` int, ``slot = page * page_size + offset``; a slot outside
        ``[0, P * page_size)``, ``-1`` for padding, skips the token (its q is still rotated).
      positions: ``[T]`` int, each token's position in its sequence (the rotation angle).
      inv_freq: ``[H / 2]`` the rotary inverse frequencies (``models.llama.rope_frequencies``),
        used in f32.
      block_sizes: tiles and Triton knobs; None picks `RopeWriteBlockSizes.default_for`.
      interpret: run the kernel in Pallas interpret mode; None means "not on a GPU".

    Returns:
      ``(q_rot [T, N, H] in q's dtype, k_pages, v_pages)``: what ``apply_rope`` on q and k
      followed by `fastattn.write_kv` gives, up to fused multiply-adds in the rotation (see
      the module docstring). Slots not written are bitwise unchanged.

    With a concrete ``slot_mapping`` it first goes through `fastattn.check_slot_mapping`
    (range, uniqueness). Under a trace two tokens with one slot leave an arbitrary one of them,
    as in `fastattn.write_kv`. Raises ValueError naming the argument on bad shapes or dtypes.
    Not differentiable (a serving op).
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got {q.shape=}")
    T, N, H = q.shape
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [K, P, page_size, H], got "
                         f"{k_pages.shape=} and {v_pages.shape=}")
    K, P, page_size, pool_h = k_pages.shape
    if pool_h != H:
        raise ValueError(f"{q.shape=} and {k_pages.shape=} disagree on head_dim")
    if k_new.shape != (T, K, H) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new and v_new must both be [T={T}, K={K}, H={H}], got "
                         f"{k_new.shape=} and {v_new.shape=}")
    if N % K:
        raise ValueError(f"{q.shape=} has N={N} query heads, not a multiple of K={K} kv heads")
    if H % 2:
        raise ValueError(f"{q.shape=}: the rotary embedding needs an even head_dim")
    for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_pages", k_pages),
                    ("v_pages", v_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating array, got {name}.dtype={x.dtype}")
    for name, x in (("slot_mapping", slot_mapping), ("positions", positions)):
        if np.shape(x) != (T,):
            raise ValueError(f"{name} must be [T={T}], got shape {np.shape(x)}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{name} must hold integers, got dtype {jnp.result_type(x)}")
    if np.shape(inv_freq) != (H // 2,):
        raise ValueError(f"inv_freq must be [H/2={H // 2}], got shape {np.shape(inv_freq)}")
    if not isinstance(slot_mapping, jax.core.Tracer):
        from fastattn.kv_cache import check_slot_mapping  # fastattn imports this module

        check_slot_mapping(slot_mapping, P, page_size)
    if T == 0:
        return q, k_pages, v_pages
    if block_sizes is None:
        block_sizes = RopeWriteBlockSizes.default_for(num_tokens=T, head_dim=H)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _rope_write_kv_call(
        q, k_new, v_new, k_pages, v_pages, jnp.asarray(slot_mapping, jnp.int32),
        jnp.asarray(positions, jnp.int32), jnp.asarray(inv_freq, jnp.float32),
        block_sizes=block_sizes, interpret=bool(interpret))


# ----------------------------------------------------------------------------- reference


def _rope_reference(x, positions, inv_freq):
    """x [T, heads, H] rotated by positions [T], pairs (i, i + H/2), in f32, back to x.dtype."""
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq.astype(jnp.float32)
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_write_kv_reference(q, k_new, v_new, k_pages, v_pages, slot_mapping, positions,
                            inv_freq):
    """The unfused path: rotate q and k in jnp, then `fastattn.write_kv`. Same returns."""
    positions = jnp.asarray(positions)
    from fastattn.kv_cache import write_kv  # fastattn imports this module

    k_pages, v_pages = write_kv(k_pages, v_pages, _rope_reference(k_new, positions, inv_freq),
                                v_new, slot_mapping)
    return _rope_reference(q, positions, inv_freq), k_pages, v_pages
