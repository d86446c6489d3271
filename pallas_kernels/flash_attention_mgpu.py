"""FlashAttention forward pass for Hopper (sm90), written with Pallas Mosaic GPU.

Same contract as the Triton-backend kernel in `flash_attention.py`, for the subset of inputs
this kernel takes (anything else raises NotImplementedError before any GPU work):

    q [B, T, N, H]   k, v [B, S, K, H]   N % K == 0, query head n reads kv head n // G, G = N // K
    dtype bfloat16 or float16; H in (64, 128, 256); S a multiple of 8, at least block_k; T
    a multiple of block_q (with turns) or of a consumer's rows, block_q / consumers
    (without).
    returns out [B, T, N, H] (q's dtype) and lse [B, N, T] float32, natural log.

Masks (the `fastattn.attention` contract; `flash_attention.MaskSpec` describes them for both
kernels). Query i sits at absolute position i + (S - T) (bottom-right alignment,
FlashAttention >= 2.1).
  causal: query i sees keys j <= i + S - T.
  window (left, right), inclusive, None = unbounded side: i + S - T - left <= j <= i + S - T
      + right; with causal the right bound becomes min(right, 0).
  segment ids (q_segment_ids [B, T], kv_segment_ids [B, S]): only keys of the query's segment.
With T = 3, S = 5, causal (left) and window (1, 0) without causal (right):

         keys j:  0 1 2 3 4              keys j:  0 1 2 3 4
    query 0       x x x . .         query 0       . x x . .
    query 1       x x x x .         query 1       . . x x .
    query 2       x x x x x         query 2       . . . x x

A row that sees no key (the first T - S rows when causal and T > S, or a query whose segment
has no visible key) returns 0 and lse = -inf.
softcap c: scores become c * tanh(scale * q.k / c) before the softmax (Gemma 2).

Structure of one CTA (FlashAttention-3, Shah et al. 2024, sections 3.1-3.2):

    grid (T / block_q, B, N), launched head-fastest (the G query heads that share a kv head
    side by side, reading the same K/V tiles from L2), or with MosaicBlockSizes.head_major
    (B, N, T / block_q), query-tile-fastest: every query tile of a head side by side, so
    that its K/V is read from DRAM about once rather than once per query tile. Grids with
    a right bound (causal) launch the bottom query tiles (the longest rows) first so that
    they do not end up as a tail. (MosaicBlockSizes.persistent: one CTA per SM takes the
    tiles in that order in turn, in snake order; on for rows of at most SHORT_KV_LEN keys.)

    warpgroup C (C = MosaicBlockSizes.consumers, 2 to 4), producer  (few registers:
    setmaxnreg down)
        TMA K_t, V_t -> the next position r of a num_stages-deep ring (stage r % num_stages),
        completion on k_ready / v_ready[stage] (the key tile's kv segment ids ride with K, on
        the same k_ready); before reusing a stage it waits until every consumer released it
        (each releases every key tile of its CTA's query tile, read or not).
    warpgroups 0 .. C - 1, consumers  (setmaxnreg up), each owns block_q / C query rows:
        Q tile (and its q segment ids) -> SMEM once (TMA), then per key tile j
          [ S_j = Q K_j^T  and  O += P_{j-1} V_{j-1} ]   two wgmmas issued back to back
          softmax_j on S_j (f32, exp2)  ->  P_j in registers (the A operand of the next PV)
        Pingpong (MosaicBlockSizes.pingpong, C = 2): the bracketed GEMMs of the consumers
        alternate through a pair of "turn" barriers, so one warpgroup's softmax runs while
        the other's GEMMs keep the tensor cores busy (FA-3 section 3.1).
        Overlap (MosaicBlockSizes.overlap_softmax): on tiles seen in full the softmax waits
        for S_j alone and runs under the PV product; O is rescaled after it (FA-3 3.2).
        The per-shape defaults pick these from H100 measurements (default_for).

    shared memory: Q/O [C, block_q/C, H], K and V [num_stages, block_k, H] (128-byte
        swizzle, the layout wgmma reads), lse [C, block_q/C] f32 (unless stored from
        registers: MosaicBlockSizes.lse_through_smem); with segment ids also
        q ids [C, block_q/C] and kv ids [num_stages, block_k] int32.

Block skipping: the CTA visits key tiles [lo, end) with step index j the absolute tile index
(ring position ring + j - lo, ring counting the key tiles streamed for the CTA's earlier
query tiles: 0 but on a persistent grid). lo is the first tile the CTA's top row sees (left
window bound), common to both consumers; each consumer's end is the tile past the last key
its bottom row sees (right bound / causal), so consumer 0 (upper rows) may stop before
consumer 1. The producer loads the union [lo, end_1); consumer 0, once done, releases the
rest as their loads land (with turns: one per turn it keeps passing to consumer 1 until that
one is done). Tiles that every row of a consumer sees in
full run without mask arithmetic; the rest (window edges, causal diagonal, every tile when
there are segment ids) build a mask from iotas and the segment ids, which are read from
SMEM in the register layout of the wgmma accumulator (rows for q, columns for kv).

Online softmax (FA-2, Dao 2023, Alg. 1) in the log2 domain: scores are scaled by
scale * log2(e) (softcap: tanh first, then softcap * log2(e)) and exponentiated with exp2;
the running max m is kept in that domain, so lse = m ln 2 + ln l.

Keys no query may see are not zeroed before P V (the masked probability is an exact 0, but
0 * NaN = NaN): V must be finite in every key tile that a CTA loads.

Mosaic GPU's Pallas API is young and changes between JAX releases; the few calls whose
spelling moved are resolved by feature detection in `_kernel_call`, never by version strings.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import GPU_L2_BYTES, GPU_SMS, check_bool, check_scalar_options
from pallas_kernels.flash_attention import (
    MaskSpec,
    _q_tile_ranges,
    flash_attention_backward,
)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

NUM_CONSUMERS = 2  # consumer warpgroups per CTA by default (the backward's, always); the
# last warpgroup is the producer
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM (and so per CTA: one CTA per SM)
WGMMA_M = 64  # rows of one wgmma instruction: a consumer owns a multiple of this
INTERPRET_SMS = 3  # the persistent grid's CTAs in interpret mode: several tiles each
SHORT_KV_LEN = 1024  # at most this many keys: rows at H <= 128 go persistent
LONG_KV_LEN = 16384  # at least this many keys: rows at H = 128 without a right bound take
# 192-key tiles (MosaicBlockSizes.default_for)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
# Hopper: 227 KiB of shared memory per block. Keep 3 KiB for the barriers and Mosaic's
# alignment padding: 3 stages of 128-key tiles at H = 128 next to Q and the lse rows count
# 229888 bytes here (over this budget) and came to 232624 in Mosaic, 176 over the 232448
# limit (session 10); without the lse rows (MosaicBlockSizes.lse_through_smem) they count
# 229376, this budget exactly, and compiled (session 12).
SMEM_BUDGET = 227 * 1024 - 3 * 1024


def launch_registers(warpgroups: int) -> int:
    """Registers per thread that ptxas gives a kernel of `warpgroups` x 128 threads: the
    register file split evenly, in steps of 8 (168 for 3 warpgroups, 96 for 5)."""
    return REGISTER_FILE // (128 * warpgroups) // 8 * 8


def most_consumer_registers(consumers: int, producer_registers: int) -> int:
    """The largest setmaxnreg target the consumers may ask for: setmaxnreg.inc waits until
    other warps of the CTA have released enough registers (setmaxnreg.dec), and only the
    producer releases any, so consumers * (target - launch) <= launch - producer. Asking for
    more deadlocks the CTA (four consumers at 120 hung on the H100, session 8)."""
    launch = launch_registers(consumers + 1)
    return (launch + (launch - producer_registers) // consumers) // 8 * 8


def _plgpu():
    """jax.experimental.pallas.mosaic_gpu, imported only when a kernel is built."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicBlockSizes:
    """Tiles, pipeline depth and register split of the Hopper forward kernel.
    Changes speed, never numbers.

    block_q: query rows per CTA, split evenly over the consumer warpgroups; each one's share
        (block_q / consumers) is 64 or 128 (one wgmma's M, or two).
    block_k: keys per pipeline stage: the N of S = Q K^T and the contraction of P V.
        A multiple of 64 in [64, 256]: one TMA box, and Mosaic's wgmma takes contractions
        in steps of the 128-byte swizzle's 64 elements (FA-3's 176-key tiles at H = 128
        are out of reach: "K must be a multiple of 64"). S need not be a multiple of it:
        the last key tile then starts at S - block_k and hides the keys the tile before it
        had (_Static.key_tail); S must be at least block_k and a multiple of 8.
    num_stages: K/V stages in shared memory (>= 2), i.e. how many key tiles the producer
        may run ahead of the slower consumer.
    consumers: consumer warpgroups per CTA, 2, 3 or 4 (3 and 4 need pingpong=False: the
        turns are passed within a pair). Four 64-row consumers hold a quarter of the tile
        each in fewer registers (112 at most), and four softmaxes are in flight instead of
        two; three (FA-3's H = 64 tile, 192 x 128) get 160 registers each, enough for
        128-key steps. Without turns T need only be a multiple of block_q / consumers: the
        consumers of a last query tile whose rows lie past T only release its key tiles.
    consumer_registers / producer_registers: per-thread register limits after setmaxnreg
        (multiples of 8 in [24, 256]). Only what the producer gives back can go to the
        consumers (most_consumer_registers: 240 for 2 consumers and a 24-register producer,
        112 for 4); None takes that most. 240/24 (FA-3's split) measured 487 vs 457
        TFLOP/s for 232/40 at B4 T4096 N16 H128 causal on an H100, the same elsewhere
        (experiments/mgpu_check.py, one run each).
    pingpong: the consumers take turns issuing their matrix products (FA-3's ping-pong),
        so that one's softmax runs while the other's products do. False: each issues as
        soon as its data is ready.
    overlap_softmax: on tiles seen in full, a consumer waits only for S_j = Q K_j^T
        before its softmax, leaving O += P_{j-1} V_{j-1} running under it (FA-3's
        intra-warpgroup overlap); O is rescaled once that product completes. False: the
        softmax starts after both.
    persistent: one CTA per SM, each taking query tiles in turn (the longest first, in
        snake order: _for_each_tile), so that the producer streams the next tile's first K/V
        while the consumers finish a tile. False: a CTA per query tile (T / block_q x B x N
        of them). On an H100 it measured 1-12% slower at H = 64 and 128 in session 8, and,
        with round-robin shares, 10-30% slower on causal rows in session 10 (a fixed share
        balances them worse than the hardware's CTA scheduler; a tile's Q load is not
        overlapped). With snake-order shares it is on where it won: S <= SHORT_KV_LEN at
        H <= 128 (default_for).
    head_major: the order CTAs launch in (the hardware starts them in grid order). False:
        query tile by query tile, each over every (batch, head). True: head by head, each
        over its query tiles. Every query tile of a head reads the head's whole K/V (up to
        its causal / window bounds); head-major keeps those readers in flight together, so
        the K/V comes from L2, where tile-major rereads it from DRAM once per query tile
        whenever B x N heads of K/V do not fit in L2 (50 MB on an H100: at b16 s1024 h16
        d128, 128 MB of K/V read 8 times, ~1 GB against the kernel's ~330 us). Where K/V
        fits in L2 anyway, tile-major's order (every head's shortest causal tiles last)
        leaves the smaller tail. default_for picks by the K/V size.
    lse_through_smem: the lse rows go out by TMA from a shared-memory buffer, like O.
        False: stored straight from registers, which frees block_q * 4 bytes: what two
        192-key stages (or three 128-key ones) need at H = 128 next to Q.
    """

    block_q: int = 128
    block_k: int = 128
    num_stages: int = 2
    consumers: int = NUM_CONSUMERS
    consumer_registers: int | None = None
    producer_registers: int = 24
    pingpong: bool = True
    overlap_softmax: bool = False
    persistent: bool = False
    head_major: bool = False
    lse_through_smem: bool = True

    def __post_init__(self):
        if self.consumers not in (2, 3, 4):
            raise ValueError(f"MosaicBlockSizes.consumers={self.consumers} must be 2, 3 or 4")
        if self.consumers != 2 and self.pingpong:
            raise ValueError(f"MosaicBlockSizes.consumers={self.consumers} needs "
                             "pingpong=False (the turns are passed within a pair)")
        if self.block_q not in (self.consumers * WGMMA_M, 2 * self.consumers * WGMMA_M):
            raise ValueError(
                f"MosaicBlockSizes.block_q={self.block_q} must be {self.consumers * WGMMA_M} "
                f"or {2 * self.consumers * WGMMA_M} ({self.consumers} consumer warpgroups "
                "of 64 or 128 rows)")
        most = most_consumer_registers(self.consumers, self.producer_registers)
        if self.consumer_registers is None:
            object.__setattr__(self, "consumer_registers", most)
        if self.block_k % 64 or not 64 <= self.block_k <= 256:
            raise ValueError(f"MosaicBlockSizes.block_k={self.block_k} must be a multiple of "
                             "64 in [64, 256]")
        if self.num_stages < 2:
            raise ValueError(f"MosaicBlockSizes.num_stages={self.num_stages} must be >= 2")
        for name in ("consumer_registers", "producer_registers"):
            value = getattr(self, name)
            if value % 8 or not 24 <= value <= 256:
                raise ValueError(f"MosaicBlockSizes.{name}={value} must be a multiple of 8 "
                                 "in [24, 256]")
        if self.consumer_registers > most:
            raise ValueError(
                f"MosaicBlockSizes.consumer_registers={self.consumer_registers} is more than "
                f"the {most} that {self.consumers} consumers can take from a producer at "
                f"producer_registers={self.producer_registers} (launched with "
                f"{launch_registers(self.consumers + 1)} each); the CTA would deadlock")

    @property
    def rows(self) -> int:
        """Query rows of one consumer warpgroup."""
        return self.block_q // self.consumers

    def smem_bytes(self, head_dim: int, itemsize: int, *, segments: bool = False) -> int:
        """Shared memory of one CTA: Q/O tiles, K/V stages and the lse rows (unless
        stored from registers; and with segment ids, the int32 ids of the query rows and of
        each K stage)."""
        qo = self.block_q * head_dim * itemsize
        kv = 2 * self.num_stages * self.block_k * head_dim * itemsize
        lse = self.block_q * 4 if self.lse_through_smem else 0
        ids = (self.block_q + self.num_stages * self.block_k) * 4 if segments else 0
        return qo + kv + lse + ids

    @classmethod
    def default_for(cls, *, q_len: int, kv_len: int, head_dim: int, causal: bool,
                    kv_bytes: int = 0, segments: bool = False) -> MosaicBlockSizes:
        """The per-shape rule. Launch order: head-major when K and V (kv_bytes, over every
        batch and kv head) do not fit in L2 (GPU_L2_BYTES), else tile-major.
        H <= 64: rows of more than SHORT_KV_LEN keys without a right bound take FA-3's
        tile, three 64-row consumers of 128-key steps (192 x 128), 4 stages, the softmax
        under PV (the last query tile may be short); else 256-query tiles of 64-key steps,
        4 stages, four 64-row consumers without turns, the softmax under PV when not causal,
        when T is a multiple of 256 (else 128-query tiles of 128-key steps).
        H = 128: 128-key tiles, 2 stages (a third stage does not fit next to Q), the softmax
        under the PV product; on rows of at least LONG_KV_LEN keys without a right bound or
        segment ids, 192-key tiles with the lse rows stored from registers.
        H = 256: 64-key tiles so that O (128 registers per thread) and S still fit in a
        consumer's registers. block_k falls back to 64 when S is not a multiple of the
        preferred tile.

        On an H100 (experiments/mgpu_check.py, jax 0.11.2): at H = 128 64-key tiles with 4
        stages were 10-20% slower and block_q = 256 30-40% slower; at H = 64 the 256-query
        tiles were the fastest variant on both configs measured (+3.5% on b4 s4096 full,
        session 5; +3.3% on the train step's causal T = 2048 GQA shape, session 7). Session
        8 (three runs): at H = 64 no turns + overlap gave +3.6 to +9.5% (full) and +4.8%
        (train step; no turns alone +4.1 and +4.2%); at H = 128 the overlap gave +4.9 and
        +7.2% on b4 s4096 full, +4.0% on b1 s16384 causal, -1.3 and +3.9% on b4 s4096
        causal, the same on b16 s1024. Session 9, two runs: at H = 64 four 64-row consumers
        (no overlap) gave 354.7 and 354.1 TFLOP/s on the train step's shape against 319.9 and
        320.3 for the session 8 schedule (two 128-row consumers, overlap), and 405.0 and
        391.7 against 381.8 and 381.7 on b4 s4096 full. H = 256 is not tuned yet.

        Session 10, one run, head-major against tile-major (TFLOP/s; K + V in MB): b16 s1024
        h16 d128 (128 MB) 527 vs 329 full, 384 vs 269 causal (cuDNN 504, 361); b4 s4096 h16
        d128 (128 MB) 594 vs 553 full, 526 vs 499 causal; b1 s16384 h16 d128 (128 MB) 630 vs
        613 full, 609 vs 567 causal; at H = 64, b4 s4096 h32 full (128 MB) 412 vs 388, b16
        s1024 h32 full (128 MB) 366 vs 349; but the train step's causal b8 s2048 h32/8
        (32 MB, in L2 either way) 346 vs 356: there the tile-major order's tail (every
        head's shortest tiles last) wins. At H = 64 without a right bound (causal False) the
        softmax under PV with four consumers, one run: +1.4, +2.3, +3.3% on b4 s4096, b16
        s1024, b1 s16384 full (419.5 vs 413.6, 370.2 vs 362.0, 439.6 vs 425.5 TFLOP/s); on
        the causal rows it lost 3-10%; a second run: +2.9, +2.6, +3.0%. The persistent grid
        at H = 64 on rows without a mask of at most SHORT_KV_LEN keys, where a tile's
        prologue (Q, the first K/V) is a large share of its 16 steps and the persistent CTA
        loads the next tile's K/V under this one's epilogue: b16 s1024 h32 full 380.6,
        383.4, 404.0 vs 366.4, 362.0, 368.5 (three runs; cuDNN 377-397); at S = 4096 and
        16384 it lost 2-9%, and on causal rows 10-30% (the fixed round-robin share). With
        snake-order shares (one run): b16 s1024 causal 323.5 vs 274.3 at H = 64 (cuDNN
        298.7) and 410.2 vs 380.3 at H = 128 (cuDNN 360.6); b4 s4096 h32 d64 causal 396.2 vs
        389.1; b1 s16384 causal 417.4 vs 434.4 (H = 64), 436.8 vs 615.1 (H = 128). So: the
        persistent grid when S <= SHORT_KV_LEN, masked or not (at H = 128 without a mask it
        tied, 525.4 vs 527.1).

        Session 14, FA-3's H = 64 tile (three consumers, 192 x 128, 4 stages, softmax under
        PV) against the four-consumer default: b1 s16384 h32 full 481.0 vs 440.2 (cuDNN
        464.7), b4 s4096 h32 full 448.4 vs 430.2 (cuDNN 446.2); but b16 s1024 full 372.7 vs
        420.2 (persistent), and 3-34% slower on the causal rows. At H = 128, 192-key tiles
        (two stages next to Q with the lse rows stored from registers; a key tail where S is
        not a multiple of 192) on b1 s16384 h16 full, three calls: 639.1, 651.8, 616.4 vs
        627.5, 618.6, 616.3 for the default (+2.4% on average); on b4 s4096 full 588.6 vs
        615.4 and 14-60% slower on causal and short rows (one call); as the default, six
        timings over three more processes averaged 645.0 against 618.1 for the 128-key
        tile (+4.4%). So on rows of at least LONG_KV_LEN keys without a right bound or
        segment ids (whose ids would not fit)."""
        head_major = kv_bytes > GPU_L2_BYTES
        short = kv_len <= SHORT_KV_LEN
        if head_dim <= 64 and not causal and not short and q_len % 64 == 0 and kv_len % 128 == 0:
            return cls(block_q=192, block_k=128, num_stages=4, consumers=3, pingpong=False,
                       overlap_softmax=True, head_major=head_major)
        if head_dim <= 64 and q_len % 256 == 0 and kv_len % 64 == 0:
            return cls(block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
                       overlap_softmax=not causal, head_major=head_major, persistent=short)
        if head_dim <= 64:
            base = cls(block_k=128, num_stages=4, head_major=head_major)
        elif head_dim <= 128 and not causal and not segments and kv_len >= LONG_KV_LEN:
            return cls(block_k=192, num_stages=2, overlap_softmax=True, lse_through_smem=False,
                       head_major=head_major)
        elif head_dim <= 128:
            base = cls(block_k=128, num_stages=2, overlap_softmax=True, head_major=head_major,
                       persistent=short)
        else:
            base = cls(block_k=64, num_stages=2, head_major=head_major)
        if kv_len % base.block_k and kv_len % 64 == 0:
            # Half the tile, twice the stages: the same shared memory.
            base = dataclasses.replace(base, block_k=64, num_stages=2 * base.num_stages)
        return base


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a jit static argument and the custom_vjp
    nondiff argument). The backward's kernels (flash_attention_mgpu_bwd) use it too, with
    their own block sizes."""

    causal: bool
    window: tuple[int | None, int | None] | None  # (left, right) as the caller gave it
    softcap: float | None
    has_segments: bool
    scale: float
    block_sizes: MosaicBlockSizes  # a MosaicBackwardBlockSizes in the backward's kernels
    q_len: int
    kv_len: int
    head_dim: int
    group: int  # G = N // K
    interpret: bool
    backward: str = "triton"  # "triton" or "mosaic" (pallas_kernels.flash_attention_mgpu_bwd)
    deterministic: bool = True  # the Mosaic backward's: False allows the fused one

    @property
    def mask(self) -> MaskSpec:
        """The visible band around the diagonal (causal folded into its right bound)."""
        return MaskSpec.make(causal=self.causal, window=self.window,
                             has_segments=self.has_segments)

    @property
    def offset(self) -> int:
        """S - T: query i sits at absolute position i + offset."""
        return self.kv_len - self.q_len

    @property
    def masked(self) -> bool:
        """Some (query, key) pair is hidden: tiles may be skipped, some need a mask."""
        mask = self.mask
        return mask.lo is not None or mask.hi is not None or mask.has_segments

    @property
    def ends_differ(self) -> bool:
        """A right bound (causal or window): consumer 0, which owns the upper rows, may stop
        before consumer 1."""
        return self.mask.hi is not None

    @property
    def some_row_empty(self) -> bool:
        """Some query may see no key at all (T > S with a right bound, or segment ids)."""
        return self.mask.some_row_empty(self.q_len, self.kv_len)

    @property
    def num_kv_tiles(self) -> int:
        return pl.cdiv(self.kv_len, self.block_sizes.block_k)

    @property
    def key_tail(self) -> bool:
        """S is not a multiple of the forward's block_k: the last key tile is loaded from
        S - block_k, over the end of the one before, and hides the keys that one had."""
        return self.kv_len % self.block_sizes.block_k != 0

    def kv_tile_start(self, j):
        """First key row of key tile j as loaded (see key_tail)."""
        bk = self.block_sizes.block_k
        if not self.key_tail:
            return j * bk
        return jnp.minimum(j * bk, self.kv_len - bk)

    @property
    def some_tile_masked(self) -> bool:
        """The forward masks some tile: a mask, or a key tail."""
        return self.masked or self.key_tail

    @property
    def num_q_tiles(self) -> int:
        return pl.cdiv(self.q_len, self.block_sizes.block_q)

    @property
    def ragged(self) -> bool:
        """T is not a multiple of block_q: the last query tile's lower consumers have no
        rows (T is a multiple of a consumer's rows; check_supported)."""
        return self.q_len % self.block_sizes.block_q != 0


# ----------------------------------------------------------------------------- kernel


class _Gmem(NamedTuple):
    """The kernel's operands in global memory (Pallas refs); q_seg [B, T] and kv_seg [B, S]
    are None without segment ids."""

    q: Any
    k: Any
    v: Any
    q_seg: Any
    kv_seg: Any
    out: Any
    lse: Any


class _Smem(NamedTuple):
    """One CTA's shared-memory buffers and barriers (Pallas refs, allocated in
    _flash_fwd_mgpu_kernel); q_seg and kv_seg are None without segment ids."""

    qo: Any  # [2, rows, H]: Q, then O
    k: Any  # [num_stages, block_k, H]
    v: Any  # [num_stages, block_k, H]
    lse: Any  # [2, rows] f32
    q_seg: Any  # [2, rows] int32
    kv_seg: Any  # [num_stages, block_k] int32, loaded with K
    q_ready: Any
    k_ready: Any
    v_ready: Any
    k_free: Any  # [consumer * num_stages + stage]
    v_free: Any
    turn: Any


def _kv_tiles(cta_start, wg, st: _Static):
    """Key tiles that consumer wg of the CTA whose query tile starts at row cta_start visits:
    (lo, full_lo, full_hi, end). It runs steps lo, ..., end - 1 (step j reads key tile j,
    stage j % num_stages); tiles [full_lo, full_hi) every one of its rows sees in full (no
    mask), the others are masked.

    lo is the first tile that the CTA's top row sees, the same for both consumers, so that
    they read the stages in the same order as the producer fills them. end >= lo + 1 also
    for rows that see no key (they come out 0 with lse -inf through the masked path), so
    that every consumer runs the same protocol. wg: traced (a consumer) or an int (the
    producer)."""
    nk = st.num_kv_tiles
    if not st.some_tile_masked:
        return 0, 0, nk, nk
    bs = st.block_sizes
    ranges = functools.partial(_q_tile_ranges, q_len=st.q_len, kv_len=st.kv_len,
                               block_k=bs.block_k, mask=st.mask)
    lo = jnp.minimum(ranges(cta_start, bs.block_q)[0], nk - 1)
    _, full_lo, full_hi, end = ranges(cta_start + wg * bs.rows, bs.rows)
    end = jnp.clip(end, lo + 1, nk)
    full_lo = jnp.clip(full_lo, lo, end)
    return lo, full_lo, jnp.clip(full_hi, full_lo, end), end


def _last_consumer(cta_start, st: _Static):
    """The last consumer with rows in the query tile at cta_start: the lowest rows, so it
    visits the most key tiles (the producer streams what it needs). consumers - 1 but in a
    ragged last tile, whose lower consumers' rows lie past T."""
    bs = st.block_sizes
    if not st.ragged:
        return bs.consumers - 1
    return jnp.minimum(bs.consumers - 1, lax.div(st.q_len - cta_start, bs.rows) - 1)


def _for_each_tile(gm: _Gmem, st: _Static, num_q_tiles: int, ctas: int | None, visit):
    """Runs visit(batch, head, cta_start, ring) over the query tiles of this CTA, threading
    `ring` (the K/V ring position of the tile's first key tile; starts at 0) through.

    ctas None: one tile per CTA, from the grid (launch_grid). Else a persistent grid of
    `ctas` CTAs walks the list in the grid's launch order in passes of `ctas` tiles, in
    snake order: pass i gives CTA c tile i * ctas + c when i is even, i * ctas + ctas - 1 - c
    when odd. A CTA that takes a pass's first (longest causal) tile takes the next pass's
    last, and a list that repeats with a period dividing ctas (head-major: a head's
    num_q_tiles causal lengths) does not hand one CTA the same length every pass, as plain
    round robin would (session 10: head-major persistent causal rows ran 10-30% slow).
    A right bound (causal): the bottom tiles have the most keys to visit, so they come
    first."""
    B, _, N, _ = gm.q.shape

    def q_tile_start(index):
        return (num_q_tiles - 1 - index if st.ends_differ else index) * st.block_sizes.block_q

    if ctas is None:
        return visit(lax.axis_index("batch"), lax.axis_index("head"),
                     q_tile_start(lax.axis_index("q_tile")), 0)
    cta = lax.axis_index("cta")

    def position(i):  # this CTA's place in pass i
        return jnp.where(i % 2 == 0, cta, ctas - 1 - cta)

    total = num_q_tiles * B * N
    full_passes = total // ctas
    count = full_passes + (position(full_passes) < total % ctas).astype(jnp.int32)

    sizes, names = launch_grid((num_q_tiles, "q_tile"), (B, "batch"), (N, "head"),
                               head_major=st.block_sizes.head_major)

    def one(i, ring):
        # The tile's coordinates, unravelled in the grid's launch order (last axis fastest).
        rest, at = i * ctas + position(i), {}
        for size, name in reversed(list(zip(sizes, names))):
            at[name], rest = rest % size, lax.div(rest, size)
        return visit(at["batch"], at["head"], q_tile_start(at["q_tile"]), ring)

    return lax.fori_loop(0, count, one, 0)


def _consumer(wg, gm: _Gmem, sm: _Smem, *, st: _Static, num_q_tiles: int, ctas: int | None):
    """One consumer warpgroup, over the CTA's query tiles."""
    _for_each_tile(gm, st, num_q_tiles, ctas, functools.partial(_consumer_tile, wg, gm, sm, st))
    _plgpu().wait_smem_to_gmem(0)  # the last tile's O and lse written before the CTA exits


def _consumer_tile(wg, gm: _Gmem, sm: _Smem, st: _Static, batch, head, cta_start, ring):
    """Consumer wg's share of the query tile at cta_start; returns the ring position after
    it (the key tiles the producer streamed for the tile)."""
    lo = _kv_tiles(cta_start, wg, st)[0]
    end_last = _kv_tiles(cta_start, _last_consumer(cta_start, st), st)[3]
    run_rows = functools.partial(_consumer_rows, wg, gm, sm, st, batch, head, cta_start,
                                 ring)
    if not st.ragged:
        run_rows()
        return ring + end_last - lo
    plgpu = _plgpu()
    depth = st.block_sizes.num_stages
    has_rows = cta_start + wg * st.block_sizes.rows < st.q_len
    pl.when(has_rows)(run_rows)

    @pl.when(jnp.logical_not(has_rows))
    def _():
        # Its rows lie past T: no Q to load, no O to store, but the producer still waits
        # for its release of every key tile it streams for the tile.
        def release(j, carry):
            stage = lax.rem(ring + j - lo, depth)
            for ready, free in ((sm.k_ready, sm.k_free), (sm.v_ready, sm.v_free)):
                plgpu.barrier_wait(ready.at[stage])
                plgpu.barrier_arrive(free.at[wg * depth + stage])
            return carry

        lax.fori_loop(lo, end_last, release, None)

    return ring + end_last - lo


def _consumer_rows(wg, gm: _Gmem, sm: _Smem, st: _Static, batch, head, cta_start, ring):
    """Rows [q_start, q_start + rows) of the query tile at cta_start (all below T)."""
    plgpu = _plgpu()
    bs = st.block_sizes
    rows, bk, depth = bs.rows, bs.block_k, bs.num_stages
    dtype = gm.q.dtype
    other = 1 - wg
    q_start = cta_start + wg * rows
    lo, full_lo, full_hi, end = _kv_tiles(cta_start, wg, st)
    if bs.pingpong:  # consumer 0 takes each tile's first turn: consumer 1 hands it over
        pl.when(wg == 1)(functools.partial(plgpu.barrier_arrive, sm.turn.at[0]))
    q_tile = sm.qo.at[wg]
    plgpu.copy_gmem_to_smem(gm.q.at[batch, pl.ds(q_start, rows), head], q_tile,
                            sm.q_ready.at[wg])
    if st.has_segments:  # the second of q_ready's two arrivals
        plgpu.copy_gmem_to_smem(gm.q_seg.at[batch, pl.ds(q_start, rows)], sm.q_seg.at[wg],
                                sm.q_ready.at[wg])
    plgpu.barrier_wait(sm.q_ready.at[wg])

    def stage(j):
        """The ring stage of key tile j: the producer streams this tile's key tiles lo, lo + 1,
        ... into ring positions ring, ring + 1, ... (the tile before it left off there)."""
        return lax.rem(ring + j - lo, depth)

    def in_wgmma_layout(x, rows_of=False):
        """x in the register layout of a wgmma accumulator (or of its per-row reductions),
        so that values built here meet the wgmma results in the same layout. Interpret mode
        has no layouts."""
        if st.interpret:
            return x
        layout = plgpu.Layout.WGMMA.reduce(1) if rows_of else plgpu.Layout.WGMMA
        return plgpu.layout_cast(x, layout)

    def load_ids(ref, axis):
        """Segment ids [n] from shared memory, laid out along axis `axis` of a wgmma
        accumulator (0: one per row, 1: one per column), ready to broadcast against it."""
        if st.interpret:  # the interpreter has neither layouts nor plgpu.load
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - axis))

    def visible(j):
        """[rows, bk] bool: query q_start + r sees key kv_tile_start(j) + c (see MaskSpec;
        the key tail hides the keys below j * bk)."""
        mask = st.mask
        band = mask.lo is not None or mask.hi is not None
        ok = None
        first_key = st.kv_tile_start(j)
        if st.key_tail or band:
            c = in_wgmma_layout(lax.broadcasted_iota(jnp.int32, (rows, bk), 1))
        if st.key_tail:
            ok = c >= j * bk - first_key
        if band:
            r = in_wgmma_layout(lax.broadcasted_iota(jnp.int32, (rows, bk), 0))
            # key first_key + c minus the diagonal of query q_start + r is (c - r) - base
            base = q_start + st.offset - first_key
            if mask.hi is not None:
                below = c - r <= base + mask.hi
                ok = below if ok is None else ok & below
            if mask.lo is not None:
                inside = c - r >= base + mask.lo
                ok = inside if ok is None else ok & inside
        if st.has_segments:
            # The query ids are re-read per tile (never overwritten) rather than held in
            # registers through the loop; the kv ids are this stage's, loaded with K.
            q_ids = load_ids(sm.q_seg.at[wg], 0)
            kv_ids = load_ids(sm.kv_seg.at[stage(j)], 1)
            same = (lax.broadcast_in_dim(q_ids, (rows, bk), [0])
                    == lax.broadcast_in_dim(kv_ids, (rows, bk), [1]))
            ok = same if ok is None else ok & same
        return ok

    def issue_qk(j, s_ref):
        """Issues S_j = Q K_j^T into s_ref; returns a function that awaits and reads it."""
        k_tile = sm.k.at[stage(j)]
        plgpu.barrier_wait(sm.k_ready.at[stage(j)])
        if st.interpret:  # the interpreter (JAX 0.10) cannot transpose a wgmma operand
            s = lax.dot_general(q_tile[...], k_tile[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
            return lambda: s
        plgpu.wgmma(s_ref, q_tile, k_tile.transpose((1, 0)))  # a view: no data moves
        return lambda: s_ref[...]

    def accumulate_pv(j, acc, p, then):
        """acc + P V_j, once complete; `then()` runs as soon as the wgmma is issued. The
        wgmma accumulates into acc's registers in place (run_state)."""
        v_tile = sm.v.at[stage(j)]
        plgpu.barrier_wait(sm.v_ready.at[stage(j)])
        if st.interpret:  # the interpreter (JAX 0.10) takes no register operand in a wgmma
            then()
            return acc + lax.dot_general(p, v_tile[...], (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

        def issue(o_ref):
            plgpu.wgmma(o_ref, p, v_tile)
            then()

        return pl.run_state(issue)(plgpu.ACC.init(acc))

    def take_turn():
        if bs.pingpong:
            plgpu.barrier_wait(sm.turn.at[wg])

    def pass_turn():
        if bs.pingpong:
            plgpu.barrier_arrive(sm.turn.at[other])

    def gemms(j, acc, p_prev):
        """Tensor-core work of step j under this warpgroup's turn: S_j = Q K_j^T, and
        O += P_{j-1} V_{j-1} unless j is the first step. The turn passes to the other
        consumer as soon as both are issued, before they complete."""
        take_turn()

        def with_scores(s_ref):
            read_scores = issue_qk(j, s_ref)
            if p_prev is None:
                pass_turn()
                return read_scores(), acc

            acc_new = accumulate_pv(j - 1, acc, p_prev, pass_turn)
            return read_scores(), acc_new

        s, acc = pl.run_scoped(with_scores, plgpu.ACC((rows, bk), jnp.float32))
        if not st.has_segments:  # with segment ids the softmax still reads the stage's ids
            plgpu.barrier_arrive(sm.k_free.at[wg * depth + stage(j)])
        if p_prev is not None:
            plgpu.barrier_arrive(sm.v_free.at[wg * depth + stage(j - 1)])
        return s, acc

    def softmax(j, s, acc, m, l, *, masked: bool):
        """Folds scores s [rows, bk] of key tile j into (acc, m, l); returns P_j in q's
        dtype for the next PV product (FA-2 Alg. 1 lines 8-10, log2 domain)."""
        p, m_new, l, alpha = probabilities(j, s, m, l, masked=masked)
        return rescale(acc, alpha), m_new, l, p

    def rescale(acc, alpha):
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

    def probabilities(j, s, m, l, *, masked: bool):
        """P_j in q's dtype, the new row max and row sum, and alpha, the factor that O
        (so far) takes on (FA-2 Alg. 1 lines 8-10, log2 domain)."""
        if st.softcap is None:
            c = st.scale * LOG2E
        else:
            # Gemma 2's cap, tanh first: what is left to scale by, softcap * log2(e), is > 0
            # and folds in after the max like the plain scale does.
            s = jnp.tanh(s * (st.scale / st.softcap))
            c = st.softcap * LOG2E
        if c <= 0:  # the max does not commute with this scale: apply it to every score
            s = s * c
            c = 1.0
        if masked:  # after any sign flip, so that a hidden score stays -inf
            s = jnp.where(visible(j), s, -jnp.inf)
        # c > 0: the max before scaling, one multiply per row instead of per score
        row_max = s.max(axis=1)
        m_new = jnp.maximum(m, row_max if c == 1.0 else row_max * c)
        # On a masked tile a row may have seen no key yet (m_new = -inf): shift it by 0 so
        # that exp2 gives 0, not NaN. A tile that a row sees in full gives it a finite max.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_shift)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_shift, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        return p.astype(dtype), m_new, l, alpha

    def overlapped(j, acc, m, l, p_prev, *, masked):
        """Step j with its softmax under O += P_{j-1} V_{j-1} (overlap_softmax): both
        products issued under the turn, S_j awaited alone (wgmma groups complete in
        order), the softmax, then O awaited and rescaled."""
        take_turn()
        if st.interpret:  # no asynchronous products: the same numbers in program order
            s = issue_qk(j, None)()
            acc = accumulate_pv(j - 1, acc, p_prev, pass_turn)
            if not st.has_segments:
                plgpu.barrier_arrive(sm.k_free.at[wg * depth + stage(j)])
            p, m, l, alpha = probabilities(j, s, m, l, masked=masked)
        else:
            def under_pv(refs):
                o_ref, p_ref, m_ref, l_ref, alpha_ref = refs

                def scores(s_ref):
                    issue_qk(j, s_ref)
                    plgpu.barrier_wait(sm.v_ready.at[stage(j - 1)])
                    plgpu.wgmma(o_ref, p_prev, sm.v.at[stage(j - 1)])
                    pass_turn()
                    return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)

                s = pl.run_scoped(scores, plgpu.ACC((rows, bk), jnp.float32))
                if not st.has_segments:
                    plgpu.barrier_arrive(sm.k_free.at[wg * depth + stage(j)])
                # What ptxas makes of this (PTX and SASS, sessions 9 and 12): the PTX has the
                # whole softmax between the waits for S_j and for O, but ptxas moves the wait
                # for O up, after about half of the row maxima and before every exp2, so most
                # of the softmax does not run under PV; what the option gains is the two
                # products issued together. An optimization barrier on the softmax's results
                # orders LLVM, not ptxas (the PTX order was right without it). Storing the
                # row sums to shared memory before the wait does hold the exp2s ahead of it
                # (a memory operation ptxas keeps in place), and P through shared memory takes
                # the in-flight register operand away; neither was faster over a session's
                # passes (BENCHMARKS.md, session 12; code in commits db9f036 and 7f052d3).
                p_ref[...], m_ref[...], l_ref[...], alpha_ref[...] = probabilities(
                    j, s, m, l, masked=masked)

            # Leaving run_state awaits O; p_prev and m only give the shapes and layouts.
            acc, p, m, l, alpha = pl.run_state(under_pv)(
                (plgpu.ACC.init(acc), p_prev, m, l, m))
        plgpu.barrier_arrive(sm.v_free.at[wg * depth + stage(j - 1)])
        return rescale(acc, alpha), m, l, p

    def step(j, carry, *, masked):
        acc, m, l, p_prev = carry
        # Masked steps keep the plain order: with the mask's registers live as well, ptxas
        # serialises the products around the softmax (C7513; 224 vs 322 TFLOP/s on the
        # train step's causal shape, session 8).
        if bs.overlap_softmax and p_prev is not None and not masked:
            carry = overlapped(j, acc, m, l, p_prev, masked=masked)
        else:
            s, acc = gemms(j, acc, p_prev)
            carry = softmax(j, s, acc, m, l, masked=masked)
        if st.has_segments:  # the kv ids are read: now the producer may refill the stage
            plgpu.barrier_arrive(sm.k_free.at[wg * depth + stage(j)])
        return carry

    acc = in_wgmma_layout(jnp.zeros((rows, st.head_dim), jnp.float32))
    m = in_wgmma_layout(jnp.full((rows,), -jnp.inf, jnp.float32), rows_of=True)
    l = in_wgmma_layout(jnp.zeros((rows,), jnp.float32), rows_of=True)

    # Step lo has no PV product before it; it is masked whenever anything is (harmless on
    # a tile that every row sees in full, and it saves a second copy of the step).
    carry = step(lo, (acc, m, l, None), masked=st.some_tile_masked)
    unmasked_step = functools.partial(step, masked=False)
    masked_step = functools.partial(step, masked=True)
    if not st.some_tile_masked:
        carry = lax.fori_loop(lo + 1, end, unmasked_step, carry)
    elif st.has_segments:  # no tile is known to be seen in full
        carry = lax.fori_loop(lo + 1, end, masked_step, carry)
    else:  # window's left edge, tiles seen in full, diagonal / right edge
        first_full = jnp.maximum(full_lo, lo + 1)
        past_full = jnp.maximum(full_hi, first_full)
        carry = lax.fori_loop(lo + 1, first_full, masked_step, carry)
        carry = lax.fori_loop(first_full, past_full, unmasked_step, carry)
        carry = lax.fori_loop(past_full, end, masked_step, carry)
    acc, m, l, p_last = carry

    # Steps that the last consumer (the lowest rows) runs beyond this one's end.
    end_last = (_kv_tiles(cta_start, _last_consumer(cta_start, st), st)[3] if st.ends_differ
                else end)

    def release_unread(ready, free, j):
        """Key tile j is one that only other consumers read: wait for its load and
        release it all the same. So this consumer takes every phase of k_ready / v_ready in
        order, and the producer waits for every consumer's release of every tile."""
        @pl.when(j < end_last)
        def _():
            plgpu.barrier_wait(ready.at[stage(j)])
            plgpu.barrier_arrive(free.at[wg * depth + stage(j)])

    def hand_over_last():
        # Consumer 1 finishes last and keeps the turn, so that every turn handed over is
        # taken (which the interpreter checks).
        @pl.when(wg == 0)
        def _():
            if st.ends_differ:
                release_unread(sm.k_ready, sm.k_free, end)
            pass_turn()

    # The last PV product, alone under the turn.
    take_turn()
    acc = accumulate_pv(end - 1, acc, p_last, hand_over_last if bs.pingpong else lambda: None)
    plgpu.barrier_arrive(sm.v_free.at[wg * depth + stage(end - 1)])

    if st.ends_differ and not bs.pingpong:
        # Consumer 0 ran fewer steps than consumer 1 (it owns the upper rows). Without turns
        # nothing else paces it against the producer: it releases the rest as it comes.
        def release_rest(j, carry):
            release_unread(sm.k_ready, sm.k_free, j)
            release_unread(sm.v_ready, sm.v_free, j)
            return carry

        lax.fori_loop(end, end_last, release_rest, None)
    if st.ends_differ and bs.pingpong:
        # Consumer 0 ran fewer steps than consumer 1: keep passing the turn until consumer 1
        # is done, or consumer 1 would wait on it forever. Turn j lets consumer 1 run
        # S_{j+1} and O += P_j V_j.
        def idle_turn(j, carry):
            take_turn()
            release_unread(sm.k_ready, sm.k_free, j + 1)
            release_unread(sm.v_ready, sm.v_free, j)
            pass_turn()
            return carry

        lax.fori_loop(end, end_last, idle_turn, None)

    if st.some_row_empty:
        seen = l > 0
        l = jnp.where(seen, l, 1.0)
    out = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
    lse = m * LN2 + jnp.log(l)
    if st.some_row_empty:
        lse = jnp.where(seen, lse, -jnp.inf)
    q_tile[...] = out.astype(dtype)  # Q is dead: its tile stages O for the TMA store
    lse_out = gm.lse.at[batch, head, pl.ds(q_start, rows)]
    if bs.lse_through_smem:
        sm.lse.at[wg][...] = lse
    else:
        lse_out[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, gm.out.at[batch, pl.ds(q_start, rows), head])
    if bs.lse_through_smem:
        plgpu.copy_smem_to_gmem(sm.lse.at[wg], lse_out)
    # The next tile's Q goes where this O is: wait until the store has read it.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _producer(gm: _Gmem, sm: _Smem, *, st: _Static, num_q_tiles: int, ctas: int | None):
    """The producer warpgroup: streams the K/V tiles [lo, end) that either consumer needs,
    for each of the CTA's query tiles in turn, through the num_stages-deep ring, K ahead of V
    (S = Q K^T comes first in every step). Ring position r (counted over the CTA's whole
    run, so that a tile's first loads go out while the consumers finish the one before) is
    stage r % num_stages; before refilling a stage it waits until both consumers released
    what it held (every consumer releases every key tile, read or not)."""
    plgpu = _plgpu()
    bs = st.block_sizes
    bk, depth = bs.block_k, bs.num_stages

    def await_release(r, free):
        for wg in range(bs.consumers):
            plgpu.barrier_wait(free.at[wg * depth + lax.rem(r, depth)])

    def stream(batch, head, cta_start, ring):
        kv_head = lax.div(head, st.group)
        lo = _kv_tiles(cta_start, 0, st)[0]
        # consumer 0 owns the upper rows, so it visits a prefix of the next one's tiles
        last = _kv_tiles(cta_start, _last_consumer(cta_start, st), st)[3]

        def load(t, carry):
            r = ring + t - lo
            s, keys = lax.rem(r, depth), pl.ds(st.kv_tile_start(t), bk)
            refill = r >= depth  # the first lap of the ring finds every stage free
            pl.when(refill)(functools.partial(await_release, r, sm.k_free))
            plgpu.copy_gmem_to_smem(gm.k.at[batch, keys, kv_head], sm.k.at[s],
                                    sm.k_ready.at[s])
            if st.has_segments:  # the tile's kv ids: the second of k_ready's two arrivals
                plgpu.copy_gmem_to_smem(gm.kv_seg.at[batch, keys], sm.kv_seg.at[s],
                                        sm.k_ready.at[s])
            pl.when(refill)(functools.partial(await_release, r, sm.v_free))
            plgpu.copy_gmem_to_smem(gm.v.at[batch, keys, kv_head], sm.v.at[s],
                                    sm.v_ready.at[s])
            return carry

        lax.fori_loop(lo, last, load, None)
        return ring + last - lo

    streamed = _for_each_tile(gm, st, num_q_tiles, ctas, stream)

    def drain(r, carry):
        await_release(r, sm.k_free)
        await_release(r, sm.v_free)
        return carry

    # Take the releases of the last stages too, as if refilling them: nothing waits on the
    # producer any more, and every barrier phase is then observed (the interpreter checks).
    lax.fori_loop(jnp.maximum(streamed, depth), streamed + depth, drain, None)


def _flash_fwd_mgpu_kernel(*refs, st: _Static, num_q_tiles: int, ctas: int | None):
    # refs: q, k, v, (q_seg, kv_seg with segment ids), out, lse
    plgpu = _plgpu()
    if st.has_segments:
        gm = _Gmem(*refs)
    else:
        q_ref, k_ref, v_ref, out_ref, lse_ref = refs
        gm = _Gmem(q_ref, k_ref, v_ref, None, None, out_ref, lse_ref)
    bs = st.block_sizes
    dtype = gm.q.dtype
    swizzle = plgpu.find_swizzle(st.head_dim * jnp.dtype(dtype).itemsize * 8)
    # The layout wgmma and TMA agree on: 8-row tiles, `swizzle` bytes wide, XOR-swizzled.
    tiled = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
             plgpu.SwizzleTransform(swizzle))
    # With segment ids two TMA copies complete on each q_ready (Q and its ids) and each
    # k_ready (K and its ids).
    arrivals = 2 if st.has_segments else 1
    scratch = {
        "qo": plgpu.SMEM((bs.consumers, bs.rows, st.head_dim), dtype, transforms=tiled),
        "k": plgpu.SMEM((bs.num_stages, bs.block_k, st.head_dim), dtype, transforms=tiled),
        "v": plgpu.SMEM((bs.num_stages, bs.block_k, st.head_dim), dtype, transforms=tiled),
        "q_ready": plgpu.Barrier(num_arrivals=arrivals, num_barriers=bs.consumers),
        "k_ready": plgpu.Barrier(num_arrivals=arrivals, num_barriers=bs.num_stages),
        "v_ready": plgpu.Barrier(num_barriers=bs.num_stages),
        # [consumer * num_stages + stage], flat: interpret mode takes 1-D barrier arrays only
        "k_free": plgpu.Barrier(num_barriers=bs.consumers * bs.num_stages),
        "v_free": plgpu.Barrier(num_barriers=bs.consumers * bs.num_stages),
        "turn": plgpu.Barrier(num_barriers=2),  # pingpong: one per consumer of the pair
    }
    if bs.lse_through_smem:
        scratch["lse"] = plgpu.SMEM((bs.consumers, bs.rows), jnp.float32)
    if st.has_segments:
        scratch["q_seg"] = plgpu.SMEM((bs.consumers, bs.rows), jnp.int32)
        scratch["kv_seg"] = plgpu.SMEM((bs.num_stages, bs.block_k), jnp.int32)

    def body(**buffers):
        sm = _Smem(**{"q_seg": None, "kv_seg": None, "lse": None, **buffers})
        wg = lax.axis_index("wg")

        @pl.when(wg < bs.consumers)
        def _():
            plgpu.set_max_registers(bs.consumer_registers, action="increase")
            _consumer(wg, gm, sm, st=st, num_q_tiles=num_q_tiles, ctas=ctas)

        @pl.when(wg == bs.consumers)
        def _():
            plgpu.set_max_registers(bs.producer_registers, action="decrease")
            _producer(gm, sm, st=st, num_q_tiles=num_q_tiles, ctas=ctas)

    pl.run_scoped(body, collective_axes="wg", **scratch)


def kv_bytes(k, v) -> int:
    """Bytes of K and V together: what default_for compares with the L2 (launch order)."""
    return k.size * jnp.dtype(k.dtype).itemsize + v.size * jnp.dtype(v.dtype).itemsize


def launch_grid(tiles, batch, heads, *, head_major: bool):
    """(grid, grid_names) for a grid over tiles x batch x heads, each a (size, name) pair.
    Mosaic GPU launches the last grid axis fastest (it is CUDA's x). Tile-major: tiles
    slowest, heads fastest; head-major: batch, heads, then tiles fastest (see
    MosaicBlockSizes.head_major). The kernels find their coordinates by axis name."""
    axes = (batch, heads, tiles) if head_major else (tiles, batch, heads)
    return tuple(size for size, _ in axes), tuple(name for _, name in axes)


def _kernel_call(plgpu, body, out_types, *, name, **kwargs):
    """plgpu.kernel(...), spelling the output-type and kernel-name arguments the way this
    JAX names them (feature detection; the name only labels profiles)."""
    params = inspect.signature(plgpu.kernel).parameters
    kwargs["out_type" if "out_type" in params else "out_shape"] = out_types
    if "kernel_name" in {f.name for f in dataclasses.fields(plgpu.Mesh)}:
        kwargs["kernel_name"] = name
    return plgpu.kernel(body, **kwargs)


@functools.partial(jax.jit, static_argnames=("st",))
def _flash_fwd_mgpu(q, k, v, segment_ids, st: _Static):
    plgpu = _plgpu()
    B, T, N, _ = q.shape
    num_q_tiles = st.num_q_tiles
    kwargs = {}
    if st.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kwargs["interpret"] = InterpretGPUParams()
    ctas = None
    grid, grid_names = launch_grid((num_q_tiles, "q_tile"), (B, "batch"), (N, "head"),
                                   head_major=st.block_sizes.head_major)
    if st.block_sizes.persistent:  # one CTA per SM, each taking tiles in turn
        # (lowered off a GPU, as the CPU tests do: an H100's)
        sms = INTERPRET_SMS if st.interpret else getattr(jax.devices()[0], "core_count",
                                                           GPU_SMS)
        ctas = min(sms, num_q_tiles * B * N)
        grid, grid_names = (ctas,), ("cta",)
    call = _kernel_call(
        plgpu,
        functools.partial(_flash_fwd_mgpu_kernel, st=st, num_q_tiles=num_q_tiles, ctas=ctas),
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
        grid=grid,
        grid_names=grid_names,
        num_threads=st.block_sizes.consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        name="flash_attention_fwd_mgpu",
        **kwargs,
    )
    return call(q, k, v, *(segment_ids or ()))


# ----------------------------------------------------------------------------- public wrapper


def _check_mask_options(q, k, segment_ids, window, softcap) -> None:
    """ValueError naming the field for malformed segment_ids, window or softcap."""
    B, T = q.shape[:2]
    S = k.shape[1]
    if segment_ids is not None:
        if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
            raise ValueError("segment_ids must be a pair (q_segment_ids [B, T], "
                             f"kv_segment_ids [B, S]) or None, got {segment_ids!r}")
        for name, ids, want in (("q_segment_ids", segment_ids[0], (B, T)),
                                ("kv_segment_ids", segment_ids[1], (B, S))):
            shape, dtype = getattr(ids, "shape", None), getattr(ids, "dtype", None)
            if shape != want:
                raise ValueError(f"segment_ids: {name} must have shape {want} (B, T or S of "
                                 f"{q.shape=}, {k.shape=}), got {name}.shape={shape}")
            if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
                raise ValueError(f"segment_ids: {name} must be integers, got "
                                 f"{name}.dtype={dtype}")
    check_scalar_options(softcap, None, window, window_name="window")


def check_supported(q, k, v, *, causal: bool, segment_ids=None, window=None, softcap=None,
                    block_sizes: MosaicBlockSizes | None = None,
                    require_device: bool = True) -> MosaicBlockSizes:
    """Raises (ValueError for malformed arguments, NotImplementedError for inputs this kernel
    does not take) before any GPU work; returns the block sizes the call will use."""
    check_arguments(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                    softcap=softcap)
    B, T, N, H = q.shape
    S = k.shape[1]
    if block_sizes is not None and not isinstance(block_sizes, MosaicBlockSizes):
        raise ValueError(f"block_sizes must be a MosaicBlockSizes or None, got {block_sizes!r}")

    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(
            f"the Mosaic GPU flash attention kernel takes bfloat16 or float16, got "
            f"{q.dtype}; use implementation='pallas'")
    if H not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"the Mosaic GPU flash attention kernel takes head_dim in {SUPPORTED_HEAD_DIMS}, "
            f"got {H}; use implementation='pallas'")
    bs = block_sizes or MosaicBlockSizes.default_for(
        q_len=T, kv_len=S, head_dim=H, causal=causal or window is not None,
        kv_bytes=kv_bytes(k, v), segments=segment_ids is not None)
    # Without turns a last query tile may end early, at a consumer's boundary; a last key
    # tile may overlap the one before it.
    # Mosaic's TMA copies of swizzled tiles take arrays of whole 8-row tiles.
    q_tile = bs.block_q if bs.pingpong else bs.rows
    if T % q_tile or S < bs.block_k or S % 8:
        raise NotImplementedError(
            f"the Mosaic GPU flash attention kernel needs T a multiple of {q_tile} (block_q="
            f"{bs.block_q}, {bs.consumers} consumers, pingpong={bs.pingpong}) and S a "
            f"multiple of 8 of at least block_k={bs.block_k}, got T={T}, S={S}; use "
            "implementation='pallas'")
    need = bs.smem_bytes(H, jnp.dtype(q.dtype).itemsize, segments=segment_ids is not None)
    if need > SMEM_BUDGET:
        raise ValueError(f"{bs} needs {need} bytes of shared memory at head_dim={H}, more "
                         f"than the {SMEM_BUDGET} this kernel allows itself; use fewer "
                         "num_stages or a smaller block_k")
    if require_device:
        require_hopper("the Mosaic GPU flash attention kernel", "use implementation='pallas'")
    return bs


def check_arguments(q, k, v, *, causal, segment_ids, window, softcap) -> None:
    """ValueError for malformed arguments of the Mosaic GPU kernels (forward and backward):
    shapes and dtypes of q [B, T, N, H], k, v [B, S, K, H], causal, the mask options."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-D array, got {name}.shape="
                             f"{getattr(x, 'shape', None)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape=} and {v.shape=}")
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    if k.shape[0] != B or k.shape[3] != H:
        raise ValueError(f"{q.shape=} and {k.shape=} disagree on the batch size or head_dim")
    if min(B, T, S, N, K, H) < 1 or N % K:
        raise ValueError(f"query heads must be a positive multiple of kv heads, got "
                         f"{q.shape=} and {k.shape=}")
    check_bool("causal", causal)
    _check_mask_options(q, k, segment_ids, window, softcap)


def require_hopper(kernel: str, fallback: str) -> None:
    """NotImplementedError unless the default device is a Hopper GPU (sm90: wgmma, TMA)."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if jax.default_backend() != "gpu" or str(capability) not in ("9.0", "9.0a"):
        raise NotImplementedError(
            f"{kernel} needs a Hopper GPU (sm90: wgmma, TMA), got backend "
            f"{jax.default_backend()!r}, device {device.device_kind!r} (compute capability "
            f"{capability}); {fallback}")


def flash_attention_mgpu(q, k, v, *, causal: bool, segment_ids=None,
                         window: tuple[int | None, int | None] | None = None,
                         softcap: float | None = None, scale: float | None = None,
                         block_sizes: MosaicBlockSizes | None = None,
                         interpret: bool = False, backward: str = "triton",
                         deterministic: bool = True):
    """FlashAttention forward on Hopper; returns (out [B, T, N, H], lse [B, N, T] float32).

    q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0 (query head n reads kv head n // G).
    bfloat16 or float16, H in (64, 128, 256), T % block_q == 0 and S % block_k == 0;
    other inputs raise NotImplementedError before any GPU work, malformed ones ValueError.
    causal: bottom-right aligned, query i sees keys j <= i + S - T.
    segment_ids: None or (q_segment_ids [B, T], kv_segment_ids [B, S]) integers; a query
        sees only keys of its own segment.
    window: None or (left, right), inclusive, each an int >= 0 or None (unbounded): query i
        sees keys i + S - T - left <= j <= i + S - T + right (and causal still applies).
    softcap: None or a float > 0: scores become softcap * tanh(scores / softcap) (Gemma 2),
        scores being scale * q.k.
    scale multiplies q.k (None: 1 / sqrt(H)). lse is the natural-log log-sum-exp; a row that
    sees no key gives 0 and lse -inf. V must be finite in the key tiles a query tile loads
    (masked keys are not zeroed before P V).
    block_sizes: speed only; None picks MosaicBlockSizes.default_for the shape.
    interpret: run in Mosaic GPU interpret mode on the CPU (slow; for debugging only). Each
        warpgroup runs as its own computation and they wait on each other, which can hang
        when XLA's CPU pool has fewer threads than a CTA has warpgroups (up to 5): set
        PJRT_NPROC=8 in the environment before jax starts (the tests do, tests/conftest.py).
    Differentiable in q, k, v (segment ids get no gradient), fed this forward's out and lse
    and the same masks. backward: "triton" (the Triton kernel's recomputing backward,
    `pallas_kernels.flash_attention.flash_attention_backward`) or "mosaic" (the Mosaic GPU
    backward, `pallas_kernels.flash_attention_mgpu_bwd`: head dims 64 / 128, T and S
    multiples of 128; checked here, before any work; measured in BENCHMARKS.md).
    deterministic: with backward="mosaic", False allows its fused kernel (dQ by f32 atomics:
    gradients not bitwise equal between runs; see flash_attention_mgpu_backward). The
    forward and the Triton backward are deterministic either way.
    """
    if backward not in ("triton", "mosaic"):
        raise ValueError(f"backward must be 'triton' or 'mosaic', got {backward!r}")
    check_bool("deterministic", deterministic)
    bs = check_supported(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                         softcap=softcap, block_sizes=block_sizes,
                         require_device=not interpret)
    if backward == "mosaic":
        _mosaic_backward().check_supported_backward(
            q, k, v, causal=causal, segment_ids=segment_ids, window=window, softcap=softcap,
            require_device=not interpret, deterministic=deterministic)
    H = q.shape[-1]
    softcap, scale, window = check_scalar_options(softcap, scale, window, window_name="window")
    st = _Static(causal=causal, window=window, softcap=softcap,
                 has_segments=segment_ids is not None,
                 scale=float(1.0 / math.sqrt(H) if scale is None else scale),
                 block_sizes=bs, q_len=q.shape[1], kv_len=k.shape[1], head_dim=H,
                 group=q.shape[2] // k.shape[2], interpret=interpret, backward=backward,
                 deterministic=deterministic)
    if segment_ids is not None:
        segment_ids = tuple(jnp.asarray(ids).astype(jnp.int32) for ids in segment_ids)
    return _flash_mgpu(q, k, v, segment_ids, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_mgpu(q, k, v, segment_ids, st: _Static):
    return _flash_fwd_mgpu(q, k, v, segment_ids, st)


def _flash_mgpu_vjp_fwd(q, k, v, segment_ids, st):
    out, lse = _flash_fwd_mgpu(q, k, v, segment_ids, st)
    return (out, lse), (q, k, v, segment_ids, out, lse)


def _flash_mgpu_vjp_bwd(st, residuals, cotangents):
    q, k, v, segment_ids, out, lse = residuals
    d_out, d_lse = cotangents
    if st.backward == "triton":
        backward = flash_attention_backward
    else:
        backward = functools.partial(_mosaic_backward().flash_attention_mgpu_backward,
                                     deterministic=st.deterministic)
    dq, dk, dv = backward(
        q, k, v, out, lse, d_out, d_lse, causal=st.causal, segment_ids=segment_ids,
        window=st.window, softcap=st.softcap, scale=st.scale, interpret=st.interpret)
    return dq, dk, dv, None  # integer segment ids: no cotangent


def _mosaic_backward():
    """The Mosaic GPU backward's module, imported when first used (it imports this one)."""
    from pallas_kernels import flash_attention_mgpu_bwd
    return flash_attention_mgpu_bwd


_flash_mgpu.defvjp(_flash_mgpu_vjp_fwd, _flash_mgpu_vjp_bwd)
