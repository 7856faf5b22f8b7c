"""sparsecraft: neural-network sparsity for PyTorch and Hugging Face (public API re-exports only)."""

from sparsecraft.patterns import NM, Block, Unstructured, parse_pattern, topk_mask

__version__ = "0.1.0"

__all__ = ["NM", "Block", "Unstructured", "parse_pattern", "topk_mask", "__version__"]
