"""FlashAttention forward pass for Hopper (sm90), written with Pallas Mosaic GPU.

Same contract as the Triton-backend kernel in `flash_attention.py`, for the subset of inputs
this kernel takes (anything else raises NotImplementedError before any GPU work):

    q [B, T, N, H]   k, v [B, S, K, H]   N % K == 0, query head n reads kv head n // G, G = N // K
    dtype bfloat16 or float16; H in (64, 128, 256); T a multiple of block_q, S of block_k.
    returns out [B, T, N, H] (q's dtype) and lse [B, N, T] float32, natural log.

Causal masking is bottom-right aligned (FlashAttention >= 2.1): query i sits at absolute
position i + (S - T) and sees keys j <= i + S - T. With T = 3, S = 5:

         keys j:  0 1 2 3 4
    query 0       x x x . .
    query 1       x x x x .
    query 2       x x x x x

When T > S the first T - S rows see no key: they return 0 and lse = -inf.

Structure of one CTA (FlashAttention-3, Shah et al. 2024, sections 3.1-3.2):

    grid (T / block_q, B, N); head is the fastest axis, so the G query heads that share a kv
    head run side by side and read the same K/V tiles from L2. Causal grids launch the
    bottom query tiles (the longest rows) first so that they do not end up as a tail.

    warpgroup 2, producer  (few registers: setmaxnreg down)
        TMA K_t, V_t -> stage t % num_stages, completion on k_ready / v_ready[stage];
        before reusing a stage it waits until every consumer that read it released it.
    warpgroups 0 and 1, consumers  (setmaxnreg up), each owns block_q / 2 query rows:
        Q tile -> SMEM once (TMA), then per key tile j
          [ S_j = Q K_j^T  and  O += P_{j-1} V_{j-1} ]   two wgmmas issued back to back
          softmax_j on S_j (f32, exp2)  ->  P_j in registers (the A operand of the next PV)
        Pingpong: the bracketed GEMMs of the two consumers alternate through a pair of
        "turn" barriers, so one warpgroup's softmax runs while the other's GEMMs keep the
        tensor cores busy (FA-3 section 3.1).

    shared memory: Q/O [2, block_q/2, H], K and V [num_stages, block_k, H] (128-byte
        swizzle, the layout wgmma reads), lse [2, block_q/2] f32.

Causal block skipping: a consumer visits only the key tiles its rows can see; the tiles wholly
below the diagonal run without any mask arithmetic, only the diagonal tiles build one. The
producer loads the union (the lower consumer's tiles); consumer 0, which finishes first, keeps
passing the turn to consumer 1 until that one is done.

Online softmax (FA-2, Dao 2023, Alg. 1) in the log2 domain: scores are scaled by
scale * log2(e) and exponentiated with exp2; the running max m is kept in that domain, so
lse = m ln 2 + ln l.

Mosaic GPU's Pallas API is young and changes between JAX releases; the few calls whose
spelling moved are resolved by feature detection in `_kernel_call`, never by version strings.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import flash_attention_backward

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

NUM_CONSUMERS = 2  # consumer warpgroups per CTA; warpgroup NUM_CONSUMERS is the producer
WGMMA_M = 64  # rows of one wgmma instruction: a consumer owns a multiple of this
SUPPORTED_HEAD_DIMS = (64, 128, 256)
# Hopper: 227 KiB of shared memory per block. Keep some room for the barriers and the
# compiler's own cross-warp reduction scratch.
SMEM_BUDGET = 227 * 1024 - 4 * 1024


def _plgpu():
    """jax.experimental.pallas.mosaic_gpu, imported only when a kernel is built."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicBlockSizes:
    """Tiles, pipeline depth and register split of the Hopper forward kernel.
    Changes speed, never numbers.

    block_q: query rows per CTA, split evenly over the two consumer warpgroups; each one's
        share (block_q / 2) is a multiple of 64, the M of one wgmma. 128 or 256.
    block_k: keys per pipeline stage: the N of S = Q K^T and the contraction of P V.
        A multiple of 64, at most 256 (one TMA box).
    num_stages: K/V stages in shared memory (>= 2), i.e. how many key tiles the producer
        may run ahead of the slower consumer.
    consumer_registers / producer_registers: per-thread register limits after setmaxnreg
        (multiples of 8 in [24, 256]); 2 consumers + 1 producer share the 64K registers of
        an SM, so 2 * consumer + producer <= 512. 240/24 (FA-3's split) measured 487 vs 457
        TFLOP/s for 232/40 at B4 T4096 N16 H128 causal on an H100, the same elsewhere
        (experiments/mgpu_check.py, one run each).
    """

    block_q: int = 128
    block_k: int = 128
    num_stages: int = 2
    consumer_registers: int = 240
    producer_registers: int = 24

    def __post_init__(self):
        if self.block_q not in (NUM_CONSUMERS * WGMMA_M, 2 * NUM_CONSUMERS * WGMMA_M):
            raise ValueError(f"MosaicBlockSizes.block_q={self.block_q} must be 128 or 256 "
                             "(two consumer warpgroups of 64 or 128 rows)")
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
        total = NUM_CONSUMERS * self.consumer_registers + self.producer_registers
        if total > 512:
            raise ValueError(
                f"MosaicBlockSizes: {NUM_CONSUMERS} x consumer_registers="
                f"{self.consumer_registers} + producer_registers={self.producer_registers} "
                f"= {total} exceeds the 512 registers per thread slot of an SM")

    @property
    def rows(self) -> int:
        """Query rows of one consumer warpgroup."""
        return self.block_q // NUM_CONSUMERS

    def smem_bytes(self, head_dim: int, itemsize: int) -> int:
        """Shared memory of one CTA: Q/O tiles, K/V stages and the lse rows."""
        qo = self.block_q * head_dim * itemsize
        kv = 2 * self.num_stages * self.block_k * head_dim * itemsize
        return qo + kv + self.block_q * 4

    @classmethod
    def default_for(cls, *, q_len: int, kv_len: int, head_dim: int,
                    causal: bool) -> MosaicBlockSizes:
        """The per-shape rule. H <= 64: 128-key tiles, 4 stages; H = 128: 128-key tiles,
        2 stages (a third stage would not fit next to Q); H = 256: 64-key tiles so that O
        (128 registers per thread) and S still fit in a consumer's registers. block_k falls
        back to 64 when S is not a multiple of the preferred tile.

        At H = 128 on an H100 (experiments/mgpu_check.py, jax 0.11.2, one run each) 64-key
        tiles with 4 stages were 10-20% slower and block_q = 256 (128 rows per consumer)
        30-40% slower; H = 64 and 256 are not tuned yet."""
        del q_len, causal  # the same tiles serve both; kept for a uniform signature
        if head_dim <= 64:
            base = cls(block_k=128, num_stages=4)
        elif head_dim <= 128:
            base = cls(block_k=128, num_stages=2)
        else:
            base = cls(block_k=64, num_stages=2)
        if kv_len % base.block_k and kv_len % 64 == 0:
            # Half the tile, twice the stages: the same shared memory.
            base = dataclasses.replace(base, block_k=64, num_stages=2 * base.num_stages)
        return base


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a jit static argument)."""

    causal: bool
    scale: float
    block_sizes: MosaicBlockSizes
    q_len: int
    kv_len: int
    head_dim: int
    group: int  # G = N // K
    interpret: bool

    @property
    def offset(self) -> int:
        """S - T: query i sits at absolute position i + offset."""
        return self.kv_len - self.q_len

    @property
    def some_row_empty(self) -> bool:
        """Causal with T > S: the first T - S rows see no key at all."""
        return self.causal and self.offset < 0

    @property
    def num_kv_tiles(self) -> int:
        return self.kv_len // self.block_sizes.block_k


# ----------------------------------------------------------------------------- kernel


def _kv_tiles(q_start, st: _Static):
    """Key tiles that query rows [q_start, q_start + rows) visit: (n_tiles, n_unmasked).
    Tiles [0, n_unmasked) are seen in full by every row; [n_unmasked, n_tiles) straddle the
    causal diagonal. At least one tile, also for rows that see no key (they come out 0 with
    lse -inf through the masked path), so that every consumer runs the same protocol."""
    if not st.causal:
        return st.num_kv_tiles, st.num_kv_tiles
    bk = st.block_sizes.block_k
    # one past the last key the bottom row sees, and the last key the top row sees
    end = q_start + st.block_sizes.rows + st.offset
    top = q_start + st.offset
    n_tiles = jnp.clip(lax.div(jnp.maximum(end, 0) + (bk - 1), bk), 1, st.num_kv_tiles)
    n_unmasked = jnp.minimum(lax.div(jnp.maximum(top + 1, 0), bk), n_tiles)
    return n_tiles, n_unmasked


def _q_tile_index(st: _Static, num_q_tiles: int):
    tile = lax.axis_index("q_tile")
    # Causal: the bottom tiles have the most keys to visit; start them first.
    return num_q_tiles - 1 - tile if st.causal else tile


def _consumer(wg, q_ref, out_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_ready,
              k_ready, v_ready, k_free, v_free, turn, *, st: _Static, num_q_tiles: int):
    """One consumer warpgroup: rows [q_start, q_start + rows) of this CTA's query tile."""
    plgpu = _plgpu()
    bs = st.block_sizes
    rows, bk, depth = bs.rows, bs.block_k, bs.num_stages
    dtype = q_ref.dtype
    batch, head = lax.axis_index("batch"), lax.axis_index("head")
    other = 1 - wg
    q_start = _q_tile_index(st, num_q_tiles) * bs.block_q + wg * rows
    n_tiles, n_unmasked = _kv_tiles(q_start, st)
    q_tile = qo_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, rows), head], q_tile,
                            q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])

    def stage(j):
        return lax.rem(j, depth)

    def in_wgmma_layout(x, rows_of=False):
        """x in the register layout of a wgmma accumulator (or of its per-row reductions),
        so that values built here meet the wgmma results in the same layout. Interpret mode
        has no layouts."""
        if st.interpret:
            return x
        layout = plgpu.Layout.WGMMA.reduce(1) if rows_of else plgpu.Layout.WGMMA
        return plgpu.layout_cast(x, layout)

    def issue_qk(j, s_ref):
        """Issues S_j = Q K_j^T into s_ref; returns a function that awaits and reads it."""
        k_tile = k_smem.at[stage(j)]
        plgpu.barrier_wait(k_ready.at[stage(j)])
        if st.interpret:  # the interpreter (JAX 0.10) cannot transpose a wgmma operand
            s = lax.dot_general(q_tile[...], k_tile[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
            return lambda: s
        plgpu.wgmma(s_ref, q_tile, k_tile.transpose((1, 0)))  # a view: no data moves
        return lambda: s_ref[...]

    def accumulate_pv(j, acc, p, then):
        """acc + P V_j, once complete; `then()` runs as soon as the wgmma is issued. The
        wgmma accumulates into acc's registers in place (run_state)."""
        v_tile = v_smem.at[stage(j)]
        plgpu.barrier_wait(v_ready.at[stage(j)])
        if st.interpret:  # the interpreter (JAX 0.10) takes no register operand in a wgmma
            then()
            return acc + lax.dot_general(p, v_tile[...], (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

        def issue(o_ref):
            plgpu.wgmma(o_ref, p, v_tile)
            then()

        return pl.run_state(issue)(plgpu.ACC.init(acc))

    def gemms(j, acc, p_prev):
        """Tensor-core work of step j under this warpgroup's turn: S_j = Q K_j^T, and
        O += P_{j-1} V_{j-1} unless j is the first step. The turn passes to the other
        consumer as soon as both are issued, before they complete."""
        plgpu.barrier_wait(turn.at[wg])
        pass_turn = functools.partial(plgpu.barrier_arrive, turn.at[other])

        def with_scores(s_ref):
            read_scores = issue_qk(j, s_ref)
            if p_prev is None:
                pass_turn()
                return read_scores(), acc

            acc_new = accumulate_pv(j - 1, acc, p_prev, pass_turn)
            return read_scores(), acc_new

        s, acc = pl.run_scoped(with_scores, plgpu.ACC((rows, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[wg * depth + stage(j)])
        if p_prev is not None:
            plgpu.barrier_arrive(v_free.at[wg * depth + stage(j - 1)])
        return s, acc

    def softmax(j, s, acc, m, l, *, masked: bool):
        """Folds scores s [rows, bk] of key tile j into (acc, m, l); returns P_j in q's
        dtype for the next PV product (FA-2 Alg. 1 lines 8-10, log2 domain)."""
        c = st.scale * LOG2E
        if masked:
            r = in_wgmma_layout(lax.broadcasted_iota(jnp.int32, (rows, bk), 0))
            k = in_wgmma_layout(lax.broadcasted_iota(jnp.int32, (rows, bk), 1))
            # key j*bk + k visible to query q_start + r  <=>  k - r <= q_start + off - j*bk
            s = jnp.where(k - r <= q_start + st.offset - j * bk, s, -jnp.inf)
        if c > 0:  # max before scaling: one multiply per row instead of per score
            m_new = jnp.maximum(m, s.max(axis=1) * c)
        else:
            s = s * c
            c = 1.0
            m_new = jnp.maximum(m, s.max(axis=1))
        # A row that has seen no key yet has m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if st.some_row_empty else m_new
        alpha = jnp.exp2(m - m_shift)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_shift, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return acc, m_new, l, p.astype(dtype)

    def step(j, carry, *, masked):
        acc, m, l, p_prev = carry
        s, acc = gemms(j, acc, p_prev)
        return softmax(j, s, acc, m, l, masked=masked)

    acc = in_wgmma_layout(jnp.zeros((rows, st.head_dim), jnp.float32))
    m = in_wgmma_layout(jnp.full((rows,), -jnp.inf, jnp.float32), rows_of=True)
    l = in_wgmma_layout(jnp.zeros((rows,), jnp.float32), rows_of=True)

    # Step 0 has no PV product before it; it is masked whenever causal (harmless on a tile
    # that every row sees in full, and it saves a second copy of the step).
    s, acc = gemms(0, acc, None)
    carry = softmax(0, s, acc, m, l, masked=st.causal)
    first_masked = jnp.maximum(n_unmasked, 1) if st.causal else n_tiles
    carry = lax.fori_loop(1, first_masked, functools.partial(step, masked=False), carry)
    if st.causal:
        carry = lax.fori_loop(first_masked, n_tiles, functools.partial(step, masked=True),
                              carry)
    acc, m, l, p_last = carry

    # Steps that the last consumer (the lowest rows) visits beyond this one's n_tiles.
    n_tiles_last = (_kv_tiles(q_start + (NUM_CONSUMERS - 1 - wg) * rows, st)[0]
                    if st.causal else n_tiles)

    def observe_ready(ready, j):
        """Waits for the load of step j that only the other consumer reads. Each turn
        handed to it is preceded by such a wait for the data that turn uses, so this
        consumer takes every phase of k_ready / v_ready in order and never falls a phase
        behind (the producer reloads a stage as soon as the other consumer is done)."""
        pl.when(j < n_tiles_last)(functools.partial(plgpu.barrier_wait, ready.at[stage(j)]))

    def hand_over_last():
        # Consumer 1 finishes last and keeps the turn, so that every turn handed over is
        # taken (which the interpreter checks).
        @pl.when(wg == 0)
        def _():
            if st.causal:
                observe_ready(k_ready, n_tiles)
            plgpu.barrier_arrive(turn.at[other])

    # The last PV product, alone under the turn.
    plgpu.barrier_wait(turn.at[wg])
    acc = accumulate_pv(n_tiles - 1, acc, p_last, hand_over_last)
    plgpu.barrier_arrive(v_free.at[wg * depth + stage(n_tiles - 1)])

    if st.causal:
        # Consumer 0 ran fewer steps than consumer 1 (it owns the upper rows): keep passing
        # the turn until consumer 1 is done, or consumer 1 would wait on it forever. Turn j
        # lets consumer 1 run S_{j+1} and O += P_j V_j.
        def pass_turn(j, carry):
            plgpu.barrier_wait(turn.at[wg])
            observe_ready(k_ready, j + 1)
            observe_ready(v_ready, j)
            plgpu.barrier_arrive(turn.at[other])
            return carry

        lax.fori_loop(n_tiles, n_tiles_last, pass_turn, None)

    if st.some_row_empty:
        seen = l > 0
        l = jnp.where(seen, l, 1.0)
    out = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
    lse = m * LN2 + jnp.log(l)
    if st.some_row_empty:
        lse = jnp.where(seen, lse, -jnp.inf)
    q_tile[...] = out.astype(dtype)  # Q is dead: its tile stages O for the TMA store
    lse_smem.at[wg][...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, out_ref.at[batch, pl.ds(q_start, rows), head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_start, rows)])
    plgpu.wait_smem_to_gmem(0)


def _producer(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, *,
              st: _Static, num_q_tiles: int):
    """The producer warpgroup: streams the K/V tiles that either consumer needs through the
    num_stages-deep ring, K ahead of V (S = Q K^T comes first in every step)."""
    plgpu = _plgpu()
    bs = st.block_sizes
    bk, depth = bs.block_k, bs.num_stages
    batch, head = lax.axis_index("batch"), lax.axis_index("head")
    kv_head = lax.div(head, st.group)
    tile_start = _q_tile_index(st, num_q_tiles) * bs.block_q
    # consumer 0 owns the upper rows, so it visits a prefix of consumer 1's tiles
    n_tiles = [_kv_tiles(tile_start + wg * bs.rows, st)[0] for wg in range(NUM_CONSUMERS)]

    def load(t, src_ref, dst_smem, ready):
        s = lax.rem(t, depth)
        plgpu.copy_gmem_to_smem(src_ref.at[batch, pl.ds(t * bk, bk), kv_head], dst_smem.at[s],
                                ready.at[s])

    def await_release(t, free):
        """Waits until every consumer that read stage t % depth for step t - depth is done."""
        s, previous = lax.rem(t, depth), t - depth
        for wg in range(NUM_CONSUMERS):
            if st.causal and wg < NUM_CONSUMERS - 1:
                pl.when(previous < n_tiles[wg])(
                    functools.partial(plgpu.barrier_wait, free.at[wg * depth + s]))
            else:
                plgpu.barrier_wait(free.at[wg * depth + s])

    for t in range(min(depth, st.num_kv_tiles)):  # fill the ring
        def first_loads(t=t):
            load(t, k_ref, k_smem, k_ready)
            load(t, v_ref, v_smem, v_ready)
        if st.causal:
            pl.when(t < n_tiles[-1])(first_loads)
        else:
            first_loads()

    def refill(t, carry):
        await_release(t, k_free)
        load(t, k_ref, k_smem, k_ready)
        await_release(t, v_free)
        load(t, v_ref, v_smem, v_ready)
        return carry

    lax.fori_loop(depth, n_tiles[-1], refill, None)

    def drain(t, carry):
        await_release(t, k_free)
        await_release(t, v_free)
        return carry

    # Take the releases of the last stages too, as if refilling them: nothing waits on the
    # producer any more, and every barrier phase is then observed (the interpreter checks).
    first = jnp.maximum(n_tiles[-1], depth) if st.causal else max(n_tiles[-1], depth)
    lax.fori_loop(first, n_tiles[-1] + depth, drain, None)


def _flash_fwd_mgpu_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, *, st: _Static,
                           num_q_tiles: int):
    plgpu = _plgpu()
    bs = st.block_sizes
    dtype = q_ref.dtype
    swizzle = plgpu.find_swizzle(st.head_dim * jnp.dtype(dtype).itemsize * 8)
    # The layout wgmma and TMA agree on: 8-row tiles, `swizzle` bytes wide, XOR-swizzled.
    tiled = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
             plgpu.SwizzleTransform(swizzle))
    smem = {
        "qo_smem": plgpu.SMEM((NUM_CONSUMERS, bs.rows, st.head_dim), dtype, transforms=tiled),
        "k_smem": plgpu.SMEM((bs.num_stages, bs.block_k, st.head_dim), dtype, transforms=tiled),
        "v_smem": plgpu.SMEM((bs.num_stages, bs.block_k, st.head_dim), dtype, transforms=tiled),
        "lse_smem": plgpu.SMEM((NUM_CONSUMERS, bs.rows), jnp.float32),
        "q_ready": plgpu.Barrier(num_barriers=NUM_CONSUMERS),
        "k_ready": plgpu.Barrier(num_barriers=bs.num_stages),
        "v_ready": plgpu.Barrier(num_barriers=bs.num_stages),
        # [consumer * num_stages + stage], flat: interpret mode takes 1-D barrier arrays only
        "k_free": plgpu.Barrier(num_barriers=NUM_CONSUMERS * bs.num_stages),
        "v_free": plgpu.Barrier(num_barriers=NUM_CONSUMERS * bs.num_stages),
        "turn": plgpu.Barrier(num_barriers=NUM_CONSUMERS),
    }

    def body(*, qo_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready, k_free, v_free,
             turn):
        wg = lax.axis_index("wg")

        @pl.when(wg < NUM_CONSUMERS)
        def _():
            plgpu.set_max_registers(bs.consumer_registers, action="increase")
            # Consumer 0 takes the first turn: consumer 1 hands it over up front.
            pl.when(wg == 1)(functools.partial(plgpu.barrier_arrive, turn.at[0]))
            _consumer(wg, q_ref, out_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_ready,
                      k_ready, v_ready, k_free, v_free, turn, st=st, num_q_tiles=num_q_tiles)

        @pl.when(wg == NUM_CONSUMERS)
        def _():
            plgpu.set_max_registers(bs.producer_registers, action="decrease")
            _producer(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, st=st,
                      num_q_tiles=num_q_tiles)

    pl.run_scoped(body, collective_axes="wg", **smem)


def _kernel_call(plgpu, body, out_types, *, name, **kwargs):
    """plgpu.kernel(...), spelling the output-type and kernel-name arguments the way this
    JAX names them (feature detection; the name only labels profiles)."""
    params = inspect.signature(plgpu.kernel).parameters
    kwargs["out_type" if "out_type" in params else "out_shape"] = out_types
    if "kernel_name" in {f.name for f in dataclasses.fields(plgpu.Mesh)}:
        kwargs["kernel_name"] = name
    return plgpu.kernel(body, **kwargs)


@functools.partial(jax.jit, static_argnames=("st",))
def _flash_fwd_mgpu(q, k, v, st: _Static):
    plgpu = _plgpu()
    B, T, N, _ = q.shape
    num_q_tiles = T // st.block_sizes.block_q
    kwargs = {}
    if st.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kwargs["interpret"] = InterpretGPUParams()
    call = _kernel_call(
        plgpu,
        functools.partial(_flash_fwd_mgpu_kernel, st=st, num_q_tiles=num_q_tiles),
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
        grid=(num_q_tiles, B, N),
        grid_names=("q_tile", "batch", "head"),
        num_threads=NUM_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        name="flash_attention_fwd_mgpu",
        **kwargs,
    )
    return call(q, k, v)


# ----------------------------------------------------------------------------- public wrapper


def check_supported(q, k, v, *, causal: bool, block_sizes: MosaicBlockSizes | None = None,
                    require_device: bool = True) -> MosaicBlockSizes:
    """Raises (ValueError for malformed arguments, NotImplementedError for inputs this kernel
    does not take) before any GPU work; returns the block sizes the call will use."""
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
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got causal={causal!r}")
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
    bs = block_sizes or MosaicBlockSizes.default_for(q_len=T, kv_len=S, head_dim=H,
                                                     causal=causal)
    if T % bs.block_q or S % bs.block_k:
        raise NotImplementedError(
            f"the Mosaic GPU flash attention kernel needs T a multiple of block_q="
            f"{bs.block_q} and S a multiple of block_k={bs.block_k}, got T={T}, S={S} "
            "(no ragged tiles yet); use implementation='pallas'")
    need = bs.smem_bytes(H, jnp.dtype(q.dtype).itemsize)
    if need > SMEM_BUDGET:
        raise ValueError(f"{bs} needs {need} bytes of shared memory at head_dim={H}, more "
                         f"than the {SMEM_BUDGET} this kernel allows itself; use fewer "
                         "num_stages or a smaller block_k")
    if require_device:
        device = jax.devices()[0]
        capability = getattr(device, "compute_capability", None)
        if jax.default_backend() != "gpu" or str(capability) not in ("9.0", "9.0a"):
            raise NotImplementedError(
                "the Mosaic GPU flash attention kernel needs a Hopper GPU (sm90: wgmma, TMA), "
                f"got backend {jax.default_backend()!r}, device {device.device_kind!r} "
                f"(compute capability {capability}); use implementation='pallas'")
    return bs


def flash_attention_mgpu(q, k, v, *, causal: bool, scale: float | None = None,
                         block_sizes: MosaicBlockSizes | None = None,
                         interpret: bool = False):
    """FlashAttention forward on Hopper; returns (out [B, T, N, H], lse [B, N, T] float32).

    q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0 (query head n reads kv head n // G).
    bfloat16 or float16, H in (64, 128, 256), T % block_q == 0 and S % block_k == 0;
    other inputs raise NotImplementedError before any GPU work. causal is bottom-right
    aligned (query i sees keys j <= i + S - T); rows that see no key give 0 and lse -inf.
    scale multiplies q.k (None: 1 / sqrt(H)). lse is the natural-log log-sum-exp.
    block_sizes: speed only; None picks MosaicBlockSizes.default_for the shape.
    interpret: run in Mosaic GPU interpret mode on the CPU (slow; for debugging only).
    Differentiable: the backward is the Triton kernel's recomputing backward
    (`pallas_kernels.flash_attention.flash_attention_backward`), fed this forward's out and
    lse (a Mosaic GPU backward is not written yet).
    """
    bs = check_supported(q, k, v, causal=causal, block_sizes=block_sizes,
                         require_device=not interpret)
    H = q.shape[-1]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    st = _Static(causal=causal, scale=float(1.0 / math.sqrt(H) if scale is None else scale),
                 block_sizes=bs, q_len=q.shape[1], kv_len=k.shape[1], head_dim=H,
                 group=q.shape[2] // k.shape[2], interpret=interpret)
    return _flash_mgpu(q, k, v, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_mgpu(q, k, v, st: _Static):
    return _flash_fwd_mgpu(q, k, v, st)


def _flash_mgpu_vjp_fwd(q, k, v, st):
    out, lse = _flash_fwd_mgpu(q, k, v, st)
    return (out, lse), (q, k, v, out, lse)


def _flash_mgpu_vjp_bwd(st, residuals, cotangents):
    q, k, v, out, lse = residuals
    d_out, d_lse = cotangents
    return flash_attention_backward(q, k, v, out, lse, d_out, d_lse, causal=st.causal,
                                    scale=st.scale, interpret=st.interpret)


_flash_mgpu.defvjp(_flash_mgpu_vjp_fwd, _flash_mgpu_vjp_bwd)
