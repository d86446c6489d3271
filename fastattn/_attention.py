"""`fastattn.attention`: argument validation and the implementation registry.

Every implementation computes the same function (see `attention`'s docstring); they differ in
speed and in the inputs they can take. A named implementation that cannot take the inputs
raises NotImplementedError; `implementation=None` picks the best one for the backend.

On a mesh (`fastattn.sharding.use_mesh` / `jax.set_mesh`), the Pallas kernels run per shard
under `shard_map`: XLA cannot partition a custom call, and each device holds its own batch rows
("data") and heads ("model"). The pure-JAX implementations are partitioned by XLA itself.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fastattn import sharding
from fastattn._xla_attention import xla_attention
from pallas_kernels._common import check_bool, check_scalar_options
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from pallas_kernels.flash_attention_mgpu import (
    check_supported,
    flash_attention_mgpu,
    require_hopper,
)
from pallas_kernels.flash_attention_mgpu_bwd import check_supported_backward

MAX_PALLAS_HEAD_DIM = 256
_PALLAS_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class _Call(NamedTuple):
    """A validated call, in the form every implementation takes."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None
    causal: bool
    window: tuple[int | None, int | None] | None
    softcap: float | None
    scale: float | None
    block_sizes: BlockSizes | None
    deterministic: bool


def _pallas(c: _Call):
    if c.q.shape[-1] > MAX_PALLAS_HEAD_DIM:
        raise NotImplementedError(
            f"implementation='pallas' takes head_dim <= {MAX_PALLAS_HEAD_DIM}, got "
            f"{c.q.shape[-1]}; use implementation='xla'")
    if not any(c.q.dtype == d for d in _PALLAS_DTYPES):
        raise NotImplementedError(
            f"implementation='pallas' takes bfloat16, float16 or float32, got {c.q.dtype}; "
            "use implementation='xla' or 'reference'")
    return flash_attention(
        c.q, c.k, c.v, c.q_segment_ids, c.kv_segment_ids, causal=c.causal, window=c.window,
        softcap=c.softcap, scale=c.scale, block_sizes=c.block_sizes,
        interpret=jax.default_backend() != "gpu")


def _refuse_unsupported(c: _Call, name: str) -> None:
    """NotImplementedError naming every option of `c` that implementation `name` (one without
    masks beyond causal, and without fastattn.BlockSizes) does not take."""
    used = [option for option, on in (("segment_ids", c.q_segment_ids is not None),
                                      ("sliding_window", c.window is not None),
                                      ("softcap", c.softcap is not None),
                                      ("block_sizes", c.block_sizes is not None)) if on]
    if used:
        raise NotImplementedError(f"implementation={name!r} does not take {', '.join(used)}; "
                                  "use implementation='pallas'")


def _pallas_mosaic(c: _Call, *, backward: str = "triton"):
    """The Hopper kernel (Mosaic GPU: wgmma, TMA, warp specialisation) forward, and the Triton
    kernel's recomputing backward ("pallas_mosaic") or the Mosaic GPU backward
    ("pallas_mosaic_bwd", the default on Hopper where measured faster); all take segment ids,
    sliding windows and softcap. Off a GPU they run in Mosaic GPU's interpret mode. Their
    tiles are chosen per shape, so a fastattn.BlockSizes (the Triton kernel's tiles) is
    refused."""
    name = "pallas_mosaic" if backward == "triton" else "pallas_mosaic_bwd"
    if c.block_sizes is not None:
        raise NotImplementedError(
            f"implementation={name!r} does not take block_sizes (a fastattn.BlockSizes "
            "sets the Triton kernel's tiles; this kernel picks its own per shape); use "
            "implementation='pallas'")
    segments = None if c.q_segment_ids is None else (c.q_segment_ids, c.kv_segment_ids)
    # Raises NotImplementedError for dtypes, head dims and lengths the kernel does not take.
    return flash_attention_mgpu(c.q, c.k, c.v, causal=c.causal, segment_ids=segments,
                                window=c.window, softcap=c.softcap, scale=c.scale,
                                interpret=jax.default_backend() != "gpu", backward=backward,
                                deterministic=c.deterministic)


def _cudnn(c: _Call):
    """cuDNN's fused attention through `jax.nn.dot_product_attention` (the peer the benchmarks
    measure), for runs that want it inside a model. cuDNN aligns causal masks top-left, takes
    no segment ids or softcap here, and returns no lse: those raise (bf16 / f16 only)."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError(
            f"implementation='cudnn' needs an NVIDIA GPU (backend {jax.default_backend()!r}); "
            "use implementation='xla'")
    _refuse_unsupported(c, "cudnn")
    if c.causal and c.q.shape[1] != c.k.shape[1]:
        raise NotImplementedError(
            f"implementation='cudnn' aligns a causal mask top-left, ours is bottom-right; they "
            f"agree only when T == S (got T={c.q.shape[1]}, S={c.k.shape[1]}); use "
            "implementation='pallas'")
    if not any(c.q.dtype == d for d in (jnp.bfloat16, jnp.float16)):
        raise NotImplementedError(
            f"implementation='cudnn' takes bfloat16 or float16, got {c.q.dtype}; use "
            "implementation='pallas'")
    out = jax.nn.dot_product_attention(c.q, c.k, c.v, scale=c.scale, is_causal=c.causal,
                                       implementation="cudnn")
    return out, None  # no lse: `attention` refuses return_lse for it before any work


def _xla(c: _Call):
    left, right = c.window if c.window is not None else (None, None)
    return xla_attention(
        c.q, c.k, c.v, q_segment_ids=c.q_segment_ids, kv_segment_ids=c.kv_segment_ids,
        causal=c.causal, window_left=left, window_right=right, softcap=c.softcap, scale=c.scale)


def _reference(c: _Call):
    return flash_attention_reference(
        c.q, c.k, c.v, c.q_segment_ids, c.kv_segment_ids, causal=c.causal, window=c.window,
        softcap=c.softcap, scale=c.scale)


IMPLEMENTATIONS: dict[str, Callable[[_Call], tuple[jax.Array, jax.Array]]] = {
    "pallas": _pallas,
    "pallas_mosaic": _pallas_mosaic,
    "pallas_mosaic_bwd": functools.partial(_pallas_mosaic, backward="mosaic"),
    "xla": _xla,
    "reference": _reference,
    "cudnn": _cudnn,
}
# Implementations that compute no lse (return_lse=True raises for them).
_NO_LSE = frozenset({"cudnn"})
# Opaque to XLA's partitioner: run per shard on a mesh.
_KERNELS = frozenset({"pallas", "pallas_mosaic", "pallas_mosaic_bwd"})


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _on_hopper() -> bool:
    try:
        require_hopper("", "")
    except NotImplementedError:
        return False
    return True


# Where the Hopper pair (Mosaic forward + backward) measured ahead of the Triton pair on an
# H100 (BENCHMARKS.md): causal rows at H = 128 (1.06-1.17x forward + backward, session 6) and
# at H = 64 (the 0.85B train step, T = 2048: 176.5 vs 181.5 ms), and, since the head-major
# launch order (session 10), rows without a mask too: forward 527 vs 410 TFLOP/s at b16 s1024
# h16 d128, 412 vs 386 at b4 s4096 h32 d64; backward 393 vs 314 and 347 vs 310. Packed rows
# (segment ids) stay on Triton: they are unmeasured with the Mosaic backward, which masks every
# tile where the Triton kernels skip whole tiles across documents.
_MOSAIC_HEAD_DIMS = (64, 128)


def default_implementation(q: jax.Array, k: jax.Array | None = None, *, causal: bool = False,
                           segment_ids=None, sliding_window=None, softcap=None) -> str:
    """The fastest implementation measured for these inputs on this backend:

        Hopper GPU, no segment ids, H = 64 or 128, and inputs both Mosaic kernels take
            (bf16 / f16, tile-multiple lengths)                      -> "pallas_mosaic_bwd"
        other GPU cases the Triton kernel takes                      -> "pallas"
        elsewhere (CPU: the kernels would run in the interpreter)    -> "xla"

    Called with q alone (no k), it answers for the Triton / XLA choice only."""
    H = q.shape[-1]
    pallas_ok = H <= MAX_PALLAS_HEAD_DIM and any(q.dtype == d for d in _PALLAS_DTYPES)
    if not (_on_gpu() and pallas_ok):
        return "xla"
    if k is None or segment_ids is not None or H not in _MOSAIC_HEAD_DIMS or not _on_hopper():
        return "pallas"
    window = None if sliding_window is None else tuple(sliding_window)
    try:  # both kernels must take the inputs (dtype, tile-multiple lengths)
        for check in (check_supported, check_supported_backward):
            check(q, k, k, causal=causal, window=window, softcap=softcap,
                  require_device=False)  # _on_hopper() said so
    except (NotImplementedError, ValueError):
        return "pallas"
    return "pallas_mosaic_bwd"


def attention(q, k, v, *, causal=False, segment_ids=None, sliding_window=None, softcap=None,
              scale=None, return_lse=False, implementation=None, block_sizes=None,
              deterministic=True):
    """Multi-head attention  softmax(q k^T * scale) v  with GQA/MQA and masks.

    Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0. Query head n reads kv head
    n // (N // K) (GQA; K = 1 is MQA). Any T, S >= 1.

    causal: bottom-right aligned, as FlashAttention >= 2.1: query i sees keys j <= i + S - T.
        With T = 2, S = 4:      keys 0 1 2 3
                        query 0      x x x .
                        query 1      x x x x
    segment_ids: (q_segment_ids [B, T], kv_segment_ids [B, S]) integers; a query attends only
        to keys of its own segment (packed sequences).
    sliding_window: (left, right), inclusive, each an int >= 0 or None (unbounded): query i
        sees keys  i + S - T - left <= j <= i + S - T + right.
    softcap: scores become softcap * tanh(scores / softcap) (Gemma 2), applied after `scale`.
    scale: multiplies q.k; None means 1 / sqrt(H).
    return_lse: also return lse [B, N, T] float32, the natural-log log-sum-exp of each row.
    implementation: None (the fastest measured for the inputs on this backend:
        `default_implementation`), "pallas", "pallas_mosaic" (Hopper forward,
        Triton backward), "pallas_mosaic_bwd" (Hopper forward and backward), "xla" (chunked,
        memory-efficient pure JAX), "reference" (naive, for tests), "cudnn" (cuDNN through
        jax.nn.dot_product_attention: GPU, bf16/f16, no segment ids / window / softcap / lse,
        causal only with T == S).
    block_sizes: tiles of the Pallas kernels (speed only); None picks them per shape.
    deterministic: True (default): repeated runs give bitwise-equal outputs and gradients.
        False allows a faster backward that is not: the Hopper backward's fused kernel (dQ
        summed by f32 atomics, 5 matrix products per tile pair instead of 7) on the shapes
        where it measured faster (MosaicBackwardBlockSizes.default_for: up to 1.2x at H = 64
        when K/V overflow the L2); the other implementations stay deterministic. cuDNN's
        backward (implementation="cudnn") is not deterministic as JAX runs it unless
        XLA_FLAGS sets --xla_gpu_deterministic_ops=true (BENCHMARKS.md, session 13).

    A row that sees no key returns 0 (never NaN) and its lse is -inf. Differentiable in q, k, v.
    Returns out [B, T, N, H] in q's dtype (and lse when asked).

    Under a mesh (`fastattn.sharding.use_mesh`), Pallas kernels run per shard: heads split
    over "model" (which must divide K, else ValueError), batch rows over "data" when it
    divides B (otherwise every data replica computes the whole batch).
    """
    call = _validate(q, k, v, causal, segment_ids, sliding_window, softcap, scale,
                     implementation, block_sizes, deterministic)
    name = implementation
    if name is None:
        segments = None if call.q_segment_ids is None else (call.q_segment_ids,
                                                             call.kv_segment_ids)
        name = default_implementation(q, k, causal=causal, segment_ids=segments,
                                      sliding_window=call.window, softcap=call.softcap)
        if name == "pallas_mosaic_bwd" and call.block_sizes is not None:
            name = "pallas"  # a fastattn.BlockSizes sets the Triton kernel's tiles
    if return_lse and name in _NO_LSE:
        raise NotImplementedError(f"implementation={name!r} returns no lse; use "
                                  "implementation='pallas' or 'xla' with return_lse=True")
    if name in _KERNELS:
        out, lse = _per_shard(IMPLEMENTATIONS[name], call)
    else:
        out, lse = IMPLEMENTATIONS[name](call)
    return (out, lse) if return_lse else out


def _per_shard(impl, c: _Call):
    """impl(c) on each device's batch rows and heads of the active mesh (impl(c) without one).
    Query heads [i N/m, (i+1) N/m) and kv heads [i K/m, (i+1) K/m) land on the same shard, so
    GQA groups stay whole."""
    mesh = sharding.active_mesh()
    if mesh is None:
        return impl(c)
    b, h = sharding.attention_axes(mesh, batch=c.q.shape[0], kv_heads=c.k.shape[2])
    if b is None and h is None:
        return impl(c)
    heads, rows, lse = P(b, None, h, None), P(b, None), P(b, h, None)
    segments = () if c.q_segment_ids is None else (c.q_segment_ids, c.kv_segment_ids)

    def local(q, k, v, *segments):
        q_seg, kv_seg = segments if segments else (None, None)
        return impl(c._replace(q=q, k=k, v=v, q_segment_ids=q_seg, kv_segment_ids=kv_seg))

    return sharding.per_shard(local, (c.q, c.k, c.v, *segments),
                              (heads, heads, heads) + (rows,) * len(segments), (heads, lse),
                              mesh=mesh)


def _validate(q, k, v, causal, segment_ids, sliding_window, softcap, scale, implementation,
              block_sizes, deterministic) -> _Call:
    """Checks every argument before any work starts; ValueError names the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-D array, got {name}.shape="
                             f"{getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    B, T, N, H = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape=} and {v.shape=}")
    _, S, K, Hk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"{q.shape=} and {k.shape=} disagree on the batch size")
    if Hk != H:
        raise ValueError(f"{q.shape=} and {k.shape=} disagree on head_dim")
    if min(T, S, N, K, H) < 1:
        raise ValueError(f"every dimension must be >= 1, got {q.shape=} and {k.shape=}")
    if N % K:
        raise ValueError(f"query heads must be a multiple of kv heads, got N={N} and K={K} "
                         f"({q.shape=}, {k.shape=})")
    check_bool("causal", causal)
    check_bool("deterministic", deterministic)

    q_seg = kv_seg = None
    if segment_ids is not None:
        if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
            raise ValueError("segment_ids must be a pair (q_segment_ids [B, T], "
                             f"kv_segment_ids [B, S]), got {type(segment_ids).__name__}")
        q_seg, kv_seg = segment_ids
        for name, ids, want in (("q_segment_ids", q_seg, (B, T)), ("kv_segment_ids", kv_seg, (B, S))):
            if getattr(ids, "shape", None) != want:
                raise ValueError(f"segment_ids: {name} must have shape {want}, got "
                                 f"{getattr(ids, 'shape', None)}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"segment_ids: {name} must be integers, got dtype {ids.dtype}")
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)

    softcap, scale, window = check_scalar_options(softcap, scale, sliding_window)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {sorted(IMPLEMENTATIONS)}, "
                         f"got {implementation!r}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {block_sizes!r}")
    return _Call(q, k, v, q_seg, kv_seg, causal, window, softcap, scale, block_sizes,
                 deterministic)
