"""Flax (linen, pure-functional) transformer models that call fastattn's ops."""

from models.gpt2 import GPT2, GPT2Config
from models.hf import load_hf
from models.llama import (
    LLAMA3_8B, LLAMA_0_85B, TINY, Fusion, Llama, LlamaConfig, RopeScaling,
    train_flops_per_token)

__all__ = ["GPT2", "GPT2Config", "LLAMA3_8B", "LLAMA_0_85B", "TINY", "Fusion", "Llama",
           "LlamaConfig", "RopeScaling", "load_hf", "train_flops_per_token"]
