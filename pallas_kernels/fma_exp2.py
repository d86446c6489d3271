"""2**x with part of the work moved from the exp2 unit to the FMA pipe (FlashAttention-4's
trick, here on Hopper).

Why: a softmax tile of R rows and N keys costs R * N `MUFU.EX2`s, and an H100 SM retires 16 of
those per clock against 4096 bf16 tensor-core FLOPs. At head_dim 64 a 128-key step is then as
long on the exp2 unit as on the tensor cores (2 * 2 * 64 = 256 FLOPs per score, 16 exp2s per
clock: 1024 clocks each for a 256 x 64 x 64 block of four consumers; ncu, session 8: the two
pipes busy 38% and 36%, barely overlapping). Computing some of the exp2s as a polynomial on the
FMA pipe (128 lanes per clock, ~9 instructions each) shortens the softmax wherever the exp2 unit
is what it waits on.

The polynomial: x is clamped to >= -127 and split as x = j + f with j = round(x) (adding 1.5 *
2**23 rounds to an integer and leaves it in the low mantissa bits) and f in [-0.5, 0.5];
2**f ~ 1 + f (c1 + f (c2 + f c3)) (minimax in the relative error, |error| <= 1.1e-4 in f32:
well under the 2**-9 of the bf16 P it feeds); j is added to the exponent field as an integer.
x = -127 (a masked score, -inf clamped) gives exactly 0: 1.0's bits minus 127 << 23. NaN stays
NaN. Results in (2**-127, 2**-126) come out denormal where `ex2.approx.ftz` flushes to 0.

`exp2_fma_split(x, period)` runs the polynomial on one 8-key column group in every `period` of
a Mosaic GPU softmax tile (the WGMMA layout's registers hold 2 adjacent columns each, in groups
of 8 columns) and `ex2.approx` on the rest. Off the GPU (interpret mode) it computes the same
split with jnp.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

# 2**f ~ 1 + f * (C1 + f * (C2 + f * C3)) on [-0.5, 0.5], relative error <= 1.1e-4 in f32
# (minimax by iteratively reweighted least squares on 20001 points; the constant term is held
# at 1 so that x = -127 gives exactly 0).
EXP2_POLY = (0.6932829022407532, 0.24221037328243256, 0.05500858277082443)
EXP2_POLY_MAX_REL_ERROR = 1.1e-4
ROUND_TO_INT = 12582912.0  # 1.5 * 2**23: x + this, in f32, is round(x) + this, exactly
LOWEST_EXPONENT = -127.0
COLUMN_GROUP = 8  # columns of one register group in the WGMMA layout


def exp2_poly(x):
    """2**x for f32 x by the polynomial, in jnp (the reference and the interpret-mode path).
    j = round(x) here by lax.round, not by adding ROUND_TO_INT: XLA folds (x + c) - c to x
    under jit. Both round half to even, so the numbers are the GPU path's."""
    x = jnp.maximum(x.astype(jnp.float32), LOWEST_EXPONENT)
    j = lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN)
    f = x - j
    c1, c2, c3 = EXP2_POLY
    p = (f * (f * (f * c3 + c2) + c1) + 1.0).astype(jnp.float32)
    exponent = lax.shift_left(j.astype(jnp.int32), jnp.int32(23))
    return lax.bitcast_convert_type(lax.bitcast_convert_type(p, jnp.int32) + exponent,
                                    jnp.float32)


def poly_columns(width: int, period: int) -> np.ndarray:
    """Which of `width` columns get the polynomial: the last 8-column group of every
    `period` groups (a bool mask)."""
    group = np.arange(width) // COLUMN_GROUP
    return group % period == period - 1


def check_period(period, width: int) -> None:
    """ValueError unless period is None or an int >= 1 that leaves some group to each unit."""
    if period is None:
        return
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"exp2 FMA period must be an int >= 1 or None, got {period!r}")
    if width % COLUMN_GROUP or period > width // COLUMN_GROUP:
        raise ValueError(f"exp2 FMA period={period} needs at least {period} groups of "
                         f"{COLUMN_GROUP} columns, the tile has {width} columns")


def exp2_fma_split(x, period: int, *, interpret: bool):
    """2**x for a Mosaic GPU softmax tile x [rows, keys] (f32, WGMMA layout): the polynomial
    on the columns poly_columns(keys, period) picks, ex2.approx elsewhere. In interpret mode,
    jnp.exp2 / exp2_poly by the same columns."""
    rows, width = x.shape
    check_period(period, width)
    if interpret:  # (a kernel may not capture array constants: the columns from an iota)
        group = lax.broadcasted_iota(jnp.int32, x.shape, 1) // COLUMN_GROUP
        return jnp.where(group % period == period - 1, exp2_poly(x), jnp.exp2(x))
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32, layout=plgpu.Layout.WGMMA))
    def split(_launch_ctx, tile):
        return _split_registers(tile, period)

    return split(x)


def _split_registers(tile, period: int):
    """The register-level split (mosaic_gpu FragmentedArray in, FragmentedArray out): both
    results are built for every register and each register takes one; LLVM drops the unused
    half (ex2.approx is a side-effect-free inline asm, the polynomial plain arithmetic)."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import math as mlir_math

    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    layout_axes = tile.registers.ndim
    # WGMMA layout: the registers' axis 1 counts 8-column groups (tiling (64, 8) first).
    if layout_axes < 2 or tile.registers.shape[1] * COLUMN_GROUP != tile.shape[1]:
        raise NotImplementedError(
            f"exp2_fma_split expects the WGMMA register layout, got registers of shape "
            f"{tile.registers.shape} for a tile of shape {tile.shape}")

    def fma(a, b, c):
        return a._pointwise(lambda a, b, c: mlir_math.fma(a, b, c), b, c)

    x = tile.max(LOWEST_EXPONENT)
    shifted = x + ROUND_TO_INT
    f = x - (shifted - ROUND_TO_INT)
    c1, c2, c3 = EXP2_POLY
    p = fma(fma(fma(f, c3, c2), f, c1), f, 1.0)
    exponent = shifted.bitcast(i32, output_is_signed=True) << 23
    poly = (p.bitcast(i32, output_is_signed=True) + exponent).bitcast(f32)
    unit = tile.exp2(approx=True)

    group = np.indices(tile.registers.shape)[1]
    registers = np.where(group % period == period - 1, poly.registers, unit.registers)
    return mgpu.FragmentedArray(_registers=registers, _layout=tile.layout, _is_signed=None)
