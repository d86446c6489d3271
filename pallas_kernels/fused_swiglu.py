"""The first half of a SwiGLU MLP, h = silu(x @ w_gate) * (x @ w_up), as one Pallas matmul
kernel, Triton backend (Shazeer, "GLU Variants Improve Transformer", 2020).

    x [M, D]   w_gate, w_up [D, F]   ->   h [M, F]      (x may be [..., D]: rows flattened)

Unfused, XLA writes gate and up ([M, F] each) to HBM and reads them back for the elementwise
epilogue, and autodiff keeps both for the backward. Here each program owns one [block_m,
block_f] tile of h and runs both products side by side:

    for each block_d chunk of D:            x tile [block_m, block_d]  loaded once,
        gate += x_tile @ w_gate_tile        used by both products
        up   += x_tile @ w_up_tile          (two f32 accumulators in registers)
    h_tile = silu(gate) * up                written once, in x.dtype

so gate and up never reach HBM. The backward saves only x (and the weights, which exist
anyway), recomputes gate and up with XLA matmuls and differentiates the epilogue by hand.

Ragged shapes: rows past M and columns past F are masked loads and stores; D need not be a
multiple of block_d (only its last chunk is masked). Numerics: both products accumulate in f32
(f32 inputs at full f32 precision, no TF32), the epilogue is f32, h is rounded once.

Programs walk the tiles of h in groups of group_m tile rows (the order a column-major walk
would take inside each group) so that the tiles running at the same time share x tiles and
weight tiles in L2:

             F tiles ->
    M tiles   0  3  6  9      group_m = 3: programs 0..11 cover tile rows 0-2,
              1  4  7 10      the next group starts at tile row 3; the last group
              2  5  8 11      may have fewer tile rows.
             12 14 16 18
             13 15 17 19
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import check_tile_fields, dot

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwigluBlockSizes:
    """Tile sizes and Triton knobs of the forward kernel. Changes speed, never numbers beyond
    the order of the f32 accumulation along D (block_d).

    Tiles are powers of two >= 16 (the smallest tile Triton's matrix instructions take).
    group_m: tile rows of h that consecutive programs share (L2 reuse; see the module
    docstring).
    """

    block_m: int = 128
    block_f: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8

    def __post_init__(self):
        check_tile_fields(self)
        if self.group_m < 1:
            raise ValueError(f"SwigluBlockSizes.group_m={self.group_m} must be >= 1")

    @classmethod
    def default_for(cls, *, rows: int, width: int, ffw: int, dtype) -> "SwigluBlockSizes":
        """128 x 128 output tiles, 8 warps, 3 stages (two 128 x 128 f32 accumulators use half
        of a warp's registers). Few rows (decode) use narrower F tiles so that the weight
        stream spreads over more programs; 4-byte inputs halve block_d so that three stages
        of x and both weight tiles stay within shared memory. Tiles shrink to the problem."""
        base = cls(block_d=32 if jnp.dtype(dtype).itemsize >= 4 else 64)
        if rows <= 64:
            base = dataclasses.replace(base, block_f=64, num_warps=4)
        return base.fit(rows=rows, width=width, ffw=ffw)

    def fit(self, *, rows: int, width: int, ffw: int) -> "SwigluBlockSizes":
        """Shrinks tiles that are larger than the (power-of-two padded) problem."""
        def cap(n):
            return max(16, pl.next_power_of_2(n))
        return dataclasses.replace(self, block_m=min(self.block_m, cap(rows)),
                                   block_f=min(self.block_f, cap(ffw)),
                                   block_d=min(self.block_d, cap(width)))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call; hashable so it can be a custom_vjp nondiff argument."""

    block_sizes: SwigluBlockSizes
    interpret: bool
    backward: str  # "xla" or "reference" (debugging: differentiate the reference)


# ----------------------------------------------------------------------------- forward


def _tile_of(i, *, m_tiles: int, f_tiles: int, group_m: int):
    """Program i -> (tile row, tile column) of h, grouped as in the module docstring. Used by
    the BlockSpecs and by the kernel's masks, so both agree on where a program's tile is."""
    per_group = group_m * f_tiles
    group = lax.div(i, per_group)
    first_row = group * group_m
    group_rows = jnp.minimum(m_tiles - first_row, group_m)
    j = i - group * per_group  # position inside the group
    return first_row + lax.rem(j, group_rows), lax.div(j, group_rows)


def _swiglu_fwd_kernel(x_ref, w_gate_ref, w_up_ref, h_ref, *, rows: int, width: int, ffw: int,
                       tile_of, bs: SwigluBlockSizes):
    # x_ref [block_m, D]; w_gate_ref, w_up_ref [D, block_f]; h_ref [block_m, block_f]
    block_m, block_f, block_d = bs.block_m, bs.block_f, bs.block_d
    tile_m, tile_f = tile_of(pl.program_id(0))
    row_ok = (tile_m * block_m + jnp.arange(block_m) < rows)[:, None]  # [block_m, 1]
    col_ok = (tile_f * block_f + jnp.arange(block_f) < ffw)[None, :]   # [1, block_f]

    def chunk(k, acc, *, last: bool):
        gate, up = acc
        start = k * block_d
        x_mask, w_mask = row_ok, col_ok
        if last:  # the ragged end of D: columns of x and rows of w past D read as 0
            d_ok = start + jnp.arange(block_d) < width
            x_mask, w_mask = x_mask & d_ok[None, :], w_mask & d_ok[:, None]
        x = plgpu.load(x_ref.at[:, pl.ds(start, block_d)], mask=x_mask, other=0)
        w_gate = plgpu.load(w_gate_ref.at[pl.ds(start, block_d), :], mask=w_mask, other=0)
        w_up = plgpu.load(w_up_ref.at[pl.ds(start, block_d), :], mask=w_mask, other=0)
        return (gate + dot(x, w_gate, contract=(1, 0)), up + dot(x, w_up, contract=(1, 0)))

    acc = (jnp.zeros((block_m, block_f), jnp.float32), jnp.zeros((block_m, block_f), jnp.float32))
    whole = width // block_d
    acc = lax.fori_loop(0, whole, functools.partial(chunk, last=False), acc)
    if width % block_d:
        # A loop of one trip: its index is traced, so the slice past D is a masked load
        # rather than a static out-of-bounds slice.
        acc = lax.fori_loop(whole, whole + 1, functools.partial(chunk, last=True), acc)
    gate, up = acc
    plgpu.store(h_ref, (gate * jax.nn.sigmoid(gate) * up).astype(h_ref.dtype),
                mask=row_ok & col_ok)


def _swiglu_fwd(x, w_gate, w_up, st: _Static):
    M, D = x.shape
    F = w_gate.shape[1]
    bs = st.block_sizes
    m_tiles, f_tiles = pl.cdiv(M, bs.block_m), pl.cdiv(F, bs.block_f)
    tile_of = functools.partial(_tile_of, m_tiles=m_tiles, f_tiles=f_tiles,
                                group_m=min(bs.group_m, m_tiles))
    w_spec = pl.BlockSpec((D, bs.block_f), lambda i: (0, tile_of(i)[1]))
    return pl.pallas_call(
        functools.partial(_swiglu_fwd_kernel, rows=M, width=D, ffw=F, tile_of=tile_of, bs=bs),
        grid=(m_tiles * f_tiles,),
        in_specs=[pl.BlockSpec((bs.block_m, D), lambda i: (tile_of(i)[0], 0)), w_spec, w_spec],
        out_specs=pl.BlockSpec((bs.block_m, bs.block_f), tile_of),
        out_shape=jax.ShapeDtypeStruct((M, F), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=st.interpret,
        name="swiglu_fwd",
    )(x, w_gate, w_up)


# ----------------------------------------------------------------------------- backward


def _matmul(a, b, subscripts):
    """XLA matmul with f32 accumulation; f32 inputs at full precision, like the forward."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(subscripts, a, b, precision=precision,
                      preferred_element_type=jnp.float32)


def _swiglu_bwd(x, w_gate, w_up, d_h):
    """Recomputes gate and up from x and differentiates h = silu(gate) * up by hand:

        d_up   = d_h * silu(gate)
        d_gate = d_h * up * silu'(gate),   silu'(g) = sig(g) (1 + g (1 - sig(g)))
        d_x    = d_gate @ w_gate^T + d_up @ w_up^T,   d_w_gate = x^T d_gate,   d_w_up = x^T d_up

    d_gate and d_up are rounded to the inputs' dtype before the matmuls (as autodiff of an
    unfused model in that dtype would), which keeps the products on the fast path."""
    gate = _matmul(x, w_gate, "md,df->mf")  # [M, F] f32, alive only inside the backward
    up = _matmul(x, w_up, "md,df->mf")
    sig = jax.nn.sigmoid(gate)
    d_h = d_h.astype(jnp.float32)
    d_up = (d_h * gate * sig).astype(x.dtype)
    d_gate = (d_h * up * sig * (1 + gate * (1 - sig))).astype(x.dtype)
    d_x = _matmul(d_gate, w_gate, "mf,df->md") + _matmul(d_up, w_up, "mf,df->md")
    return (d_x.astype(x.dtype), _matmul(x, d_gate, "md,mf->df").astype(w_gate.dtype),
            _matmul(x, d_up, "md,mf->df").astype(w_up.dtype))


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu(x, w_gate, w_up, st: _Static):
    return _swiglu_fwd(x, w_gate, w_up, st)


def _swiglu_vjp_fwd(x, w_gate, w_up, st):
    # Only the inputs are saved: keeping gate and up ([M, F] each) is the memory this avoids.
    return _swiglu_fwd(x, w_gate, w_up, st), (x, w_gate, w_up)


def _swiglu_vjp_bwd(st, saved, d_h):
    if st.backward == "reference":
        _, vjp = jax.vjp(swiglu_reference, *saved)
        return vjp(d_h)
    return _swiglu_bwd(*saved, d_h)


_swiglu.defvjp(_swiglu_vjp_fwd, _swiglu_vjp_bwd)


def _validate(x, w_gate, w_up, backward):
    """Checks every argument before any work starts; ValueError names the argument."""
    for name, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up)):
        if not hasattr(a, "shape") or not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got "
                             f"{name}.dtype={getattr(a, 'dtype', type(a).__name__)}")
    if x.ndim < 1 or 0 in x.shape:
        raise ValueError(f"x must be [..., D] with no empty dimension, got {x.shape=}")
    if w_gate.ndim != 2 or 0 in w_gate.shape:
        raise ValueError(f"w_gate must be a non-empty [D, F] matrix, got {w_gate.shape=}")
    if w_gate.shape[0] != x.shape[-1]:
        raise ValueError(f"{w_gate.shape=} and {x.shape=} disagree on D (w_gate.shape[0] must "
                         f"be x.shape[-1] = {x.shape[-1]})")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have w_gate's shape, got {w_up.shape=} and {w_gate.shape=}")
    if not (x.dtype == w_gate.dtype == w_up.dtype):
        raise ValueError(f"x, w_gate, w_up must share a dtype (cast the weights first), got "
                         f"{x.dtype=!s}, {w_gate.dtype=!s}, {w_up.dtype=!s}")
    if backward not in ("xla", "reference"):
        raise ValueError(f"backward must be 'xla' or 'reference', got backward={backward!r}")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "backward"))
def swiglu(x, w_gate, w_up, *, block_sizes: SwigluBlockSizes | None = None,
           interpret: bool | None = None, backward: str = "xla"):
    """h = silu(x @ w_gate) * (x @ w_up): x [..., D], w_gate and w_up [D, F] -> h [..., F].

    x, w_gate and w_up share one floating dtype (cast the weights to the compute dtype first,
    as flax's nn.Dense(dtype=...) does); h has that dtype. Both products accumulate in f32
    and the epilogue is f32 (module docstring). block_sizes None picks
    SwigluBlockSizes.default_for; given block sizes are shrunk to the problem. interpret None
    means Pallas interpret mode unless the default backend is a GPU. Differentiable in all
    three inputs; backward="reference" differentiates the pure-jnp reference (debugging).
    """
    _validate(x, w_gate, w_up, backward)
    D, F = w_gate.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, D)
    M = x2.shape[0]
    if block_sizes is None:
        block_sizes = SwigluBlockSizes.default_for(rows=M, width=D, ffw=F, dtype=x.dtype)
    else:
        block_sizes = block_sizes.fit(rows=M, width=D, ffw=F)
    st = _Static(block_sizes=block_sizes,
                 interpret=jax.default_backend() != "gpu" if interpret is None else bool(interpret),
                 backward=backward)
    return _swiglu(x2, w_gate, w_up, st).reshape(*lead, F)


# ----------------------------------------------------------------------------- reference


def swiglu_reference(x, w_gate, w_up):
    """silu(x @ w_gate) * (x @ w_up) in plain jnp at HIGHEST precision: the oracle of the
    tests. Shares no code with the kernel. Computes in f32 (f64 when x is f64, so that f64
    inputs give the f64 oracle) and returns x.dtype; x [..., D], w_gate and w_up [D, F]."""
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x32 = x.astype(acc)
    gate = jnp.matmul(x32, w_gate.astype(acc), precision=lax.Precision.HIGHEST)
    up = jnp.matmul(x32, w_up.astype(acc), precision=lax.Precision.HIGHEST)
    return (jax.nn.silu(gate) * up).astype(x.dtype)
