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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


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
    eps: float
    dtype: str

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed.astype(self.dtype) * weight.astype(self.dtype))


def _dense(features, name, dtype, use_bias=False):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c = self.config
        B, T, _ = x.shape
        H, N, K = c.head_size, c.num_heads, c.num_kv_heads
        q = _dense(N * H, "q_proj", c.dtype, c.attention_bias)(x).reshape(B, T, N, H)
        k = _dense(K * H, "k_proj", c.dtype, c.attention_bias)(x).reshape(B, T, K, H)
        v = _dense(K * H, "v_proj", c.dtype, c.attention_bias)(x).reshape(B, T, K, H)
        inv_freq = rope_frequencies(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
        out = fastattn.attention(
            q, k, v, causal=True, sliding_window=window,
            segment_ids=None if segment_ids is None else (segment_ids, segment_ids),
            implementation=c.attention_implementation)
        return _dense(c.hidden_size, "o_proj", c.dtype)(out.reshape(B, T, N * H))


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c.intermediate_size, "gate_proj", c.dtype)(x)
        up = _dense(c.intermediate_size, "up_proj", c.dtype)(x)
        return _dense(c.hidden_size, "down_proj", c.dtype)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, c.dtype, name="input_layernorm")(x)
        x = x + Attention(c, name="self_attn")(h, positions, segment_ids)
        h = RMSNorm(c.rms_norm_eps, c.dtype, name="post_attention_layernorm")(x)
        return x + MLP(c, name="mlp")(h)


class Llama(nn.Module):
    """logits [B, T, V] = Llama(config).apply(params, tokens [B, T]).

    positions [B, T] default to 0..T-1; segment_ids [B, T] (packed sequences) restrict
    attention to a token's own segment (pass positions that restart per segment too).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        c = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens",
                         embedding_init=nn.initializers.normal(0.02))
        x = embed(tokens).astype(c.dtype)
        for i in range(c.num_layers):
            x = DecoderLayer(c, name=f"layers_{i}")(x, positions, segment_ids)
        x = RMSNorm(c.rms_norm_eps, c.dtype, name="norm")(x)
        if c.tie_word_embeddings:
            return embed.attend(x)
        return _dense(c.vocab_size, "lm_head", c.dtype)(x)
