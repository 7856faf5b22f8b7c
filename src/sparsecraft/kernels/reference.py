"""Plain-torch reference for every kernel: the parity target in tests and the fallback without the extension.

It never builds the dense weight: each kept weight contributes x[:, col] * value to y[:, row] (index_add in fp32),
so it checks the layout bookkeeping independently of the C++ code.
"""

from __future__ import annotations

import torch

from sparsecraft.kernels.layout import Layout, layout_coo


def sparse_linear_ref(layout: Layout, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, cols) -> (B, rows) in x's dtype; accumulates in fp32 like the kernels."""
    row, col, values = layout_coo(layout)
    prod = x.float()[:, col] * values.float()  # (B, nnz)
    out = torch.zeros(x.shape[0], layout.shape[0], dtype=torch.float32).index_add_(1, row, prod)  # (B, rows)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
