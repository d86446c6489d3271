"""FlashAttention backward pass for Hopper (sm90), written with Pallas Mosaic GPU.

Opt-in counterpart of the Triton recomputing backward (`flash_attention.flash_attention_backward`,
same signature and conventions, so either can serve the Mosaic GPU forward's custom_vjp):

    q, out, d_out [B, T, N, H]   k, v [B, S, K, H]   lse, d_lse [B, N, T] f32 (natural log)
    N % K == 0: query head n reads kv head n // G, G = N // K; dk, dv sum over the G heads.
    dtype bfloat16 or float16; H in (64, 128); T a multiple of block_q_dkv and block_q_dq,
    S of block_k_dkv and block_k_dq (MosaicBackwardBlockSizes). Anything else raises
    NotImplementedError (ValueError when malformed) before any GPU work.

Masks are the forward's (see `flash_attention_mgpu`): query i sits at absolute position
i + S - T (bottom-right alignment); causal: j <= i + S - T; window (left, right) inclusive;
segment ids; softcap c: score = c * tanh(scale * q.k / c). A row that sees no key
(lse = -inf) gets dq = 0 and contributes nothing to dk, dv.

Math (FlashAttention-2, Dao 2023, Alg. 2), in the log2 domain as the forward:

    delta_i = sum_h dO_ih O_ih - dlse_i                  (preprocess, plain jnp)
    P  = exp2(score * log2(e) - lse * log2(e))           (recomputed, no max needed)
    dV = P^T dO      dP = dO V^T      dS = P * (dP - delta)   (* (1 - tanh^2) with softcap)
    dK = scale * dS^T Q                dQ = scale * dS K
Rows that see no key get lse * log2(e) = +inf in the preprocess, so P = exp2(-inf) = 0 on
every tile, masked or not, and delta = 0: they add exact zeros.

Two kernels, each one CTA = two consumer warpgroups + one producer warpgroup (as the
forward; FlashAttention-3, Shah et al. 2024, section 3.1, without the pingpong):

  dK/dV  grid (S / block_k_dkv, B, K). Consumer w owns keys [k0 + w * rows, +rows) of the
         key tile (rows = block_k_dkv / 2); its K, V rows go to SMEM once (TMA). Steps run
         over the G query heads of the kv head and, for each, the query tiles that see the
         key tile; per step the producer TMA-loads Q, dO [block_q_dkv, H] and lse, delta
         [block_q_dkv] (and the query ids) into stage t % num_stages_dkv. Per step:
             S^T = K Q^T  ->  P^T        (wgmma, Q^T a transposed SMEM view)
             dV += P^T dO                (wgmma, P^T from registers)
             dP^T = V dO^T -> dS^T       (wgmma)
             dK += dS^T Q                (wgmma, dS^T from registers)
         Computing the transposed scores directly keeps every product in the forms wgmma
         takes (register A, SMEM B or a transposed SMEM view of B).
  dQ     grid (T / block_q_dq, B, N). Consumer w owns query rows [q0 + w * rows, +rows); Q,
         dO, lse, delta of its rows go to SMEM once; the producer streams K, V (and the kv
         ids) through the stages. Per step S = Q K^T, dP = dO V^T, dS, dQ += dS K.

Block skipping: the steps of a CTA cover only the tiles of the other axis that some pair
of the CTA's tiles sees through causal / window bounds (`_k_tile_ranges` / `_q_tile_ranges`
of the Triton kernel, the same classification); tiles seen in full by every pair run without
mask arithmetic; the others (and every tile when there are segment ids) build the mask from
iotas and the ids, in the register layout of the wgmma accumulator.

Keys and queries that nobody may see are not zeroed before the products (0 * NaN = NaN):
q, k, v, d_out must be finite in every tile a CTA loads, as for the forward.

Head dim 256 is refused: a dK/dV consumer keeps two [64, H] f32 accumulators in
registers, 2 * 128 registers per thread at H = 256, more than setmaxnreg allows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import _k_tile_ranges, _q_tile_ranges
from pallas_kernels.flash_attention_mgpu import (
    LOG2E,
    NUM_CONSUMERS,
    WGMMA_M,
    _kernel_call,
    _Static,  # the forward's: block_sizes holds a MosaicBackwardBlockSizes here
    _plgpu,
    check_arguments,
    kv_bytes,
    launch_grid,
    most_consumer_registers,
    require_hopper,
)
from pallas_kernels._common import GPU_L2_BYTES, check_bool, check_scalar_options

SUPPORTED_HEAD_DIMS = (64, 128)
# Hopper's 227 KiB of shared memory per block, less 4 KiB for the barriers and Mosaic's own
# use: the budget every backward tile was checked against (sessions 6-13). The forward's
# SMEM_BUDGET is 1 KiB looser, measured for its own kernel (session 12).
SMEM_BUDGET = 227 * 1024 - 4 * 1024
# deterministic=False at H = 128: the fused backward on rows without a right bound from this
# many keys on (where K/V overflow the L2).
FUSED_MIN_KV_LEN = 4096

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicBackwardBlockSizes:
    """Tiles, pipeline depths and register split of the two Hopper backward kernels.
    Changes speed, never numbers.

    block_k_dkv: keys per dK/dV CTA, split over the two consumers (64 or 128 rows each):
        128 or 256. block_q_dkv: queries per dK/dV step (the N of S^T = K Q^T), a multiple
        of 64 in [64, 256]. num_stages_dkv: Q/dO stages (>= 2).
    block_q_dq: queries per dQ CTA, split over the two consumers: 128 or 256. block_k_dq:
        keys per dQ step, a multiple of 64 in [64, 256]. num_stages_dq: K/V stages (>= 2).
    consumer_registers / producer_registers: setmaxnreg limits, as MosaicBlockSizes (at
        most most_consumer_registers(2, producer_registers): 240 for 24, 232 for 40).
    fused_dq: one kernel instead of two (FlashAttention-3's backward): the dK/dV kernel also
        computes each step's dQ contribution dS K from the dS it already has, and adds it
        into an f32 accumulator in global memory with TMA reduce-add; the dQ kernel does not
        run. 5 products per step instead of 7 over both kernels, at the price of dS through
        shared memory, a barrier between the consumers per step, and f32 atomics (the sum
        order varies from run to run: not bitwise deterministic). Needs block_q_dkv = 128
        (each consumer takes 64 of the step's query rows) or H = 128 with block_q_dkv = 64
        (each takes half of the head dim). The block_*_dq fields are then unused.
        Measured slower than the two kernels on an H100 (BENCHMARKS.md, session 7).
    overlap: each step issues its two score-sized products together (S and dP, or S^T and
        dP^T, both from shared memory) and computes P while the dP product is in flight;
        the dK/dV kernel also issues its two accumulations (dV += P^T dO, dK += dS^T Q)
        together and waits once. False: each product is awaited before the next is issued
        (dK/dV: S^T, dV, dP^T, dK in turn). Not with fused_dq.
    delta_in_dq_kernel: the two-kernel backward runs the dQ kernel first, and it computes
        delta = rowsum(dO * O) - dlse for its rows from an O tile it loads next to dO,
        and writes delta out for the dK/dV kernel. This saves the separate XLA pass over
        dO and O (2 x B T N H elements read, a launch per layer). It needs the O tile's
        shared memory (block_q_dq x H) on top of the dQ kernel's; with fused_dq there is
        no dQ kernel and XLA computes delta. Off by default: on an H100 the backward with
        it ran at 314 TFLOP/s against 323 without (train step shape, same process, XLA's
        delta pass included), because each dQ CTA now waits for O and the row sums
        before its first step (BENCHMARKS.md, session 7).
    head_major: both kernels launch head by head (the tiles of one head side by side), as
        MosaicBlockSizes.head_major: the dK/dV CTAs of a kv head reread its Q, dO from L2
        and the dQ CTAs of a head its K, V. False: tile by tile, each over every head.
    """

    block_q_dkv: int = 64
    block_k_dkv: int = 128
    num_stages_dkv: int = 2
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_stages_dq: int = 2
    consumer_registers: int = 240
    producer_registers: int = 24
    fused_dq: bool = False
    delta_in_dq_kernel: bool = False
    overlap: bool = False
    head_major: bool = False

    def __post_init__(self):
        cls = type(self).__name__
        for name in ("block_k_dkv", "block_q_dq"):  # the two consumers' rows, 64 or 128 each
            value = getattr(self, name)
            if value not in (NUM_CONSUMERS * WGMMA_M, 2 * NUM_CONSUMERS * WGMMA_M):
                raise ValueError(f"{cls}.{name}={value} must be 128 or 256 (two consumer "
                                 "warpgroups of 64 or 128 rows)")
        for name in ("block_q_dkv", "block_k_dq"):
            value = getattr(self, name)
            if value % 64 or not 64 <= value <= 256:
                raise ValueError(f"{cls}.{name}={value} must be a multiple of 64 in [64, 256]")
        for name in ("num_stages_dkv", "num_stages_dq"):
            if getattr(self, name) < 2:
                raise ValueError(f"{cls}.{name}={getattr(self, name)} must be >= 2")
        for name in ("consumer_registers", "producer_registers"):
            value = getattr(self, name)
            if value % 8 or not 24 <= value <= 256:
                raise ValueError(f"{cls}.{name}={value} must be a multiple of 8 in [24, 256]")
        if self.overlap and self.fused_dq:
            raise ValueError(f"{cls}.overlap=True is not implemented with fused_dq=True")
        most = most_consumer_registers(NUM_CONSUMERS, self.producer_registers)
        if self.consumer_registers > most:
            raise ValueError(
                f"{cls}.consumer_registers={self.consumer_registers} is more than the {most} "
                f"that {NUM_CONSUMERS} consumers can take from a producer at "
                f"producer_registers={self.producer_registers}; the CTA would deadlock")

    def smem_bytes_dkv(self, head_dim: int, itemsize: int, *, segments: bool = False) -> int:
        """K, V rows of the CTA, then per stage Q, dO, lse, delta (and query ids); with
        fused_dq, two dS buffers [block_k_dkv, block_q_dkv] and the f32 dQ staging tile."""
        kv = 2 * self.block_k_dkv * head_dim * itemsize + (self.block_k_dkv * 4 if segments
                                                            else 0)
        per_stage = self.block_q_dkv * (2 * head_dim * itemsize + 2 * 4 + (4 if segments
                                                                            else 0))
        fused = 0
        if self.fused_dq:
            fused = 2 * self.block_k_dkv * self.block_q_dkv * itemsize + \
                self.block_q_dkv * head_dim * 4
        return kv + self.num_stages_dkv * per_stage + fused

    def smem_bytes_dq(self, head_dim: int, itemsize: int, *, segments: bool = False) -> int:
        """Q, dO (and O with delta_in_dq_kernel), lse, delta (and ids) of the CTA's rows,
        then per stage K, V (and kv ids)."""
        tiles = 3 if self.delta_in_dq_kernel else 2
        rows = self.block_q_dq * (tiles * head_dim * itemsize + 2 * 4 + (4 if segments else 0))
        per_stage = self.block_k_dq * (2 * head_dim * itemsize + (4 if segments else 0))
        return rows + self.num_stages_dq * per_stage

    @classmethod
    def default_for(cls, *, q_len: int, kv_len: int, head_dim: int, causal: bool,
                    kv_bytes: int = 0, deterministic: bool = True) -> MosaicBackwardBlockSizes:
        """The best of experiments/mgpu_bwd_check.py on an H100 (jax 0.11.2, one run,
        BENCHMARKS.md): 128-key dQ steps at both head dims (+1.6% summed over four H = 128
        configs, +3% at H = 64), 128-query dK/dV steps at H = 64 (at H = 128 the dK, dV
        accumulators leave registers for no more than 64), three stages at H = 64 and two at
        H = 128 (a third dK/dV stage won on one H = 128 config and lost on two). Every tile
        is 64 or 128 rows, and the 128-row dQ query and dK/dV key tiles already ask T and S
        to be multiples of 128. Session 7, on the 0.85B train step's shape (H = 64, GQA
        32/8, causal T = 2048): four dK/dV stages at H = 64, 313 TFLOP/s against 302 with
        three (cuDNN's backward: 263). Session 9: the paired products (overlap) at H = 128,
        +3% on b4 s4096 causal and +7% full (400 -> 413, 421 -> 450 TFLOP/s, one run); at
        H = 64 they lost 5% on the train step's shape (318 -> 303) and tied on the full row,
        so H = 64 keeps the one-at-a-time order.

        Launch order as the forward's: head-major when K + V (kv_bytes) overflow the L2
        (GPU_L2_BYTES). Session 10, one run, TFLOP/s head-major vs tile-major: b16 s1024 h16
        d128 full 393 vs 338, b4 s4096 h16 d128 full 466 vs 435 (cuDNN 353, 498; K + V 128
        MB each); the train step's shape (32 MB) 305 vs 326.

        Session 13: at H = 64 the paired products (overlap) win wherever K + V overflow the
        L2, TFLOP/s with vs without (cuDNN): b1 s16384 full 433 vs 404 (445), causal 416 vs
        392 (420); b4 s4096 full 397 vs 383 (415), causal 361 vs 333 (346); b16 s1024 full
        343 vs 334 (304), causal 249 vs 239 (198). The train step's shape (K + V in L2) keeps
        them off (session 9: 303 vs 318). Session 14, the same rows: with the paired
        products, delta computed in the dQ kernel won on all six (+0.7 to +4.4%: b1 s16384
        full 435 vs 427, causal 431 vs 422; b4 s4096 full 414 vs 411, causal 365 vs 358;
        b16 s1024 full 359 vs 355, causal 261 vs 250), and by +5% and a tie in session 13.

        deterministic=False allows the fused backward (fused_dq: 5 products per step, dQ by
        f32 atomics, so not bitwise deterministic), taken where it measured faster than the
        two kernels: wherever K/V overflow the L2 at H = 64; at H = 128 on rows without a
        right bound of at least FUSED_MIN_KV_LEN keys. Session 13, backward alone, TFLOP/s
        fused vs two kernels (cuDNN): at H = 64, b1 s16384 full 504 vs 408 (449), causal 473
        vs 391 (422), b4 s4096 full 471 vs 387 (415), causal 395 vs 338 (343), b16 s1024
        full 356 vs 332 (305), causal 252 vs 239 (195), but the train step's shape (K/V in
        L2) 241 vs 311 (262); at H = 128, b1 s16384 full 523 vs 494 (542), causal 491 vs 486
        (514), b4 s4096 full 483 vs 460 (489), causal 392 vs 411 (400), and fwd+bwd on b16
        s1024 401 vs 412 full, 267 vs 299 causal."""
        del q_len  # the same tiles serve every shape; a uniform signature
        small = head_dim <= 64
        over_l2 = kv_bytes > GPU_L2_BYTES
        long_full_row = kv_len >= FUSED_MIN_KV_LEN and not causal
        if not deterministic and over_l2 and (small or long_full_row):
            return cls(block_q_dkv=128 if small else 64, num_stages_dkv=2, fused_dq=True,
                       head_major=True)
        return cls(block_q_dkv=128 if small else 64, block_k_dq=128,
                   num_stages_dkv=4 if small else 2, num_stages_dq=3 if small else 2,
                   overlap=not small or over_l2, head_major=over_l2,
                   delta_in_dq_kernel=small and over_l2)


# ----------------------------------------------------------------------------- shared math


def _wgmma_layout(x, st: _Static, *, reduced_axis: int | None = None):
    """x in the register layout of a wgmma accumulator (or, reduced_axis given, of its
    reduction over that axis). Interpret mode has no layouts."""
    if st.interpret:
        return x
    plgpu = _plgpu()
    layout = plgpu.Layout.WGMMA if reduced_axis is None else plgpu.Layout.WGMMA.reduce(
        reduced_axis)
    return plgpu.layout_cast(x, layout)


def _load_vector(ref, st: _Static, *, axis: int):
    """A vector [n] from SMEM laid out along `axis` of a wgmma accumulator (0: one value per
    row, 1: one per column), ready to broadcast against it."""
    if st.interpret:  # the interpreter has neither layouts nor plgpu.load
        return ref[...]
    plgpu = _plgpu()
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - axis))


def _row_dot(a_ref, b_ref, st: _Static):
    """rowsum(a * b) in f32 of two SMEM tiles [rows, H], one value per row in the layout
    of a wgmma accumulator's rows (as _load_vector(..., axis=0))."""
    if st.interpret:
        a, b = a_ref[...], b_ref[...]
    else:
        plgpu = _plgpu()
        a = plgpu.load(a_ref, (), layout=plgpu.Layout.WGMMA)
        b = plgpu.load(b_ref, (), layout=plgpu.Layout.WGMMA)
    return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=1)


def _along(x, shape, axis):
    return lax.broadcast_in_dim(x, shape, [axis])


def _matmul_nt(a_ref, b_ref, shape, st: _Static):
    """a b^T in f32 for SMEM tiles a [m, H], b [n, H] (wgmma with a transposed view of b)."""
    if st.interpret:  # the interpreter (JAX 0.10) cannot transpose a wgmma operand
        return lax.dot_general(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    plgpu = _plgpu()

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref.transpose((1, 0)))  # a view: no data moves
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def _accumulate(acc, a, b_ref, st: _Static):
    """acc + a b for a [m, k] in registers (the operands' dtype) and an SMEM tile b [k, H];
    the wgmma accumulates into acc's registers in place."""
    if st.interpret:  # the interpreter (JAX 0.10) takes no register operand in a wgmma
        return acc + lax.dot_general(a, b_ref[...], (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
    plgpu = _plgpu()

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)

    return pl.run_state(product)(plgpu.ACC.init(acc))


def _two_products_nt(first, second, shape, then, st: _Static):
    """first = (a1, b1) and second = (a2, b2), SMEM tiles [m, H], [n, H]: a1 b1^T and
    a2 b2^T in f32, issued back to back; then(a1 b1^T) runs while the second product is in
    flight. Returns (then(a1 b1^T), a2 b2^T)."""
    (a1, b1), (a2, b2) = first, second
    if st.interpret:  # no asynchronous products: the same numbers in program order
        x1 = _matmul_nt(a1, b1, shape, st)
        return then(x1), _matmul_nt(a2, b2, shape, st)
    plgpu = _plgpu()

    def products(r1, r2):
        plgpu.wgmma(r1, a1, b1.transpose((1, 0)))
        plgpu.wgmma(r2, a2, b2.transpose((1, 0)))
        # Each wgmma is its own group and groups complete in order: wait_n=1 gives the
        # first. The barrier asks LLVM to keep then()'s arithmetic ahead of the second wait;
        # whether ptxas keeps it there is not checked here (in the forward's SASS it did
        # not, BENCHMARKS.md session 9). The H100 timings of this option include it.
        early = lax.optimization_barrier(then(plgpu.wgmma_accumulator_load(r1, wait_n=1)))
        return early, plgpu.wgmma_accumulator_load(r2, wait_n=0)

    return pl.run_scoped(products, plgpu.ACC(shape, jnp.float32),
                         plgpu.ACC(shape, jnp.float32))


def _accumulate_two(acc1, a1, b1_ref, acc2, a2, b2_ref, st: _Static):
    """(acc1 + a1 b1, acc2 + a2 b2) as _accumulate, both products in flight together."""
    if st.interpret:
        return _accumulate(acc1, a1, b1_ref, st), _accumulate(acc2, a2, b2_ref, st)
    plgpu = _plgpu()

    def products(refs):
        r1, r2 = refs
        plgpu.wgmma(r1, a1, b1_ref)
        plgpu.wgmma(r2, a2, b2_ref)

    return pl.run_state(products)((plgpu.ACC.init(acc1), plgpu.ACC.init(acc2)))


def _probabilities(s, lse2, st: _Static, *, lse_axis: int):
    """Raw scores q.k [m, n] (f32) -> (P, d capped / d uncapped score or None).
    lse2 (lse * log2(e), +inf for rows that see no key) runs along axis lse_axis."""
    if st.softcap is None:
        x, dcap = s * (st.scale * LOG2E), None
    else:
        t = jnp.tanh(s * (st.scale / st.softcap))
        x, dcap = t * (st.softcap * LOG2E), 1.0 - t * t
    return jnp.exp2(x - _along(lse2, s.shape, lse_axis)), dcap


def _visible(shape, base, st: _Static, *, keys_axis: int, q_ids=None, kv_ids=None):
    """[m, n] bool of a tile: which (query, key) pairs attend (the forward's MaskSpec).
    Along keys_axis run keys, along the other axis queries; base = (first key of the tile)
    - (first query of the tile) - (S - T), so that key minus query minus the offset is
    (key index - query index within the tile) + base. q_ids / kv_ids: segment ids, already
    in registers along their axes."""
    mask = st.mask
    ok = None
    if mask.lo is not None or mask.hi is not None:
        key = _wgmma_layout(lax.broadcasted_iota(jnp.int32, shape, keys_axis), st)
        query = _wgmma_layout(lax.broadcasted_iota(jnp.int32, shape, 1 - keys_axis), st)
        diag = key - query + base
        if mask.hi is not None:
            ok = diag <= mask.hi
        if mask.lo is not None:
            inside = diag >= mask.lo
            ok = inside if ok is None else ok & inside
    if st.has_segments:
        same = (_along(q_ids, shape, 1 - keys_axis) == _along(kv_ids, shape, keys_axis))
        ok = same if ok is None else ok & same
    return ok


def _run_steps(step, carry, ranges, st: _Static, *, count: int, first_step=0):
    """step(tile, t, carry, masked=...) over tiles [lo, hi) of `ranges` (lo, full_lo,
    full_hi, hi): tiles in [full_lo, full_hi) unmasked, the others masked (all masked with
    segment ids). t = first_step + tile - lo numbers the steps (the pipeline stage is
    t % num_stages). count: the number of tiles of the axis (static)."""
    lo, full_lo, full_hi, hi = ranges if st.masked else (0, 0, count, count)

    def body(masked):
        return lambda tile, c: step(tile, first_step + tile - lo, c, masked=masked)

    if not st.masked:
        return lax.fori_loop(0, count, body(False), carry)
    if st.has_segments:
        return lax.fori_loop(lo, hi, body(True), carry)
    carry = lax.fori_loop(lo, full_lo, body(True), carry)
    carry = lax.fori_loop(full_lo, full_hi, body(False), carry)
    return lax.fori_loop(full_hi, hi, body(True), carry)


def _tile_span(ranges, st: _Static, count: int):
    """(first tile, number of tiles) a CTA visits."""
    if not st.masked:
        return 0, count
    lo, _, _, hi = ranges
    return lo, hi - lo


def _await_release(free, t, depth):
    """The producer waits until both consumers released stage t % depth of step t - depth."""
    plgpu = _plgpu()
    s = lax.rem(t, depth)
    for wg in range(NUM_CONSUMERS):
        plgpu.barrier_wait(free.at[wg * depth + s])


def _produce(load, free, steps, depth):
    """The producer's protocol over steps [0, steps) through a depth-stage ring; takes the
    releases of the last stages too, so every barrier phase is observed (the interpreter
    checks)."""
    for i in range(depth):
        pl.when(i < steps)(functools.partial(load, i))

    def refill(t, carry):
        _await_release(free, t, depth)
        load(t)
        return carry

    lax.fori_loop(depth, steps, refill, None)

    def drain(t, carry):
        _await_release(free, t, depth)
        return carry

    lax.fori_loop(jnp.maximum(steps, depth), steps + depth, drain, None)


def _scratch_tiles(dtype, head_dim):
    """The SMEM transforms that TMA and wgmma agree on: 8-row tiles, swizzled."""
    plgpu = _plgpu()
    swizzle = plgpu.find_swizzle(head_dim * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _launch(kernel, out_types, operands, *, grid, grid_names, st: _Static, name,
            with_refs: bool = False):
    """Runs `kernel` on the warp-specialised mesh. with_refs: some operands are mutable
    array Refs (the fused backward's dQ accumulator), which plgpu.kernel's vmap wrapper
    refuses: the call then goes through pl.kernel."""
    plgpu = _plgpu()
    kwargs = {}
    if st.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kwargs["interpret"] = InterpretGPUParams()
    params = plgpu.CompilerParams(approx_math=True)
    if with_refs:
        mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=NUM_CONSUMERS + 1,
                          thread_name="wg")
        call = pl.kernel(kernel, out_type=out_types, mesh=mesh, name=name,
                         compiler_params=params, **kwargs)
    else:
        call = _kernel_call(
            plgpu, kernel, out_types, grid=grid, grid_names=grid_names,
            num_threads=NUM_CONSUMERS + 1, thread_name="wg", compiler_params=params,
            name=name, **kwargs)
    return call(*operands)


def _grid_args(tiles, batch, heads, bs: MosaicBackwardBlockSizes) -> dict:
    """_launch's grid and grid_names in the launch order bs asks for."""
    grid, grid_names = launch_grid(tiles, batch, heads, head_major=bs.head_major)
    return {"grid": grid, "grid_names": grid_names}


def _zeros_ref(shape):
    """A zero-filled f32 Ref in GPU global memory that a kernel can add into."""
    return jax.new_ref(jnp.zeros(shape, jnp.float32), memory_space=_plgpu().GMEM)


# ----------------------------------------------------------------------------- dK/dV kernel


class _DkvSmem(NamedTuple):
    k: Any  # [2, rows, H]: each consumer's K rows, then its dK
    v: Any  # [2, rows, H]: V rows, then dV
    kv_seg: Any  # [2, rows] int32 or None
    q: Any  # [num_stages, block_q, H]
    do: Any  # [num_stages, block_q, H]
    lse: Any  # [num_stages, block_q] f32 (log2 domain)
    delta: Any  # [num_stages, block_q] f32
    q_seg: Any  # [num_stages, block_q] int32 or None
    kv_ready: Any  # [consumer]
    ready: Any  # [stage]
    free: Any  # [consumer * num_stages + stage]
    # fused_dq only (None otherwise): k is then one [block_k_dkv, H] tile (both consumers'
    # rows: each step's dQ product reads all of them), and
    ds: Any = None  # [2, block_k_dkv, block_q_dkv]: dS^T of a step, double-buffered
    dq: Any = None  # [2, rows, cols] f32: each consumer's dQ part on its way to the TMA add
    ds_ready: Any = None  # [2]: both consumers wrote their dS^T rows into ds[t % 2]
    done: Any = None  # [1]: both consumers finished their last dQ product (K may be reused)


def _dq_split(st: _Static):
    """fused_dq: the [rows, cols] part of a step's dQ tile [block_q_dkv, H] that each
    consumer computes, and whether the consumers split the query rows (block_q_dkv = 128:
    64 rows each, all of H) or else the head dim (block_q_dkv = 64, H = 128: 64 columns
    each). Either way each part is one M = 64 wgmma over all block_k_dkv keys."""
    bq, H = st.block_sizes.block_q_dkv, st.head_dim
    by_rows = bq == NUM_CONSUMERS * WGMMA_M
    return ((bq // NUM_CONSUMERS, H) if by_rows else (bq, H // NUM_CONSUMERS)), by_rows


def _dq_contribution(ds_buf, k_all, wg, st: _Static):
    """scale * (dS K) for consumer wg's part of the step's dQ tile, f32 [rows, cols], from
    dS^T [block_k_dkv, block_q_dkv] and K [block_k_dkv, H] in SMEM. The wgmma reads dS^T
    through a transposed view (16-bit operands only): dS itself never exists."""
    (rows, cols), by_rows = _dq_split(st)
    a = ds_buf.at[:, pl.ds(wg * rows, rows)] if by_rows else ds_buf  # [keys, rows]
    b = k_all if by_rows else k_all.at[:, pl.ds(wg * cols, cols)]  # [keys, cols]
    if st.interpret:  # the interpreter (JAX 0.10) cannot transpose a wgmma operand
        return lax.dot_general(a[...], b[...], (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32) * st.scale
    plgpu = _plgpu()

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a.transpose((1, 0)), b)
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((rows, cols), jnp.float32)) * st.scale


def _add_dq(part, stage_ref, acc_ref, *, batch, head, q0, wg, st: _Static):
    """Adds consumer wg's dQ part (query rows from q0) into the f32 accumulator
    [B, T, N, H] with a TMA reduce-add. The stage is reused once the previous step's copy
    has read it. Interpret mode has no TMA reductions: acc_ref has a leading key-tile axis
    there, each CTA writes its own slice (its steps cover distinct (head, query) tiles), and
    the caller sums the slices."""
    plgpu = _plgpu()
    (rows, cols), by_rows = _dq_split(st)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    stage_ref[...] = part
    plgpu.commit_smem()
    if by_rows:
        index = (batch, pl.ds(q0 + wg * rows, rows), head)
    else:
        index = (batch, pl.ds(q0, rows), head, pl.ds(wg * cols, cols))
    if st.interpret:
        plgpu.copy_smem_to_gmem(stage_ref, acc_ref.at[(lax.axis_index("kv_tile"), *index)])
    else:
        plgpu.copy_smem_to_gmem(stage_ref, acc_ref.at[index], reduction_op="add")


def _dkv_plan(st: _Static):
    """(ranges of query tiles for this CTA's key tile, number of query tiles)."""
    bs = st.block_sizes
    nq = st.q_len // bs.block_q_dkv
    k_start = lax.axis_index("kv_tile") * bs.block_k_dkv
    ranges = None
    if st.masked:
        ranges = _k_tile_ranges(k_start, bs.block_k_dkv, st.q_len, st.kv_len, bs.block_q_dkv,
                                st.mask)
    return ranges, nq


def _dkv_consumer(wg, refs, sm: _DkvSmem, *, st: _Static):
    plgpu = _plgpu()
    bs = st.block_sizes
    rows, bq, depth = bs.block_k_dkv // NUM_CONSUMERS, bs.block_q_dkv, bs.num_stages_dkv
    dtype = refs["k"].dtype
    fused = bs.fused_dq
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("kv_head")
    k_start = lax.axis_index("kv_tile") * bs.block_k_dkv + wg * rows
    keys = pl.ds(k_start, rows)
    k_rows = sm.k.at[pl.ds(wg * rows, rows)] if fused else sm.k.at[wg]
    v_rows = sm.v.at[wg]
    ranges, nq = _dkv_plan(st)
    _, n = _tile_span(ranges, st, nq)
    safe_n = jnp.maximum(n, 1)  # n = 0: no step runs, but the division is still traced
    plgpu.copy_gmem_to_smem(refs["k"].at[batch, keys, kv_head], k_rows, sm.kv_ready.at[wg])
    plgpu.copy_gmem_to_smem(refs["v"].at[batch, keys, kv_head], v_rows, sm.kv_ready.at[wg])
    if st.has_segments:
        plgpu.copy_gmem_to_smem(refs["kv_seg"].at[batch, keys], sm.kv_seg.at[wg],
                                sm.kv_ready.at[wg])
    plgpu.barrier_wait(sm.kv_ready.at[wg])
    kv_ids = _load_vector(sm.kv_seg.at[wg], st, axis=0) if st.has_segments else None

    def step(q_tile, t, carry, *, masked):
        dk, dv = carry
        s = lax.rem(t, depth)
        plgpu.barrier_wait(sm.ready.at[s])
        q, do = sm.q.at[s], sm.do.at[s]
        lse2 = _load_vector(sm.lse.at[s], st, axis=1)

        def probabilities(s_t):  # S^T [rows, bq] -> P^T (0 where hidden), d cap
            p_t, dcap = _probabilities(s_t, lse2, st, lse_axis=1)
            if masked:
                q_ids = _load_vector(sm.q_seg.at[s], st, axis=1) if st.has_segments else None
                vis = _visible((rows, bq), k_start - q_tile * bq - st.offset, st,
                               keys_axis=0, q_ids=q_ids, kv_ids=kv_ids)
                p_t = jnp.where(vis, p_t, 0.0)
            return p_t, dcap

        if bs.overlap:  # S^T and dP^T = V dO^T together, P^T under the second
            (p_t, dcap), dp_t = _two_products_nt((k_rows, q), (v_rows, do), (rows, bq),
                                                 probabilities, st)
        else:
            p_t, dcap = probabilities(_matmul_nt(k_rows, q, (rows, bq), st))
            dv = _accumulate(dv, p_t.astype(dtype), do, st)
            dp_t = _matmul_nt(v_rows, do, (rows, bq), st)  # [rows, bq]: dP^T
        delta = _load_vector(sm.delta.at[s], st, axis=1)
        ds_t = p_t * (dp_t - _along(delta, (rows, bq), 1))  # P = 0 where hidden: dS = 0
        if dcap is not None:
            ds_t = ds_t * dcap
        ds_t = ds_t.astype(dtype)
        if fused:  # this consumer's key rows of dS^T, for both consumers' dQ products
            buf = lax.rem(t, 2)
            sm.ds.at[buf].at[pl.ds(wg * rows, rows)][...] = ds_t
            plgpu.commit_smem()
            plgpu.barrier_arrive(sm.ds_ready.at[buf])
        if bs.overlap:
            dv, dk = _accumulate_two(dv, p_t.astype(dtype), do, dk, ds_t, q, st)
        else:
            dk = _accumulate(dk, ds_t, q, st)
        plgpu.barrier_arrive(sm.free.at[wg * depth + s])  # the dQ product reads no Q or dO
        if fused:
            # ds[buf] is written again at step t + 2, by a consumer that has passed step
            # t + 1's barrier: the other consumer's product of step t is complete by then.
            plgpu.barrier_wait(sm.ds_ready.at[buf])
            part = _dq_contribution(sm.ds.at[buf], sm.k, wg, st)
            head = kv_head * st.group + lax.div(t, safe_n)
            _add_dq(part, sm.dq.at[wg], refs["dq_acc"], batch=batch, head=head,
                    q0=q_tile * bq, wg=wg, st=st)
        return dk, dv

    zeros = _wgmma_layout(jnp.zeros((rows, st.head_dim), jnp.float32), st)
    carry = (zeros, zeros)
    run = functools.partial(_run_steps, step, ranges=ranges, st=st, count=nq)
    if st.group == 1:
        carry = run(carry)
    else:  # the G query heads of this kv head, one after the other
        carry = lax.fori_loop(0, st.group, lambda g, c: run(c, first_step=g * n), carry)
    dk, dv = carry
    if fused:  # the other consumer's last dQ product may still read these K rows
        plgpu.barrier_arrive(sm.done.at[0])
        plgpu.barrier_wait(sm.done.at[0])
    k_rows[...] = (dk * st.scale).astype(dtype)  # K, V are dead: their tiles stage dK, dV
    v_rows[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_rows, refs["dk"].at[batch, keys, kv_head])
    plgpu.copy_smem_to_gmem(v_rows, refs["dv"].at[batch, keys, kv_head])
    plgpu.wait_smem_to_gmem(0)


def _dkv_producer(refs, sm: _DkvSmem, *, st: _Static):
    plgpu = _plgpu()
    bs = st.block_sizes
    bq, depth = bs.block_q_dkv, bs.num_stages_dkv
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("kv_head")
    ranges, nq = _dkv_plan(st)
    lo, n = _tile_span(ranges, st, nq)
    safe_n = jnp.maximum(n, 1)  # n = 0: no step runs, but the division is still traced

    def load(t):
        s = lax.rem(t, depth)
        head = kv_head * st.group + lax.div(t, safe_n)
        queries = pl.ds((lo + lax.rem(t, safe_n)) * bq, bq)
        ready = sm.ready.at[s]
        plgpu.copy_gmem_to_smem(refs["q"].at[batch, queries, head], sm.q.at[s], ready)
        plgpu.copy_gmem_to_smem(refs["do"].at[batch, queries, head], sm.do.at[s], ready)
        plgpu.copy_gmem_to_smem(refs["lse"].at[batch, head, queries], sm.lse.at[s], ready)
        plgpu.copy_gmem_to_smem(refs["delta"].at[batch, head, queries], sm.delta.at[s], ready)
        if st.has_segments:
            plgpu.copy_gmem_to_smem(refs["q_seg"].at[batch, queries], sm.q_seg.at[s], ready)

    _produce(load, sm.free, st.group * n, depth)


def _warp_specialised(scratch, smem_type, consumer, producer, refs, st: _Static):
    """Allocates the CTA's shared memory `scratch` (None for the segment-id buffers a call
    without segment ids has none of), then runs `consumer` on warpgroups 0 ..
    NUM_CONSUMERS - 1 and `producer` on the last one, each with its register budget."""
    plgpu, bs = _plgpu(), st.block_sizes

    def body(**buffers):
        sm = smem_type(**{"kv_seg": None, "q_seg": None, **buffers})
        wg = lax.axis_index("wg")

        @pl.when(wg < NUM_CONSUMERS)
        def _():
            plgpu.set_max_registers(bs.consumer_registers, action="increase")
            consumer(wg, refs, sm, st=st)

        @pl.when(wg == NUM_CONSUMERS)
        def _():
            plgpu.set_max_registers(bs.producer_registers, action="decrease")
            producer(refs, sm, st=st)

    pl.run_scoped(body, collective_axes="wg", **scratch)


def _dkv_kernel(*refs, st: _Static):
    names = ["q", "k", "v", "do", "lse", "delta"]
    names += ["q_seg", "kv_seg"] if st.has_segments else []
    bs = st.block_sizes
    names += ["dq_acc"] if bs.fused_dq else []
    refs = dict(zip(names + ["dk", "dv"], refs))
    plgpu = _plgpu()
    dtype, H = refs["q"].dtype, st.head_dim
    rows, bq, depth = bs.block_k_dkv // NUM_CONSUMERS, bs.block_q_dkv, bs.num_stages_dkv
    tiled = _scratch_tiles(dtype, H)
    seg = st.has_segments
    k_shape = (bs.block_k_dkv, H) if bs.fused_dq else (NUM_CONSUMERS, rows, H)
    scratch = {
        "k": plgpu.SMEM(k_shape, dtype, transforms=tiled),
        "v": plgpu.SMEM((NUM_CONSUMERS, rows, H), dtype, transforms=tiled),
        "q": plgpu.SMEM((depth, bq, H), dtype, transforms=tiled),
        "do": plgpu.SMEM((depth, bq, H), dtype, transforms=tiled),
        "lse": plgpu.SMEM((depth, bq), jnp.float32),
        "delta": plgpu.SMEM((depth, bq), jnp.float32),
        # TMA copies completing on each: K, V (+ kv ids); Q, dO, lse, delta (+ q ids)
        "kv_ready": plgpu.Barrier(num_arrivals=3 if seg else 2, num_barriers=NUM_CONSUMERS),
        "ready": plgpu.Barrier(num_arrivals=5 if seg else 4, num_barriers=depth),
        # flat [consumer * num_stages + stage]: interpret mode takes 1-D barrier arrays only
        "free": plgpu.Barrier(num_barriers=NUM_CONSUMERS * depth),
    }
    if seg:
        scratch["kv_seg"] = plgpu.SMEM((NUM_CONSUMERS, rows), jnp.int32)
        scratch["q_seg"] = plgpu.SMEM((depth, bq), jnp.int32)
    if bs.fused_dq:
        dq_shape, _ = _dq_split(st)
        scratch["ds"] = plgpu.SMEM((2, bs.block_k_dkv, bq), dtype,
                                   transforms=_scratch_tiles(dtype, bq))
        scratch["dq"] = plgpu.SMEM((NUM_CONSUMERS, *dq_shape), jnp.float32,
                                   transforms=_scratch_tiles(jnp.float32, dq_shape[1]))
        scratch["ds_ready"] = plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=2)
        scratch["done"] = plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=1)

    _warp_specialised(scratch, _DkvSmem, _dkv_consumer, _dkv_producer, refs, st)


# ----------------------------------------------------------------------------- dQ kernel


class _DqSmem(NamedTuple):
    q: Any  # [2, rows, H]: each consumer's Q rows, then its dQ
    do: Any  # [2, rows, H]
    lse: Any  # [2, rows] f32 (log2 domain)
    delta: Any  # [2, rows] f32
    q_seg: Any  # [2, rows] int32 or None
    k: Any  # [num_stages, block_k, H]
    v: Any  # [num_stages, block_k, H]
    kv_seg: Any  # [num_stages, block_k] int32 or None
    q_ready: Any  # [consumer]
    ready: Any  # [stage]
    free: Any  # [consumer * num_stages + stage]
    o: Any = None  # [2, rows, H] with delta_in_dq_kernel


def _dq_cta_start(st: _Static):
    bs = st.block_sizes
    num = st.q_len // bs.block_q_dq
    tile = lax.axis_index("q_tile")
    # A right bound (causal): the bottom tiles have the most keys to visit; start them first.
    if st.mask.hi is not None:
        tile = num - 1 - tile
    return tile * bs.block_q_dq


def _dq_plan(st: _Static):
    bs = st.block_sizes
    nk = st.kv_len // bs.block_k_dq
    ranges = None
    if st.masked:
        ranges = _q_tile_ranges(_dq_cta_start(st), bs.block_q_dq, st.q_len, st.kv_len,
                                bs.block_k_dq, st.mask)
    return ranges, nk


def _dq_consumer(wg, refs, sm: _DqSmem, *, st: _Static):
    plgpu = _plgpu()
    bs = st.block_sizes
    rows, bk, depth = bs.block_q_dq // NUM_CONSUMERS, bs.block_k_dq, bs.num_stages_dq
    dtype = refs["q"].dtype
    batch, head = lax.axis_index("batch"), lax.axis_index("head")
    q_start = _dq_cta_start(st) + wg * rows
    queries = pl.ds(q_start, rows)
    q_rows, do_rows = sm.q.at[wg], sm.do.at[wg]
    ready = sm.q_ready.at[wg]
    plgpu.copy_gmem_to_smem(refs["q"].at[batch, queries, head], q_rows, ready)
    plgpu.copy_gmem_to_smem(refs["do"].at[batch, queries, head], do_rows, ready)
    plgpu.copy_gmem_to_smem(refs["lse"].at[batch, head, queries], sm.lse.at[wg], ready)
    plgpu.copy_gmem_to_smem(refs["delta"].at[batch, head, queries], sm.delta.at[wg], ready)
    if st.has_segments:
        plgpu.copy_gmem_to_smem(refs["q_seg"].at[batch, queries], sm.q_seg.at[wg], ready)
    in_kernel = bs.delta_in_dq_kernel
    if in_kernel:
        plgpu.copy_gmem_to_smem(refs["o"].at[batch, queries, head], sm.o.at[wg], ready)
    plgpu.barrier_wait(ready)
    lse2 = _load_vector(sm.lse.at[wg], st, axis=0)
    delta = _load_vector(sm.delta.at[wg], st, axis=0)
    if in_kernel:  # the input held -dlse; add rowsum(dO * O) and hand delta to dK/dV
        delta = delta + _row_dot(do_rows, sm.o.at[wg], st)
        sm.delta.at[wg][...] = delta
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sm.delta.at[wg], refs["delta_out"].at[batch, head, queries])
    q_ids = _load_vector(sm.q_seg.at[wg], st, axis=0) if st.has_segments else None

    def step(k_tile, t, dq, *, masked):
        s = lax.rem(t, depth)
        plgpu.barrier_wait(sm.ready.at[s])
        k, v = sm.k.at[s], sm.v.at[s]

        def probabilities(scores):  # S [rows, bk] -> P (0 where hidden), d cap
            p, dcap = _probabilities(scores, lse2, st, lse_axis=0)
            if masked:
                kv_ids = _load_vector(sm.kv_seg.at[s], st, axis=1) if st.has_segments else None
                vis = _visible((rows, bk), k_tile * bk - q_start - st.offset, st,
                               keys_axis=1, q_ids=q_ids, kv_ids=kv_ids)
                p = jnp.where(vis, p, 0.0)
            return p, dcap

        if bs.overlap:  # S and dP = dO V^T together, P under the second
            (p, dcap), dp = _two_products_nt((q_rows, k), (do_rows, v), (rows, bk),
                                             probabilities, st)
        else:
            p, dcap = probabilities(_matmul_nt(q_rows, k, (rows, bk), st))
            dp = _matmul_nt(do_rows, v, (rows, bk), st)
        ds = p * (dp - _along(delta, (rows, bk), 0))
        if dcap is not None:
            ds = ds * dcap
        dq = _accumulate(dq, ds.astype(dtype), k, st)
        plgpu.barrier_arrive(sm.free.at[wg * depth + s])
        return dq

    ranges, nk = _dq_plan(st)
    dq = _wgmma_layout(jnp.zeros((rows, st.head_dim), jnp.float32), st)
    dq = _run_steps(step, dq, ranges, st, count=nk)
    q_rows[...] = (dq * st.scale).astype(dtype)  # Q is dead: its tile stages dQ
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_rows, refs["dq"].at[batch, queries, head])
    plgpu.wait_smem_to_gmem(0)


def _dq_producer(refs, sm: _DqSmem, *, st: _Static):
    plgpu = _plgpu()
    bs = st.block_sizes
    bk, depth = bs.block_k_dq, bs.num_stages_dq
    batch, kv_head = lax.axis_index("batch"), lax.div(lax.axis_index("head"), st.group)
    ranges, nk = _dq_plan(st)
    lo, n = _tile_span(ranges, st, nk)

    def load(t):
        s = lax.rem(t, depth)
        keys = pl.ds((lo + t) * bk, bk)
        ready = sm.ready.at[s]
        plgpu.copy_gmem_to_smem(refs["k"].at[batch, keys, kv_head], sm.k.at[s], ready)
        plgpu.copy_gmem_to_smem(refs["v"].at[batch, keys, kv_head], sm.v.at[s], ready)
        if st.has_segments:
            plgpu.copy_gmem_to_smem(refs["kv_seg"].at[batch, keys], sm.kv_seg.at[s], ready)

    _produce(load, sm.free, n, depth)


def _dq_kernel(*refs, st: _Static):
    bs = st.block_sizes
    names = ["q", "k", "v", "do", "lse", "delta"]
    names += ["q_seg", "kv_seg"] if st.has_segments else []
    names += ["o"] if bs.delta_in_dq_kernel else []
    outputs = ["dq", "delta_out"] if bs.delta_in_dq_kernel else ["dq"]
    refs = dict(zip(names + outputs, refs))
    plgpu = _plgpu()
    dtype, H = refs["q"].dtype, st.head_dim
    rows, bk, depth = bs.block_q_dq // NUM_CONSUMERS, bs.block_k_dq, bs.num_stages_dq
    tiled = _scratch_tiles(dtype, H)
    seg = st.has_segments
    scratch = {
        "q": plgpu.SMEM((NUM_CONSUMERS, rows, H), dtype, transforms=tiled),
        "do": plgpu.SMEM((NUM_CONSUMERS, rows, H), dtype, transforms=tiled),
        "lse": plgpu.SMEM((NUM_CONSUMERS, rows), jnp.float32),
        "delta": plgpu.SMEM((NUM_CONSUMERS, rows), jnp.float32),
        "k": plgpu.SMEM((depth, bk, H), dtype, transforms=tiled),
        "v": plgpu.SMEM((depth, bk, H), dtype, transforms=tiled),
        # TMA copies completing on each: Q, dO, lse, delta (+ O, + q ids)
        "q_ready": plgpu.Barrier(num_arrivals=4 + seg + bs.delta_in_dq_kernel,
                                 num_barriers=NUM_CONSUMERS),
        "ready": plgpu.Barrier(num_arrivals=3 if seg else 2, num_barriers=depth),
        "free": plgpu.Barrier(num_barriers=NUM_CONSUMERS * depth),
    }
    if seg:
        scratch["q_seg"] = plgpu.SMEM((NUM_CONSUMERS, rows), jnp.int32)
        scratch["kv_seg"] = plgpu.SMEM((depth, bk), jnp.int32)
    if bs.delta_in_dq_kernel:
        scratch["o"] = plgpu.SMEM((NUM_CONSUMERS, rows, H), dtype, transforms=tiled)

    _warp_specialised(scratch, _DqSmem, _dq_consumer, _dq_producer, refs, st)


# ----------------------------------------------------------------------------- the backward


@functools.partial(jax.jit, static_argnames=("st",))
def _flash_bwd_mgpu(q, k, v, out, lse, d_out, d_lse, segment_ids, st: _Static):
    B, T, N, _ = q.shape
    _, S, K, _ = k.shape
    bs = st.block_sizes
    # delta_i = rowsum(dO * O) (FA-2 Alg. 2 line 4); a cotangent on lse adds P * dlse to dS,
    # the same as subtracting it from delta. Rows that see no key: lse * log2(e) = +inf, so
    # that P = exp2(score - inf) = 0 on every tile, and delta = 0.
    empty = jnp.isneginf(lse)
    lse2 = jnp.where(empty, jnp.inf, lse.astype(jnp.float32) * LOG2E)
    minus_dlse = jnp.zeros((B, N, T), jnp.float32) if d_lse is None else \
        jnp.where(empty, 0.0, -d_lse.astype(jnp.float32))
    d_out = d_out.astype(q.dtype)
    segments = tuple(segment_ids or ())
    dq_launch = functools.partial(
        _launch, functools.partial(_dq_kernel, st=st),
        **_grid_args((T // bs.block_q_dq, "q_tile"), (B, "batch"), (N, "head"), bs),
        st=st, name="flash_attention_dq_mgpu")
    dq_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    delta_in_dq_kernel = bs.delta_in_dq_kernel and not bs.fused_dq
    if delta_in_dq_kernel:  # the dQ kernel first: it adds rowsum(dO * O) and hands delta on
        dq, delta = dq_launch(
            (dq_type, jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
            (q, k, v, d_out, lse2, minus_dlse, *segments, out.astype(q.dtype)))
    else:
        rowsum = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32),
                            d_out.astype(jnp.float32))
        delta = jnp.where(empty, 0.0, rowsum + minus_dlse)
    operands = (q, k, v, d_out, lse2, delta, *segments)
    kv_types = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    dkv_launch = functools.partial(
        _launch, functools.partial(_dkv_kernel, st=st), kv_types,
        **_grid_args((S // bs.block_k_dkv, "kv_tile"), (B, "batch"), (K, "kv_head"), bs),
        st=st)
    if bs.fused_dq:  # one kernel; dQ comes out of the f32 accumulator it adds into
        acc = _zeros_ref(((S // bs.block_k_dkv,) if st.interpret else ()) + q.shape)
        dk, dv = dkv_launch((*operands, acc), name="flash_attention_bwd_fused_mgpu",
                            with_refs=True)
        dq = acc[...]
        if st.interpret:
            dq = dq.sum(axis=0)
        return dq.astype(q.dtype), dk, dv
    dk, dv = dkv_launch(operands, name="flash_attention_dkdv_mgpu")
    if not delta_in_dq_kernel:
        dq = dq_launch(dq_type, operands)
    return dq, dk, dv


def check_supported_backward(q, k, v, *, causal: bool, segment_ids=None, window=None,
                             softcap=None, block_sizes: MosaicBackwardBlockSizes | None = None,
                             require_device: bool = True,
                             deterministic: bool = True) -> MosaicBackwardBlockSizes:
    """Raises (ValueError for malformed arguments, NotImplementedError for inputs these
    kernels do not take) before any GPU work; returns the block sizes the call will use
    (block_sizes, or the default for the shape and `deterministic`)."""
    check_arguments(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                    softcap=softcap)
    B, T, N, H = q.shape
    S = k.shape[1]
    if block_sizes is not None and not isinstance(block_sizes, MosaicBackwardBlockSizes):
        raise ValueError(f"block_sizes must be a MosaicBackwardBlockSizes or None, got "
                         f"{block_sizes!r}")
    fallback = "use the Triton backward (pallas_kernels.flash_attention.flash_attention_backward)"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"the Mosaic GPU flash attention backward takes bfloat16 or "
                                  f"float16, got {q.dtype}; {fallback}")
    if H not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"the Mosaic GPU flash attention backward takes head_dim in {SUPPORTED_HEAD_DIMS}, "
            f"got {H} (at 256 the dK and dV accumulators do not fit in a warpgroup's "
            f"registers); {fallback}")
    check_bool("deterministic", deterministic)
    bs = block_sizes or MosaicBackwardBlockSizes.default_for(
        q_len=T, kv_len=S, head_dim=H, causal=causal or window is not None,
        kv_bytes=kv_bytes(k, v), deterministic=deterministic)
    if bs.fused_dq and not (bs.block_q_dkv == NUM_CONSUMERS * WGMMA_M
                            or (bs.block_q_dkv == WGMMA_M and H == 128)):
        raise ValueError(f"{bs}: fused_dq needs block_q_dkv=128, or block_q_dkv=64 at "
                         f"head_dim=128 (got head_dim={H}): the two consumers split a step's "
                         "dQ tile into two 64-row products")
    dq_tiles = () if bs.fused_dq else ("dq",)  # the dQ kernel's tiles serve no kernel then
    for length, name, tiles in (
            (T, "T", ("block_q_dkv",) + tuple(f"block_q_{t}" for t in dq_tiles)),
            (S, "S", ("block_k_dkv",) + tuple(f"block_k_{t}" for t in dq_tiles))):
        for tile in tiles:
            if length % getattr(bs, tile):
                raise NotImplementedError(
                    f"the Mosaic GPU flash attention backward needs {name} a multiple of "
                    f"{tile}={getattr(bs, tile)}, got {name}={length} (no ragged tiles); "
                    f"{fallback}")
    itemsize, segments = jnp.dtype(q.dtype).itemsize, segment_ids is not None
    kernels = [("dK/dV", bs.smem_bytes_dkv(H, itemsize, segments=segments))]
    if not bs.fused_dq:
        kernels.append(("dQ", bs.smem_bytes_dq(H, itemsize, segments=segments)))
    for kernel, need in kernels:
        if need > SMEM_BUDGET:
            raise ValueError(f"{bs} needs {need} bytes of shared memory in the {kernel} kernel "
                             f"at head_dim={H}, more than the {SMEM_BUDGET} allowed; use fewer "
                             "stages or smaller tiles")
    if require_device:
        require_hopper("the Mosaic GPU flash attention backward", fallback)
    return bs


def flash_attention_mgpu_backward(q, k, v, out, lse, d_out, d_lse=None, *, causal=False,
                                  segment_ids=None, window=None, softcap=None, scale=None,
                                  block_sizes: MosaicBackwardBlockSizes | None = None,
                                  interpret: bool | None = None, deterministic: bool = True):
    """(dq [B,T,N,H], dk, dv [B,S,K,H]) of attention, from a forward's out [B,T,N,H] and
    natural-log lse [B,N,T] (f32, -inf for rows that see no key), on Hopper.

    Same signature and conventions as `flash_attention.flash_attention_backward`, so it can
    replace it: d_out [B,T,N,H] the cotangent of out, d_lse [B,N,T] of lse (None: zero).
    The mask and score arguments must be the forward's: causal (bottom-right aligned),
    segment_ids ((q_segment_ids [B,T], kv_segment_ids [B,S]) integers, or None), window
    ((left, right), inclusive, None = unbounded side), softcap (float > 0 or None), scale
    (None: 1 / sqrt(H)). GQA: dk, dv sum over the G = N // K query heads of each kv head.
    Gradients come out in q's dtype. Segment ids get no gradient.
    block_sizes: speed only; None picks MosaicBackwardBlockSizes.default_for the shape.
    deterministic: True (default): bitwise-equal gradients on repeated runs (the two-kernel
    backward). False allows the fused backward, whose dQ sums by f32 atomics in a varying
    order (cuDNN's backward as JAX runs it by default is not deterministic either,
    BENCHMARKS.md session 13). Ignored when block_sizes is given.
    interpret: Mosaic GPU interpret mode (CPU, slow, for tests); None: on when the default
    backend is not a GPU.
    Inputs these kernels do not take raise NotImplementedError (see the module docstring);
    the Triton backward takes them."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bs = check_supported_backward(q, k, v, causal=causal, segment_ids=segment_ids,
                                  window=window, softcap=softcap, block_sizes=block_sizes,
                                  require_device=not interpret, deterministic=deterministic)
    B, T, N, H = q.shape
    for name, x, want in (("out", out, q.shape), ("d_out", d_out, q.shape),
                          ("lse", lse, (B, N, T))) + (
                              (("d_lse", d_lse, (B, N, T)),) if d_lse is not None else ()):
        if getattr(x, "shape", None) != want:
            raise ValueError(f"{name} must have shape {want}, got {name}.shape="
                             f"{getattr(x, 'shape', None)}")
    softcap, scale, window = check_scalar_options(softcap, scale, window, window_name="window")
    st = _Static(causal=causal, window=window, softcap=softcap,
                 has_segments=segment_ids is not None,
                 scale=float(1.0 / math.sqrt(H) if scale is None else scale),
                 block_sizes=bs, q_len=T, kv_len=k.shape[1], head_dim=H,
                 group=N // k.shape[2], interpret=bool(interpret))
    if segment_ids is not None:
        segment_ids = tuple(jnp.asarray(ids).astype(jnp.int32) for ids in segment_ids)
    return _flash_bwd_mgpu(q, k, v, out, lse, d_out, d_lse, segment_ids, st)
