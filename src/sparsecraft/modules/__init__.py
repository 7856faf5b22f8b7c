"""Sparse modules that replace ``nn.Linear`` layers, and the one swap helper.

- ``SparseLinear``: a pruned weight held in a kernel layout (weight sparsity).
- ``ThresholdedLinear``: a transposed weight read column by column for inputs above a threshold (activation
  sparsity), optionally pruned too.
- ``swap_module_(model, fqn, new)``: every swap goes through it.
"""

from sparsecraft.modules.sparse_linear import (
    CSR_KERNEL_ONLY_SPARSITY,
    DENSE_MIN_TOKENS,
    SparseLinear,
    choose_decode_paths_,
    dense_min_tokens_for,
    sparsify_model_,
    use_dense_path,
)
from sparsecraft.modules.swap import swap_module_
from sparsecraft.modules.thresholded import Threshold, ThresholdedLinear, restore_linears_, swap_linears_

__all__ = [
    "CSR_KERNEL_ONLY_SPARSITY", "DENSE_MIN_TOKENS", "SparseLinear", "Threshold", "ThresholdedLinear",
    "choose_decode_paths_", "dense_min_tokens_for", "restore_linears_", "sparsify_model_", "swap_linears_", "swap_module_",
    "use_dense_path",
]
