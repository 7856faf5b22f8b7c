"""CPU kernels for sparse x dense products, each with a plain-torch reference (see docs/kernels.md)."""

from __future__ import annotations

import torch

from sparsecraft.kernels.build import load_kernels
from sparsecraft.kernels.layout import (
    KERNEL_DTYPES,
    BitmaskLayout,
    CsrLayout,
    Layout,
    layout_to_dense,
    make_layout,
)
from sparsecraft.kernels.reference import sparse_linear_ref


_X_DTYPES = KERNEL_DTYPES + (torch.float16,)


def kernel_supported(layout: Layout, x: torch.Tensor) -> bool:
    """True when the compiled kernel can run this product (fp32/bf16 weights, float activations)."""
    return layout.values.dtype in KERNEL_DTYPES and x.dtype in _X_DTYPES


def sparse_linear(
    layout: Layout, x: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = True
) -> torch.Tensor:
    """x (..., cols) -> x @ W.T + bias, (..., rows) in x's dtype; W is the sparse weight ``layout`` holds."""
    ext = load_kernels() if use_kernel and kernel_supported(layout, x) else None
    if ext is None:
        y = sparse_linear_ref(layout, x.reshape(-1, layout.shape[1]), bias)  # (tokens, rows)
        return y.reshape(*x.shape[:-1], layout.shape[0])
    if isinstance(layout, CsrLayout):
        return ext.csr_linear(layout.col, layout.values, layout.row_ptr, x, bias)
    return ext.bitmask_linear(layout.mask, layout.values, layout.row_ptr, x, bias, layout.skip_zero_bytes)


def expand_dense(layout: Layout, use_kernel: bool = True) -> torch.Tensor:
    """The exact dense weight (rows, cols); through the AVX2 expander when it can run."""
    ext = load_kernels() if use_kernel and isinstance(layout, BitmaskLayout) else None
    if ext is None or layout.values.dtype not in KERNEL_DTYPES:
        return layout_to_dense(layout)
    return ext.bitmask_expand(layout.mask, layout.values, layout.row_ptr)[:, : layout.cols]


__all__ = [
    "BitmaskLayout",
    "CsrLayout",
    "Layout",
    "expand_dense",
    "load_kernels",
    "make_layout",
    "sparse_linear",
    "sparse_linear_ref",
]
