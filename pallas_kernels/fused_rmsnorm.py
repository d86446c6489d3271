"""Residual add + RMSNorm in one pass over the rows, as Pallas kernels, Triton backend.

A pre-norm transformer block ends with `x = x + f(norm(x))` and the next block begins with
`norm(x)`. Unfused, XLA reads x and f's output, writes the sum, then reads the sum again to
normalise it. Here one kernel reads both, writes the new residual stream and the normed rows:

    x        [..., D] ─┐
                       + ─── summed [..., D]  (x.dtype: the new residual stream)
    residual [..., D] ─┘         │
                                 └─ rmsnorm ─ normed [..., D]  (x.dtype)

Numerics are models/llama.py's RMSNorm exactly: the sum is rounded to x.dtype, the statistics
are f32, the normalised rows are cast to x.dtype and only then multiplied by the weight, itself
cast to x.dtype:

    s = float32(x + residual)
    normed = (s * rsqrt(mean(s**2) + eps)).astype(x.dtype) * weight.astype(x.dtype)

`residual=None` is plain RMSNorm (summed is x itself, nothing extra is read or written).

Kernels (leading dims flattened into M rows; D padded to Dp, the next power of two, by masks):
  forward   grid (M / block_rows,): each program holds block_rows whole rows [block_rows, Dp]
            in registers, so every row is read once and written once.
  backward  grid (P,): program p owns a contiguous chunk of rows, recomputes rstd from summed,
            writes d_x for its rows and accumulates its share of d_weight in f32 registers;
            the [P, D] partials are summed by XLA (P is small, so this is a few MB at most).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import GPU_SMS, check_tile_fields

_ROW_ELEMENTS = 4096  # elements of a forward program's [block_rows, Dp] tile, when D allows

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormBlockSizes:
    """Tiles and Triton knobs of the two kernels. Changes speed, not the normed rows or d_x
    (each row is computed alone); d_weight's f32 partial sums are added in an order that
    depends on block_rows and dw_partials, so it can change in its last bits.

    block_rows: rows per program tile (a power of two); each row is whole, D padded to a
        power of two, so block_rows * Dp values of each operand sit in registers.
    dw_partials: at most this many backward programs, hence rows of d_weight partials.
    """

    block_rows: int = 1
    num_warps: int = 8
    dw_partials: int = 4 * GPU_SMS

    def __post_init__(self):
        check_tile_fields(self, smallest_block=1)
        if self.dw_partials < 1:
            raise ValueError(f"NormBlockSizes.dw_partials={self.dw_partials} must be >= 1")

    @classmethod
    def default_for(cls, rows: int, width: int) -> "NormBlockSizes":
        """About _ROW_ELEMENTS values per program (16 KB of f32 registers per operand): many
        short rows per program for small D, one row for D >= 4096; one warp per 512 values."""
        width_p = pl.next_power_of_2(width)
        block_rows = max(1, min(_ROW_ELEMENTS // width_p, pl.next_power_of_2(rows)))
        num_warps = min(16, max(1, block_rows * width_p // 512))
        return cls(block_rows=block_rows, num_warps=num_warps)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call; hashable so it can be a custom_vjp nondiff argument."""

    eps: float
    block_sizes: NormBlockSizes
    interpret: bool
    backward: str  # "pallas" or "reference" (debugging: differentiate the reference)


# ----------------------------------------------------------------------------- shared kernel math


def _tile_mask(block_rows: int, row_limit, width_p: int, width: int):
    """[block_rows, Dp] bool: the real elements of a tile whose first row is row 0 of the
    tile and whose rows at or past row_limit lie past the array. Shared by both kernels."""
    return ((jnp.arange(block_rows) < row_limit)[:, None]
            & (jnp.arange(width_p) < width)[None, :])


def _rstd(s, width: int, eps: float):
    """1 / rms of each row of s [rows, Dp] (f32, zero in the padded columns): [rows]."""
    return lax.rsqrt(jnp.sum(s * s, axis=1) / width + eps)


# ----------------------------------------------------------------------------- forward


def _add_rmsnorm_fwd_kernel(*refs, eps: float, rows: int, width: int, has_residual: bool):
    # x_ref, residual_ref [block_rows, Dp]; w_ref [Dp]; normed_ref, summed_ref [block_rows, Dp]
    if has_residual:
        x_ref, residual_ref, w_ref, normed_ref, summed_ref = refs
    else:
        x_ref, w_ref, normed_ref = refs
    block_rows, width_p = x_ref.shape
    mask = _tile_mask(block_rows, rows - pl.program_id(0) * block_rows, width_p, width)
    s = plgpu.load(x_ref, mask=mask, other=0)
    if has_residual:
        s = s + plgpu.load(residual_ref, mask=mask, other=0)  # rounded to x.dtype, as unfused
        plgpu.store(summed_ref, s, mask=mask)
    s = s.astype(jnp.float32)
    normed = (s * _rstd(s, width, eps)[:, None]).astype(x_ref.dtype)
    w = plgpu.load(w_ref, mask=jnp.arange(width_p) < width, other=0).astype(x_ref.dtype)
    plgpu.store(normed_ref, normed * w[None, :], mask=mask)


def _add_rmsnorm_fwd(x, residual, weight, st: _Static):
    M, D = x.shape
    Dp = pl.next_power_of_2(D)
    bs = st.block_sizes
    has_residual = residual is not None
    row_spec = pl.BlockSpec((bs.block_rows, Dp), lambda i: (i, 0))
    out_shape = jax.ShapeDtypeStruct((M, D), x.dtype)
    outs = pl.pallas_call(
        functools.partial(_add_rmsnorm_fwd_kernel, eps=st.eps, rows=M, width=D,
                          has_residual=has_residual),
        grid=(pl.cdiv(M, bs.block_rows),),
        in_specs=[row_spec] * (1 + has_residual) + [pl.BlockSpec((Dp,), lambda i: (0,))],
        out_specs=[row_spec] * (1 + has_residual),
        out_shape=[out_shape] * (1 + has_residual),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=1),
        interpret=st.interpret,
        name="add_rmsnorm_fwd" if has_residual else "rmsnorm_fwd",
    )(*([x, residual] if has_residual else [x]), weight)
    return (outs[0], outs[1]) if has_residual else (outs[0], None)


# ----------------------------------------------------------------------------- backward


def _add_rmsnorm_bwd_kernel(*refs, eps: float, rows: int, width: int, block_rows: int,
                            has_residual: bool):
    # s_ref, dn_ref, dsum_ref, dx_ref [chunk, Dp]: this program's rows; w_ref [Dp];
    # dw_ref [Dp]: this program's row of the d_weight partials.
    if has_residual:
        s_ref, w_ref, dn_ref, dsum_ref, dx_ref, dw_ref = refs
    else:
        s_ref, w_ref, dn_ref, dx_ref, dw_ref = refs
    chunk, width_p = s_ref.shape
    limit = rows - pl.program_id(0) * chunk  # rows of this chunk that exist
    col_ok = jnp.arange(width_p) < width
    # The forward multiplied by weight.astype(x.dtype), so that is what the gradient sees.
    w = plgpu.load(w_ref, mask=col_ok, other=0).astype(dx_ref.dtype).astype(jnp.float32)

    def body(b, dw):
        start = b * block_rows
        mask = _tile_mask(block_rows, limit - start, width_p, width)
        tile = (pl.ds(start, block_rows), slice(None))
        s = plgpu.load(s_ref.at[tile], mask=mask, other=0).astype(jnp.float32)
        g = plgpu.load(dn_ref.at[tile], mask=mask, other=0).astype(jnp.float32)
        rstd = _rstd(s, width, eps)[:, None]
        n = s * rstd
        # With n = s r, r = (mean(s^2) + eps)^(-1/2), y = n w and g = dL/dy:
        #   dL/ds = r (g w - n mean(g w n))   (the mean couples every column of a row)
        gw = g * w[None, :]
        ds = rstd * (gw - n * (jnp.sum(gw * n, axis=1) / width)[:, None])
        if has_residual:  # summed also leaves the block: its own cotangent adds on
            ds = ds + plgpu.load(dsum_ref.at[tile], mask=mask, other=0).astype(jnp.float32)
        plgpu.store(dx_ref.at[tile], ds.astype(dx_ref.dtype), mask=mask)
        return dw + jnp.sum(g * n, axis=0)  # rows past the array have g = 0

    num_tiles = jnp.minimum(chunk // block_rows, lax.div(limit + block_rows - 1, block_rows))
    dw = lax.fori_loop(0, num_tiles, body, jnp.zeros((width_p,), jnp.float32))
    plgpu.store(dw_ref, dw, mask=col_ok)


def _add_rmsnorm_bwd(summed, weight, d_normed, d_summed, st: _Static):
    """(d_x [M, D] in summed.dtype, d_weight [D] in weight.dtype); d_x is also d_residual."""
    M, D = summed.shape
    Dp = pl.next_power_of_2(D)
    bs = st.block_sizes
    has_residual = d_summed is not None
    tiles = pl.cdiv(M, bs.block_rows)
    chunk = pl.cdiv(tiles, min(tiles, bs.dw_partials)) * bs.block_rows  # whole tiles
    programs = pl.cdiv(M, chunk)
    chunk_spec = pl.BlockSpec((chunk, Dp), lambda p: (p, 0))
    d_x, dw_parts = pl.pallas_call(
        functools.partial(_add_rmsnorm_bwd_kernel, eps=st.eps, rows=M, width=D,
                          block_rows=bs.block_rows, has_residual=has_residual),
        grid=(programs,),
        in_specs=[chunk_spec, pl.BlockSpec((Dp,), lambda p: (0,)), chunk_spec]
                 + [chunk_spec] * has_residual,
        out_specs=[chunk_spec, pl.BlockSpec((None, Dp), lambda p: (p, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, D), summed.dtype),
                   jax.ShapeDtypeStruct((programs, D), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=2),
        interpret=st.interpret,
        name="add_rmsnorm_bwd" if has_residual else "rmsnorm_bwd",
    )(summed, weight, d_normed, *([d_summed] if has_residual else []))
    return d_x, jnp.sum(dw_parts, axis=0).astype(weight.dtype)


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _add_rmsnorm(x, residual, weight, st: _Static):
    """x, residual [M, D] (residual may be None), weight [D] -> (normed, summed or None)."""
    return _add_rmsnorm_fwd(x, residual, weight, st)


def _add_rmsnorm_vjp_fwd(x, residual, weight, st):
    normed, summed = _add_rmsnorm_fwd(x, residual, weight, st)
    # Only summed (an output anyway) is kept: rstd is recomputed, not stored.
    return (normed, summed), (x if summed is None else summed, weight)


def _add_rmsnorm_vjp_bwd(st, saved, cotangents):
    summed, weight = saved
    d_normed, d_summed = cotangents  # d_summed is None exactly when residual was None
    has_residual = d_summed is not None
    if st.backward == "reference":
        # summed is already the rounded sum; differentiating the plain norm of it is exact
        # because d(x + residual)/dx = d(x + residual)/dresidual = 1.
        _, vjp = jax.vjp(lambda s, w: add_rmsnorm_reference(s, None, w, eps=st.eps)[0],
                         summed, weight)
        d_x, d_weight = vjp(d_normed)
        if has_residual:
            d_x = (d_x.astype(jnp.float32) + d_summed.astype(jnp.float32)).astype(summed.dtype)
    else:
        d_x, d_weight = _add_rmsnorm_bwd(summed, weight, d_normed, d_summed, st)
    return d_x, (d_x if has_residual else None), d_weight


_add_rmsnorm.defvjp(_add_rmsnorm_vjp_fwd, _add_rmsnorm_vjp_bwd)


def _validate(x, residual, weight, eps, backward):
    """Checks every argument before any work starts; ValueError names the argument."""
    for name, a in (("x", x), ("residual", residual), ("weight", weight)):
        if a is None and name == "residual":
            continue
        if not hasattr(a, "shape") or not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got "
                             f"{name}.dtype={getattr(a, 'dtype', type(a).__name__)}")
    if x.ndim < 1 or 0 in x.shape:
        raise ValueError(f"x must be [..., D] with no empty dimension, got {x.shape=}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape, got {residual.shape=} and {x.shape=}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype, got {residual.dtype=!s} and "
                             f"{x.dtype=!s}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [D] with D = x.shape[-1] = {x.shape[-1]}, got "
                         f"{weight.shape=}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got eps={eps!r}")
    if backward not in ("pallas", "reference"):
        raise ValueError(f"backward must be 'pallas' or 'reference', got backward={backward!r}")


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret", "backward"))
def add_rmsnorm(x, residual, weight, *, eps: float, block_sizes: NormBlockSizes | None = None,
                interpret: bool | None = None, backward: str = "pallas"):
    """Returns (normed, summed): summed = x + residual (x.dtype), normed = RMSNorm(summed).

    x, residual: [..., D], same shape and dtype; residual None means plain RMSNorm, and then
    summed is x. weight: [D], any float dtype (cast to x.dtype before the multiply, as
    models/llama.py does). normed and summed: [..., D] in x.dtype. See the module docstring for
    the exact numerics. block_sizes None picks NormBlockSizes.default_for(M, D). interpret None
    means Pallas interpret mode unless the default backend is a GPU. backward="reference"
    differentiates the pure-jnp reference instead of running the backward kernel (debugging).
    Differentiable in x, residual and weight; d_x and d_residual are the same array.
    """
    _validate(x, residual, weight, eps, backward)
    D = x.shape[-1]
    M = math.prod(x.shape[:-1])
    st = _Static(
        eps=float(eps), block_sizes=block_sizes or NormBlockSizes.default_for(M, D),
        interpret=jax.default_backend() != "gpu" if interpret is None else bool(interpret),
        backward=backward)
    flat_residual = None if residual is None else residual.reshape(M, D)
    normed, summed = _add_rmsnorm(x.reshape(M, D), flat_residual, weight, st)
    return normed.reshape(x.shape), (x if summed is None else summed.reshape(x.shape))


# ----------------------------------------------------------------------------- reference


def add_rmsnorm_reference(x, residual, weight, *, eps: float):
    """Unfused residual add and RMSNorm in plain jnp, written as models/llama.py computes them:
    the oracle of the tests. Shares no code with the kernels.

    Statistics are f32 (f64 when x is f64, so that f64 inputs give the f64 oracle); outputs
    are (normed, summed) in x.dtype, summed being x when residual is None.
    """
    summed = x if residual is None else x + residual
    stat_dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    s = summed.astype(stat_dtype)
    inv_rms = lax.rsqrt(jnp.mean(jnp.square(s), axis=-1, keepdims=True) + eps)
    normed = (s * inv_rms).astype(x.dtype) * weight.astype(x.dtype)
    return normed, summed
