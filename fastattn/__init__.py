"""fastattn: fast attention kernels, training and serving for LLMs in JAX/Pallas."""

# Attention (the contract: DESIGN.md, "Public API")
from fastattn._attention import IMPLEMENTATIONS, attention, default_implementation
from pallas_kernels.flash_attention import BlockSizes

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "attention", "default_implementation"]
__version__ = "0.1.0"
