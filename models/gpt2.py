"""GPT-2 as a pure-functional Flax (linen) module: learned positions, pre-LayerNorm blocks,
GELU (tanh form, "gelu_new"), fused qkv projection, tied input/output embeddings.

    tokens [B, T] -> wte + wpe -> L x (x + attn(ln_1(x)); x + mlp(ln_2(x))) -> ln_f -> wte^T

Attention goes through `fastattn.attention`. Parameter names follow Hugging Face's
(c_attn, c_fc, ln_1, ...) so `models.hf.load_hf` maps a checkpoint one tensor to one parameter.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

import fastattn
from pallas_kernels._common import check_bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"
    attention_implementation: str | None = None
    deterministic_attention: bool = True  # fastattn.attention's `deterministic`

    def __post_init__(self):
        check_bool("GPT2Config.deterministic_attention", self.deterministic_attention)
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd={self.n_embd} must be a multiple of "
                             f"n_head={self.n_head}")

    @property
    def inner_size(self) -> int:
        return self.n_inner or 4 * self.n_embd


def _dense(features, name, dtype):
    return nn.Dense(features, dtype=dtype, name=name, kernel_init=nn.initializers.normal(0.02))


class GPT2Block(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, segment_ids):
        c = self.config
        B, T, D = x.shape
        N, H = c.n_head, D // c.n_head
        h = nn.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype, name="ln_1")(x)
        q, k, v = jnp.split(_dense(3 * D, "c_attn", c.dtype)(h), 3, axis=-1)
        out = fastattn.attention(
            q.reshape(B, T, N, H), k.reshape(B, T, N, H), v.reshape(B, T, N, H), causal=True,
            segment_ids=None if segment_ids is None else (segment_ids, segment_ids),
            implementation=c.attention_implementation, deterministic=c.deterministic_attention)
        x = x + _dense(D, "c_proj", c.dtype)(out.reshape(B, T, D))
        h = nn.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype, name="ln_2")(x)
        h = nn.gelu(_dense(c.inner_size, "c_fc", c.dtype)(h), approximate=True)
        return x + _dense(D, "mlp_c_proj", c.dtype)(h)


class GPT2(nn.Module):
    """logits [B, T, V] = GPT2(config).apply(params, tokens [B, T]); positions default to
    0..T-1 (pass them restarting per segment for packed sequences)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        c = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        wte = nn.Embed(c.vocab_size, c.n_embd, name="wte",
                       embedding_init=nn.initializers.normal(0.02))
        wpe = nn.Embed(c.n_positions, c.n_embd, name="wpe",
                       embedding_init=nn.initializers.normal(0.01))
        x = (wte(tokens) + wpe(positions)).astype(c.dtype)
        for i in range(c.n_layer):
            x = GPT2Block(c, name=f"h_{i}")(x, segment_ids)
        x = nn.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype, name="ln_f")(x)
        return wte.attend(x)
