"""fastattn: fast attention kernels, training and serving for LLMs in JAX/Pallas."""

# Attention (the contract: DESIGN.md, "Public API")
from fastattn._attention import IMPLEMENTATIONS, attention, default_implementation
from pallas_kernels.flash_attention import BlockSizes

# Decoding (q_len = 1, split-KV)
from fastattn._decode import (
    DECODE_IMPLEMENTATIONS, decode_attention, paged_attention, ragged_paged_attention)
from pallas_kernels.decode_attention import DecodeBlockSizes
from pallas_kernels.paged_attention import RaggedBlockSizes, RaggedTile

# KV caches
from fastattn.kv_cache import KVCache, PagedKVCache, check_slot_mapping, write_kv, write_kv_donated
from fastattn.ragged_batch import RaggedBatch

# Serving: sampling, the page pool, the scheduler and the engine
from fastattn.block_manager import BlockManager, OutOfPagesError
from fastattn.engine import Completion, Engine, EngineConfig, Sample, TokenEvent
from fastattn.sampling import SamplingParams, SamplingTensors, sample

# Fused kernels (issue 8: each measured against XLA's own fusion, BENCHMARKS.md)
from fastattn._linear_cross_entropy import linear_cross_entropy
from pallas_kernels.fused_rmsnorm import add_rmsnorm
from pallas_kernels.fused_swiglu import swiglu
from pallas_kernels.rope_kv_write import rope_write_kv

# Parallelism: meshes ("data", "model"), Megatron-style parameter placement
from fastattn import sharding
from fastattn.sharding import make_mesh, shard_params, use_mesh

# Training: data, tokenizers, the loop, checkpoints
from fastattn.checkpoint import Checkpointer
from fastattn.data import Batch, PackedDataset, pack_documents
from fastattn.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from fastattn.training import (
    CheckpointConfig, OptimizerConfig, TrainConfig, TrainResult, TrainState, train)

__all__ = [
    "IMPLEMENTATIONS", "BlockSizes", "attention", "default_implementation",
    "DECODE_IMPLEMENTATIONS", "DecodeBlockSizes", "RaggedBlockSizes", "RaggedTile",
    "decode_attention", "paged_attention", "ragged_paged_attention",
    "KVCache", "PagedKVCache", "check_slot_mapping", "write_kv", "write_kv_donated",
    "RaggedBatch",
    "BlockManager", "OutOfPagesError", "Completion", "Engine", "EngineConfig", "Sample",
    "TokenEvent", "SamplingParams", "SamplingTensors", "sample",
    "linear_cross_entropy", "add_rmsnorm", "swiglu", "rope_write_kv",
    "sharding", "make_mesh", "shard_params", "use_mesh",
    "Checkpointer", "Batch", "PackedDataset", "pack_documents",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
    "CheckpointConfig", "OptimizerConfig", "TrainConfig", "TrainResult", "TrainState", "train",
]
__version__ = "0.1.0"
