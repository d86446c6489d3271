"""Hugging Face checkpoint import: a directory with config.json and safetensors (one file or
sharded with model.safetensors.index.json) into our modules and a flax variables dict.

Supported: the Llama family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) and
GPT-2 (GPT2LMHeadModel).
Every tensor is read and checked against the config before anything is returned, so a bad
checkpoint raises (naming the key) and never yields half-loaded parameters.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig, RopeScaling

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GPT2_FAMILY = ("GPT2LMHeadModel",)


def load_hf(path: str):
    """Returns (module, variables) with `logits = module.apply(variables, tokens [B, T])`.
    Computation runs in the checkpoint's dtype (f32 checkpoints give f32 logits)."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in LLAMA_FAMILY + GPT2_FAMILY:
        raise ValueError(f"config.json architectures[0]={arch!r} is not supported; "
                         f"supported: {', '.join(LLAMA_FAMILY + GPT2_FAMILY)}")
    tensors = _read_safetensors(path)
    dtype = str(next(iter(tensors.values())).dtype) if tensors else "float32"
    if arch in GPT2_FAMILY:
        config = _gpt2_config(hf, dtype)
        return GPT2(config), {"params": _gpt2_params(config, tensors)}
    config = _llama_config(hf, dtype)
    return Llama(config), {"params": _llama_params(config, tensors)}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _llama_config(hf: dict, dtype: str) -> LlamaConfig:
    # transformers >= 5 nests RoPE settings under "rope_parameters"; older ones use
    # "rope_theta" and "rope_scaling".
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"])
    elif rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ValueError(f"config.json rope type {rope.get('rope_type')!r} is not supported")
    is_qwen2 = hf["architectures"][0] == "Qwen2ForCausalLM"
    window = hf.get("sliding_window")  # Mistral: keys i - window + 1 .. i
    if is_qwen2 and not hf.get("use_sliding_window", False):  # Qwen2 carries it switched off
        window = None
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim"),
        rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", is_qwen2), sliding_window=window,
        max_position_embeddings=hf.get("max_position_embeddings", 4096), dtype=dtype)


def _taker(tensors: dict[str, np.ndarray]):
    """take(key, shape): the tensor, checked; a missing key or wrong shape raises naming it."""
    def take(key, shape):
        if key not in tensors:
            raise ValueError(f"checkpoint is missing tensor {key!r}")
        value = tensors[key]
        if value.shape != shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {value.shape}, but the "
                             f"config implies {shape}")
        return jnp.asarray(value)
    return take


def _gpt2_config(hf: dict, dtype: str) -> GPT2Config:
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        raise ValueError(f"config.json activation_function={hf['activation_function']!r} is "
                         "not supported (GPT-2 uses 'gelu_new')")
    return GPT2Config(vocab_size=hf["vocab_size"], n_positions=hf["n_positions"],
                      n_embd=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                      n_inner=hf.get("n_inner"),
                      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dtype=dtype)


def _gpt2_params(c: GPT2Config, tensors: dict[str, np.ndarray]) -> dict:
    take = _taker(tensors)
    D, F = c.n_embd, c.inner_size

    def conv1d(key, in_dim, out_dim):  # GPT-2's Conv1D stores [in, out], as flax does
        return {"kernel": take(f"{key}.weight", (in_dim, out_dim)),
                "bias": take(f"{key}.bias", (out_dim,))}

    def norm(key):
        return {"scale": take(f"{key}.weight", (D,)), "bias": take(f"{key}.bias", (D,))}

    params = {"wte": {"embedding": take("transformer.wte.weight", (c.vocab_size, D))},
              "wpe": {"embedding": take("transformer.wpe.weight", (c.n_positions, D))},
              "ln_f": norm("transformer.ln_f")}
    for i in range(c.n_layer):
        pre = f"transformer.h.{i}"
        params[f"h_{i}"] = {"ln_1": norm(f"{pre}.ln_1"), "ln_2": norm(f"{pre}.ln_2"),
                            "c_attn": conv1d(f"{pre}.attn.c_attn", D, 3 * D),
                            "c_proj": conv1d(f"{pre}.attn.c_proj", D, D),
                            "c_fc": conv1d(f"{pre}.mlp.c_fc", D, F),
                            "mlp_c_proj": conv1d(f"{pre}.mlp.c_proj", F, D)}
    return params


def _llama_params(c: LlamaConfig, tensors: dict[str, np.ndarray]) -> dict:
    H, N, K, D, F = c.head_size, c.num_heads, c.num_kv_heads, c.hidden_size, c.intermediate_size
    take = _taker(tensors)

    def dense(key, out_dim, in_dim, bias=False):  # torch Linear [out, in] -> flax kernel [in, out]
        p = {"kernel": take(f"{key}.weight", (out_dim, in_dim)).T}
        if bias:
            p["bias"] = take(f"{key}.bias", (out_dim,))
        return p

    params = {"embed_tokens": {"embedding": take("model.embed_tokens.weight", (c.vocab_size, D))},
              "norm": {"weight": take("model.norm.weight", (D,))}}
    for i in range(c.num_layers):
        pre = f"model.layers.{i}"
        params[f"layers_{i}"] = {
            "input_layernorm": {"weight": take(f"{pre}.input_layernorm.weight", (D,))},
            "post_attention_layernorm": {
                "weight": take(f"{pre}.post_attention_layernorm.weight", (D,))},
            "self_attn": {
                "q_proj": dense(f"{pre}.self_attn.q_proj", N * H, D, c.attention_bias),
                "k_proj": dense(f"{pre}.self_attn.k_proj", K * H, D, c.attention_bias),
                "v_proj": dense(f"{pre}.self_attn.v_proj", K * H, D, c.attention_bias),
                "o_proj": dense(f"{pre}.self_attn.o_proj", D, N * H),
            },
            "mlp": {"gate_proj": dense(f"{pre}.mlp.gate_proj", F, D),
                    "up_proj": dense(f"{pre}.mlp.up_proj", F, D),
                    "down_proj": dense(f"{pre}.mlp.down_proj", D, F)},
        }
    if not c.tie_word_embeddings:
        params["lm_head"] = dense("lm_head", c.vocab_size, D)
    return params
