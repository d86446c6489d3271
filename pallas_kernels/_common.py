"""Math and argument checks shared by the Pallas kernels."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
WARP_COUNTS = (1, 2, 4, 8, 16)
# SMs of an H100 SXM: what program counts are sized by where the device cannot be asked
# (they only need the order of magnitude).
GPU_SMS = 132
# L2 cache of an H100 / H200 (50 MiB): whether an operand that every tile of a head rereads
# stays there (the Mosaic kernels' launch order).
GPU_L2_BYTES = 50 * 2**20


def check_tile_fields(config, *, smallest_block: int = 16, smallest: dict | None = None) -> None:
    """The one validation of every kernel's frozen tile dataclass (call it from
    __post_init__): `block_*` fields powers of two >= smallest_block (per-field overrides in
    `smallest`), `num_warps*` one of WARP_COUNTS, `num_stages*` >= 1. The ValueError names
    the class, the field and its value."""
    cls = type(config).__name__
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        if name.startswith("block_"):
            low = (smallest or {}).get(name, smallest_block)
            if not (isinstance(value, int) and value >= low and value & (value - 1) == 0):
                raise ValueError(f"{cls}.{name}={value} must be a power of two >= {low}")
        elif name.startswith("num_warps") and value not in WARP_COUNTS:
            raise ValueError(f"{cls}.{name}={value} must be one of {WARP_COUNTS}")
        elif name.startswith("num_stages") and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{cls}.{name}={value} must be >= 1")


def check_bool(name: str, value) -> None:
    """ValueError naming the argument unless value is a bool (an int 1 would pass a truth
    test and hide a mistake)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {name}={value!r}")


def check_scalar_options(softcap, scale, window, *, window_name: str = "sliding_window"):
    """Validates the options every attention op shares (ValueError naming the field and value,
    the window under `window_name`, the caller's name for it); returns (softcap, scale,
    window) as floats and a (left, right) tuple (or None)."""
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise ValueError(f"{window_name} must be (left, right), got {window!r}")
        for side, bound in zip(("left", "right"), window):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)
                                      or bound < 0):
                raise ValueError(f"{window_name} {side} bound must be an int >= 0 or None, "
                                 f"got {bound!r}")
        window = tuple(window)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) \
                or not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
        softcap = float(softcap)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number or None, got {scale!r}")
        scale = float(scale)
    return softcap, scale, window


def dot(a, b, *, contract: tuple[int, int]):
    """2-D matmul with f32 accumulation; `contract` names the contracted axis of a and of b.
    f32 inputs use full f32 precision (Triton would otherwise pick TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def exp2(x, *, interpret: bool):
    """2**x for f32 x. On the GPU one `ex2.approx.ftz.f32` (libdevice's exp2f, which
    jnp.exp2 lowers to, adds denormal handling that a softmax does not need: results below
    2**-126 flush to 0). The softmax is exp-bound at H <= 64, so the instruction count matters.
    Interpret mode (CPU) uses jnp.exp2."""
    if interpret:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def load_page_ids(table_ref, keys, valid, *, page_size: int, table_offset=0):
    """Page id of each key of `keys` [n] of one sequence, from its block table table_ref
    [pages_per_seq] (or a flattened [S * pages_per_seq] table of several sequences, the
    sequence's entries starting at table_offset): key j sits at row j % page_size of page
    table[j // page_size] (vLLM's layout). Keys that are not `valid` get page 0 (table
    entries past a sequence's pages may hold anything, or lie past the table); valid None:
    every key of the tile exists, no mask on the table reads."""
    entries = table_ref.at[table_offset + jax.lax.div(keys, page_size)]
    # Triton takes a fill value only together with a mask.
    return plgpu.load(entries) if valid is None else plgpu.load(entries, mask=valid, other=0)


def paged_rows(page_ids, keys, *, page_size: int, width: int):
    """All-array index of keys `keys` [n] in a page pool [P, page_size, width], given each
    key's page (`load_page_ids`):

        keys  k_start ........................ k_start + n     (one tile, any page size)
        pages | table[i] | table[i + 1] | ... |                  each row gathered by page id

    A tile spans as many pages as it needs, so its size is the kernel's choice, not the page
    size. Keys whose page id is a placeholder (0) must be masked in the K/V loads.
    Gives [n, width] when loaded; the last axis stays contiguous, so loads stay vectorised."""
    return page_ids[:, None], jax.lax.rem(keys, page_size)[:, None], jnp.arange(width)[None, :]


def online_softmax_init(rows: int, width: int):
    """(acc [rows, width], running max m [rows], running sum l [rows]) before any key."""
    return (jnp.zeros((rows, width), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def online_softmax_step(carry, s, v, *, may_be_empty: bool, interpret: bool):
    """Folds one key tile into the running softmax (FlashAttention-2, Alg. 1 lines 8-10).

    s [rows, cols]: log2-domain scores, -inf where masked; v [cols, width]. The accumulator
    stays unnormalised (divide by l at the end). may_be_empty (static): some row may have
    seen no key yet (m = -inf); it is shifted by 0 instead so that exp2 gives 0, not NaN.
    """
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if may_be_empty else m_new
    alpha = exp2(m - m_shift, interpret=interpret)
    p = exp2(s - m_shift[:, None], interpret=interpret)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, contract=(1, 0))
    return acc, m_new, l


def online_softmax_finish(carry):
    """(out = acc / l, lse in natural log); rows that saw no key give 0 and -inf."""
    acc, m, l = carry
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, (m + jnp.log2(safe_l)) / LOG2E, -jnp.inf)
    return acc / safe_l[:, None], lse
