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


def expand_dense(
    layout: Layout, use_kernel: bool = True, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The exact dense weight, rows [r0, r1) (default all) -> (r1 - r0, cols), in ``dtype`` (default the
    values' dtype; fp32 from bf16 is exact); through the AVX2 expander when it can run."""
    r0, r1 = rows if rows is not None else (0, layout.shape[0])
    dtype = dtype or layout.values.dtype
    ext = load_kernels() if use_kernel and isinstance(layout, BitmaskLayout) else None
    if ext is None or layout.values.dtype not in KERNEL_DTYPES or dtype not in (layout.values.dtype, torch.float32):
        return layout_to_dense(layout, (r0, r1)).to(dtype)
    dense = ext.bitmask_expand(layout.mask, layout.values, layout.row_ptr, r0, r1, dtype == torch.float32)
    return dense[:, : layout.cols]


# Rows per prefill tile: 256 x 4096 fp32 = 4 MiB, expanded into the shared L3 rather than written out to memory.
PREFILL_TILE_ROWS = 256


def dense_tiles_linear(
    layout: Layout, x: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = True
) -> torch.Tensor:
    """The prefill path: x (tokens, cols) -> (tokens, rows) in x's dtype, through fp32 dense GEMMs on weight tiles
    expanded on the fly (no full dense copy; bf16 weights also avoid torch's slow AVX2 bf16 GEMM)."""
    rows = layout.shape[0]
    xf = x.float()  # (tokens, cols)
    out_t = torch.empty(rows, x.shape[0], dtype=torch.float32)  # (rows, tokens): tiles are contiguous row slabs
    for r0 in range(0, rows, PREFILL_TILE_ROWS):
        r1 = min(r0 + PREFILL_TILE_ROWS, rows)
        tile = expand_dense(layout, use_kernel, (r0, r1), torch.float32)  # (r1 - r0, cols)
        torch.mm(tile, xf.t(), out=out_t[r0:r1])
    out = out_t.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).contiguous()


__all__ = [
    "dense_tiles_linear",
    "BitmaskLayout",
    "CsrLayout",
    "Layout",
    "expand_dense",
    "load_kernels",
    "make_layout",
    "sparse_linear",
    "sparse_linear_ref",
]
