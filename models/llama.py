"""The Llama family as pure-functional Flax (linen) modules: Llama 2/3 (RoPE with optional
llama3 frequency scaling, GQA, SwiGLU, RMSNorm), Mistral (sliding window) and Qwen2 (qkv
bias, tied embeddings) are configurations of the same modules.

    tokens [B, T] -> embed [B, T, D] -> L x (x + attn(norm(x)); x + mlp(norm(x))) -> norm
                  -> logits [B, T, V]

Attention goes through `fastattn.attention` (our kernels on a GPU). Parameter names follow
Hugging Face's (q_proj, gate_proj, input_layernorm, ...) so that `models.hf.load_hf` maps a
checkpoint one tensor to one parameter.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import fastattn
from pallas_kernels._common import check_bool
from pallas_kernels.fused_rmsnorm import add_rmsnorm
from pallas_kernels.fused_swiglu import swiglu
from pallas_kernels.rope_kv_write import rope_write_kv


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fusion:
    """Which fused Pallas kernels (issue 8; experiments/bench_fused.py, BENCHMARKS.md) the
    model runs instead of XLA's fusion of the plain jnp ops. Each changes speed and memory,
    not the math: every kernel is tested against its plain version.

    add_rmsnorm: each residual add with the RMSNorm after it (pallas_kernels.fused_rmsnorm).
    swiglu: silu(x @ W_gate) * (x @ W_up) as one matmul kernel (pallas_kernels.fused_swiglu).
    rope_write_kv: the engine step's RoPE on q and k inside the paged KV write
        (pallas_kernels.rope_kv_write).
    """

    add_rmsnorm: bool = False
    swiglu: bool = False
    rope_write_kv: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder. Frozen; derive variants with
    dataclasses.replace."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    sliding_window: int | None = None  # Mistral: each token sees this many previous ones
    max_position_embeddings: int = 4096
    dtype: str = "float32"  # compute dtype; parameters keep theirs
    attention_implementation: str | None = None  # fastattn.attention's `implementation`
    # fastattn.attention's `deterministic`: False allows a faster, not bitwise
    # deterministic attention backward where one measured faster (the Hopper fused kernel).
    deterministic_attention: bool = True
    fusion: Fusion = Fusion()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        check_bool("LlamaConfig.deterministic_attention", self.deterministic_attention)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def attention_in_use(self, seq_len: int, *, packed: bool = False) -> str:
        """The fastattn implementation this model's attention runs over seq_len tokens on this
        backend (attention_implementation, or what implementation=None picks; packed: with
        segment ids)."""
        if self.attention_implementation is not None:
            return self.attention_implementation
        q = jax.ShapeDtypeStruct((1, seq_len, self.num_heads, self.head_size), self.dtype)
        k = jax.ShapeDtypeStruct((1, seq_len, self.num_kv_heads, self.head_size), self.dtype)
        ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
        return fastattn.default_implementation(q, k, causal=True, sliding_window=window,
                                               segment_ids=(ids, ids) if packed else None)


TINY = LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=128, max_position_embeddings=512)
# The 0.85B model of shared/TARGETS.md.
LLAMA_0_85B = LlamaConfig(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                          num_kv_heads=8, intermediate_size=5632, dtype="bfloat16")
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, intermediate_size=14336, rope_theta=500000.0,
                        rope_scaling=RopeScaling(), max_position_embeddings=131072,
                        dtype="bfloat16")


def rope_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies [H / 2] of the rotary embedding, with llama3 scaling if set
    (long wavelengths divided by `factor`, short ones kept, a smooth ramp between)."""
    H = config.head_size
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    rs = config.rope_scaling
    if rs is None:
        return inv
    wavelength = 2 * math.pi / inv
    low = rs.original_max_position_embeddings / rs.low_freq_factor
    high = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelength - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * inv / rs.factor + smooth * inv
    return jnp.where(wavelength > low, inv / rs.factor, jnp.where(wavelength < high, inv, blended))


def apply_rope(x, positions, inv_freq):
    """Rotates x [B, T, heads, H] by positions [B, T] (HF's convention: the two halves of the
    head dim form the pairs)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """(RMSNorm(x + residual), x + residual); residual None: (RMSNorm(x), x). Statistics in
    f32, then cast to the compute dtype and scaled by the weight (HF's order)."""

    eps: float
    dtype: str
    fused: bool = False

    @nn.compact
    def __call__(self, x, residual=None):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        if self.fused:  # one pass: read both inputs once, write both outputs once
            return add_rmsnorm(x, residual, weight, eps=self.eps)
        summed = x if residual is None else x + residual
        x32 = summed.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * weight.astype(self.dtype), summed


class _Kernel(nn.Module):
    """The [D, F] kernel of a bias-free nn.Dense under the same name and initialiser, for
    code that runs the matmul itself (the fused SwiGLU): one parameter tree either way."""

    features: int

    @nn.compact
    def __call__(self, in_features: int):
        return self.param("kernel", nn.initializers.normal(0.02), (in_features, self.features))


def _dense(features, name, dtype, use_bias=False):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache=None, paged=None):
        """Full sequences (cache None), or one new token per row against a contiguous cache
        `cache = (k [B, S, K, H], v, lengths [B])`: the token's K/V are written at
        lengths[b] and it attends to keys 0..lengths[b] (split-KV decode kernel), or the
        engine's flattened ragged batch (x [1, T, D]) with `paged = (fastattn.RaggedBatch,
        (k_pages, v_pages) of this layer)`.
        Returns (output [B, T, D], this layer's (k, v) cache after the write, or the new
        tokens' (k, v) when cache is None)."""
        c = self.config
        B, T, _ = x.shape
        H, N, K = c.head_size, c.num_heads, c.num_kv_heads
        q = _dense(N * H, "q_proj", c.dtype, c.attention_bias)(x).reshape(B, T, N, H)
        k = _dense(K * H, "k_proj", c.dtype, c.attention_bias)(x).reshape(B, T, K, H)
        v = _dense(K * H, "v_proj", c.dtype, c.attention_bias)(x).reshape(B, T, K, H)
        inv_freq = rope_frequencies(c)
        fused_write = paged is not None and c.fusion.rope_write_kv
        if not fused_write:
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
        if paged is not None:
            batch, (k_pages, v_pages) = paged
            if fused_write:  # rotated keys go straight into their slots
                q_rot, k_pages, v_pages = rope_write_kv(
                    q[0], k[0], v[0], k_pages, v_pages, batch.slot_mapping, positions[0],
                    inv_freq)
                q = q_rot[None]
            else:
                k_pages, v_pages = fastattn.write_kv(k_pages, v_pages, k[0], v[0],
                                                     batch.slot_mapping)
            out = fastattn.ragged_paged_attention(
                q[0].astype(k_pages.dtype), k_pages, v_pages, batch.block_tables,
                batch.context_lens, batch.query_start, batch.num_seqs, sliding_window=window,
                max_q_len=batch.max_q_len)[None].astype(q.dtype)
            kv = (k_pages, v_pages)
        elif cache is None:
            out = fastattn.attention(
                q, k, v, causal=True, sliding_window=window,
                segment_ids=None if segment_ids is None else (segment_ids, segment_ids),
                implementation=c.attention_implementation,
                deterministic=c.deterministic_attention)
            kv = (k, v)
        else:
            k_cache, v_cache, lengths = cache
            rows = jnp.arange(B)
            k_cache = k_cache.at[rows, lengths].set(k[:, 0].astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[rows, lengths].set(v[:, 0].astype(v_cache.dtype), mode="drop")
            out = fastattn.decode_attention(q[:, 0], k_cache, v_cache, lengths + 1,
                                            sliding_window=window)[:, None]
            kv = (k_cache, v_cache)
        return _dense(c.hidden_size, "o_proj", c.dtype)(out.reshape(B, T, N * H)), kv


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        if c.fusion.swiglu:  # gate and up never leave the kernel
            w_gate = _Kernel(c.intermediate_size, name="gate_proj")(x.shape[-1])
            w_up = _Kernel(c.intermediate_size, name="up_proj")(x.shape[-1])
            h = swiglu(x.astype(c.dtype), w_gate.astype(c.dtype), w_up.astype(c.dtype))
        else:
            gate = _dense(c.intermediate_size, "gate_proj", c.dtype)(x)
            up = _dense(c.intermediate_size, "up_proj", c.dtype)(x)
            h = nn.silu(gate) * up
        return _dense(c.hidden_size, "down_proj", c.dtype)(h)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, delta, positions, segment_ids, cache=None, paged=None):
        """The residual stream is x + delta (delta: the previous layer's MLP output, not yet
        added, so that add and norm run as one kernel; None before the first layer).
        Returns (x, delta) for the next layer and this layer's kv."""
        c = self.config
        fused = c.fusion.add_rmsnorm
        h, x = RMSNorm(c.rms_norm_eps, c.dtype, fused, name="input_layernorm")(x, delta)
        attn, kv = Attention(c, name="self_attn")(h, positions, segment_ids, cache, paged)
        h, x = RMSNorm(c.rms_norm_eps, c.dtype, fused, name="post_attention_layernorm")(
            attn, x)
        return (x, MLP(c, name="mlp")(h)), kv


def _positions(tokens, positions):
    """positions [B, T], defaulting to 0 .. T - 1 in every row."""
    if positions is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return positions


class Llama(nn.Module):
    """logits [B, T, V] = Llama(config).apply(params, tokens [B, T]).

    positions [B, T] default to 0..T-1; segment_ids [B, T] (packed sequences) restrict
    attention to a token's own segment (pass positions that restart per segment too).

    Generation with a contiguous cache (fastattn.KVCache, lengths = tokens so far):
        logits, cache = model.apply(params, prompt, cache=cache, method=Llama.prefill)
        logits, cache = model.apply(params, next_tokens [B, 1], cache=cache,
                                    method=Llama.decode)
    """

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = [DecoderLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.fusion.add_rmsnorm)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, "lm_head", c.dtype)

    def _final_norm(self, stream):
        x, delta = stream
        return self.norm(x, delta)[0]  # RMSNorm(x + delta); delta None: RMSNorm(x)

    def _logits(self, stream):
        x = self._final_norm(stream)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(x)
        return self.lm_head(x)

    def _layers(self, tokens, positions, segment_ids, cache):
        stream = (self.embed_tokens(tokens).astype(self.config.dtype), None)
        new_kv = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.lengths)
            stream, kv = layer(*stream, positions, segment_ids, layer_cache)
            new_kv.append(kv)
        return stream, new_kv

    def _run(self, tokens, positions, segment_ids, cache):
        stream, new_kv = self._layers(tokens, positions, segment_ids, cache)
        return self._logits(stream), new_kv

    def lm_head_inputs(self, tokens, positions=None, segment_ids=None):
        """(hidden [B, T, D] after the final norm, the LM head's weight in the compute dtype,
        its layout "DV" or "VD" (tied embedding)): what `fastattn.linear_cross_entropy` needs
        to compute the loss without materialising the [B, T, V] logits."""
        stream, _ = self._layers(tokens, _positions(tokens, positions), segment_ids, None)
        hidden = self._final_norm(stream)
        dtype = self.config.dtype
        if self.config.tie_word_embeddings:
            return hidden, self.embed_tokens.embedding.astype(dtype), "VD"
        return hidden, self.lm_head.variables["params"]["kernel"].astype(dtype), "DV"

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self._run(tokens, _positions(tokens, positions), segment_ids, None)[0]

    def prefill(self, tokens, cache):
        """Runs prompts [B, T] (all of length T) on an empty cache; returns (logits [B, T, V],
        the cache holding their K/V with lengths = T)."""
        T = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
        logits, new_kv = self._run(tokens, positions, None, None)
        k = jnp.stack([kv[0] for kv in new_kv]).astype(cache.k.dtype)  # [L, B, T, K, H]
        v = jnp.stack([kv[1] for kv in new_kv]).astype(cache.v.dtype)
        cache = cache.replace(k=cache.k.at[:, :, :T].set(k), v=cache.v.at[:, :, :T].set(v),
                              lengths=jnp.full_like(cache.lengths, T))
        return logits, cache

    def paged_step(self, batch, kv_pages):
        """The engine's step: batch is a `fastattn.RaggedBatch` (T flattened rows of new
        tokens), kv_pages a list of (k_pages, v_pages) [K, P, page_size, H] per layer (one
        array per layer, so each is updated in place when donated). Writes every row's K/V
        into its slot, attends over the pages, and returns (logits [S, V] of each sequence's
        `logits_rows` row, the updated kv_pages)."""
        stream = (self.embed_tokens(batch.tokens[None]).astype(self.config.dtype), None)
        positions = batch.positions[None]  # [1, T]
        new_pages = []
        for layer, pages in zip(self.layers, kv_pages, strict=True):
            stream, kv = layer(*stream, positions, None, None, (batch, pages))
            new_pages.append(kv)
        x, delta = stream  # [1, T, D] each; only each sequence's logits row goes on
        return self._logits((x[0, batch.logits_rows], delta[0, batch.logits_rows])), new_pages

    def decode(self, tokens, cache):
        """One new token per row, tokens [B, 1] at positions cache.lengths; returns
        (logits [B, 1, V], the cache with the token's K/V appended)."""
        positions = cache.lengths[:, None]
        logits, new_kv = self._run(tokens, positions, None, cache)
        cache = cache.replace(k=jnp.stack([kv[0] for kv in new_kv]),
                              v=jnp.stack([kv[1] for kv in new_kv]),
                              lengths=cache.lengths + 1)
        return logits, cache


def train_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward = 3 x forward) of a causal
    sequence of `seq_len`: 6 x the matmul parameters (projections, MLP, LM head; the embedding
    lookup is no matmul) plus attention's QK^T and PV, counted causally (each query sees on
    average (seq_len + 1) / 2 keys)."""
    c = config
    H, N, K, D, F = c.head_size, c.num_heads, c.num_kv_heads, c.hidden_size, c.intermediate_size
    per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F
    matmul_params = c.num_layers * per_layer + D * c.vocab_size
    attention = c.num_layers * 2 * 2 * N * H * (seq_len + 1) / 2  # forward: 2 matmuls
    return 6.0 * matmul_params + 3.0 * attention
