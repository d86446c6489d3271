"""The online softmax's rescale of O, skipped where no row's max moved (FlashAttention-4's
conditional rescaling, here in a Mosaic GPU consumer warpgroup).

Why: each step of the forward multiplies every row of its O accumulator by alpha = 2**(m_old -
m_new): 32 FMULs per thread at H = 64, 64 at H = 128, a tenth of an H = 64 step's instructions
(session 13's SASS: 298 per loop, FMUL 34), and that kernel runs at the rate it issues
instructions. A row's running max stops moving after the first few key tiles of a long row,
and a row may keep an older max as long as the new scores exceed it by at most `slack` (log2
units): its probabilities are then up to 2**slack instead of 1, which bf16 / fp16 P and the f32
sums carry without loss (the final O / l and lse = m + log l use the same max). Then alpha is
exactly 1 for the row, and a warp whose rows all have alpha == 1 skips the multiplies.

`keep_max` is the max rule (pure jnp, every path); `rescale_where_moved` the multiply, a
branch per warp on the GPU (warp-uniform through vote.any, so it never diverges), a plain
multiply in interpret mode (where alpha == 1 multiplies exactly).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax


def keep_max(m_old, m_new, slack: float):
    """The max a row goes on with: its old one while the new one exceeds it by at most
    `slack`, else the new one (also when the old one is -inf: -inf - -inf is NaN)."""
    return jnp.where(m_new - m_old <= slack, m_old, m_new)


def check_slack(slack) -> None:
    """ValueError unless slack is None or a number in [0, 15] (P up to 2**15 in fp16 stays
    below its 65504)."""
    if slack is None:
        return
    if isinstance(slack, bool) or not isinstance(slack, (int, float)) \
            or not 0 <= slack <= 15:
        raise ValueError(f"rescale slack must be a number in [0, 15] or None, got {slack!r}")


def rescale_where_moved(acc, alpha, *, interpret: bool):
    """acc [rows, H] * alpha [rows] (rows broadcast), in a Mosaic GPU consumer warpgroup:
    on the GPU only warps with some alpha != 1 multiply (acc in the WGMMA layout, alpha in
    its row layout)."""
    if interpret:
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)),
        return_type=plgpu.ShapeDtypeStruct(acc.shape, acc.dtype, layout=plgpu.Layout.WGMMA))
    def rescale(_launch_ctx, acc_regs, alpha_regs):
        return _branch_per_warp(acc_regs, alpha_regs)

    return rescale(acc, alpha)


def _branch_per_warp(acc, alpha):
    """mosaic_gpu FragmentedArrays in and out: scf.if (any alpha != 1 in the warp) multiply,
    else pass acc through."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, scf, vector

    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    moved = None
    for reg in alpha.registers.flat:  # this thread's rows
        values = [reg] if not isinstance(reg.type, ir.VectorType) else [
            vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))
            for i in range(ir.VectorType(reg.type).shape[0])]
        for value in values:
            ne = arith.cmpf(arith.CmpFPredicate.UNE, value, arith.constant(f32, 1.0))
            moved = ne if moved is None else arith.ori(moved, ne)
    moved = arith.extui(i32, moved)
    # vote.any over the warp: every lane takes the same branch (a warp's lanes hold
    # different rows).
    any_moved = llvm.inline_asm(
        i32, [moved],
        "{ .reg .pred p; setp.ne.b32 p, $1, 0; vote.sync.any.pred p, p, 0xffffffff; "
        "selp.b32 $0, 1, 0, p; }",
        "=r,r", has_side_effects=True)
    cond = arith.cmpi(arith.CmpIPredicate.ne, any_moved, arith.constant(i32, 0))
    types = [r.type for r in acc.registers.flat]
    branch = scf.IfOp(cond, types, has_else=True)
    with ir.InsertionPoint(branch.then_block):
        scaled = acc * alpha.broadcast_in_dim(acc.shape, (0,), fa.WGMMA_LAYOUT)
        scf.yield_(list(scaled.registers.flat))
    with ir.InsertionPoint(branch.else_block):
        scf.yield_(list(acc.registers.flat))
    registers = np.empty(acc.registers.shape, dtype=object)
    for index, value in zip(np.ndindex(registers.shape), branch.results):
        registers[index] = value
    return mgpu.FragmentedArray(_registers=registers, _layout=acc.layout, _is_signed=None)
